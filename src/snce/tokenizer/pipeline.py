"""Tokenizer runs end to end: train (shared loop), evaluate (PSNR, SSIM, codebook health), tokenize to shards.

Codebook initialisation. A quantizer that asks for a k-means initialisation (``VectorQuantizer`` with
``kmeans_init: true``; the other quantizers keep their papers' initialisations) gets it in
:func:`train_tokenizer` before the first step of a new run, from :func:`init_codebook_from_data`: latents of
the freshly initialised encoder, drawn without replacement over the whole training set (at most the
quantizer's ``kmeans_points``, 262,144 by default), not from the first batch (a batch of B h w latents for
K > B h w codes would force duplicate codes). Under torchrun rank 0 computes it and broadcasts the quantizer's
state; a resumed run keeps the codebook of its checkpoint.

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
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from snce.config import Config, ConfigError, apply_override, atomic_write_text, parse_override
from snce.data import DataConfig, ShardManifest, ShardWriter, build_dataset
from snce.quantize.base import check_positive_int, codebook_health
from snce.tokenizer.losses import LossConfig, TokenizerObjective
from snce.tokenizer.model import Tokenizer, TokenizerConfig
from snce.train import ImageCallback, TrainConfig, Trainer, latest_checkpoint
from snce.train.distributed import init_distributed, resolve_device

DATA_FILE = "data.json"


@dataclass
class TokenizerRunConfig(Config):
    """A tokenizer training run: ``snce tokenizer train --config FILE``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/tokenizer"))

    def check(self) -> None:
        channels = self.data.image_channels
        if self.model.in_channels != channels:
            raise ConfigError(
                "model.in_channels",
                f"must equal the data's channels ({channels} for {self.data.kind}), got "
                f"{self.model.in_channels}: set it to {channels}, or data.channels="
                f"{self.model.in_channels} to read the images with {self.model.in_channels} channel(s)",
            )
        q = self.model.quantizer
        if (
            q.get("kind") == "lc"
            and q.get("feature_dim", self.model.latent_channels) != self.model.latent_channels
        ):
            raise ConfigError(
                "model.quantizer.feature_dim",
                f"must equal model.latent_channels={self.model.latent_channels} (a new LC tokenizer's frozen base "
                f"is the k-means centres of its encoder's latents), got {q['feature_dim']}",
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
    if isinstance(batch, dict):  # an editing triple: the target is the image to generate
        return batch["target"]
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def tokenizer_loss(model, batch, step):
    """The ``loss_fn`` handed to :class:`Trainer`: ``model`` is a (DDP-wrapped) TokenizerObjective."""
    return model(_images(batch), step)


def train_tokenizer(cfg: TokenizerRunConfig, *, resume: bool = False) -> Tokenizer:
    """Train a tokenizer as ``cfg`` says; writes the run directory and returns the tokenizer (eval mode).

    Works single-process and under torchrun: rank 0 writes the files and gets the tokenizer, other ranks
    get None. The process group stays up (the caller may go on; ``cleanup_distributed`` ends it).
    To train a missing run or finish an interrupted one, pass
    ``resume=latest_checkpoint(cfg.train.out_dir) is not None``. A new run whose quantizer waits for a k-means
    initialisation gets it from :func:`init_codebook_from_data` (seeded by ``train.seed``) before the Trainer
    takes the model (so EMA weights and DDP start from it); a resumed run keeps its checkpoint's codebook.
    """
    if cfg.model.quantizer.get("kind") == "fvq" and cfg.train.schedule != "annealing":
        warnings.warn(
            f"FVQ is trained with learning annealing in its paper; this run uses train.schedule="
            f"{cfg.train.schedule!r} (set train.schedule=annealing for the published recipe)",
            stacklevel=2,
        )
    dataset = build_dataset(cfg.data, split="train")
    torch.manual_seed(cfg.train.seed)
    tokenizer = Tokenizer(cfg.model)
    objective = TokenizerObjective(tokenizer, cfg.loss)
    if (
        not resume
        and pending_codebook_init(tokenizer.quantizer)
        and latest_checkpoint(cfg.train.out_dir) is None  # else the Trainer stops: an existing run
    ):
        info = init_distributed(cfg.train.device)
        tokenizer.to(info.device)
        if info.is_main:
            init_codebook_from_data(
                tokenizer, dataset, batch_size=max(1, cfg.train.batch_size // cfg.train.grad_accum),
                device=info.device, seed=cfg.train.seed, progress=cfg.train.progress,
            )  # fmt: skip
        if info.distributed:
            broadcast_state(tokenizer.quantizer)
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


def pending_codebook_init(quantizer: torch.nn.Module) -> bool:
    """Whether ``quantizer`` still waits for a k-means initialisation from data (``pending_init``)."""
    return bool(getattr(quantizer, "pending_init", False))


@torch.no_grad()
def init_codebook_from_data(
    tokenizer: Tokenizer,
    dataset: Dataset,
    *,
    max_points: int | None = None,
    max_images: int | None = None,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, int]:
    """k-means initialisation of the tokenizer's codebook from its encoder's latents over ``dataset``.

    Encodes (eval mode, no grad) ``min(len(dataset), max_images)`` images drawn without replacement
    (``max_images`` defaults to ``max_points``, so each image contributes about one latent when the dataset is
    large), keeps a uniform sample without replacement of ``max_points`` of their latents (default: the
    quantizer's ``kmeans_points``; a running top-k over random keys, so O(max_points D) memory) and passes them
    to ``quantizer.init_codebook``. The latents are the encoder outputs flattened to (N, D), exactly what the
    quantizer receives in :meth:`Tokenizer.forward` (the quantizer maps them to its own space, e.g. unit vectors
    under "cosine"). All draws come from ``torch.Generator().manual_seed(seed)``: the same call gives the same
    codebook. The tokenizer ends on ``device`` in the train/eval mode it had.

    Returns the counts: images encoded, latents seen, points given to the k-means.
    """
    quantizer = tokenizer.quantizer
    if not callable(getattr(quantizer, "init_codebook", None)):
        raise TypeError(
            f"{type(quantizer).__name__} has no k-means initialisation (init_codebook); "
            "only quantizers with kmeans_init take their codebook from data"
        )
    if max_points is None:
        max_points = quantizer.kmeans_points
    check_positive_int(max_points, "max_points")
    if max_images is not None:
        check_positive_int(max_images, "max_images")
    check_positive_int(batch_size, "batch_size")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: no latents to initialise the codebook from")
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    g = torch.Generator().manual_seed(seed)
    num_images = min(len(dataset), max_points if max_images is None else max_images)
    chosen = torch.randperm(len(dataset), generator=g)[:num_images]
    chosen = chosen.sort().values  # read in order: locality
    loader = DataLoader(
        Subset(dataset, chosen.tolist()), batch_size=batch_size, shuffle=False,
        generator=torch.Generator(),  # keeps the loader off the global RNG
    )  # fmt: skip
    was_training = tokenizer.training
    tokenizer.to(dev).eval()
    points = keys = None
    seen = 0
    for batch in tqdm(loader, desc="codebook init", disable=not progress):
        z = tokenizer.encoder(_images(batch).to(dev))  # (B, D, h, w): the quantizer's input
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()  # (B h w, D)
        key = torch.rand(flat.shape[0], generator=g).to(dev)
        seen += flat.shape[0]
        if points is not None:
            flat, key = torch.cat([points, flat]), torch.cat([keys, key])
        if flat.shape[0] > max_points:
            # the max_points smallest keys so far: a uniform sample without replacement
            keep = key.topk(max_points, largest=False).indices
            flat, key = flat[keep], key[keep]
        points, keys = flat, key
    quantizer.init_codebook(points, max_points=max_points, generator=g)
    tokenizer.train(was_training)
    return {"images": num_images, "latents": seen, "points": int(points.shape[0])}


@torch.no_grad()
def broadcast_state(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``module``'s parameters and buffers from rank ``src`` to every rank (collective)."""
    for tensor in module.state_dict().values():
        # as float64 whatever the dtype: not every backend broadcasts bool buffers
        wire = tensor if tensor.is_floating_point() else tensor.double()
        dist.broadcast(wire, src=src)
        if wire is not tensor:
            tensor.copy_(wire)


# where the images come from: overriding one of these drops the recorded values of the others
_SOURCE_KEYS = ("path", "captions", "edits")


def load_data_config(tokenizer_dir: str | os.PathLike, overrides=()) -> DataConfig:
    """The data a tokenizer was trained on (``data.json`` beside it), with ``data.*`` overrides.

    The image source (``path``, ``captions``, ``edits``) is taken as a whole: setting any of them drops the
    recorded ones not set, so ``--set data.captions=FILE`` reads FILE's images from FILE's folder, not from the
    tokenizer's training folder."""
    path = Path(tokenizer_dir) / DATA_FILE
    data = {"data": json.loads(path.read_text())} if path.is_file() else {}
    parsed = [parse_override(item) for item in overrides]
    for key, _ in parsed:
        if not key.startswith("data."):
            raise ConfigError(key, "only data.* keys can be set here")
    given = {key.removeprefix("data.") for key, _ in parsed}
    if given & set(_SOURCE_KEYS) and "data" in data:
        for key in set(_SOURCE_KEYS) - given:
            data["data"].pop(key, None)
    for key, value in parsed:
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
    perplexity (exp of the entropy of the code histogram), dead_codes (codes never assigned over ``dataset``:
    K - used), duplicate_codes (codes with a lower-index code within a tiny tolerance: every member of a group
    of near-identical codes but one; see :func:`snce.quantize.base.codebook_health`), num_images, and with
    ``feature_net`` (a
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
    quantizer = tokenizer.quantizer
    health = codebook_health(quantizer.codebook.detach(), quantizer.metric, torch.cat(indices))
    metrics = {
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "usage": health["usage"],
        "perplexity": health["perplexity"],
        "dead_codes": health["dead_codes"],
        "duplicate_codes": health["duplicate_codes"],
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
    text_encoder=None,
) -> ShardManifest:
    """Encode every image of ``dataset`` (in order) and write token shards; returns the manifest.

    ``latents=True`` also stores the encoder outputs (fp16, code dimension last) for exact-latent SNCE.
    A dataset whose items are ``(image, text, ...)`` (a caption: a str second element) needs ``text_encoder``
    (a :class:`snce.text.TextEncoder`): each text's embeddings and mask are stored beside its tokens, the
    encoder's spec and fingerprint in the manifest, and the labels are 0. Items that are dicts with
    ``source``, ``instruction`` and ``target`` (editing triples) make editing shards: the target's tokens as
    ``indices``, the source's as ``source``, the instruction as the text.
    """
    dev = resolve_device(device)
    tokenizer = tokenizer.to(dev).eval()
    first_batch = next(iter(_loader(dataset, 1)))
    first = _images(first_batch)
    has_text, edit = _texts(first_batch) is not None, isinstance(first_batch, dict)
    if has_text and text_encoder is None:
        raise ValueError(
            "the dataset's items carry texts (captions): pass a text encoder (snce tokenize "
            "--text-encoder builtin | hf:DIR) to store their embeddings"
        )
    if text_encoder is not None and not has_text:
        raise ValueError(
            "a text encoder was given, but the dataset's items carry no texts: expected "
            "(image, text, ...) items"
        )
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
        text_encoder=ShardManifest.text_entry(text_encoder) if has_text else None,
        edit=edit,
    )
    writer = ShardWriter(out_dir, manifest, shard_size=shard_size, overwrite=overwrite)
    for batch in tqdm(_loader(dataset, batch_size), desc="tokenize", disable=not progress):
        images, texts = _images(batch), _texts(batch)
        enc = tokenizer.encode(images.to(dev))
        lat = enc.latents.permute(0, 2, 3, 1) if latents else None  # (B, h, w, D)
        source = tokenizer.encode(batch["source"].to(dev)).indices if edit else None  # (B, h, w)
        if texts is None:
            writer.add(enc.indices, torch.as_tensor(batch[1]), lat)
        else:
            emb, mask = text_encoder.encode(texts)  # (B, T, E), (B, T)
            labels = torch.zeros(len(texts), dtype=torch.long)
            writer.add(
                enc.indices, labels, lat, text=emb, text_mask=mask, texts=texts, source=source
            )
    return writer.close()


def _texts(batch) -> list[str] | None:
    """The texts of a collated ``(image, text, ...)`` batch (the instructions of an editing batch), or None
    when its second element is no text."""
    if isinstance(batch, dict):
        return list(batch["instruction"])
    if isinstance(batch, (list, tuple)) and len(batch) > 1:
        second = batch[1]
        if isinstance(second, (list, tuple)) and second and all(isinstance(t, str) for t in second):
            return list(second)
    return None
