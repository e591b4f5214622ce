"""Generator runs end to end on tiny shards: `snce generator train`, `snce sample`, and the input checks."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from snce.cli import main
from snce.config import ConfigError, load_config
from snce.data import ShardManifest, ShardWriter
from snce.tokenizer import Tokenizer, TokenizerConfig
from snce.train.generator import GeneratorRunConfig, train_generator

K = 32


def _tokenizer(path, seed):
    torch.manual_seed(seed)
    cfg = TokenizerConfig(
        in_channels=1,
        channels=8,
        channel_mult=(1, 2),
        latent_channels=4,
        quantizer={"kind": "vq", "codebook_size": K},
    )
    tok = Tokenizer(cfg).eval()
    tok.save_pretrained(path)
    return tok


def _shards(path, tok, latents=False, n=24, num_classes=3):
    manifest = ShardManifest(
        grid=(2, 2),
        codebook_size=K,
        metric=tok.quantizer.metric,
        codebook_hash=tok.codebook_hash(),
        tokenizer=tok.full_config(),
        num_classes=num_classes,
        latent_dim=4 if latents else None,
    )
    writer = ShardWriter(path, manifest)
    labels = torch.arange(n) % max(num_classes, 1)
    tokens = (labels[:, None, None] * 5 + torch.arange(4).view(1, 2, 2)) % K  # one grid per class
    writer.add(tokens, labels, torch.randn(n, 2, 2, 4) if latents else None)
    return writer.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok = _tokenizer(root / "tok", 0)
    _tokenizer(root / "other_tok", 1)
    _shards(root / "shards", tok)
    _shards(root / "val", tok, n=6)
    _shards(root / "uncond", tok, num_classes=0)
    return root


def _config(root, out, **changes):
    cfg = {
        "shards": str(root / "shards"),
        "tokenizer": str(root / "tok"),
        "val_shards": str(root / "val"),
        "family": "masked_diffusion",
        "preset": "tiny",
        "model": {"dim": 32, "n_layers": 1, "n_heads": 2},
        "loss": {"kind": "snce", "topk": 4},
        "sample": {"num_images": 6, "steps": 2},
        "train": {
            "out_dir": str(out),
            "steps": 4,
            "batch_size": 8,
            "lr": 1e-3,
            "device": "cpu",
            "progress": False,
            "tensorboard": False,
            "log_every": 2,
            "ckpt_every": 2,
            "image_every": 2,
            "ema_decay": 0.9,
        },
    }
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            cfg[section][name] = value
        else:
            cfg[section] = value
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_then_sample_through_the_cli(inputs, tmp_path):
    out = tmp_path / "run"
    assert main(["generator", "train", "--config", str(_config(inputs, out))]) == 0
    gen_dir = out / "generator"
    run = json.loads((gen_dir / "run.json").read_text())
    assert run["loss"]["kind"] == "snce" and run["loss"]["topk"] == 4 and run["loss"]["tau"] > 0
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [
        "samples_0000002.png",
        "samples_0000004.png",
    ]
    val = [json.loads(line) for line in (out / "val.jsonl").read_text().splitlines()]
    assert [r["step"] for r in val] == [2, 4] and all(
        np.isfinite(r["val_loss"]) and r["val_ce"] > 0 for r in val
    )
    assert len((out / "log.jsonl").read_text().splitlines()) == 2

    grid, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(out),
                "--classes",
                "0",
                "2",
                "--num",
                "4",
                "--cfg",
                "1.5",
                "--out",
                str(grid),
                "--npz",
                str(npz),
                "--set",
                "steps=3",
            ]
        )
        == 0
    )
    assert Image.open(grid).size[0] > 0
    data = np.load(npz)
    assert data["tokens"].shape == (4, 2, 2) and data["labels"].tolist() == [0, 2, 0, 2]
    assert data["images"].shape == (4, 4, 4, 1) and data["images"].dtype == np.uint8
    assert (
        main(["sample", "--checkpoint", str(out), "--out", str(grid)]) == 2
    )  # never overwrite silently


def test_bad_inputs_stop_before_training(inputs, tmp_path, capsys):
    out = tmp_path / "bad"
    code = main(
        [
            "generator",
            "train",
            "--config",
            str(_config(inputs, out, tokenizer=str(inputs / "other_tok"))),
        ]
    )
    assert code == 2 and "codebook hash" in capsys.readouterr().err
    code = main(
        [
            "generator",
            "train",
            "--config",
            str(_config(inputs, out, **{"loss.targets": "latents", "loss.topk": None})),
        ]
    )
    assert code == 2 and "hold latents" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()
    uncond = _config(
        inputs, out, shards=str(inputs / "uncond"), val_shards="", **{"sample.cfg_scale": 2.0}
    )
    with pytest.raises(ConfigError, match="sample.cfg_scale"):
        train_generator(load_config(GeneratorRunConfig, uncond))
    with pytest.raises(ConfigError, match="model.vocab_size"):
        load_config(GeneratorRunConfig, _config(inputs, out, model={"vocab_size": 7}))
    with pytest.raises(ConfigError, match="tokenizer"):
        load_config(GeneratorRunConfig, _config(inputs, out, tokenizer=""))


def test_sample_rejects_bad_classes_and_other_tokenizer(inputs, tmp_path, capsys):
    out = tmp_path / "ar"
    cfg = load_config(
        GeneratorRunConfig,
        _config(
            inputs,
            out,
            family="autoregressive",
            val_shards="",
            loss={"kind": "ce"},
            **{"train.steps": 2, "train.image_every": 0},
        ),
    )
    model = train_generator(cfg)
    assert model.config.family == "autoregressive" and model.config.num_classes == 3
    grid = str(tmp_path / "g.png")
    assert main(["sample", "--checkpoint", str(out), "--classes", "3", "--out", grid]) == 2
    assert "class ids must lie in [0, 3)" in capsys.readouterr().err
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(out),
                "--tokenizer",
                str(inputs / "other_tok"),
                "--out",
                grid,
            ]
        )
        == 2
    )
    assert "not the one this generator was trained on" in capsys.readouterr().err


def test_shipped_configs_load(inputs):
    from pathlib import Path

    from snce.generators import FAMILIES

    files = sorted(Path(__file__).parents[2].glob("configs/generator/*.yaml"))
    assert len(files) >= 4
    for path in files:
        cfg = load_config(
            GeneratorRunConfig, path, [f"shards={inputs / 'shards'}", f"tokenizer={inputs / 'tok'}"]
        )
        arch = FAMILIES[cfg.family].config_class.preset(
            cfg.preset, vocab_size=K, grid=(2, 2), num_classes=3, **cfg.model
        )
        assert arch.family == cfg.family


@pytest.mark.slow  # the loop's own resume test runs by default (tests/train); this one is for generator runs
def test_resume_after_a_checkpoint_equals_an_uninterrupted_run(inputs, tmp_path):
    from safetensors.torch import load_file

    def run(out, steps, resume=False):
        path = _config(
            inputs,
            out,
            val_shards="",
            **{
                "train.steps": steps,
                "train.image_every": 0,
                "train.schedule": "constant",  # LR(step) must not depend on steps
                "model": {
                    "dim": 32,
                    "n_layers": 1,
                    "n_heads": 2,
                    "class_dropout": 0.3,
                    "dropout": 0.1,
                },
            },
        )
        args = ["generator", "train", "--config", str(path)] + (["--resume"] if resume else [])
        assert main(args) == 0
        return load_file(str(out / "generator" / "model.safetensors"))

    full = run(tmp_path / "full", 4)
    run(tmp_path / "part", 2)
    resumed = run(tmp_path / "part", 4, resume=True)  # same out_dir, --set train.steps=4 --resume
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=0)


@pytest.mark.slow
def test_torchrun_matches_one_process(inputs, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo) follows one process on the combined batch (AR + SNCE; no dropout, so
    the ranks' random streams do not enter the loss)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    def config(out):
        return _config(
            inputs,
            out,
            family="autoregressive",
            val_shards="",
            model={"dim": 32, "n_layers": 1, "n_heads": 2, "class_dropout": 0.0},
            **{"train.steps": 3, "train.image_every": 0, "train.grad_accum": 2, "train.lr": 1e-2},
        )

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "snce.cli",
    ]
    proc = subprocess.run(
        [*cmd, "generator", "train", "--config", str(config(tmp_path / "ddp"))],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["generator", "train", "--config", str(config(tmp_path / "single"))]) == 0
    ddp = load_file(str(tmp_path / "ddp" / "generator" / "model.safetensors"))
    single = load_file(str(tmp_path / "single" / "generator" / "model.safetensors"))
    assert ddp.keys() == single.keys()
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
