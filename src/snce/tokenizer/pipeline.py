"""Tokenizer runs end to end: train (shared loop), evaluate (PSNR, SSIM, codebook usage), tokenize to shards.

A run directory (``train.out_dir``) ends up holding::

    config.json            the full run configuration
    checkpoints/           training checkpoints (resume with --resume)
    tokenizer/             the trained tokenizer (EMA weights when on): config.json, model.safetensors,
                           data.json (the data it was trained on, the default for eval and tokenize)
    images/recon_*.png     originals (odd rows) above their reconstructions (even rows)
    tb/, log.jsonl         TensorBoard scalars and the same numbers as JSON lines
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from snce.config import Config, ConfigError, apply_override, atomic_write_text, parse_override
from snce.data import DataConfig, ShardManifest, ShardWriter, build_dataset
from snce.quantize import codebook_usage
from snce.tokenizer.losses import LossConfig, TokenizerObjective
from snce.tokenizer.model import Tokenizer, TokenizerConfig
from snce.train import ImageCallback, TrainConfig, Trainer
from snce.train.distributed import resolve_device

DATA_FILE = "data.json"


@dataclass
class TokenizerRunConfig(Config):
    """A tokenizer training run: ``snce tokenizer train --config FILE``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/tokenizer"))

    def check(self) -> None:
        channels = self.data.channels or (1 if self.data.kind == "digits" else 3)
        if self.model.in_channels != channels:
            raise ConfigError(
                "model.in_channels",
                f"must equal the data's channels ({channels} for {self.data.kind}), "
                f"got {self.model.in_channels}",
            )
        if self.data.size % self.model.downsample:
            raise ConfigError(
                "data.size",
                f"must be a multiple of the tokenizer's downsampling {self.model.downsample}, "
                f"got {self.data.size}",
            )
        if self.loss.disc_weight > 0 and self.data.size < 3 * 2**self.loss.disc_layers:
            raise ConfigError(
                "loss.disc_layers",
                f"{self.loss.disc_layers} layers need images of >= "
                f"{3 * 2**self.loss.disc_layers} px, data.size is {self.data.size}",
            )


def _images(batch):
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def tokenizer_loss(model, batch, step):
    """The ``loss_fn`` handed to :class:`Trainer`: ``model`` is a (DDP-wrapped) TokenizerObjective."""
    return model(_images(batch), step)


def train_tokenizer(cfg: TokenizerRunConfig, *, resume: bool = False) -> Tokenizer:
    """Train a tokenizer as ``cfg`` says; writes the run directory and returns the tokenizer (eval mode).

    Works single-process and under torchrun: rank 0 writes the files and gets the tokenizer, other ranks
    get None. The process group stays up (the caller may go on; ``cleanup_distributed`` ends it).
    To train a missing run or finish an interrupted one, pass
    ``resume=latest_checkpoint(cfg.train.out_dir) is not None``.
    """
    dataset = build_dataset(cfg.data, split="train")
    torch.manual_seed(cfg.train.seed)
    tokenizer = Tokenizer(cfg.model)
    objective = TokenizerObjective(tokenizer, cfg.loss)
    preview = torch.stack([dataset[i][0] for i in range(min(16, len(dataset)))])

    def reconstructions(model: TokenizerObjective) -> torch.Tensor:
        x = preview.to(next(model.parameters()).device)
        rec = model.tokenizer(x).reconstruction
        # rows of 8: originals above their reconstructions
        return torch.cat([t for i in range(0, len(x), 8) for t in (x[i : i + 8], rec[i : i + 8])])

    trainer = Trainer(
        objective,
        tokenizer_loss,
        dataset,
        cfg.train,
        config=cfg.to_dict(),
        callbacks=[ImageCallback(cfg.train.image_every, reconstructions, "recon", nrow=8, scale=4)],
        resume=resume,
        find_unused_parameters=objective.discriminator is not None and cfg.loss.disc_start > 0,
    )
    out = Path(cfg.train.out_dir)
    if trainer.dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    trainer.fit()
    if trainer.dist.is_main:
        with trainer.eval_weights() as model:
            model.tokenizer.save_pretrained(out / "tokenizer")
        cfg.data.save_json(out / "tokenizer" / DATA_FILE)
    return Tokenizer.from_pretrained(out / "tokenizer") if trainer.dist.is_main else None


def load_data_config(tokenizer_dir: str | os.PathLike, overrides=()) -> DataConfig:
    """The data a tokenizer was trained on (``data.json`` beside it), with ``data.*`` overrides."""
    path = Path(tokenizer_dir) / DATA_FILE
    data = {"data": json.loads(path.read_text())} if path.is_file() else {}
    for item in overrides:
        key, value = parse_override(item)
        if not key.startswith("data."):
            raise ConfigError(key, "only data.* keys can be set here")
        apply_override(data, _DataSection, key, value)
    return _DataSection.from_dict(data).data


@dataclass
class _DataSection(Config):
    data: DataConfig = field(default_factory=DataConfig)


def _loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak = 1 after mapping to [0, 1]): (B,)."""
    mse = (((x.float() - y.float()) / 2) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (scikit-image, uniform 7x7 windows, smaller on tiny images) of [-1, 1] images."""
    from skimage.metrics import structural_similarity

    a = ((x.float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    b = ((y.float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    win = min(7, min(a.shape[1:3]) // 2 * 2 - 1)
    out = [
        structural_similarity(a[i], b[i], data_range=1.0, channel_axis=2, win_size=win)
        for i in range(len(a))
    ]
    return torch.tensor(np.asarray(out, dtype=np.float64))


@torch.no_grad()
def evaluate_tokenizer(
    tokenizer: Tokenizer,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str = "auto",
    progress: bool = True,
    feature_net: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Reconstruction quality and code usage over ``dataset``.

    Returns psnr (dB) and ssim (means over images), usage (fraction of the K codes used at least once),
    perplexity (exp of the entropy of the code histogram), num_images, and with ``feature_net`` (a
    ``snce.metrics`` feature network, ``net(images) -> (features, logits)``) rfid: the Frechet distance between
    the features of the images and of their reconstructions.
    """
    dev = resolve_device(device)
    tokenizer = tokenizer.to(dev).eval()
    psnrs, ssims, indices, real, fake = [], [], [], [], []
    for batch in tqdm(_loader(dataset, batch_size), desc="eval", disable=not progress):
        x = _images(batch).to(dev)
        enc = tokenizer.encode(x)
        rec = tokenizer.decode(enc.indices)
        psnrs.append(psnr(x, rec).cpu())
        ssims.append(ssim(x, rec))
        indices.append(enc.indices.cpu())
        if feature_net is not None:
            from snce.metrics import extract

            real.append(extract(feature_net, x)[0])
            fake.append(extract(feature_net, rec.clamp(-1, 1))[0])
    usage, perplexity = codebook_usage(torch.cat(indices), tokenizer.codebook_size)
    metrics = {
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "usage": usage,
        "perplexity": perplexity,
        "num_images": float(sum(len(i) for i in indices)),
    }
    if feature_net is not None:
        from snce.metrics import frechet_distance

        metrics["rfid"] = frechet_distance(torch.cat(real), torch.cat(fake))
    return metrics


@torch.no_grad()
def tokenize_dataset(
    tokenizer: Tokenizer,
    dataset: Dataset,
    out_dir: str | os.PathLike,
    *,
    data_config: DataConfig | None = None,
    latents: bool = False,
    batch_size: int = 256,
    shard_size: int = 65536,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> ShardManifest:
    """Encode every image of ``dataset`` (in order) and write token shards; returns the manifest.

    ``latents=True`` also stores the encoder outputs (fp16, code dimension last) for exact-latent SNCE.
    """
    dev = resolve_device(device)
    tokenizer = tokenizer.to(dev).eval()
    first = _images(next(iter(_loader(dataset, 1))))
    h, w = (s // tokenizer.config.downsample for s in first.shape[-2:])
    manifest = ShardManifest(
        grid=(h, w),
        codebook_size=tokenizer.codebook_size,
        metric=tokenizer.quantizer.metric,
        codebook_hash=tokenizer.codebook_hash(),
        tokenizer=tokenizer.full_config(),
        num_classes=int(getattr(dataset, "num_classes", 0)),
        latent_dim=tokenizer.config.latent_channels if latents else None,
        class_names=list(getattr(dataset, "class_names", [])),
        dataset=data_config.to_dict() if data_config is not None else {},
    )
    writer = ShardWriter(out_dir, manifest, shard_size=shard_size, overwrite=overwrite)
    for images, labels in tqdm(_loader(dataset, batch_size), desc="tokenize", disable=not progress):
        enc = tokenizer.encode(images.to(dev))
        lat = enc.latents.permute(0, 2, 3, 1) if latents else None  # (B, h, w, D)
        writer.add(enc.indices, torch.as_tensor(labels), lat)
    return writer.close()
