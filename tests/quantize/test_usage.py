"""Usage statistics: codebook_usage and the sliding-window tracker against direct counting."""

import math

import pytest
import torch

from snce.quantize import UsageTracker, VectorQuantizer, codebook_usage


def test_codebook_usage_closed_form():
    usage, perplexity = codebook_usage(torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]]), 16)
    assert usage == 4 / 16
    assert math.isclose(perplexity, 4.0, rel_tol=1e-9)  # uniform over 4 codes
    usage, perplexity = codebook_usage(torch.zeros(7, dtype=torch.long), 5)
    assert usage == 1 / 5 and math.isclose(perplexity, 1.0)


def test_codebook_usage_random_against_counting():
    idx = torch.randint(0, 50, (3, 40))
    counts = [int((idx == k).sum()) for k in range(64)]
    probs = [c / idx.numel() for c in counts if c]
    usage, perplexity = codebook_usage(idx, 64)
    assert usage == sum(c > 0 for c in counts) / 64
    assert math.isclose(perplexity, math.exp(-sum(p * math.log(p) for p in probs)), rel_tol=1e-9)


def test_codebook_usage_bad_input():
    with pytest.raises(TypeError, match="integer"):
        codebook_usage(torch.zeros(3), 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        codebook_usage(torch.tensor([4]), 4)
    with pytest.raises(ValueError, match="codebook_size"):
        codebook_usage(torch.tensor([0]), 0)


def test_tracker_window_against_direct_counting():
    k, window = 20, 3
    tracker = UsageTracker(k, window)
    batches = [torch.randint(0, k, (int(torch.randint(1, 6, ())),)) for _ in range(10)]
    for t, batch in enumerate(batches):
        got = tracker.update(batch)
        recent = torch.cat(batches[max(0, t - window + 1) : t + 1])
        assert got == recent.unique().numel() / k


def test_quantizer_reports_window_usage_in_training_and_batch_usage_in_eval():
    q = VectorQuantizer(4, 32, usage_window=2)
    seen = []
    for _ in range(3):
        out = q(torch.randn(1, 5, 4))
        seen.append(out.indices.reshape(-1))
        assert out.stats["usage"] == torch.cat(seen[-2:]).unique().numel() / 32
    q.eval()
    out = q(torch.randn(1, 5, 4))
    assert out.stats["usage"] == out.indices.unique().numel() / 32
