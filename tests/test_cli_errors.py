"""The CLI's one rule for errors a user can cause: one line on stderr naming what was wrong, exit code 2, no
traceback, before any expensive work; and damaged checkpoints are named, skipped on resume, never deleted.

One module-scoped run of each kind (a tokenizer, its shards, a generator) is built through the CLI; each
damage case works on its own copy.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from snce.cli import main

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = [
    "data.name=digits", "data.size=8", "model.in_channels=1", "model.channels=8", "model.channel_mult=[1, 2]",
    "model.latent_channels=4", "model.quantizer.codebook_size=32", "train.steps=3", "train.batch_size=16",
    "train.device=cpu", "train.progress=false", "train.tensorboard=false", "train.ckpt_every=1",
    "train.keep_checkpoints=3",
]  # fmt: skip


def sets(items) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def generator_config(root: Path, out: Path, steps: int = 4) -> Path:
    cfg = {
        "shards": str(root / "shards"), "tokenizer": str(root / "tok" / "tokenizer"),
        "family": "autoregressive", "preset": "tiny", "model": {"dim": 32, "n_layers": 1, "n_heads": 2},
        "sample": {"num_images": 4},
        "train": {"out_dir": str(out), "steps": steps, "batch_size": 8, "lr": 1e-3, "device": "cpu",
                  "progress": False, "tensorboard": False, "log_every": 2, "ckpt_every": 2, "image_every": 0,
                  "keep_checkpoints": 3, "ema_decay": 0.9},
    }  # fmt: skip
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """tok/ (a tokenizer run with checkpoints 1-3), shards/, gen/ (a generator run), and image folders."""
    root = tmp_path_factory.mktemp("cli")
    assert main(["tokenizer", "train", *sets([*TOKENIZER, f"train.out_dir={root / 'tok'}"])]) == 0
    tok = str(root / "tok" / "tokenizer")
    assert main(["tokenize", "--tokenizer", tok, "--out", str(root / "shards")]) == 0
    assert main(["generator", "train", "--config", str(generator_config(root, root / "gen"))]) == 0
    rgb = root / "rgb"
    for c in ("a", "b"):
        (rgb / c).mkdir(parents=True)
        for i in range(4):
            pixels = np.random.default_rng(i).integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(rgb / c / f"{i}.png")
    (root / "empty").mkdir()
    (root / "empty_subfolders" / "a").mkdir(parents=True)
    (root / "empty_subfolders" / "b").mkdir()
    return root


def run_cli(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *expected: str) -> None:
    errors = [line for line in err.splitlines() if not line.startswith("snce: warning:")]
    assert code == 2, err
    assert len(errors) == 1 and errors[0].startswith("snce: error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in errors[0], errors[0]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def study(out: Path, *items: str) -> list:
    config = REPO / "configs" / "study" / "mnist.yaml"
    return ["study", "--config", config, "--quick", *sets([f"out_dir={out}", *items])]


def tokenizer_train(out: Path, *items: str) -> list:
    return ["tokenizer", "train", *sets([*TOKENIZER, f"train.out_dir={out}", *items])]


# (case id, argv from (made, tmp_path), texts the one line must hold)
BAD_INPUTS = [
    ("codebook_size negative", lambda m, t: tokenizer_train(t / "o", "model.quantizer.codebook_size=-5"),
     ["'model.quantizer'", "codebook_size must be a positive int, got -5"]),
    ("codebook_size zero", lambda m, t: tokenizer_train(t / "o", "model.quantizer.codebook_size=0"),
     ["codebook_size must be a positive int, got 0"]),
    ("codebook_size text", lambda m, t: tokenizer_train(t / "o", "model.quantizer.codebook_size=big"),
     ["codebook_size must be a positive int, got 'big'"]),
    ("misspelt quantizer key", lambda m, t: tokenizer_train(t / "o", "model.quantizer.codebook_sizee=9"),
     ["'model.quantizer'", "codebook_sizee"]),
    ("unknown quantizer kind", lambda m, t: tokenizer_train(t / "o", "model.quantizer.kind=vqq"),
     ["'model.quantizer'", "'vqq'"]),
    ("unknown config key", lambda m, t: tokenizer_train(t / "o", "train.lrr=1"), ["'train.lrr': unknown key"]),
    ("missing config file", lambda m, t: ["tokenizer", "train", "--config", t / "nope.yaml"], ["nope.yaml"]),
    ("empty image folder", lambda m, t: tokenizer_train(t / "o", f"data.path={m / 'empty'}", "data.channels=1"),
     ["holds no readable images"]),
    ("only empty subfolders", lambda m, t: tokenizer_train(t / "o", f"data.path={m / 'empty_subfolders'}", "data.channels=1"),
     ["holds no readable images"]),
    ("grey tokenizer on RGB folder, tokenizer", lambda m, t: tokenizer_train(t / "o", f"data.path={m / 'rgb'}"),
     ["'model.in_channels'", "must equal the data's channels (3", "data.channels=1"]),
    ("grey tokenizer on RGB folder, study", lambda m, t: study(t / "o", f"data.path={m / 'rgb'}"),
     ["'tokenizer.model.in_channels'"]),
    ("study quantizer metric", lambda m, t: study(t / "o", "tokenizer.model.quantizer.metric=manhattan"),
     ["'tokenizer.model.quantizer'", "manhattan"]),
    ("study on empty folder", lambda m, t: study(t / "o", f"data.path={m / 'empty'}", "data.channels=1"),
     ["holds no readable images"]),
    ("sample without output", lambda m, t: ["sample", "--checkpoint", m / "gen"], ["--out"]),
    ("sample missing run", lambda m, t: ["sample", "--checkpoint", t / "none", "--out", t / "g.png"],
     ["none"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "expected"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_one_line_exit_2_before_any_work(made, tmp_path, capsys, argv, expected):
    start = time.perf_counter()
    code, err = run_cli(argv(made, tmp_path), capsys)
    assert_one_line_error(code, err, *expected)
    assert (
        not (tmp_path / "o" / "checkpoints").exists()
        and not (tmp_path / "o" / "tokenizers").exists()
    )
    assert time.perf_counter() - start < 30


def test_debug_shows_the_traceback(made, tmp_path):
    with pytest.raises(ValueError, match="codebook_size must be a positive int"):
        main(["--debug", *tokenizer_train(tmp_path / "o", "model.quantizer.codebook_size=-5")])


# (case id, file to damage relative to the copy, how, argv from (copy, tmp_path))
DAMAGED_FILES = [
    ("sample, truncated generator", "gen/generator/model.safetensors", truncate,
     lambda c, t: ["sample", "--checkpoint", c / "gen", "--out", t / "g.png"]),
    ("sample, empty generator", "gen/generator/model.safetensors", empty,
     lambda c, t: ["sample", "--checkpoint", c / "gen", "--out", t / "g.png"]),
    ("sample, truncated tokenizer", "tok/tokenizer/model.safetensors", truncate,
     lambda c, t: ["sample", "--checkpoint", c / "gen", "--tokenizer", c / "tok/tokenizer", "--out", t / "g.png"]),
    ("eval, truncated generator", "gen/generator/model.safetensors", truncate,
     lambda c, t: ["eval", "--checkpoint", c / "gen", "--num", "8", "--cache-dir", t / "cache"]),
    ("tokenizer eval, empty weights", "tok/tokenizer/model.safetensors", empty,
     lambda c, t: ["tokenizer", "eval", c / "tok/tokenizer"]),
    ("tokenize, truncated weights", "tok/tokenizer/model.safetensors", truncate,
     lambda c, t: ["tokenize", "--tokenizer", c / "tok/tokenizer", "--out", t / "s"]),
    ("generator training, truncated shard", "shards/shard_00000.safetensors", truncate,
     lambda c, t: ["generator", "train", "--config", generator_config(c, t / "g2")]),
]  # fmt: skip


@pytest.fixture
def copy(made, tmp_path) -> Path:
    target = tmp_path / "copy"
    for name in ("tok", "shards", "gen"):
        shutil.copytree(made / name, target / name)
    return target


@pytest.mark.parametrize(
    ("relative", "damage", "argv"),
    [c[1:] for c in DAMAGED_FILES],
    ids=[c[0] for c in DAMAGED_FILES],
)
def test_damaged_file_is_named_in_one_line(copy, tmp_path, capsys, relative, damage, argv):
    path = copy / relative
    assert path.is_file(), sorted(p.name for p in path.parent.iterdir())
    damage(path)
    code, err = run_cli(argv(copy, tmp_path), capsys)
    assert_one_line_error(code, err, str(path))


def steps_of(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())


@pytest.mark.parametrize("damage", [truncate, empty], ids=["truncated", "empty"])
@pytest.mark.parametrize("victim", ["state.pt", "model.safetensors", "ema.safetensors"])
def test_resume_skips_a_damaged_checkpoint_and_keeps_it(copy, capsys, damage, victim):
    run = copy / "gen"
    assert steps_of(run) == ["step_0000002", "step_0000004"]
    damage(run / "checkpoints" / "step_0000004" / victim)
    config = generator_config(copy, run, steps=6)
    with pytest.warns(UserWarning, match=f"skipping checkpoint step_0000004: .*{victim}"):
        code = main(["generator", "train", "--config", str(config), "--resume"])
    assert code == 0
    # resumed from step 2, trained to 6; the damaged checkpoint is kept, set aside, not pruned
    assert "unreadable-step_0000004" in steps_of(run) and "step_0000006" in steps_of(run)
    assert (run / "checkpoints" / "unreadable-step_0000004" / victim).is_file()


def test_resume_when_latest_names_a_missing_folder(copy, capsys):
    run = copy / "tok"
    (run / "checkpoints" / "latest").write_text("step_0000099\n")
    assert main(tokenizer_train(run, "train.steps=4") + ["--resume"]) == 0
    assert "step_0000004" in steps_of(run)


def test_resume_with_every_checkpoint_damaged_says_so(copy, capsys):
    run = copy / "tok"
    for step in steps_of(run):
        truncate(run / "checkpoints" / step / "state.pt")
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        code, err = run_cli(tokenizer_train(run, "train.steps=4") + ["--resume"], capsys)
    assert_one_line_error(code, err, "no checkpoint")
    assert all(name.startswith("unreadable-") for name in steps_of(run))  # all kept
