"""Generator architecture: config round-trips, RoPE against a complex-number oracle, causality, persistence."""

import math

import pytest
import torch
import torch.nn.functional as F

from snce.generators import (
    ARConfig,
    AutoregressiveTransformer,
    MaskedDiffusionConfig,
    MaskedDiffusionTransformer,
    build_generator,
    load_generator,
)
from snce.generators.transformer import RMSNorm, apply_rope, rope_2d

SMALL = dict(dim=32, n_layers=2, n_heads=2, vocab_size=50, grid=(3, 4), num_classes=5)


def _randomise_head(model):
    torch.nn.init.normal_(
        model.head.weight, std=0.3
    )  # the head starts at zero (LlamaGen); give it signal
    return model


@pytest.mark.parametrize("cls", [ARConfig, MaskedDiffusionConfig])
def test_config_round_trip_and_errors(cls):
    cfg = cls.preset("tiny", vocab_size=1000, grid=(8, 8), num_classes=10)
    assert cls.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["family"] == cls.family
    with pytest.raises(ValueError, match="unknown"):
        cls.from_dict({**cfg.to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="preset"):
        cls.preset("huge", vocab_size=10)
    with pytest.raises(ValueError, match="dim / n_heads"):
        cls(vocab_size=10, dim=30, n_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        cls(vocab_size=0)
    other = ARConfig if cls is MaskedDiffusionConfig else MaskedDiffusionConfig
    with pytest.raises(ValueError, match="generator"):
        other.from_dict(cfg.to_dict())


def test_llamagen_sizes():
    """B and L presets at 16,384 codes and 256 tokens have LlamaGen's parameter counts (111M, 343M)."""
    for name, expected in (("B", 111e6), ("L", 343e6)):
        cfg = ARConfig.preset(name, vocab_size=16384, grid=(16, 16), num_classes=1000)
        d, h = cfg.dim, cfg.ffn_width
        per_layer = 4 * d * d + 3 * d * h + 2 * d
        total = cfg.n_layers * per_layer + (16384 + 1001) * d + 16384 * d + d
        assert abs(total - expected) / expected < 0.02, (name, total)


def test_rmsnorm_formula():
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    norm = RMSNorm(16).double()
    torch.nn.init.normal_(norm.weight)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rope_matches_complex_rotation_and_is_relative():
    grid, hd = (3, 5), 8
    cos, sin = rope_2d(grid, hd, n_prefix=1)
    x = torch.randn(2, 1, 1 + 15, hd)
    # Oracle: LlamaGen's complex form, pairs as complex numbers times e^{i angle};
    # angle = row * f_j for the first hd/4 pairs, col * f_j for the rest, f_j = base^(-4j / hd).
    f = 10000.0 ** (-torch.arange(hd // 4, dtype=torch.float64) * 4 / hd)
    pos = torch.tensor([(r, c) for r in range(3) for c in range(5)], dtype=torch.float64)
    angles = torch.cat(
        [
            torch.zeros(1, hd // 2, dtype=torch.float64),
            torch.cat([pos[:, :1] * f, pos[:, 1:] * f], dim=1),
        ]
    )
    xc = torch.view_as_complex(x.double().reshape(2, 1, 16, hd // 2, 2).contiguous())
    expected = torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin).double(), expected, atol=1e-5, rtol=1e-5)
    # The class prefix is not rotated; q.k depends on grid offsets only.
    q, k = torch.randn(hd), torch.randn(hd)

    def score(pq, pk):
        rq = apply_rope(q.expand(1, 1, 16, hd), cos, sin)[0, 0, 1 + pq[0] * 5 + pq[1]]
        rk = apply_rope(k.expand(1, 1, 16, hd), cos, sin)[0, 0, 1 + pk[0] * 5 + pk[1]]
        return float(rq @ rk)

    assert score((0, 0), (1, 2)) == pytest.approx(score((1, 1), (2, 3)), rel=1e-4, abs=1e-5)
    torch.testing.assert_close(apply_rope(x, cos, sin)[:, :, 0], x[:, :, 0])


def test_zero_head_gives_uniform_prediction():
    """LlamaGen zero-initialises the head: the first loss is log K."""
    model = AutoregressiveTransformer(ARConfig(**SMALL))
    with torch.no_grad():
        hidden = model(torch.randint(0, 50, (2, 3, 4)), torch.tensor([0, 4]))
        ce = F.cross_entropy(model.logits(hidden).reshape(-1, 50), torch.randint(0, 50, (24,)))
    assert hidden.shape == (2, 12, 32)
    assert float(ce) == pytest.approx(math.log(50), rel=1e-6)


def test_autoregressive_is_causal_and_masked_is_bidirectional():
    ar = _randomise_head(AutoregressiveTransformer(ARConfig(**SMALL))).eval()
    md = _randomise_head(MaskedDiffusionTransformer(MaskedDiffusionConfig(**SMALL))).eval()
    tokens = torch.randint(0, 50, (1, 12))
    changed = tokens.clone()
    changed[0, 6] = (tokens[0, 6] + 1) % 50
    c = torch.tensor([2])
    h0, h1 = ar(tokens, c), ar(changed, c)
    # hidden[:, i] predicts token i from tokens < i: positions 0..6 cannot see token 6
    torch.testing.assert_close(h0[:, :7], h1[:, :7])
    assert (h0[:, 7:] - h1[:, 7:]).abs().amax(-1).min() > 1e-6
    g0, g1 = md(tokens, c), md(changed, c)
    assert (g0 - g1).abs().amax(-1).min() > 1e-6  # every position sees every token


def test_kv_cache_hidden_equals_full_recompute():
    model = AutoregressiveTransformer(ARConfig(**SMALL)).double().eval()
    tokens = torch.randint(0, 50, (3, 12))
    classes = torch.tensor([0, 1, 5])  # 5 = the null class
    cache = model.new_cache(3)
    for t in range(12):
        cached = model.next_hidden(tokens[:, :t], classes, cache)
        full = model.next_hidden(tokens[:, :t], classes)
        torch.testing.assert_close(cached, full)


def test_teacher_forcing_matches_incremental_states():
    model = AutoregressiveTransformer(ARConfig(**SMALL)).double().eval()
    tokens, classes = torch.randint(0, 50, (2, 12)), torch.tensor([3, 1])
    hidden = model(tokens, classes)
    for t in range(12):
        torch.testing.assert_close(hidden[:, t], model.next_hidden(tokens[:, :t], classes))


def test_class_dropout_uses_null_class():
    model = AutoregressiveTransformer(ARConfig(**{**SMALL, "class_dropout": 0.999999}))
    tokens = torch.randint(0, 50, (2, 12))
    dropped = model.train()(tokens, torch.tensor([1, 2]))
    null = model.run(
        torch.cat([model.cls_emb(torch.tensor([5, 5]))[:, None], model.tok_emb(tokens[:, :-1])], 1)
    )
    torch.testing.assert_close(dropped, null)


def test_bad_inputs_are_named():
    model = AutoregressiveTransformer(ARConfig(**SMALL))
    tokens = torch.randint(0, 50, (2, 12))
    with pytest.raises(ValueError, match="class ids must lie in"):
        model(tokens, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="classes must be given"):
        model(tokens, None)
    with pytest.raises(ValueError, match="tokens must lie in"):
        model(tokens + 50, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        model(tokens.float(), torch.tensor([0, 1]))
    uncond = AutoregressiveTransformer(ARConfig(**{**SMALL, "num_classes": 0}))
    with pytest.raises(ValueError, match="unconditional"):
        uncond(tokens, torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="ARConfig"):
        AutoregressiveTransformer(MaskedDiffusionConfig(**SMALL))


@pytest.mark.parametrize("family", ["autoregressive", "masked_diffusion"])
def test_save_and_load_round_trip(tmp_path, family):
    model = _randomise_head(build_generator(family, **SMALL)).eval()
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(FileExistsError):
        model.save_pretrained(tmp_path / "m")
    loaded = load_generator(tmp_path / "m").eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    tokens, classes = torch.randint(0, 50, (2, 12)), torch.tensor([0, 3])
    torch.testing.assert_close(loaded(tokens, classes), model(tokens, classes), rtol=0, atol=0)
