"""Tile helpers shared by the Triton kernels: one (tokens x codes) tile of student logits or teacher scores.

Shapes: N tokens, H hidden size, K codes, D code dimension. Every tile is accumulated in float32.

Teacher scores follow :mod:`snce.quantize.search` exactly (higher = nearer, equal to -d(z, e_k) up to a
per-row constant that cancels in argmin, top-k and softmax):

    "l2"      2 z.e_k - ||e_k||^2      code_term = -||e_k||^2
    "cosine"  (z.e_k) / (|z| |e_k|)    row_scale = 1/max(|z|, eps), code_term = 1/max(|e_k|, eps)
    "dot"     z.e_k

The per-code and per-row terms are computed once in torch (O(K + N)); the kernels never copy the codebook.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from snce.quantize.search import check_metric

NORM_EPS = 1e-12  # F.normalize's eps, as in search.to_search_space
PRECISIONS = ("ieee", "tf32", "tf32x3")  # tl.dot input precisions of float32 operands
LOW_PRECISION = (torch.bfloat16, torch.float16)


def squared_norms(x: torch.Tensor, rows_per_block: int = 2**16) -> torch.Tensor:
    """(M, D) -> (M,) float32 ||x_m||^2, a block of rows at a time (no float32 copy of a bf16 codebook)."""
    return torch.cat([b.float().pow(2).sum(-1) for b in x.detach().split(rows_per_block)])


def code_terms(codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """(K, D) -> (K,) float32 per-code term of the score (see module docstring); ones for "dot"."""
    check_metric(metric)
    if metric == "l2":
        return -squared_norms(codebook)
    if metric == "cosine":
        return 1.0 / squared_norms(codebook).sqrt().clamp_min(NORM_EPS)
    return torch.ones(codebook.shape[0], device=codebook.device)


def row_scales(
    latents: torch.Tensor | None, target: torch.Tensor | None, terms: torch.Tensor, metric: str
) -> torch.Tensor:
    """(N,) float32 per-row score factor: 1/|z| for "cosine", else 1. z = latents, or codebook[target].

    ``terms`` is :func:`code_terms` of the codebook; only one of latents / target is needed.
    """
    if metric != "cosine":
        n, device = (target.shape[0], target.device) if latents is None else (latents.shape[0], latents.device)
        return torch.ones(n, device=device)
    if latents is None:
        return terms[target.clamp(0, terms.shape[0] - 1)]
    return 1.0 / squared_norms(latents).sqrt().clamp_min(NORM_EPS)


def student_precision(dtype: torch.dtype) -> str:
    """tl.dot precision of the student matmuls: exact "ieee" for float32 (torch's default on CUDA), else the
    backend default (bf16/fp16 operands are multiplied exactly either way, accumulated in float32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def teacher_precision(requested: str, z_dtype: torch.dtype, e_dtype: torch.dtype, exact: bool) -> str:
    """Resolve the teacher matmul's precision ("auto" | "native" | "ieee" | "tf32" | "tf32x3").

    "native" multiplies bf16/fp16 latents and codes in their own dtype on the tensor cores: the products are
    exact and the sum is float32, so it equals the float32 scores of :mod:`snce.quantize.search` up to summation
    order, at half the shared memory and registers. "auto" takes it when latents and codebook share one
    low-precision dtype; otherwise float32 operands with "ieee" (``exact``) or "tf32".
    """
    native_ok = z_dtype == e_dtype and z_dtype in LOW_PRECISION
    if requested == "native" and not native_ok:
        raise ValueError(f"teacher precision 'native' needs latents and codebook of one dtype among {LOW_PRECISION}, "
                         f"got {z_dtype} and {e_dtype}")
    if requested != "auto":
        return requested
    return "native" if native_ok else ("ieee" if exact else "tf32")


def dot_block(size: int, cap: int) -> int:
    """Power-of-two block over a contraction dim of ``size``: >= 16 (tl.dot's minimum), at most ``cap``."""
    return max(16, min(triton.next_power_of_2(size), cap))


def code_splits(n_row_blocks: int, n_code_blocks: int, device: torch.device) -> tuple[int, int]:
    """(splits, code blocks per split): enough programs for about 4 per SM (4 in all on CPU), none empty.

    A program handles one row block and one split, a contiguous run of code blocks.
    """
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    want = max(1, min(n_code_blocks, triton.cdiv(target, max(1, n_row_blocks))))
    per_split = triton.cdiv(n_code_blocks, want)
    return triton.cdiv(n_code_blocks, per_split), per_split


@triton.jit
def student_tile(
    x_ptr, w_ptr, b_ptr, rows, row_mask, codes, code_mask, H,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """(BLOCK_N, BLOCK_K) float32 logits x[rows] @ w[codes]^T + b[codes]; x (N, H), w (K, H) row-major.

    PRECISION (see :func:`student_precision`) only matters for float32 x and w.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        x = tl.load(x_ptr + rows[:, None] * H + hs[None, :], mask=row_mask[:, None] & (hs < H)[None, :], other=0.0)
        w = tl.load(w_ptr + codes[:, None] * H + hs[None, :], mask=code_mask[:, None] & (hs < H)[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + codes, mask=code_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def teacher_tile(
    z_ptr, z_rows, row_mask, row_scale, e_ptr, codes, code_mask, code_term, D,
    METRIC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """(BLOCK_N, BLOCK_K) float32 scores s(z[z_rows], e[codes]) of the module docstring; z (., D), e (K, D).

    row_scale (BLOCK_N,) and code_term (BLOCK_K,) are the loaded per-row / per-code terms. PRECISION: as
    resolved by :func:`teacher_precision`.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        z = tl.load(z_ptr + z_rows[:, None] * D + ds[None, :], mask=row_mask[:, None] & (ds < D)[None, :], other=0.0)
        e = tl.load(e_ptr + codes[:, None] * D + ds[None, :], mask=code_mask[:, None] & (ds < D)[None, :], other=0.0)
        if PRECISION == "native":
            acc = tl.dot(z, tl.trans(e), acc)
        else:
            acc = tl.dot(z.to(tl.float32), tl.trans(e.to(tl.float32)), acc, input_precision=PRECISION)
    if METRIC == "l2":
        acc = 2.0 * acc + code_term[None, :]
    elif METRIC == "cosine":
        acc = acc * row_scale[:, None] * code_term[None, :]
    return acc
