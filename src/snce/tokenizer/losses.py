"""Tokenizer training objective: reconstruction, perceptual, quantizer and PatchGAN terms.

Generator side (encoder, quantizer, decoder):

    L_G = rec(x, x^) + w_p * perceptual(x, x^) + quantizer.loss [+ quantizer.contrastive_loss(x, x^)]
          + [step >= disc_start] * w_d * lambda * (-mean D(x^))
    lambda = ||grad_W rec-terms|| / (||grad_W (-mean D(x^))|| + 1e-4), W = decoder output conv, clamped to
             [0, 1e4] (the adaptive weight of VQGAN, arXiv 2012.09841 eq. 7); lambda = 1 when adaptive is off.

Discriminator side: L_D = [step >= disc_start] * hinge(D(x), D(sg(x^))).

Both sides are summed into one loss for one optimizer: L_D sees the reconstruction detached, and L_G sees
the discriminator through detached copies of its weights, so each term only moves its own network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from snce.config import Config, ConfigError
from snce.tokenizer.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from snce.tokenizer.model import Tokenizer


@dataclass
class LossConfig(Config):
    """The ``loss:`` section of a tokenizer run."""

    reconstruction: Literal["l1", "l2"] = "l1"
    perceptual_weight: float = 0.0  # > 0 needs perceptual_weights
    perceptual_weights: str | None = (
        None  # local VGG-19 state dict (torchvision layout); never downloaded
    )
    disc_weight: float = 0.0  # 0 = no discriminator
    disc_start: int = 0  # optimizer step at which the GAN terms switch on
    disc_channels: int = 64
    disc_layers: int = 2  # stride-2 layers; images need >= 3 * 2 ** disc_layers px
    adaptive_weight: bool = True

    def check(self) -> None:
        for name in ("perceptual_weight", "disc_weight", "disc_start"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.perceptual_weight > 0:
            if self.perceptual_weights is None:
                raise ConfigError(
                    "perceptual_weights",
                    "a local VGG-19 weight file is required when perceptual_weight > 0",
                )
            if not Path(self.perceptual_weights).is_file():
                raise ConfigError(
                    "perceptual_weights",
                    f"expected an existing file, got {self.perceptual_weights!r}",
                )
        if self.disc_channels < 1 or self.disc_layers < 1:
            raise ConfigError("disc_layers", "disc_channels and disc_layers must be >= 1")


def reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor, kind: str) -> torch.Tensor:
    return F.l1_loss(x_rec, x) if kind == "l1" else F.mse_loss(x_rec, x)


def perceptual_distance(
    features_a: list[torch.Tensor], features_b: list[torch.Tensor]
) -> torch.Tensor:
    """LPIPS-style distance with uniform channel weights: sum over taps of the mean squared difference of
    channel-normalised features. Lists of (B, C_l, H_l, W_l) -> scalar."""
    total = 0.0
    for a, b in zip(features_a, features_b, strict=True):
        a, b = F.normalize(a, dim=1, eps=1e-10), F.normalize(b, dim=1, eps=1e-10)
        total = total + ((a - b) ** 2).sum(1).mean()
    return total


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
) -> torch.Tensor:
    """VQGAN's lambda: gradient-norm ratio of the reconstruction and adversarial terms at ``last_layer``."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class TokenizerObjective(nn.Module):
    """Tokenizer plus discriminator as one module whose ``forward(images, step)`` returns (loss, logs).

    Wrapping the whole objective in one module lets DDP see every parameter in one forward. The frozen
    VGG-19 of the perceptual term is kept out of the module tree (``self._vgg``) so it stays out of the
    optimizer and of checkpoints.
    """

    def __init__(self, tokenizer: Tokenizer, cfg: LossConfig):
        super().__init__()
        self.tokenizer, self.cfg = tokenizer, cfg
        in_ch = tokenizer.config.in_channels
        self.discriminator = (
            PatchDiscriminator(in_ch, cfg.disc_channels, cfg.disc_layers)
            if cfg.disc_weight > 0
            else None
        )
        self._vgg: list[nn.Module] = []
        if cfg.perceptual_weight > 0:
            from snce.quantize.regvq import VGG19Features

            self._vgg.append(VGG19Features.from_file(cfg.perceptual_weights))

    def perceptual(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        vgg = self._vgg[0].to(x.device)
        if x.shape[1] == 1:
            x, x_rec = x.expand(-1, 3, -1, -1), x_rec.expand(-1, 3, -1, -1)
        with torch.no_grad():
            target = vgg(x)
        return perceptual_distance(vgg(x_rec), target)

    def forward(
        self, images: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        out = self.tokenizer(images)
        x_rec = out.reconstruction
        rec = reconstruction_loss(images, x_rec, cfg.reconstruction)
        logs = {"rec": rec.detach(), "quant": out.quant.loss.detach()}
        nll = rec
        if self._vgg:
            perc = self.perceptual(images, x_rec)
            nll = nll + cfg.perceptual_weight * perc
            logs["perceptual"] = perc.detach()
        loss = nll + out.quant.loss
        contrastive = getattr(self.tokenizer.quantizer, "contrastive_loss", None)
        if contrastive is not None:
            extra = contrastive(images, x_rec)
            loss = loss + extra
            logs["contrastive"] = extra.detach()
        for k, v in out.quant.stats.items():
            logs[f"quantizer/{k}"] = torch.tensor(float(v))
        if self.discriminator is not None and step >= cfg.disc_start:
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            g_loss = hinge_g_loss(functional_call(self.discriminator, frozen, (x_rec,)))
            lam = (
                adaptive_weight(nll, g_loss, self.tokenizer.decoder.last_layer)
                if cfg.adaptive_weight and self.training
                else torch.ones((), device=images.device)
            )
            d_loss = hinge_d_loss(self.discriminator(images), self.discriminator(x_rec.detach()))
            loss = loss + cfg.disc_weight * lam * g_loss + d_loss
            logs.update(g_loss=g_loss.detach(), d_loss=d_loss.detach(), adaptive_weight=lam)
        return loss, logs
