"""Built-in domain feature network: a small CNN trained on the dataset's own real images.

When no Inception weights are at hand (the default: snce never downloads), FID/KID/IS/precision-recall are
computed in the feature space of this classifier instead. It is trained deterministically (fixed seed, fixed
data order, CPU float32) on labelled real images, so every run of a study measures in the same space, and it is
cached on disk keyed by dataset name, seed and a hash of the images. Its logits also give the
class-consistency accuracy of class-conditional samples.

Unlabelled datasets (a flat image folder) train the same network on a self-supervised proxy task, predicting
which of four rotations was applied; class consistency is then unavailable.

Numbers in this space are comparable with each other (CE vs SNCE, step vs step), not with published FIDs.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from snce.files import DamagedFileError, verified


@dataclass
class DomainClassifierConfig:
    in_channels: int = 3
    num_classes: int = 10
    width: int = 32  # channels of the first stage; doubled at each of the two downsamplings
    rotation_task: bool = False  # True: classes are the 4 rotations (unlabelled data)


class DomainClassifier(nn.Module):
    """Four 3x3 convs (width w, 2w, 4w, 4w; the middle two stride 2), SiLU -> global average pool -> linear.

    ``forward(images)`` -> (features (N, 4 * width), logits (N, num_classes)); images (N, C, H, W) in [-1, 1],
    any H, W >= 4.
    """

    def __init__(self, config: DomainClassifierConfig) -> None:
        super().__init__()
        self.config = config
        w, c = config.width, config.in_channels

        self.body = nn.Sequential(
            nn.Conv2d(c, w, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1),
            nn.SiLU(),
        )
        self.head = nn.Linear(4 * w, config.num_classes)
        self.num_features = 4 * w

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(images.float()).mean(dim=(2, 3))  # (N, 4w)
        return features, self.head(features)


def _rotations(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) -> the 4N rotated copies and their rotation labels 0..3."""
    rotated = torch.cat([torch.rot90(images, r, dims=(2, 3)) for r in range(4)])
    labels = torch.arange(4).repeat_interleave(images.shape[0])
    return rotated, labels


def _split(n: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * holdout))
    return perm[n_test:], perm[:n_test]


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (edge padding), one offset per batch."""
    if max_shift == 0:
        return x
    dy, dx = (torch.randint(-max_shift, max_shift + 1, (2,), generator=gen)).tolist()
    h, w = x.shape[-2:]
    x = F.pad(x, (max_shift,) * 4, mode="replicate")
    return x[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


@torch.no_grad()
def accuracy(
    model: DomainClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> float:
    """Top-1 accuracy of ``model`` on (images, labels)."""
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        correct += (
            (model(images[i : i + batch_size])[1].argmax(-1) == labels[i : i + batch_size])
            .sum()
            .item()
        )
    return correct / max(1, images.shape[0])


def train_domain_classifier(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    seed: int = 0,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    width: int = 32,
    holdout: float = 0.2,
    progress: bool = True,
) -> tuple[DomainClassifier, float]:
    """Train a :class:`DomainClassifier` deterministically; returns (model in eval mode, held-out accuracy).

    images: (N, C, H, W) float in [-1, 1]; labels: (N,) long class ids, or None (or a single class) to train
    on rotation prediction. A fraction ``holdout`` of the images (chosen by ``seed``) is kept out of training
    to measure the returned accuracy.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(
            f"images must be a float (N, C, H, W) tensor in [-1, 1], got {tuple(images.shape)} {images.dtype}"
        )
    if labels is not None and labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    rotation = labels is None or int(labels.max()) == 0
    images = images.detach().float().cpu()
    if rotation:
        images, labels = _rotations(images)
    labels = labels.long().cpu()
    num_classes = int(labels.max()) + 1
    train_idx, test_idx = _split(images.shape[0], holdout, seed)

    torch.manual_seed(seed)
    config = DomainClassifierConfig(images.shape[1], num_classes, width, rotation)
    model = DomainClassifier(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in tqdm(range(steps), desc="domain classifier", disable=not progress, leave=False):
        batch = train_idx[torch.randint(len(train_idx), (batch_size,), generator=gen)]
        x = (
            images[batch]
            if rotation
            else _shift(images[batch], max(1, images.shape[-1] // 16), gen)
        )
        loss = F.cross_entropy(model(x)[1], labels[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval().requires_grad_(False)
    held_out = (
        accuracy(model, images[test_idx], labels[test_idx]) if len(test_idx) else float("nan")
    )
    return model, held_out


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor | None) -> str:
    """Short hash of the images (and labels): a cached classifier is reused only on identical data."""
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode())
    h.update(images.detach().float().cpu().contiguous().numpy().tobytes())
    if labels is not None:
        h.update(labels.detach().long().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_or_train_domain_classifier(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    dataset: str,
    cache_dir: str | os.PathLike,
    seed: int = 0,
    progress: bool = True,
    **train_kwargs,
) -> tuple[DomainClassifier, float]:
    """:func:`train_domain_classifier`, cached as ``{cache_dir}/domain-{dataset}-seed{seed}-{hash}.safetensors``.

    The file is written atomically (temporary file, then ``os.replace``); its metadata holds the config and
    the held-out accuracy, which is returned with the model.
    """
    key = f"domain-{dataset}-seed{seed}-{data_fingerprint(images, labels)}{options_suffix(train_kwargs)}"
    return cached_model(
        Path(cache_dir) / f"{key}.safetensors",
        lambda config: DomainClassifier(DomainClassifierConfig(**config)),
        lambda: train_domain_classifier(
            images, labels, seed=seed, progress=progress, **train_kwargs
        ),
        info_key="heldout_accuracy",
        what="the domain classifier",
    )


def options_suffix(options: dict) -> str:
    """A cache-key suffix for training options: empty without options, else "-" and 8 hex digits of their
    hash, so models trained with other options are cached apart."""
    if not options:
        return ""
    return "-" + hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]


def cached_model(path: Path, build, train, *, info_key: str, what: str):
    """A small model with ``.config`` (a dataclass) cached in one safetensors file, and what its training
    reported: ``(model, info)``. Read from ``path`` when it holds an intact copy (``build(config dict)``
    makes the module), else ``train() -> (model, info)`` and written atomically, the config and ``info``
    (JSON) in the file's metadata under "config" and ``info_key``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if path.is_file():
        try:
            with verified(path):
                with safe_open(str(path), "pt") as f:
                    meta = f.metadata()
                model = build(json.loads(meta["config"]))
                model.load_state_dict(load_file(str(path)))
            return model.eval().requires_grad_(False), json.loads(meta[info_key])
        except DamagedFileError as e:
            warnings.warn(f"{e}; training {what} again", stacklevel=3)
    model, info = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    meta = {"config": json.dumps(asdict(model.config)), info_key: json.dumps(info)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return model, info
