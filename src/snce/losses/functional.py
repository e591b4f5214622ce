"""Public SNCE loss functions: validate every argument, then run the chunked torch path.

``snce_loss(logits, target, codebook=..., tau=...)`` is the soft cross-entropy
``-sum_k q_k log softmax(logits)_k`` with ``q_k = softmax_k(-d(z, e_k) / tau)``; ``z`` is the token's latent,
or its code embedding ``codebook[target]`` when ``latents`` is None (pre-tokenized data).
``fused_linear_snce_loss(hidden, head_weight, target, ...)`` is the same loss of
``hidden @ head_weight.T + head_bias`` without ever holding the (N, K) logits.
Both take ``shuffle=NeighborShuffle(K, seed)`` for the shuffled-neighbour control: each token's q is moved
by its code's fixed permutation pi_y (pi_y(y) = y), q'(pi_y(k)) = q(k) (torch path only).

Leading batch dimensions are flattened: logits (..., K) with target (...); ``reduction="none"`` returns
target's shape. The loss is float32 (float64 for float64 inputs) whatever the input precision.
"""

from __future__ import annotations

import torch

from snce.losses import chunked
from snce.losses.chunked import Problem
from snce.losses.targets import (
    NeighborShuffle,
    NeighborTable,
    TeacherLogits,
    check_finite,
    check_tau,
    check_topk,
)
from snce.quantize.search import check_metric

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "torch", "triton")


def _describe(x) -> str:
    if torch.is_tensor(x):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"


def _check_float(x, name: str, shape_hint: str) -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a floating-point tensor {shape_hint}, got {_describe(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor {shape_hint}, got {_describe(x)}")


def _flatten_target(target, batch_shape: torch.Size, name_of_source: str) -> torch.Tensor:
    if not torch.is_tensor(target) or target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8,
                                                            torch.int8):
        raise TypeError(f"target must be an integer tensor of code indices, got {_describe(target)}")
    if target.shape != batch_shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match the {name_of_source} batch shape "
            f"{tuple(batch_shape)}"
        )
    return target.reshape(-1).long()


def _build_problem(
    target, num_codes, device, dtype, *, codebook, latents, tau, metric, topk, table, weight,
    ignore_index, reduction, memory_budget, block_rows, batch_shape, shuffle=None, smoothing=0.0, hard=False,
) -> Problem:
    """Validate everything (before any heavy work) and describe the targets of one call."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {_describe(ignore_index)}")
    invalid = (target != ignore_index) & ((target < 0) | (target >= num_codes))
    if bool(invalid.any()):
        bad = target[invalid][0].item()
        raise ValueError(
            f"target holds index {bad}, outside [0, {num_codes}) (the number of codes) and not "
            f"ignore_index={ignore_index}"
        )
    n = target.shape[0]
    if weight is not None:
        _check_float(weight, "weight", f"of shape {tuple(batch_shape)}")
        if weight.shape != batch_shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match target shape {tuple(batch_shape)}")
        weight = weight.reshape(-1)
        check_finite(weight, "weight")

    teacher = None
    if not hard:
        check_metric(metric)
        topk = check_topk(topk, num_codes)
        if table is not None:
            if not isinstance(table, NeighborTable):
                raise TypeError(f"table must be a snce.NeighborTable, got {_describe(table)}")
            if latents is not None:
                raise ValueError("table and latents are mutually exclusive: a NeighborTable holds the targets of "
                                 "pre-tokenized data (latents=None); pass one or the other")
            if topk is not None:
                raise ValueError(f"table and topk are mutually exclusive: the table already keeps its k={table.k} "
                                 "nearest codes")
            if table.num_codes != num_codes:
                raise ValueError(f"table was built for {table.num_codes} codes, but the logits have {num_codes}")
            if tau is not None and check_tau(tau) != table.tau:
                raise ValueError(f"tau={tau} differs from the table's tau={table.tau}; omit tau or rebuild the table")
            table = table.to(device)
        else:
            if tau is None:
                raise ValueError("tau is required (a float > 0; see snce.functional.suggest_tau)")
            tau = check_tau(tau)
            _check_float(codebook, "codebook", "of shape (K, D)")
            if codebook.dim() != 2 or codebook.shape[0] != num_codes:
                raise ValueError(
                    f"codebook must have shape (K={num_codes}, D) to match the logits, got {tuple(codebook.shape)}"
                )
            check_finite(codebook, "codebook")
            if latents is not None:
                _check_float(latents, "latents", f"of shape {tuple(batch_shape)} + (D,)")
                if latents.shape[:-1] != batch_shape or latents.shape[-1] != codebook.shape[1]:
                    raise ValueError(
                        f"latents must have shape {tuple(batch_shape) + (codebook.shape[1],)} (target shape + "
                        f"codebook dim), got {tuple(latents.shape)}"
                    )
                latents = latents.reshape(n, -1)
                check_finite(latents, "latents")
            teacher = TeacherLogits(codebook.to(device), None if latents is None else latents.to(device),
                                    tau, metric)
        if shuffle is not None:
            if not isinstance(shuffle, NeighborShuffle):
                raise TypeError(f"shuffle must be a snce.losses.NeighborShuffle or None, got {_describe(shuffle)}")
            if shuffle.num_codes != num_codes:
                raise ValueError(f"shuffle was built for {shuffle.num_codes} codes, but the logits have {num_codes}")
            shuffle = shuffle.to(device)

    problem = Problem(
        target=target,
        rows=(target != ignore_index).nonzero().view(-1),
        scale=chunked.mean_scale(target, weight, ignore_index, reduction, chunked.compute_dtype(dtype)),
        reduction=reduction,
        num_codes=num_codes,
        teacher=teacher,
        topk=topk,
        table=table,
        smoothing=smoothing,
        shuffle=shuffle,
    )
    problem.block_rows = chunked.block_rows_for(num_codes, memory_budget, block_rows, problem.dense_shuffle)
    return problem


def _check_logits(logits) -> None:
    _check_float(logits, "logits", "of shape (..., K)")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., K) with K >= 1, got {tuple(logits.shape)}")


def snce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    codebook: torch.Tensor | None = None,
    latents: torch.Tensor | None = None,
    tau: float | None = None,
    metric: str = "l2",
    topk: int | None = None,
    table: NeighborTable | None = None,
    shuffle: NeighborShuffle | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    memory_budget: int | None = None,
    block_rows: int | None = None,
) -> torch.Tensor:
    """SNCE from logits (..., K) and target codes (...).

    Args:
        codebook: (K, D) code embeddings in the tokenizer's assignment geometry (``quantizer.codebook``).
        latents: (..., D) continuous latents; None uses codebook[target] (pre-tokenized data).
        tau: temperature > 0. metric: "l2" (squared L2) | "cosine" (1 - cos) | "dot" (negative dot product).
        topk: keep the k nearest codes of each token, renormalised. table: a NeighborTable instead of
            on-the-fly targets (latents=None only; codebook, tau, metric and topk then come from the table).
        shuffle: a NeighborShuffle of the K codes: the shuffled-neighbour control, q'(pi_y(k)) = q(k) for a
            token of code y (same mass on y, same entropy, no geometry). Works with topk and table.
        weight: (...) per-token weights. ignore_index: target value whose tokens contribute nothing.
        reduction: "mean" (sum of weighted losses / number of non-ignored tokens) | "sum" | "none".
        memory_budget / block_rows: size of the per-block (n, K) buffers (default 256 MiB).
    Memory: O(block_rows x K) beyond the inputs and the logits' gradient (a dense shuffle adds one
    cache-sized row group, taken from ``memory_budget``).
    """
    _check_logits(logits)
    k = logits.shape[-1]
    target = _flatten_target(target, logits.shape[:-1], "logits")
    problem = _build_problem(
        target, k, logits.device, logits.dtype, codebook=codebook, latents=latents, tau=tau, metric=metric,
        topk=topk, table=table, weight=weight, ignore_index=ignore_index, reduction=reduction,
        memory_budget=memory_budget, block_rows=block_rows, batch_shape=logits.shape[:-1], shuffle=shuffle,
    )
    loss = chunked._SoftCrossEntropy.apply(logits.reshape(-1, k), problem)
    return loss.view(logits.shape[:-1]) if reduction == "none" else loss


def _check_head(hidden, head_weight, head_bias) -> None:
    _check_float(hidden, "hidden", "of shape (..., H)")
    _check_float(head_weight, "head_weight", "of shape (K, H)")
    if head_weight.dim() != 2 or hidden.shape[-1] != head_weight.shape[1]:
        raise ValueError(
            f"head_weight must have shape (K, H={hidden.shape[-1]}) to match hidden {tuple(hidden.shape)}, "
            f"got {tuple(head_weight.shape)}"
        )
    if hidden.dtype != head_weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and head_weight ({head_weight.dtype}) must share a dtype")
    if head_bias is not None:
        _check_float(head_bias, "head_bias", f"of shape ({head_weight.shape[0]},)")
        if head_bias.shape != head_weight.shape[:1]:
            raise ValueError(f"head_bias must have shape ({head_weight.shape[0]},), got {tuple(head_bias.shape)}")


def _fused(hidden, head_weight, head_bias, problem: Problem) -> torch.Tensor:
    """Run the fused head + loss on flattened tokens; reduction "none" gets hidden's batch shape back."""
    loss = chunked._FusedLinearSoftCrossEntropy.apply(
        hidden.reshape(-1, head_weight.shape[1]), head_weight, head_bias, problem
    )
    return loss.view(hidden.shape[:-1]) if problem.reduction == "none" else loss


def fused_linear_snce_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    target: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    *,
    codebook: torch.Tensor | None = None,
    latents: torch.Tensor | None = None,
    tau: float | None = None,
    metric: str = "l2",
    topk: int | None = None,
    table: NeighborTable | None = None,
    shuffle: NeighborShuffle | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    memory_budget: int | None = None,
    block_rows: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """``snce_loss(hidden @ head_weight.T + head_bias, target, ...)`` without the (N, K) logits.

    hidden: (..., H), head_weight: (K, H), head_bias: (K,) or None; other arguments as :func:`snce_loss`.
    Gradients flow to hidden, head_weight and head_bias. Peak extra memory O(block_rows x K + N x H)
    plus the head weight's gradient.
    impl: "auto" (Triton kernels for CUDA tensors once they are verified on a GPU, when Triton is installed and
    none of ``topk``, ``table`` and ``shuffle`` is used; else torch), "torch" (the chunked torch path) or
    "triton" (force the kernels; on CUDA a one-time warning while they are unverified).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton" and shuffle is not None:
        raise ValueError("shuffle (the shuffled-neighbour control) is not supported by the Triton kernels; "
                         "use impl='torch' (impl='auto' falls back to it)")
    from snce.losses import kernels  # light: Triton itself is imported only when a kernel is used

    if impl == "triton" or (
        impl == "auto"
        and kernels.supports(hidden, head_weight, codebook, latents, topk=topk, table=table, shuffle=shuffle)
    ):
        kernels.warn_unverified(hidden)
        return kernels.fused_linear_snce_loss_triton(
            hidden, head_weight, target, head_bias, codebook=codebook, latents=latents, tau=tau, metric=metric,
            topk=topk, table=table, weight=weight, ignore_index=ignore_index, reduction=reduction,
        )
    _check_head(hidden, head_weight, head_bias)
    k = head_weight.shape[0]
    target = _flatten_target(target, hidden.shape[:-1], "hidden")
    problem = _build_problem(
        target, k, hidden.device, hidden.dtype, codebook=codebook, latents=latents, tau=tau, metric=metric,
        topk=topk, table=table, weight=weight, ignore_index=ignore_index, reduction=reduction,
        memory_budget=memory_budget, block_rows=block_rows, batch_shape=hidden.shape[:-1], shuffle=shuffle,
    )
    return _fused(hidden, head_weight, head_bias, problem)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    target: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    memory_budget: int | None = None,
    block_rows: int | None = None,
) -> torch.Tensor:
    """Hard-label cross-entropy (optionally label-smoothed) of ``hidden @ head_weight.T + head_bias``,
    chunked like :func:`fused_linear_snce_loss`; equals ``F.cross_entropy(logits, target,
    label_smoothing=...)`` with per-token weights and the same "mean" convention."""
    _check_head(hidden, head_weight, head_bias)
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    k = head_weight.shape[0]
    target = _flatten_target(target, hidden.shape[:-1], "hidden")
    problem = _build_problem(
        target, k, hidden.device, hidden.dtype, codebook=None, latents=None, tau=None, metric=None,
        topk=None, table=None, weight=weight, ignore_index=ignore_index, reduction=reduction,
        memory_budget=memory_budget, block_rows=block_rows, batch_shape=hidden.shape[:-1],
        smoothing=float(label_smoothing), hard=True,
    )
    return _fused(hidden, head_weight, head_bias, problem)
