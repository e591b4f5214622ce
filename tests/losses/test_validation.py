"""Bad input is rejected with ValueError/TypeError naming the argument, before any work."""

import pytest
import torch

from snce import NeighborTable, SNCELoss
from snce.functional import fused_linear_snce_loss, neighbor_distribution, snce_loss

N, K, D, H = 6, 10, 3, 4


@pytest.fixture
def case():
    return dict(
        logits=torch.randn(N, K),
        target=torch.randint(0, K, (N,)),
        codebook=torch.randn(K, D),
        latents=torch.randn(N, D),
    )


def call(case, **over):
    kw = dict(codebook=case["codebook"], latents=case["latents"], tau=0.5)
    kw.update(over)
    logits = kw.pop("logits", case["logits"])
    target = kw.pop("target", case["target"])
    return snce_loss(logits, target, **kw)


@pytest.mark.parametrize(
    "over, exc, words",
    [
        (dict(tau=0.0), ValueError, "tau"),
        (dict(tau=-1.0), ValueError, "tau"),
        (dict(tau=float("nan")), ValueError, "tau"),
        (dict(tau=None), ValueError, "tau"),
        (dict(metric="euclid"), ValueError, "metric"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(topk=0), ValueError, "topk"),
        (dict(topk=K + 1), ValueError, "topk"),
        (dict(logits=torch.randint(0, 5, (N, K))), TypeError, "logits"),
        (dict(target=torch.zeros(N)), TypeError, "target"),
        (dict(target=torch.zeros(N + 1, dtype=torch.long)), ValueError, "target"),
        (dict(target=torch.full((N,), K)), ValueError, "target"),
        (dict(target=torch.full((N,), -1)), ValueError, "ignore_index"),
        (dict(codebook=torch.randn(K + 1, D)), ValueError, "codebook"),
        (dict(codebook=torch.randn(K, D).index_fill_(0, torch.tensor([2]), float("nan"))), ValueError, "codebook"),
        (dict(latents=torch.randn(N, D + 1)), ValueError, "latents"),
        (dict(latents=torch.full((N, D), float("inf"))), ValueError, "latents"),
        (dict(weight=torch.ones(N + 1)), ValueError, "weight"),
        (dict(weight=torch.ones(N, dtype=torch.long)), TypeError, "weight"),
    ],
)
def test_bad_input_names_the_argument(case, over, exc, words):
    with pytest.raises(exc, match=words):
        call(case, **over)


def test_table_conflicts_are_rejected(case):
    table = NeighborTable.build(case["codebook"], 3, 0.5, "l2")
    with pytest.raises(ValueError, match="latents"):
        call(case, table=table)
    with pytest.raises(ValueError, match="topk"):
        call(case, table=table, latents=None, topk=2)
    with pytest.raises(ValueError, match="tau"):
        call(case, table=table, latents=None, tau=0.7)
    other = NeighborTable.build(torch.randn(K + 2, D), 3, 0.5, "l2")
    with pytest.raises(ValueError, match="codes"):
        call(case, table=other, latents=None, tau=None)


def test_fused_shape_and_dtype_errors(case):
    hidden, w = torch.randn(N, H), torch.randn(K, H)
    with pytest.raises(ValueError, match="head_weight"):
        fused_linear_snce_loss(hidden, torch.randn(K, H + 1), case["target"], codebook=case["codebook"], tau=1.0)
    with pytest.raises(TypeError, match="dtype"):
        fused_linear_snce_loss(hidden.double(), w, case["target"], codebook=case["codebook"], tau=1.0)
    with pytest.raises(ValueError, match="head_bias"):
        fused_linear_snce_loss(hidden, w, case["target"], torch.randn(K + 1), codebook=case["codebook"], tau=1.0)


def test_errors_come_before_any_work(case, monkeypatch):
    """Validation runs before the chunked pass: a bad target must not reach the teacher computation."""
    from snce.losses import chunked

    monkeypatch.setattr(chunked, "logits_pass", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError):
        call(case, target=torch.full((N,), K))


def test_module_and_distribution_validate_too(case):
    with pytest.raises(ValueError, match="metric"):
        SNCELoss(case["codebook"], tau=1.0, metric="manhattan")
    with pytest.raises(ValueError, match="tau"):
        SNCELoss(case["codebook"], tau=0)
    with pytest.raises(ValueError, match="dimension"):
        neighbor_distribution(torch.randn(N, D + 2), case["codebook"], tau=1.0)
