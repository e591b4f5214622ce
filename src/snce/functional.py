"""Functional API: ``from snce.functional import snce_loss, fused_linear_snce_loss, neighbor_distribution``."""

from snce.losses.functional import fused_linear_cross_entropy, fused_linear_snce_loss, snce_loss
from snce.losses.targets import (
    neighbor_distribution,
    smoothing_for_entropy,
    suggest_tau,
    target_entropy,
)

__all__ = [
    "fused_linear_cross_entropy",
    "fused_linear_snce_loss",
    "neighbor_distribution",
    "smoothing_for_entropy",
    "snce_loss",
    "suggest_tau",
    "target_entropy",
]
