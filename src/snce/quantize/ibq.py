"""IBQ: Index Backpropagation Quantization (Shi et al. 2024, arXiv 2412.02692; TencentARC/SEED-Voken).

Dot-product logits over all K codes, straight-through over the categorical one-hot, so that every code
receives gradient through the softmax:

    l_ik = z_i . e_k          k*_i = argmax_k l_ik          p_i = softmax_k(l_i)
    z_q  = (onehot(k*) - sg(p) + p) @ E                     value e_k*, gradient through p to z and all codes
    z_q' = E[k*]                                            plain lookup
    loss = mean((z_q - z)^2) + w_cm mean((sg(z_q') - z)^2) + w_cb mean((z_q' - sg(z))^2)
           + entropy_weight * (mean_i H(softmax(l_i / T)) - H(mean_i softmax(l_i / T)))

As released, ``beta`` = 0.25 weighs the codebook term (w_cb = beta, w_cm = 1); the paper's equation puts it
on the commitment term instead (``beta_on="commitment"``). entropy_weight 0.05, T = 0.01, codes N(0, 1).

Memory. The released code holds the (N, K) logits, softmax and one-hot (and two more softmaxes for the
entropy term): at K = 262,144 that is several GiB per thousand tokens. Here the value of z_q is E[k*] and
the soft part only injects gradient, so both soft paths are custom autograd functions that stream over
(rows x codes) blocks of at most ``max_block_bytes`` in the forward and recompute them in the backward:
only O(N + K) statistics and a handful of blocks are alive. ``chunked=False`` runs the dense formulation
(:func:`dense_index_backprop`, :func:`dense_entropy_terms`), the readable reference the tests compare with.

Without autograd (tokenizing, evaluating) nothing needs the softmax: the codes are a plain argmax search
and the loss is the three squared errors, all equal to mean((E[k*] - z)^2) in value; the entropy
regulariser, a training-time term over the batch, is left out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from snce.quantize.base import Quantizer, check_nonnegative, check_positive_int
from snce.quantize.search import code_blocks, nearest_code

IBQ_BLOCK_BYTES = 32 * 2**20
# exp() below this underflows to float32 denormals, which are ~10x slower on CPUs; such p are set to 0.
LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


class IBQuantizer(Quantizer):
    """IBQ over a K x D codebook with dot-product assignment (``metric == "dot"``).

    Args:
        dim: D. codebook_size: K.
        beta: weight of the codebook (released code) or commitment (paper) term, see ``beta_on``.
        beta_on: "codebook" (as released) | "commitment" (as in the paper's equation).
        entropy_weight: weight of the entropy loss (0.05); 0 turns it off.
        entropy_temperature: T of softmax(l / T) in the entropy loss (0.01).
        chunked: stream the soft paths over code blocks (True) or build dense (N, K) tensors (False).
        max_block_bytes: size of one float32 (rows x codes) block of the chunked path.
        usage_window: batches the reported usage is counted over.
    """

    kind = "ibq"

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        beta: float = 0.25,
        beta_on: str = "codebook",
        entropy_weight: float = 0.05,
        entropy_temperature: float = 0.01,
        chunked: bool = True,
        max_block_bytes: int = IBQ_BLOCK_BYTES,
        usage_window: int = 100,
    ):
        config = dict(
            dim=dim,
            codebook_size=codebook_size,
            beta=beta,
            beta_on=beta_on,
            entropy_weight=entropy_weight,
            entropy_temperature=entropy_temperature,
            chunked=chunked,
            max_block_bytes=max_block_bytes,
        )
        super().__init__(dim, codebook_size, "dot", config=config, usage_window=usage_window)
        if beta_on not in ("codebook", "commitment"):
            raise ValueError(f"beta_on must be 'codebook' or 'commitment', got {beta_on!r}")
        self.beta = check_nonnegative(beta, "beta")
        self.beta_on = beta_on
        self.entropy_weight = check_nonnegative(entropy_weight, "entropy_weight")
        if check_nonnegative(entropy_temperature, "entropy_temperature") == 0:
            raise ValueError("entropy_temperature must be > 0, got 0")
        self.entropy_temperature = float(entropy_temperature)
        self.chunked = bool(chunked)
        self.max_block_bytes = check_positive_int(max_block_bytes, "max_block_bytes")
        self.embed = nn.Parameter(torch.randn(codebook_size, dim))

    @property
    def codebook(self) -> torch.Tensor:
        return self.embed

    def quantize(self, z):
        E = self.embed
        if not torch.is_grad_enabled():
            return self._assign(z)
        if self.chunked:
            row_max, indices, log_sum = softmax_stats(
                z.detach(), E.detach(), 1.0, self.max_block_bytes
            )
            zq = IndexBackprop.apply(z, E, indices, row_max, log_sum, self.max_block_bytes)
        else:
            zq, indices = dense_index_backprop(z, E)
        zq = zq.to(z.dtype)
        zq_plain = F.embedding(indices, E).to(z.dtype)

        index_loss = F.mse_loss(zq, z)
        commitment = F.mse_loss(z, zq_plain.detach())
        codebook_loss = F.mse_loss(zq_plain, z.detach())
        w_commit, w_codebook = self._term_weights()
        loss = index_loss + w_commit * commitment + w_codebook * codebook_loss
        stats = {
            "index_loss": float(index_loss.detach()),
            "commitment": float(commitment.detach()),
            "codebook_loss": float(codebook_loss.detach()),
        }
        if self.entropy_weight > 0:
            if self.chunked:
                sample_h, batch_h = EntropyTerms.apply(
                    z, E, self.entropy_temperature, self.max_block_bytes
                )
            else:
                sample_h, batch_h = dense_entropy_terms(
                    z.float() @ E.float().T, self.entropy_temperature
                )
            loss = loss + self.entropy_weight * (sample_h - batch_h)
            stats["sample_entropy"], stats["batch_entropy"] = (
                float(sample_h.detach()),
                float(batch_h.detach()),
            )
        return zq, indices, loss, stats | self._norm_stats()

    def _assign(self, z):
        """No-autograd path: codes by argmax z.e_k, loss (1 + w_cm + w_cb) * mean((E[k*] - z)^2)."""
        indices = nearest_code(z, self.embed, "dot", max_block_bytes=self.max_block_bytes)
        zq = F.embedding(indices, self.embed).to(z.dtype)
        mse = F.mse_loss(zq, z)
        w_commit, w_codebook = self._term_weights()
        stats = {"index_loss": float(mse), "commitment": float(mse), "codebook_loss": float(mse)}
        return zq, indices, (1.0 + w_commit + w_codebook) * mse, stats | self._norm_stats()

    def _term_weights(self) -> tuple[float, float]:
        """(w_cm, w_cb): beta on the codebook term as released, on the commitment term as in the paper."""
        return (1.0, self.beta) if self.beta_on == "codebook" else (self.beta, 1.0)

    def _norm_stats(self) -> dict:
        norms = self.embed.detach().norm(dim=1)
        return {"code_norm_mean": float(norms.mean()), "code_norm_max": float(norms.max())}


def dense_index_backprop(
    z: torch.Tensor, codebook: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference IBQ straight-through as released: (N, D), (K, D) -> z_q (N, D), indices (N,).

    Holds the (N, K) logits, softmax and one-hot (float32).
    """
    logits = z.float() @ codebook.float().T  # (N, K)
    p = logits.softmax(dim=-1)
    indices = logits.argmax(dim=-1)
    hard = F.one_hot(indices, codebook.shape[0]).to(p.dtype)
    return (hard - p.detach() + p) @ codebook.float(), indices


def dense_entropy_terms(
    logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference entropy terms of softmax(logits / T), logits (N, K) -> (mean_i H(p_i), H(mean_i p_i))."""
    log_p = (logits / temperature).log_softmax(dim=-1)
    p = log_p.exp()
    sample_entropy = -(p * log_p).sum(dim=-1).mean()
    mean_p = p.mean(dim=0)
    # 0 log 0 = 0; the clamp keeps that term's gradient finite (it has no effect on the value).
    return sample_entropy, -(mean_p * mean_p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum()


class IndexBackprop(torch.autograd.Function):
    """z_q = (onehot(k*) - sg(p) + p) @ E without (N, K) tensors.

    Forward: z_q = E[k*] (the exact value). Backward, with g = dL/dz_q (N, D) and p = softmax(l):
        dE   = onehot^T g + dl^T z,   dz = dl E,   dl_ik = p_ik (g_i.e_k - c_i),   c_i = sum_k p_ik g_i.e_k
    in two passes over code blocks (c first, then dl), recomputing the logits block by block.
    """

    @staticmethod
    def forward(ctx, z, codebook, indices, row_max, log_sum, max_block_bytes):
        ctx.save_for_backward(z, codebook, indices, row_max, log_sum)
        ctx.max_block_bytes = max_block_bytes
        return codebook.float()[indices]

    @staticmethod
    def backward(ctx, grad):
        z, codebook, indices, row_max, log_sum = ctx.saved_tensors
        g, E, zf = grad.float(), codebook.float(), z.float()
        stats, block = (row_max, log_sum), ctx.max_block_bytes
        c = torch.zeros_like(row_max)
        for rows, _, p, g_dot_e in _soft_blocks(zf, E, stats, 1.0, g, block):
            c[rows] += (p * g_dot_e).sum(dim=1)
        dz = torch.zeros_like(zf)
        dE = torch.zeros_like(E).index_add_(0, indices, g)  # the one-hot path: selected codes only
        for rows, codes, p, g_dot_e in _soft_blocks(zf, E, stats, 1.0, g, block):
            dl = p.mul_(g_dot_e.sub_(c[rows, None]))  # (n, k), reuses the blocks' memory
            dz[rows] += dl @ E[codes]
            dE[codes] += dl.T @ zf[rows]
        return dz.to(z.dtype), dE.to(codebook.dtype), None, None, None, None


class EntropyTerms(torch.autograd.Function):
    """(mean_i H(p_i), H(mean_i p_i)) of p_i = softmax(z_i E^T / T), without (N, K) tensors.

    Forward: row max and log-normaliser of s = l / T (one pass), then H_i = -sum_k p log p and
    p_bar = mean_i p_i (second pass). Backward, u_k = -log p_bar_k (0 where p_bar_k = 0, where every p_ik
    is 0 too), upstream gradients g1, g2:
        ds_ik = -(g1 / N) p_ik (log p_ik + H_i) + (g2 / N) p_ik (u_k - sum_j p_ij u_j),   dl = ds / T.
    """

    @staticmethod
    def forward(ctx, z, codebook, temperature, max_block_bytes):
        zf, E = z.detach().float(), codebook.detach().float()
        row_max, _, log_sum = softmax_stats(zf, E, 1.0 / temperature, max_block_bytes)
        stats = (row_max, log_sum)
        entropy = torch.zeros_like(row_max)
        p_bar = torch.zeros(E.shape[0], device=E.device)
        for rows, codes, p, log_p in _prob_blocks(zf, E, stats, 1.0 / temperature, max_block_bytes):
            entropy[rows] -= (p * log_p).sum(dim=1)
            p_bar[codes] += p.sum(dim=0)
        p_bar /= zf.shape[0]
        u = torch.where(p_bar > 0, -p_bar.log(), torch.zeros_like(p_bar))
        ctx.save_for_backward(z, codebook, row_max, log_sum, entropy, u)
        ctx.temperature, ctx.max_block_bytes = temperature, max_block_bytes
        return entropy.mean(), -torch.special.xlogy(p_bar, p_bar).sum()

    @staticmethod
    def backward(ctx, g_sample, g_batch):
        z, codebook, row_max, log_sum, entropy, u = ctx.saved_tensors
        zf, E, t = z.float(), codebook.float(), ctx.temperature
        n, stats, block = zf.shape[0], (row_max, log_sum), ctx.max_block_bytes
        c = torch.zeros_like(row_max)
        for rows, codes, p, _ in _prob_blocks(zf, E, stats, 1.0 / t, block):
            c[rows] += p @ u[codes]
        dz, dE = torch.zeros_like(zf), torch.zeros_like(E)
        for rows, codes, p, log_p in _prob_blocks(zf, E, stats, 1.0 / t, block):
            ds = log_p.add_(entropy[rows, None]).mul_(-g_sample)  # -(g1)(log p + H_i)
            ds += g_batch * (u[codes] - c[rows, None])
            dl = ds.mul_(p).div_(n * t)  # through s = l / T
            dz[rows] += dl @ E[codes]
            dE[codes] += dl.T @ zf[rows]
        return dz.to(z.dtype), dE.to(codebook.dtype), None, None


@torch.no_grad()
def softmax_stats(
    z: torch.Tensor, codebook: torch.Tensor, scale: float, max_block_bytes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One streamed pass over s = scale * z E^T: row max m (N,), argmax (N,), r = log sum_k exp(s_k - m) (N,).

    log p = (s - m) - r keeps the top code's log-probability exact (s - logsumexp(s) loses it to rounding
    at large |s|, e.g. at T = 0.01). Ties go to the lower code index, as in ``nearest_codes``.
    """
    zf, E = z.float(), codebook.float()
    row_max = torch.full((zf.shape[0],), -math.inf, device=zf.device)
    log_sum = torch.zeros_like(row_max)
    argmax = torch.zeros(zf.shape[0], dtype=torch.long, device=zf.device)
    for rows, codes, s in code_blocks(zf, E, "dot", scale=scale, max_block_bytes=max_block_bytes):
        block_max, block_arg = s.max(dim=1)
        old = row_max[rows]
        new = torch.maximum(old, block_max)
        block_sum = (s - new[:, None]).clamp_min_(LOG_TINY).exp_().sum(dim=1).log_()
        log_sum[rows] = torch.logaddexp(log_sum[rows] + (old - new), block_sum)
        argmax[rows] = torch.where(block_max > old, block_arg + codes.start, argmax[rows])
        row_max[rows] = new
    return row_max, argmax, log_sum


def _prob_blocks(z, E, stats, scale, max_block_bytes):
    """Yield (rows, codes, p, log p) blocks of p = softmax(scale * z E^T), stats = (row max, log-sum)."""
    row_max, log_sum = stats
    for rows, codes, s in code_blocks(z, E, "dot", scale=scale, max_block_bytes=max_block_bytes):
        log_p = s.sub_(row_max[rows, None]).sub_(log_sum[rows, None]).clamp_min_(LOG_TINY)
        p = log_p.exp().masked_fill_(log_p <= LOG_TINY, 0.0)  # no denormals (see LOG_TINY)
        yield rows, codes, p, log_p


def _soft_blocks(z, E, stats, scale, g, max_block_bytes):
    """Yield (rows, codes, p, g.e) blocks: softmax probabilities and the upstream gradient's dot with codes."""
    for rows, codes, p, _ in _prob_blocks(z, E, stats, scale, max_block_bytes):
        yield rows, codes, p, g[rows] @ E[codes].T
