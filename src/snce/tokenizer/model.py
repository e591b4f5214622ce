"""VQGAN-style convolutional image tokenizer around any snce quantizer.

    images (B, C, H, W) in [-1, 1]
      -> Encoder -> latents z (B, D, h, w), h = H / f, f = 2 ** (len(channel_mult) - 1)
      -> quantizer -> indices (B, h, w) and code vectors (B, D, h, w)
      -> Decoder -> reconstruction (B, C, H, W)

Architecture after Esser et al., "Taming Transformers" (arXiv 2012.09841): residual blocks of
GroupNorm-SiLU-conv, strided-conv downsampling, nearest-neighbour upsampling, an optional single-head
self-attention in the middle. GroupNorm (never BatchNorm) keeps every image independent of its batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from snce.config import Config, ConfigError, atomic_write_text
from snce.files import check_file, record_checksums, verified
from snce.quantize import Quantizer, QuantizerOutput, build_quantizer, check_quantizer_config
from snce.tokenizer.magvit2 import MAGVIT2Decoder, MAGVIT2Encoder
from snce.tokenizer.maskgit import MaskGITDecoder, MaskGITEncoder
from snce.tokenizer.taming import TamingDecoder, TamingEncoder

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


@dataclass
class TokenizerConfig(Config):
    """Shape of a tokenizer. ``quantizer`` is a ``snce.quantize.build_quantizer`` config; its ``dim`` is
    ``latent_channels`` (filled in when absent)."""

    in_channels: int = 3  # image channels (1 for digits)
    channels: int = 64  # width of the first level
    channel_mult: tuple[int, ...] = (
        1,
        2,
        2,
    )  # width multipliers per level; downsampling 2 ** (levels - 1)
    num_res_blocks: int = 1  # residual blocks per level
    mid_attention: bool = (
        False  # self-attention in the middle blocks (costly at large latent grids)
    )
    latent_channels: int = 8  # D: encoder output and code dimension
    quantizer: dict = field(default_factory=lambda: {"kind": "vq", "codebook_size": 1024})
    # "snce" (this module's encoder and decoder) or the layout of an imported tokenizer: "taming"
    # (taming-transformers, LlamaGen, IBQ, VQGAN-LC; snce.tokenizer.taming), "maskgit" (MaskBit's port),
    # "open-magvit2" (Open-MAGVIT2's LFQ tokenizer; snce.tokenizer.magvit2).
    architecture: str = "snce"
    z_channels: int | None = None  # taming: encoder output width before the 1x1 quant_conv to the codes
    attn_levels: tuple[int, ...] = ()  # taming: levels (0 = full resolution) with attention after each block

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def check(self) -> None:
        if self.in_channels not in (1, 3):
            raise ConfigError("in_channels", f"expected 1 or 3, got {self.in_channels}")
        for name in ("channels", "num_res_blocks", "latent_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if not 1 <= len(self.channel_mult) <= 5 or min(self.channel_mult) < 1:
            raise ConfigError(
                "channel_mult",
                f"expected 1 to 5 positive ints (downsampling 1..16), got {list(self.channel_mult)}",
            )
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                "architecture", f"expected one of {sorted(ARCHITECTURES)}, got {self.architecture!r}"
            )
        if self.architecture == "snce" and (self.z_channels is not None or self.attn_levels):
            raise ConfigError(
                "architecture", "z_channels and attn_levels belong to imported layouts (e.g. 'taming')"
            )
        if self.architecture != "snce":  # imported layouts: GroupNorm with 32 groups everywhere
            for width in (self.channels, *(self.channels * m for m in self.channel_mult)):
                if width % 32:
                    raise ConfigError(
                        "channels", f"{self.architecture}'s GroupNorm has 32 groups: channels and each "
                        f"level's width (channels x channel_mult) must be multiples of 32, got {width}"
                    )  # fmt: skip
        if self.architecture == "taming":
            bad = [level for level in self.attn_levels if not 0 <= level < len(self.channel_mult)]
            if bad:
                raise ConfigError(
                    "attn_levels", f"levels run from 0 to {len(self.channel_mult) - 1}, got {bad}"
                )
        if self.architecture in ("maskgit", "open-magvit2") and (
            self.mid_attention or self.attn_levels or self.z_channels is not None
        ):
            raise ConfigError(
                "architecture", f"{self.architecture} has no attention and no z_channels (its "
                "conv_out gives the codes): leave mid_attention, attn_levels and z_channels unset"
            )  # fmt: skip
        if "kind" not in self.quantizer:
            raise ConfigError(
                "quantizer", f"needs a 'kind' (e.g. vq, ibq, fvq, lc, regvq), got {self.quantizer}"
            )
        dim = self.quantizer.get("dim", self.latent_channels)
        if dim != self.latent_channels:
            raise ConfigError(
                "quantizer.dim", f"must equal latent_channels={self.latent_channels}, got {dim}"
            )
        self.check_quantizer()

    def quantizer_options(self) -> dict:
        """``quantizer`` with its code dimension filled in (and, for a new LC quantizer, its base's
        feature dimension: the base is then the k-means centres of the encoder's latents)."""
        defaults = {"dim": self.latent_channels}
        if self.quantizer.get("kind") == "lc":
            defaults["feature_dim"] = self.latent_channels
        return {**defaults, **self.quantizer}

    def check_quantizer(self) -> None:
        """The quantizer options as ``build_quantizer`` would take them (without allocating the codebook)."""
        try:
            check_quantizer_config(self.quantizer_options())
        except (TypeError, ValueError) as e:
            raise ConfigError("quantizer", f"{e} (in {self.quantizer})") from None


class Encoded(NamedTuple):
    latents: torch.Tensor  # (B, D, h, w) encoder outputs, the inputs of the quantizer
    indices: torch.Tensor  # (B, h, w) long code indices


class TokenizerOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, C, H, W)
    latents: torch.Tensor  # (B, D, h, w)
    quant: QuantizerOutput  # .quantized, .indices (B, h, w), .loss, .stats


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(
            norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1), norm(cout), nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
        )  # fmt: skip
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.block(x)


class Attention(nn.Module):
    """Single-head self-attention over the h*w positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm, self.qkv, self.out = (
            norm(channels),
            nn.Conv2d(channels, 3 * channels, 1),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = (
            self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        )  # (B, hw, C) each
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


def _middle(channels: int, attention: bool) -> nn.Sequential:
    blocks = [ResBlock(channels, channels)]
    if attention:
        blocks.append(Attention(channels))
    return nn.Sequential(*blocks, ResBlock(channels, channels))


class Encoder(nn.Module):
    """(B, C, H, W) -> (B, D, H / f, W / f)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, cfg.channels, 3, padding=1)]
        cin = cfg.channels
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin, width))
                cin = width
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        layers += [
            _middle(cin, cfg.mid_attention),
            norm(cin),
            nn.SiLU(),
            nn.Conv2d(cin, cfg.latent_channels, 3, padding=1),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class Decoder(nn.Module):
    """(B, D, h, w) -> (B, C, h * f, w * f)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        cin = widths[-1]
        layers: list[nn.Module] = [
            nn.Conv2d(cfg.latent_channels, cin, 3, padding=1),
            _middle(cin, cfg.mid_attention),
        ]
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResBlock(cin, widths[level]))
                cin = widths[level]
            if level > 0:
                layers += [
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(cin, cin, 3, padding=1),
                ]
        layers += [norm(cin), nn.SiLU()]
        self.layers = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the output convolution (the adaptive GAN weight balances gradients there)."""
        return self.conv_out.weight

    def forward(self, z):
        return self.conv_out(self.layers(z))


ARCHITECTURES = {
    "snce": (Encoder, Decoder),
    "taming": (TamingEncoder, TamingDecoder),
    "maskgit": (MaskGITEncoder, MaskGITDecoder),
    "open-magvit2": (MAGVIT2Encoder, MAGVIT2Decoder),
}


class Tokenizer(nn.Module):
    """Encoder + quantizer + decoder. Call ``.eval()`` before :meth:`encode` / :meth:`decode` for tokens:
    in training mode some quantizers update their codebook on every forward."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.config = cfg
        encoder, decoder = ARCHITECTURES[cfg.architecture]
        self.encoder = encoder(cfg)
        self.quantizer: Quantizer = build_quantizer(cfg.quantizer_options())
        self.decoder = decoder(cfg)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def _check_images(self, images: torch.Tensor) -> None:
        c, f = self.config.in_channels, self.config.downsample
        if not (torch.is_tensor(images) and images.dim() == 4 and images.is_floating_point()):
            raise ValueError(
                f"images must be a float (B, {c}, H, W) tensor, got {getattr(images, 'shape', images)}"
            )
        if images.shape[1] != c or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"images must be (B, {c}, H, W) with H and W multiples of the downsampling {f}, "
                f"got {tuple(images.shape)}"
            )

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        self._check_images(images)
        z = self.encoder(images)
        quant = self.quantizer(z)
        return TokenizerOutput(self.decoder(quant.quantized), z, quant)

    def encode(self, images: torch.Tensor) -> Encoded:
        """images (B, C, H, W) in [-1, 1] -> (latents (B, D, h, w), indices (B, h, w))."""
        self._check_images(images)
        z = self.encoder(images)
        return Encoded(z, self.quantizer(z).indices)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w), or (B, L) with L a square number (raster order) -> images (B, C, H, W)."""
        if indices.dim() == 2:
            side = math.isqrt(indices.shape[1])
            if side * side != indices.shape[1]:
                raise ValueError(
                    f"(B, L) indices need a square L, got L={indices.shape[1]}; pass (B, h, w)"
                )
            indices = indices.reshape(indices.shape[0], side, side)
        if indices.dim() != 3:
            raise ValueError(
                f"indices must be (B, h, w) or (B, L), got shape {tuple(indices.shape)}"
            )
        return self.decoder(self.quantizer.lookup(indices))

    def codebook_hash(self) -> str:
        """sha256 of the quantizer's weights, which fix the codebook: identifies what indices mean.
        A quantizer without weights (LFQ's implicit codebook) is identified by its kind and size."""
        h = hashlib.sha256(self.quantizer.metric.encode())
        if not self.quantizer.state_dict():
            q = self.quantizer
            h.update(f"{q.config['kind']}:{q.codebook_size}:{q.dim}".encode())
        for name, t in sorted(self.quantizer.state_dict().items()):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            flat = t.detach().cpu().contiguous().reshape(-1)  # 1-D: any dtype views as bytes
            h.update(flat.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def full_config(self) -> dict:
        """The config dict with every quantizer option spelled out (what ``save_pretrained`` writes)."""
        return {**self.config.to_dict(), "quantizer": self.quantizer.config}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (each file atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
        save_model(self, str(tmp))
        os.replace(tmp, directory / WEIGHTS_FILE)
        atomic_write_text(directory / CONFIG_FILE, json.dumps(self.full_config(), indent=2) + "\n")
        record_checksums(directory, [WEIGHTS_FILE, CONFIG_FILE])
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device = "cpu"
    ) -> Tokenizer:
        """Load a tokenizer written by :meth:`save_pretrained`, in eval mode."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"{directory} holds no tokenizer ({CONFIG_FILE} + {WEIGHTS_FILE} expected)"
            )
        check_file(directory / CONFIG_FILE)
        model = cls(TokenizerConfig.load_json(directory / CONFIG_FILE))
        with verified(directory / WEIGHTS_FILE) as weights:
            load_model(model, str(weights), strict=True, device=str(device))
        return model.to(device).eval()
