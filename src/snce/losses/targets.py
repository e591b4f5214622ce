"""SNCE soft targets: q(k | z) = softmax_k(-d(z, e_k) / tau) from the codebook's own geometry.

Shapes: N tokens, K codes, D latent (code embedding) dimension, k kept neighbours.

* :func:`neighbor_distribution` returns the dense (N, K) q, for inspection and small problems.
* :class:`TeacherLogits` produces q block by block for the chunked loss (never N x K at once).
* :class:`NeighborTable` precomputes, for every code, its k nearest codes and their probabilities: the
  pre-tokenized case (z = e_y), where q depends only on the target code.
* :func:`suggest_tau` derives a default temperature from the codebook's nearest-neighbour gaps.

Two controls for comparing SNCE with cross-entropy, so that a study can tell geometry from mere softness:

* :class:`NeighborShuffle` ("geometry removed"): the target of a token with code y is q moved by a fixed
  permutation pi_y of the codes with pi_y(y) = y, q'(pi_y(k)) = q(k): the same mass on the true code, the same
  values (hence entropy) on the others, but placed on codes unrelated to y.
* :func:`target_entropy` and :func:`smoothing_for_entropy` ("geometry-free softness"): the label smoothing
  epsilon whose target (1 - eps) one-hot(y) + eps / K has the mean entropy of the SNCE targets.

Every distance goes through :mod:`snce.quantize.search`, the same code the quantizers assign with.
"""

from __future__ import annotations

import copy
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


@torch.no_grad()
def sample_neighbors(
    target: torch.Tensor,
    codebook: torch.Tensor,
    *,
    tau: float,
    metric: str = "l2",
    latents: torch.Tensor | None = None,
    topk: int | None = None,
    shuffle: NeighborShuffle | None = None,
    generator: torch.Generator | None = None,
    block_rows: int = 4096,
) -> torch.Tensor:
    """One code per token drawn from its SNCE target q: stochastic quantization (SNCE's loss is the expected
    cross-entropy over these draws). target (N,) long codes; latents (N, D) or None (z = codebook[target]).

    ``topk``: from the renormalised top-k target; ``shuffle``: from the shuffled-neighbour target (a draw k from
    q moved to pi_y(k), which is a draw from the permuted q). Rows go in blocks of ``block_rows`` (one (rows, K)
    block of teacher logits at a time). Returns (N,) long.
    """
    if not (torch.is_tensor(target) and target.dim() == 1 and not target.is_floating_point()):
        raise ValueError("target must be a (N,) integer tensor of code indices")
    if latents is not None and latents.shape[0] != target.shape[0]:
        raise ValueError(
            f"latents must hold one row per target, got {latents.shape[0]} for {target.shape[0]}"
        )
    num_codes = codebook.shape[0]
    topk = check_topk(topk, num_codes)
    target = target.long()
    if target.numel() and not (0 <= int(target.min()) and int(target.max()) < num_codes):
        raise ValueError(f"target must lie in [0, {num_codes}) (the number of codes)")
    if shuffle is not None and shuffle.num_codes != num_codes:
        raise ValueError(
            f"shuffle was built for {shuffle.num_codes} codes, but the codebook has {num_codes}"
        )
    teacher = TeacherLogits(codebook, latents, check_tau(tau), metric)
    out = torch.empty_like(target)
    for start in range(0, target.numel(), block_rows):
        rows = torch.arange(start, min(target.numel(), start + block_rows), device=target.device)
        t = teacher.block(rows, target)  # (n, K)
        if topk is None:
            drawn = torch.multinomial(t.softmax(dim=1), 1, generator=generator)  # (n, 1)
        else:
            values, index = t.topk(topk, dim=1)
            drawn = index.gather(
                1, torch.multinomial(values.softmax(dim=1), 1, generator=generator)
            )
        if shuffle is not None:
            drawn = shuffle.permute(drawn, target[rows])
        out[rows] = drawn[:, 0]
    return out


@torch.no_grad()
def target_entropy(
    codebook: torch.Tensor,
    *,
    tau: float,
    metric: str = "l2",
    latents: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
    topk: int | None = None,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> float:
    """Mean entropy (nats) of the SNCE targets of a set of tokens: -(1/N) sum_n sum_k q_nk log q_nk.

    Pass the tokens' ``latents`` (..., D), or their ``codes`` (...) for pre-tokenized data (z = e_y): each
    distinct code's entropy is then computed once and weighted by its count. ``topk``: the entropy of the
    renormalised top-k target. Per row, with teacher logits t and q = softmax(t),
    H = -sum_k q_k (t_k - logsumexp(t)). Chunked: two (rows, K) blocks of about ``max_block_bytes / 2``
    each at a time, never N x K or K x K.

    The label smoothing with the same mean entropy is ``smoothing_for_entropy(target_entropy(...), K)``;
    a :class:`NeighborShuffle` leaves every row's entropy unchanged.
    """
    if (latents is None) == (codes is None):
        raise ValueError("pass exactly one of latents (..., D) and codes (...) (pre-tokenized data)")
    tau = check_tau(tau)
    check_metric(metric)
    if not (torch.is_tensor(codebook) and codebook.dim() == 2 and codebook.is_floating_point()):
        raise ValueError("codebook must be a floating (K, D) tensor")
    num_codes = codebook.shape[0]
    topk = check_topk(topk, num_codes)
    check_finite(codebook, "codebook")
    if codes is not None:
        if not torch.is_tensor(codes) or codes.is_floating_point() or codes.is_complex():
            got = codes.dtype if torch.is_tensor(codes) else type(codes).__name__
            raise TypeError(f"codes must be an integer tensor of code indices, got {got}")
        codes = codes.reshape(-1).long().to(codebook.device)  # (N,)
        if codes.numel() and not (0 <= int(codes.min()) and int(codes.max()) < num_codes):
            raise ValueError(f"codes must lie in [0, {num_codes}) (the number of codes)")
        n_tokens = codes.numel()
        distinct, counts = codes.unique(return_counts=True)  # (U,) codes, (U,) their counts
        teacher = TeacherLogits(codebook, None, tau, metric)
    else:
        if not (torch.is_tensor(latents) and latents.dim() >= 2):
            got = f"shape {tuple(latents.shape)}" if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(f"latents must be a floating (..., D) tensor, got {got}")
        latents = latents.reshape(-1, latents.shape[-1]).to(codebook.device)  # (N, D)
        check_search_inputs(latents, codebook, metric)
        check_finite(latents, "latents")
        n_tokens = latents.shape[0]
        distinct, counts = None, None
        teacher = TeacherLogits(codebook, latents, tau, metric)
    if n_tokens == 0:
        raise ValueError("target_entropy needs at least one token")
    n_rows = n_tokens if distinct is None else distinct.numel()
    block = max(1, min(n_rows, max_block_bytes // (2 * 4 * num_codes)))
    buf = torch.empty(block, num_codes, dtype=teacher.dtype, device=codebook.device)  # teacher logits
    total = torch.zeros((), dtype=torch.float64, device=codebook.device)
    for start in range(0, n_rows, block):
        rows = torch.arange(start, min(n_rows, start + block), device=codebook.device)
        t = teacher.block(rows, distinct, out=buf[: rows.numel()])  # (n, K)
        if topk is not None:
            t = t.topk(topk, dim=1).values  # (n, topk): the kept logits, renormalised below
        log_q = t.sub_(t.logsumexp(dim=1, keepdim=True))  # (n, K') in place
        h = -torch.bmm(log_q.exp().unsqueeze(1), log_q.unsqueeze(2)).view(-1)  # (n,) entropies
        total += h.double().sum() if counts is None else (h.double() * counts[rows]).sum()
    return float(total) / n_tokens


def smoothing_for_entropy(entropy: float, num_codes: int) -> float:
    """The label-smoothing epsilon in [0, 1] whose target has the given entropy (nats).

    The smoothed target, torch's convention (``F.cross_entropy(label_smoothing=eps)``, and
    ``fused_linear_cross_entropy``), is (1 - eps) one-hot(y) + eps / K: p = 1 - eps + eps / K on y and
    r = eps / K on each of the K - 1 other codes, so

        H(eps) = -p log p - (K - 1) r log r,     dH/deps = (1 - 1/K) log(p / r) > 0 for eps < 1,

    increasing from H(0) = 0 to H(1) = log K. Solved by bisection (60 halvings: |eps error| < 1e-18);
    ``entropy >= log K`` gives 1.0.
    """
    if isinstance(entropy, bool) or not isinstance(entropy, (int, float)) or not math.isfinite(entropy):
        raise ValueError(f"entropy must be a finite number of nats, got {entropy!r}")
    if entropy < 0:
        raise ValueError(f"entropy must be >= 0 (nats), got {entropy!r}")
    if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes must be an int >= 1, got {num_codes!r}")
    if entropy >= math.log(num_codes):
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _smoothed_entropy(mid, num_codes) < entropy:
            lo = mid
        else:
            hi = mid
    return lo


def _smoothed_entropy(eps: float, num_codes: int) -> float:
    """H(eps) of the label-smoothed target, see :func:`smoothing_for_entropy` (0 log 0 = 0)."""
    p, r = 1.0 - eps + eps / num_codes, eps / num_codes
    return -p * math.log(p) - ((num_codes - 1) * r * math.log(r) if r > 0 else 0.0)


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


class NeighborShuffle:
    """Shuffled-neighbour SNCE, the "geometry removed" control: a fixed permutation pi_y per code y.

    The shuffled target of a token with true code y moves its SNCE target q by pi_y, which fixes y:

        q'(pi_y(k)) = q(k)

    so q' puts the same probability on y and the same multiset of values on the other codes (hence has the
    same entropy) as q, but on codes chosen without regard to their distance from y.

    Construction, O(K) memory (no K x K table): a relabelling rho, a uniformly random permutation of the
    codes (code -> label), and per code a multiplier a_y, drawn uniformly among the units of Z_K (gcd(a_y, K)
    = 1) with gcd(a_y - 1, K) = gcd(2, K). With c = rho(y), pi_y is the affine map l -> c + a_y (l - c) in
    label space:

        pi_y(k) = rho^-1[(rho(y) + a_y (rho(k) - rho(y))) mod K]

    * A bijection: x -> a_y x is invertible mod K since a_y is a unit; shifts and rho are bijections.
    * pi_y(y) = y: rho(k) = rho(y) maps to c. Its other fixed points solve (a_y - 1)(l - c) = 0 mod K, which
      has gcd(a_y - 1, K) solutions; the condition on a_y keeps that at the minimum: y alone for odd K, y and
      the code labelled c + K/2 for even K (a_y is odd there, so a_y - 1 is even).
    * No geometry: the index arithmetic acts on random labels, never on code indices (which a sorted or
      k-means-initialised codebook can make geometric), and rho is drawn independently of the codebook. Over
      rho, for fixed y and k != y, pi_y(k) is k itself with probability (gcd(a_y - 1, K) - 1) / (K - 1)
      (0 for odd K, 1 / (K - 1) for even K) and otherwise uniform over the K - 2 other codes: where q(k)
      lands does not depend on the distance d(e_y, e_k).
    * One permutation per code: pi_y = pi_y' iff a_y = a_y' and (a_y - 1)(rho(y) - rho(y')) = 0 mod K; never
      for odd K, and for even K only for two codes labelled K/2 apart that drew the same multiplier.
    The family is pseudo-random (affine in label space), not a uniform draw among all permutations fixing y;
    the control needs only that the values land on codes unrelated to y.

    Args:
        num_codes: K. seed: seeds the CPU ``torch.Generator`` that draws rho and the multipliers, so the
            permutations are the same on every device and run.
    Attributes: ``labels`` (K,) long rho, ``codes_by_label`` (K,) long rho^-1, ``multipliers`` (K,) long a_y.
    """

    def __init__(self, num_codes: int, seed: int = 0):
        if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 1:
            raise ValueError(f"num_codes must be an int >= 1, got {num_codes!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.num_codes, self.seed = num_codes, seed
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randperm(num_codes, generator=gen)  # (K,) code -> label
        self.codes_by_label = torch.argsort(self.labels)  # (K,) label -> code
        # Rejection sampling. By the Chinese remainder theorem a fraction prod_p (p - 2) / p over the odd primes
        # p | K, times 1/2 (1/4 when 4 | K), of Z_K qualifies: > 1/50 for every K < 10^6.
        k, fixed = torch.tensor(num_codes), math.gcd(2, num_codes)
        self.multipliers = torch.zeros(num_codes, dtype=torch.long)  # (K,) a_y
        todo = torch.arange(num_codes)  # codes still without a multiplier
        while todo.numel():
            a = torch.randint(0, num_codes, todo.shape, generator=gen)
            ok = (torch.gcd(a, k) == 1) & (torch.gcd(a - 1, k) == fixed)
            self.multipliers[todo[ok]] = a[ok]
            todo = todo[~ok]

    def permute(self, codes: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """pi_{target_i}(codes[i, j]): codes (n, m) long (or (1, m), shared by every row), target (n,) long
        codes in [0, K) -> (n, m) long."""
        c = self.labels[target].unsqueeze(1)  # (n, 1) label of each row's true code
        a = self.multipliers[target].unsqueeze(1)  # (n, 1)
        # (n, m) labels; int64, since a_y (rho(k) - rho(y)) reaches K^2 = 2^36 at K = 262,144
        moved = (_lookup(self.labels, codes) - c).mul_(a).add_(c).remainder_(self.num_codes)
        return _lookup(self.codes_by_label, moved)

    def to(self, device) -> NeighborShuffle:
        """A copy whose tables live on ``device`` (tables already there are shared, not copied)."""
        moved = copy.copy(self)
        for name in ("labels", "codes_by_label", "multipliers"):
            setattr(moved, name, getattr(self, name).to(device))
        return moved

    def __repr__(self) -> str:
        return f"NeighborShuffle(num_codes={self.num_codes}, seed={self.seed})"


def _lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a 1-D table and a 2-D index, as a gather from the row-broadcast table: on CPU about
    4x faster than advanced indexing, which dominated the dense shuffle's time."""
    return torch.gather(table.expand(index.shape[0], -1), 1, index)


# The smallest mass suggest_tau leaves on a token's nearest code (median over tokens). The gap rule alone gives
# 0.22-0.30 on the study's l2 codebooks (K = 256 to 16,384), which this floor leaves untouched; a dot-product
# codebook at D = 32 got 0.003 from it (nearly uniform targets) and is brought back to the l2 regime.
MIN_NEAREST_MASS = 0.2


@torch.no_grad()
def suggest_tau(
    codebook: torch.Tensor,
    metric: str = "l2",
    latents: torch.Tensor | None = None,
    *,
    max_points: int = 4096,
    min_nearest_mass: float = MIN_NEAREST_MASS,
) -> float:
    """Default SNCE temperature from the codebook's geometry (the paper publishes no value).

    For each point z (the latents if given, else the codes themselves, i.e. pre-tokenized data) take the
    gap ``d(z, 2nd nearest code) - d(z, nearest code)``; tau is the median gap. At this tau, for a typical
    token the runner-up code gets exp(-1) ~ 0.37 of the nearest code's probability: neighbours matter,
    but the nearest code still dominates.

    The runner-up says nothing about the thousands of codes behind it. Where they sit barely further than
    the runner-up (dot products in high dimension do), the median gap spreads the target over the whole
    codebook. So tau is then lowered until the median point keeps ``min_nearest_mass`` of its target on its
    nearest code (bisection in log tau; the mass only grows as tau falls).

    Uses at most ``max_points`` evenly spaced points. Codebooks with duplicate codes give zero gaps; those
    are skipped.
    """
    check_metric(metric)
    if not 0 <= min_nearest_mass < 1:
        raise ValueError(f"min_nearest_mass must lie in [0, 1), got {min_nearest_mass!r}")
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
    tau = float(gaps.median())
    if nearest_mass(points, codebook, metric, tau) >= min_nearest_mass:
        return tau
    low, high = tau, tau  # the mass at high is below the floor; halve low until it is above
    while nearest_mass(points, codebook, metric, low) < min_nearest_mass:
        low /= 2
    for _ in range(30):  # log-space bisection: tau to a relative 2^-30 of the bracket
        mid = math.sqrt(low * high)
        if nearest_mass(points, codebook, metric, mid) >= min_nearest_mass:
            low = mid
        else:
            high = mid
    return low


def nearest_mass(points: torch.Tensor, codebook: torch.Tensor, metric: str, tau: float) -> float:
    """Median over points (N, D) of the SNCE target's mass on each point's nearest code at ``tau``."""
    dist, _, log_norm = nearest_codes(points, codebook, metric, 1, logsumexp_tau=tau)
    return float((-dist[:, 0] / tau - log_norm).exp().median())
