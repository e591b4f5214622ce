"""PatchGAN discriminator (Isola et al., pix2pix, arXiv 1611.07004; as used by VQGAN) and the hinge losses.

GroupNorm replaces the original BatchNorm so a sample's logits never depend on the rest of its batch (which
also keeps a DDP run equal to a single-process run on the combined batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from snce.tokenizer.model import norm


class PatchDiscriminator(nn.Module):
    """(B, C, H, W) images -> (B, 1, h', w') real/fake logits, one per overlapping patch.

    ``layers`` stride-2 4x4 convolutions (width doubling, capped at 8x), then two stride-1 4x4 convolutions;
    each stride-1 conv shrinks the map by one pixel, so H must be at least 2 ** layers * 3.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.layers = layers
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers):
            nxt = channels * min(2**i, 8)
            blocks += [nn.Conv2d(width, nxt, 4, 2, 1), norm(nxt), nn.LeakyReLU(0.2)]
            width = nxt
        nxt = channels * min(2**layers, 8)
        blocks += [
            nn.Conv2d(width, nxt, 4, 1, 1),
            norm(nxt),
            nn.LeakyReLU(0.2),
            nn.Conv2d(nxt, 1, 4, 1, 1),
        ]
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < 3 * 2**self.layers:
            raise ValueError(
                f"images of {tuple(x.shape[-2:])} px are too small for a {self.layers}-layer PatchGAN "
                f"(needs >= {3 * 2**self.layers} px); lower loss.disc_layers"
            )
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: (mean relu(1 - D(x)) + mean relu(1 + D(G(z)))) / 2."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -mean D(G(z))."""
    return -fake_logits.mean()
