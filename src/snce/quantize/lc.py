"""VQGAN-LC: a large frozen codebook with a trainable projector (Zhu et al. 2024, arXiv 2406.11837).

The base codebook B (K x D0) is given (in the paper: 100,000 k-means centres of CLIP ViT-L/14 patch features;
here any (K, D0) tensor, e.g. encoder features or their k-means centres) and stays frozen. A linear projector
P (D0 -> D, with bias, weight ~ N(0, D^-1/2)) maps it into the latent space:

    C'   = P(B)                          k* = argmin_k ||z - C'_k||^2       z_q = z + sg(C'_k* - z)
    loss = loss_weight * (mean((sg(C'_k*) - z)^2) + codebook_weight * mean((C'_k* - sg(z))^2))
           (loss_weight 0.1, codebook_weight 0.33 as released)

Only P is trained, so every code moves with it. The base features are a buffer: they travel in the state
dict, not in ``config``. ``LCQuantizer(**config)`` builds an empty base (``pending_init``) that either
``load_state_dict`` fills or :meth:`LCQuantizer.init_codebook` sets to the k-means centres of real features
(``snce tokenizer train`` does this with the encoder's latents over the training set); quantizing with an
empty base is an error, not an all-zero codebook that sends every token to code 0.
"""

from __future__ import annotations

import torch
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


class LCQuantizer(Quantizer):
    """Frozen (K, D0) base codebook + trainable Linear(D0 -> D) projector; squared-L2 assignment.

    Args:
        dim: D.
        base_features: (K, D0) float tensor of base code features, or None with ``codebook_size`` and
            ``feature_dim`` (weights then come from a state dict).
        codebook_size, feature_dim: K and D0; checked against ``base_features`` when both are given.
        codebook_weight: weight of the codebook term (0.33). loss_weight: overall weight (0.1).
        kmeans_points, kmeans_iters: at most this many features (drawn without replacement) and Lloyd
            iterations for :meth:`init_codebook`.
        usage_window: batches the reported usage is counted over.
    """

    kind = "lc"

    def __init__(
        self,
        dim: int,
        base_features: torch.Tensor | None = None,
        *,
        codebook_size: int | None = None,
        feature_dim: int | None = None,
        codebook_weight: float = 0.33,
        loss_weight: float = 0.1,
        kmeans_points: int = 262_144,
        kmeans_iters: int = 10,
        usage_window: int = 100,
    ):
        if base_features is not None:
            if not torch.is_tensor(base_features) or not base_features.is_floating_point():
                raise TypeError(
                    f"base_features must be a floating (K, D0) tensor, got {type(base_features).__name__}"
                )
            if base_features.dim() != 2:
                raise ValueError(
                    f"base_features must be a (K, D0) tensor (rank 2), got shape {tuple(base_features.shape)}"
                )
            if not bool(torch.isfinite(base_features).all()):
                raise ValueError("base_features contain NaN or Inf values")
            for name, given, actual in (
                ("codebook_size", codebook_size, base_features.shape[0]),
                ("feature_dim", feature_dim, base_features.shape[1]),
            ):
                if given is not None and given != actual:
                    raise ValueError(
                        f"{name}={given} does not match base_features of shape {tuple(base_features.shape)}"
                    )
            codebook_size, feature_dim = base_features.shape
        elif codebook_size is None or feature_dim is None:
            raise ValueError(
                "pass base_features (K, D0), or codebook_size and feature_dim to load weights later"
            )
        check_positive_int(feature_dim, "feature_dim")
        config = dict(
            dim=dim,
            codebook_size=codebook_size,
            feature_dim=feature_dim,
            codebook_weight=codebook_weight,
            loss_weight=loss_weight,
            kmeans_points=kmeans_points,
            kmeans_iters=kmeans_iters,
        )
        super().__init__(dim, codebook_size, "l2", config=config, usage_window=usage_window)
        self.codebook_weight = check_nonnegative(codebook_weight, "codebook_weight")
        self.loss_weight = check_nonnegative(loss_weight, "loss_weight")
        self.kmeans_points = check_positive_int(kmeans_points, "kmeans_points")
        self.kmeans_iters = check_positive_int(kmeans_iters, "kmeans_iters")
        base = (
            torch.zeros(codebook_size, feature_dim)
            if base_features is None
            else base_features.detach().float()
        )
        self.register_buffer("base", base.clone())
        self.register_buffer("initialized", torch.tensor(base_features is not None))
        self.projector = nn.Linear(feature_dim, dim)
        nn.init.normal_(self.projector.weight, std=dim**-0.5)
        nn.init.zeros_(self.projector.bias)

    @property
    def codebook(self) -> torch.Tensor:
        """C' = P(B): (K, D)."""
        return self.projector(self.base)

    @property
    def pending_init(self) -> bool:
        """True while the base features are empty (built from ``config`` and not yet loaded or initialised)."""
        return not bool(self.initialized)

    @torch.no_grad()
    def init_codebook(
        self,
        features: torch.Tensor,
        *,
        max_points: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Set the base to the K k-means centres (squared l2, distinct initial centres) of ``features``
        (N, D0), e.g. the encoder's latents over the training set; ``max_points`` (default ``kmeans_points``)
        caps the rows used, drawn without replacement with ``generator``."""
        D0 = self.base.shape[1]
        if not (torch.is_tensor(features) and features.dim() == 2 and features.shape[1] == D0):
            raise ValueError(
                f"features must be a (N, {D0}) tensor (feature_dim = {D0}), got {getattr(features, 'shape', features)}"
            )
        centres, _ = kmeans(
            features.detach().float(),
            self.codebook_size,
            iters=self.kmeans_iters,
            max_points=self.kmeans_points if max_points is None else max_points,
            generator=generator,
        )
        self.base.copy_(centres)
        self.initialized.fill_(True)

    def quantize(self, z):
        if self.pending_init:
            raise ValueError(
                "the LC quantizer's base features are empty: set them with init_codebook(features) "
                "(snce tokenizer train does, from the encoder's latents) or load a state dict that holds them"
            )
        zq, indices = assign(z, self.codebook, "l2")
        commitment, codebook_loss = vq_losses(z, zq)
        loss = self.loss_weight * (commitment + self.codebook_weight * codebook_loss)
        stats = {
            "commitment": float(commitment.detach()),
            "codebook_loss": float(codebook_loss.detach()),
        }
        return straight_through(z, zq), indices, loss, stats
