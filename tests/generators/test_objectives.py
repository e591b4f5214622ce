"""The loss switch against dense hand-written losses, the masked corruption, and overfitting to the loss floor."""

import pytest
import torch
import torch.nn.functional as F

from snce.config import ConfigError
from snce.functional import suggest_tau
from snce.generators import build_generator
from snce.generators.masked_diffusion import mask_ratio, mdlm_weight
from snce.generators.objectives import (
    LossConfig,
    TokenLoss,
    generator_loss,
    loss_terms,
    validation_loss,
)
from snce.losses import NeighborShuffle
from snce.losses.reference import fused_linear_snce_loss_reference


def _q(z, codebook, tau):
    """Dense SNCE target under squared L2: softmax(-||z - e_k||^2 / tau)."""
    d = ((z[:, None, :] - codebook[None]) ** 2).sum(-1)
    return torch.softmax(-d / tau, dim=1)


def _soft_ce(logits, q):
    return -(q * logits.log_softmax(dim=1)).sum(1).mean()


@pytest.fixture
def problem():
    n, h, k, d = 37, 12, 29, 5
    return dict(
        hidden=torch.randn(n, h, dtype=torch.float64),
        weight=torch.randn(k, h, dtype=torch.float64),
        target=torch.randint(0, k, (n,)),
        codebook=torch.randn(k, d, dtype=torch.float64),
        latents=torch.randn(n, d, dtype=torch.float64),
    )


def test_ce_and_label_smoothing_match_dense(problem):
    hidden, w, y = problem["hidden"], problem["weight"], problem["target"]
    logits = hidden @ w.T
    ce = TokenLoss(LossConfig(kind="ce"))(hidden, w, y)
    torch.testing.assert_close(ce, F.cross_entropy(logits, y))
    ls = TokenLoss(LossConfig(kind="label_smoothing", label_smoothing=0.2))(hidden, w, y)
    torch.testing.assert_close(ls, F.cross_entropy(logits, y, label_smoothing=0.2))


def test_snce_modes_match_dense(problem):
    hidden, w, y, cb, z = (
        problem[k] for k in ("hidden", "weight", "target", "codebook", "latents")
    )
    logits = hidden @ w.T
    codes = TokenLoss(LossConfig(kind="snce", tau=0.7), cb, "l2")
    torch.testing.assert_close(codes(hidden, w, y), _soft_ce(logits, _q(cb[y], cb, 0.7)))
    lat = TokenLoss(LossConfig(kind="snce", tau=0.7, targets="latents"), cb, "l2", has_latents=True)
    torch.testing.assert_close(lat(hidden, w, y, latents=z), _soft_ce(logits, _q(z, cb, 0.7)))
    # code mode with topk: NeighborTable of the 4 nearest codes, renormalised
    table = TokenLoss(LossConfig(kind="snce", tau=0.7, topk=4), cb, "l2")
    assert table.table is not None and table.table.k == 4
    q = _q(cb[y], cb, 0.7)
    keep = q >= q.topk(4, dim=1).values[:, -1:]
    q_top = torch.where(keep, q, torch.zeros_like(q))
    torch.testing.assert_close(
        table(hidden, w, y), _soft_ce(logits, q_top / q_top.sum(1, keepdim=True))
    )
    # weights follow the "mean" convention: sum(weight * loss) / tokens
    tw = torch.rand(y.shape[0], dtype=torch.float64)
    per_token = -(_q(cb[y], cb, 0.7) * logits.log_softmax(1)).sum(1)
    torch.testing.assert_close(codes(hidden, w, y, weight=tw), (tw * per_token).mean())


def test_tau_is_suggested_then_scaled(problem):
    cb = problem["codebook"].float()
    loss = TokenLoss(LossConfig(kind="snce", tau_scale=2.0), cb, "cosine")
    assert loss.tau == pytest.approx(2.0 * suggest_tau(cb, "cosine"))
    assert loss.describe() == {
        "kind": "snce",
        "tau": loss.tau,
        "metric": "cosine",
        "topk": None,
        "targets": "codes",
    }


def test_shuffled_neighbors_match_the_reference(problem):
    hidden, w, y, cb, z = (
        problem[k] for k in ("hidden", "weight", "target", "codebook", "latents")
    )
    shuffle = NeighborShuffle(cb.shape[0], seed=4)
    for extra, latents in [
        (dict(), None),
        (dict(topk=4), None),  # the NeighborTable path
        (dict(targets="latents"), z),
    ]:
        config = LossConfig(kind="snce", tau=0.7, shuffle_neighbors=True, shuffle_seed=4, **extra)
        loss = TokenLoss(config, cb, "l2", has_latents=latents is not None)
        ref = fused_linear_snce_loss_reference(
            hidden, w, y, codebook=cb, latents=latents, tau=0.7, topk=extra.get("topk"), shuffle=shuffle
        )
        torch.testing.assert_close(loss(hidden, w, y, latents=latents), ref, rtol=1e-10, atol=0)
        plain = TokenLoss(LossConfig(kind="snce", tau=0.7, **extra), cb, "l2", has_latents=True)
        assert not torch.allclose(plain(hidden, w, y, latents=latents), ref)
    assert loss.describe()["shuffle_neighbors"] is True and loss.describe()["shuffle_seed"] == 4
    assert "shuffle_neighbors" not in plain.describe()
    assert loss.to("cpu").shuffle.labels.device.type == "cpu"


def test_loss_errors(problem):
    cb = problem["codebook"]
    with pytest.raises(ValueError, match="codebook"):
        TokenLoss(LossConfig(kind="snce"))
    with pytest.raises(ValueError, match="hold latents"):
        TokenLoss(LossConfig(kind="snce", targets="latents", tau=1.0), cb, "l2", has_latents=False)
    with pytest.raises(ConfigError, match="tau"):
        LossConfig.from_dict({"kind": "snce", "tau": -1.0})
    with pytest.raises(ConfigError, match="kind"):
        LossConfig.from_dict({"kind": "focal"})
    for kind in ("ce", "label_smoothing"):
        with pytest.raises(ConfigError, match="shuffle_neighbors"):
            LossConfig.from_dict({"kind": kind, "shuffle_neighbors": True})
    with pytest.raises(ConfigError, match="shuffle_seed"):
        LossConfig.from_dict({"kind": "snce", "shuffle_neighbors": True, "shuffle_seed": "x"})
    loss = TokenLoss(LossConfig(kind="snce", tau=1.0), cb, "l2")
    with pytest.raises(ValueError, match="codebook has 29"):
        loss(problem["hidden"], problem["weight"][:20], problem["target"] % 20)


@pytest.mark.parametrize("schedule", ["cosine", "arccos", "linear"])
def test_mdlm_weight_is_minus_log_derivative_of_schedule(schedule):
    r = torch.linspace(0.05, 0.9, 9, dtype=torch.float64)
    eps = 1e-6
    numeric = (
        -(mask_ratio(r + eps, schedule) - mask_ratio(r - eps, schedule))
        / (2 * eps)
        / mask_ratio(r, schedule)
    )
    torch.testing.assert_close(mdlm_weight(r, schedule), numeric, rtol=1e-5, atol=0)
    assert mask_ratio(torch.tensor(0.0, dtype=torch.float64), schedule) == 1.0
    assert float(mask_ratio(torch.tensor(1.0, dtype=torch.float64), schedule)) == pytest.approx(
        0.0, abs=1e-12
    )


def test_masked_corruption_counts_and_loss_positions():
    model = build_generator(
        "masked_diffusion",
        vocab_size=20,
        grid=(4, 5),
        num_classes=0,
        dim=16,
        n_layers=1,
        n_heads=1,
        schedule="linear",
        weighting="mdlm",
    )
    tokens = torch.randint(0, 20, (64, 20))
    inputs, masked, weight = model.corrupt(tokens)
    n = masked.sum(1)
    # linear schedule: gamma(r) = 1 - r and weight = 1 / (1 - r), so n = ceil(20 / weight)
    torch.testing.assert_close(n.float(), torch.ceil(20 / weight).clamp(1, 20))
    assert torch.equal(inputs[masked], torch.full_like(inputs[masked], 20))
    assert torch.equal(inputs[~masked], tokens[~masked])
    assert len(set(n.tolist())) > 5  # the ratio really varies
    hidden, head, target, z, w = loss_terms(model, tokens, None)
    assert hidden.shape[0] == target.shape[0] == w.shape[0] and head is model.head.weight
    assert target.shape[0] < tokens.numel()


def _overfit(family, kind, steps, lr):
    """Train on 4 token grids (one per class); return the final model's dense per-token loss, its floor (the
    entropy of q) and ``validation_loss``."""
    torch.manual_seed(0)
    k = 24
    codebook = torch.randn(k, 4)
    tokens, classes = torch.randint(0, k, (4, 2, 4)), torch.arange(4)
    model = build_generator(
        family,
        vocab_size=k,
        grid=(2, 4),
        num_classes=4,
        class_dropout=0.0,
        dim=48,
        n_layers=2,
        n_heads=2,
    )
    loss = TokenLoss(LossConfig(kind=kind, tau=1.5), codebook, "l2")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        generator_loss(model, tokens, classes, loss).backward()
        opt.step()
    model.eval()
    flat = tokens.reshape(4, -1)
    with torch.no_grad():  # hardest case for masked diffusion: every token masked
        inputs = flat if family == "autoregressive" else torch.full_like(flat, k)
        logits = model.logits(model(inputs, classes)).reshape(-1, k).double()
    y = flat.reshape(-1)
    q = (
        F.one_hot(y, k).double()
        if kind == "ce"
        else _q(codebook.double()[y], codebook.double(), 1.5)
    )
    floor = float(-(q * q.clamp_min(1e-300).log()).sum(1).mean())  # entropy of q (0 for one-hot)
    return float(_soft_ce(logits, q)), floor, validation_loss(model, tokens, classes, loss)


@pytest.mark.parametrize(
    "family,steps,lr", [("autoregressive", 120, 1e-2), ("masked_diffusion", 220, 4e-3)]
)
@pytest.mark.parametrize("kind", ["ce", "snce"])
def test_overfitting_reaches_the_loss_floor(family, kind, steps, lr):
    dense, floor, val = _overfit(family, kind, steps, lr)
    assert floor > (0.5 if kind == "snce" else -1)  # the SNCE floor is a real entropy, not ~0
    assert dense - floor < 0.03, (dense, floor)
    if (
        family == "autoregressive"
    ):  # validation_loss covers the same tokens: the same mean, via the fused path
        assert val == pytest.approx(dense, abs=1e-4)
