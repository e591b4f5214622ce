"""The tiny digits config converges quickly (opt-in: pytest -m slow; ~40 CPU-seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from snce.config import load_config
from snce.data import build_dataset
from snce.tokenizer import TokenizerRunConfig, evaluate_tokenizer, train_tokenizer

CONFIG = Path(__file__).parents[2] / "configs" / "tokenizer" / "digits_tiny.yaml"


@pytest.mark.slow
def test_digits_tiny_reaches_a_usable_tokenizer(tmp_path):
    cfg = load_config(
        TokenizerRunConfig, CONFIG, [f"train.out_dir={tmp_path}", "train.progress=false"]
    )
    tokenizer = train_tokenizer(cfg)
    m = evaluate_tokenizer(
        tokenizer, build_dataset(cfg.data, split="test"), device="cpu", progress=False
    )
    # Measured 22.9 dB / SSIM 0.957 / usage 0.93 at K=256; the mean training image scores 13.6 dB.
    assert m["psnr"] > 21.0 and m["ssim"] > 0.9 and m["usage"] > 0.5
    assert (tmp_path / "images" / "recon_0000250.png").is_file()
