"""Captions and editing manifests (JSON lines naming image files): items, splits, errors, tokenize via the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from snce.config import ConfigError
from snce.data import DataConfig, TokenShards, build_dataset
from snce.data.captioned import CaptionedImages, ImageEdits


def write_png(path, seed, size=12):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def write_lines(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture
def captions(tmp_path):
    pixels = [write_png(tmp_path / "img" / f"{i}.png", i) for i in range(7)]
    texts = [f"picture number {i}" for i in range(7)]
    file = write_lines(
        tmp_path / "captions.jsonl",
        [{"image": f"img/{i}.png", "text": t} for i, t in enumerate(texts)][:3] + [""]
        + [{"image": f"img/{i}.png", "text": texts[i]} for i in range(3, 7)],
    )  # fmt: skip
    return file, pixels, texts


def test_captions_give_images_and_texts_in_file_order(captions):
    file, pixels, texts = captions
    ds = CaptionedImages(file, size=12)  # images already square at 12 px: no resampling
    assert len(ds) == 7 and ds.num_classes == 0
    for i in range(7):
        image, text = ds[i]
        expected = torch.from_numpy(pixels[i]).permute(2, 0, 1).float() / 127.5 - 1
        assert text == texts[i]
        torch.testing.assert_close(image, expected)


def test_splits_are_disjoint_and_cover_the_file(captions):
    file, _, texts = captions
    parts = {
        s: [t for _, t in CaptionedImages(file, 12, split=s)] for s in ("train", "val", "test")
    }
    assert parts["test"] == [texts[5]] and parts["val"] == [
        texts[4]
    ]  # every 6th record, and the one before
    assert sorted(sum(parts.values(), [])) == sorted(texts)


def test_edits_give_source_instruction_target(tmp_path):
    a, b = write_png(tmp_path / "a.png", 1), write_png(tmp_path / "sub" / "b.png", 2)
    file = write_lines(
        tmp_path / "edits.jsonl",
        [{"source": "a.png", "instruction": "make it blue", "target": "sub/b.png"}],
    )
    (item,) = ImageEdits(file, size=12)
    assert item["instruction"] == "make it blue"
    for key, pixels in (("source", a), ("target", b)):
        torch.testing.assert_close(
            item[key], torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
        )


def test_root_overrides_the_files_folder(tmp_path):
    write_png(tmp_path / "images" / "x.png", 0)
    (tmp_path / "meta").mkdir()
    file = write_lines(tmp_path / "meta" / "c.jsonl", [{"image": "x.png", "text": "x"}])
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) not found: line 1: .*meta/x.png"):
        CaptionedImages(file)
    assert len(CaptionedImages(file, root=tmp_path / "images")) == 1


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"line 2: not JSON"),
        ('["img/0.png", "a"]', r'line 2: expected \{"image": PATH, "text": TEXT\}'),
        ('{"image": "img/0.png"}', r"line 2: expected"),
        ('{"image": "img/0.png", "text": "  "}', r"line 2: empty text"),
    ],
)
def test_bad_lines_are_named(tmp_path, line, message):
    write_png(tmp_path / "img" / "0.png", 0)
    file = write_lines(tmp_path / "c.jsonl", [{"image": "img/0.png", "text": "ok"}, line])
    with pytest.raises(ValueError, match=message):
        CaptionedImages(file)


def test_unreadable_images_are_skipped_with_a_warning(tmp_path):
    write_png(tmp_path / "good.png", 0)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    file = write_lines(
        tmp_path / "c.jsonl",
        [{"image": "good.png", "text": "a"}, {"image": "bad.png", "text": "b"}],
    )
    with pytest.warns(UserWarning, match="unreadable image.*bad.png"):
        ds = CaptionedImages(file)
    assert [t for _, t in ds] == ["a"]
    empty = write_lines(tmp_path / "e.jsonl", [""])
    with pytest.raises(ValueError, match="holds no records"):
        CaptionedImages(empty)


def test_data_config_selects_and_checks_the_files(captions, tmp_path):
    file, _, texts = captions
    ds = build_dataset(DataConfig(captions=str(file), size=12), split="all")
    assert isinstance(ds, CaptionedImages) and [t for _, t in ds] == texts
    with pytest.raises(ConfigError, match="captions or edits, not both"):
        DataConfig(captions=str(file), edits=str(file)).check()
    with pytest.raises(ConfigError, match="edits.*existing JSON-lines file"):
        DataConfig(edits=str(tmp_path / "none.jsonl")).check()


def test_cli_tokenizes_a_captions_file(captions, tmp_path):
    from snce.cli import main
    from snce.tokenizer import Tokenizer, TokenizerConfig

    file, _, texts = captions
    tok = Tokenizer(
        TokenizerConfig(in_channels=3, channels=8, channel_mult=(1, 2), latent_channels=4,
                        quantizer={"kind": "vq", "codebook_size": 16})
    )  # fmt: skip
    tok.save_pretrained(tmp_path / "tok")
    out = tmp_path / "tokens"
    args = ["tokenize", "--tokenizer", str(tmp_path / "tok"), "--out", str(out), "--split", "all"]
    args += ["--set", f"data.captions={file}", "--set", "data.size=8", "--device", "cpu"]
    assert main([*args, "--text-encoder", '{"kind": "builtin", "dim": 8}']) == 0
    shards = TokenShards(out)
    assert shards.texts == texts and shards.manifest.has_text and not shards.manifest.edit


def test_a_truncated_image_is_skipped_when_read(tmp_path):
    write_png(tmp_path / "a.png", 0)
    cut = tmp_path / "b.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        cut
    )
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # verifies, does not decode
    file = write_lines(
        tmp_path / "c.jsonl",
        [{"image": "b.jpg", "text": "cut"}, {"image": "a.png", "text": "whole"}],
    )
    ds = CaptionedImages(file, size=12)
    with pytest.warns(UserWarning, match="unreadable image"):
        assert ds[0][1] == "whole"  # replaced by the next readable record


def test_edit_manifests_name_their_errors_and_take_absolute_paths(tmp_path):
    a = tmp_path / "a.png"
    write_png(a, 0)
    ok = {"source": str(a), "instruction": "x", "target": str(a)}  # absolute: root does not apply
    assert (
        len(ImageEdits(write_lines(tmp_path / "e.jsonl", [ok]), root=tmp_path / "elsewhere")) == 1
    )
    bad = write_lines(tmp_path / "f.jsonl", [ok, {"source": "a.png", "instruction": "x"}])
    with pytest.raises(
        ValueError, match=r'line 2: expected \{"source": PATH, "instruction": TEXT, "target"'
    ):
        ImageEdits(bad)
    gone = write_lines(tmp_path / "g.jsonl", [{**ok, "target": "missing.png"}])
    with pytest.raises(FileNotFoundError, match=r"line 1: .*missing.png"):
        ImageEdits(gone)


def test_a_line_with_a_unicode_line_separator_in_its_text_is_one_record(tmp_path):
    write_png(tmp_path / "a.png", 0)
    text = "one\u2028two"
    (tmp_path / "c.jsonl").write_text(
        "\ufeff" + json.dumps({"image": "a.png", "text": text}, ensure_ascii=False) + "\r\n",
        encoding="utf-8",
    )
    assert [t for _, t in CaptionedImages(tmp_path / "c.jsonl")] == [text]


def test_overriding_the_image_source_drops_the_tokenizers_recorded_one(tmp_path, captions):
    from snce.tokenizer import load_data_config

    file = captions[0]
    (tmp_path / "tok").mkdir()
    train = tmp_path / "train"
    train.mkdir()
    (tmp_path / "tok" / "data.json").write_text(
        json.dumps({"name": "folder", "path": str(train), "size": 16})
    )
    data = load_data_config(tmp_path / "tok", [f"data.captions={file}"])
    assert (data.captions, data.path, data.size, data.kind) == (str(file), None, 16, "captions")
    data = load_data_config(tmp_path / "tok", [f"data.captions={file}", f"data.path={tmp_path}"])
    assert data.path == str(tmp_path)
    assert load_data_config(tmp_path / "tok", ["data.size=8"]).path == str(train)
