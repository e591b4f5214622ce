"""snce: Stochastic Neighbor Cross-Entropy for discrete image generators over very large VQ codebooks."""

from snce import functional
from snce.losses import FusedLinearSNCELoss, NeighborTable, SNCELoss

__version__ = "0.1.0"

__all__ = ["FusedLinearSNCELoss", "NeighborTable", "SNCELoss", "functional", "__version__"]
