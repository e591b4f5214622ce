"""Functional API: ``from snce.functional import snce_loss, fused_linear_snce_loss, neighbor_distribution``."""

from snce.losses.functional import fused_linear_cross_entropy, fused_linear_snce_loss, snce_loss
from snce.losses.targets import neighbor_distribution, suggest_tau

__all__ = [
    "fused_linear_cross_entropy",
    "fused_linear_snce_loss",
    "neighbor_distribution",
    "snce_loss",
    "suggest_tau",
]
