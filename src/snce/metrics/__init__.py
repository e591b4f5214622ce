"""Evaluation: FID/KID/IS/precision-recall in Inception or built-in domain feature space, class consistency,
usage and entropy of generated codes, validation NLL (hard and soft); the ADM evaluator's protocol (FID, sFID,
IS, precision, recall against a reference batch) in :mod:`snce.metrics.adm`; whether text-to-image samples and edits
of the built-in scenes follow their condition in :mod:`snce.metrics.scenes`."""

from snce.metrics import adm
from snce.metrics.adm import GaussianStatistics, make_reference, read_npz, write_reference
from snce.metrics.adm import evaluate as evaluate_adm
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
from snce.metrics.inception import (
    InceptionOutputs,
    InceptionV3,
    load_inception,
    resolve_weights_path,
)
from snce.metrics.scenes import (
    AttributeClassifier,
    attribute_accuracy,
    attribute_scores,
    edit_scores,
    load_or_train_attribute_classifier,
)
from snce.metrics.tokens import code_statistics, validation_nll

__all__ = [
    "AttributeClassifier",
    "DomainClassifier",
    "DomainClassifierConfig",
    "FeatureStatistics",
    "GaussianStatistics",
    "ImageEvaluator",
    "InceptionOutputs",
    "InceptionV3",
    "adm",
    "attribute_accuracy",
    "attribute_scores",
    "class_consistency",
    "code_statistics",
    "edit_scores",
    "evaluate_adm",
    "extract",
    "feature_network",
    "frechet_distance",
    "frechet_distance_interval",
    "inception_score",
    "kernel_distance",
    "load_inception",
    "load_or_train_attribute_classifier",
    "load_or_train_domain_classifier",
    "make_reference",
    "precision_recall",
    "read_npz",
    "resolve_weights_path",
    "train_domain_classifier",
    "validation_nll",
    "write_reference",
]
