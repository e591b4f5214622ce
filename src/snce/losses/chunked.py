"""Memory-efficient SNCE and cross-entropy in plain torch (CPU and CUDA alike).

Shapes: N tokens, K codes, H hidden size, D code dimension.

Per token i with student logits s and soft target q:

    loss_i = logsumexp(s) - sum_k q_k s_k          (= -sum_k q_k log softmax(s)_k)
    dloss_i / ds = softmax(s) - q

Tokens are processed in row blocks of ``n`` rows; a block holds its (n, K) student logits and, for dense
targets, its (n, K) teacher logits, so the peak extra memory is ~2 x n x K x 4 bytes (``memory_budget``,
256 MiB by default), never the (N, K) logits or targets. For ``reduction="mean"|"sum"`` the gradient is
formed in the forward pass (as Liger-Kernel does), so the backward is a scalar multiply and no matmul is
recomputed; ``reduction="none"`` needs the upstream per-token gradient first, so the fused path re-runs its
blocks in the backward. Elementwise work runs on sub-blocks of ``n`` that stay in the CPU's cache.

With a :class:`~snce.losses.targets.NeighborShuffle` (the shuffled-neighbour control) a dense teacher block is
moved column-wise, t'[i, pi_{y_i}(k)] = t[i, k], before its softmax (softmax commutes with permutations), in
row groups of at most ``CACHE_BLOCK_BYTES``: each group holds two (g, K) int64 index tensors and a (g, K)
scratch copy. That group is taken out of the memory budget. Sparse targets (top-k, NeighborTable) only have
their (n, k) indices moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snce.losses.targets import NeighborShuffle, TeacherLogits

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes for the per-block (n, K) buffers
CACHE_BLOCK_BYTES = 16 * 2**20  # elementwise sub-blocks (2 row buffers) stay in the last-level cache
SHUFFLE_BYTES_PER_CODE = 24  # a dense shuffle group row: int64 labels, int64 destinations, float64 scratch


@dataclass
class Problem:
    """Everything about the targets of one loss call, validated and flattened.

    target: (N,) long. rows: (M,) long indices of non-ignored tokens. scale: (N,) per-token factor of the
    reduction (weight / #non-ignored for "mean", weight otherwise). Exactly one target kind is set:
    ``teacher`` (dense q, optionally ``topk``), ``table`` (NeighborTable), or hard labels (CE, with
    ``smoothing``). ``shuffle`` (soft targets only) moves each token's target by its code's permutation.
    """

    target: torch.Tensor
    rows: torch.Tensor
    scale: torch.Tensor
    reduction: str
    num_codes: int
    teacher: TeacherLogits | None = None
    topk: int | None = None
    table: object | None = None
    smoothing: float = 0.0
    shuffle: NeighborShuffle | None = None
    block_rows: int = 256

    def blocks(self):
        for start in range(0, self.rows.numel(), self.block_rows):
            yield self.rows[start : start + self.block_rows]

    def block_buffer(self, dtype: torch.dtype, device) -> torch.Tensor:
        """One reusable (block_rows, K) buffer: reusing it avoids page-faulting fresh memory every block."""
        return torch.empty(min(self.block_rows, max(1, self.rows.numel())), self.num_codes, dtype=dtype,
                           device=device)

    @property
    def dense_shuffle(self) -> bool:
        return self.shuffle is not None and self.teacher is not None and self.topk is None

    def target_buffers(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Reusable buffers of the dense targets: (block_rows, K) teacher logits and, for a dense shuffle, a
        (g, K) scratch row group; None where not needed."""
        if self.teacher is None:
            return None, None
        t_buf = self.block_buffer(self.teacher.dtype, self.target.device)
        if not self.dense_shuffle:
            return t_buf, None
        rows = max(1, min(t_buf.shape[0], CACHE_BLOCK_BYTES // (SHUFFLE_BYTES_PER_CODE * self.num_codes)))
        return t_buf, torch.empty_like(t_buf[:rows])

    def block_targets(self, rows: torch.Tensor, buffers: tuple[torch.Tensor | None, torch.Tensor | None]):
        """-> (dense teacher logits (n, K) or None, sparse indices (n, k) or None, sparse probs (n, k)).

        buffers: from :meth:`target_buffers`; the teacher buffer is overwritten with this block's logits."""
        if self.teacher is not None:
            t_buf, scratch = buffers
            t = self.teacher.block(rows, self.target, out=t_buf[: rows.numel()])
            if self.topk is None:
                if self.shuffle is not None:
                    shuffle_columns_(t, self.target[rows], self.shuffle, scratch)
                return t, None, None
            vals, idx = t.topk(self.topk, dim=1)
            probs = vals.softmax(dim=1)
        elif self.table is not None:
            idx, probs = self.table.lookup(self.target[rows])
        else:
            idx = self.target[rows, None]
            return None, idx, torch.ones(idx.shape, dtype=torch.float32, device=idx.device)
        if self.shuffle is not None:
            idx = self.shuffle.permute(idx, self.target[rows])  # (n, k): same probs, moved codes
        return None, idx, probs


def shuffle_columns_(t: torch.Tensor, target: torch.Tensor, shuffle: NeighborShuffle, scratch: torch.Tensor):
    """Dense teacher logits t (n, K) of tokens with codes target (n,) -> t[i, pi_{y_i}(k)] = t[i, k], in place.

    Row groups of scratch's (g, K) rows: a scatter into scratch with index pi_{y_i}(k), then a copy back."""
    every_code = torch.arange(t.shape[1], device=t.device)[None]  # (1, K), shared by the rows
    for a in range(0, t.shape[0], scratch.shape[0]):
        tb = t[a : a + scratch.shape[0]]  # (g, K)
        dest = shuffle.permute(every_code, target[a : a + tb.shape[0]])  # (g, K): column k goes to pi(k)
        tb.copy_(scratch[: tb.shape[0]].scatter_(1, dest, tb))


def block_rows_for(
    num_codes: int, memory_budget: int | None, block_rows: int | None, dense_shuffle: bool = False
) -> int:
    """Rows per block: ``block_rows`` if given, else what fits two float32 (n, K) buffers (student and
    teacher logits) in the budget, less a ``CACHE_BLOCK_BYTES`` shuffle group for a dense shuffle."""
    if block_rows is not None:
        if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
            raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
        return block_rows
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    reserved = CACHE_BLOCK_BYTES if dense_shuffle else 0
    return max(1, (budget - reserved) // (2 * 4 * num_codes))


def soft_ce_block(s, t, idx, probs, smoothing, want_grad) -> torch.Tensor:
    """Soft cross-entropy of one row block, in place.

    s: (n, K) student logits (float32/64, overwritten). Target q is either dense: t (n, K) teacher logits
    (overwritten by q = softmax(t)); or sparse: (1 - smoothing) * sum_j probs_j onehot(idx_j) + smoothing / K.
    Returns loss (n,); if ``want_grad``, s then holds the unscaled gradient softmax(s) - q.

    Two exponential passes in all (torch's fused softmax kernel, in place, on t and on s). The student's
    log-normaliser comes for free from p = softmax(s): at the row's argmax p_max = 1 / sum_k exp(s_k - max),
    so logsumexp(s) = max(s) - log(p_max). Sub-blocks stay in the last-level cache.
    """
    n, num_codes = s.shape
    sub = max(1, min(n, CACHE_BLOCK_BYTES // (2 * num_codes * s.element_size())))
    loss = s.new_empty(n)
    for a in range(0, n, sub):
        b = min(n, a + sub)
        sb = s[a:b]
        s_max = sb.amax(dim=1)
        if t is not None:
            tb = t[a:b]
            torch.ops.aten._softmax.out(tb, 1, False, out=tb)  # q, in place (row-wise kernel)
            target_term = torch.linalg.vecdot(tb, sb)  # sum_k q_k s_k (10x a 1 x K bmm on CPU)
        else:
            ib, pb = idx[a:b], probs[a:b].to(s.dtype)
            target_term = (pb * sb.gather(1, ib)).sum(dim=1)
            if smoothing:
                target_term = (1 - smoothing) * target_term + smoothing * sb.mean(dim=1)
        torch.ops.aten._softmax.out(sb, 1, False, out=sb)  # p, in place
        loss[a:b] = s_max - sb.amax(dim=1).log() - target_term  # logsumexp(s) - sum_k q_k s_k
        if want_grad:
            if t is not None:
                sb.sub_(tb)
            else:
                sb.scatter_add_(1, ib, pb * -(1 - smoothing))
                if smoothing:
                    sb.sub_(smoothing / num_codes)
    return loss


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_rows(loss_rows: torch.Tensor, problem: Problem) -> torch.Tensor:
    """Per-token losses (N,) -> the requested reduction (scale already holds weights and 1/count)."""
    weighted = loss_rows * problem.scale.to(loss_rows.dtype)
    return weighted if problem.reduction == "none" else weighted.sum()


def logits_pass(logits: torch.Tensor, problem: Problem, want_grad: bool):
    """Loss rows (N,) and, if ``want_grad``, the (N, K) gradient scale * (softmax - q)."""
    dt = compute_dtype(logits.dtype)
    loss_rows = torch.zeros(logits.shape[0], dtype=dt, device=logits.device)
    grad = torch.zeros_like(logits) if want_grad else None
    s_buf, t_bufs = problem.block_buffer(dt, logits.device), problem.target_buffers()
    for rows in problem.blocks():
        s = s_buf[: rows.numel()]
        s.copy_(logits[rows])
        t, idx, probs = problem.block_targets(rows, t_bufs)
        loss_rows[rows] = soft_ce_block(s, t, idx, probs, problem.smoothing, want_grad)
        if want_grad:
            grad.index_copy_(0, rows, s.mul_(problem.scale[rows, None].to(dt)).to(grad.dtype))
    return loss_rows, grad


def linear_pass(hidden, weight, bias, problem: Problem, scale: torch.Tensor, needs_grad):
    """Fused head + loss over row blocks. needs_grad: (hidden, weight, bias) booleans.

    Returns loss rows (N,) and gradients (grad_hidden, grad_weight, grad_bias), each None when not needed,
    with the per-token factor ``scale`` (N,) applied.
    """
    dt = compute_dtype(hidden.dtype)
    want_grad = any(needs_grad)
    acc = compute_dtype(weight.dtype)  # low-precision weights accumulate their gradient in float32
    loss_rows = torch.zeros(hidden.shape[0], dtype=dt, device=hidden.device)
    grad_h = torch.zeros_like(hidden) if needs_grad[0] else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_grad[1] else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if needs_grad[2] else None
    s_buf, t_bufs = problem.block_buffer(dt, hidden.device), problem.target_buffers()
    for rows in problem.blocks():
        h = hidden[rows]  # (n, H)
        if weight.dtype == dt:  # float32/64: the logits go straight into the reused block buffer
            out = s_buf[: rows.numel()]
            s = torch.mm(h, weight.T, out=out) if bias is None else torch.addmm(bias, h, weight.T, out=out)
        else:  # low precision: matmul in the input dtype, softmax work in float32
            s = (h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)).to(dt)
        t, idx, probs = problem.block_targets(rows, t_bufs)
        loss_rows[rows] = soft_ce_block(s, t, idx, probs, problem.smoothing, want_grad)
        if not want_grad:
            continue
        # s = softmax - q (unscaled); the per-token factor c is applied on the (n, H) side, not on (n, K).
        c = scale[rows, None].to(dt)  # (n, 1)
        if grad_h is not None:
            grad_h[rows] = (c * (s.to(weight.dtype) @ weight)).to(grad_h.dtype)
        if grad_w is not None:
            grad_w.addmm_(s.T, (c * h).to(acc))
        if grad_b is not None:
            grad_b.addmv_(s.T, c[:, 0].to(acc))
    cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
    return loss_rows, (grad_h, cast(grad_w, weight), cast(grad_b, bias) if bias is not None else None)


class _SoftCrossEntropy(torch.autograd.Function):
    """Loss from given logits; the (N, K) gradient is formed in the forward."""

    @staticmethod
    def forward(ctx, logits, problem: Problem):
        loss_rows, grad = logits_pass(logits, problem, want_grad=ctx.needs_input_grad[0])
        ctx.reduction = problem.reduction
        ctx.save_for_backward(grad)
        return reduce_rows(loss_rows, problem)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            return grad * grad_out[:, None].to(grad.dtype), None
        return scaled(grad, grad_out), None


class _FusedLinearSoftCrossEntropy(torch.autograd.Function):
    """Loss from hidden states and the output head without the (N, K) logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, problem: Problem):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ctx.problem = problem
        if problem.reduction == "none":
            # The per-token upstream gradient is unknown until backward: recompute there.
            loss_rows, _ = linear_pass(hidden, weight, bias, problem, problem.scale, (False,) * 3)
            ctx.save_for_backward(hidden, weight, bias)
            ctx.needs = needs
        else:
            loss_rows, grads = linear_pass(hidden, weight, bias, problem, problem.scale, needs)
            ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
            ctx.has = [g is not None for g in grads]
        return reduce_rows(loss_rows, problem)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.problem.reduction == "none":
            hidden, weight, bias = ctx.saved_tensors
            scale = ctx.problem.scale * grad_out.to(ctx.problem.scale.dtype)
            _, grads = linear_pass(hidden, weight, bias, ctx.problem, scale, ctx.needs)
            return (*grads, None)
        grads = [scaled(g, grad_out) if has else None for g, has in zip(ctx.saved_tensors, ctx.has, strict=True)]
        return (*grads, None)


def scaled(grad: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """grad * grad_out for a scalar upstream gradient, without a copy in the usual case grad_out == 1."""
    if torch.equal(grad_out, torch.ones_like(grad_out)):
        return grad
    return grad * grad_out.to(grad.dtype)


def mean_scale(target, weight, ignore_index, reduction, dtype) -> torch.Tensor:
    """(N,) per-token reduction factor: weight (or 1), zero on ignored tokens, / #non-ignored for "mean"."""
    valid = target != ignore_index
    scale = valid.to(dtype) if weight is None else torch.where(valid, weight.to(dtype), 0.0)
    if reduction == "mean":
        scale = scale / valid.sum().clamp_min(1)
    return scale


__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "Problem",
    "block_rows_for",
    "soft_ce_block",
    "logits_pass",
    "linear_pass",
    "mean_scale",
]
