"""FVQ: VQBridge projector + learning annealing (Chang et al. 2025, "Scalable Training for Vector-Quantized
Networks with 100% Codebook Utilization", arXiv 2509.10140).

The raw codebook C (K x D, K = s^2) is read as a D-channel s x s image and mapped by a small ViT
(compress -> process -> recover) to the effective codebook C' the quantizer assigns with:

    C'   = C + Bridge(C),  Bridge = patchify (Conv2d D -> 256, kernel = stride = p) -> 2 pre-norm ViT blocks
           (width 256, 4 heads, MLP ratio 2, LayerNorm without affine) -> LayerNorm -> Linear(256 -> p*p*D),
           zero-initialised -> unpatchify
    k*   = argmin_k ||z - C'_k||^2      z_q = z + sg(C'_k* - z)
    loss = mean((C'_k* - sg(z))^2) + beta mean((sg(C'_k*) - z)^2),   beta = 0.25

C is initialised U(-1/K, 1/K); C' is recomputed every step, so every code moves with the shared bridge even
when it was not selected. snce adds the bridge output to C: with the zero-initialised output layer the bridge
starts as the identity map instead of collapsing every code to 0. Patch size p = 4 up to K = 16,384 and
p = 8 above, as published. :func:`learning_annealing` is the published LR schedule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from snce.quantize.base import (
    Quantizer,
    assign,
    check_nonnegative,
    check_positive_int,
    straight_through,
    vq_losses,
)


class BridgeBlock(nn.Module):
    """Pre-norm transformer block over (1, T, W) patch tokens; LayerNorms without affine parameters."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = (
            self.qkv(self.norm1(x))
            .view(b, t, 3, self.heads, w // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        attn = F.scaled_dot_product_attention(q, k, v)  # (b, heads, t, w / heads)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.norm2(x))


class VQBridge(nn.Module):
    """Compress-process-recover map of a (K, D) codebook, K = s^2, to a (K, D) correction.

    Code k sits at pixel (k // s, k % s) of the D-channel s x s codebook image.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: int,
    ):
        super().__init__()
        self.side = math.isqrt(codebook_size)
        self.dim, self.patch = dim, patch_size
        self.patchify = nn.Conv2d(dim, width, kernel_size=patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(BridgeBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.recover = nn.Linear(width, patch_size * patch_size * dim)
        nn.init.zeros_(self.recover.weight)
        nn.init.zeros_(self.recover.bias)

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        s, p, d = self.side, self.patch, self.dim
        g = s // p  # patches per side
        image = codebook.T.reshape(1, d, s, s)
        x = self.patchify(image).flatten(2).transpose(1, 2)  # (1, g*g, width)
        for block in self.blocks:
            x = block(x)
        x = self.recover(self.norm(x))  # (1, g*g, p*p*d)
        x = x.view(g, g, p, p, d).permute(
            0, 2, 1, 3, 4
        )  # (g, p, g, p, d): pixel (gi*p + pi, gj*p + pj)
        return x.reshape(s * s, d)


class FVQuantizer(Quantizer):
    """FVQ: squared-L2 VQ over the VQBridge-projected codebook ``codebook = C + Bridge(C)``.

    Args:
        dim: D. codebook_size: K, a perfect square.
        beta: commitment weight (0.25).
        patch_size: bridge patch p (None: 4 for K <= 16,384, else 8); must divide sqrt(K).
        bridge_width, bridge_depth, bridge_heads, bridge_mlp_ratio: the bridge ViT (256, 2, 4, 2).
        usage_window: batches the reported usage is counted over.
    """

    kind = "fvq"

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        beta: float = 0.25,
        patch_size: int | None = None,
        bridge_width: int = 256,
        bridge_depth: int = 2,
        bridge_heads: int = 4,
        bridge_mlp_ratio: int = 2,
        usage_window: int = 100,
    ):
        config = dict(
            dim=dim,
            codebook_size=codebook_size,
            beta=beta,
            patch_size=patch_size,
            bridge_width=bridge_width,
            bridge_depth=bridge_depth,
            bridge_heads=bridge_heads,
            bridge_mlp_ratio=bridge_mlp_ratio,
        )
        super().__init__(dim, codebook_size, "l2", config=config, usage_window=usage_window)
        side = math.isqrt(codebook_size)
        if side * side != codebook_size:
            raise ValueError(
                f"codebook_size must be a perfect square for FVQ (the codebook is a sqrt(K) x sqrt(K) image), "
                f"got {codebook_size}"
            )
        patch = (4 if codebook_size <= 16384 else 8) if patch_size is None else patch_size
        check_positive_int(patch, "patch_size")
        if side % patch:
            raise ValueError(f"patch_size must divide sqrt(codebook_size) = {side}, got {patch}")
        for name, value in (
            ("bridge_width", bridge_width),
            ("bridge_depth", bridge_depth),
            ("bridge_heads", bridge_heads),
            ("bridge_mlp_ratio", bridge_mlp_ratio),
        ):
            check_positive_int(value, name)
        if bridge_width % bridge_heads:
            raise ValueError(
                f"bridge_width ({bridge_width}) must be divisible by bridge_heads ({bridge_heads})"
            )
        self.beta = check_nonnegative(beta, "beta")
        self.embed = nn.Parameter(
            torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        )
        self.bridge = VQBridge(
            dim,
            codebook_size,
            patch_size=patch,
            width=bridge_width,
            depth=bridge_depth,
            heads=bridge_heads,
            mlp_ratio=bridge_mlp_ratio,
        )

    @property
    def codebook(self) -> torch.Tensor:
        """C' = C + Bridge(C), recomputed on every access (detach it to export a plain codebook)."""
        return self.embed + self.bridge(self.embed)

    def quantize(self, z):
        zq, indices = assign(z, self.codebook, "l2")
        commitment, codebook_loss = vq_losses(z, zq)
        loss = codebook_loss + self.beta * commitment
        stats = {
            "commitment": float(commitment.detach()),
            "codebook_loss": float(codebook_loss.detach()),
        }
        return straight_through(z, zq), indices, loss, stats


def learning_annealing(
    step: int,
    total_steps: int,
    warmup_steps: int,
    *,
    start: float = 0.005,
    flat: float = 0.3,
    end: float = 0.01,
) -> float:
    """FVQ's LR multiplier at ``step``: linear warm-up start -> 1 over ``warmup_steps`` (4 epochs in the
    paper), 1 for the first ``flat`` fraction of the remaining steps, then linear 1 -> ``end`` at
    ``total_steps`` (held at ``end`` after it)."""
    if step < warmup_steps:
        return start + (1.0 - start) * step / warmup_steps
    rest = total_steps - warmup_steps
    decay_start = warmup_steps + flat * rest
    if step <= decay_start:
        return 1.0
    frac = min(1.0, (step - decay_start) / max(1e-12, total_steps - decay_start))
    return 1.0 + (end - 1.0) * frac


def learning_annealing_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, **kwargs
) -> LambdaLR:
    """``LambdaLR`` applying :func:`learning_annealing` (step the scheduler once per optimizer step)."""
    check_positive_int(total_steps, "total_steps")
    if not (isinstance(warmup_steps, int) and 0 <= warmup_steps <= total_steps):
        raise ValueError(
            f"warmup_steps must be an int in [0, total_steps={total_steps}], got {warmup_steps!r}"
        )
    return LambdaLR(
        optimizer, lambda step: learning_annealing(step, total_steps, warmup_steps, **kwargs)
    )
