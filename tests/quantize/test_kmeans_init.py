"""k-means initialisation without duplicate codes, and codebook_health against a dense reference.

Issue 12: at K = 4,096 the old k-means drew its initial centres with replacement from one batch, so thousands
of codes started as copies of each other. The rule now: initial centres are distinct rows (exact
de-duplication in the metric's space), noise-filled with a warning when the data hold fewer than K distinct
rows; Lloyd iterations keep them distinct.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from snce.quantize import VectorQuantizer, kmeans
from snce.quantize.base import codebook_health, distinct_rows
from snce.quantize.search import to_search_space

D = 8


def exact_duplicates(codes: torch.Tensor) -> int:
    return codes.shape[0] - torch.unique(codes, dim=0).shape[0]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("seeding", ["random", "kmeans++"])
def test_no_duplicate_codes_when_the_data_has_enough_distinct_latents(metric, seeding):
    """The acceptance test: 5,000 distinct latents (each repeated 3 times), K = 4,096 -> no duplicates."""
    g = torch.Generator().manual_seed(1)
    distinct = torch.randn(5000, D, generator=g)
    x = distinct.repeat(3, 1)[torch.randperm(15000, generator=g)]  # duplicates in the data itself
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough distinct rows: no warning
        centres, sizes = kmeans(x, 4096, iters=5, metric=metric, seeding=seeding, generator=g)
    assert centres.shape == (4096, D)
    assert exact_duplicates(centres) == 0
    assert codebook_health(centres, metric)["duplicate_codes"] == 0
    assert int(sizes.sum()) == x.shape[0]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_initial_centres_are_distinct_data_rows(metric):
    x = torch.randn(300, D).repeat(4, 1)  # 300 distinct rows, 1,200 rows
    centres, sizes = kmeans(x, 256, iters=1, metric=metric)
    assert exact_duplicates(centres) == 0
    # the seeds are distinct rows, so each seed's first cell holds at least its own copies: none is empty
    assert bool((sizes >= 4).all())


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_fewer_distinct_latents_than_codes_warns_and_fills_with_distinct_points(metric):
    x = torch.randn(100, D).repeat(20, 1)  # 2,000 rows, 100 distinct
    with pytest.warns(UserWarning, match="only 100 distinct rows for k = 256"):
        centres, sizes = kmeans(x, 256, iters=10, metric=metric)
    assert exact_duplicates(centres) == 0
    assert int((sizes > 0).sum()) == 100  # the noise-filled centres stay empty
    if metric == "cosine":
        torch.testing.assert_close(centres.norm(dim=-1), torch.ones(256))


def test_one_distinct_row_still_gives_distinct_centres():
    x = torch.ones(50, D)
    with pytest.warns(UserWarning, match="only 1 distinct rows"):
        centres, _ = kmeans(x, 16, iters=2)
    assert exact_duplicates(centres) == 0


def test_max_points_subsamples_without_replacement_and_falls_back_for_seeds():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, D, generator=g)
    _, sizes = kmeans(x, 64, iters=2, max_points=1000, generator=g)
    assert int(sizes.sum()) == 1000  # Lloyd ran on 1,000 rows
    # a subsample with fewer distinct rows than k seeds from all of x's distinct rows: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        centres, sizes = kmeans(x, 600, iters=1, max_points=500, generator=g)
    assert exact_duplicates(centres) == 0 and int(sizes.sum()) == 500


def test_generator_makes_the_draw_reproducible_and_leaves_the_global_rng_alone():
    x = torch.randn(2000, D)
    state = torch.get_rng_state()
    a, _ = kmeans(x, 128, iters=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = kmeans(x, 128, iters=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    a, _ = kmeans(x, 128, iters=3, seeding="kmeans++", generator=torch.Generator().manual_seed(7))
    b, _ = kmeans(x, 128, iters=3, seeding="kmeans++", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_kmeans_plus_plus_spreads_the_seeds():
    """Two far blobs, k = 2: k-means++ puts one seed in each (the second draw weighs distance^2)."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(500, D, generator=g), 100 + torch.randn(500, D, generator=g)])
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        centres, sizes = kmeans(x, 2, iters=1, seeding="kmeans++", generator=gen)
        assert sorted(sizes.tolist()) == [500, 500]


def test_kmeans_rejects_bad_arguments():
    x = torch.randn(10, D)
    with pytest.raises(ValueError, match="seeding"):
        kmeans(x, 4, seeding="farthest")
    with pytest.raises(ValueError, match="max_points"):
        kmeans(x, 4, max_points=0)
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.full((10, D), float("nan")), 4)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        kmeans(torch.randn(10), 4)


def test_distinct_rows_keeps_first_occurrences_in_order():
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 2.0], [3.0, 1.0], [0.0, 0.0]])
    assert distinct_rows(x).tolist() == [0, 1, 3]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_vector_quantizer_init_keeps_empty_clusters_distinct(metric, ema_decay):
    """Empty clusters (here: the noise-filled ones) keep their centres; under EMA they used to become 0."""
    q = VectorQuantizer(D, 256, metric=metric, ema_decay=ema_decay, kmeans_init=True)
    assert q.pending_init
    z = torch.randn(100, D).repeat(10, 1)
    with pytest.warns(UserWarning, match="only 100 distinct rows"):
        q.init_codebook(z)
    assert not q.pending_init
    assert exact_duplicates(q.codebook.detach()) == 0
    q.eval()
    z = torch.randn(5000, D)
    q.init_codebook(z)  # enough distinct latents: a codebook without duplicates, used by the data
    assert exact_duplicates(q.codebook.detach()) == 0
    assert codebook_health(q.codebook.detach(), metric)["duplicate_codes"] == 0


def test_vector_quantizer_kmeans_points_caps_the_latents():
    q = VectorQuantizer(D, 32, ema_decay=0.9, kmeans_init=True, kmeans_points=500)
    assert q.config["kmeans_points"] == 500
    q.init_codebook(torch.randn(4000, D))
    assert float(q.cluster_size.sum()) == pytest.approx(500)
    with pytest.raises(ValueError, match="kmeans_points"):
        VectorQuantizer(D, 32, kmeans_points=0)


# ------------------------------------------------------------------------------------------ codebook_health


def dense_health(codebook, metric, indices, rtol=1e-4):
    """Reference: the full (K, K) squared-L2 matrix in the metric's search space."""
    c = to_search_space(codebook, metric).double()
    d2 = torch.cdist(c, c).square()
    k = c.shape[0]
    eye = torch.eye(k, dtype=torch.bool)
    nn = d2.masked_fill(eye, float("inf")).min(dim=1).values
    tol = rtol * float(nn.median())
    earlier = d2.masked_fill(~torch.ones(k, k, dtype=torch.bool).tril(-1), float("inf"))
    duplicates = int((earlier.min(dim=1).values <= tol).sum())
    used = int(torch.bincount(indices.reshape(-1), minlength=k).gt(0).sum())
    return duplicates, k - used


def planted_codebook(k: int, metric: str, seed: int = 0):
    """Random codes with planted duplicates; returns (codebook, number planted)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(k, 6, generator=g)
    codes[10] = codes[3]  # exact group {3, 10, 50}: 2 duplicates
    codes[50] = codes[3]
    codes[7] = codes[
        k - 5
    ]  # an exact pair whose first copy has the higher index: 1 duplicate (k - 5)
    codes[100] = codes[20] + 1e-5 * torch.randn(6, generator=g)  # near-duplicate: 1
    codes[k - 1] = codes[k - 2]  # pair at the end (last block): 1
    planted = 5
    if metric == "cosine":  # same direction, another length: equal unit codes
        codes[150] = 2.5 * codes[30]
        planted += 1
    return codes, planted


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
# 1,024 rows x 100 codes per block (blocks before, across and after the diagonal) / one block
@pytest.mark.parametrize("block_bytes", [4 * 1024 * 100, 2**24])
def test_codebook_health_counts_planted_duplicates_and_dead_codes(metric, block_bytes):
    k = 1301
    codes, planted = planted_codebook(k, metric)
    indices = torch.arange(0, k, 3).repeat(2).reshape(2, -1)  # codes 0, 3, ..., 300 used
    stats = codebook_health(codes, metric, indices, max_block_bytes=block_bytes)
    ref_dup, ref_dead = dense_health(codes, metric, indices)
    assert stats["duplicate_codes"] == ref_dup == planted
    used = len(range(0, k, 3))
    assert stats["dead_codes"] == ref_dead == k - used
    assert stats["used_codes"] == used and stats["usage"] == pytest.approx(used / k)
    assert stats["perplexity"] == pytest.approx(used)
    assert stats["codebook_size"] == k


def test_codebook_health_matches_dense_on_a_crowded_codebook():
    """Codes on a coarse grid, 2 in 3 jittered (float64, so that rounding stays out of the comparison):
    exact copies, near copies and far codes; tolerances from 0 to beyond the jitter."""
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 4, (1500, 3), generator=g).double()  # 64 grid points
    jitter = torch.arange(1500) % 3 > 0
    codes[jitter] += 1e-2 * torch.randn(int(jitter.sum()), 3, generator=g, dtype=torch.float64)
    indices = torch.randint(0, 1500, (1000,), generator=g)
    for rtol in (0.0, 1e-4, 1.0, 10.0, 1e3):
        stats = codebook_health(codes, "l2", indices, rtol=rtol, max_block_bytes=8 * 1024 * 37)
        assert (stats["duplicate_codes"], stats["dead_codes"]) == dense_health(
            codes, "l2", indices, rtol
        )


def test_codebook_health_without_indices_and_tiny_codebooks():
    stats = codebook_health(torch.randn(40, 4), "l2")
    assert stats["duplicate_codes"] == 0 and "dead_codes" not in stats
    assert stats["nn_distance_median"] > 0
    one = codebook_health(torch.randn(1, 4), "cosine", torch.zeros(3, dtype=torch.long))
    assert one["duplicate_codes"] == 0 and one["dead_codes"] == 0
    with pytest.raises(ValueError, match="codebook"):
        codebook_health(torch.randn(4), "l2")
    with pytest.raises(ValueError, match="indices must lie"):
        codebook_health(torch.randn(4, 2), "l2", torch.tensor([4]))


def test_codebook_health_of_unit_codes_is_cosine_geometry():
    codes = F.normalize(torch.randn(64, 5), dim=-1)
    codes[9] = codes[2] * (1 + 1e-7)  # equal after normalisation up to rounding
    assert codebook_health(codes, "cosine")["duplicate_codes"] == 1
