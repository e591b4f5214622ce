"""Open-MAGVIT2's encoder and decoder (Luo et al., arXiv 2409.04410; TencentARC Open-MAGVIT2 / SEED-Voken,
``src/Open_MAGVIT2/modules/diffusionmodules/improved_model.py``), for its LFQ tokenizers.

The modules carry the original's parameter names, so a checkpoint's ``encoder.*`` / ``decoder.*`` keys are
snce's keys (``snce.tokenizer.formats.open_magvit2``); the quantizer is :class:`snce.quantize.LFQuantizer`,
which has no weights. Numerics, as in the original:

- images in [-1, 1] (the original's data pipeline: x / 127.5 - 1), output not clamped;
- swish written as x * sigmoid(x); GroupNorm(32 groups, eps 1e-6, affine); convs pad symmetrically;
- residual block: x + conv2(swish(norm2(conv1(swish(norm1(x)))))), conv1 / conv2 without bias; when the
  width changes the shortcut is ``nin_shortcut(x)``, 1x1 without bias, on the block's input;
- encoder: ``conv_in`` 3x3 without bias; level l: ``num_res_blocks`` blocks to channels x channel_mult[l],
  then (all but the last level) ``downsample``, a 3x3 stride-2 conv with bias; ``mid_block``:
  ``num_res_blocks`` blocks; norm_out, swish, ``conv_out`` 1x1 to the D code bits. No attention, no
  quant_conv;
- decoder: ``conv_in`` 3x3 from the codes, ``mid_block``; then for level l from the last to 0:
  ``adaptive[l]`` (below), ``num_res_blocks`` blocks, and at l > 0 ``upsample``: ``conv1`` 3x3 C -> 4C,
  then DCR depth-to-space (:func:`depth_to_space`, not ``pixel_shuffle``); norm_out, swish, ``conv_out``;
- adaptive group norm of h (width C) by the code map q (B, D, h, w), the decoder's own input:
      s = sqrt(var_hw(q) + 1e-6)  (UNBIASED variance over the h*w positions, per sample and channel)
      m = mean_hw(q);    out = gamma(s) * GroupNorm_32(h, no affine) + beta(m)
  with ``gamma`` / ``beta`` Linear(D, C). It needs at least 2 code positions (h * w >= 2).
"""

from __future__ import annotations

import torch
from torch import nn

EPS = 1e-6


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)  # as the original writes it (F.silu may differ by an ulp)


def group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=EPS, affine=affine)


def depth_to_space(x: torch.Tensor, block: int = 2) -> torch.Tensor:
    """DCR depth-to-space: (B, b*b*C, h, w) -> (B, C, b*h, b*w),

        out[n, c, b*y + i, b*x + j] = in[n, (i*b + j)*C + c, y, x]

    (``F.pixel_shuffle`` reads channel c*b*b + i*b + j instead)."""
    n, c4, h, w = x.shape
    c = c4 // (block * block)
    x = x.view(n, block, block, c, h, w).permute(0, 3, 4, 1, 5, 2)  # (B, C, h, i, w, j)
    return x.reshape(n, c, h * block, w * block)


class ResBlock(nn.Module):
    """Two GroupNorm-swish-conv3x3 steps (no conv bias); 1x1 ``nin_shortcut`` of x when the width changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        # registered in the original's order (norm1, norm2, conv1, conv2): its state_dict order
        self.norm1, self.norm2 = group_norm(cin), group_norm(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return h + (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x)


class Upsampler(nn.Module):
    """conv1 3x3 C -> 4C (bias), then DCR depth-to-space: (B, C, h, w) -> (B, C, 2h, 2w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x):
        return depth_to_space(self.conv1(x))


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine, scaled by gamma(std of the codes) and shifted by beta(mean of the codes)."""

    def __init__(self, code_dim: int, channels: int):
        super().__init__()
        self.gn = group_norm(channels, affine=False)
        self.gamma = nn.Linear(code_dim, channels)
        self.beta = nn.Linear(code_dim, channels)

    def forward(self, x, style):
        b, c = x.shape[:2]
        flat = style.flatten(2)  # (B, D, h*w)
        std = (flat.var(dim=-1, correction=1) + EPS).sqrt()  # unbiased, as the original's .var()
        scale = self.gamma(std).view(b, c, 1, 1)
        shift = self.beta(flat.mean(dim=-1)).view(b, c, 1, 1)
        return scale * self.gn(x) + shift


class Level(nn.Module):
    """One resolution level: ``block`` (a list of ResBlocks); the resampling module is set by the caller."""

    def __init__(self, cin: int, cout: int, blocks: int):
        super().__init__()
        self.block = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout) for j in range(blocks))

    def forward(self, h):
        for block in self.block:
            h = block(h)
        return h


def _blocks(width: int, count: int) -> nn.ModuleList:
    return nn.ModuleList(ResBlock(width, width) for _ in range(count))


class MAGVIT2Encoder(nn.Module):
    """(B, C, H, W) in [-1, 1] -> (B, D, H / f, W / f) latents, f = 2 ** (levels - 1)."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        for level, (cin, cout) in enumerate(zip([cfg.channels, *widths[:-1]], widths, strict=True)):
            stage = Level(cin, cout, cfg.num_res_blocks)
            if level < len(widths) - 1:
                stage.downsample = nn.Conv2d(cout, cout, 3, stride=2, padding=1)
            self.down.append(stage)
        self.mid_block = _blocks(widths[-1], cfg.num_res_blocks)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], cfg.latent_channels, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        for block in self.mid_block:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class MAGVIT2Decoder(nn.Module):
    """(B, D, h, w) codes (h * w >= 2) -> (B, C, h * f, w * f) images in about [-1, 1] (not clamped)."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], 3, padding=1)
        self.mid_block = _blocks(widths[-1], cfg.num_res_blocks)
        cins = [*widths[1:], widths[-1]]  # level l reads level l + 1's width (the last: its own)
        self.up = nn.ModuleList()  # up[0] is the full resolution, run last
        self.adaptive = nn.ModuleList()  # adaptive[l] normalises level l's input (width cins[l])
        for level, (cin, cout) in enumerate(zip(cins, widths, strict=True)):
            stage = Level(cin, cout, cfg.num_res_blocks)
            if level > 0:
                stage.upsample = Upsampler(cout)
            self.up.append(stage)
            self.adaptive.append(AdaptiveGroupNorm(cfg.latent_channels, cin))
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.in_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight

    def forward(self, z):
        if z.shape[-2] * z.shape[-1] < 2:
            raise ValueError(
                f"the adaptive group norm takes the unbiased variance of the codes over the h x w grid: "
                f"it needs at least 2 positions, got codes of shape {tuple(z.shape)}"
            )
        style = z
        h = self.conv_in(z)
        for block in self.mid_block:
            h = block(h)
        for level in reversed(range(len(self.up))):
            h = self.up[level](self.adaptive[level](h, style))
            if hasattr(self.up[level], "upsample"):
                h = self.up[level].upsample(h)
        return self.conv_out(swish(self.norm_out(h)))
