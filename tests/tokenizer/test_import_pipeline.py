"""The README's path from a published tokenizer to an SNCE-trained generator, through the CLI:
import -> tokenize an image folder (with latents) -> generator train (SNCE from latents) -> sample."""

import json

import numpy as np
import torch
import yaml
from PIL import Image

from snce.cli import main
from snce.tokenizer import Tokenizer, TokenizerConfig
from snce.tokenizer.formats import export_state


def _published_llamagen_file(path):
    """A small file in LlamaGen's layout (weights under 'model', the codebook_used buffer beside them)."""
    torch.manual_seed(0)
    cfg = TokenizerConfig(
        in_channels=3, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, mid_attention=True,
        latent_channels=8, architecture="taming", z_channels=32, attn_levels=(2,),
        quantizer={"kind": "vq", "codebook_size": 64, "metric": "cosine"},
    )  # fmt: skip
    state = export_state(Tokenizer(cfg), "llamagen")
    state["quantize.codebook_used"] = torch.zeros(65536)
    torch.save({"model": state, "steps": 100}, path)


def _image_folder(root, per_class=12):
    rng = np.random.default_rng(0)
    for label, colour in enumerate(((220, 40, 40), (40, 40, 220))):
        (root / f"class{label}").mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            x, y = rng.integers(4, 20, 2)
            image[y : y + 10, x : x + 10] = colour
            Image.fromarray(image).save(root / f"class{label}" / f"{i}.png")


def test_published_tokenizer_to_snce_generator(tmp_path, capsys):
    _published_llamagen_file(tmp_path / "vq_ds4.pt")
    _image_folder(tmp_path / "images")
    tok, shards = tmp_path / "tokenizer", tmp_path / "tokens"
    data = [f"--set=data.path={tmp_path / 'images'}", "--set=data.size=32"]

    assert main(["tokenizer", "import", str(tmp_path / "vq_ds4.pt"), "--format", "llamagen",
                 "--out", str(tok)]) == 0  # fmt: skip
    assert Tokenizer.from_pretrained(tok).quantizer.metric == "cosine"
    assert main(["tokenize", "--tokenizer", str(tok), "--out", str(shards), "--latents",
                 "--split", "all", *data]) == 0  # fmt: skip
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["codebook_size"] == 64 and manifest["num_samples"] == 24

    run = tmp_path / "run"
    config = {
        "shards": str(shards), "tokenizer": str(tok), "family": "autoregressive", "preset": "tiny",
        "model": {"dim": 32, "n_layers": 1, "n_heads": 2},
        "loss": {"kind": "snce", "targets": "latents"},
        "sample": {"num_images": 4},
        "train": {"out_dir": str(run), "steps": 4, "batch_size": 8, "warmup_steps": 1, "ckpt_every": 4,
                  "log_every": 2, "image_every": 0, "progress": False, "tensorboard": False},
    }  # fmt: skip
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump(config))
    assert main(["generator", "train", "--config", str(tmp_path / "gen.yaml")]) == 0
    assert main(["sample", "--checkpoint", str(run), "--classes", "0", "1", "--num", "4",
                 "--out", str(tmp_path / "grid.png")]) == 0  # fmt: skip
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[0] >= 64 and grid.size[1] >= 32  # decoded 32 px samples
