"""`snce tokenizer train / eval` and `snce tokenize` end to end on tiny settings."""

from __future__ import annotations

import json

import pytest
import torch

from snce.cli import main
from snce.data import Digits, ShardManifest, TokenShards
from snce.tokenizer import Tokenizer, TokenizerConfig, tokenize_dataset

TINY = [
    "data.name=digits", "data.size=8", "model.in_channels=1", "model.channels=8", "model.channel_mult=[1, 2]",
    "model.latent_channels=4", "model.quantizer.codebook_size=32", "train.steps=2", "train.batch_size=16",
    "train.device=cpu", "train.progress=false", "train.tensorboard=false", "train.ckpt_every=1",
]  # fmt: skip


def sets(items):
    return [a for item in items for a in ("--set", item)]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "train.lrr=1",
            "config key 'train.lrr': unknown key; expected one of: activation_checkpointing,",
        ),
        ("train.steps=ten", "config key 'train.steps': expected int, got 'ten'"),
        ("data.path={missing}", "config key 'data.path': expected an existing directory"),
        ("model.quantizer=3", "config key 'model.quantizer': expected a mapping"),
    ],
)
def test_config_errors_stop_before_training(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    argv = [
        "tokenizer",
        "train",
        *sets([*TINY, f"train.out_dir={out}", override.format(missing=tmp_path / "no")]),
    ]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_train_eval_tokenize_and_resume(tmp_path, capsys):
    cfg_file = tmp_path / "tok.yaml"
    cfg_file.write_text("train:\n  lr: 1e-3\n")
    out = tmp_path / "run"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--config",
                str(cfg_file),
                *sets([*TINY, f"train.out_dir={out}"]),
            ]
        )
        == 0
    )
    assert "tokenizer saved to" in capsys.readouterr().out
    assert (out / "tokenizer" / "model.safetensors").is_file() and (
        out / "images" / "recon_0000002.png"
    ).is_file()
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 1e-3
    # Re-running into the same out_dir needs --resume; resuming a finished run trains nothing more.
    assert main(["tokenizer", "train", *sets([*TINY, f"train.out_dir={out}"])]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--resume",
                *sets([*TINY, f"train.out_dir={out}", "train.steps=3"]),
            ]
        )
        == 0
    )
    assert (out / "checkpoints" / "step_0000003").is_dir()

    assert (
        main(["tokenizer", "eval", str(out / "tokenizer"), "--out", str(tmp_path / "m.json")]) == 0
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_images"] == len(Digits(8, split="test")) and 0 < metrics["usage"] <= 1

    shards = tmp_path / "shards"
    assert (
        main(["tokenize", "--tokenizer", str(out / "tokenizer"), "--out", str(shards), "--latents"])
        == 0
    )
    assert main(["tokenize", "--tokenizer", str(out / "tokenizer"), "--out", str(shards)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    ds = TokenShards(shards)
    assert (
        ds.manifest.grid == (4, 4) and ds.manifest.num_classes == 10 and len(ds) == len(Digits(8))
    )


def test_tokenize_then_decode_is_exact(tmp_path):
    torch.manual_seed(1)
    tok = Tokenizer(
        TokenizerConfig(in_channels=1, channels=8, channel_mult=(1, 2, 2), latent_channels=4,
                        quantizer={"kind": "vq", "codebook_size": 64, "metric": "cosine"})
    ).eval()  # fmt: skip
    tok.save_pretrained(tmp_path / "tok")
    data = Digits(16, split="test")
    argv = [
        "tokenize",
        "--tokenizer",
        str(tmp_path / "tok"),
        "--out",
        str(tmp_path / "shards"),
        "--latents",
    ]
    assert main([*argv, "--set", "data.size=16", "--split", "test", "--batch-size", "100"]) == 0
    shards = TokenShards(tmp_path / "shards")
    assert torch.equal(shards.labels, data.labels)
    with torch.no_grad():
        for start in range(
            0, len(data), 100
        ):  # same batches as the command, so the same arithmetic
            x = data.images[start : start + 100]
            enc = tok.encode(x)
            got = tok.decode(shards.indices[start : start + 100].long())
            assert torch.equal(got, tok.decode(enc.indices))
            assert torch.equal(
                shards.latents[start : start + 100], enc.latents.permute(0, 2, 3, 1).half()
            )
    manifest = ShardManifest.load(tmp_path / "shards")
    assert (
        manifest.metric == "cosine"
        and manifest.codebook_size == 64
        and manifest.dataset["size"] == 16
    )
    manifest.check_tokenizer(Tokenizer.from_pretrained(tmp_path / "tok"))
    with pytest.raises(ValueError, match="codebook hash"):
        manifest.check_tokenizer(Tokenizer(TokenizerConfig.from_dict(manifest.tokenizer)))


def test_tokenize_dataset_without_cli_keeps_order(tmp_path):
    tok = Tokenizer(
        TokenizerConfig(in_channels=1, channels=8, channel_mult=(1, 2), latent_channels=4,
                        quantizer={"kind": "vq", "codebook_size": 16})
    ).eval()  # fmt: skip
    data = Digits(8, split="test")
    m = tokenize_dataset(tok, data, tmp_path, batch_size=64, shard_size=100, progress=False)
    assert [s["count"] for s in m.shards] == [100, 100, 99] and not m.has_latents
    with torch.no_grad():
        assert torch.equal(
            TokenShards(tmp_path).indices[:64].long(), tok.encode(data.images[:64]).indices
        )
