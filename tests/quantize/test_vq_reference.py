"""VectorQuantizer against vector-quantize-pytorch (the library users know) on the same data and codebook.

Both sides are configured identically: EMA updates (decay 0.8), commitment weight 0.25, rotation trick off,
no dead-code expiry; with k-means initialisation both draw the initial centres with the same RNG call.
"""

import pytest
import torch

from snce.quantize import VectorQuantizer

vqp = pytest.importorskip("vector_quantize_pytorch", reason="installed with the dev/test extras")

DIM, K, DECAY = 16, 32, 0.8


def theirs(metric, kmeans_init):
    return vqp.VectorQuantize(
        dim=DIM,
        codebook_size=K,
        decay=DECAY,
        commitment_weight=0.25,
        kmeans_init=kmeans_init,
        kmeans_iters=10,
        use_cosine_sim=metric == "cosine",
        rotation_trick=False,
        threshold_ema_dead_code=0,
        sync_codebook=False,
    )


def ours(metric, kmeans_init):
    return VectorQuantizer(
        DIM, K, metric=metric, beta=0.25, ema_decay=DECAY, kmeans_init=kmeans_init, kmeans_iters=10
    )


def blobs(batch=2, length=128):
    """Latents around a few centres, so that assignments are well separated."""
    centres = torch.randn(6, DIM) * 3
    return centres[torch.randint(0, 6, (batch, length))] + 0.5 * torch.randn(batch, length, DIM)


def assert_same_step(mine, ref, x, seed):
    torch.manual_seed(seed)
    q_ref, idx_ref, loss_ref = ref(x)
    torch.manual_seed(seed)
    out = mine(x)
    assert torch.equal(out.indices, idx_ref)
    torch.testing.assert_close(out.quantized, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, loss_ref.reshape(()), rtol=1e-5, atol=1e-6)
    cb = ref._codebook
    torch.testing.assert_close(mine.codebook, cb.embed[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.cluster_size, cb.cluster_size[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.embed_avg, cb.embed_avg[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ema_updates_match_from_the_same_codebook(metric):
    mine, ref = ours(metric, False), theirs(metric, False)
    start = blobs().reshape(-1, DIM)[:K]  # codes near the data, so that several are in use
    if metric == "cosine":
        start = torch.nn.functional.normalize(start, dim=-1)
    with torch.no_grad():  # the same state on both sides: codes, running sums, counts (ones)
        for side in (mine, ref._codebook):
            embed, embed_avg = (
                (side.embed, side.embed_avg) if side is mine else (side.embed[0], side.embed_avg[0])
            )
            embed.copy_(start)
            embed_avg.copy_(start)
        assert torch.equal(mine.cluster_size, ref._codebook.cluster_size[0])
    for step in range(4):
        assert_same_step(mine, ref, blobs(), seed=step)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_kmeans_init_then_ema_matches(metric):
    mine, ref = ours(metric, True), theirs(metric, True)
    x = blobs(2, 256)
    assert_same_step(mine, ref, x, seed=123)
    assert_same_step(mine, ref, blobs(), seed=124)
