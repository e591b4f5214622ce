"""Triton nearest-code search: exact argmin / top-k over the codebook without writing any N x K distances.

Each program owns a block of rows and a contiguous run of code tiles (a "split"); it computes one float32
(rows x codes) score tile at a time (scores as in :mod:`snce.quantize.search`, via :func:`tiles.teacher_tile`)
and reduces it into a running best-k list held in registers. Only the (splits, N, k) candidates leave the
kernel; torch merges them with the same stable rule as :func:`snce.quantize.search.nearest_codes`, so ties go
to the lower code index. With ``logsumexp_tau`` the same pass also keeps a running logsumexp of the scores
(the normaliser of q = softmax(-d/tau), as NeighborTable.build needs). Memory: O(splits x N x k).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from snce.losses.kernels import interpreting
from snce.losses.kernels.tiles import (
    PRECISIONS,
    code_splits,
    code_terms,
    dot_block,
    row_scales,
    teacher_precision,
    teacher_tile,
)
from snce.losses.targets import check_tau
from snce.quantize.search import (
    check_k,
    check_search_inputs,
    log_normalizer,
    scores_to_distances,
    stable_topk,
)


@triton.jit
def _nearest_codes_kernel(
    z_ptr, e_ptr, row_scale_ptr, code_term_ptr, out_score_ptr, out_index_ptr, out_lse_ptr,
    N, K, D, blocks_per_split, inv_tau,
    METRIC: tl.constexpr, PRECISION: tl.constexpr, K_BEST: tl.constexpr, K_SLOTS: tl.constexpr,
    WITH_LSE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    row_scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=1.0)
    slots = tl.arange(0, K_SLOTS)
    # Running best list: padding slots (>= K_BEST) hold +inf so they are never evicted; empty slots hold
    # -inf with distinct negative indices.
    best = tl.where(slots[None, :] < K_BEST, float("-inf"), float("inf")) + tl.zeros((BLOCK_N, K_SLOTS), tl.float32)
    best_i = -1 - slots[None, :].to(tl.int64) + tl.zeros((BLOCK_N, K_SLOTS), tl.int64)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max of s / tau (WITH_LSE)
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(s / tau - m)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(K, BLOCK_K))
    for kb in range(first, last):
        cols = tl.arange(0, BLOCK_K)
        codes = (kb * BLOCK_K + cols).to(tl.int64)
        code_mask = codes < K
        code_term = tl.load(code_term_ptr + codes, mask=code_mask, other=0.0)
        s = teacher_tile(z_ptr, rows, row_mask, row_scale, e_ptr, codes, code_mask, code_term, D,
                         METRIC, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
        s = tl.where(code_mask[None, :], s, float("-inf"))
        if WITH_LSE:
            m_new = tl.maximum(m, tl.max(s, axis=1) * inv_tau)
            sum_exp = sum_exp * tl.exp(m - m_new) + tl.sum(tl.exp(s * inv_tau - m_new[:, None]), axis=1)
            m = m_new
        # Take the tile's K_BEST best one at a time (ties: lowest column first); tiles arrive in code order,
        # so a candidate equal to a listed score has a higher index and loses.
        for _ in range(K_BEST):
            top = tl.max(s, axis=1)
            at = tl.argmax(s, axis=1, tie_break_left=True)
            worst = tl.min(best, axis=1)
            is_worst = best == worst[:, None]
            worst_i = tl.max(tl.where(is_worst, best_i, -(2**62)), axis=1)  # evict the highest index among ties
            evict = is_worst & (best_i == worst_i[:, None]) & (top > worst)[:, None]
            best = tl.where(evict, top[:, None], best)
            best_i = tl.where(evict, kb * BLOCK_K + at[:, None].to(tl.int64), best_i)
            s = tl.where(cols[None, :] == at[:, None], float("-inf"), s)
    out = (split * N + rows)[:, None] * K_BEST + slots[None, :]
    out_mask = row_mask[:, None] & (slots[None, :] < K_BEST)
    tl.store(out_score_ptr + out, best, mask=out_mask)
    tl.store(out_index_ptr + out, best_i, mask=out_mask)
    if WITH_LSE:
        tl.store(out_lse_ptr + split * N + rows, m + tl.log(sum_exp), mask=row_mask)


@torch.no_grad()
def nearest_codes_triton(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    k: int = 1,
    *,
    logsumexp_tau: float | None = None,
    precision: str = "auto",
    block_n: int = 64,
    block_k: int = 64,
    block_d: int = 64,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`snce.quantize.search.nearest_codes`: exact k nearest codes, no N x K matrix.

    Args:
        z: (N, D) latents. codebook: (K, D). metric: "l2" | "cosine" | "dot". k: 1 <= k <= K.
        logsumexp_tau: if given, also return logsumexp_k(-d(z, e_k) / tau) over all codes, (N,).
        precision: the score matmul's precision (:func:`tiles.teacher_precision`): "auto" (exact: "native" for
            bf16/fp16 latents and codebook of one dtype, else "ieee"), "native", "ieee", "tf32" or "tf32x3"
            (TF32 can flip near-ties).
        block_n, block_k, block_d: tile sizes (powers of two, >= 16).
    Returns:
        distances (N, k) float32 ascending, indices (N, k) long [, log-normalizer (N,) float32].
        Ties go to the lower code index.
    """
    check_search_inputs(z, codebook, metric)
    check_k(k, codebook.shape[0])
    if logsumexp_tau is not None:
        logsumexp_tau = check_tau(logsumexp_tau)
    if precision not in ("auto", "native", *PRECISIONS):
        raise ValueError(f"precision must be 'auto', 'native' or one of {PRECISIONS}, got {precision!r}")
    precision = teacher_precision(precision, z.dtype, codebook.dtype, exact=True)
    if z.device != codebook.device:
        raise ValueError(f"latents and codebook must be on one device, got {z.device} and {codebook.device}")
    if not (z.is_cuda or interpreting()):
        raise ValueError(f"the Triton search needs CUDA tensors (or TRITON_INTERPRET=1), got {z.device}")
    n, d = z.shape
    n_codes = codebook.shape[0]
    terms = code_terms(codebook, metric)
    scales = row_scales(z, None, terms, metric)
    n_row_blocks, n_code_blocks = triton.cdiv(n, block_n), triton.cdiv(n_codes, block_k)
    splits, per_split = code_splits(n_row_blocks, n_code_blocks, z.device)
    cand_s = torch.empty(splits, n, k, dtype=torch.float32, device=z.device)
    cand_i = torch.empty(splits, n, k, dtype=torch.long, device=z.device)
    lse = torch.empty(splits, n, dtype=torch.float32, device=z.device) if logsumexp_tau else cand_s
    _nearest_codes_kernel[(n_row_blocks, splits)](
        z.contiguous(), codebook.contiguous(), scales, terms, cand_s, cand_i, lse,
        n, n_codes, d, per_split, 1.0 / (logsumexp_tau or 1.0),
        METRIC=metric, PRECISION=precision, K_BEST=k, K_SLOTS=triton.next_power_of_2(k),
        WITH_LSE=logsumexp_tau is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=dot_block(d, block_d), num_warps=num_warps,
    )
    cand_s = cand_s.permute(1, 0, 2).reshape(n, splits * k)  # (N, splits * k), splits in code order
    cand_i = cand_i.permute(1, 0, 2).reshape(n, splits * k)
    best_s, pos = stable_topk(cand_s, cand_i, k)
    distances = scores_to_distances(best_s, z, metric)
    if logsumexp_tau is None:
        return distances, cand_i.gather(1, pos)
    return distances, cand_i.gather(1, pos), log_normalizer(torch.logsumexp(lse, dim=0), z, metric, logsumexp_tau)
