"""SNCE soft targets: q(k | z) = softmax_k(-d(z, e_k) / tau) from the codebook's own geometry.

Shapes: N tokens, K codes, D latent (code embedding) dimension, k kept neighbours.

* :func:`neighbor_distribution` returns the dense (N, K) q, for inspection and small problems.
* :class:`TeacherLogits` produces q block by block for the chunked loss (never N x K at once).
* :class:`NeighborTable` precomputes, for every code, its k nearest codes and their probabilities: the
  pre-tokenized case (z = e_y), where q depends only on the target code.
* :func:`suggest_tau` derives a default temperature from the codebook's nearest-neighbour gaps.

Every distance goes through :mod:`snce.quantize.search`, the same code the quantizers assign with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from snce.quantize.search import (
    DEFAULT_BLOCK_BYTES,
    block_scores,
    check_metric,
    check_search_inputs,
    code_offsets,
    nearest_codes,
    to_search_space,
)


def check_tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    return float(tau)


def check_finite(x: torch.Tensor, name: str) -> None:
    # One cheap reduction first: a NaN/inf anywhere makes the sum non-finite (so does overflow, hence the
    # exact elementwise check only in that case).
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values; expected finite values")


def check_topk(topk, num_codes: int) -> int | None:
    if topk is None:
        return None
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= num_codes:
        raise ValueError(f"topk must be None or an int in [1, {num_codes}] (the codebook size), got {topk!r}")
    return topk


class TeacherLogits:
    """Teacher logits -d(z, e_k)/tau (up to a per-row constant) for blocks of tokens.

    Args:
        codebook: (K, D) code embeddings. latents: (N, D) or None (then z = codebook[target]).
        tau: temperature > 0. metric: "l2" | "cosine" | "dot".
    The codebook is mapped to the search space once (O(K x D)); each :meth:`block` call costs one
    (n x D) @ (D x K) matmul and returns an (n, K) float32 (float64 for float64 inputs) tensor.
    """

    def __init__(self, codebook: torch.Tensor, latents: torch.Tensor | None, tau: float, metric: str):
        self.metric, self.tau = metric, tau
        self.codes = to_search_space(codebook.detach(), metric)
        self.offsets = code_offsets(self.codes, metric)
        self.latents = None if latents is None else to_search_space(latents.detach(), metric)

    def block(self, rows: torch.Tensor, target: torch.Tensor | None = None, out=None) -> torch.Tensor:
        """rows: (n,) token indices; target: (N,) codes (used when latents is None). Returns (n, K),
        written into ``out`` when given."""
        z = self.codes[target[rows]] if self.latents is None else self.latents[rows]
        return block_scores(z, self.codes, self.offsets, self.metric, scale=1.0 / self.tau, out=out)

    @property
    def dtype(self) -> torch.dtype:
        return self.codes.dtype


@torch.no_grad()
def neighbor_distribution(
    latents: torch.Tensor,
    codebook: torch.Tensor,
    *,
    tau: float,
    metric: str = "l2",
    topk: int | None = None,
) -> torch.Tensor:
    """Dense SNCE target q (N, K) = softmax_k(-d(latents_n, codebook_k) / tau); rows sum to 1.

    ``topk=k`` keeps the k largest entries of each row and renormalises them. The output is float32
    (float64 for float64 inputs). Use the chunked losses rather than this for large N x K.
    """
    check_search_inputs(latents, codebook, metric)
    tau = check_tau(tau)
    topk = check_topk(topk, codebook.shape[0])
    check_finite(latents, "latents")
    check_finite(codebook, "codebook")
    teacher = TeacherLogits(codebook, latents, tau, metric)
    rows = torch.arange(latents.shape[0], device=latents.device)
    t = teacher.block(rows)  # (N, K): the caller asked for the dense matrix
    if topk is not None:
        vals, idx = t.topk(topk, dim=1)
        return torch.zeros_like(t).scatter_(1, idx, vals.softmax(dim=1))
    return t.softmax(dim=1)


@dataclass
class NeighborTable:
    """For every code y, its k nearest codes and q(. | e_y) restricted to them (renormalised).

    Attributes:
        indices: (K, k) long, nearest first. probs: (K, k) float32 (float64 codebooks: float64), rows sum to 1.
        dropped_mass: (K,), the probability mass the full softmax puts outside the k kept codes.
        tau, metric: the temperature and metric the table was built with.
    Under "l2" and "cosine" a code is its own nearest neighbour, so indices[:, 0] == arange(K); under
    "dot" a longer code can outrank the code itself.
    """

    indices: torch.Tensor
    probs: torch.Tensor
    dropped_mass: torch.Tensor
    tau: float
    metric: str

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        codebook: torch.Tensor,
        k: int,
        tau: float,
        metric: str = "l2",
        *,
        max_block_bytes: int = DEFAULT_BLOCK_BYTES,
    ) -> NeighborTable:
        """Chunked exact build: peak extra memory ~max_block_bytes, never a K x K matrix."""
        check_metric(metric)
        tau = check_tau(tau)
        if not (torch.is_tensor(codebook) and codebook.dim() == 2 and codebook.is_floating_point()):
            raise ValueError("codebook must be a floating (K, D) tensor")
        check_topk(k, codebook.shape[0])
        check_finite(codebook, "codebook")
        dist, idx, log_norm = nearest_codes(
            codebook, codebook, metric, k, logsumexp_tau=tau, max_block_bytes=max_block_bytes
        )
        logits = -dist / tau  # (K, k)
        kept = torch.exp(logits - log_norm[:, None]).sum(1)
        return cls(
            indices=idx,
            probs=logits.softmax(dim=1),
            dropped_mass=(1.0 - kept).clamp_min(0.0),
            tau=tau,
            metric=metric,
        )

    @property
    def num_codes(self) -> int:
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def lookup(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n,) codes -> (n, k) neighbour indices and (n, k) probabilities."""
        return self.indices[target], self.probs[target]

    def to(self, device) -> NeighborTable:
        return NeighborTable(
            self.indices.to(device), self.probs.to(device), self.dropped_mass.to(device), self.tau, self.metric
        )

    def state_dict(self) -> dict:
        return {"indices": self.indices, "probs": self.probs, "dropped_mass": self.dropped_mass,
                "tau": self.tau, "metric": self.metric}

    @classmethod
    def from_state_dict(cls, state: dict) -> NeighborTable:
        return cls(**state)


@torch.no_grad()
def suggest_tau(
    codebook: torch.Tensor,
    metric: str = "l2",
    latents: torch.Tensor | None = None,
    *,
    max_points: int = 4096,
) -> float:
    """Default SNCE temperature from the codebook's geometry (the paper publishes no value).

    For each point z (the latents if given, else the codes themselves, i.e. pre-tokenized data) take the
    gap ``d(z, 2nd nearest code) - d(z, nearest code)``; tau is the median gap. At this tau, for a typical
    token the runner-up code gets exp(-1) ~ 0.37 of the nearest code's probability: neighbours matter,
    but the nearest code still dominates. Uses at most ``max_points`` evenly spaced points.
    Codebooks with duplicate codes give zero gaps; those are skipped.
    """
    check_metric(metric)
    points = codebook if latents is None else latents.reshape(-1, codebook.shape[-1])
    if points.shape[0] > max_points:
        points = points[torch.linspace(0, points.shape[0] - 1, max_points, device=points.device).long()]
    if codebook.shape[0] < 2:
        raise ValueError("suggest_tau needs a codebook with at least 2 codes")
    # Pre-tokenized under l2/cosine the nearest code of e_y is e_y itself, so the gap is d(e_y, nearest other).
    dist, _ = nearest_codes(points, codebook, metric, 2)
    gaps = dist[:, 1] - dist[:, 0]
    gaps = gaps[gaps > 0]
    if gaps.numel() == 0:
        raise ValueError("all codes are identical: no distance scale to derive tau from")
    return float(gaps.median())
