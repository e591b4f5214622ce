"""Sample-quality metrics in a feature space: FID, KID, IS (torchmetrics), precision/recall, class consistency.

A feature network maps images (N, C, H, W) in [-1, 1] to ``(features (N, d), logits (N, C))``: either the
FID Inception-v3 loaded from a local file (:mod:`snce.metrics.inception`) or the built-in domain classifier
(:mod:`snce.metrics.domain`). Features are extracted once per image set; the real set's features are kept by
:class:`ImageEvaluator`, so evaluating many checkpoints against the same data costs one pass per sample set.
torchmetrics computes KID and IS from those features through an identity feature module; FID is computed
here from the real set's mean and covariance, kept once (:class:`FeatureStatistics`), which also gives a
bootstrap interval over the generated samples cheaply (:func:`frechet_distance_interval`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from snce.metrics.domain import load_or_train_domain_classifier
from snce.metrics.inception import load_inception, resolve_weights_path


class _Precomputed(nn.Module):
    """Identity "feature extractor" so torchmetrics accepts features we already computed."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _check_features(name: str, x: torch.Tensor, min_rows: int = 2) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] < min_rows:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (N, d) tensor with N >= {min_rows}, got {shape}")
    return x.detach().double().cpu()


@torch.no_grad()
def extract(
    net: nn.Module, images: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a feature network over ``images`` (N, C, H, W) in [-1, 1] in batches -> (features, logits), float32."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    device = next(net.parameters()).device
    feats, logits = [], []
    for i in range(0, images.shape[0], batch_size):
        f, l = net(images[i : i + batch_size].to(device).float())
        feats.append(f.float().cpu())
        logits.append(l.float().cpu())
    return torch.cat(feats), torch.cat(logits)


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets (N, d) and (M, d): ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^1/2)."""
    real, fake = _check_features("real", real), _check_features("fake", fake)
    fid = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


@dataclass
class FeatureStatistics:
    """Mean (d,) and covariance (d, d) of a feature set in float64, with the covariance's square root, so the
    Frechet distance of any other set costs one symmetric eigendecomposition:

        FID = ||mu_r - mu_f||^2 + Tr(S_r) + Tr(S_f) - 2 Tr((S_r^1/2 S_f S_r^1/2)^1/2)

    (Tr (S_r S_f)^1/2 equals the trace of the symmetric form, whose eigenvalues are real and >= 0.)
    """

    mean: torch.Tensor
    cov: torch.Tensor
    sqrt_cov: torch.Tensor
    count: int

    @classmethod
    def of(cls, features: torch.Tensor) -> FeatureStatistics:
        x = _check_features("features", features)
        mean, cov = x.mean(0), torch.cov(x.T)
        eigval, eigvec = torch.linalg.eigh(cov)
        sqrt_cov = (eigvec * eigval.clamp_min(0).sqrt()) @ eigvec.T
        return cls(mean, cov, sqrt_cov, x.shape[0])

    def frechet(self, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """Frechet distances to Gaussians with ``mean`` (..., d) and ``cov`` (..., d, d): shape (...)."""
        inner = self.sqrt_cov @ cov @ self.sqrt_cov
        root_trace = torch.linalg.eigvalsh((inner + inner.mT) / 2).clamp_min(0).sqrt().sum(-1)
        diff = self.mean - mean
        trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
        return (diff * diff).sum(-1) + self.cov.trace() + trace - 2 * root_trace


def frechet_distance_interval(
    real: FeatureStatistics,
    fake: torch.Tensor,
    *,
    bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """FID of ``fake`` features (M, d) against ``real`` statistics, with a bootstrap interval: (fid, lo, hi).

    The M samples are resampled with replacement ``bootstrap`` times (the real statistics stay fixed: the
    interval measures how much the FID of this model moves with its own sampling noise). A resample holds
    fewer distinct samples, which biases its FID (upward, mostly), so the percentiles (q_lo, q_hi) of the
    bootstrap FIDs are shifted by (median - fid) to centre them on the point estimate:
    [q_lo - shift, q_hi - shift], clipped at 0. ``bootstrap < 2``: (fid, nan, nan).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    x = _check_features("fake", fake)
    m = x.shape[0]
    fid = float(real.frechet(x.mean(0), torch.cov(x.T)))
    if bootstrap < 2:
        return fid, float("nan"), float("nan")
    gen = torch.Generator().manual_seed(seed)
    values = []
    for start in range(0, bootstrap, 16):  # 16 resamples at a time: (16, d, M) weighted copies of x
        picks = torch.randint(0, m, (min(16, bootstrap - start), m), generator=gen)
        w = torch.zeros(picks.shape, dtype=x.dtype).scatter_add_(
            1, picks, torch.ones_like(picks, dtype=x.dtype)
        )
        mean = w @ x / m  # (b, d): each resample's mean
        second = (x.T * w[:, None, :]) @ x / m  # (b, d, d): each resample's E[x x^T]
        cov = (second - mean[:, :, None] * mean[:, None, :]) * (m / (m - 1))
        values.append(real.frechet(mean, cov))
    q = torch.tensor([(1 - confidence) / 2, 0.5, (1 + confidence) / 2], dtype=x.dtype)
    q_lo, median, q_hi = torch.quantile(torch.cat(values), q).tolist()
    shift = median - fid
    return fid, max(0.0, q_lo - shift), q_hi - shift


def kernel_distance(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    subsets: int = 50,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (polynomial-kernel MMD^2, unbiased) mean and std over random subsets; subset size capped by N, M."""
    real, fake = _check_features("real", real), _check_features("fake", fake)
    size = min(subset_size, real.shape[0], fake.shape[0])
    # torchmetrics warns that it "will save all extracted features": they are already in memory
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(
            feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size
        )
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)


def inception_score(
    logits: torch.Tensor, *, splits: int = 10, seed: int = 0
) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) from classifier logits (N, C); mean and std over ``splits``.

    The std is nan for ``splits=1``.
    """
    logits = _check_features("logits", logits, min_rows=splits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=splits)
    metric.update(logits.float())
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _kth_neighbour_radius(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row of x: (N,)."""
    radii = []
    for i in range(0, x.shape[0], chunk):
        d = torch.cdist(x[i : i + chunk], x)  # (chunk, N); the row itself is at distance 0
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(
    manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, chunk: int
) -> float:
    """Fraction of queries inside at least one ball B(manifold_i, radii_i)."""
    inside = []
    for i in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[i : i + chunk], manifold)  # (chunk, N)
        inside.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(inside).double().mean().item()


def precision_recall(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    k: int = 3,
    chunk: int = 1024,
    real_radii: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) with k-NN balls in feature space.

    precision: fraction of fake samples inside the real manifold (union of balls around each real feature with
    radius = distance to its k-th nearest real neighbour); recall: fraction of real samples inside the fake
    manifold, built the same way. ``real_radii``: the real set's radii when already computed (N,).
    """
    real, fake = _check_features("real", real, k + 1), _check_features("fake", fake, k + 1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"real and fake features must have the same width, got {real.shape[1]} and {fake.shape[1]}"
        )
    if real_radii is None:
        real_radii = _kth_neighbour_radius(real, k, chunk)
    precision = _coverage(real, real_radii.to(real.dtype), fake, chunk)
    recall = _coverage(fake, _kth_neighbour_radius(fake, k, chunk), real, chunk)
    return precision, recall


def class_consistency(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of class-conditional samples the classifier assigns to the class they were generated for."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"logits (N, C) and labels (N,) must match, got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return (logits.argmax(-1) == labels.to(logits.device)).double().mean().item()


class ImageEvaluator:
    """All image metrics of generated samples against one fixed real (reference) set.

    Args:
        net: feature network, ``net(images) -> (features (N, d), logits (N, C))``.
        real_images: (N, C, H, W) in [-1, 1]; their features, statistics and precision/recall radii are
            computed once here. For an honest FID these are held-out images the generator never saw.
        class_logits: True when ``net``'s logits are the dataset's classes (domain classifier on labelled
            data), so class consistency can be measured.
        bootstrap: resamples of the generated set for the FID interval (0: no interval); confidence: its level.
    """

    def __init__(
        self,
        net: nn.Module,
        real_images: torch.Tensor,
        *,
        class_logits: bool = False,
        batch_size: int = 256,
        kid_subsets: int = 50,
        is_splits: int = 10,
        pr_k: int = 3,
        bootstrap: int = 0,
        confidence: float = 0.95,
        seed: int = 0,
    ) -> None:
        self.net = net.eval()
        self.class_logits = class_logits
        self.batch_size = batch_size
        self.kid_subsets, self.is_splits, self.pr_k, self.seed = kid_subsets, is_splits, pr_k, seed
        self.bootstrap, self.confidence = bootstrap, confidence
        self.real_features, _ = extract(net, real_images, batch_size)
        self.real_statistics = FeatureStatistics.of(self.real_features)
        real = _check_features("real", self.real_features, pr_k + 1)
        self.real_radii = _kth_neighbour_radius(real, pr_k, 1024)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, *, full: bool = True
    ) -> dict[str, float]:
        """Metrics of ``images`` (M, C, H, W) in [-1, 1]; ``labels`` (M,) are the classes they were sampled for.

        Keys: fid, and class_acc when labels are given and the network's logits are classes; with ``full`` also
        fid_lo, fid_hi (bootstrap interval, nan without one), kid, kid_std, is, is_std, precision and recall
        (``full=False``: the cheap pair a curve of many evaluations needs).
        """
        features, logits = extract(self.net, images, self.batch_size)
        out = {}
        if labels is not None and self.class_logits:
            out["class_acc"] = class_consistency(logits, labels)
        if not full:
            return {
                "fid": frechet_distance_interval(self.real_statistics, features, bootstrap=0)[0],
                **out,
            }
        out["fid"], out["fid_lo"], out["fid_hi"] = frechet_distance_interval(
            self.real_statistics,
            features,
            bootstrap=self.bootstrap,
            confidence=self.confidence,
            seed=self.seed,
        )
        out["kid"], out["kid_std"] = kernel_distance(
            self.real_features, features, subsets=self.kid_subsets, seed=self.seed
        )
        splits = max(1, min(self.is_splits, images.shape[0] // 2))
        out["is"], out["is_std"] = inception_score(logits, splits=splits, seed=self.seed)
        out["precision"], out["recall"] = precision_recall(
            self.real_features, features, k=self.pr_k, real_radii=self.real_radii
        )
        return out


def feature_network(
    real_images: torch.Tensor,
    real_labels: torch.Tensor | None,
    *,
    dataset: str,
    cache_dir: str | os.PathLike,
    inception_weights: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    **domain_kwargs,
) -> tuple[nn.Module, dict]:
    """The feature network to measure with, and a description of it for reports.

    Inception-v3 from ``inception_weights`` (or ``$SNCE_INCEPTION_WEIGHTS``) when given; otherwise the
    built-in domain classifier trained on ``real_images`` / ``real_labels`` (cached in ``cache_dir``).
    Returns (net, info) with info["features"] in {"inception", "domain"} and info["class_logits"] telling
    whether the logits are the dataset's classes (then class consistency can be measured).
    """
    path = resolve_weights_path(inception_weights)
    if path is not None:
        return load_inception(path), {
            "features": "inception",
            "weights": str(path),
            "class_logits": False,
        }
    net, acc = load_or_train_domain_classifier(
        real_images,
        real_labels,
        dataset=dataset,
        cache_dir=cache_dir,
        seed=seed,
        progress=progress,
        **domain_kwargs,
    )
    info = {
        "features": "domain",
        "task": "rotation" if net.config.rotation_task else "classes",
        "heldout_accuracy": acc,
        "class_logits": not net.config.rotation_task,
    }
    return net, info
