"""Dense, readable SNCE: the oracle every fast path is tested and benchmarked against.

Materialises the (N, K) logits, the distances and q. Written independently of the chunked code: distances
come from ``torch.cdist`` / explicit normalisation, not from :mod:`snce.quantize.search`. Computes in the
inputs' precision (low precision is upcast to float32): tests pass float64 inputs to get a gold value.

The shuffled-neighbour control is applied to the finished q, one row at a time, straight from the definition
of :class:`~snce.losses.targets.NeighborShuffle` (its drawn relabelling and multipliers), not from its
``permute`` or the chunked path's pre-softmax scatter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_distance(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, D), (K, D) -> (N, K) d(z, e): squared L2, 1 - cosine similarity, or negative dot product."""
    if metric == "l2":
        return torch.cdist(z, codebook).pow(2)
    if metric == "cosine":
        return 1.0 - F.normalize(z, dim=-1) @ F.normalize(codebook, dim=-1).T
    if metric == "dot":
        return -(z @ codebook.T)
    raise ValueError(f"unknown metric {metric!r}")


def dense_targets(target, codebook, latents=None, *, tau, metric="l2", topk=None, table=None, shuffle=None):
    """(N, K) soft targets q, exactly as the SNCE paper defines them (shuffled when ``shuffle`` is given)."""
    codebook = _upcast(codebook)
    n_codes = codebook.shape[0]
    safe = target.clamp(0, n_codes - 1)  # ignored rows get a dummy code; their loss is zeroed later
    if table is not None:
        q = torch.zeros(target.shape[0], n_codes, dtype=codebook.dtype, device=target.device)
        q.scatter_(1, table.indices[safe], table.probs[safe].to(codebook.dtype))
    else:
        z = codebook[safe] if latents is None else _upcast(latents)
        t = -dense_distance(z, codebook, metric) / tau
        if topk is not None:
            kth = t.topk(topk, dim=1).values[:, -1:]
            t = t.masked_fill(t < kth, float("-inf"))
        q = t.softmax(dim=1)
    return q if shuffle is None else shuffled_targets(q, safe, shuffle)


def shuffled_targets(q, target, shuffle):
    """q (N, K), target (N,) -> q' with q'[i, pi_y(k)] = q[i, k], y = target[i], where
    pi_y(k) = rho^-1[(rho(y) + a_y (rho(k) - rho(y))) mod K] (rho: shuffle.labels, a: shuffle.multipliers)."""
    n_codes = q.shape[1]
    rho = shuffle.labels.to(q.device)
    rho_inv = torch.empty_like(rho)
    rho_inv[rho] = torch.arange(n_codes, device=q.device)
    out = torch.empty_like(q)
    for i, y in enumerate(target.tolist()):
        c, a = int(rho[y]), int(shuffle.multipliers[y])
        pi = rho_inv[(c + a * (rho - c)) % n_codes]  # (K,): pi[k] = pi_y(k)
        out[i, pi] = q[i]
    return out


def snce_loss_reference(
    logits, target, *, codebook, latents=None, tau=1.0, metric="l2", topk=None, table=None, shuffle=None,
    weight=None, ignore_index=-100, reduction="mean",
):
    """-sum_k q_k log softmax(logits)_k per token, weighted, reduced."""
    q = dense_targets(target, codebook, latents, tau=tau, metric=metric, topk=topk, table=table, shuffle=shuffle)
    log_p = _upcast(logits).log_softmax(dim=1)
    loss = -(q * log_p).sum(dim=1)
    return _reduce(loss, target, weight, ignore_index, reduction)


def fused_linear_snce_loss_reference(hidden, head_weight, target, head_bias=None, **kwargs):
    """snce_loss_reference(hidden @ head_weight.T + head_bias, ...)."""
    logits = _upcast(hidden) @ _upcast(head_weight).T
    if head_bias is not None:
        logits = logits + _upcast(head_bias)
    return snce_loss_reference(logits, target, **kwargs)


def cross_entropy_reference(logits, target, *, label_smoothing=0.0, weight=None, ignore_index=-100,
                            reduction="mean"):
    """Hard-label CE with label smoothing and per-token weights."""
    log_p = _upcast(logits).log_softmax(dim=1)
    safe = target.clamp(0, logits.shape[1] - 1)
    nll = -log_p.gather(1, safe[:, None])[:, 0]
    loss = (1 - label_smoothing) * nll - label_smoothing * log_p.mean(dim=1)
    return _reduce(loss, target, weight, ignore_index, reduction)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _reduce(loss, target, weight, ignore_index, reduction):
    valid = target != ignore_index
    if weight is not None:
        loss = loss * weight.to(loss.dtype)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp_min(1)  # an all-ignored batch gives 0, not NaN


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    """Raise unless every |actual - expected| <= rel * max|expected| (a tolerance relative to the tensor's scale,
    as fast paths are judged against these references); the message counts the misses and shows the worst."""
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs()
    bound = rel * expected.abs().max().clamp_min(1e-30)
    if not bool((err <= bound).all()):
        worst = int(err.argmax())
        raise AssertionError(
            f"{what}: {(err > bound).sum().item()} of {err.numel()} entries off; worst at flat index {worst}: "
            f"{actual.flatten()[worst].item()!r} vs {expected.flatten()[worst].item()!r} (rel tol {rel})"
        )
