"""Text-to-image and editing generators end to end: shards with text -> snce generator train ->
snce sample --prompt / snce edit. What the models learn is checked elsewhere; here the wiring."""

import pytest
import torch
import yaml
from PIL import Image

from snce.cli import main
from snce.text import BuiltinTextEncoder
from snce.tokenizer import Tokenizer, TokenizerConfig, tokenize_dataset

COLOURS = {"red": (1.0, -1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}


def _square(colour: str, left: bool) -> torch.Tensor:
    image = torch.full((3, 16, 16), -1.0)
    x = 1 if left else 9
    image[:, 4:10, x : x + 6] = torch.tensor(COLOURS[colour])[:, None, None]
    return image


def _captions():
    return [(_square(c, left), f"a {c} square on the {'left' if left else 'right'}")
            for c in COLOURS for left in (True, False)] * 3  # fmt: skip


def _edits():
    items = []
    for c in COLOURS:
        other = next(o for o in COLOURS if o != c)
        for left in (True, False):
            items.append({"source": _square(c, left), "instruction": f"make the square {other}",
                          "target": _square(other, left)})  # fmt: skip
    return items * 3


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = TokenizerConfig(in_channels=3, channels=8, channel_mult=(1, 2), latent_channels=4,
                          quantizer={"kind": "vq", "codebook_size": 32})  # fmt: skip
    path = tmp_path_factory.mktemp("tok")
    Tokenizer(cfg).save_pretrained(path)
    return path


def _train(tmp_path, tokenizer_dir, items, family, loss):
    shards, run = tmp_path / "shards", tmp_path / "run"
    encoder = BuiltinTextEncoder(dim=16, max_length=8)
    tokenize_dataset(Tokenizer.from_pretrained(tokenizer_dir), items, shards, text_encoder=encoder,
                     device="cpu", progress=False)  # fmt: skip
    config = {
        "shards": str(shards), "tokenizer": str(tokenizer_dir), "family": family, "preset": "tiny",
        "model": {"dim": 32, "n_layers": 1, "n_heads": 2}, "loss": {"kind": loss},
        "sample": {"num_images": 4, "cfg_scale": 2.0},
        "train": {"out_dir": str(run), "steps": 3, "batch_size": 4, "warmup_steps": 1, "ckpt_every": 3,
                  "log_every": 1, "image_every": 3, "progress": False, "tensorboard": False},
    }  # fmt: skip
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump(config))
    assert main(["generator", "train", "--config", str(tmp_path / "gen.yaml")]) == 0
    assert (run / "images").is_dir() and any(
        (run / "images").iterdir()
    )  # sample grids from the texts
    return run


@pytest.mark.parametrize("family", ["autoregressive", "masked_diffusion"])
def test_text_to_image_generator_trains_and_samples_prompts(tmp_path, tokenizer_dir, family):
    run = _train(tmp_path, tokenizer_dir, _captions(), family, "snce")
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(run), "--prompt", "a red square on the left",
                 "--prompt", "a blue square on the right", "--num", "3", "--out", str(out)]) == 0  # fmt: skip
    grid = Image.open(out)
    assert grid.size == (
        (3 * 17 + 1) * 4,
        (2 * 17 + 1) * 4,
    )  # 2 prompts x 3 samples of 16 px, scaled 4x
    assert (
        main(
            ["sample", "--checkpoint", str(run), "--classes", "0", "--out", str(tmp_path / "x.png")]
        )
        == 2
    )


def test_editing_generator_trains_and_edits_an_image(tmp_path, tokenizer_dir):
    run = _train(tmp_path, tokenizer_dir, _edits(), "autoregressive", "ce")
    source = tmp_path / "in.png"
    pixels = ((_square("red", True) + 1) * 127.5).byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(source)
    out = tmp_path / "out.png"
    assert main(["edit", "--checkpoint", str(run), "--image", str(source),
                 "--instruction", "make the square blue", "--out", str(out)]) == 0  # fmt: skip
    assert Image.open(out).size == (16, 16)
    assert main(["edit", "--checkpoint", str(run), "--image", str(source), "--instruction", "x",
                 "--out", str(out)]) == 2  # exists: not overwritten  # fmt: skip
    assert (
        main(
            ["sample", "--checkpoint", str(run), "--prompt", "x", "--out", str(tmp_path / "g.png")]
        )
        == 2
    )
