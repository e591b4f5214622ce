"""Text and edit conditions in both generator families: the padding mask, condition dropout and the null
condition, guidance scale 1, the editing model's source-only path, KV cache with a padded prefix, persistence."""

import pytest
import torch

from snce.generators import (
    ARConfig,
    AutoregressiveTransformer,
    Conditioning,
    MaskedDiffusionConfig,
    MaskedDiffusionTransformer,
    build_generator,
    load_generator,
    sample,
    sample_autoregressive,
)
from snce.generators.objectives import (
    GeneratorObjective,
    LossConfig,
    TokenLoss,
    generator_loss,
    validation_loss,
)

E, L, K, GRID = 6, 5, 40, (3, 4)
N = GRID[0] * GRID[1]
SMALL = dict(dim=32, n_layers=2, n_heads=2, vocab_size=K, grid=GRID, text_dim=E, max_text_len=L)
FAMILIES = {
    "autoregressive": (AutoregressiveTransformer, ARConfig),
    "masked_diffusion": (MaskedDiffusionTransformer, MaskedDiffusionConfig),
}
CASES = [(f, c) for f in FAMILIES for c in ("text", "edit")]


def _model(family, condition, dtype=torch.float64, **kw):
    cls, cfg_cls = FAMILIES[family]
    model = cls(cfg_cls(**{**SMALL, "condition": condition, **kw})).to(dtype)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # the head starts at zero; give it signal
    return model.eval()


def _condition(condition, B=3, lengths=(5, 2, 0), dtype=torch.float64):
    """Text of L positions with ``lengths`` real tokens per row (right padding), random padding content."""
    text = torch.randn(B, L, E, dtype=dtype)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)
    source = torch.randint(0, K, (B, *GRID)) if condition == "edit" else None
    return Conditioning(text=text, text_mask=mask, source=source)


def _tokens(family, B=3):
    tokens = torch.randint(0, K, (B, N))
    if family == "masked_diffusion":
        tokens[:, ::3] = K  # some [MASK] inputs
    return tokens


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _exact(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("family,condition", CASES)
def test_padded_text_changes_nothing(family, condition):
    model, cond = _model(family, condition), _condition(condition)
    tokens = _tokens(family)
    hidden = model(tokens, cond)
    assert hidden.shape == (3, N, 32)
    noisy = cond.text.clone()
    noisy[~cond.text_mask] = 1e3 * torch.randn(int((~cond.text_mask).sum()), E, dtype=noisy.dtype)
    _exact(
        model(tokens, Conditioning(text=noisy, text_mask=cond.text_mask, source=cond.source)),
        hidden,
    )
    # A shorter text is padded to max_text_len with masked positions: the same prediction.
    short = Conditioning(text=cond.text[:, :3], text_mask=cond.text_mask[:, :3], source=cond.source)
    clipped = Conditioning(
        text=cond.text, text_mask=cond.text_mask & (torch.arange(L) < 3), source=cond.source
    )
    _exact(model(tokens, short), model(tokens, clipped))
    # Real tokens do matter, and only in their own row.
    changed = cond.text.clone()
    changed[1, 0] += 1.0
    other = model(tokens, Conditioning(text=changed, text_mask=cond.text_mask, source=cond.source))
    _exact(other[[0, 2]], hidden[[0, 2]])
    assert (other[1] - hidden[1]).abs().amax() > 1e-6


@pytest.mark.parametrize("family,condition", CASES)
def test_forced_dropout_is_the_null_condition(family, condition):
    """Dropped rows equal the null-condition prediction (text=None: the null text, or the null instruction with
    the same source); kept rows equal the conditional prediction; random dropout at p ~ 1 drops every row."""
    model, cond = _model(family, condition), _condition(condition)
    tokens = _tokens(family)
    null = model(tokens, Conditioning(source=cond.source))  # text=None: the null text / instruction
    conditional = model(tokens, cond)
    assert (null - conditional).abs().amax() > 1e-6
    _exact(model(tokens, cond, drop=torch.ones(3, dtype=torch.bool)), null)
    mixed = model(tokens, cond, drop=torch.tensor([True, False, True]))
    _exact(mixed[[0, 2]], null[[0, 2]])
    _exact(mixed[1], conditional[1])
    nearly_always = _model(family, condition, class_dropout=0.999999).train()
    nearly_always.load_state_dict(model.state_dict())
    _exact(
        nearly_always(tokens, cond),
        nearly_always(tokens, cond, drop=torch.ones(3, dtype=torch.bool)),
    )
    nearly_always.eval()  # no dropout outside training
    _exact(nearly_always(tokens, cond), conditional)


@pytest.mark.parametrize("family,condition", CASES)
def test_cfg_scale_one_equals_conditional(family, condition):
    model, cond = _model(family, condition), _condition(condition)
    conditional = sample(model, cond, generator=_gen(3))
    guided = sample(model, cond, cfg_scale=1.0, generator=_gen(3))
    assert conditional.shape == (3, *GRID)
    _exact(guided, conditional)
    strong = sample(model, condition=cond, cfg_scale=4.0, generator=_gen(3))
    assert not torch.equal(strong, conditional)  # guidance really changes the distribution
    # Scale 0 leaves the null-condition logits: the samples of the null condition itself.
    unguided = sample(model, cond, cfg_scale=0.0, generator=_gen(5))
    null = Conditioning(source=cond.source) if condition == "edit" else Conditioning()
    _exact(unguided, sample(model, null, num_samples=3, generator=_gen(5)))


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_with_dropped_instruction_is_the_source_only_path(family):
    model, cond = _model(family, "edit"), _condition("edit")
    tokens = _tokens(family)
    source_only = model(tokens, Conditioning(source=cond.source))
    _exact(model(tokens, cond, drop=torch.ones(3, dtype=torch.bool)), source_only)
    # The source still conditions the prediction; the instruction is what was dropped.
    other_source = Conditioning(source=(cond.source + 1) % K)
    assert (model(tokens, other_source) - source_only).abs().amax(-1).amax(-1).min() > 1e-6
    # rows 0 and 1 have instruction tokens
    assert (model(tokens, cond)[:2] - source_only[:2]).abs().amax() > 1e-6


@pytest.mark.parametrize("condition", ["text", "edit"])
def test_kv_cache_equals_no_cache_with_a_padded_prefix(condition):
    model, cond = _model("autoregressive", condition), _condition(condition, B=3, lengths=(1, 5, 3))
    tokens = torch.randint(0, K, (3, N))
    prefix = model.embed_condition(cond, 3)
    cache = model.new_cache(3)
    hidden = model(tokens, cond)  # teacher forcing
    for t in range(N):
        cached = model.next_hidden(tokens[:, :t], prefix, cache)
        full = model.next_hidden(tokens[:, :t], prefix)
        torch.testing.assert_close(cached, full)
        torch.testing.assert_close(full, hidden[:, t])
    for opts in (dict(), dict(cfg_scale=3.0, top_k=10, top_p=0.9, temperature=0.8)):
        with_cache = sample_autoregressive(model, cond, generator=_gen(1), **opts)
        without = sample_autoregressive(model, cond, generator=_gen(1), use_cache=False, **opts)
        _exact(with_cache, without)
        assert len(set(with_cache.flatten().tolist())) > 3


@pytest.mark.parametrize("condition", ["text", "edit"])
def test_autoregressive_prefix_model_is_causal(condition):
    model, cond = _model("autoregressive", condition), _condition(condition)
    tokens = torch.randint(0, K, (3, N))
    changed = tokens.clone()
    changed[:, 6] = (tokens[:, 6] + 1) % K
    h0, h1 = model(tokens, cond), model(changed, cond)
    _exact(h0[:, :7], h1[:, :7])  # hidden[:, i] predicts token i from tokens < i
    assert (h0[:, 7:] - h1[:, 7:]).abs().amax(-1).min() > 1e-6


@pytest.mark.parametrize("family,condition", CASES)
def test_save_load_round_trip(family, condition, tmp_path):
    model, cond = (
        _model(family, condition, dtype=torch.float32),
        _condition(condition, dtype=torch.float32),
    )
    tokens = _tokens(family)
    model.save_pretrained(tmp_path / "m")
    loaded = load_generator(tmp_path / "m").eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    assert loaded.config.to_dict()["condition"] == condition
    _exact(loaded(tokens, cond), model(tokens, cond))
    _exact(
        sample(loaded, cond, cfg_scale=2.0, generator=_gen(2)),
        sample(model, cond, cfg_scale=2.0, generator=_gen(2)),
    )


def test_class_models_keep_their_config_and_keys():
    """condition="class" (the default) writes the config.json and checkpoint keys of before."""
    model = build_generator("autoregressive", None, vocab_size=K, grid=GRID, num_classes=3, dim=32,
                            n_layers=1, n_heads=2)  # fmt: skip
    d = model.config.to_dict()
    assert not {"condition", "text_dim", "max_text_len"} & set(d)
    assert ARConfig.from_dict(d) == model.config
    assert "cls_emb.weight" in model.state_dict()
    assert not any(k.startswith(("text_cond", "edit_cond")) for k in model.state_dict())
    text = _model("autoregressive", "text")
    assert "cls_emb.weight" not in text.state_dict() and "text_cond.null" in text.state_dict()


@pytest.mark.parametrize("family,condition", CASES)
def test_training_losses_take_a_conditioning(family, condition):
    """generator_loss, validation_loss and GeneratorObjective (a batch with text, text_mask, source) run and
    give gradients to the condition module, activation checkpointing included."""
    torch.manual_seed(0)
    model = _model(family, condition, dtype=torch.float32, dropout=0.1).train()
    cond = _condition(condition, dtype=torch.float16)  # shards keep embeddings in fp16
    tokens = torch.randint(0, K, (3, N))
    loss = TokenLoss(LossConfig(kind="ce"))
    results = []
    for recompute in (False, True):
        model.zero_grad()
        model.configure_training(activation_checkpointing=recompute)
        torch.manual_seed(5)
        value = generator_loss(model, tokens, cond, loss)
        value.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((value.detach(), grads))
    _exact(results[0][0], results[1][0])
    for n, g in results[0][1].items():
        _exact(g, results[1][1][n])
    module = "text_cond" if condition == "text" else "edit_cond"
    assert results[0][1][f"{module}.proj.weight"].abs().sum() > 0
    batch = {
        "indices": tokens,
        "text": cond.text,
        "text_mask": cond.text_mask,
        "label": torch.zeros(3),
    }
    if condition == "edit":
        batch["source"] = cond.source
    value, _ = GeneratorObjective(loss)(model, batch, 0)
    assert torch.isfinite(value)
    nll = validation_loss(model, tokens, cond, loss, batch_size=2)
    assert nll > 0
    assert model.training  # validation restores the mode


def test_compiled_blocks_take_the_padding_mask():
    model = _model("autoregressive", "text", dtype=torch.float32)
    cond, tokens = _condition("text", dtype=torch.float32), torch.randint(0, K, (3, N))
    eager = model(tokens, cond)
    model.configure_training(compile=True, compile_options={"backend": "aot_eager"})
    torch.testing.assert_close(model(tokens, cond), eager, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_forward_and_cached_sampling():
    model = _model("autoregressive", "edit", dtype=torch.float32)
    cond = _condition("edit", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(torch.randint(0, K, (3, N)), cond)
        tokens = sample(model, cond, cfg_scale=2.0, generator=_gen())
    assert hidden.shape == (3, N, 32) and torch.isfinite(hidden.float()).all()
    assert tokens.shape == (3, *GRID)


def test_bad_conditions_are_named():
    with pytest.raises(ValueError, match="text_dim=4 is for condition 'text'"):
        ARConfig(vocab_size=K, text_dim=4)
    with pytest.raises(ValueError, match="num_classes=3 needs condition 'class'"):
        ARConfig(vocab_size=K, condition="text", text_dim=4, max_text_len=2, num_classes=3)
    with pytest.raises(ValueError, match="text_dim must be an int >= 1"):
        ARConfig(vocab_size=K, condition="edit", max_text_len=2)
    with pytest.raises(ValueError, match="condition must be one of"):
        ARConfig(vocab_size=K, condition="image")
    text, edit = _model("autoregressive", "text"), _model("masked_diffusion", "edit")
    tokens, cond = torch.randint(0, K, (3, N)), _condition("text")
    with pytest.raises(TypeError, match="takes a Conditioning"):
        text(tokens, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="takes no classes"):
        text(tokens, Conditioning(classes=torch.tensor([0, 1, 2])))
    with pytest.raises(ValueError, match=r"condition.text must have shape \(3, <= 5, 6\)"):
        text(tokens, Conditioning(text=torch.randn(3, 7, E, dtype=torch.float64)))
    with pytest.raises(ValueError, match="condition.text_mask must be a bool tensor"):
        text(tokens, Conditioning(text=cond.text, text_mask=torch.ones(3, 2, dtype=torch.bool)))
    with pytest.raises(ValueError, match="holds 3 rows, expected 2"):
        text(tokens[:2], cond)
    with pytest.raises(ValueError, match="for editing models"):
        text(tokens, Conditioning(source=torch.zeros(3, N, dtype=torch.long)))
    with pytest.raises(ValueError, match="needs the source image's tokens"):
        edit(tokens, cond)
    with pytest.raises(ValueError, match="takes a Conditioning, not classes"):
        sample(text, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_samples"):
        sample(text, Conditioning())
    with pytest.raises(ValueError, match="needs keys"):
        Conditioning.from_batch({"indices": tokens, "text": cond.text}, "edit")
