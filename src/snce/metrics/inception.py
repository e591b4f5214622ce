"""Inception-v3 features for FID/KID/IS/precision-recall, loaded from a local weight file only.

This is the FID variant of Inception-v3 (the graph of the 2015-12-05 TensorFlow checkpoint used by the
reference FID code): average pools that exclude padding in the A, C and first E blocks, a max pool in the
last E block, and a 1008-way classifier. The module names follow torchvision's ``Inception3``, so the weight
files distributed for pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``) and torch-fidelity
(``weights-inception-2015-12-05-6726825d.pth``) load as they are. snce never downloads them: pass a path
(``--inception-weights PATH``) or set ``SNCE_INCEPTION_WEIGHTS``.

Two entry points share one trunk:

- ``net(images)``: snce's images in [-1, 1] (N, C, H, W), resized to 299 x 299 with bilinear interpolation
  -> (pool_3 features (N, 2048), logits (N, 1008)); used by ``snce eval --checkpoint/--samples``.
- ``net.adm_features(pixels, resize=...)``: what OpenAI's ADM evaluator (guided-diffusion
  ``evaluations/evaluator.py``) reads from the TensorFlow graph, for uint8 pixels (N, H, W, 3) in [0, 255]:
  resized to 299 x 299 (see :data:`RESIZE_METHODS`), mapped by (x - 128) / 128 as the graph does, then

  - ``pool`` (N, 2048): the graph's ``pool_3:0``, the mean of Mixed_7c's output (FID, precision/recall);
  - ``spatial`` (N, 2023 = 17 * 17 * 7): ``mixed_6/conv:0[..., :7]`` flattened from NHWC, i.e. channels 0-6
    of Mixed_6d's 1x1 branch (after BatchNorm and ReLU) in (H, W, C) order (sFID);
  - ``logits`` (N, 1008): ``pool_3`` times the weight of ``softmax/logits/MatMul``, no bias (IS).

  The graph's ``mixed``, ``mixed_1``, ... ``mixed_10`` are torchvision's Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e,
  7a, 7b, 7c, so ``mixed_6/conv`` is Mixed_6d's 1x1 branch (192 channels at 17 x 17). The spatial features are
  flattened in TensorFlow's (H, W, C) order, so their mean and covariance line up with the ``mu_s``/``sigma_s``
  of ADM reference batches.

The numbers are close to, not bit-identical with, the TensorFlow evaluator: convolutions run in PyTorch
(float32) and the resize is a documented choice, not the graph's own unless ``resize="tf-bilinear"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

ENV_VAR = "SNCE_INCEPTION_WEIGHTS"

# sFID's features: the first 7 of the 192 channels of ``mixed_6/conv`` (Mixed_6d's 1x1 branch), at 17 x 17.
SPATIAL_CHANNELS = 7
SPATIAL_FEATURES = 17 * 17 * SPATIAL_CHANNELS  # 2023

# How pixels reach 299 x 299 on the ADM path. "bilinear-antialias": bilinear with half-pixel centres and, when
# shrinking, a triangle filter widened to the scale (PIL's antialiased bilinear; clean-fid's advice that the
# resize must not alias). "tf-bilinear": the TensorFlow-1 ``ResizeBilinear`` inside the ADM evaluator's graph
# (align_corners=False, no half-pixel centres, no antialiasing), for numbers closest to that evaluator's.
RESIZE_METHODS = ("bilinear-antialias", "tf-bilinear")


class InceptionOutputs(NamedTuple):
    """The ADM evaluator's three feature sets of one batch (see the module docstring)."""

    pool: torch.Tensor  # (N, 2048) pool_3: FID, precision/recall
    spatial: torch.Tensor  # (N, 2023) mixed_6/conv[..., :7] in (H, W, C) order: sFID
    logits: torch.Tensor  # (N, 1008) pool_3 @ W, no bias: IS (softmax over all 1008 outputs)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, c_in: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_branch1x1(x)[0]

    def forward_with_branch1x1(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block output, the 1x1 branch's output): in Mixed_6d the latter is the graph's ``mixed_6/conv``."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([b1, b7, d, self.branch_pool(_avg_pool(x))], 1), b1


class InceptionD(nn.Module):
    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool=False``: the FID graph's Mixed_7b (padding-excluding average pool); True: Mixed_7c."""

    def __init__(self, c_in: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """FID Inception-v3. ``forward(images)`` -> (features (N, 2048), logits (N, 1008)).

    images: (N, 1 or 3, H, W) float in [-1, 1] (grey images are repeated to RGB). Logits are the
    classifier's output without its bias, as used for the Inception Score by the reference code.
    """

    num_features = 2048

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        out = self.trunk(x, spatial=False)
        return out.pool, out.logits

    def trunk(self, x: torch.Tensor, *, spatial: bool = True) -> InceptionOutputs:
        """The network on prepared inputs x (N, 3, 299, 299) in [-1, 1]; ``spatial=False`` leaves
        ``spatial`` empty (N, 0)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        conv = x.new_zeros(x.shape[0], 0)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            if name == "6d" and spatial:
                x, conv = self.Mixed_6d.forward_with_branch1x1(x)  # conv: (N, 192, 17, 17)
                # TensorFlow's NHWC layout: channels last, then flattened as (H, W, C)
                conv = conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
            else:
                x = getattr(self, f"Mixed_{name}")(x)
        pool = x.mean(dim=(2, 3))  # (N, 2048): pool_3, the 8 x 8 average pool
        return InceptionOutputs(pool, conv, pool @ self.fc.weight.T)

    def adm_features(
        self, pixels: torch.Tensor, *, resize: str = "bilinear-antialias"
    ) -> InceptionOutputs:
        """The ADM evaluator's features of ``pixels`` (N, H, W, 3 or 1), uint8 in [0, 255] (channels last, as
        in an ADM ``.npz``; grey is repeated to RGB): resized to 299 x 299 by ``resize`` (one of
        :data:`RESIZE_METHODS`) in [0, 255], then (x - 128) / 128, as the TensorFlow graph does."""
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] not in (1, 3):
            raise ValueError(
                f"pixels must be uint8 (N, H, W, 1 or 3), got {pixels.dtype} {tuple(pixels.shape)}"
            )
        device = self.fc.weight.device
        x = pixels.to(device).permute(0, 3, 1, 2).float()  # (N, C, H, W) in [0, 255]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = resize_299(x, resize)
        return self.trunk((x - 128.0) / 128.0, spatial=True)


def resize_299(x: torch.Tensor, method: str) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, 299, 299) by one of :data:`RESIZE_METHODS` (identity at 299 x 299)."""
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize must be one of {RESIZE_METHODS}, got {method!r}")
    if x.shape[-2:] == (299, 299):
        return x
    if method == "tf-bilinear":
        return tf1_resize_bilinear(x, 299, 299)
    return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)


def tf1_resize_bilinear(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """TensorFlow 1's ``ResizeBilinear`` (align_corners=False, half_pixel_centers=False) on (N, C, H, W).

    Output pixel i samples the input at s = i * (in / out) (float32): the lerp of rows floor(s) and
    min(floor(s) + 1, in - 1) with weight s - floor(s); first along the width, then along the height, as
    TensorFlow's kernel does. No antialiasing: shrinking skips input pixels.
    """

    def along(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
        n = t.shape[dim]
        scale = torch.tensor(n / size, dtype=torch.float32)
        src = torch.arange(size, dtype=torch.float32) * scale  # (size,)
        lo = src.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        shape = [1] * t.ndim
        shape[dim] = size
        w = (src - lo.float()).view(shape).to(t.device)
        a, b = t.index_select(dim, lo.to(t.device)), t.index_select(dim, hi.to(t.device))
        return a + (b - a) * w

    return along(along(x.float(), 3, width), 2, height)


def resolve_weights_path(path: str | os.PathLike | None) -> Path | None:
    """The Inception weight file to use: ``path``, else ``$SNCE_INCEPTION_WEIGHTS``, else None.

    A path that is given but does not exist is an error (never a silent fallback, never a download).
    """
    source = "inception_weights"
    if path is None or str(path) == "":
        path, source = os.environ.get(ENV_VAR) or None, f"${ENV_VAR}"
    if path is None:
        return None
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{source}: Inception weight file {str(path)!r} does not exist. snce never downloads weights; "
            "pass a local copy of pt_inception-2015-12-05-6726825d.pth (pytorch-fid) or "
            "weights-inception-2015-12-05-6726825d.pth (torch-fidelity), or unset it to use the "
            "built-in domain feature network."
        )
    return path


def load_inception(path: str | os.PathLike) -> InceptionV3:
    """Build :class:`InceptionV3` and load a local ``.pth``/``.pt``/``.safetensors`` state dict (strict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"inception_weights: {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(
            f"inception_weights: {str(path)!r} holds a {type(state).__name__}, expected a state dict"
        )
    model = InceptionV3()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"inception_weights: {str(path)!r} is not an FID Inception-v3 state dict "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    return model.eval().requires_grad_(False)
