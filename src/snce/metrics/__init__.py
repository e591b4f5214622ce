"""Evaluation: FID/KID/IS/precision-recall in Inception or built-in domain feature space, class consistency,
usage and entropy of generated codes, validation NLL (hard and soft)."""

from snce.metrics.domain import (
    DomainClassifier,
    DomainClassifierConfig,
    load_or_train_domain_classifier,
    train_domain_classifier,
)
from snce.metrics.image import (
    FeatureStatistics,
    ImageEvaluator,
    class_consistency,
    extract,
    feature_network,
    frechet_distance,
    frechet_distance_interval,
    inception_score,
    kernel_distance,
    precision_recall,
)
from snce.metrics.inception import InceptionV3, load_inception, resolve_weights_path
from snce.metrics.tokens import code_statistics, validation_nll

__all__ = [
    "DomainClassifier",
    "DomainClassifierConfig",
    "FeatureStatistics",
    "ImageEvaluator",
    "InceptionV3",
    "class_consistency",
    "code_statistics",
    "extract",
    "feature_network",
    "frechet_distance",
    "frechet_distance_interval",
    "inception_score",
    "kernel_distance",
    "load_inception",
    "load_or_train_domain_classifier",
    "precision_recall",
    "resolve_weights_path",
    "train_domain_classifier",
    "validation_nll",
]
