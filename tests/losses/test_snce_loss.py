"""The chunked SNCE paths against the dense float64 reference, and the loss's known limits."""

import itertools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from snce import FusedLinearSNCELoss, NeighborTable, SNCELoss
from snce.functional import (
    fused_linear_cross_entropy,
    fused_linear_snce_loss,
    neighbor_distribution,
    snce_loss,
    suggest_tau,
)
from snce.losses.reference import (
    assert_close,
    cross_entropy_reference,
    dense_distance,
    fused_linear_snce_loss_reference,
    snce_loss_reference,
)
from snce.losses.targets import MIN_NEAREST_MASS

N, K, D, H = 37, 53, 5, 7  # K and N not multiples of the block sizes used below
METRICS = ["l2", "cosine", "dot"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_case(dtype, with_latents, ignore=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(K, D, generator=g, dtype=torch.float64)
    target = torch.randint(0, K, (N,), generator=g)
    if ignore:
        target[[3, 11]] = -100
    latents = codebook[target.clamp(0)] + 0.3 * torch.randn(N, D, generator=g, dtype=torch.float64)
    return dict(
        logits=(3 * torch.randn(N, K, generator=g, dtype=torch.float64)).to(dtype),
        hidden=torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype),
        head_weight=torch.randn(K, H, generator=g, dtype=torch.float64).to(dtype),
        head_bias=torch.randn(K, generator=g, dtype=torch.float64).to(dtype),
        target=target,
        codebook=codebook.to(dtype),
        latents=latents.to(dtype) if with_latents else None,
        weight=torch.rand(N, generator=g, dtype=torch.float64).to(dtype),
    )


def gold(x):
    return None if x is None else x.detach().double()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("with_latents", [False, True])
@pytest.mark.parametrize("topk", [None, 4])
def test_snce_loss_matches_reference(dtype, metric, with_latents, topk):
    c = make_case(dtype, with_latents)
    for reduction, use_weight in itertools.product(["mean", "sum", "none"], [False, True]):
        logits = c["logits"].clone().requires_grad_()
        kw = dict(tau=0.7, metric=metric, topk=topk, reduction=reduction,
                  weight=c["weight"] if use_weight else None)
        out = snce_loss(logits, c["target"], codebook=c["codebook"], latents=c["latents"], block_rows=5, **kw)
        gold_logits = gold(logits).requires_grad_()
        ref = snce_loss_reference(gold_logits, c["target"], codebook=gold(c["codebook"]),
                                  latents=gold(c["latents"]), **{**kw, "weight": gold(kw["weight"])})
        up = torch.randn(ref.shape, dtype=torch.float64)
        (g,) = torch.autograd.grad(out, logits, up.to(out.dtype))
        (g_ref,) = torch.autograd.grad(ref, gold_logits, up)
        what = f"{metric} latents={with_latents} topk={topk} {reduction} weight={use_weight}"
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close(out, ref, TOL[dtype], "loss " + what)
        assert_close(g, g_ref, TOL[dtype], "grad " + what)
        assert g.dtype == logits.dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("with_latents", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_linear_matches_reference(dtype, metric, with_latents, reduction):
    c = make_case(dtype, with_latents)
    for topk, use_bias in [(None, True), (3, False)]:
        params = [c["hidden"].clone().requires_grad_(), c["head_weight"].clone().requires_grad_()]
        bias = c["head_bias"].clone().requires_grad_() if use_bias else None
        kw = dict(tau=0.5, metric=metric, topk=topk, reduction=reduction, weight=c["weight"])
        out = fused_linear_snce_loss(*params, c["target"], bias, codebook=c["codebook"], latents=c["latents"],
                                     block_rows=6, **kw)
        gparams = [gold(p).requires_grad_() for p in params]
        gbias = gold(bias).requires_grad_() if use_bias else None
        ref = fused_linear_snce_loss_reference(*gparams, c["target"], gbias, codebook=gold(c["codebook"]),
                                               latents=gold(c["latents"]), **{**kw, "weight": gold(c["weight"])})
        up = torch.randn(ref.shape, dtype=torch.float64)
        inputs = params + ([bias] if use_bias else [])
        grads = torch.autograd.grad(out, inputs, up.to(out.dtype))
        grads_ref = torch.autograd.grad(ref, gparams + ([gbias] if use_bias else []), up)
        what = f"{metric} latents={with_latents} {reduction} topk={topk} bias={use_bias}"
        assert_close(out, ref, TOL[dtype], "loss " + what)
        for name, a, b in zip(["hidden", "weight", "bias"], grads, grads_ref, strict=False):
            assert_close(a, b, TOL[dtype], f"grad {name} " + what)


@pytest.mark.parametrize("block_rows", [1, 4, 1000])
def test_fused_equals_unfused_for_any_block_size(block_rows):
    c = make_case(torch.float64, True)
    h = c["hidden"].clone().requires_grad_()
    w = c["head_weight"].clone().requires_grad_()
    kw = dict(codebook=c["codebook"], latents=c["latents"], tau=0.9, metric="l2")
    fused = fused_linear_snce_loss(h, w, c["target"], block_rows=block_rows, **kw)
    g_fused = torch.autograd.grad(fused, (h, w))
    unfused = snce_loss(h @ w.T, c["target"], block_rows=block_rows, **kw)
    g_unfused = torch.autograd.grad(unfused, (h, w))
    assert_close(fused, unfused, 1e-12, "loss")
    for a, b in zip(g_fused, g_unfused, strict=True):
        assert_close(a, b, 1e-12, "grad")


def test_memory_budget_sets_block_rows_and_results_agree():
    c = make_case(torch.float64, True)
    kw = dict(codebook=c["codebook"], latents=c["latents"], tau=0.9)
    tiny = snce_loss(c["logits"], c["target"], memory_budget=2 * 4 * K * 3, **kw)  # 3 rows per block
    big = snce_loss(c["logits"], c["target"], **kw)
    assert_close(tiny, big, 1e-12, "loss")


@pytest.mark.parametrize("metric", METRICS)
def test_neighbor_distribution_is_softmax_of_negative_distance(metric):
    c = make_case(torch.float64, True)
    q = neighbor_distribution(c["latents"][:9], c["codebook"], tau=0.3, metric=metric)
    expected = torch.softmax(-dense_distance(c["latents"][:9], c["codebook"], metric) / 0.3, dim=1)
    assert_close(q, expected, 1e-12, "q")
    assert torch.allclose(q.sum(1), torch.ones(9, dtype=torch.float64))
    q3 = neighbor_distribution(c["latents"][:9], c["codebook"], tau=0.3, metric=metric, topk=3)
    assert ((q3 > 0).sum(1) == 3).all()
    top = expected.topk(3, dim=1)
    assert_close(q3.gather(1, top.indices), top.values / top.values.sum(1, keepdim=True), 1e-12, "q topk")


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("with_latents", [False, True])
def test_tau_to_zero_is_cross_entropy_on_nearest_code(metric, with_latents):
    c = make_case(torch.float64, with_latents, ignore=False)
    z = c["latents"] if with_latents else c["codebook"][c["target"]]
    nearest = dense_distance(z, c["codebook"], metric).argmin(1)
    out = snce_loss(c["logits"], c["target"], codebook=c["codebook"], latents=c["latents"], tau=1e-9,
                    metric=metric)
    assert_close(out, F.cross_entropy(c["logits"], nearest), 1e-10, "tau->0")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_topk1_pretokenized_is_cross_entropy(metric):
    c = make_case(torch.float64, False)
    logits = c["logits"].clone().requires_grad_()
    out = snce_loss(logits, c["target"], codebook=c["codebook"], tau=5.0, metric=metric, topk=1)
    ref = F.cross_entropy(gold(logits).requires_grad_(), c["target"])
    assert_close(out, ref, 1e-10, "topk=1")
    table = NeighborTable.build(c["codebook"], 1, 5.0, metric)
    assert_close(snce_loss(c["logits"], c["target"], table=table), ref, 1e-10, "table k=1")


def test_topk1_dot_can_prefer_a_longer_code():
    """Under "dot" a code is not necessarily its own nearest neighbour (documented behaviour)."""
    codebook = torch.tensor([[1.0, 0.0], [3.0, 0.5]], dtype=torch.float64)
    table = NeighborTable.build(codebook, 1, 1.0, "dot")
    assert table.indices[0, 0] == 1  # e_0 . e_1 = 3 > e_0 . e_0 = 1


def test_tau_to_infinity_gives_uniform_target():
    c = make_case(torch.float64, True, ignore=False)
    out = snce_loss(c["logits"], c["target"], codebook=c["codebook"], latents=c["latents"], tau=1e12)
    uniform = -(c["logits"].log_softmax(1).mean(1)).mean()
    assert_close(out, uniform, 1e-9, "tau->inf")


def test_all_ignored_batch_gives_zero_loss_and_zero_grads():
    c = make_case(torch.float64, True)
    h = c["hidden"].clone().requires_grad_()
    w = c["head_weight"].clone().requires_grad_()
    target = torch.full((N,), -100)
    out = fused_linear_snce_loss(h, w, target, codebook=c["codebook"], latents=c["latents"], tau=1.0)
    out.backward()
    assert out.item() == 0.0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_leading_dimensions_are_flattened():
    c = make_case(torch.float64, True, ignore=False)
    kw = dict(codebook=c["codebook"], tau=0.8, reduction="none")
    flat = snce_loss(c["logits"][:36], c["target"][:36], latents=c["latents"][:36], **kw)
    shaped = snce_loss(c["logits"][:36].view(4, 9, K), c["target"][:36].view(4, 9),
                       latents=c["latents"][:36].view(4, 9, D), **kw)
    assert shaped.shape == (4, 9)
    assert torch.equal(shaped.flatten(), flat)


@pytest.mark.parametrize("metric", METRICS)
def test_neighbor_table_matches_dense_topk_and_reports_dropped_mass(metric):
    c = make_case(torch.float64, False)
    table = NeighborTable.build(c["codebook"], 6, 0.4, metric, max_block_bytes=8 * 4 * 10)
    q_full = torch.softmax(-dense_distance(c["codebook"], c["codebook"], metric) / 0.4, dim=1)
    top = q_full.topk(6, dim=1)
    assert torch.equal(table.indices, top.indices)
    assert_close(table.probs, top.values / top.values.sum(1, keepdim=True), 1e-12, "probs")
    assert_close(table.dropped_mass, 1 - top.values.sum(1), 1e-10, "dropped mass")
    logits = c["logits"].clone().requires_grad_()
    out = snce_loss(logits, c["target"], table=table)
    ref = snce_loss_reference(c["logits"], c["target"], codebook=c["codebook"], tau=0.4, metric=metric, topk=6)
    assert_close(out, ref, 1e-10, "table loss vs dense topk")


def test_neighbor_table_build_is_chunked_for_large_codebooks():
    """K = 16,384 builds in well under 256 MiB, where one K x K float32 matrix alone would be 1 GiB."""
    script = (
        "import torch, resource; torch.set_num_threads(1)\n"
        "from snce import NeighborTable\n"
        "cb = torch.randn(16384, 8)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "t = NeighborTable.build(cb, 8, 1.0, 'l2')\n"
        "assert (t.indices[:, 0] == torch.arange(16384)).float().mean() > 0.999\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    extra_mib = float(out.stdout.strip().splitlines()[-1])
    assert extra_mib < 256, f"table build used {extra_mib:.0f} MiB extra"
    small = torch.randn(300, 16)
    table = NeighborTable.build(small, 8, 1.0, "l2", max_block_bytes=4 * 7 * 11)
    brute = torch.cdist(small.double(), small.double()).topk(8, largest=False).indices
    assert torch.equal(table.indices, brute)


def test_cross_entropy_with_label_smoothing_and_weights():
    c = make_case(torch.float64, False)
    for smoothing, reduction in itertools.product([0.0, 0.1], ["mean", "sum", "none"]):
        h = c["hidden"].clone().requires_grad_()
        w = c["head_weight"].clone().requires_grad_()
        out = fused_linear_cross_entropy(h, w, c["target"], label_smoothing=smoothing, weight=c["weight"],
                                         reduction=reduction, block_rows=7)
        gh, gw = gold(h).requires_grad_(), gold(w).requires_grad_()
        ref = cross_entropy_reference(gh @ gw.T, c["target"], label_smoothing=smoothing, weight=c["weight"],
                                      reduction=reduction)
        up = torch.randn(ref.shape, dtype=torch.float64)
        for a, b in zip(torch.autograd.grad(out, (h, w), up), torch.autograd.grad(ref, (gh, gw), up), strict=True):
            assert_close(a, b, 1e-10, f"ce grad {smoothing} {reduction}")
        assert_close(out, ref, 1e-10, f"ce {smoothing} {reduction}")
    plain = fused_linear_cross_entropy(c["hidden"], c["head_weight"], c["target"], label_smoothing=0.1)
    torch_ce = F.cross_entropy(c["hidden"] @ c["head_weight"].T, c["target"], label_smoothing=0.1)
    assert_close(plain, torch_ce, 1e-10, "vs F.cross_entropy")


def test_modules_wrap_the_functional_core():
    c = make_case(torch.float64, True)
    crit = SNCELoss(c["codebook"], tau=0.6, metric="cosine")
    expected = snce_loss(c["logits"], c["target"], codebook=c["codebook"], latents=c["latents"], tau=0.6,
                         metric="cosine")
    assert torch.equal(crit(c["logits"], c["target"], latents=c["latents"]), expected)
    fused = FusedLinearSNCELoss(c["codebook"], tau=0.6, metric="cosine")
    out = fused(c["hidden"], c["head_weight"], c["target"], latents=c["latents"])
    assert_close(out, snce_loss(c["hidden"] @ c["head_weight"].T, c["target"], codebook=c["codebook"],
                                latents=c["latents"], tau=0.6, metric="cosine"), 1e-12, "module")
    assert "codebook" in crit.state_dict()


def test_low_precision_inputs_accumulate_in_float32():
    c = make_case(torch.float32, True)
    for dtype in (torch.bfloat16, torch.float16):
        logits = c["logits"][:8, :].to(dtype).requires_grad_()
        out = snce_loss(logits, c["target"][:8], codebook=c["codebook"], latents=c["latents"][:8], tau=0.7)
        ref = snce_loss_reference(gold(logits), c["target"][:8], codebook=gold(c["codebook"]),
                                  latents=gold(c["latents"][:8]), tau=0.7)
        assert out.dtype == torch.float32
        assert_close(out, ref, 1e-5, str(dtype))  # exact up to fp32: the input is already rounded
        out.backward()
        assert logits.grad.dtype == dtype


def test_suggest_tau_is_the_median_nearest_neighbour_gap():
    codebook = torch.arange(10, dtype=torch.float64)[:, None] * torch.tensor([[1.0, 0.0]])
    # Codes on a line at unit spacing: nearest other code at squared distance 1 for every code.
    assert suggest_tau(codebook, "l2") == pytest.approx(1.0)
    latents = torch.tensor([[0.25, 0.0], [3.4, 0.0]], dtype=torch.float64)
    # gaps: 0.75^2 - 0.25^2 = 0.5 and 0.6^2 - 0.4^2 = 0.2 -> median of two = lower middle (torch.median)
    assert suggest_tau(codebook, "l2", latents=latents) == pytest.approx(0.2)
    for metric in METRICS:
        assert suggest_tau(torch.randn(300, 8), metric) > 0


def test_suggest_tau_keeps_a_fifth_of_the_mass_on_the_nearest_code():
    # Codes on a line (l2): the median-gap tau leaves far more than the floor on the nearest code, so the
    # floor changes nothing (the test above). Unit-norm-ish Gaussian codes under the dot product at D = 32:
    # the runner-up is as far as thousands of others, and the median gap would spread the target widely.
    torch.manual_seed(0)
    codebook = torch.randn(2048, 32, dtype=torch.float64)
    dots = codebook @ codebook.T  # dense reference: target logits e_y . e_k / tau
    top2 = dots.topk(2, dim=1).values
    gap_tau = float((top2[:, 0] - top2[:, 1]).median())

    def median_nearest_mass(tau):
        return float(torch.softmax(dots / tau, dim=1).max(dim=1).values.median())

    assert median_nearest_mass(gap_tau) < 0.05  # what the gap rule alone would give
    tau = suggest_tau(codebook, "dot")
    assert tau < gap_tau
    assert median_nearest_mass(tau) == pytest.approx(MIN_NEAREST_MASS, abs=1e-4)
    assert suggest_tau(codebook, "dot", min_nearest_mass=0.0) == pytest.approx(gap_tau)
    with pytest.raises(ValueError, match="min_nearest_mass"):
        suggest_tau(codebook, "dot", min_nearest_mass=1.0)
