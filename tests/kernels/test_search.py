"""Triton nearest-code search vs the torch search and a dense stable sort (ties to the lower index)."""

import pytest
import torch

pytest.importorskip("triton")

from snce.losses.kernels import nearest_codes_triton  # noqa: E402
from snce.losses.reference import dense_distance  # noqa: E402
from snce.quantize.search import nearest_codes  # noqa: E402

TILES = dict(block_n=32, block_k=32, block_d=16)


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
@pytest.mark.parametrize("k", [1, 3])
def test_matches_torch_search(device, metric, k):
    z, codebook = torch.randn(37, 8, device=device), torch.randn(70, 8, device=device)
    dist, idx, lse = nearest_codes_triton(z, codebook, metric, k, logsumexp_tau=0.7, **TILES)
    ref_dist, ref_idx, ref_lse = nearest_codes(z, codebook, metric, k, logsumexp_tau=0.7)
    assert idx.dtype == torch.long and dist.dtype == torch.float32 and idx.shape == (37, k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_float16_inputs_score_natively_and_exactly(device):
    z, codebook = torch.randn(37, 8, device=device).half(), torch.randn(70, 8, device=device).half()
    dist, idx = nearest_codes_triton(z, codebook, "dot", 4, **TILES)  # precision "auto" -> "native"
    ref_dist, ref_idx = nearest_codes(z, codebook, "dot", 4)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist, rtol=1e-5, atol=1e-5)


def test_ties_go_to_the_lower_index(device):
    # Integer-valued codes and latents: every score is exact, so duplicated codes tie exactly.
    base = torch.randint(-3, 4, (10, 4), device=device).float()
    codebook = torch.cat([base, base, base])  # codes i, i+10, i+20 are equal
    z = torch.randint(-3, 4, (37, 4), device=device).float()
    dist, idx = nearest_codes_triton(z, codebook, "l2", 5, **TILES)  # without logsumexp_tau: 2 outputs
    d = dense_distance(z.double(), codebook.double(), "l2")
    expected = d.sort(dim=1, stable=True).indices[:, :5]  # stable: equal distances keep index order
    assert torch.equal(idx, expected)
    torch.testing.assert_close(dist.double(), d.gather(1, expected))


def test_rejects_bad_input(device):
    z, codebook = torch.randn(5, 8, device=device), torch.randn(7, 8, device=device)
    with pytest.raises(ValueError, match="k must be"):
        nearest_codes_triton(z, codebook, "l2", 8)
    with pytest.raises(ValueError, match="metric"):
        nearest_codes_triton(z, codebook, "hamming")
    with pytest.raises(ValueError, match="dimension"):
        nearest_codes_triton(z[:, :4], codebook)


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_default_tiles_at_larger_shapes_on_gpu(metric):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    z, codebook = torch.randn(3000, 64, device="cuda"), torch.randn(20011, 64, device="cuda")
    for k in (1, 8):
        dist, idx, lse = nearest_codes_triton(z, codebook, metric, k, logsumexp_tau=0.5)
        ref_dist, ref_idx, ref_lse = nearest_codes(z, codebook, metric, k, logsumexp_tau=0.5)
        assert (idx == ref_idx).float().mean() > 0.9999  # float32 rounding may reorder exact near-ties
        torch.testing.assert_close(dist, ref_dist, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-4)
