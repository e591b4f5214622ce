"""`snce sample --out-dir`: the same PNGs and npz on 1 or 2 ranks, balanced classes, resume, the ADM layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from snce.cli import main
from snce.generators import build_generator
from snce.tokenizer import Tokenizer, TokenizerConfig
from snce.train import sample_job
from snce.train.sample_job import batch_seed, image_name, pending_batches, sample_labels

K = 32


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random tiny grey tokenizer (8 x 8 images from 4 x 4 tokens) and two untrained generators on it:
    class-conditional autoregressive (3 classes) and unconditional masked diffusion."""
    root = tmp_path_factory.mktemp("sample_job")
    torch.manual_seed(0)
    tok = Tokenizer(
        TokenizerConfig(
            in_channels=1, channels=8, channel_mult=(1, 2), latent_channels=4,
            quantizer={"kind": "vq", "codebook_size": K},
        )
    ).eval()  # fmt: skip
    tok.save_pretrained(root / "tok")
    for name, family, classes in (("ar", "autoregressive", 3), ("mdm", "masked_diffusion", 0)):
        size = dict(vocab_size=K, grid=(4, 4), num_classes=classes, dim=32, n_layers=1, n_heads=2)
        build_generator(family, "tiny", **size).save_pretrained(root / name)
        run = {"tokenizer": str(root / "tok"), "codebook_hash": tok.codebook_hash()}
        (root / name / "run.json").write_text(json.dumps({**run, "sample": {"steps": 2}}))
    return root


def _args(saved, out, *extra) -> list[str]:
    """``snce sample`` of the conditional generator into ``out``, batches of 4."""
    where = ["--checkpoint", str(saved / "ar"), "--out-dir", str(out)]
    return ["sample", *where, "--batch-size", "4", *extra]


def _pngs(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def test_two_ranks_give_the_images_of_one(saved, tmp_path):
    """torchrun with 2 ranks (gloo) writes byte-equal PNGs and npz to one process: 9 images in batches of 4
    (3 batches dealt to 2 ranks, the last one short), classes in a given order, CFG on."""
    args = ["--per-class", "3", "--classes", "0", "2", "1", "--cfg", "1.5"]
    assert main(_args(saved, tmp_path / "one", *args)) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, "-m", "snce.cli", *_args(saved, tmp_path / "two", *args)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "images/s" in proc.stdout and "on 2 rank(s)" in proc.stdout
    one, two = _pngs(tmp_path / "one"), _pngs(tmp_path / "two")
    assert list(one) == [f"{i:06d}.png" for i in range(9)]
    assert one == two
    npz = [(tmp_path / d / "samples.npz").read_bytes() for d in ("one", "two")]
    assert npz[0] == npz[1]
    # Each batch has its own random stream: no image is repeated (4 x 4 tokens over 32 codes).
    assert len(set(one.values())) == 9
    with np.load(tmp_path / "two" / "samples.npz") as npz:
        assert npz["labels"].tolist() == [0, 0, 0, 2, 2, 2, 1, 1, 1]


def test_balanced_classes_and_the_adm_layout(saved, tmp_path):
    out = tmp_path / "s"
    assert main(_args(saved, out, "--per-class", "3")) == 0
    with np.load(out / "samples.npz") as npz:
        assert sorted(npz.files) == ["arr_0", "labels"]
        arr, labels = npz["arr_0"], npz["labels"]
    # Grey images expanded to 3 channels; image i has class i // 3.
    assert arr.dtype == np.uint8 and arr.shape == (9, 8, 8, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i in range(9):
        png = np.asarray(Image.open(out / f"{i:06d}.png"))
        assert png.shape == (8, 8)  # lossless grey PNG, equal to every channel of the npz image
        np.testing.assert_array_equal(arr[i], np.repeat(png[..., None], 3, -1))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["settings"]["per_class"] == 3
    assert manifest["settings"]["num_images"] == 9 and manifest["settings"]["seed"] == 0

    # --num interleaves the classes; an unconditional generator takes --num.
    assert sample_labels(3, classes=[2, 0], num=5).tolist() == [2, 0, 2, 0, 2]
    assert sample_labels(1000, per_class=50).bincount().tolist() == [50] * 1000
    unc = tmp_path / "unc"
    unconditional = ["sample", "--checkpoint", str(saved / "mdm"), "--out-dir", str(unc)]
    assert main([*unconditional, "--num", "5"]) == 0
    with np.load(unc / "samples.npz") as npz:
        assert npz.files == ["arr_0"] and npz["arr_0"].shape == (5, 8, 8, 3)


def test_resume_redraws_only_what_is_missing(saved, tmp_path, monkeypatch):
    full, out = tmp_path / "full", tmp_path / "resumed"
    # 9 images in batches of 4: [0-3] [4-7] [8].
    assert main(_args(saved, full, "--per-class", "3")) == 0
    reference = _pngs(full)

    # An interrupted run: the process dies after writing 5 images (batch 1 half written).
    calls = {"n": 0}
    write = sample_job.write_png

    def dying_write(pixels, path):
        if calls["n"] == 5:
            raise KeyboardInterrupt
        calls["n"] += 1
        write(pixels, path)

    monkeypatch.setattr(sample_job, "write_png", dying_write)
    with pytest.raises(KeyboardInterrupt):
        main(_args(saved, out, "--per-class", "3"))
    monkeypatch.setattr(sample_job, "write_png", write)
    assert len(_pngs(out)) == 5 and not (out / "samples.npz").exists()
    (out / ".000005.png.tmp-1").write_bytes(b"\x89PNG half")  # a write cut short
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    assert pending_batches(out, 9, 4) == [1, 2]
    assert main(_args(saved, out, "--per-class", "3")) == 0
    assert _pngs(out) == reference  # same images as the uninterrupted run
    # Finished images were not rewritten.
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in kept.items())
    assert not list(out.glob(".*tmp*"))
    assert (out / "samples.npz").read_bytes() == (full / "samples.npz").read_bytes()

    # A deleted and a truncated image are redrawn the same; nothing else is rewritten.
    (out / "000002.png").unlink()
    (out / "000008.png").write_bytes(reference["000008.png"][:40])
    assert pending_batches(out, 9, 4) == [0, 2]
    assert main(_args(saved, out, "--per-class", "3")) == 0
    assert _pngs(out) == reference


def test_changed_settings_are_refused_on_resume(saved, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(_args(saved, out, "--per-class", "2")) == 0
    capsys.readouterr()
    changed = ["--per-class", "2", "--seed", "1", "--set", "temperature=0.5"]
    assert main(_args(saved, out, *changed)) == 2
    err = capsys.readouterr().err
    assert "seed: 0 there, 1 now" in err and "sampling:" in err and "--overwrite" in err
    assert main(_args(saved, out, "--per-class", "2", "--seed", "1", "--overwrite")) == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["seed"] == 1
    # Numbered PNGs without a manifest are not adopted.
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "000000.png").write_bytes(b"")
    assert main(_args(saved, stray, "--per-class", "2")) == 2


def test_bad_arguments(saved, tmp_path, capsys):
    grid = str(tmp_path / "grid.png")
    # --out xor --out-dir; --per-class or --num for a conditional generator; valid classes.
    assert main(_args(saved, tmp_path / "a", "--per-class", "2", "--out", grid)) == 2
    assert main(_args(saved, tmp_path / "b")) == 2
    assert main(_args(saved, tmp_path / "c", "--per-class", "2", "--num", "3")) == 2
    assert main(_args(saved, tmp_path / "d", "--per-class", "2", "--classes", "3")) == 2
    assert "--classes [3] out of range" in capsys.readouterr().err
    plain = ["sample", "--checkpoint", str(saved / "ar")]
    assert main([*plain, "--per-class", "2", "--out", grid]) == 2  # --per-class needs --out-dir
    # The grid path is unchanged.
    assert main([*plain, "--num", "3", "--out", grid]) == 0
    assert Image.open(grid).size[0] > 0


def test_names_and_seeds():
    assert image_name(123, 50_000) == "000123.png" and image_name(5, 2_000_000) == "0000005.png"
    seeds = {batch_seed(s, b) for s in range(3) for b in range(100)}
    assert len(seeds) == 300 and batch_seed(0, 7) == batch_seed(0, 7)
    with pytest.raises(ValueError, match="seed"):
        batch_seed(-1, 0)
