"""The quantizer contract shared by every snce quantizer, and the helpers they share.

A quantizer maps continuous latents z to the nearest of K codes under its metric:

    out = quantizer(z)          # z: (B, D, H, W) channel-first map, or (B, L, D) sequence
    out.quantized               # like z: the code vectors, with the method's straight-through gradient
    out.indices                 # (B, H, W) or (B, L) long
    out.loss                    # scalar: the method's auxiliary losses, already weighted
    out.stats                   # dict of floats: "usage", "perplexity", per-term losses

``quantizer.codebook`` (K, D) and ``quantizer.metric`` are exactly the geometry the quantizer assigns with, so
``argmin_k d(z, codebook[k])`` under ``metric`` reproduces ``out.indices`` in eval mode; SNCE targets are built
from these two. ``quantizer.config`` is a JSON-able dict (with a ``"kind"``) that
``snce.quantize.build_quantizer`` turns back into an equal, freshly initialised quantizer.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from snce.quantize.search import check_metric, nearest_code, to_search_space


@dataclass
class QuantizerOutput:
    """What every quantizer returns (see the module docstring for shapes)."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """Usage of any index tensor: (fraction of the K codes that occur, perplexity exp(H(counts / N)))."""
    check_positive_int(codebook_size, "codebook_size")
    check_indices(indices, codebook_size)
    flat = indices.reshape(-1)
    if flat.numel() == 0:
        return 0.0, 0.0
    counts = torch.bincount(flat.long(), minlength=codebook_size).double()
    p = counts / counts.sum()
    entropy = -torch.special.xlogy(p, p).sum()
    return int((counts > 0).sum()) / codebook_size, float(entropy.exp())


def check_indices(indices, codebook_size: int) -> None:
    """TypeError unless an integer tensor, ValueError unless every value lies in [0, codebook_size)."""
    if not (
        torch.is_tensor(indices) and not indices.is_floating_point() and not indices.is_complex()
    ):
        raise TypeError(f"indices must be an integer tensor, got {_describe(indices)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codebook_size):
        raise ValueError(
            f"indices must lie in [0, {codebook_size}), "
            f"got values in [{int(indices.min())}, {int(indices.max())}]"
        )


class UsageTracker:
    """Fraction of codes used over the last ``window`` batches.

    Keeps each batch's distinct codes (at most min(K, tokens) ints per batch) and a (K,) count of how many
    batches in the window used each code, so an update costs one ``unique`` and two scatter-adds.
    """

    def __init__(self, codebook_size: int, window: int = 100):
        check_positive_int(codebook_size, "codebook_size")
        check_positive_int(window, "usage_window")
        self.codebook_size, self.window = codebook_size, window
        self.batches: deque[torch.Tensor] = deque()
        self.counts: torch.Tensor | None = None

    def update(self, indices: torch.Tensor) -> float:
        """Add one batch of indices; returns the fraction of codes used in the window."""
        used = torch.unique(indices.detach().reshape(-1))
        if self.counts is None or self.counts.device != used.device:
            self.reset(used.device)
        self.batches.append(used)
        self.counts.index_add_(0, used, torch.ones_like(used))
        if len(self.batches) > self.window:
            old = self.batches.popleft()
            self.counts.index_add_(0, old, -torch.ones_like(old))
        return self.usage()

    def usage(self) -> float:
        return 0.0 if self.counts is None else int((self.counts > 0).sum()) / self.codebook_size

    def reset(self, device: torch.device | str = "cpu") -> None:
        self.batches.clear()
        self.counts = torch.zeros(self.codebook_size, dtype=torch.long, device=device)


class Quantizer(nn.Module):
    """Base class: input checks, layout handling, usage statistics and ``lookup``.

    Subclasses set ``kind``, define the ``codebook`` property and implement :meth:`quantize` on flat (N, D)
    latents; :meth:`forward` does the rest.

    Args:
        dim: D, the latent (and effective code) dimension.
        codebook_size: K.
        metric: "l2" | "cosine" | "dot", the distance the quantizer assigns with.
        config: the subclass's constructor keyword arguments (JSON-able), kept as ``self.config``.
        usage_window: number of training batches the reported "usage" is counted over.
    """

    kind: str = ""

    def __init__(
        self, dim: int, codebook_size: int, metric: str, *, config: dict, usage_window: int = 100
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(codebook_size, "codebook_size")
        self.dim, self.codebook_size = dim, codebook_size
        self.metric = check_metric(metric)
        self._config = {"kind": self.kind, **config, "usage_window": usage_window}
        self.usage_tracker = UsageTracker(codebook_size, usage_window)

    @property
    def config(self) -> dict:
        """Constructor arguments plus ``"kind"``: ``build_quantizer(q.config)`` rebuilds this quantizer."""
        return dict(self._config)

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D) effective code vectors, in the geometry the quantizer assigns with."""
        raise NotImplementedError

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Flat latents (N, D) -> (quantized (N, D), indices (N,), loss scalar, stats dict of floats)."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: (B, D, H, W) or (B, L, D) float -> :class:`QuantizerOutput` (same layout as z)."""
        flat, unflatten, index_shape = self._flatten(z)
        quantized, indices, loss, stats = self.quantize(flat)
        usage, perplexity = codebook_usage(indices, self.codebook_size)
        if self.training:
            usage = self.usage_tracker.update(
                indices
            )  # over the sliding window instead of this batch
        stats = {"usage": usage, "perplexity": perplexity, **stats}
        return QuantizerOutput(unflatten(quantized), indices.reshape(index_shape), loss, stats)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors of ``indices``: (B, H, W) -> (B, D, H, W); any other shape (...) -> (..., D).

        In eval mode ``lookup(out.indices)`` equals ``out.quantized`` (same layout as the input was).
        """
        check_indices(indices, self.codebook_size)
        codes = F.embedding(indices.long(), self.codebook)
        return codes.permute(0, 3, 1, 2) if indices.dim() == 3 else codes

    def _flatten(self, z: torch.Tensor):
        """Check z and return (flat (N, D), unflatten fn, index shape)."""
        if not torch.is_tensor(z) or not z.is_floating_point():
            raise TypeError(f"latents must be a floating tensor, got {_describe(z)}")
        if z.dim() == 4:
            b, d, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            index_shape = (b, h, w)

            def unflatten(x):
                return x.reshape(b, h, w, d).permute(0, 3, 1, 2)

        elif z.dim() == 3:
            b, length, d = z.shape
            flat = z.reshape(-1, d)
            index_shape = (b, length)

            def unflatten(x):
                return x.reshape(b, length, d)

        else:
            raise ValueError(
                f"latents must be (B, D, H, W) or (B, L, D), got shape {tuple(z.shape)}"
            )
        if d != self.dim:
            layout = "(B, D, H, W): D is dim 1" if z.dim() == 4 else "(B, L, D): D is the last dim"
            raise ValueError(
                f"latent dimension {d} does not match the quantizer's dim {self.dim} "
                f"(latents of shape {tuple(z.shape)}, read as {layout})"
            )
        if not bool(torch.isfinite(z).all()):
            raise ValueError("latents contain NaN or Inf values")
        return flat, unflatten, index_shape

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, metric={self.metric!r}"


def assign(z: torch.Tensor, codes: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codes of z (N, D) among codes (K, D): (codes[k*] (N, D) in z's dtype, k* (N,)).

    The exact chunked search picks k*; the lookup keeps the graph to ``codes``, so a loss on the result
    reaches only the selected codes.
    """
    indices = nearest_code(z.detach(), codes.detach(), metric)
    return F.embedding(indices, codes).to(z.dtype), indices


def straight_through(z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
    """z + sg(zq - z): the value of zq, the gradient of the identity to z."""
    return z + (zq - z).detach()


def vq_losses(z: torch.Tensor, zq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(commitment mean((sg(zq) - z)^2), codebook loss mean((zq - sg(z))^2))."""
    return F.mse_loss(z, zq.detach()), F.mse_loss(zq, z.detach())


@torch.no_grad()
def kmeans(
    x: torch.Tensor, k: int, *, iters: int = 10, metric: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of rows x (N, D) with exact chunked assignment (no N x K matrix).

    Initial centres are k distinct random rows (sampled with replacement when N < k); a centre that loses
    all its points keeps its position. Under "cosine" the data and the centres are unit vectors.
    Returns (centres (k, D) float32, cluster sizes (k,) float32 of the last assignment).
    """
    check_metric(metric)
    x = to_search_space(x, metric)
    n = x.shape[0]
    pick = (
        torch.randperm(n, device=x.device)[:k]
        if n >= k
        else torch.randint(0, n, (k,), device=x.device)
    )
    centres = x[pick]
    sizes = torch.zeros(k, device=x.device)
    for _ in range(iters):
        assign = nearest_code(x, centres, metric)
        sizes = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        means = sums / sizes.clamp_min(1.0)[:, None]
        if metric == "cosine":
            means = F.normalize(means, dim=-1)
        centres = torch.where(sizes[:, None] > 0, means, centres)
    return centres, sizes


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_nonnegative(value, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _describe(x) -> str:
    if torch.is_tensor(x):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
