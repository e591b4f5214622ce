"""Triton fused linear SNCE: loss and gradients without the (N, K) logits, soft targets or their gradient.

For token n with student logits l_nk = x_n.W_k + b_k and teacher logits t_nk = s_k(z_n) / tau (scores of
:mod:`snce.quantize.search`; q = softmax(t)):

    loss_n = lse_k(l_nk) - sum_k q_nk l_nk,        d loss_n / d l_nk = p_nk - q_nk    (p = softmax(l))

Forward: each program owns a block of tokens and a run of code tiles (a "split"). Per (tokens x codes) tile it
computes l (x @ W^T, float32 accumulation) and t (z @ E^T), and updates three running sums with online
rescaling: lse(l), lse(t) and the target term sum_k exp(t_k - max t) l_k. Only per-(split, token) partials are
written, then merged in torch: O(splits x N) memory.

Backward: tiles recompute l and t from the saved per-token lse(l), lse(t) and form dl = g_n (p - q)
(g_n: the upstream gradient of token n). Two ways to turn dl into gradients (``KernelConfig.backward``):

* "gemm" (default): for one chunk of codes at a time, a kernel writes dl (N, chunk) in the input dtype, then
  cuBLAS computes grad_hidden += dl @ W_chunk (float32) and grad_weight[chunk] = dl^T @ x. Extra memory:
  the chunk (``chunk_bytes``, 256 MiB) + float32 grad_hidden (N x H); no atomics, deterministic.
* "atomic": each tile adds dl @ W_tile, dl^T @ x_tile and sum_n dl into float32 gradient buffers with
  atomics (as Cut Cross-Entropy does); ``filter_eps > 0`` skips tiles where every p and q is below it
  (gradient filtering; off by default). Extra memory: float32 buffers N x H + K x H + K.

FLOPs either way: forward 2NKH + 2NKD, backward 6NKH + 2NKD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from snce.losses.chunked import mean_scale
from snce.losses.kernels import KERNEL_DTYPES, interpreting
from snce.losses.kernels.tiles import (
    PRECISIONS,
    code_splits,
    code_terms,
    dot_block,
    row_scales,
    student_precision,
    student_tile,
    teacher_precision,
    teacher_tile,
)
from snce.losses.targets import check_finite, check_tau
from snce.quantize.search import check_metric

BACKWARDS = ("gemm", "atomic")


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options (fixed defaults; benchmarks may sweep them).

    block_n x block_k is the (tokens x codes) tile; block_h / block_d bound the contraction chunks over H / D.
    backward: "gemm" (a Triton kernel writes d loss / d logits for chunks of ``chunk_bytes`` and cuBLAS does
        the two gradient matmuls) or "atomic" (each tile adds its gradients with float32 atomics, CCE-style).
    filter_eps: "atomic" only: skip tiles where all p and q are < filter_eps (gradient filtering; 0 = exact).
    teacher_precision: the teacher matmul's precision, see :func:`tiles.teacher_precision`: "auto" ("native"
        for bf16/fp16 latents and codebook, else "ieee" when the student is float32 and "tf32" otherwise),
        "native", "ieee", "tf32" or "tf32x3".
    """

    block_n: int = 64
    block_k: int = 128
    block_h: int = 64
    block_d: int = 64
    group_n: int = 8  # backward tile order: sweep group_n token blocks per code block (L2 reuse)
    num_warps: int = 8
    num_stages: int = 3
    backward: str = "gemm"
    chunk_bytes: int = 256 * 2**20
    filter_eps: float = 0.0
    teacher_precision: str = "auto"

    def __post_init__(self):
        for name in ("block_n", "block_k", "block_h", "block_d"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 16 and v & (v - 1) == 0):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {v!r}")
        if self.backward not in BACKWARDS:
            raise ValueError(f"KernelConfig.backward must be one of {BACKWARDS}, got {self.backward!r}")
        if not 0.0 <= self.filter_eps < 1.0:
            raise ValueError(f"KernelConfig.filter_eps must be in [0, 1), got {self.filter_eps!r}")
        if self.filter_eps > 0 and self.backward != "atomic":
            raise ValueError("KernelConfig.filter_eps > 0 needs backward='atomic' (the gemm backward always "
                             f"computes every tile), got backward={self.backward!r}")
        if self.teacher_precision not in ("auto", "native", *PRECISIONS):
            raise ValueError(f"KernelConfig.teacher_precision must be 'auto', 'native' or one of {PRECISIONS}, "
                             f"got {self.teacher_precision!r}")


@triton.jit
def _load_rows(target_ptr, rows, row_mask, ignore_index, Z_FROM_CODES: tl.constexpr):
    """Per-row validity and the row of z: the token itself, or its target code when latents is None."""
    tgt = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (tgt != ignore_index)
    if Z_FROM_CODES:
        z_rows = tl.where(valid, tgt, 0).to(tl.int64)
    else:
        z_rows = rows
    return valid, z_rows


@triton.jit
def _linear_snce_fwd_kernel(
    x_ptr, w_ptr, b_ptr, z_ptr, e_ptr, target_ptr, row_scale_ptr, code_term_ptr,
    lse_l_ptr, lse_t_ptr, qdotl_ptr,
    N, K, H, D, inv_tau, ignore_index, blocks_per_split,
    HAS_BIAS: tl.constexpr, Z_FROM_CODES: tl.constexpr, METRIC: tl.constexpr,
    STUDENT_PRECISION: tl.constexpr, TEACHER_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    _, z_rows = _load_rows(target_ptr, rows, row_mask, ignore_index, Z_FROM_CODES)
    row_scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=1.0)

    m_l = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max of student logits
    s_l = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(l - m_l)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max of teacher logits
    s_t = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(t - m_t)
    a_t = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(t - m_t) * l
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(K, BLOCK_K))
    for kb in range(first, last):
        codes = (kb * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        code_mask = codes < K
        code_term = tl.load(code_term_ptr + codes, mask=code_mask, other=0.0)
        l = student_tile(x_ptr, w_ptr, b_ptr, rows, row_mask, codes, code_mask, H,
                         HAS_BIAS, STUDENT_PRECISION, BLOCK_N, BLOCK_K, BLOCK_H)
        t = teacher_tile(z_ptr, z_rows, row_mask, row_scale, e_ptr, codes, code_mask, code_term, D,
                         METRIC, TEACHER_PRECISION, BLOCK_N, BLOCK_K, BLOCK_D) * inv_tau
        l_or_0 = tl.where(code_mask[None, :], l, 0.0)
        l = tl.where(code_mask[None, :], l, float("-inf"))
        t = tl.where(code_mask[None, :], t, float("-inf"))

        m_new = tl.maximum(m_l, tl.max(l, axis=1))
        s_l = s_l * tl.exp(m_l - m_new) + tl.sum(tl.exp(l - m_new[:, None]), axis=1)
        m_l = m_new
        m_new = tl.maximum(m_t, tl.max(t, axis=1))
        alpha = tl.exp(m_t - m_new)
        e_t = tl.exp(t - m_new[:, None])
        s_t = s_t * alpha + tl.sum(e_t, axis=1)
        a_t = a_t * alpha + tl.sum(e_t * l_or_0, axis=1)
        m_t = m_new

    out = split * N + rows
    tl.store(lse_l_ptr + out, m_l + tl.log(s_l), mask=row_mask)
    tl.store(lse_t_ptr + out, m_t + tl.log(s_t), mask=row_mask)
    tl.store(qdotl_ptr + out, a_t / s_t, mask=row_mask)  # sum_k q_k l_k within this split


@triton.jit
def _row_block(
    rows, N, target_ptr, row_scale_ptr, lse_l_ptr, lse_t_ptr, grad_row_ptr, ignore_index, Z_FROM_CODES: tl.constexpr
):
    """Per-row inputs of the backward: mask, z rows, cosine scale, g (upstream grad, 0 if ignored), both lse."""
    row_mask = rows < N
    valid, z_rows = _load_rows(target_ptr, rows, row_mask, ignore_index, Z_FROM_CODES)
    row_scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=1.0)
    g = tl.where(valid, tl.load(grad_row_ptr + rows, mask=row_mask, other=0.0), 0.0)
    lse_l = tl.load(lse_l_ptr + rows, mask=row_mask, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=row_mask, other=0.0)
    return row_mask, z_rows, row_scale, g, lse_l, lse_t


@triton.jit
def _dlogits_tile(
    x_ptr, w_ptr, b_ptr, z_ptr, e_ptr, code_term_ptr,
    rows, row_mask, z_rows, row_scale, g, lse_l, lse_t, codes, K, H, D, inv_tau,
    HAS_BIAS: tl.constexpr, METRIC: tl.constexpr,
    STUDENT_PRECISION: tl.constexpr, TEACHER_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Recompute one tile: (BLOCK_N, BLOCK_K) float32 d loss / d logits = g_n (p - q), and max(p, q) over it."""
    code_mask = codes < K
    code_term = tl.load(code_term_ptr + codes, mask=code_mask, other=0.0)
    l = student_tile(x_ptr, w_ptr, b_ptr, rows, row_mask, codes, code_mask, H,
                     HAS_BIAS, STUDENT_PRECISION, BLOCK_N, BLOCK_K, BLOCK_H)
    t = teacher_tile(z_ptr, z_rows, row_mask, row_scale, e_ptr, codes, code_mask, code_term, D,
                     METRIC, TEACHER_PRECISION, BLOCK_N, BLOCK_K, BLOCK_D) * inv_tau
    tile_mask = row_mask[:, None] & code_mask[None, :]
    p = tl.where(tile_mask, tl.exp(l - lse_l[:, None]), 0.0)
    q = tl.where(tile_mask, tl.exp(t - lse_t[:, None]), 0.0)
    return g[:, None] * (p - q), tl.max(tl.maximum(p, q))


@triton.jit
def _grouped_tile(pid, n_row_blocks, n_code_blocks, GROUP_N: tl.constexpr):
    """Tile order: consecutive programs sweep GROUP_N row blocks over one code block (W and x tiles stay in L2)."""
    per_group = GROUP_N * n_code_blocks
    group_first = (pid // per_group) * GROUP_N
    group_size = tl.minimum(n_row_blocks - group_first, GROUP_N)
    return group_first + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _dlogits_kernel(
    x_ptr, w_ptr, b_ptr, z_ptr, e_ptr, target_ptr, row_scale_ptr, code_term_ptr,
    lse_l_ptr, lse_t_ptr, grad_row_ptr, dl_ptr,
    N, K, H, D, inv_tau, ignore_index, code_start, chunk_codes, dl_stride,
    HAS_BIAS: tl.constexpr, Z_FROM_CODES: tl.constexpr, METRIC: tl.constexpr,
    STUDENT_PRECISION: tl.constexpr, TEACHER_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """Write d loss / d logits of codes [code_start, code_start + chunk_codes) into dl (N, chunk), x's dtype."""
    pid_n, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(chunk_codes, BLOCK_K), GROUP_N)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)  # within the chunk
    row_mask, z_rows, row_scale, g, lse_l, lse_t = _row_block(
        rows, N, target_ptr, row_scale_ptr, lse_l_ptr, lse_t_ptr, grad_row_ptr, ignore_index, Z_FROM_CODES
    )
    col_mask = cols < chunk_codes
    dl, _ = _dlogits_tile(x_ptr, w_ptr, b_ptr, z_ptr, e_ptr, code_term_ptr,
                          rows, row_mask, z_rows, row_scale, g, lse_l, lse_t,
                          tl.where(col_mask, code_start + cols, K), K, H, D, inv_tau,
                          HAS_BIAS, METRIC, STUDENT_PRECISION, TEACHER_PRECISION, BLOCK_N, BLOCK_K, BLOCK_H, BLOCK_D)
    tl.store(dl_ptr + rows[:, None] * dl_stride + cols[None, :], dl.to(dl_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _atomic_backward_kernel(
    x_ptr, w_ptr, b_ptr, z_ptr, e_ptr, target_ptr, row_scale_ptr, code_term_ptr,
    lse_l_ptr, lse_t_ptr, grad_row_ptr, dx_ptr, dw_ptr, db_ptr,
    N, K, H, D, inv_tau, ignore_index, filter_eps,
    HAS_BIAS: tl.constexpr, Z_FROM_CODES: tl.constexpr, METRIC: tl.constexpr,
    STUDENT_PRECISION: tl.constexpr, TEACHER_PRECISION: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """One tile: add dl @ W_tile to grad hidden, dl^T @ x_tile to grad weight, sum_n dl to grad bias (float32)."""
    pid_n, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_N)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    codes = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    row_mask, z_rows, row_scale, g, lse_l, lse_t = _row_block(
        rows, N, target_ptr, row_scale_ptr, lse_l_ptr, lse_t_ptr, grad_row_ptr, ignore_index, Z_FROM_CODES
    )
    if tl.max(tl.abs(g)) == 0.0:  # all ignored or zero upstream gradient: nothing to add
        return
    dl, pq_max = _dlogits_tile(x_ptr, w_ptr, b_ptr, z_ptr, e_ptr, code_term_ptr,
                               rows, row_mask, z_rows, row_scale, g, lse_l, lse_t, codes, K, H, D, inv_tau,
                               HAS_BIAS, METRIC, STUDENT_PRECISION, TEACHER_PRECISION,
                               BLOCK_N, BLOCK_K, BLOCK_H, BLOCK_D)
    if pq_max < filter_eps:  # gradient filtering (never true for filter_eps = 0)
        return
    code_mask = codes < K
    dl_in = dl.to(x_ptr.dtype.element_ty)
    if COMPUTE_DB:
        tl.atomic_add(db_ptr + codes, tl.sum(dl, axis=0), mask=code_mask, sem="relaxed")
    if COMPUTE_DX or COMPUTE_DW:
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_mask = hs < H
            if COMPUTE_DX:
                w = tl.load(w_ptr + codes[:, None] * H + hs[None, :], mask=code_mask[:, None] & h_mask[None, :],
                            other=0.0)
                dx = tl.dot(dl_in, w, input_precision=STUDENT_PRECISION)  # (BLOCK_N, BLOCK_H)
                tl.atomic_add(dx_ptr + rows[:, None] * H + hs[None, :], dx,
                              mask=row_mask[:, None] & h_mask[None, :], sem="relaxed")
            if COMPUTE_DW:
                x = tl.load(x_ptr + rows[:, None] * H + hs[None, :], mask=row_mask[:, None] & h_mask[None, :],
                            other=0.0)
                dw = tl.dot(tl.trans(dl_in), x, input_precision=STUDENT_PRECISION)  # (BLOCK_K, BLOCK_H)
                tl.atomic_add(dw_ptr + codes[:, None] * H + hs[None, :], dw,
                              mask=code_mask[:, None] & h_mask[None, :], sem="relaxed")


class LinearSNCEFunction(torch.autograd.Function):
    """Per-token SNCE loss (N,) float32 of the linear head; zero for ignored tokens. Weights and reduction
    are applied outside (plain torch on (N,) tensors), so the backward receives one coefficient per token."""

    @staticmethod
    def forward(ctx, hidden, head_weight, head_bias, target, codebook, latents, tau, metric, ignore_index, config):
        n, h = hidden.shape
        n_codes, d = codebook.shape
        terms = code_terms(codebook, metric)
        scales = row_scales(latents, target, terms, metric)
        z = codebook if latents is None else latents
        n_row_blocks, n_code_blocks = triton.cdiv(n, config.block_n), triton.cdiv(n_codes, config.block_k)
        splits, per_split = code_splits(n_row_blocks, n_code_blocks, hidden.device)
        parts = torch.empty(3, splits, n, dtype=torch.float32, device=hidden.device)  # lse_l, lse_t, q.l
        meta = dict(
            HAS_BIAS=head_bias is not None, Z_FROM_CODES=latents is None, METRIC=metric,
            STUDENT_PRECISION=student_precision(hidden.dtype),
            TEACHER_PRECISION=teacher_precision(config.teacher_precision, z.dtype, codebook.dtype,
                                                exact=hidden.dtype == torch.float32),
            BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            BLOCK_H=dot_block(h, config.block_h), BLOCK_D=dot_block(d, config.block_d),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        bias = head_bias if head_bias is not None else terms  # any valid pointer when there is no bias
        _linear_snce_fwd_kernel[(n_row_blocks, splits)](
            hidden, head_weight, bias, z, codebook, target, scales, terms, parts[0], parts[1], parts[2],
            n, n_codes, h, d, 1.0 / tau, ignore_index, per_split, **meta,
        )
        # Merge the splits: lse over splits, and the target term re-weighted by each split's teacher mass.
        lse_l = torch.logsumexp(parts[0], dim=0)
        lse_t = torch.logsumexp(parts[1], dim=0)
        qdotl = (torch.exp(parts[1] - lse_t) * parts[2]).sum(dim=0)
        valid = target != ignore_index
        row_loss = torch.where(valid, lse_l - qdotl, torch.zeros_like(lse_l))

        ctx.save_for_backward(hidden, head_weight, head_bias, target, codebook, latents, scales, terms, lse_l, lse_t)
        ctx.tau, ctx.ignore_index, ctx.config, ctx.meta = tau, ignore_index, config, meta
        return row_loss

    @staticmethod
    def backward(ctx, grad_row):
        hidden, head_weight, head_bias, target, codebook, latents, scales, terms, lse_l, lse_t = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]  # hidden, head_weight, head_bias
        n, h = hidden.shape
        n_codes, d = codebook.shape
        cfg = ctx.config
        args = (
            hidden, head_weight, head_bias if head_bias is not None else terms,  # any pointer when no bias
            codebook if latents is None else latents, codebook, target, scales, terms,
            lse_l, lse_t, grad_row.float().contiguous(),
        )
        scalars = (n, n_codes, h, d, 1.0 / ctx.tau, ctx.ignore_index)
        backward = _gemm_backward if cfg.backward == "gemm" else _atomic_backward
        dx, dw, db = backward(args, scalars, need, cfg, ctx.meta)
        return (
            dx.to(hidden.dtype) if need[0] else None,
            dw.to(head_weight.dtype) if need[1] else None,
            db.to(head_bias.dtype) if need[2] else None,
            None, None, None, None, None, None, None,
        )


def _gemm_backward(args, scalars, need, cfg: KernelConfig, meta: dict):
    """Code chunk by code chunk: a Triton kernel writes dl (N, chunk) in the input dtype, then cuBLAS adds
    dl @ W_chunk to grad hidden (float32) and writes grad weight rows dl^T @ x. Returns (dx, dw, db)."""
    hidden, head_weight = args[0], args[1]
    n, n_codes = scalars[0], scalars[1]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dx = torch.zeros(hidden.shape, **f32) if need[0] else None
    dw = torch.empty_like(head_weight) if need[1] else None
    db = torch.empty(n_codes, **f32) if need[2] else None
    chunk = max(cfg.block_k, cfg.chunk_bytes // (max(1, n) * hidden.element_size()) // cfg.block_k * cfg.block_k)
    chunk = min(chunk, triton.cdiv(n_codes, cfg.block_k) * cfg.block_k)
    dl_buffer = torch.empty(n, chunk, dtype=hidden.dtype, device=hidden.device)
    for c0 in range(0, n_codes, chunk):
        kc = min(chunk, n_codes - c0)
        dl = dl_buffer[:, :kc]
        grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(kc, cfg.block_k),)
        _dlogits_kernel[grid](*args, dl, *scalars, c0, kc, chunk, GROUP_N=cfg.group_n, **meta)
        if need[0]:
            dx += _mm_float32(dl, head_weight[c0 : c0 + kc])
        if need[1]:
            torch.mm(dl.T, hidden, out=dw[c0 : c0 + kc])
        if need[2]:
            db[c0 : c0 + kc] = dl.sum(dim=0, dtype=torch.float32)
    return dx, dw, db


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in float32, for float32 / bfloat16 / float16 operands."""
    if a.dtype == torch.float32 or not a.is_cuda:
        return a.float() @ b.float()
    try:
        return torch.mm(a, b, out_dtype=torch.float32)  # cuBLAS: low-precision operands, float32 output
    except TypeError:  # torch < 2.8 has no out_dtype: the chunk's product is rounded to a's dtype once
        return (a @ b).float()


def _atomic_backward(args, scalars, need, cfg: KernelConfig, meta: dict):
    """One program per tile adds its gradient contributions with float32 atomics. Returns (dx, dw, db)."""
    hidden, head_weight = args[0], args[1]
    n, n_codes = scalars[0], scalars[1]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dx = torch.zeros(hidden.shape, **f32) if need[0] else None
    dw = torch.zeros(head_weight.shape, **f32) if need[1] else None
    db = torch.zeros(n_codes, **f32) if need[2] else None
    unused = args[-1]  # a valid pointer for gradients nobody asked for
    grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(n_codes, cfg.block_k),)
    _atomic_backward_kernel[grid](
        *args, *(g if g is not None else unused for g in (dx, dw, db)), *scalars, cfg.filter_eps,
        COMPUTE_DX=need[0], COMPUTE_DW=need[1], COMPUTE_DB=need[2], GROUP_N=cfg.group_n, **meta,
    )
    return dx, dw, db


REDUCTIONS = ("mean", "sum", "none")


def fused_linear_snce_loss_triton(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    target: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    *,
    codebook: torch.Tensor,
    latents: torch.Tensor | None = None,
    tau: float,
    metric: str = "l2",
    topk: int | None = None,
    table=None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    memory_budget: int | None = None,
    block_rows: int | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """SNCE loss of ``hidden @ head_weight.T + head_bias`` with Triton kernels; never holds (N, K) tensors.

    Same arguments and result as :func:`snce.functional.fused_linear_snce_loss`: hidden (..., H),
    head_weight (K, H), head_bias (K,) | None, target (...) codes, codebook (K, D), latents (..., D) | None
    (None: z = codebook[target]), weight (...) | None; float32 loss ("none": target's shape). Inputs float32,
    bfloat16 or float16, accumulated in float32. Not supported here (torch path only): ``topk``, ``table``;
    ``memory_budget`` / ``block_rows`` size the torch path's blocks and are ignored. ``config``:
    :class:`KernelConfig` (tiles, gradient filtering, teacher matmul precision).
    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow; tests at tiny shapes).
    """
    config = KernelConfig() if config is None else config
    batch_shape = hidden.shape[:-1] if torch.is_tensor(hidden) else None
    hidden, target, latents, weight, tau = _check_inputs(
        hidden, head_weight, target, head_bias, codebook, latents, tau, metric, topk, table, weight,
        ignore_index, reduction,
    )
    row_loss = LinearSNCEFunction.apply(
        hidden.contiguous(), head_weight.contiguous(), None if head_bias is None else head_bias.contiguous(),
        target.contiguous(), codebook.detach().contiguous(),
        None if latents is None else latents.detach().contiguous(), tau, metric, ignore_index, config,
    )
    loss = row_loss * mean_scale(target, weight, ignore_index, reduction, torch.float32)
    return loss.view(batch_shape) if reduction == "none" else loss.sum()


def _check_inputs(
    hidden, head_weight, target, head_bias, codebook, latents, tau, metric, topk, table, weight, ignore_index,
    reduction,
):
    """Raise ValueError / TypeError naming the argument before any kernel runs.

    Returns (hidden (N, H), target (N,) long, latents (N, D) | None, weight (N,) | None, tau float).
    """
    if topk is not None or table is not None:
        raise ValueError("topk and table are not supported by the Triton kernels; use impl='torch'")
    check_metric(metric)
    tau = check_tau(tau)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {_describe(ignore_index)}")
    for name, x, shape in (("hidden", hidden, "(..., H)"), ("head_weight", head_weight, "(K, H)"),
                           ("codebook", codebook, "(K, D)")):
        if not (torch.is_tensor(x) and x.is_floating_point() and x.dim() >= 1):
            raise TypeError(f"{name} must be a floating-point tensor of shape {shape}, got {_describe(x)}")
    if hidden.dtype not in KERNEL_DTYPES or head_weight.dtype != hidden.dtype:
        raise TypeError(
            f"hidden and head_weight must share one dtype among {KERNEL_DTYPES}, got {hidden.dtype} and "
            f"{head_weight.dtype}; use impl='torch' for other dtypes"
        )
    h = hidden.shape[-1]
    if head_weight.dim() != 2 or head_weight.shape[1] != h:
        raise ValueError(f"head_weight must have shape (K, H={h}) to match hidden {tuple(hidden.shape)}, "
                         f"got {tuple(head_weight.shape)}")
    n_codes = head_weight.shape[0]
    if codebook.dim() != 2 or codebook.shape[0] != n_codes:
        raise ValueError(f"codebook must have shape (K={n_codes}, D) to match head_weight, got {tuple(codebook.shape)}")
    if head_bias is not None and not (
        torch.is_tensor(head_bias) and head_bias.shape == (n_codes,) and head_bias.dtype == hidden.dtype
    ):
        raise ValueError(f"head_bias must be None or a ({n_codes},) {hidden.dtype} tensor, got {_describe(head_bias)}")
    batch = hidden.shape[:-1]
    if not (torch.is_tensor(target) and not target.is_floating_point() and not target.is_complex()):
        raise TypeError(f"target must be an integer tensor of code indices, got {_describe(target)}")
    if target.shape != batch:
        raise ValueError(f"target shape {tuple(target.shape)} does not match hidden's batch shape {tuple(batch)}")
    if latents is not None:
        if not (torch.is_tensor(latents) and latents.is_floating_point()):
            raise TypeError(f"latents must be a floating-point tensor, got {_describe(latents)}")
        if latents.shape != (*batch, codebook.shape[1]):
            raise ValueError(f"latents must have shape {(*batch, codebook.shape[1])} (target shape + codebook dim), "
                             f"got {tuple(latents.shape)}")
        latents = latents.reshape(-1, codebook.shape[1])
        check_finite(latents, "latents")
    check_finite(codebook, "codebook")
    if weight is not None:
        if not (torch.is_tensor(weight) and weight.is_floating_point() and weight.shape == batch):
            raise ValueError(f"weight must be None or a floating-point tensor of shape {tuple(batch)}, "
                             f"got {_describe(weight)}")
        weight = weight.reshape(-1)
        check_finite(weight, "weight")
    tensors = [x for x in (hidden, head_weight, target, head_bias, codebook, latents, weight) if x is not None]
    if len({x.device for x in tensors}) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted({str(x.device) for x in tensors})}")
    if not (hidden.is_cuda or interpreting()):
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got hidden on "
                         f"{hidden.device}; use impl='torch'")
    target = target.reshape(-1).long()
    bad = (target != ignore_index) & ((target < 0) | (target >= n_codes))
    if bool(bad.any()):
        raise ValueError(f"target holds index {int(target[bad][0])}, outside [0, {n_codes}) (the number of codes) "
                         f"and not ignore_index={ignore_index}")
    return hidden.reshape(-1, h), target, latents, weight, tau


def _describe(x) -> str:
    if torch.is_tensor(x):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"
