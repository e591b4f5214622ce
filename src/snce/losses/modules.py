"""nn.Module wrappers: they store the codebook and options, validate once, and call the functional core."""

from __future__ import annotations

import torch
from torch import nn

from snce.losses.functional import fused_linear_snce_loss, snce_loss
from snce.losses.targets import NeighborShuffle, NeighborTable, check_tau, check_topk
from snce.quantize.search import check_metric


class _SNCEOptions(nn.Module):
    """Shared storage: the codebook as a buffer (moves with .to(), saved in state_dict) and the options.

    A table or shuffle is moved to the inputs' device on each call."""

    def __init__(self, codebook, tau, metric, topk, table, shuffle, ignore_index, reduction):
        super().__init__()
        if table is None and codebook is None:
            raise ValueError("pass a codebook (K, D) or a NeighborTable")
        if codebook is not None:
            if not torch.is_tensor(codebook) or codebook.dim() != 2 or not codebook.is_floating_point():
                raise ValueError("codebook must be a floating (K, D) tensor")
            self.register_buffer("codebook", codebook.detach().clone())
        else:
            self.codebook = None
        self.tau = None if tau is None else check_tau(tau)
        self.metric = check_metric(metric)
        num_codes = (codebook if codebook is not None else table.indices).shape[0]
        self.topk = topk if topk is None else check_topk(topk, num_codes)
        self.table = table
        if shuffle is not None and (not isinstance(shuffle, NeighborShuffle) or shuffle.num_codes != num_codes):
            raise ValueError(f"shuffle must be a NeighborShuffle of the {num_codes} codes, got {shuffle!r}")
        self.shuffle = shuffle
        self.ignore_index = ignore_index
        self.reduction = reduction

    def _options(self) -> dict:
        return dict(codebook=self.codebook, tau=self.tau, metric=self.metric, topk=self.topk, table=self.table,
                    shuffle=self.shuffle, ignore_index=self.ignore_index, reduction=self.reduction)

    def extra_repr(self) -> str:
        k = self.table.num_codes if self.codebook is None else self.codebook.shape[0]
        return (f"num_codes={k}, tau={self.tau if self.table is None else self.table.tau}, metric={self.metric!r}, "
                f"topk={self.topk}, table={f'k={self.table.k}' if self.table else None}, "
                f"shuffle={self.shuffle}, reduction={self.reduction!r}")


class SNCELoss(_SNCEOptions):
    """Stochastic Neighbor Cross-Entropy: ``-sum_k q_k log softmax(logits)_k``, q from the codebook geometry.

    Args: codebook (K, D), tau, metric, topk, table, ignore_index, reduction and (keyword-only) shuffle: see
    :func:`snce.functional.snce_loss`.
    Shape: logits (..., K), target (...), latents (..., D) or None, weight (...) or None ->
    scalar, or target's shape for reduction="none".
    """

    def __init__(self, codebook: torch.Tensor | None = None, tau: float | None = None, metric: str = "l2",
                 topk: int | None = None, table: NeighborTable | None = None, ignore_index: int = -100,
                 reduction: str = "mean", *, shuffle: NeighborShuffle | None = None):
        super().__init__(codebook, tau, metric, topk, table, shuffle, ignore_index, reduction)

    def forward(self, logits, target, latents=None, weight=None):
        return snce_loss(logits, target, latents=latents, weight=weight, **self._options())


class FusedLinearSNCELoss(_SNCEOptions):
    """SNCE of ``hidden @ head_weight.T + head_bias`` without materialising the (N, K) logits.

    Args as :class:`SNCELoss`. Shape: hidden (..., H), head_weight (K, H), target (...), head_bias (K,) or None.
    impl: "auto" | "torch" | "triton", see :func:`snce.functional.fused_linear_snce_loss`.
    """

    def __init__(self, codebook: torch.Tensor | None = None, tau: float | None = None, metric: str = "l2",
                 topk: int | None = None, table: NeighborTable | None = None, ignore_index: int = -100,
                 reduction: str = "mean", impl: str = "auto", *, shuffle: NeighborShuffle | None = None):
        super().__init__(codebook, tau, metric, topk, table, shuffle, ignore_index, reduction)
        self.impl = impl

    def forward(self, hidden, head_weight, target, head_bias=None, latents=None, weight=None):
        return fused_linear_snce_loss(hidden, head_weight, target, head_bias, latents=latents, weight=weight,
                                      impl=self.impl, **self._options())
