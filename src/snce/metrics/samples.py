"""``snce eval``: metrics of generated images (a generator checkpoint, an ``.npz`` or a folder) against a dataset."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from snce.data import DataConfig, build_dataset
from snce.data.images import IMAGE_EXTENSIONS, load_square, to_channels
from snce.metrics.image import ImageEvaluator, feature_network
from snce.metrics.tokens import code_statistics

DEFAULT_CACHE = Path(os.environ.get("SNCE_CACHE", Path.home() / ".cache" / "snce"))


def load_samples(path: str | os.PathLike, size: int, channels: int) -> tuple[torch.Tensor, dict]:
    """Generated images from an ``.npz`` (``images`` uint8 (N, H, W, C), as ``snce sample --npz`` writes, or
    ``arr_0``, the ADM layout ``snce sample --out-dir`` writes; optional
    ``labels`` and ``tokens``) or a folder of image files (centre-cropped and resized to ``size``).

    Returns (images (N, channels, size, size) in [-1, 1], extras {"labels": (N,), "tokens": ...} when present).
    """
    path = Path(path)
    extras = {}
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(
                f"samples: {path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
            )
        images = torch.stack([_load_file(f, size) for f in files])
    elif path.suffix == ".npz" and path.is_file():
        with np.load(path) as npz:
            key = next((k for k in ("images", "arr_0") if k in npz), None)  # snce's or ADM's layout
            if key is None:
                raise ValueError(
                    f"samples: {path} has no 'images' or 'arr_0' array (keys: {sorted(npz.keys())})"
                )
            pixels = torch.from_numpy(npz[key])
            extras = {k: torch.from_numpy(npz[k]) for k in ("labels", "tokens") if k in npz}
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] not in (1, 3):
            raise ValueError(
                f"samples: '{key}' must be uint8 (N, H, W, 1 or 3), got {pixels.dtype} {tuple(pixels.shape)}"
            )
        images = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if images.shape[-1] != size or images.shape[-2] != size:
            images = torch.nn.functional.interpolate(
                images, size=(size, size), mode="bilinear", antialias=True
            )
    else:
        raise ValueError(f"samples: expected an .npz file or a folder of images, got {str(path)!r}")
    return to_channels(images, channels).clamp(-1, 1), extras


def _load_file(path: Path, size: int) -> torch.Tensor:
    with Image.open(path) as img:
        return load_square(img, size)


def evaluate_samples(
    images: torch.Tensor,
    data: DataConfig,
    *,
    labels: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    codebook_size: int | None = None,
    inception_weights: str | None = None,
    cache_dir: str | os.PathLike = DEFAULT_CACHE,
    seed: int = 0,
    **domain_kwargs,
) -> dict:
    """FID/KID/IS/precision/recall (and class consistency, code statistics when possible) of ``images``
    against the training split of ``data``. ``domain_kwargs`` go to the domain classifier's training."""
    train = build_dataset(data, split="train")
    real, real_labels = zip(*(train[i] for i in range(len(train))), strict=True)
    real, real_labels = torch.stack(real), torch.as_tensor(real_labels)
    net, info = feature_network(
        real, real_labels, dataset=f"{data.kind}{data.size}px", cache_dir=cache_dir,
        inception_weights=inception_weights, seed=seed, **domain_kwargs,
    )  # fmt: skip
    evaluator = ImageEvaluator(net, real, class_logits=info["class_logits"], seed=seed)
    metrics = {"num_samples": images.shape[0], **evaluator(images, labels), "features": info}
    if tokens is not None and codebook_size is not None:
        metrics.update({f"code_{k}": v for k, v in code_statistics(tokens, codebook_size).items()})
    return metrics
