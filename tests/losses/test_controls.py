"""The study's two controls: shuffled-neighbour SNCE and label smoothing matched in entropy to SNCE.

The shuffle is checked twice: against its definition (a per-code permutation fixing the true code, same
true-code mass, same values and entropy, no geometry) and, through the dense reference, on every path of the
chunked loss.
"""

import itertools
import math
import types

import pytest
import torch
import torch.nn.functional as F

from snce import FusedLinearSNCELoss, SNCELoss
from snce.functional import (
    fused_linear_snce_loss,
    smoothing_for_entropy,
    snce_loss,
    suggest_tau,
    target_entropy,
)
from snce.losses import NeighborShuffle, NeighborTable, chunked, kernels
from snce.losses.reference import (
    assert_close,
    dense_targets,
    fused_linear_snce_loss_reference,
    snce_loss_reference,
)

N, D, H = 37, 5, 7  # N is not a multiple of the block sizes used below
METRICS = ["l2", "cosine", "dot"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_case(dtype, k, with_latents, seed=0):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, D, generator=g, dtype=torch.float64)
    target = torch.randint(0, k, (N,), generator=g)
    target[[3, 11]] = -100
    latents = codebook[target.clamp(0)] + 0.3 * torch.randn(N, D, generator=g, dtype=torch.float64)
    return dict(
        logits=(3 * torch.randn(N, k, generator=g, dtype=torch.float64)).to(dtype),
        hidden=torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype),
        head_weight=torch.randn(k, H, generator=g, dtype=torch.float64).to(dtype),
        head_bias=torch.randn(k, generator=g, dtype=torch.float64).to(dtype),
        target=target,
        codebook=codebook.to(dtype),
        latents=latents.to(dtype) if with_latents else None,
        weight=torch.rand(N, generator=g, dtype=torch.float64).to(dtype),
        shuffle=NeighborShuffle(k, seed=seed + 1),
    )


def gold(x):
    return None if x is None else x.detach().double()


def all_permutations(shuffle):
    """(K, K) long: row y is pi_y."""
    every = torch.arange(shuffle.num_codes)
    return shuffle.permute(every[None], every)


def entropy(q):
    return -torch.special.xlogy(q, q).sum(-1)


# --- the shuffle against its definition ------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 12, 16, 1000, 1023])
def test_each_code_gets_a_permutation_fixing_it(k):
    perms = all_permutations(NeighborShuffle(k, seed=5))
    codes = torch.arange(k)
    assert torch.equal(perms.sort(dim=1).values, codes.expand(k, k))  # every row a bijection of {0..K-1}
    assert torch.equal(perms.diagonal(), codes)  # pi_y(y) = y
    # Fixed points are the minimum the affine family allows: y alone for odd K, y and one other for even K.
    assert torch.equal((perms == codes).sum(1), torch.full((k,), math.gcd(2, k)))


def test_permute_maps_any_index_block():
    shuffle = NeighborShuffle(1000, seed=2)
    perms = all_permutations(shuffle)
    target = torch.randint(0, 1000, (9,))
    codes = torch.randint(0, 1000, (9, 4))
    assert torch.equal(shuffle.permute(codes, target), perms[target[:, None], codes])


def test_different_codes_get_different_permutations():
    # odd K: pi_y = pi_y' only if y = y'
    assert len({tuple(p) for p in all_permutations(NeighborShuffle(1023, seed=0)).tolist()}) == 1023
    # even K: only two codes labelled K/2 apart that drew the same multiplier share a permutation
    shuffle = NeighborShuffle(1000, seed=0)
    perms = all_permutations(shuffle)
    rows = {}
    for y, p in enumerate(perms.tolist()):
        rows.setdefault(tuple(p), []).append(y)
    assert len(rows) >= 0.98 * 1000
    for codes in (c for c in rows.values() if len(c) > 1):
        y, other = codes
        assert shuffle.multipliers[y] == shuffle.multipliers[other]
        assert (shuffle.labels[y] - shuffle.labels[other]).abs() == 500


def test_permutations_are_fixed_by_the_seed():
    a, b, c = NeighborShuffle(1000, seed=7), NeighborShuffle(1000, seed=7), NeighborShuffle(1000, seed=8)
    assert torch.equal(all_permutations(a), all_permutations(b))
    assert not torch.equal(all_permutations(a), all_permutations(c))
    assert repr(a) == "NeighborShuffle(num_codes=1000, seed=7)"


def chunked_targets(c, k, **kw):
    """The target q' the chunked path trains towards: with zero logits and reduction "sum" the gradient of
    each row is 1/K - q'."""
    logits = torch.zeros(N, k, dtype=torch.float64, requires_grad=True)
    snce_loss(logits, c["target"], reduction="sum", block_rows=5, **kw).backward()
    return 1.0 / k - logits.grad


@pytest.mark.parametrize("with_latents", [False, True])
@pytest.mark.parametrize("topk", [None, 6])
def test_shuffled_target_keeps_true_code_mass_values_and_entropy(with_latents, topk):
    k = 1000
    c = make_case(torch.float64, k, with_latents)
    kw = dict(codebook=c["codebook"], latents=c["latents"], tau=0.4, topk=topk)
    q_shuffled = chunked_targets(c, k, shuffle=c["shuffle"], **kw)
    q = dense_targets(c["target"], c["codebook"], c["latents"], tau=0.4, topk=topk)  # plain SNCE
    keep = c["target"] != -100
    y = c["target"][keep]
    q, q_shuffled = q[keep], q_shuffled[keep]
    rows = torch.arange(y.numel())
    assert_close(q_shuffled[rows, y], q[rows, y], 1e-12, "mass on the true code")
    assert_close(q_shuffled.sort(dim=1).values, q.sort(dim=1).values, 1e-12, "values per row")
    assert_close(entropy(q_shuffled.clamp_min(0)), entropy(q), 1e-12, "entropy per row")
    assert not torch.allclose(q_shuffled, q)  # and the values did move


def test_shuffle_removes_the_geometry_of_the_neighbours():
    """Clustered codebook: SNCE puts most of its non-true mass on the true code's cluster; the shuffle does not."""
    g = torch.Generator().manual_seed(0)
    clusters, per = 32, 8
    centres = 10 * torch.randn(clusters, D, generator=g, dtype=torch.float64)
    codebook = (centres[:, None] + 0.2 * torch.randn(clusters, per, D, generator=g, dtype=torch.float64)).reshape(-1, D)
    cluster = torch.arange(clusters).repeat_interleave(per)
    k = codebook.shape[0]
    target = torch.arange(k)
    tau = suggest_tau(codebook, "l2")
    q = dense_targets(target, codebook, tau=tau)
    q_shuffled = dense_targets(target, codebook, tau=tau, shuffle=NeighborShuffle(k, seed=3))
    mates = (cluster[:, None] == cluster[None]) & ~torch.eye(k, dtype=torch.bool)  # same cluster, not y
    # share of the mass off the true code that lands on its 7 cluster mates (7 / 255 for a random placement)
    off_true = 1 - q[target, target]
    snce_share = ((q * mates).sum(1) / off_true).mean()
    shuffled_share = ((q_shuffled * mates).sum(1) / off_true).mean()
    assert snce_share > 0.9 and shuffled_share < 0.1, (float(snce_share), float(shuffled_share))


# --- the chunked path against the dense reference ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("with_latents", [False, True])
@pytest.mark.parametrize("topk", [None, 4])
def test_shuffled_snce_loss_matches_reference(dtype, metric, with_latents, topk):
    k = 1023
    c = make_case(dtype, k, with_latents)
    for reduction, use_weight in itertools.product(["mean", "none"], [False, True]):
        logits = c["logits"].clone().requires_grad_()
        kw = dict(tau=0.7, metric=metric, topk=topk, reduction=reduction, shuffle=c["shuffle"])
        weight = c["weight"] if use_weight else None
        out = snce_loss(logits, c["target"], codebook=c["codebook"], latents=c["latents"], weight=weight,
                        block_rows=5, **kw)
        gold_logits = gold(logits).requires_grad_()
        ref = snce_loss_reference(gold_logits, c["target"], codebook=gold(c["codebook"]),
                                  latents=gold(c["latents"]), weight=gold(weight), **kw)
        up = torch.randn(ref.shape, dtype=torch.float64)
        (grad,) = torch.autograd.grad(out, logits, up.to(out.dtype))
        (grad_ref,) = torch.autograd.grad(ref, gold_logits, up)
        what = f"{metric} latents={with_latents} topk={topk} {reduction} weight={use_weight}"
        assert_close(out, ref, TOL[dtype], "loss " + what)
        assert_close(grad, grad_ref, TOL[dtype], "grad " + what)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("with_latents", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shuffled_fused_linear_matches_reference(dtype, metric, with_latents, reduction):
    k = 1000
    c = make_case(dtype, k, with_latents)
    for topk, use_bias in [(None, True), (3, False)]:
        params = [c["hidden"].clone().requires_grad_(), c["head_weight"].clone().requires_grad_()]
        if use_bias:
            params.append(c["head_bias"].clone().requires_grad_())
        kw = dict(tau=0.5, metric=metric, topk=topk, reduction=reduction, shuffle=c["shuffle"])
        out = fused_linear_snce_loss(*params[:2], c["target"], params[2] if use_bias else None,
                                     codebook=c["codebook"], latents=c["latents"], weight=c["weight"],
                                     block_rows=6, **kw)
        gparams = [gold(p).requires_grad_() for p in params]
        ref = fused_linear_snce_loss_reference(*gparams[:2], c["target"], gparams[2] if use_bias else None,
                                               codebook=gold(c["codebook"]), latents=gold(c["latents"]),
                                               weight=gold(c["weight"]), **kw)
        up = torch.randn(ref.shape, dtype=torch.float64)
        grads = torch.autograd.grad(out, params, up.to(out.dtype))
        grads_ref = torch.autograd.grad(ref, gparams, up)
        what = f"{metric} latents={with_latents} {reduction} topk={topk} bias={use_bias}"
        assert_close(out, ref, TOL[dtype], "loss " + what)
        for name, a, b in zip(["hidden", "weight", "bias"], grads, grads_ref, strict=False):
            assert_close(a, b, TOL[dtype], f"grad {name} " + what)


@pytest.mark.parametrize("metric", METRICS)
def test_shuffled_neighbor_table_matches_reference(metric):
    k = 1000
    c = make_case(torch.float64, k, False)
    table = NeighborTable.build(c["codebook"], 6, 0.4, metric)
    h, w = c["hidden"].clone().requires_grad_(), c["head_weight"].clone().requires_grad_()
    out = fused_linear_snce_loss(h, w, c["target"], table=table, shuffle=c["shuffle"], weight=c["weight"],
                                 block_rows=7)
    gh, gw = gold(h).requires_grad_(), gold(w).requires_grad_()
    ref = fused_linear_snce_loss_reference(gh, gw, c["target"], codebook=c["codebook"], table=table,
                                           shuffle=c["shuffle"], weight=c["weight"])
    assert_close(out, ref, 1e-10, "loss")
    for a, b in zip(torch.autograd.grad(out, (h, w)), torch.autograd.grad(ref, (gh, gw)), strict=True):
        assert_close(a, b, 1e-10, "grad")
    # the table is the top-k target: the same numbers as a dense top-k with the same shuffle
    dense = snce_loss(c["logits"], c["target"], codebook=c["codebook"], tau=0.4, metric=metric, topk=6,
                      shuffle=c["shuffle"])
    assert_close(snce_loss(c["logits"], c["target"], table=table, shuffle=c["shuffle"]), dense, 1e-10, "topk")


def test_dense_shuffle_in_row_groups_smaller_than_a_block(monkeypatch):
    """Row groups of 2 inside blocks of 5 (the group size comes from CACHE_BLOCK_BYTES) change nothing."""
    k = 1023
    c = make_case(torch.float64, k, True)
    kw = dict(codebook=c["codebook"], latents=c["latents"], tau=0.7, shuffle=c["shuffle"], block_rows=5)
    whole = snce_loss(c["logits"], c["target"], **kw)
    monkeypatch.setattr(chunked, "CACHE_BLOCK_BYTES", 2 * chunked.SHUFFLE_BYTES_PER_CODE * k)
    assert_close(snce_loss(c["logits"], c["target"], **kw), whole, 1e-13, "row groups")


def test_dense_shuffle_group_comes_out_of_the_memory_budget():
    k, budget = 1000, 64 * 2**20
    assert chunked.block_rows_for(k, budget, None) == budget // (8 * k)
    assert chunked.block_rows_for(k, budget, None, dense_shuffle=True) == (budget - chunked.CACHE_BLOCK_BYTES) // (8 * k)
    assert chunked.block_rows_for(k, budget, 3, dense_shuffle=True) == 3


# --- validation and dispatch -----------------------------------------------------------------------------


def test_shuffle_errors():
    k = 20
    logits, target, codebook = torch.randn(6, k), torch.randint(0, k, (6,)), torch.randn(k, 3)
    with pytest.raises(ValueError, match="21 codes.*20"):
        snce_loss(logits, target, codebook=codebook, tau=1.0, shuffle=NeighborShuffle(21))
    with pytest.raises(TypeError, match="shuffle"):
        snce_loss(logits, target, codebook=codebook, tau=1.0, shuffle=torch.arange(k))
    hidden, weight = torch.randn(6, 4), torch.randn(k, 4)
    with pytest.raises(ValueError, match="Triton"):
        fused_linear_snce_loss(hidden, weight, target, codebook=codebook, tau=1.0, shuffle=NeighborShuffle(k),
                               impl="triton")
    with pytest.raises(ValueError, match="20 codes"):
        SNCELoss(codebook, tau=1.0, shuffle=NeighborShuffle(19))
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="num_codes"):
            NeighborShuffle(bad)
    with pytest.raises(ValueError, match="seed"):
        NeighborShuffle(10, seed=1.5)


def test_auto_dispatch_keeps_a_shuffle_on_the_torch_path(monkeypatch):
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setattr(kernels, "VERIFIED_ON", "a GPU")
    on_gpu = types.SimpleNamespace(is_cuda=True, dtype=torch.float32)  # all `supports` looks at
    assert kernels.supports(on_gpu, on_gpu)
    assert not kernels.supports(on_gpu, on_gpu, shuffle=NeighborShuffle(8))


def test_modules_take_a_shuffle():
    k = 1000
    c = make_case(torch.float64, k, True)
    kw = dict(codebook=c["codebook"], latents=c["latents"], tau=0.6, shuffle=c["shuffle"])
    crit = SNCELoss(c["codebook"], tau=0.6, shuffle=c["shuffle"])
    assert torch.equal(crit(c["logits"], c["target"], latents=c["latents"]), snce_loss(c["logits"], c["target"], **kw))
    fused = FusedLinearSNCELoss(c["codebook"], tau=0.6, shuffle=c["shuffle"])
    out = fused(c["hidden"], c["head_weight"], c["target"], latents=c["latents"])
    assert_close(out, snce_loss(c["hidden"] @ c["head_weight"].T, c["target"], **kw), 1e-12, "module")
    assert "shuffle=NeighborShuffle(num_codes=1000, seed=1)" in repr(fused)


# --- entropy of the SNCE targets and the matching label smoothing ---------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("topk", [None, 5])
def test_target_entropy_matches_dense(metric, topk):
    k = 300
    c = make_case(torch.float64, k, True)
    codes = c["target"].clamp(0).view(-1, 1).repeat(1, 3)  # (N, 3): repeated codes, counted once each
    tiny = 2 * 4 * k * 4  # 4 rows per block
    q_codes = dense_targets(codes.flatten(), c["codebook"], tau=0.3, metric=metric, topk=topk)
    got = target_entropy(c["codebook"], codes=codes, tau=0.3, metric=metric, topk=topk, max_block_bytes=tiny)
    assert got == pytest.approx(float(entropy(q_codes).mean()), rel=1e-12)
    latents = c["latents"].view(N, 1, D)  # (..., D)
    q_latents = dense_targets(c["target"], c["codebook"], c["latents"], tau=0.3, metric=metric, topk=topk)
    got = target_entropy(c["codebook"], latents=latents, tau=0.3, metric=metric, topk=topk, max_block_bytes=tiny)
    assert got == pytest.approx(float(entropy(q_latents).mean()), rel=1e-12)


def test_target_entropy_errors():
    codebook = torch.randn(10, 3)
    with pytest.raises(ValueError, match="exactly one"):
        target_entropy(codebook, tau=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        target_entropy(codebook, tau=1.0, codes=torch.arange(3), latents=torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        target_entropy(codebook, tau=1.0, codes=torch.tensor([3, 10]))
    with pytest.raises(TypeError, match="codes"):
        target_entropy(codebook, tau=1.0, codes=torch.zeros(3))
    with pytest.raises(ValueError, match="dimension"):
        target_entropy(codebook, tau=1.0, latents=torch.randn(3, 4))
    with pytest.raises(ValueError, match="tau"):
        target_entropy(codebook, tau=0.0, codes=torch.arange(3))


def smoothed_entropy(eps, k):
    """Entropy of (1 - eps) one-hot + eps / K, from the dense float64 vector."""
    q = torch.full((k,), eps / k, dtype=torch.float64)
    q[0] += 1 - eps
    return float(entropy(q))


def test_smoothing_for_entropy_hand_cases():
    # K = 2: the target is Bernoulli(eps / 2), so H is the binary entropy of eps / 2.
    binary = -0.1 * math.log(0.1) - 0.9 * math.log(0.9)
    assert smoothing_for_entropy(binary, 2) == pytest.approx(0.2, abs=1e-12)
    # K = 4, eps = 0.4: p = 0.7 on the true code, 0.1 on each of the 3 others.
    assert smoothing_for_entropy(-0.7 * math.log(0.7) - 3 * 0.1 * math.log(0.1), 4) == pytest.approx(0.4, abs=1e-12)
    assert smoothing_for_entropy(0.0, 1000) == 0.0
    assert smoothing_for_entropy(math.log(1000), 1000) == 1.0
    assert smoothing_for_entropy(10.0, 1000) == 1.0  # above log K: uniform


@pytest.mark.parametrize("k", [2, 7, 1024, 262144])
def test_smoothing_for_entropy_inverts_the_entropy_and_is_monotone(k):
    entropies = [f * math.log(k) for f in (1e-6, 0.01, 0.2, 0.5, 0.9, 0.999)]
    eps = [smoothing_for_entropy(h, k) for h in entropies]
    for h, e in zip(entropies, eps, strict=True):
        assert 0.0 < e < 1.0
        assert smoothed_entropy(e, k) == pytest.approx(h, abs=1e-9)
    assert eps == sorted(eps) and len(set(eps)) == len(eps)


def test_smoothing_for_entropy_errors():
    for bad in (-0.1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="entropy"):
            smoothing_for_entropy(bad, 10)
    with pytest.raises(ValueError, match="num_codes"):
        smoothing_for_entropy(1.0, 0)


def test_matched_label_smoothing_has_the_snce_entropy():
    """The study's use: the epsilon from the SNCE targets' mean entropy; its label-smoothed CE target has it."""
    k = 500
    codebook = torch.randn(k, 4, dtype=torch.float64)
    codes = torch.randint(0, k, (200,))
    h = target_entropy(codebook, codes=codes, tau=suggest_tau(codebook), metric="l2")
    eps = smoothing_for_entropy(h, k)
    assert 0 < eps < 1 and smoothed_entropy(eps, k) == pytest.approx(h, abs=1e-9)
    # fused_linear_cross_entropy's label smoothing uses the same convention as F.cross_entropy
    logits = torch.randn(6, k, dtype=torch.float64)
    target = torch.randint(0, k, (6,))
    soft = (1 - eps) * F.one_hot(target, k) + eps / k
    torch.testing.assert_close(F.cross_entropy(logits, target, label_smoothing=eps),
                               -(soft * logits.log_softmax(1)).sum(1).mean())


# ----------------------------------------------------------------------------------- draws from the targets


@pytest.mark.parametrize("with_latents", [False, True])
@pytest.mark.parametrize("topk", [None, 3])
@pytest.mark.parametrize("shuffled", [False, True])
def test_sample_neighbors_draws_from_the_target(with_latents, topk, shuffled):
    from snce.losses import sample_neighbors

    g = torch.Generator().manual_seed(0)
    K, n_draws = 7, 40_000
    codebook = torch.randn(K, 3, generator=g, dtype=torch.float64)
    target = torch.tensor([2, 5])
    latents = (
        codebook[target] + 0.3 * torch.randn(2, 3, generator=g, dtype=torch.float64)
        if with_latents
        else None
    )
    shuffle = NeighborShuffle(K, seed=4) if shuffled else None
    # The dense target the loss trains towards, from the readable reference (shuffled there too).
    q = dense_targets(target, codebook, latents, tau=0.7, topk=topk, shuffle=shuffle)  # (2, K)
    rows = target.repeat_interleave(n_draws)
    z_rows = None if latents is None else latents.repeat_interleave(n_draws, dim=0)
    drawn = sample_neighbors(rows, codebook, tau=0.7, latents=z_rows, topk=topk, shuffle=shuffle,
                             generator=torch.Generator().manual_seed(1), block_rows=9_999)  # fmt: skip
    for i in range(2):
        freq = (
            torch.bincount(drawn[i * n_draws : (i + 1) * n_draws], minlength=K).double() / n_draws
        )
        # Within 5 binomial standard deviations of q, and never a code outside the target's support.
        assert ((freq - q[i]).abs() <= 5 * (q[i] * (1 - q[i]) / n_draws).sqrt() + 1e-12).all(), (
            freq,
            q[i],
        )


def test_token_loss_sample_targets_follow_each_kind():
    from snce.generators.objectives import LossConfig, TokenLoss

    K, n = 50, 200_000
    target = torch.full((n,), 7)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(
        TokenLoss(LossConfig(kind="ce")).sample_targets(target, K, generator=g), target
    )
    ls = TokenLoss(LossConfig(kind="label_smoothing", label_smoothing=0.3)).sample_targets(
        target, K, generator=g
    )
    # (1 - eps) + eps / K on the true code, eps / K on each other code.
    assert float((ls == 7).double().mean()) == pytest.approx(0.7 + 0.3 / K, abs=0.005)
    assert set(ls.tolist()) == set(range(K))
    codebook = torch.randn(K, 4, generator=g)
    table_loss = TokenLoss(LossConfig(kind="snce", tau=0.5, topk=4), codebook, "l2")
    drawn = table_loss.sample_targets(target[:20_000], K, generator=g)
    assert set(drawn.tolist()) <= set(table_loss.table.indices[7].tolist())
