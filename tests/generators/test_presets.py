"""Named generator sizes against LlamaGen's published parameter counts, counted on the meta device (no memory)."""

from __future__ import annotations

import pytest
import torch

from snce.generators import PRESETS, build_generator

# LlamaGen (Sun et al. 2024, arXiv 2406.06525, Table 6): class-conditional AR models at 16,384 codes, 1,000
# classes, 16 x 16 tokens; (parameters as published, the precision they are published to, layers, width, heads).
PUBLISHED = {
    "B": (111e6, 1e6, 12, 768, 12),
    "L": (343e6, 1e6, 24, 1024, 16),
    "XL": (775e6, 1e6, 36, 1280, 20),
    "XXL": (1.4e9, 0.1e9, 48, 1536, 24),
    "3B": (3.1e9, 0.1e9, 24, 3200, 32),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_llamagen_parameter_counts(name):
    params, precision, layers, dim, heads = PUBLISHED[name]
    assert PRESETS[name] == dict(n_layers=layers, dim=dim, n_heads=heads)
    with torch.device("meta"):
        model = build_generator(
            "autoregressive", name, vocab_size=16384, grid=(16, 16), num_classes=1000
        )
    assert all(p.is_meta for p in model.parameters())
    n = model.num_params()
    # published numbers are rounded to `precision`
    assert abs(n - params) <= precision / 2, f"{name}: {n:,} parameters, published {params:,.0f}"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_both_families(name):
    """Every named size is a valid architecture for both families (masked diffusion adds [MASK] and positions)."""
    with torch.device("meta"):
        ar = build_generator(
            "autoregressive", name, vocab_size=16384, grid=(16, 16), num_classes=1000
        )
        md = build_generator(
            "masked_diffusion", name, vocab_size=16384, grid=(16, 16), num_classes=1000
        )
    dim = PRESETS[name]["dim"]
    assert md.num_params() - ar.num_params() == dim + 256 * dim  # [MASK] row + position embeddings
    assert len(ar.shard_units()) == PRESETS[name]["n_layers"]
