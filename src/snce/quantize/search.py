"""Chunked nearest-code search: the one place snce turns (latents, codebook, metric) into scores.

Every distance in snce is one of three metrics, each written as an affine "score" that is higher for nearer
codes and equals ``-d(z, e_k)`` up to a constant per row (which cancels in argmin, top-k and softmax):

    metric    d(z, e)              score s_k(z)
    "l2"      ||z - e||^2          2 z.e_k - ||e_k||^2          (d = ||z||^2 - s)
    "cosine"  1 - cos(z, e)        z^.e^_k  (unit vectors)     (d = 1 - s)
    "dot"     -z.e                 z.e_k                        (d = -s)

Scores are computed in float32 (TF32/bf16 can flip near-ties) one (rows x codes) block at a time, so no
N x K matrix is ever held: peak extra memory is a few ``max_block_bytes`` (16 MiB by default: blocks below
glibc's 32 MiB mmap ceiling are recycled by malloc instead of being page-faulted in afresh every time).
The quantizers, the SNCE targets and the NeighborTable all go through :func:`code_blocks`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

METRICS = ("l2", "cosine", "dot")
DEFAULT_BLOCK_BYTES = 16 * 2**20


def check_metric(metric: str, name: str = "metric") -> str:
    if metric not in METRICS:
        raise ValueError(f"{name} must be one of {METRICS}, got {metric!r}")
    return metric


def to_search_space(x: torch.Tensor, metric: str) -> torch.Tensor:
    """(..., D) -> float32 (float64 stays float64) in the space where scores are plain dot products."""
    x = x if x.dtype == torch.float64 else x.float()
    return F.normalize(x, dim=-1) if metric == "cosine" else x


def code_offsets(codes: torch.Tensor, metric: str) -> torch.Tensor | None:
    """(K, D) search-space codes -> (K,) additive score term (-||e||^2 for l2), or None.

    A norm reduction, not ``(codes * codes).sum(-1)``: that would hold a (K, D) temporary (256 MiB at
    K = 262,144, D = 256), more than all the score blocks together.
    """
    return -torch.linalg.vector_norm(codes, dim=-1).square() if metric == "l2" else None


def block_scores(
    z: torch.Tensor,
    codes: torch.Tensor,
    offsets: torch.Tensor | None,
    metric: str,
    scale: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores of search-space rows z (n, D) against codes (k, D), times ``scale``: (n, k) float32.

    ``out``: optional preallocated (n, k) buffer to write into.
    """
    if metric == "l2":
        # scale * (2 z.e - ||e||^2) in one addmm
        return torch.addmm(offsets, z, codes.T, beta=scale, alpha=2.0 * scale, out=out)
    out = torch.mm(z, codes.T, out=out)
    return out.mul_(scale) if scale != 1.0 else out


def block_shape(n_rows: int, n_codes: int, max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> tuple[int, int]:
    """(rows, codes) per block so that one float32 block stays within ``max_block_bytes``."""
    elems = max(1, max_block_bytes // 4)
    codes = min(n_codes, max(1, elems // max(1, min(n_rows, 1024))))
    rows = min(n_rows, max(1, elems // codes))
    return rows, codes


def code_blocks(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    *,
    scale: float = 1.0,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """Yield ``(rows, codes, scores)`` blocks covering the (N, K) score matrix, codes fastest.

    z: (N, D) latents, codebook: (K, D); both are mapped to the search space once. ``scores`` is the
    (len(rows), len(codes)) float32 block of ``scale * s_k(z)`` for that block.
    """
    check_metric(metric)
    zs = to_search_space(z, metric)
    cs = to_search_space(codebook, metric)
    offsets = code_offsets(cs, metric)
    n, k = zs.shape[0], cs.shape[0]
    rows_per, codes_per = block_shape(n, k, max_block_bytes)
    for r0 in range(0, n, rows_per):
        rows = slice(r0, min(n, r0 + rows_per))
        for c0 in range(0, k, codes_per):
            codes = slice(c0, min(k, c0 + codes_per))
            off = None if offsets is None else offsets[codes]
            yield rows, codes, block_scores(zs[rows], cs[codes], off, metric, scale)


def scores_to_distances(scores: torch.Tensor, z: torch.Tensor, metric: str) -> torch.Tensor:
    """Turn scores (N, k) of rows z (N, D) into true distances d(z, e) (float32)."""
    if metric == "l2":
        zf = z.to(scores.dtype)
        return ((zf * zf).sum(-1, keepdim=True) - scores).clamp_min_(0.0)
    if metric == "cosine":
        return 1.0 - scores
    return -scores


def check_search_inputs(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> None:
    check_metric(metric)
    if not (torch.is_tensor(z) and z.dim() == 2 and z.is_floating_point()):
        raise ValueError(f"latents must be a floating (N, D) tensor, got {_describe(z)}")
    if not (torch.is_tensor(codebook) and codebook.dim() == 2 and codebook.is_floating_point()):
        raise ValueError(f"codebook must be a floating (K, D) tensor, got {_describe(codebook)}")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"latent dimension {z.shape[1]} does not match the codebook's dimension {codebook.shape[1]} "
            f"(latents {tuple(z.shape)}, codebook {tuple(codebook.shape)})"
        )
    if codebook.shape[0] == 0:
        raise ValueError("codebook is empty (K = 0)")


def _describe(x) -> str:
    if torch.is_tensor(x):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


@torch.no_grad()
def nearest_codes(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    k: int = 1,
    *,
    logsumexp_tau: float | None = None,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
):
    """Exact k nearest codes of every row, without an N x K matrix.

    Args:
        z: (N, D) latents. codebook: (K, D). metric: "l2" | "cosine" | "dot". k: 1 <= k <= K.
        logsumexp_tau: if given, also return logsumexp_k(-d(z, e_k) / tau) over ALL codes, (N,), in the same pass.
    Returns:
        distances (N, k) float32 ascending, indices (N, k) long [, log-normalizer (N,)].
        For k=1 ties go to the lower code index; for k > 1 the order among exactly tied distances is
        unspecified (torch.topk within a block), the distances are still exact.
    """
    check_search_inputs(z, codebook, metric)
    check_k(k, codebook.shape[0])
    n = z.shape[0]
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    best_s = torch.full((n, k), -math.inf, device=z.device, dtype=dtype)
    best_i = torch.zeros((n, k), dtype=torch.long, device=z.device)
    lse = torch.full((n,), -math.inf, device=z.device, dtype=dtype) if logsumexp_tau else None
    for rows, codes, s in code_blocks(z, codebook, metric, max_block_bytes=max_block_bytes):
        if k == 1:
            s_top, i_top = s.max(dim=1, keepdim=True)
        else:
            s_top, i_top = s.topk(min(k, s.shape[1]), dim=1)
        i_top += codes.start
        if lse is not None:  # after the top-k: s is no longer needed unscaled
            lse[rows] = torch.logaddexp(lse[rows], torch.logsumexp(s.div_(logsumexp_tau), dim=1))
        # Running merge; earlier blocks come first so equal scores keep the lower index.
        if k == 1:
            take = s_top > best_s[rows]
            best_s[rows] = torch.where(take, s_top, best_s[rows])
            best_i[rows] = torch.where(take, i_top, best_i[rows])
        else:
            cand_s = torch.cat([best_s[rows], s_top], dim=1)
            cand_i = torch.cat([best_i[rows], i_top], dim=1)
            top_s, pos = stable_topk(cand_s, cand_i, k)
            best_s[rows], best_i[rows] = top_s, cand_i.gather(1, pos)
    distances = scores_to_distances(best_s, z, metric)
    if lse is None:
        return distances, best_i
    return distances, best_i, log_normalizer(lse, z, metric, logsumexp_tau)


def check_k(k, num_codes: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_codes:
        raise ValueError(f"k must be an int in [1, {num_codes}], got {k!r}")
    return k


def log_normalizer(score_lse: torch.Tensor, z: torch.Tensor, metric: str, tau: float) -> torch.Tensor:
    """logsumexp_k(-d(z, e_k) / tau) (N,) from logsumexp_k(score_k / tau) (N,) of rows z (N, D).

    scores = c(z) - d with c(z) = ||z||^2 (l2), 1 (cosine), 0 (dot), so the two differ by c(z) / tau.
    """
    c = scores_to_distances(torch.zeros_like(score_lse[:, None]), z, metric)[:, 0]
    return score_lse - c / tau


def stable_topk(scores: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row, ties broken towards the lower code index. Returns (values, positions)."""
    # Sort by index first, then a stable sort by score keeps lower indices first among equals.
    order = index.argsort(dim=1)
    s_sorted = scores.gather(1, order)
    s_top, pos = s_sorted.sort(dim=1, descending=True, stable=True)
    return s_top[:, :k], order.gather(1, pos[:, :k])


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", **kw) -> torch.Tensor:
    """(N, D) -> (N,) long index of the nearest code (exact, chunked)."""
    return nearest_codes(z, codebook, metric, 1, **kw)[1][:, 0]
