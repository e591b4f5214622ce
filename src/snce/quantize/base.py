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
import warnings
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from snce.quantize.search import (
    DEFAULT_BLOCK_BYTES,
    check_metric,
    code_blocks,
    nearest_code,
    to_search_space,
)


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

    def state_dict(self) -> dict:
        """The window's batches (CPU tensors): what a resumed run needs to report the same usage."""
        return {"batches": [used.cpu() for used in self.batches]}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.reset(device)
        for used in state["batches"][-self.window :]:
            used = used.to(device)
            self.batches.append(used)
            self.counts.index_add_(0, used, torch.ones_like(used))


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

    def training_state(self) -> dict:
        """State that is not a weight but that a resumed training run needs (the usage window)."""
        return {"usage": self.usage_tracker.state_dict()}

    def load_training_state(self, state: dict) -> None:
        self.usage_tracker.load_state_dict(state["usage"], self.codebook.device)

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


SEEDINGS = ("random", "kmeans++")


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 10,
    metric: str = "l2",
    max_points: int | None = None,
    seeding: str = "random",
    generator: torch.Generator | None = None,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of rows x (N, D) with distinct initial centres and exact chunked assignment.

    Everything happens in the metric's search space (rows l2-normalised under "cosine", as they are then).

    1. ``max_points``: at most this many rows are used, drawn without replacement (None: all N).
    2. Seeding: rows are de-duplicated exactly (``torch.unique``) first, so no two initial centres are equal.
       ``seeding="random"`` takes k distinct rows uniformly at random (``randperm``, the same draw as
       vector-quantize-pytorch when the rows are already distinct); ``"kmeans++"`` (Arthur & Vassilvitskii
       2007) draws each next centre with probability proportional to its distance to the nearest centre so far,
       which is k sequential passes over the rows. With fewer than k distinct rows (after subsampling, the
       distinct rows of all of x), every distinct row becomes a centre and the remaining centres are distinct
       rows plus Gaussian noise of 1e-3 x the data's spread, with a warning.
    3. ``iters`` Lloyd iterations; the assignment is the exact chunked nearest-code search (peak memory a few
       ``max_block_bytes``, never an N x k matrix). A centre that loses all its points keeps its position.

    Under "dot" the search maximises the dot product; the means are plain means. ``generator`` (CPU) makes the
    draws reproducible without touching the global RNG.

    Cost (N = 262,144, K = 16,384, D = 8, float32, 2-core CPU shared with other jobs): de-duplication 0.6-0.8 s;
    one Lloyd iteration 6 s (idle) to 25 s (busy); k-means++ seeding 35 s (idle, extrapolated) to 230 s (busy),
    i.e. several Lloyd iterations' worth, which is why ``"random"`` is the default (with ~16 points per code
    the Lloyd iterations matter more than the seeding).
    Returns (centres (k, D) in x's search-space dtype, cluster sizes (k,) of the last assignment).
    """
    check_metric(metric)
    check_positive_int(k, "k")
    check_positive_int(iters, "iters")
    if max_points is not None:
        check_positive_int(max_points, "max_points")
    if seeding not in SEEDINGS:
        raise ValueError(f"seeding must be one of {SEEDINGS}, got {seeding!r}")
    if not (torch.is_tensor(x) and x.dim() == 2 and x.is_floating_point() and x.shape[0] > 0):
        raise ValueError(f"x must be a non-empty floating (N, D) tensor, got {_describe(x)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf values")
    full = to_search_space(x, metric)
    x = full
    if max_points is not None and x.shape[0] > max_points:
        x = x[_randperm(x.shape[0], generator, x.device)[:max_points]]
    centres = _seed_centres(x, full, k, metric, seeding, generator)
    sizes = torch.zeros(k, device=x.device, dtype=x.dtype)
    for _ in range(iters):
        assign = nearest_code(x, centres, metric, max_block_bytes=max_block_bytes)
        sizes = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        means = sums / sizes.clamp_min(1.0)[:, None]
        if metric == "cosine":
            means = F.normalize(means, dim=-1)
        centres = torch.where(sizes[:, None] > 0, means, centres)
    return centres, sizes


def distinct_rows(x: torch.Tensor) -> torch.Tensor:
    """Indices (ascending) of the first occurrence of every distinct row of x (N, D): exact equality."""
    _, inverse = torch.unique(x, dim=0, return_inverse=True)
    m = int(inverse.max()) + 1
    first = torch.full((m,), x.shape[0], dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, inverse, torch.arange(x.shape[0], device=x.device), "amin")
    return first.sort().values


def _randperm(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    if generator is None:
        return torch.randperm(n, device=device)
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


def _seed_centres(x, full, k, metric, seeding, generator) -> torch.Tensor:
    """k pairwise distinct initial centres from the rows of x (the subsample) or, if too few, of full."""
    first = distinct_rows(x)
    pool = x
    if first.numel() < k and full.shape[0] > x.shape[0]:
        # the subsample lacks distinct rows: seed from all of them
        pool = full
        first = distinct_rows(full)
    m = first.numel()
    if m >= k:
        if seeding == "kmeans++":
            return _kmeans_plus_plus(pool[first], k, metric, generator)
        if m == pool.shape[0]:  # all rows distinct: the plain randperm draw
            return pool[_randperm(m, generator, pool.device)[:k]]
        return pool[first[_randperm(m, generator, pool.device)[:k]]]
    warnings.warn(
        f"kmeans: the data hold only {m} distinct rows for k = {k} centres; every distinct row is a centre "
        f"and the other {k - m} start at distinct rows plus small noise (expect them to stay unused)",
        stacklevel=4,
    )
    rows = pool[first]
    spread = float(rows.std(dim=0, unbiased=False).mean()) if m > 1 else 0.0
    if not spread > 0:
        spread = float(rows.abs().max()) or 1.0
    centres = torch.cat([rows, rows[_randint(m, k - m, generator, rows.device)]])
    todo = torch.arange(m, k, device=rows.device)
    while todo.numel():  # noise until no two centres are equal (one round in practice)
        noise = torch.randn(
            todo.numel(), rows.shape[1], generator=generator,
            device=generator.device if generator is not None else rows.device,
        ).to(rows)  # fmt: skip
        moved = centres[todo] + 1e-3 * spread * noise
        centres[todo] = F.normalize(moved, dim=-1) if metric == "cosine" else moved
        keep = torch.zeros(k, dtype=torch.bool, device=rows.device)
        keep[distinct_rows(centres)] = True
        todo = (~keep).nonzero().squeeze(1)
    return centres


def _randint(high: int, n: int, generator, device) -> torch.Tensor:
    dev = generator.device if generator is not None else device
    return torch.randint(0, high, (n,), generator=generator, device=dev).to(device)


def _kmeans_plus_plus(x: torch.Tensor, k: int, metric: str, generator) -> torch.Tensor:
    """k-means++ seeding over distinct rows x (M >= k, search space): k sequential O(M D) passes.

    The weight of a row is its distance to the nearest chosen centre (squared L2; 1 - cos under "cosine";
    squared L2 under "dot" too, for lack of a distance); a chosen row's weight is 0, so no row is drawn twice.
    """
    m = x.shape[0]
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    chosen[0] = int(_randint(m, 1, generator, x.device))
    weight = torch.full((m,), math.inf, dtype=x.dtype, device=x.device)
    sq = None if metric == "cosine" else torch.linalg.vector_norm(x, dim=-1).square()
    for i in range(1, k):
        c = x[chosen[i - 1]]
        if metric == "cosine":
            d = 1.0 - x @ c
        else:
            d = sq - 2.0 * (x @ c) + sq[chosen[i - 1]]
        torch.minimum(weight, d.clamp_min_(0.0), out=weight)
        weight[chosen[i - 1]] = 0.0
        total = float(weight.sum())
        if total > 0:
            u = torch.rand(1, generator=generator, dtype=torch.float64).item() * total
            pick = int(
                torch.searchsorted(
                    weight.double().cumsum(0),
                    torch.tensor([u], dtype=torch.float64, device=x.device),
                ).clamp_max(m - 1)
            )
            if float(weight[pick]) == 0.0:
                # rounding at the end of the cumsum: take the last row still weighted
                pick = int(weight.nonzero()[-1])
        else:  # every remaining distance rounds to 0: any unchosen row
            free = torch.ones(m, dtype=torch.bool, device=x.device)
            free[chosen[:i]] = False
            pick = int(free.nonzero()[0])
        chosen[i] = pick
    return x[chosen]


@torch.no_grad()
def codebook_health(
    codebook: torch.Tensor,
    metric: str,
    indices: torch.Tensor | None = None,
    *,
    rtol: float = 1e-4,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> dict[str, float]:
    """Duplicate and dead codes of a (K, D) codebook, with usage and perplexity of ``indices`` when given.

    Geometry: squared L2 between the codes in the metric's search space (unit codes under "cosine", where it
    is 2 x the cosine distance; raw codes under "l2" and "dot"). With ``nn_k`` the distance from code k to its
    nearest other code and ``tol = rtol x median_k nn_k`` (``rtol`` 1e-4 on squared distances: 1% of the
    typical Euclidean gap between neighbouring codes):

        duplicate_codes = #{k : some code j < k lies within tol of code k}

    so a group of mutually close codes (in particular exact copies) counts every member but its lowest index.
    The nearest codes are found with float32 scores (float64 codes: float64); the distances of the pairs
    found are recomputed as ``||e_k - e_j||^2`` (no cancellation), and exact copies (``torch.unique``) always
    count, whatever the median and the rounding.

    One chunked pass over the (K, K) score matrix, (rows x codes) blocks of at most ``max_block_bytes``:
    nothing K x K is held (K = 262,144 works; it costs K^2 D multiply-adds).

    Returns floats: codebook_size, duplicate_codes, nn_distance_median, duplicate_tolerance; with ``indices``
    (any shape, values in [0, K)) also used_codes, dead_codes (K - used: never assigned), usage (used / K)
    and perplexity (exp of the entropy of the code histogram).
    """
    check_metric(metric)
    if not (torch.is_tensor(codebook) and codebook.dim() == 2 and codebook.is_floating_point()):
        raise ValueError(f"codebook must be a floating (K, D) tensor, got {_describe(codebook)}")
    rtol = check_nonnegative(rtol, "rtol")
    codes = to_search_space(codebook.detach(), metric)
    k = codes.shape[0]
    stats: dict[str, float] = {"codebook_size": float(k)}
    if k >= 2:
        other, earlier = _nearest_other_and_earlier(codes, max_block_bytes)
        nn = (codes - codes[other]).square().sum(-1)  # exact squared distances of the chosen pairs
        has_earlier = earlier >= 0
        to_earlier = (codes - codes[earlier.clamp_min(0)]).square().sum(-1)
        median = float(nn.median())
        tol = rtol * median
        copy = torch.ones(k, dtype=torch.bool, device=codes.device)
        copy[distinct_rows(codes)] = False  # exact copies of a lower-index code, found exactly
        duplicates = int((copy | (has_earlier & (to_earlier <= tol))).sum())
    else:
        median, tol, duplicates = math.nan, math.nan, 0
    stats.update(
        duplicate_codes=float(duplicates), nn_distance_median=median, duplicate_tolerance=tol
    )
    if indices is not None:
        usage, perplexity = codebook_usage(indices, k)
        used = int(torch.bincount(indices.reshape(-1).long(), minlength=k).gt(0).sum())
        stats.update(
            used_codes=float(used), dead_codes=float(k - used), usage=usage, perplexity=perplexity
        )
    return stats


def _nearest_other_and_earlier(
    codes: torch.Tensor, max_block_bytes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For search-space codes (K, D): index of the nearest other code, and of the nearest code with a lower
    index (-1 for code 0), under squared L2; one pass over (rows x codes) score blocks."""
    k = codes.shape[0]
    dev = codes.device
    dtype = torch.float64 if codes.dtype == torch.float64 else torch.float32
    best = {
        name: torch.full((k,), -math.inf, dtype=dtype, device=dev) for name in ("other", "earlier")
    }
    index = {
        name: torch.full((k,), -1, dtype=torch.long, device=dev) for name in ("other", "earlier")
    }

    def merge(name: str, rows: slice, cols: slice, s: torch.Tensor) -> None:
        # running max over code blocks; earlier blocks win ties, as in nearest_codes
        top, arg = s.max(dim=1)
        take = top > best[name][rows]
        best[name][rows] = torch.where(take, top, best[name][rows])
        index[name][rows] = torch.where(take, arg + cols.start, index[name][rows])

    for rows, cols, s in code_blocks(codes, codes, "l2", max_block_bytes=max_block_bytes):
        if cols.start >= rows.stop:  # every code after every row: no earlier code, no diagonal
            merge("other", rows, cols, s)
        elif cols.stop <= rows.start:  # every code before every row
            merge("other", rows, cols, s)
            merge("earlier", rows, cols, s)
        else:  # the block crosses the diagonal
            r = torch.arange(rows.start, rows.stop, device=dev)[:, None]
            c = torch.arange(cols.start, cols.stop, device=dev)[None, :]
            merge("other", rows, cols, s.masked_fill(r == c, -math.inf))
            merge("earlier", rows, cols, s.masked_fill_(c >= r, -math.inf))
    return index["other"], index["earlier"]


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
