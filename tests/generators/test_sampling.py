"""Samplers: exact token draws (chi-square against softmax, rare mass at K = 262,144, log p, seeds, edge cases),
filtering oracles, KV cache == recompute, CFG scale 1 == conditional, MaskGIT reveal schedule, logits memory."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2
from torch.utils._python_dispatch import TorchDispatchMode

from snce.generators import (
    ARConfig,
    AutoregressiveTransformer,
    MaskedDiffusionConfig,
    MaskedDiffusionTransformer,
    sample,
    sample_autoregressive,
    sample_masked,
    sampling,
)
from snce.generators.sampling import filter_logits, guide, sample_logits

SMALL = dict(dim=32, n_layers=2, n_heads=2, vocab_size=40, grid=(4, 4), num_classes=3)


def _model(cls, cfg_cls, **kw):
    model = cls(
        cfg_cls(**{**SMALL, **kw})
    ).double()  # float64: sampled tokens cannot flip on rounding
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_filter_logits_matches_brute_force():
    logits = torch.randn(6, 30, dtype=torch.float64)
    for top_k, top_p in [(5, 1.0), (0, 0.7), (10, 0.5), (0, 0.01), (30, 1.0)]:
        out = filter_logits(logits, top_k, top_p)
        for row, got in zip(logits, out, strict=True):
            values = row.tolist()
            kept = sorted(range(30), key=lambda i: -values[i])
            if top_k:
                kept = kept[:top_k]
            if top_p < 1:
                p = torch.softmax(
                    row[kept], 0
                )  # nucleus after top-k: smallest prefix with mass >= top_p
                n = next(i + 1 for i in range(len(kept)) if p[: i + 1].sum() >= top_p)
                kept = kept[:n]
            expected = torch.full_like(row, -math.inf)
            expected[kept] = row[kept]
            torch.testing.assert_close(got, expected)


def test_sample_logits_follows_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    tokens, logp = sample_logits(logits.expand(40000, 4), temperature=2.0, generator=_gen())
    freq = torch.bincount(tokens, minlength=4).double() / 40000
    expected = torch.softmax(logits[0].double() / 2.0, 0)
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)
    torch.testing.assert_close(logp, expected.log().float()[tokens])


def _target(row: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0) -> torch.Tensor:
    """float64 probabilities of the tempered, filtered distribution of one row (K,)."""
    kept = torch.isfinite(filter_logits(row[None] / temperature, top_k, top_p))[0]
    return torch.softmax((row.double() / temperature).masked_fill(~kept, -math.inf), 0)


def _chi2_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of draws against probs; cells expecting < 5 draws are pooled into one."""
    n = tokens.numel()
    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs * n
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum().item()
    return float(chi2.sf(stat, obs.numel() - 1))


SETTINGS = [
    dict(),
    dict(temperature=0.5),
    dict(temperature=2.0, top_k=5),
    dict(top_p=0.8),
    dict(temperature=0.7, top_k=40, top_p=0.9),
]


@pytest.mark.parametrize("K", [3, 64, 1000, 16384])  # 1000: not a multiple of the CDF segment
@pytest.mark.parametrize("opts", SETTINGS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_sample_logits_chi_square_against_softmax(K, opts):
    """Draws follow softmax(filter_logits(x / T)): chi-square p > 1e-4, filtered tokens never drawn, log p =
    log_softmax at the drawn token (1e-5), and the logits are left untouched."""
    g = _gen(K)
    row = torch.randn(K, generator=g) * 2.0
    row[K // 2] = row.max() + 1.0  # the mode in the middle of the row, not at 0
    n = 20000 if K <= 1000 else 3000
    logits = row.expand(n, K)
    before = logits.clone()
    tokens, logp = sample_logits(logits, generator=g, **opts)
    assert torch.equal(logits, before)
    probs = _target(row, **opts)
    assert tokens.dtype == torch.long and logp.dtype == torch.float32 and tokens.shape == (n,)
    assert (probs[tokens] > 0).all()  # filtered tokens are never drawn
    torch.testing.assert_close(logp, probs.log().float()[tokens], atol=1e-5, rtol=0)
    assert _chi2_pvalue(tokens, probs) > 1e-4
    if K > 1000:
        # Most cells are pooled: also test the mass of 64 index ranges (2 CDF segments each).
        ranges = torch.arange(K) // (K // 64)
        grouped = torch.zeros(64, dtype=torch.float64).index_add_(0, ranges, probs)
        assert _chi2_pvalue(ranges[tokens], grouped) > 1e-4


def test_rare_mass_at_262144_codes():
    """K = 262,144: four large logits first, then 262,140 codes of p ~ 1.1e-7 each (1.3 % of the mass together).

    A float32 running sum in index order stops growing once it reaches the large mass (each tiny p is below
    half an ulp of ~2.2), so a flat float32 CDF would never draw them; the two-level CDF draws them at their
    rate: within 4 binomial standard errors over 4,000 seeded draws, and within one draw of their share of
    2,000 evenly spaced uniforms (the inverse CDF evaluated at fixed quantiles).
    """
    K = 262144
    row = torch.full((K,), -16.0)
    row[:4] = torch.tensor([0.0, -0.5, -1.0, -1.5])
    probs = torch.softmax(row.double(), 0)
    rare = probs[4:].sum().item()
    assert 0.01 < rare < 0.02
    p32 = torch.exp(row - row.max()).numpy()
    cdf32 = np.cumsum(p32, dtype=np.float32)  # sequential float32 accumulation (numpy)
    assert (cdf32[-1] - cdf32[3]) / cdf32[-1] < 0.2 * rare  # the failure this test is for

    n = 4000
    tokens, logp = sample_logits(row.expand(n, K), generator=_gen(7))
    count = (tokens >= 4).sum().item()
    assert abs(count - n * rare) < 4 * math.sqrt(n * rare * (1 - rare)), (count, n * rare)
    torch.testing.assert_close(logp, probs.log().float()[tokens], atol=1e-5, rtol=0)

    m = 2000
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    tokens, logp = torch.empty(m, dtype=torch.long), torch.empty(m)
    draw = sampling._Drawer(4, K, "cpu", temperature=1.0, top_k=0, top_p=1.0)
    for s in range(0, m, 4):
        draw(row.expand(4, K), u[s : s + 4], tokens[s : s + 4], logp[s : s + 4])
    counts = torch.bincount(torch.where(tokens < 4, tokens, 4), minlength=5).double()
    expected = torch.cat([probs[:4], probs[4:].sum()[None]]) * m
    assert ((counts - expected).abs() <= 1.0).all(), (counts, expected)


def test_sample_logits_seeded_and_independent_of_block_size(monkeypatch):
    logits = torch.randn(3, 5, 700)
    opts = dict(temperature=0.9, top_k=50, top_p=0.95)
    tokens, logp = sample_logits(logits, generator=_gen(11), **opts)
    assert tokens.shape == logp.shape == (3, 5)
    again = sample_logits(logits, generator=_gen(11), **opts)
    assert torch.equal(tokens, again[0]) and torch.equal(logp, again[1])
    assert not torch.equal(tokens, sample_logits(logits, generator=_gen(12), **opts)[0])
    monkeypatch.setattr(sampling, "_MIN_ROWS", 2)
    monkeypatch.setattr(sampling, "_CPU_BLOCK", 700 * 2)  # 2 rows per block instead of all 15
    small = sample_logits(logits, generator=_gen(11), **opts)
    assert torch.equal(tokens, small[0]) and torch.equal(logp, small[1])


def test_sample_logits_edge_cases():
    tokens, logp = sample_logits(torch.zeros(4, 1), generator=_gen())  # one token
    assert tokens.tolist() == [0] * 4 and logp.tolist() == [0.0] * 4
    row = torch.full((5000,), -math.inf)
    row[4321] = -3.0  # all -inf except one, float64 input
    tokens, logp = sample_logits(row.double().expand(50, -1), temperature=0.3, generator=_gen())
    assert (tokens == 4321).all() and (logp == 0).all()
    ties = torch.full((40000, 6), 2.5)  # all equal: uniform
    tokens, logp = sample_logits(ties, generator=_gen())
    assert _chi2_pvalue(tokens, torch.full((6,), 1 / 6, dtype=torch.float64)) > 1e-4
    torch.testing.assert_close(logp, torch.full_like(logp, -math.log(6)))
    # Top-k keeps every logit tied with the k-th; top-p every logit tied with its least likely kept one.
    row = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0, -2.0])
    assert torch.isfinite(filter_logits(row, top_k=2)).tolist() == [True] * 4 + [False] * 2
    probs = torch.softmax(row.double(), 0)
    top_p = (probs[0] + 0.5 * probs[1]).item()  # the cut falls inside the tie
    assert torch.isfinite(filter_logits(row, top_p=top_p)).tolist() == [True] * 4 + [False] * 2
    tokens, _ = sample_logits(row.expand(20000, 6), top_k=2, generator=_gen())
    assert set(tokens.tolist()) == {0, 1, 2, 3}
    for bad in (-math.inf, math.inf, math.nan):
        with pytest.raises(ValueError, match="at least one finite entry"):
            sample_logits(torch.tensor([[0.0, 1.0], [bad, bad]]))


def test_nucleus_of_flat_and_peaked_rows_matches_a_float64_sort():
    """The top-p cut grows its top-k candidates (64, 512, ...) or sorts: the kept set equals a float64 sort's."""
    g = _gen(3)
    logits = torch.cat([torch.randn(6, 5000, generator=g) * s for s in (0.05, 1.0, 4.0)])
    for top_p in (0.3, 0.9, 0.99):
        got = torch.isfinite(filter_logits(logits, top_p=top_p))
        sorted_logits, order = logits.double().sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        keep_sorted = probs.cumsum(-1) - probs < top_p
        expected = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        assert torch.equal(got, expected), top_p


def test_guide_formula():
    cond, uncond = torch.randn(3, 7), torch.randn(3, 7)
    torch.testing.assert_close(
        guide(torch.cat([cond, uncond]), 2.5), uncond + 2.5 * (cond - uncond)
    )
    torch.testing.assert_close(guide(cond, None), cond)


@pytest.mark.parametrize(
    "opts", [dict(), dict(cfg_scale=3.0, top_k=10, top_p=0.9, temperature=0.8)]
)
def test_autoregressive_kv_cache_equals_recompute(opts):
    model = _model(AutoregressiveTransformer, ARConfig)
    classes = torch.tensor([0, 2, 1])
    with_cache = sample_autoregressive(model, classes, generator=_gen(1), **opts)
    without = sample_autoregressive(model, classes, generator=_gen(1), use_cache=False, **opts)
    assert with_cache.shape == (3, 4, 4)
    assert torch.equal(with_cache, without)
    assert len(set(with_cache.flatten().tolist())) > 3  # really random, not one repeated token


@pytest.mark.parametrize("family", ["autoregressive", "masked_diffusion"])
def test_cfg_scale_one_equals_conditional(family):
    model = (
        _model(AutoregressiveTransformer, ARConfig)
        if family == "autoregressive"
        else _model(MaskedDiffusionTransformer, MaskedDiffusionConfig)
    )
    classes = torch.tensor([2, 0, 1, 1])
    cond = sample(model, classes, generator=_gen(3))
    guided = sample(model, classes, cfg_scale=1.0, generator=_gen(3))
    assert torch.equal(cond, guided)
    strong = sample(model, classes, cfg_scale=4.0, generator=_gen(3))
    assert not torch.equal(cond, strong)  # guidance really changes the distribution


def test_cfg_scale_zero_equals_unconditional_branch():
    """s = 0 leaves the null-class logits: the same samples as a model whose class embeddings are all null."""
    model = _model(AutoregressiveTransformer, ARConfig)
    classes = torch.tensor([0, 1, 2])
    guided = sample_autoregressive(model, classes, cfg_scale=0.0, generator=_gen(4))
    with torch.no_grad():
        model.cls_emb.weight[:3] = model.cls_emb.weight[3]
    assert torch.equal(guided, sample_autoregressive(model, classes, generator=_gen(4)))


@pytest.mark.parametrize("schedule", ["cosine", "arccos", "linear"])
@pytest.mark.parametrize("steps", [1, 5, 16])
def test_masked_sampler_reveals_everything_in_exactly_t_steps(schedule, steps):
    model = _model(MaskedDiffusionTransformer, MaskedDiffusionConfig)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))  # counts model(...) calls, if any
    hook = model.norm.register_forward_hook(
        lambda *a: calls.append(1)
    )  # one final norm per forward pass
    classes = torch.tensor([0, 1, 2])
    out, history = sample_masked(
        model,
        classes,
        steps=steps,
        schedule=schedule,
        cfg_scale=2.0,
        generator=_gen(5),
        return_history=True,
    )
    hook.remove()
    assert len(history) == steps and len(calls) == steps
    N, mask = 16, model.mask_id
    masked = [
        int((h == mask).sum(dim=(1, 2)).unique().item()) for h in history
    ]  # same count in every row
    gamma = {
        "cosine": lambda r: math.cos(math.pi / 2 * r),
        "arccos": lambda r: math.acos(r) / (math.pi / 2),
        "linear": lambda r: 1 - r,
    }[schedule]
    left = N
    for t, m in enumerate(masked):
        expected = (
            0
            if t == steps - 1
            else max(steps - 1 - t, min(left - 1, math.floor(N * gamma((t + 1) / steps))))
        )
        assert m == expected and m < left  # at least one token revealed per step
        left = m
    assert torch.equal(history[-1], out) and (out != mask).all() and (out < 40).all()
    for before, after in zip(history, history[1:], strict=False):
        revealed = before != mask
        assert torch.equal(after[revealed], before[revealed])  # revealed tokens never change


def test_sampler_errors():
    ar = _model(AutoregressiveTransformer, ARConfig)
    with pytest.raises(ValueError, match="class ids must lie in"):
        sample(ar, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="temperature"):
        sample(ar, torch.tensor([0]), temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        sample(ar, torch.tensor([0]), top_p=0.0)
    uncond = _model(AutoregressiveTransformer, ARConfig, num_classes=0)
    with pytest.raises(ValueError, match="cfg_scale needs a class-conditional model"):
        sample(uncond, num_samples=2, cfg_scale=2.0)
    assert sample(uncond, num_samples=2, generator=_gen()).shape == (2, 4, 4)
    md = _model(MaskedDiffusionTransformer, MaskedDiffusionConfig)
    with pytest.raises(ValueError, match="steps"):
        sample(md, torch.tensor([0]), steps=17)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if torch.is_tensor(t):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("family", ["autoregressive", "masked_diffusion"])
def test_samplers_never_hold_token_by_codebook_logits(family, monkeypatch):
    """K = 65,536, 16 images with CFG, head blocks of 2^18 logits: the largest tensor any op returns is the head
    weight (K x 8), not the 16 x K (AR step) or 256 x K (first masked step) logits of one branch."""
    K, B = 65536, 16
    monkeypatch.setattr(sampling, "_MIN_ROWS", 4)  # blocks of 2^18 logits: 4 rows of K
    cls_, cfg_cls = (
        (AutoregressiveTransformer, ARConfig)
        if family == "autoregressive"
        else (MaskedDiffusionTransformer, MaskedDiffusionConfig)
    )
    model = cls_(cfg_cls(**{**SMALL, "vocab_size": K, "dim": 8, "n_layers": 1}))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    with _LargestTensor() as probe:
        out = sample(model, torch.arange(B) % 3, cfg_scale=2.0, generator=_gen())
    assert out.shape == (B, 4, 4) and out.max() < K
    # The head weight (K x 8) and the two branches' logits buffers (2 x 4 x K).
    assert probe.numel == K * 8, probe.numel
