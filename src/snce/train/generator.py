"""Generator runs: token shards + the tokenizer that made them -> a trained AR or masked-diffusion generator.

``snce generator train --config FILE`` and ``snce sample`` call into this module; so can Python code::

    cfg = load_config(GeneratorRunConfig, "configs/generator/digits_ar_tiny.yaml", ["loss.kind=snce"])
    model = train_generator(cfg)                       # writes <train.out_dir>/generator/
    tokens, images = sample_images(model, tokenizer, torch.arange(10), cfg.sample)

The generator package itself never imports the tokenizer or this loop (DESIGN.md); the wiring lives here.
Output of a run (rank 0): ``<out_dir>/config.json``, checkpoints, ``log.jsonl``, TensorBoard scalars,
``images/samples_<step>.png`` (decoded sample grids), ``val.jsonl`` (validation losses when ``val_shards`` is
set) and ``generator/`` (EMA weights via ``save_pretrained`` plus ``run.json``: tokenizer path, codebook hash,
loss and sampling defaults).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from snce.config import Config, ConfigError, atomic_write_text
from snce.data import ShardManifest, TokenShards
from snce.generators import FAMILIES, PRESETS, Conditioning, GeneratorModel, load_generator, sample
from snce.generators.objectives import GeneratorObjective, LossConfig, TokenLoss, validation_loss
from snce.train.distributed import resolve_device
from snce.train.loop import Callback, ImageCallback, TrainConfig, Trainer

RUN_FILE = "run.json"
ARCH_FROM_SHARDS = ("vocab_size", "grid", "num_classes")


@dataclass
class SampleConfig(Config):
    """Sampling settings: used for the sample grids during training and as ``snce sample``'s defaults.

    cfg_scale: classifier-free guidance scale, null = conditional only. steps, choice_temperature: masked
    diffusion only (MaskGIT: 8 steps, 4.5).
    """

    cfg_scale: float | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    steps: int = 8
    choice_temperature: float = 4.5
    num_images: int = 32  # images per training-time grid

    def check(self) -> None:
        if not self.temperature > 0:
            raise ConfigError("temperature", f"must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError("top_k", f"must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p", f"must lie in (0, 1], got {self.top_p}")
        if self.steps < 1 or self.num_images < 1:
            raise ConfigError("steps" if self.steps < 1 else "num_images", "must be >= 1")

    def kwargs(self, family: str) -> dict:
        """Keyword arguments of the family's sampler."""
        kw = dict(
            cfg_scale=self.cfg_scale,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
        )
        if family == "masked_diffusion":
            kw.update(steps=self.steps, choice_temperature=self.choice_temperature)
        return kw


@dataclass
class GeneratorRunConfig(Config):
    """A generator training run: ``snce generator train --config FILE``.

    shards: token shard directory (``snce tokenize``). tokenizer: the tokenizer directory that made them; it
    provides the SNCE codebook and decodes the sample grids (checked by codebook hash); "" = none (CE losses
    only, no image grids). model: overrides of the preset's architecture fields (vocab_size, grid and
    num_classes always come from the shards). val_shards: held-out shards, evaluated at every checkpoint.
    """

    shards: str = ""
    tokenizer: str = ""
    val_shards: str = ""
    family: Literal["autoregressive", "masked_diffusion"] = "autoregressive"
    preset: str = "tiny"
    model: dict = field(default_factory=dict)
    loss: LossConfig = field(default_factory=LossConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/generator"))

    def check(self) -> None:
        if not self.shards:
            raise ConfigError(
                "shards", "is required: a token shard directory written by `snce tokenize`"
            )
        for name in ("shards", "val_shards"):
            path = getattr(self, name)
            if path and not (Path(path) / "manifest.json").is_file():
                raise ConfigError(
                    name, f"{path!r} is not a token shard directory (no manifest.json)"
                )
        if self.tokenizer and not (Path(self.tokenizer) / "config.json").is_file():
            raise ConfigError(
                "tokenizer", f"{self.tokenizer!r} is not a tokenizer directory (no config.json)"
            )
        if self.preset not in PRESETS:
            raise ConfigError("preset", f"must be one of {sorted(PRESETS)}, got {self.preset!r}")
        fixed = sorted(set(self.model) & set(ARCH_FROM_SHARDS))
        if fixed:
            raise ConfigError(
                f"model.{fixed[0]}", "comes from the token shards' manifest; remove it"
            )
        if self.loss.kind == "snce" and not self.tokenizer:
            raise ConfigError(
                "tokenizer",
                "loss.kind=snce needs the tokenizer that made the shards (its codebook)",
            )


def build_model(cfg: GeneratorRunConfig, manifest: ShardManifest) -> GeneratorModel:
    """A fresh generator sized by ``cfg.preset`` + ``cfg.model`` for the shards' codebook, grid and classes."""
    config_cls = FAMILIES[cfg.family].config_class
    text = (
        manifest.text_encoder
    )  # text shards: the model is conditioned on text (or edits), not classes
    condition = {} if text is None else {
        "condition": "edit" if manifest.edit else "text", "text_dim": text["dim"],
        "max_text_len": text["max_length"], "num_classes": 0,
    }  # fmt: skip
    try:
        config = config_cls.preset(
            cfg.preset, vocab_size=manifest.codebook_size, grid=tuple(manifest.grid),
            **{"num_classes": manifest.num_classes, **condition, **cfg.model},
        )  # fmt: skip
    except (TypeError, ValueError) as e:
        raise ConfigError("model", str(e)) from None
    return FAMILIES[cfg.family](config)


def load_tokenizer(path: str, manifest: ShardManifest | None = None, device="cpu"):
    """The tokenizer at ``path`` in eval mode, checked against the shards' codebook hash when given."""
    from snce.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(path, device=device).eval()
    if manifest is not None:
        manifest.check_tokenizer(tokenizer)
    return tokenizer


class ValidationCallback(Callback):
    """At every checkpoint, append the validation losses (the run's loss, and hard CE) to ``val.jsonl``."""

    def __init__(self, shards: TokenShards, losses: dict[str, TokenLoss], seed: int):
        self.shards, self.losses, self.seed = shards, losses, seed

    def on_step(self, trainer: Trainer, step: int) -> None:
        due = step % trainer.cfg.ckpt_every == 0 or step == trainer.cfg.steps
        if not (due and trainer.dist.is_main):
            return
        tokens = self.shards.indices.long()
        with trainer.eval_weights() as model:
            classes = shard_condition(model, self.shards)
            latents = self.shards.latents
            row = {"step": step}
            for name, loss in self.losses.items():
                loss.to(trainer.device)
                z = latents if loss.config.targets == "latents" else None
                row[name] = validation_loss(model, tokens, classes, loss, z, seed=self.seed)
        with open(trainer.out_dir / "val.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def shard_condition(model: GeneratorModel, shards: TokenShards, rows=slice(None)):
    """What ``model`` is conditioned on for the shards' items ``rows``: labels (class models), a
    :class:`Conditioning` of the items' texts (and source tokens, for edits), or None (unconditional)."""
    if model.config.condition == "class":
        return shards.labels[rows] if model.config.num_classes > 0 else None
    source = shards.source[rows].long() if model.config.condition == "edit" else None
    text, mask = shards.text[rows].float(), shards.text_mask[rows]
    return Conditioning(text=text, text_mask=mask, source=source)


def text_condition(run: dict, texts: list[str], source: torch.Tensor | None = None) -> Conditioning:
    """Embed ``texts`` (prompts, or edit instructions with the source images' tokens ``source`` (B, h, w))
    with the text encoder the generator's shards were made with (``run["text_encoder"]``)."""
    from snce.text import build_text_encoder

    entry = run.get("text_encoder")
    if not entry:
        raise ValueError("this generator was not trained on text (its shards hold no text encoder)")
    encoder = build_text_encoder(entry["spec"])
    if encoder.fingerprint() != entry["fingerprint"]:
        raise ValueError(
            f"the text encoder {entry['spec']} no longer gives the embeddings the generator was trained "
            f"on (fingerprint {encoder.fingerprint()[:12]}, trained on {entry['fingerprint'][:12]})"
        )
    text, mask = encoder.encode(list(texts))
    return Conditioning(text=text, text_mask=mask, source=source)


def grid_classes(model: GeneratorModel, num_images: int) -> torch.Tensor | None:
    """Labels for a sample grid: the first classes (up to 10), each repeated to fill ``num_images``."""
    n = model.config.num_classes
    if n == 0:
        return None
    shown = min(n, 10)
    return torch.arange(shown).repeat_interleave(max(1, num_images // shown))


@torch.no_grad()
def sample_images(
    model: GeneratorModel,
    tokenizer,
    classes: torch.Tensor | None,
    settings: SampleConfig,
    *,
    num_samples: int | None = None,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
):
    """Sample tokens in batches and decode them: returns (tokens (B, h, w), images (B, C, H, W) in [-1, 1]).

    ``tokenizer`` may be None (then images is None). ``classes``: (B,) labels for a class-conditional model, a
    :class:`Conditioning` of B rows for a text or editing model, else None and ``num_samples``. On CUDA the transformer runs under bf16 autocast (logits and sampling stay float32).
    """
    device = model.head_weight.device
    if isinstance(classes, Conditioning):
        total = classes.batch_size
    else:
        total = num_samples if classes is None else len(classes)
    kwargs = settings.kwargs(model.config.family)
    tokens, images = [], []
    for start in range(0, total, batch_size):
        n = min(batch_size, total - start)
        if isinstance(classes, Conditioning):
            c = classes.select(slice(start, start + n)).to(device)
        else:
            c = (
                None
                if classes is None
                else torch.as_tensor(classes[start : start + n], device=device)
            )
        with (
            torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        ):
            t = sample(
                model, c, num_samples=None if c is not None else n, generator=generator, **kwargs
            )
        tokens.append(t.cpu())
        if tokenizer is not None:
            images.append(tokenizer.to(device).decode(t).float().clamp(-1, 1).cpu())
    return torch.cat(tokens), (torch.cat(images) if images else None)


def train_generator(cfg: GeneratorRunConfig, *, resume: bool = False) -> GeneratorModel | None:
    """Train a generator as ``cfg`` says; returns the trained model (EMA weights, eval mode) on rank 0.

    Everything that can be wrong with the inputs is checked before training starts: the tokenizer's codebook
    hash against the shards', latents for ``loss.targets=latents``, the architecture overrides.
    """
    need_latents = cfg.loss.kind == "snce" and cfg.loss.targets == "latents"
    shards = TokenShards(cfg.shards, load_latents=need_latents)
    manifest = shards.manifest
    if cfg.sample.cfg_scale is not None and manifest.num_classes == 0 and not manifest.has_text:
        raise ConfigError(
            "sample.cfg_scale",
            "needs class-conditional or text shards; these hold neither (set it to null)",
        )
    tokenizer = load_tokenizer(cfg.tokenizer, manifest) if cfg.tokenizer else None
    codebook = tokenizer.quantizer.codebook.detach().float() if tokenizer is not None else None
    metric = tokenizer.quantizer.metric if tokenizer is not None else None
    loss = TokenLoss(cfg.loss, codebook, metric, has_latents=manifest.has_latents)
    val = None
    if cfg.val_shards:
        val = TokenShards(cfg.val_shards, load_latents=need_latents)
        if val.manifest.codebook_hash != manifest.codebook_hash:
            raise ValueError(
                "val_shards were made by a different tokenizer than shards (codebook hashes differ)"
            )
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, manifest)

    callbacks = []
    if tokenizer is not None:
        device = resolve_device(cfg.train.device)
        if model.config.condition == "class":
            classes = grid_classes(model, cfg.sample.num_images)
        else:  # the texts (and sources) of the first training items
            classes = shard_condition(model, shards, slice(0, cfg.sample.num_images))

        def make_images(m: GeneratorModel) -> torch.Tensor:
            gen = torch.Generator(device=device).manual_seed(
                cfg.train.seed
            )  # the same noise at every step
            n = None if classes is not None else cfg.sample.num_images
            return sample_images(m, tokenizer, classes, cfg.sample, num_samples=n, generator=gen)[1]

        nrow = (
            max(1, len(classes) // min(model.config.num_classes, 10))
            if model.config.num_classes > 0
            else None
        )
        callbacks.append(
            ImageCallback(cfg.train.image_every, make_images, name="samples", nrow=nrow, scale=4)
        )
    if val is not None:
        losses = {"val_loss": loss}
        if cfg.loss.kind != "ce":
            losses["val_ce"] = TokenLoss(LossConfig(kind="ce"))
        callbacks.append(ValidationCallback(val, losses, cfg.train.seed))

    info = {
        "loss": loss.describe(),
        "codebook_hash": manifest.codebook_hash,
        "num_params": model.num_params(),
    }
    trainer = Trainer(
        model, GeneratorObjective(loss), shards, cfg.train, config={**cfg.to_dict(), "resolved": info},
        callbacks=callbacks, resume=resume,
    )  # fmt: skip
    out = Path(cfg.train.out_dir)
    if trainer.dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    trainer.fit()
    if not trainer.dist.is_main:
        return None
    with trainer.eval_weights() as trained:
        trained.save_pretrained(out / "generator", overwrite=True)
    run = {
        "tokenizer": str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer else "",
        "text_encoder": manifest.text_encoder,  # what --prompt / --instruction are embedded with
        "shards": str(Path(cfg.shards).resolve()),
        "sample": cfg.sample.to_dict(),
        **info,
    }
    atomic_write_text(out / "generator" / RUN_FILE, json.dumps(run, indent=2) + "\n")
    return load_generator(out / "generator").eval()


def generator_dir(checkpoint: str) -> Path:
    """The saved generator of ``checkpoint``: a run's ``generator/`` directory or that directory itself."""
    path = Path(checkpoint)
    if (path / "generator" / "model.safetensors").is_file():  # a run directory
        path = path / "generator"
    return path


def load_for_sampling(checkpoint: str, tokenizer: str | None = None, device="cpu"):
    """Generator + tokenizer + run info for ``snce sample``.

    ``checkpoint``: a run's ``generator/`` directory or the run directory itself. ``tokenizer``: overrides the
    path recorded at training time; its codebook hash must equal the one the generator was trained on.
    """
    path = generator_dir(checkpoint)
    model = load_generator(path, map_location="cpu").to(device).eval()
    run_file = path / RUN_FILE
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    tok_path = tokenizer or run.get("tokenizer") or ""
    tok = None
    if tok_path:
        from snce.tokenizer import Tokenizer

        tok = Tokenizer.from_pretrained(tok_path, device=device).eval()
        expected = run.get("codebook_hash")
        if expected and tok.codebook_hash() != expected:
            raise ValueError(
                f"tokenizer {tok_path} is not the one this generator was trained on: its codebook hashes to "
                f"{tok.codebook_hash()[:16]}..., the generator's shards to {expected[:16]}..."
            )
        if tok.codebook_size != model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tok.codebook_size} codes, the generator predicts {model.config.vocab_size}"
            )
    return model, tok, run
