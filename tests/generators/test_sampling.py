"""Samplers: KV cache == recompute, CFG scale 1 == conditional, MaskGIT reveal schedule, filtering oracles."""

import math

import pytest
import torch

from snce.generators import (
    ARConfig,
    AutoregressiveTransformer,
    MaskedDiffusionConfig,
    MaskedDiffusionTransformer,
    sample,
    sample_autoregressive,
    sample_masked,
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
