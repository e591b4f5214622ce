"""MaskGIT's VQGAN encoder and decoder (Chang et al., arXiv 2202.04200), in MaskBit's PyTorch port.

The published weights are MaskBit's port of the flax tokenizer (markweberdev/maskbit,
``modeling/modules/autoencoder.py``: ``ConvEncoder`` and ``ConvDecoderLegacy``, built by
``ConvVQModel(config, legacy=True)``). The modules below carry the port's parameter names, so the
checkpoint's keys are snce's keys apart from the codebook (``snce.tokenizer.formats.maskgit``).
Numerics, as in the port:

- images: the original works on [0, 1]; snce's encoder maps x in [-1, 1] to (x + 1) / 2 first and the
  decoder returns 2 y - 1, so the pair speaks snce's [-1, 1] and is otherwise the original's arithmetic;
- GroupNorm(32 groups, eps 1e-6, affine), SiLU; every conv has stride 1 and "same" padding, which for
  the 3x3 and 1x1 kernels used here is symmetric (padding 1 and 0), as ``nn.Conv2d`` pads;
- biases: only ``encoder.conv_out``, ``decoder.conv_in``, the decoder's ``upsample_conv`` and
  ``decoder.conv_out`` have one; ``conv_in`` of the encoder and every residual-block conv have none;
- residual block: h = conv2(silu(norm2(conv1(silu(norm1(x)))))); output h + x, or, when the width
  changes, **h + nin_shortcut(h)**: the 1x1 shortcut (out -> out, no bias) is applied to conv2's output
  and the block's input is dropped. That is MaskGIT's flax ResBlock (its shortcut conv reads the
  variable already overwritten by the second conv), kept by the port; do not "fix" it;
- encoder level l (0 = full resolution): ``num_res_blocks`` blocks to width channels x channel_mult[l],
  then 2x2 average pooling (stride 2) at every level but the last; no strided conv, no attention;
  ``mid``: ``num_res_blocks`` blocks; then norm_out, SiLU, ``conv_out`` 1x1 to the code dimension. There
  is no ``quant_conv``: conv_out's output is the latent the squared-l2 codebook is searched with;
- decoder: ``conv_in`` 3x3 from the codes, ``mid``, then levels from the last to the first, each
  ``num_res_blocks`` blocks (not one more, unlike taming) followed, at all but level 0, by nearest x2
  upsampling and a 3x3 ``upsample_conv``; norm_out, SiLU, 3x3 ``conv_out``; no tanh, no clamp. The
  ``up`` list is stored by level (``up.0`` is the full resolution), the "legacy" layout of the port.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResidualBlock(nn.Module):
    """Two GroupNorm-SiLU-conv3x3 steps; the shortcut is MaskGIT's (see the module docstring)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cout, cout, 1, bias=False)  # (out, out, 1, 1), reads h

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.nin_shortcut(h) if hasattr(self, "nin_shortcut") else x)


class Stage(nn.Module):
    """``res_blocks``, the first from ``cin`` to ``cout``; the resampling is the caller's."""

    def __init__(self, cin: int, cout: int, blocks: int):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ResidualBlock(cin if j == 0 else cout, cout) for j in range(blocks)
        )

    def forward(self, h):
        for block in self.res_blocks:
            h = block(h)
        return h


class MaskGITEncoder(nn.Module):
    """(B, C, H, W) in [-1, 1] -> (B, D, H / f, W / f) latents, f = 2 ** (levels - 1)."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels, 3, padding=1, bias=False)
        cins = [cfg.channels, *widths[:-1]]
        self.down = nn.ModuleList(
            Stage(cin, cout, cfg.num_res_blocks) for cin, cout in zip(cins, widths, strict=True)
        )
        self.mid = Stage(widths[-1], widths[-1], cfg.num_res_blocks)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], cfg.latent_channels, 1)

    def forward(self, x):
        h = self.conv_in((x + 1) / 2)  # the original takes images in [0, 1]
        for level, stage in enumerate(self.down):
            h = stage(h)
            if level < len(self.down) - 1:
                h = F.avg_pool2d(h, kernel_size=2, stride=2)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class MaskGITDecoder(nn.Module):
    """(B, D, h, w) code vectors -> (B, C, h * f, w * f) images in about [-1, 1] (not clamped)."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], 3, padding=1)
        self.mid = Stage(widths[-1], widths[-1], cfg.num_res_blocks)
        cins = [*widths[1:], widths[-1]]  # level l reads level l + 1's width (the last: its own)
        self.up = nn.ModuleList()  # up[0] is the full resolution, run last
        for level, (cin, cout) in enumerate(zip(cins, widths, strict=True)):
            stage = Stage(cin, cout, cfg.num_res_blocks)
            if level > 0:
                stage.upsample_conv = nn.Conv2d(cout, cout, 3, padding=1)
            self.up.append(stage)
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.in_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = stage(h)
            if hasattr(stage, "upsample_conv"):
                h = stage.upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        y = self.conv_out(F.silu(self.norm_out(h)))  # the original's output, about [0, 1]
        return 2 * y - 1
