"""Every shipped tokenizer config loads strictly and builds its tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from snce.config import load_config
from snce.tokenizer import TokenizerRunConfig

CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "tokenizer").glob("*.yaml"))


def test_configs_exist_for_digits_and_photos_from_1k_to_64k():
    names = {p.stem for p in CONFIGS}
    for data in ("digits", "photos"):
        assert {f"{data}_k1k", f"{data}_k64k"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads(path):
    cfg = load_config(TokenizerRunConfig, path)
    k = cfg.model.quantizer["codebook_size"]
    assert 256 <= k <= 65536 and cfg.train.out_dir.endswith(path.stem)
    assert cfg.data.size % cfg.model.downsample == 0
