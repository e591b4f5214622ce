"""The one training loop of snce, shared by the tokenizer and the generators.

The caller brings a model, a dataset and an objective; the loop owns everything else::

    def loss_fn(model, batch, step):          # model: the (possibly DDP-wrapped) module
        loss = ...                            # scalar tensor, averaged over the micro-batch
        return loss, {"rec": rec_loss}        # extra scalars to log (tensors or floats)

    trainer = Trainer(model, loss_fn, dataset, cfg.train, config=cfg.to_dict(), resume=args.resume)
    trainer.fit()
    with trainer.eval_weights() as m:         # EMA weights (when on), eval mode
        m.save_pretrained(out)

What it does: AdamW (weight decay on matrices/kernels only), linear warmup then cosine or constant LR,
gradient clipping, an EMA of the weights, gradient accumulation, bf16 autocast on GPU (fp32 on CPU), an
atomic checkpoint every ``ckpt_every`` steps and at the end, ``resume``, TensorBoard scalars plus a
``log.jsonl`` copy, a tqdm bar, and callbacks (e.g. :class:`ImageCallback` PNG grids).

Precision. Weights, optimizer state and EMA are float32 throughout ("master weights"); ``amp`` runs the
forward and the loss under bf16 autocast (matmuls in bf16; the fused losses accumulate in float32) and the
loss is cast to float32 before the backward and before it is summed for the logs.

Batches and DDP. ``batch_size`` is the global number of samples per optimizer step; each of the
``world_size`` processes sees ``batch_size / (world_size * grad_accum)`` samples per micro-step. Epoch ``e``
visits the permutation ``randperm(N, seed + e)`` (truncated to a multiple of ``world_size``) and rank ``r``
reads every ``world_size``-th entry from offset ``r``, so the union of all ranks' micro-batches at a step
is exactly what a single process reads with the same ``batch_size``: a run under ``torchrun`` follows the
single-process run up to float rounding (for objectives that are per-sample means). The data position is a
function of the step alone, so resuming mid-epoch needs no sampler state.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (NCCL on GPU, gloo
on CPU) and only rank 0 writes files. ``parallel: fsdp`` shards it with FSDP2 instead
(:func:`snce.train.distributed.shard_model`: weights, gradients, optimizer state and EMA split over the
ranks; the same step as DDP up to float rounding). Gradients are reduce-scattered after every micro-step
(no ``no_sync``: accumulating unsharded gradients would undo the saving). Checkpoints always hold full
tensors, written by rank 0, so a run resumes on any number of processes with either setting. A sharded model
cannot run on rank 0 alone, so at the steps where callbacks may evaluate (checkpoint steps, ``image_every``
steps, the last step) the trainer gathers the full weights (EMA when on) to rank 0's CPU, and
:meth:`Trainer.eval_weights` builds an unsharded copy from them; after ``fit`` the last one is kept for the
caller. ``activation_checkpointing`` and ``compile`` go to the model's ``configure_training`` hook
(generators: per transformer block).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from snce.config import Config, ConfigError
from snce.quantize.fvq import learning_annealing
from snce.train.checkpoint import (
    OPTIMIZER_FORMAT,
    full_model_state,
    full_optimizer_state,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from snce.train.distributed import (
    all_reduce_mean,
    barrier,
    clip_grad_norm,
    full_tensor,
    init_distributed,
    shard_like,
    shard_model,
)
from snce.train.images import save_image_grid

LossFn = Callable[[nn.Module, Any, int], tuple[torch.Tensor, dict]]


@dataclass
class TrainConfig(Config):
    """Settings of :class:`Trainer` (the ``train:`` section of a run config)."""

    out_dir: str = "runs/run"  # checkpoints/, tb/, images/, log.jsonl go here
    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # global samples per optimizer step (all ranks x accumulation)
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 2e-4
    # cosine | constant (both after the warmup) | annealing: FVQ's learning annealing (snce.quantize.fvq), its
    # own warmup from 0.005 lr over warmup_steps, lr for 30% of the rest, then linear to 0.01 lr
    schedule: Literal["cosine", "constant", "annealing"] = "cosine"
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    weight_decay: float = 0.0  # applied to >= 2-D parameters only
    betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-8  # AdamW epsilon
    grad_clip: float | None = 1.0  # max global grad norm; null = no clipping
    ema_decay: float | None = None  # e.g. 0.999; null = no EMA
    amp: bool = True  # bf16 autocast, CUDA only unless amp_cpu (master weights stay fp32)
    amp_cpu: bool = False  # amp on CPU too (bf16 matmuls are slow on most CPUs: for checks)
    # ddp: replicate the model (DistributedDataParallel) | fsdp: shard it (FSDP2); one process runs it plain
    parallel: Literal["ddp", "fsdp"] = "ddp"
    activation_checkpointing: bool = False  # recompute activations in the backward (model hook)
    compile: bool = False  # torch.compile (model hook; generators: each block's training forward)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    num_workers: int = 0  # DataLoader worker processes
    log_every: int = 10
    ckpt_every: int = 500  # a checkpoint is also written at the last step
    keep_checkpoints: int = 2
    image_every: int = 0  # PNG grid interval for image callbacks; 0 = only at the end
    progress: bool = True  # tqdm bar
    tensorboard: bool = True

    def check(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "log_every",
            "ckpt_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "num_workers", "image_every"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", f"must lie in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not self.adam_eps > 0:
            raise ConfigError("adam_eps", f"must be > 0, got {self.adam_eps}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must lie in [0, 1), got {list(self.betas)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError("grad_clip", f"must be > 0 or null, got {self.grad_clip}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"must lie in [0, 1) or be null, got {self.ema_decay}")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigError("device", f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")


class StepSampler(Sampler[int]):
    """This rank's sample indices for one epoch, starting ``start`` samples in (see the module docstring)."""

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int):
        self.num_samples, self.rank, self.world_size, self.seed = (
            num_samples,
            rank,
            world_size,
            seed,
        )
        self.per_rank = num_samples // world_size
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)
        mine = order[: self.per_rank * self.world_size][self.rank :: self.world_size]
        return iter(mine[self.start :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


class Callback:
    """Called on every rank after each optimizer step (and its checkpoint); write files on rank 0 only."""

    def on_step(self, trainer: Trainer, step: int) -> None:
        raise NotImplementedError


class ImageCallback(Callback):
    """Every ``every`` steps (and at the last step) save ``make_images(model)`` as a PNG grid.

    ``make_images`` gets the unwrapped model with EMA weights (when on) in eval mode under ``no_grad`` and
    returns (B, C, H, W) images in [-1, 1]. Files: ``<out_dir>/images/<name>_<step>.png``. Rank 0 only.
    """

    def __init__(
        self,
        every: int,
        make_images: Callable[[nn.Module], torch.Tensor],
        name: str = "samples",
        nrow: int | None = None,
        scale: int = 1,
    ):
        self.every, self.make_images = every, make_images
        self.name, self.nrow, self.scale = name, nrow, scale

    def on_step(self, trainer: Trainer, step: int) -> None:
        due = step == trainer.cfg.steps or (self.every > 0 and step % self.every == 0)
        if not (due and trainer.dist.is_main):
            return
        with trainer.eval_weights() as model, torch.no_grad():
            images = self.make_images(model)
        path = trainer.out_dir / "images" / f"{self.name}_{step:07d}.png"
        save_image_grid(images, path, nrow=self.nrow, scale=self.scale)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def training_states(model: nn.Module) -> dict[str, dict]:
    """``training_state()`` of every submodule that has one (e.g. a quantizer's usage window), by name."""
    return {
        name: m.training_state()
        for name, m in model.named_modules()
        if hasattr(m, "training_state")
    }


def load_training_states(model: nn.Module, states: dict[str, dict]) -> None:
    modules = dict(model.named_modules())
    for name, state in states.items():
        if name in modules:
            modules[name].load_training_state(state)


def weightless_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its parameters on the meta device (no memory; buffers are copied) and
    training options off: the skeleton an unsharded evaluation copy is built on (``load_state_dict(...,
    assign=True)``)."""
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    skeleton = copy.deepcopy(model, memo)
    if hasattr(skeleton, "configure_training"):
        skeleton.configure_training()
    return skeleton


def to_device(batch, device: torch.device):
    """Move the tensors of a (nested) batch to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Trainer:
    """Trains ``model`` on ``dataset`` with ``loss_fn``; see the module docstring.

    Args:
        model: any ``nn.Module`` (moved to the run's device; wrapped in DDP under torchrun).
        loss_fn: ``loss_fn(model, batch, step) -> (loss, logs)``; ``step`` counts finished optimizer steps.
        dataset: a map-style Dataset; batches are collated by ``collate_fn`` (torch's default if None).
        cfg: :class:`TrainConfig`.
        config: the run's full configuration (JSON-able), stored in every checkpoint.
        callbacks: :class:`Callback` objects run after every step.
        resume: continue from the newest checkpoint in ``cfg.out_dir`` (required to reuse an out_dir).
        find_unused_parameters: passed to DDP, for objectives that skip some parameters on some steps.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        dataset: Dataset,
        cfg: TrainConfig,
        *,
        config: dict | None = None,
        callbacks: list[Callback] | tuple = (),
        collate_fn: Callable | None = None,
        resume: bool = False,
        find_unused_parameters: bool = False,
    ):
        self.cfg, self.loss_fn, self.callbacks = cfg, loss_fn, list(callbacks)
        self.config = config if config is not None else {"train": cfg.to_dict()}
        self.dist = init_distributed(cfg.device)
        self.device = self.dist.device
        self.out_dir = Path(cfg.out_dir)
        world, accum = self.dist.world_size, cfg.grad_accum
        if cfg.batch_size % (world * accum):
            raise ConfigError(
                "train.batch_size",
                f"must be divisible by world_size x grad_accum = {world} x {accum}, got {cfg.batch_size}",
            )
        self.micro_batch = cfg.batch_size // (world * accum)
        self.sampler = StepSampler(len(dataset), self.dist.rank, world, cfg.seed)
        self.batches_per_epoch = self.sampler.per_rank // self.micro_batch
        if self.batches_per_epoch == 0:
            raise ConfigError(
                "train.batch_size",
                f"the dataset holds {len(dataset)} samples ({self.sampler.per_rank} per rank), fewer than "
                f"one micro-batch of {self.micro_batch}; lower train.batch_size",
            )
        self.loader = DataLoader(
            dataset,
            batch_size=self.micro_batch,
            sampler=self.sampler,
            num_workers=cfg.num_workers,
            collate_fn=collate_fn,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),  # keeps the loader from drawing on the global RNG
        )

        self.model = model.to(self.device)
        self.step = 0
        checkpoint = self._find_checkpoint(resume)  # loads the weights into the plain model
        if cfg.activation_checkpointing or cfg.compile:
            if not hasattr(self.model, "configure_training"):
                key = "activation_checkpointing" if cfg.activation_checkpointing else "compile"
                raise ConfigError(
                    f"train.{key}",
                    f"needs a model with a configure_training hook; {type(model).__name__} has none",
                )
            self.model.configure_training(
                activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile
            )
        self.sharded = cfg.parallel == "fsdp" and self.dist.distributed
        # rank 0 of a sharded run: an unsharded copy of the model without weights (see eval_weights)
        self._template: nn.Module | None = None
        # sharded runs: (step, full weights, full EMA) on rank 0's CPU, gathered at that step by every rank
        self._gathered: tuple[int, dict, dict | None] | None = None
        self._gathered_step = -1
        if self.sharded:
            if self.dist.is_main:
                self._template = weightless_copy(self.model)
            self.ddp = shard_model(self.model, self.dist)
        elif self.dist.distributed:
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters,
            )
        else:
            self.ddp = self.model
        # built over the sharded parameters under FSDP: optimizer state and EMA hold local shards only
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # the optimizer's parameter order, for checkpoints that index parameters by position
        self._param_names = [n for n, p in params if p.dim() >= 2] + [
            n for n, p in params if p.dim() < 2
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps)
        self.ema = (
            {n: p.detach().float().clone() for n, p in params}
            if cfg.ema_decay is not None
            else None
        )
        self._restore_or_start(checkpoint)

    # ---------------------------------------------------------------- setup / checkpoints

    def _find_checkpoint(self, resume: bool) -> tuple[Path, dict, dict | None] | None:
        """With ``resume``: the newest checkpoint, its weights loaded into the (still plain) model; returns
        (path, state.pt, EMA tensors or None). Without: None, after checking that out_dir holds no run."""
        # rank 0 first: it sets aside checkpoints that do not verify, then the other ranks find the same one
        if self.dist.is_main:
            ckpt = latest_checkpoint(self.out_dir)
        barrier()
        if not self.dist.is_main:
            ckpt = latest_checkpoint(self.out_dir)
        if resume:
            if ckpt is None:
                raise FileNotFoundError(
                    f"--resume: no checkpoint found under {self.out_dir / 'checkpoints'}"
                )
            state, ema = load_checkpoint(ckpt, self.model)
            return ckpt, state, ema
        if ckpt is not None:
            raise FileExistsError(
                f"{self.out_dir} already holds checkpoints ({ckpt.name}); pass --resume to continue that run "
                "or choose another train.out_dir"
            )
        return None

    def _restore_or_start(self, checkpoint: tuple[Path, dict, dict | None] | None) -> None:
        """Optimizer state, step, EMA, RNG and module states from the checkpoint (laid out as this run's
        parameters: sharded under FSDP), or the fresh-start seed."""
        if checkpoint is not None:
            ckpt, state, ema = checkpoint
            load_optimizer_state(
                self.model, self.optimizer, state["optimizer"], self._param_names,
                fmt=state.get("optimizer_format"),
            )  # fmt: skip
            self.step = int(state["step"])
            if self.ema is not None:
                if ema is None:
                    raise ValueError(
                        f"checkpoint {ckpt} holds no EMA weights but train.ema_decay is set"
                    )
                missing = sorted(set(self.ema) - set(ema))
                if missing:
                    raise ValueError(f"checkpoint {ckpt} holds no EMA of {missing[:5]}")
                for name in self.ema:
                    self.ema[name] = shard_like(ema[name].float(), self.ema[name])
            rngs, modules = state["rng"], state.get("modules")
            same_world = len(rngs) == self.dist.world_size
            if same_world:
                set_rng_state(rngs[self.dist.rank])
            else:  # a different world size cannot continue the same random streams
                torch.manual_seed(self.cfg.seed + 7919 * self.dist.rank + self.step)
            if modules is not None:
                load_training_states(self.model, modules[self.dist.rank if same_world else 0])
            return
        torch.manual_seed(self.cfg.seed + 7919 * self.dist.rank)

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (collective under DDP and FSDP; rank 0 writes)."""
        local = (rng_state(), training_states(self.model))
        per_rank = [None] * self.dist.world_size
        if self.dist.distributed:
            dist.all_gather_object(per_rank, local)
        else:
            per_rank = [local]
        optimizer = full_optimizer_state(self.model, self.optimizer)  # collective under FSDP
        if self.sharded:
            self._gather()
            weights, ema = self._gathered[1:] if self.dist.is_main else (None, None)
        else:
            weights, ema = self.model, self.ema
        path = None
        if self.dist.is_main:
            state = {
                "step": self.step,
                "optimizer": optimizer,
                "optimizer_format": OPTIMIZER_FORMAT,
                "rng": [rng for rng, _ in per_rank],
                "modules": [modules for _, modules in per_rank],
            }
            path = save_checkpoint(
                self.out_dir,
                self.step,
                weights,
                state,
                self.config,
                ema,
                self.cfg.keep_checkpoints,
            )
        barrier()
        return path

    def _gather(self) -> None:
        """Sharded runs: the full weights and EMA of this step to rank 0's CPU (collective; once per step)."""
        # _gathered_step is the same on every rank (rank 0 alone holds the tensors)
        if self._gathered_step == self.step:
            return
        self._gathered = None  # free the previous copy before gathering the next
        weights = full_model_state(self.model)
        ema = None
        if self.ema is not None:
            ema = {n: full_tensor(v).cpu() for n, v in self.ema.items()}
        self._gathered_step = self.step
        if self.dist.is_main:
            self._gathered = (self.step, weights, ema)

    # ---------------------------------------------------------------- schedule / EMA

    def lr_at(self, step: int) -> float:
        """LR for the optimizer step that follows ``step`` finished steps."""
        cfg = self.cfg
        if cfg.schedule == "annealing":
            return cfg.lr * learning_annealing(step, cfg.steps, cfg.warmup_steps)
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return cfg.lr
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.lr * (
            cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        )

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Warm-up of the decay so short runs are not dominated by the initial weights.
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        names = list(self.ema)
        params = dict(self.model.named_parameters())
        current = [params[n].detach().float() for n in names]
        torch._foreach_lerp_([self.ema[n] for n in names], current, 1 - decay)

    @contextmanager
    def eval_weights(self):
        """The unwrapped model with EMA weights (when on) in eval mode; restores training weights after.

        Under FSDP (rank 0 only, at the steps the module docstring names and after ``fit``): a fresh unsharded
        copy on the run's device, built from the gathered full weights; dropped afterwards.
        """
        if self.sharded:
            yield from self._gathered_eval_model()
            return
        model = self.model
        was_training = model.training
        backup = None
        if self.ema is not None:
            params = dict(model.named_parameters())
            backup = {n: params[n].detach().clone() for n in self.ema}
            with torch.no_grad():
                for n, v in self.ema.items():
                    params[n].copy_(v)
        model.eval()
        try:
            yield model
        finally:
            if backup is not None:
                params = dict(model.named_parameters())
                with torch.no_grad():
                    for n, v in backup.items():
                        params[n].copy_(v)
            model.train(was_training)

    def _gathered_eval_model(self):
        if not self.dist.is_main:
            raise RuntimeError("under train.parallel=fsdp only rank 0 holds evaluation weights")
        if self._gathered is None or self._gathered[0] != self.step:
            raise RuntimeError(
                f"under train.parallel=fsdp the full weights are gathered at checkpoint steps, image_every "
                f"steps and the last step; none were gathered at step {self.step}"
            )
        _, weights, ema = self._gathered
        state = dict(weights)
        for name, value in (ema or {}).items():
            state[name] = value.to(weights[name].dtype)
        model = copy.deepcopy(self._template)
        model.load_state_dict(state, assign=True)
        yield model.to(self.device).eval()

    # ---------------------------------------------------------------- loop

    def _micro_batches(self) -> Iterator:
        epoch, start = divmod(self.step * self.cfg.grad_accum, self.batches_per_epoch)
        while True:
            self.sampler.set_position(epoch, start * self.micro_batch)
            yield from self.loader
            epoch, start = epoch + 1, 0

    def fit(self) -> None:
        """Train until ``cfg.steps`` optimizer steps are done."""
        cfg, main = self.cfg, self.dist.is_main
        if self.step >= cfg.steps:
            if self.sharded:
                self._gather()  # for eval_weights() after fit
            return
        writer = None
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(self.out_dir / "tb"), purge_step=self.step)
        amp = cfg.amp and (self.device.type == "cuda" or cfg.amp_cpu)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if amp else nullcontext()
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not (main and cfg.progress),
            desc=self.out_dir.name,
        )
        params = [p for p in self.model.parameters() if p.requires_grad]
        sums: dict[str, torch.Tensor] = {}
        count = 0
        batches = self._micro_batches()
        t0 = time.perf_counter()
        self.ddp.train()
        try:
            while self.step < cfg.steps:
                lr = self.lr_at(self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                for micro in range(cfg.grad_accum):
                    batch = to_device(next(batches), self.device)
                    last = micro == cfg.grad_accum - 1
                    replicated = self.dist.distributed and not self.sharded
                    sync = self.ddp.no_sync() if replicated and not last else nullcontext()
                    with sync:
                        with autocast:
                            loss, logs = self.loss_fn(self.ddp, batch, self.step)
                        loss = loss.float()
                        (loss / cfg.grad_accum).backward()
                    for k, v in {"loss": loss, **logs}.items():
                        v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
                        sums[k] = sums.get(k, 0.0) + v.to(self.device)
                    count += 1
                max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
                grad_norm = clip_grad_norm(params, max_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if self.ema is not None:
                    self._update_ema()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    logs = self._reduce_logs(sums, count, grad_norm, lr, time.perf_counter() - t0)
                    sums, count, t0 = {}, 0, time.perf_counter()
                    if main:
                        self._write_logs(logs, writer, bar)
                final = self.step == cfg.steps
                if self.step % cfg.ckpt_every == 0 or final:
                    self.save()
                if self.sharded and (final or (self.callbacks and self._eval_step(self.step))):
                    self._gather()  # callbacks evaluate on rank 0 (see eval_weights)
                for callback in self.callbacks:
                    callback.on_step(self, self.step)
                if self.sharded and not final:
                    # the last step's copy is kept for the caller
                    self._gathered, self._gathered_step = None, -1
                bar.update(1)
        finally:
            bar.close()
            if writer is not None:
                writer.close()

    def _eval_step(self, step: int) -> bool:
        """Steps at which callbacks may evaluate: checkpoints, image grids, the last step."""
        cfg = self.cfg
        images = cfg.image_every > 0 and step % cfg.image_every == 0
        return step % cfg.ckpt_every == 0 or step == cfg.steps or images

    def _reduce_logs(self, sums, count, grad_norm, lr, seconds) -> dict[str, float]:
        keys = sorted(sums)
        values = torch.stack([sums[k] / count for k in keys] + [grad_norm.float().to(self.device)])
        values = all_reduce_mean(values).tolist()
        logs = dict(zip(keys + ["grad_norm"], values, strict=True))
        if not math.isfinite(logs["loss"]):
            raise FloatingPointError(f"loss is {logs['loss']} at step {self.step}; lower train.lr?")
        logs["lr"] = lr
        logs["samples_per_s"] = count / max(seconds, 1e-9) * self.micro_batch * self.dist.world_size
        return logs

    def _write_logs(self, logs: dict[str, float], writer, bar) -> None:
        if writer is not None:
            for k, v in logs.items():
                writer.add_scalar(f"train/{k}", v, self.step)
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **logs}) + "\n")
        bar.set_postfix(loss=f"{logs['loss']:.4g}", lr=f"{logs['lr']:.2e}")
