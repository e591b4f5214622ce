"""FID / KID / IS / precision-recall against closed forms and dense, readable references."""

import math

import numpy as np
import pytest
import torch

from snce.metrics import (
    FeatureStatistics,
    ImageEvaluator,
    class_consistency,
    frechet_distance,
    frechet_distance_interval,
    inception_score,
    kernel_distance,
    precision_recall,
)


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_closed_form(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), via symmetric square roots."""
    r = _sym_sqrt(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * _sym_sqrt(r @ s2 @ r)))


def _random_cov(d: int, gen: np.random.Generator) -> np.ndarray:
    a = gen.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_of_a_set_against_itself_is_zero():
    x = torch.randn(600, 32, generator=torch.Generator().manual_seed(0)) * 3 + 1
    assert abs(frechet_distance(x, x)) < 1e-6 * 32 * 9


def test_fid_one_dimensional_gaussians_closed_form():
    # N(m1, s1^2) vs N(m2, s2^2): FID = (m1 - m2)^2 + (s1 - s2)^2, on the samples' own moments.
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(5000, 1, generator=gen, dtype=torch.float64) * 2.0 + 1.0
    b = torch.randn(4000, 1, generator=gen, dtype=torch.float64) * 0.5 - 3.0
    expected = (a.mean() - b.mean()) ** 2 + (a.std() - b.std()) ** 2
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-6)


def test_fid_between_gaussians_matches_the_analytic_frechet_distance():
    d, n = 6, 40_000
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) + 0.5
    s1, s2 = _random_cov(d, rng), _random_cov(d, rng)
    a = rng.multivariate_normal(mu1, s1, size=n)
    b = rng.multivariate_normal(mu2, s2, size=n)
    fid = frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    # Exact on the sample moments (same estimator: unbiased covariances) ...
    sample = frechet_closed_form(a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T))
    assert fid == pytest.approx(sample, rel=1e-6)
    # ... and within sampling error of the population's Frechet distance.
    assert fid == pytest.approx(frechet_closed_form(mu1, s1, mu2, s2), rel=0.03)


def kid_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3."""
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    m = x.shape[0]
    off = ~np.eye(m, dtype=bool)
    return float(kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean())


def test_kid_matches_dense_unbiased_mmd():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(200, 8, generator=gen, dtype=torch.float64) * 1.3 + 0.2
    # one subset holding every sample: the estimator is exactly the dense unbiased MMD^2
    mean, _ = kernel_distance(x, y, subsets=1, subset_size=200)
    assert mean == pytest.approx(kid_reference(x.numpy(), y.numpy()), rel=1e-6)


def test_inception_score_limits():
    n, c = 400, 8
    # every sample certain of its class, classes balanced -> IS = C
    confident = torch.full((n, c), -1e4)
    confident[torch.arange(n), torch.arange(n) % c] = 0.0
    assert inception_score(confident, splits=1)[0] == pytest.approx(c, rel=1e-4)
    # every sample uniform over the classes -> IS = 1
    assert inception_score(torch.zeros(n, c), splits=1)[0] == pytest.approx(1.0, abs=1e-6)


def precision_recall_reference(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Loops over samples: the definition of improved precision/recall, written out."""

    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def covered(manifold, r, queries):
        return np.mean(
            [
                any(np.linalg.norm(q - m) <= ri for m, ri in zip(manifold, r, strict=True))
                for q in queries
            ]
        )

    return covered(real, radii(real), fake), covered(fake, radii(fake), real)


def test_precision_recall_matches_the_definition():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(120, 5))
    fake = rng.normal(size=(90, 5)) * 0.6 + 1.5  # partly overlapping, narrower
    got = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3, chunk=17)
    want = precision_recall_reference(real, fake, 3)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1


def test_precision_recall_limits():
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(5))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_class_consistency():
    logits = torch.eye(4)[[0, 1, 2, 3, 0]]
    assert class_consistency(logits, torch.tensor([0, 1, 2, 0, 0])) == pytest.approx(0.8)


@pytest.mark.parametrize(
    "call",
    [
        lambda: frechet_distance(torch.randn(10), torch.randn(10, 2)),
        lambda: frechet_distance(torch.randn(1, 3), torch.randn(10, 3)),
        lambda: precision_recall(torch.randn(10, 3), torch.randn(10, 4)),
        lambda: class_consistency(torch.randn(5, 3), torch.zeros(4, dtype=torch.long)),
    ],
)
def test_bad_input_is_a_clear_error(call):
    with pytest.raises(ValueError, match="must"):
        call()


def test_metrics_are_finite_for_small_sets():
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(20, 3, generator=gen), torch.randn(12, 3, generator=gen)
    values = [frechet_distance(x, y), *kernel_distance(x, y, subsets=5), *precision_recall(x, y)]
    assert all(math.isfinite(v) for v in values)


def test_feature_statistics_fid_equals_torchmetrics():
    gen = torch.Generator().manual_seed(3)
    real = torch.randn(3000, 16, generator=gen) @ torch.randn(16, 16, generator=gen)
    fake = torch.randn(2000, 16, generator=gen) * 1.3 + 0.2
    fid, lo, hi = frechet_distance_interval(FeatureStatistics.of(real), fake, bootstrap=0)
    assert fid == pytest.approx(frechet_distance(real, fake), rel=1e-7)
    assert math.isnan(lo) and math.isnan(hi)


def test_fid_bootstrap_interval_matches_the_sampling_spread():
    # Fake sets drawn from one fixed distribution. The FID a model would get in expectation (at this sample
    # size) is the mean over many independent draws; a 95% interval from a single draw should contain it
    # for most draws, and the bootstrap's width should match the spread of FIDs across draws.
    rng = np.random.default_rng(4)
    d = 8
    stats = FeatureStatistics.of(torch.from_numpy(rng.normal(size=(20_000, d))))
    draws = [torch.from_numpy(rng.normal(size=(2000, d)) * 1.2 + 0.1) for _ in range(60)]
    fids = np.array([frechet_distance_interval(stats, x, bootstrap=0)[0] for x in draws])
    expected, spread = fids.mean(), fids.std(ddof=1)
    intervals = [
        frechet_distance_interval(stats, x, bootstrap=200, seed=i) for i, x in enumerate(draws[:20])
    ]
    assert all(lo < fid < hi for fid, lo, hi in intervals)
    assert sum(lo <= expected <= hi for _, lo, hi in intervals) >= 16
    widths = np.array(
        [(hi - lo) / (2 * 1.96) for _, lo, hi in intervals]
    )  # implied standard deviation
    assert 0.6 * spread < widths.mean() < 1.7 * spread, (widths.mean(), spread)


class _FlattenNet(torch.nn.Module):
    """Features = the pixels themselves; logits = the first two pixels."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        f = x.flatten(1)
        return f, f[:, :2]


def test_image_evaluator_reports_a_fid_interval_and_reuses_real_radii():
    net = _FlattenNet()
    real = torch.rand(300, 1, 4, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1
    fake = torch.rand(200, 1, 4, 4, generator=torch.Generator().manual_seed(6)) * 2 - 1
    out = ImageEvaluator(net, real, bootstrap=50)(fake)
    features = real.flatten(1), fake.flatten(1)
    assert out["fid"] == pytest.approx(frechet_distance(*features), rel=1e-6)
    assert out["fid_lo"] <= out["fid"] <= out["fid_hi"]
    assert (out["precision"], out["recall"]) == precision_recall(*features)
    cheap = ImageEvaluator(net, real, bootstrap=50)(fake, full=False)
    assert cheap == {"fid": pytest.approx(out["fid"])}
