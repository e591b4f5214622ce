"""PNG image grids: what people look at during and after training."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1) -> np.ndarray:
    """(B, C, H, W) images in [-1, 1] (C = 1 or 3) -> (rows*H', cols*W', 3) uint8 grid, ``nrow`` per row."""
    if not (torch.is_tensor(images) and images.dim() == 4 and images.shape[1] in (1, 3)):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a (B, 1 or 3, H, W) tensor, got {shape}")
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    pix = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pix = pix.expand(b, 3, h, w).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    grid = np.full(
        (rows * (h + padding) + padding, nrow * (w + padding) + padding, 3), 255, np.uint8
    )
    for i in range(b):
        y, x = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[y : y + h, x : x + w] = pix[i]
    return grid


def save_image_grid(
    images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 1
) -> Path:
    """Write :func:`image_grid` as a PNG (atomically), upscaled ``scale`` times with nearest neighbours."""
    grid = Image.fromarray(image_grid(images, nrow))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    grid.save(tmp)
    os.replace(tmp, path)
    return path
