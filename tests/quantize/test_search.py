"""The shared chunked nearest-code search against brute force (cdist / dense scores + argmin / topk)."""

import pytest
import torch
import torch.nn.functional as F

from snce.quantize import nearest_codes


def brute_force(z, codebook, metric):
    """Dense float64 distances (N, K)."""
    z, codebook = z.double(), codebook.double()
    if metric == "l2":
        return torch.cdist(z, codebook) ** 2
    if metric == "cosine":
        return 1 - F.normalize(z, dim=-1) @ F.normalize(codebook, dim=-1).T
    return -z @ codebook.T


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
@pytest.mark.parametrize(
    "n,k,d,block",
    [
        (1, 1, 3, None),
        (50, 1000, 7, 4 * 17 * 64),
        (1500, 333, 16, 4 * 1024 * 100),
        (8, 262_144, 16, None),
    ],
)
def test_argmin_and_topk_equal_brute_force(metric, n, k, d, block):
    z, codebook = torch.randn(n, d), torch.randn(k, d)
    kwargs = {} if block is None else {"max_block_bytes": block}
    want = brute_force(z, codebook, metric)
    dist, idx = nearest_codes(z, codebook, metric, 1, **kwargs)
    assert torch.equal(idx[:, 0], want.argmin(dim=1))
    torch.testing.assert_close(dist[:, 0].double(), want.min(dim=1).values, rtol=1e-4, atol=1e-4)
    top = min(5, k)
    dist, idx = nearest_codes(z, codebook, metric, top, **kwargs)
    want_d, want_i = want.topk(top, dim=1, largest=False)
    assert torch.equal(idx, want_i)
    torch.testing.assert_close(dist.double(), want_d, rtol=1e-4, atol=1e-4)


def test_ties_go_to_the_lower_index_across_blocks():
    # 10 distinct codes with small integer entries (every score is exact), each repeated 30 times
    distinct = torch.eye(10, 4) * 10 + torch.arange(10.0)[:, None]
    codebook = distinct.repeat(30, 1)
    z = distinct.clone()
    _, idx = nearest_codes(z, codebook, "l2", 3, max_block_bytes=4 * 10 * 7)
    assert torch.equal(idx, torch.arange(10)[:, None] + torch.tensor([0, 10, 20]))
