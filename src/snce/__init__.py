"""snce: Stochastic Neighbor Cross-Entropy for discrete image generators over very large VQ codebooks.

The loss is here at the top level; the layers around it are subpackages:
``snce.quantize`` (VQ, IBQ, FVQ, VQGAN-LC, Regularized VQ), ``snce.tokenizer``, ``snce.data``,
``snce.generators``, ``snce.train``, ``snce.metrics`` and ``snce.study``.
"""

from snce import functional
from snce.losses import FusedLinearSNCELoss, NeighborTable, SNCELoss

__version__ = "0.1.0"

__all__ = ["FusedLinearSNCELoss", "NeighborTable", "SNCELoss", "functional", "__version__"]
