"""Plain vector quantization (VQ-VAE, van den Oord et al. 2017, arXiv 1711.00937), LlamaGen style.

    k*  = argmin_k d(z, e_k)          d = squared L2, or cosine on l2-normalised z and codes (LlamaGen)
    z_q = z + sg(e_k* - z)            straight-through estimator
    loss = beta * mean((sg(e_k*) - z)^2)  [+ mean((e_k* - sg(z))^2) when the codebook learns by gradient]

With ``ema_decay`` set, the codebook is not a parameter but an exponential moving average of the latents
assigned to each code (VQ-VAE appendix; the same update as vector-quantize-pytorch):

    n_k <- decay n_k + (1 - decay) count_k        m_k <- decay m_k + (1 - decay) sum_{i: k*_i = k} z_i
    e_k  = m_k / ñ_k,   ñ_k = (n_k + eps) / (sum n + K eps) * sum n   (Laplace smoothing)

Optional: k-means initialisation (:func:`snce.quantize.base.kmeans`: distinct initial centres, exact Lloyd
iterations), and restarts of codes whose running assignment count ``n_k`` falls below ``dead_code_threshold``
(they move to random latents of the current batch). The tokenizer pipeline runs the k-means on latents drawn
from the whole training set before the first step (``snce.tokenizer.pipeline.init_codebook_from_data``); a
quantizer used on its own falls back to the first batch it sees in a forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from snce.quantize.base import (
    Quantizer,
    assign,
    check_nonnegative,
    check_positive_int,
    kmeans,
    straight_through,
    vq_losses,
)


class VectorQuantizer(Quantizer):
    """Nearest-code VQ with commitment loss and either a learned (gradient) or an EMA codebook.

    Args:
        dim: D. codebook_size: K.
        metric: "l2" (squared L2) or "cosine" (latents and codes l2-normalised; ``codebook`` holds unit codes).
        beta: commitment weight (0.25 in VQ-VAE / LlamaGen).
        ema_decay: None -> the codebook is a parameter trained by the codebook loss; a float in [0, 1) -> EMA
            updates with this decay in training mode (no codebook loss).
        eps: Laplace smoothing of the EMA cluster sizes.
        kmeans_init: initialise the codebook by k-means: from the training set's latents when the tokenizer
            pipeline trains it, else from the first batch the quantizer sees. ``initialized`` (a buffer, kept
            in checkpoints) is False until then.
        kmeans_iters: Lloyd iterations of that initialisation.
        kmeans_points: at most this many latents (drawn without replacement) enter the k-means. One Lloyd
            iteration is an exact search over N x K scores: 6-25 s for N = 262,144, K = 16,384, D = 8 on a
            2-core CPU (idle to busy).
        dead_code_threshold: in training, codes whose running assignment count (EMA with ``ema_decay``, or 0.99
            without EMA) falls below this are restarted at random latents of the batch; 0 disables restarts.
        usage_window: batches the reported usage is counted over.
    Shape:
        z: (B, D, H, W) or (B, L, D); see :class:`snce.quantize.base.Quantizer`.
    """

    kind = "vq"

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        metric: str = "l2",
        beta: float = 0.25,
        ema_decay: float | None = None,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        kmeans_points: int = 262_144,
        dead_code_threshold: float = 0.0,
        usage_window: int = 100,
    ):
        config = dict(
            dim=dim,
            codebook_size=codebook_size,
            metric=metric,
            beta=beta,
            ema_decay=ema_decay,
            eps=eps,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            kmeans_points=kmeans_points,
            dead_code_threshold=dead_code_threshold,
        )
        super().__init__(dim, codebook_size, metric, config=config, usage_window=usage_window)
        if metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine' for VectorQuantizer, got {metric!r}")
        if ema_decay is not None and not (
            isinstance(ema_decay, (int, float)) and 0 <= ema_decay < 1
        ):
            raise ValueError(f"ema_decay must be None or a number in [0, 1), got {ema_decay!r}")
        self.beta = check_nonnegative(beta, "beta")
        self.eps = check_nonnegative(eps, "eps")
        self.kmeans_iters = check_positive_int(kmeans_iters, "kmeans_iters")
        self.kmeans_points = check_positive_int(kmeans_points, "kmeans_points")
        self.dead_code_threshold = check_nonnegative(dead_code_threshold, "dead_code_threshold")
        self.ema_decay = ema_decay
        self.count_decay = 0.99 if ema_decay is None else float(ema_decay)

        # Taming-VQGAN / LlamaGen init: U(-1/K, 1/K), unit rows under cosine.
        embed = torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if metric == "cosine":
            embed = F.normalize(embed, dim=-1)
        if ema_decay is None:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
            self.register_buffer(
                "embed_avg", embed.clone()
            )  # m_k, with a pseudo-count of 1 per code
        self.register_buffer("cluster_size", torch.ones(codebook_size))  # n_k
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    @property
    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embed, dim=-1) if self.metric == "cosine" else self.embed

    def quantize(self, z):
        zs = F.normalize(z, dim=-1) if self.metric == "cosine" else z  # the space codes live in
        if not bool(self.initialized):  # no init from the data happened: k-means on this batch
            self.init_codebook(zs)
        zq, indices = assign(zs, self.codebook, self.metric)
        commitment, codebook_loss = vq_losses(zs, zq)
        loss = self.beta * commitment
        stats = {"commitment": float(commitment.detach())}
        if self.ema_decay is None:
            loss = loss + codebook_loss
            stats["codebook_loss"] = float(codebook_loss.detach())
        if self.training:
            self._update_codebook(zs.detach().float(), indices)
        return straight_through(zs, zq), indices, loss, stats

    @property
    def pending_init(self) -> bool:
        """True while a k-means initialisation is asked for (``kmeans_init``) and has not happened yet."""
        return not bool(self.initialized)

    @torch.no_grad()
    def init_codebook(
        self,
        z: torch.Tensor,
        *,
        max_points: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """k-means initialisation from latents z (N, D), as the quantizer receives them (flattened).

        Under "cosine" the latents are l2-normalised, as :meth:`quantize` does. ``max_points`` (default
        ``kmeans_points``) caps the rows used, drawn without replacement; ``generator`` (CPU) seeds the draws.
        The initial centres are distinct (see :func:`snce.quantize.base.kmeans`); sets ``initialized``.
        """
        if not (torch.is_tensor(z) and z.dim() == 2 and z.shape[1] == self.dim):
            raise ValueError(
                f"z must be a (N, {self.dim}) tensor of latents, got {getattr(z, 'shape', z)}"
            )
        centres, sizes = kmeans(
            z.detach().float(),
            self.codebook_size,
            iters=self.kmeans_iters,
            metric=self.metric,
            max_points=self.kmeans_points if max_points is None else max_points,
            generator=generator,
        )
        self.cluster_size.copy_(sizes)
        if self.ema_decay is None:
            self.embed.copy_(centres)
        else:
            # m_k = n_k e_k as vector-quantize-pytorch does; an empty cluster gets m_k = ñ_k e_k instead, so
            # that its code stays at its (distinct) centre rather than collapsing to 0 with the other empty ones.
            n = sizes.sum()
            smoothed = (sizes + self.eps) / (n + self.codebook_size * self.eps) * n
            weight = torch.where(sizes > 0, sizes, smoothed)
            self.embed_avg.copy_(centres * weight[:, None])
            self._embed_from_averages()
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update_codebook(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        """Running cluster sizes, EMA codebook update and dead-code restarts (training mode)."""
        counts = torch.bincount(indices, minlength=self.codebook_size).float()
        self.cluster_size.lerp_(counts, 1.0 - self.count_decay)
        if self.ema_decay is not None:
            sums = torch.zeros_like(self.embed_avg).index_add_(0, indices, z)
            self.embed_avg.lerp_(sums, 1.0 - self.ema_decay)
            self._embed_from_averages()
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(z)

    def _embed_from_averages(self) -> None:
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        embed = self.embed_avg / smoothed[:, None]
        self.embed.copy_(F.normalize(embed, dim=-1) if self.metric == "cosine" else embed)

    def _restart_dead_codes(self, z: torch.Tensor) -> None:
        dead = (self.cluster_size < self.dead_code_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        dead = dead[
            torch.randperm(dead.numel(), device=dead.device)[: z.shape[0]]
        ]  # at most one per latent
        samples = z[torch.randperm(z.shape[0], device=z.device)[: dead.numel()]]
        self.embed.data[dead] = samples.to(self.embed.dtype)
        self.cluster_size[dead] = self.dead_code_threshold
        if self.ema_decay is not None:
            self.embed_avg[dead] = samples * self.dead_code_threshold
