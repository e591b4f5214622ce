"""The SNCE loss: soft targets from codebook geometry, dense reference, chunked torch path, modules."""

from snce.losses.functional import fused_linear_cross_entropy, fused_linear_snce_loss, snce_loss
from snce.losses.modules import FusedLinearSNCELoss, SNCELoss
from snce.losses.targets import (
    NeighborShuffle,
    NeighborTable,
    neighbor_distribution,
    sample_neighbors,
    smoothing_for_entropy,
    suggest_tau,
    target_entropy,
)

__all__ = [
    "FusedLinearSNCELoss",
    "NeighborShuffle",
    "NeighborTable",
    "SNCELoss",
    "fused_linear_cross_entropy",
    "fused_linear_snce_loss",
    "neighbor_distribution",
    "sample_neighbors",
    "smoothing_for_entropy",
    "snce_loss",
    "suggest_tau",
    "target_entropy",
]
