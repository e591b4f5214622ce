"""The taming-transformers VQGAN encoder and decoder, module for module (Esser et al., arXiv 2012.09841).

LlamaGen's VQ-8/VQ-16, SEED-Voken's IBQ and VQGAN-LC publish tokenizers with this architecture (LlamaGen
under other module names), so one implementation, with taming's own parameter names, serves every imported
tokenizer of the family (``snce.tokenizer.formats``). Numerics as in ``taming/modules/diffusionmodules/model.py``:

- GroupNorm(32 groups, eps 1e-6), swish x * sigmoid(x);
- residual block: norm1, swish, conv1 3x3, norm2, swish, conv2 3x3; a 1x1 ``nin_shortcut`` when widths differ;
- attention: one head over the h*w positions, 1x1 q/k/v/proj_out convs, scale C^-1/2;
- downsampling: zero-pad right and bottom by one, 3x3 conv with stride 2 and no padding;
- upsampling: nearest-neighbour x2, then a 3x3 conv;
- level i (0 = full resolution) has ``num_res_blocks`` blocks in the encoder and one more in the decoder,
  each followed by attention when i is in ``attn_levels``; the decoder's ``up`` list is stored by level
  (``up.0`` is the full resolution) and run from the last level to the first;
- ``quant_conv`` (1x1, z_channels -> code dim) ends the encoder, ``post_quant_conv`` (1x1, code dim ->
  z_channels) starts the decoder, so encoder and decoder speak in code vectors like snce's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (
            conv(y).reshape(b, c, h * w).transpose(1, 2) for conv in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # (B, hw, C), softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: residual blocks, each followed by attention when ``attention``, then a resampler."""

    def __init__(self, cin: int, cout: int, blocks: int, attention: bool):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(cin if j == 0 else cout, cout) for j in range(blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(cout) for _ in range(blocks if attention else 0))

    def forward(self, h):
        for j, block in enumerate(self.block):
            h = block(h)
            if self.attn:
                h = self.attn[j](h)
        return h


class Middle(nn.Module):
    def __init__(self, channels: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        if attention:
            self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h):
        h = self.block_1(h)
        if hasattr(self, "attn_1"):
            h = self.attn_1(h)
        return self.block_2(h)


def _z_channels(cfg) -> int:
    return cfg.z_channels or cfg.latent_channels


class TamingEncoder(nn.Module):
    """(B, C, H, W) in [-1, 1] -> (B, D, H / f, W / f) code-space latents (after ``quant_conv``)."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.channels
        for level, width in enumerate(widths):
            stage = Level(cin, width, cfg.num_res_blocks, level in cfg.attn_levels)
            if level < len(widths) - 1:
                stage.downsample = Downsample(width)
            self.down.append(stage)
            cin = width
        self.mid = Middle(cin, cfg.mid_attention)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, _z_channels(cfg), 3, padding=1)
        self.quant_conv = nn.Conv2d(_z_channels(cfg), cfg.latent_channels, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        return self.quant_conv(h)


class TamingDecoder(nn.Module):
    """(B, D, h, w) code vectors -> (B, C, h * f, w * f) images in about [-1, 1]."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, _z_channels(cfg), 1)
        self.conv_in = nn.Conv2d(_z_channels(cfg), widths[-1], 3, padding=1)
        self.mid = Middle(widths[-1], cfg.mid_attention)
        stages = []
        cin = widths[-1]
        for level in reversed(range(len(widths))):
            stage = Level(cin, widths[level], cfg.num_res_blocks + 1, level in cfg.attn_levels)
            if level > 0:
                stage.upsample = Upsample(widths[level])
            stages.insert(0, stage)
            cin = widths[level]
        self.up = nn.ModuleList(stages)  # up[0] is the full resolution, run last
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight

    def forward(self, z):
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for stage in reversed(self.up):
            h = stage(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
