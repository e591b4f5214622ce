"""Run a CE-vs-SNCE study: tokenizers per (setting, K), then generators per (family, arm, seed), evaluated over
steps against a held-out split (protocol: :mod:`snce.study.config`; statistics: :mod:`snce.study.stats`).

Directory layout under ``cfg.out_dir``::

    config.json                                   the study configuration of the latest invocation
    cache/                                        the domain classifier (feature network)
    floors.json                                   FID of real training images vs the held-out split
    tokenizers/{setting}-k{K}/                    tokenizer run (tokenizer/, checkpoints/) and study.json: its
                                                  quality, code health, suggested taus, SNCE target entropy,
                                                  matched smoothing and reconstruction floor
    tokens/{setting}-k{K}/{train,test}/           token shards
    runs/{setting}-k{K}/{family}/{arm}/seed{s}/   generator run: checkpoints/, evals.json (grows), samples.png,
                                                  generator/, result.json (written once the run is finished)
    results.json, report.md, plots/               the study's numbers, its report and figures

Runs are independent once their tokenizer exists, so ``workers`` processes (one thread each) train them at
once. Everything resumes: a finished tokenizer or run is reused while its settings are unchanged (otherwise the
study stops and names the directory that differs); an unfinished run continues from its newest checkpoint
with the evaluations it already made. Every file is written atomically.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm.auto import tqdm

from snce.config import atomic_write_text
from snce.data import TokenShards, build_dataset
from snce.functional import suggest_tau
from snce.generators.objectives import GeneratorObjective, LossConfig, TokenLoss
from snce.losses import smoothing_for_entropy, target_entropy
from snce.metrics import ImageEvaluator, code_statistics, feature_network, validation_nll
from snce.quantize import codebook_health
from snce.study.config import StudyConfig, StudySetting, arm_tau_scale
from snce.tokenizer import (
    Tokenizer,
    evaluate_tokenizer,
    tokenize_dataset,
    train_tokenizer,
)
from snce.train import Callback, Trainer, latest_checkpoint, save_image_grid
from snce.train.distributed import barrier, init_distributed, resolve_device
from snce.train.generator import RUN_FILE, GeneratorRunConfig, build_model, sample_images

TEST_SAMPLING, VAL_SAMPLING = 1_000_000, 2_000_000  # sampling seeds: offset + the run's seed


def write_json(path: Path, data) -> None:
    """Strict JSON (NaN and inf, e.g. the interval of a single seed, are written as null), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")


def _finite(data):
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def read_json(path: Path):
    return json.loads(path.read_text())


class SettingsChanged(ValueError):
    """A directory holds results made with other settings; the study never overwrites them silently."""


def check_spec(directory: Path, spec: dict, defaults: dict | None = None) -> None:
    """Record ``spec`` in ``directory/spec.json``, or check it equals the one recorded there.

    ``defaults``: the spec of a default config; a key the recorded spec lacks (a setting added to snce
    since) counts as unchanged when the new spec holds its default, so results survive an upgrade.
    """
    path = directory / "spec.json"
    if path.is_file():
        changed = spec_differences(read_json(path), spec, defaults or {})
        if changed:
            raise SettingsChanged(
                f"{directory} holds results made with other settings (differences in: {', '.join(changed)}); "
                "choose another out_dir (--set out_dir=...) or delete that directory to redo it"
            )
    else:
        write_json(path, spec)


def spec_differences(old: dict, new: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two specs (see :func:`check_spec` for ``defaults``)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if key not in old and key in new and new[key] == default:
            continue
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            changed += spec_differences(old[key], new[key], default or {}, f"{prefix}{key}.")
        elif old.get(key) != new.get(key):
            changed.append(prefix + key)
    return changed


def evenly_spaced(dataset, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` evenly spaced items of an image dataset (all when n is None or too large) -> (images, labels)."""
    total = len(dataset)
    index = (
        range(total)
        if n is None or n >= total
        else torch.linspace(0, total - 1, n).round().long().tolist()
    )
    images, labels = zip(*(dataset[i] for i in index), strict=True)
    return torch.stack(images), torch.as_tensor(labels)


def class_sweep(dataset, n: int) -> torch.Tensor:
    """``n`` images of ``dataset`` laid out as the study's samples are: item i is of class i % num_classes (the
    class's (i // num_classes)-th image), so a 10-wide grid of 10 classes shows one class per column. A class
    with no image in the split leaves a black tile."""
    images, labels = evenly_spaced(dataset)
    C = dataset.num_classes
    blank = torch.full_like(images[0], -1.0)
    tiles = []
    for i in range(n):
        of_class = (labels == i % C).nonzero().flatten()
        tiles.append(images[of_class[(i // C) % len(of_class)]] if len(of_class) else blank)
    return torch.stack(tiles)


# ------------------------------------------------------------------------------------------ measuring


@dataclass
class Evaluators:
    """The feature network and the two reference splits every sample set is measured against."""

    test: ImageEvaluator  # held-out split: every reported number
    val: ImageEvaluator  # val split: tau selection only
    info: dict  # the feature network, for the report


def per_process(build: Callable) -> Callable:
    """Cache ``build(cfg, *args)`` for the life of this process, keyed by the study's settings and args."""
    cache = {}

    @functools.wraps(build)
    def cached(cfg: StudyConfig, *args, **kwargs):
        key = (json.dumps(cfg.to_dict(), sort_keys=True), args)
        if key not in cache:
            cache[key] = build(cfg, *args, **kwargs)
        return cache[key]

    return cached


@per_process
def evaluators(cfg: StudyConfig, progress: bool = False) -> Evaluators:
    """Built once per process: the feature network (trained on training images, cached on disk) and its
    features of the test and val splits."""
    e = cfg.eval
    device = init_distributed(cfg.device).device
    train_images, train_labels = evenly_spaced(
        build_dataset(cfg.data, split="train"), e.feature_images
    )
    net, info = feature_network(
        train_images, train_labels, dataset=f"{cfg.data.kind}{cfg.data.size}px",
        cache_dir=Path(cfg.out_dir) / "cache", inception_weights=e.inception_weights, seed=cfg.seed,
        progress=progress, steps=e.domain_steps, width=e.domain_width,
    )  # fmt: skip
    net = net.to(device)
    make = functools.partial(
        ImageEvaluator,
        net,
        class_logits=info["class_logits"],
        bootstrap=e.bootstrap,
        confidence=e.confidence,
        seed=cfg.seed,
    )
    test = make(evenly_spaced(build_dataset(cfg.data, split="test"))[0])
    val = make(evenly_spaced(build_dataset(cfg.data, split="val"))[0])
    return Evaluators(test, val, info)


def data_floors(cfg: StudyConfig) -> dict:
    """FID of ``num_samples`` real training images against the test split: the floor of a perfect generator
    at this sample size. Also the classifier's accuracy on the real test images (class consistency ceiling)."""
    ev = evaluators(cfg)
    images, labels = evenly_spaced(build_dataset(cfg.data, split="train"), cfg.eval.num_samples)
    floors = {"train_vs_test": ev.test(images, labels)}
    test_images, test_labels = evenly_spaced(build_dataset(cfg.data, split="test"))
    if ev.info["class_logits"]:
        floors["test_class_acc"] = ev.test(test_images, test_labels)["class_acc"]
    return floors


# ------------------------------------------------------------------------------------------ tokenizers


def tokenizer_dir(out: Path, setting: str, K: int) -> Path:
    return out / "tokenizers" / f"{setting}-k{K}"


def needs_latents(cfg: StudyConfig, name: str) -> bool:
    """Whether any setting of this tokenizer kind trains on latents (its shards then store them)."""
    return any("snce_latents" in cfg.arms(s) for s in cfg.settings if s.name == name)


def prepare_tokenizer(
    cfg: StudyConfig, setting: StudySetting, K: int, is_main: bool = True
) -> dict:
    """Train (or reuse, or resume) the tokenizer of (setting, K), tokenize the train and test splits, and
    measure what the study needs from it; returns (and stores in ``study.json``) those numbers."""
    run_dir = tokenizer_dir(Path(cfg.out_dir), setting.name, K)
    run_cfg = cfg.tokenizer_run(setting, K, str(run_dir))
    if is_main:
        check_spec(run_dir, run_cfg.to_dict(), type(run_cfg)().to_dict())
    barrier()
    info_path = run_dir / "study.json"
    measured_with = measurement_spec(cfg, setting.name, K)
    trained = (run_dir / "tokenizer" / "config.json").is_file()
    if (
        trained
        and info_path.is_file()
        and read_json(info_path).get("measured_with") == measured_with
    ):
        return read_json(info_path)
    start = time.perf_counter()
    if not trained:
        train_tokenizer(run_cfg, resume=latest_checkpoint(run_dir) is not None)
    seconds = time.perf_counter() - start
    if info_path.is_file():  # re-measured with other settings: the training time is the first one's
        seconds = read_json(info_path).get("train_seconds", seconds)
    if is_main:
        tok = Tokenizer.from_pretrained(run_dir / "tokenizer", device=resolve_device(cfg.device))
        info = measure_tokenizer(cfg, setting, K, tok, seconds)
        write_json(info_path, {**info, "measured_with": measured_with})
    barrier()
    return read_json(info_path)


def arms_on(cfg: StudyConfig, name: str, K: int) -> list[str]:
    """Every arm trained on the tokens of tokenizer (name, K), over the settings that share it."""
    arms = {
        a for s in cfg.settings if s.name == name and K in s.codebook_sizes for a in cfg.arms(s)
    }
    return sorted(arms)


def measurement_spec(cfg: StudyConfig, name: str, K: int) -> dict:
    """What a tokenizer's study.json depends on beyond the tokenizer itself: re-measured when it changes."""
    e = cfg.eval
    return {
        "arms": arms_on(cfg, name, K), "latents": needs_latents(cfg, name), "loss": cfg.loss.to_dict(),
        "num_samples": e.num_samples, "feature_network": [e.inception_weights, e.feature_images, e.domain_steps,
        e.domain_width], "bootstrap": [e.bootstrap, e.confidence], "seed": cfg.seed,
    }  # fmt: skip


def measure_tokenizer(
    cfg: StudyConfig, setting: StudySetting, K: int, tok: Tokenizer, seconds
) -> dict:
    """Token shards, code health, suggested taus, SNCE target entropy and matched smoothing, and the
    reconstruction floor (FID of reconstructed test images against the test split) of one tokenizer."""
    out = Path(cfg.out_dir)
    latents = needs_latents(cfg, setting.name)
    shard_dirs = {}
    for split in ("train", "test"):
        shard_dirs[split] = out / "tokens" / f"{setting.name}-k{K}" / split
        tokenize_dataset(
            tok, build_dataset(cfg.data, split=split), shard_dirs[split], data_config=cfg.data,
            latents=latents, device=cfg.device, overwrite=True, progress=False,
        )  # fmt: skip
    train = TokenShards(shard_dirs["train"], load_latents=latents)
    codebook, metric = tok.quantizer.codebook.detach().float(), tok.quantizer.metric
    quality = evaluate_tokenizer(
        tok, build_dataset(cfg.data, split="test"), device=cfg.device, progress=False
    )
    info = {
        "setting": setting.name, "K": K, "metric": metric, "train_seconds": seconds,
        "test": quality,  # PSNR, SSIM, usage and perplexity on the test split
        "health": codebook_health(codebook, metric, train.indices),  # over the training tokens
        **snce_targets(codebook, metric, train.indices.reshape(-1).long(), cfg.loss.topk),
        "train_tokens": int(train.indices.numel()),
    }  # fmt: skip
    if latents:
        z = train.latents.reshape(-1, codebook.shape[1]).float()
        info["tau_latents"] = suggest_tau(codebook, metric, latents=z)
    info["reconstruction_floor"], info["target_floors"] = target_floors(
        cfg, setting.name, K, tok, info
    )
    return info


@torch.no_grad()
def target_floors(
    cfg: StudyConfig, name: str, K: int, tok: Tokenizer, info: dict
) -> tuple[dict, dict]:
    """What a generator that learned its training target exactly would score: the ``num_samples`` test images'
    tokens, redrawn token by token from each arm's target distribution, decoded and measured against the test
    split. The CE target gives the reconstructions themselves (returned first, with every metric)."""
    images, labels = evenly_spaced(build_dataset(cfg.data, split="test"), cfg.eval.num_samples)
    device = next(tok.parameters()).device
    batches = [tok.encode(x.to(device)) for x in images.split(500)]
    indices = torch.cat([b.indices for b in batches])  # (n, h, w)
    latents = torch.cat([b.latents.permute(0, 2, 3, 1) for b in batches]).reshape(
        indices.numel(), -1
    )

    def measure(tokens: torch.Tensor, full: bool) -> dict:
        decoded = torch.cat(
            [tok.decode(t).clamp(-1, 1).cpu() for t in tokens.view_as(indices).split(500)]
        )
        return evaluators(cfg).test(decoded, labels, full=full)

    codebook, metric = tok.quantizer.codebook.detach().float(), tok.quantizer.metric
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    draws = target_draws(
        arms_on(cfg, name, K), info, cfg.seed, codebook, metric, indices.reshape(-1),
        latents=latents, generator=gen, **study_loss(cfg),
    )  # fmt: skip
    floors = {arm: measure(drawn, full=False) for arm, drawn in draws.items()}
    return measure(indices, full=True), floors


def snce_targets(
    codebook: torch.Tensor, metric: str, codes: torch.Tensor, topk: int | None = None
) -> dict:
    """The suggested ``tau`` of a codebook (K, D), the mean ``target_entropy`` of its SNCE targets over the
    training ``codes`` (N,), and the ``matched_smoothing`` epsilon of equal entropy: what every arm but CE is
    built from (:func:`arm_loss`)."""
    tau = suggest_tau(codebook, metric)
    entropy = target_entropy(codebook, tau=tau, metric=metric, codes=codes, topk=topk)
    return {
        "tau": tau, "target_entropy": entropy,
        "matched_smoothing": smoothing_for_entropy(entropy, codebook.shape[0]),
    }  # fmt: skip


def target_draws(
    arms, info: dict, seed: int, codebook: torch.Tensor, metric: str, indices: torch.Tensor, *,
    latents: torch.Tensor | None = None, generator: torch.Generator | None = None, **loss_options,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per arm but CE: every token of ``indices`` (N,) redrawn from the arm's training target
    (:meth:`TokenLoss.sample_targets`), in the order of ``arms``, from ``generator``. ``loss_options``: the
    study-wide options of :func:`arm_loss`."""
    draws = {}
    for arm in arms:
        if arm != "ce":
            loss_cfg = arm_loss(arm, info, seed, **loss_options)
            loss = TokenLoss(loss_cfg, codebook, metric, has_latents=latents is not None)
            draws[arm] = loss.sample_targets(
                indices, codebook.shape[0], latents, generator=generator
            )
    return draws


# ------------------------------------------------------------------------------------------ generators


@dataclass(frozen=True)
class RunKey:
    """One generator run of the grid."""

    setting: str
    K: int
    family: str
    arm: str
    seed: int

    def directory(self, out: Path) -> Path:
        return (
            out / "runs" / f"{self.setting}-k{self.K}" / self.family / self.arm / f"seed{self.seed}"
        )


def plan_runs(cfg: StudyConfig) -> list[RunKey]:
    return [
        RunKey(s.name, K, family, arm, seed)
        for s in cfg.settings
        for K in s.codebook_sizes
        for family in s.families
        for arm in cfg.arms(s)
        for seed in cfg.seeds
    ]


@dataclass
class Context:
    """What every generator run of one (setting, K) shares."""

    cfg: StudyConfig
    tokenizer_dir: Path
    tokenizer: Tokenizer
    shard_dirs: dict[str, Path]
    shards: dict[str, TokenShards]
    info: dict  # the tokenizer's study.json
    device: torch.device

    @property
    def num_classes(self) -> int:
        return self.shards["train"].manifest.num_classes

    def classes(self, n: int) -> torch.Tensor | None:
        """Balanced class labels 0, 1, ..., C-1, 0, 1, ... for n samples (None: unconditional)."""
        return torch.arange(n) % self.num_classes if self.num_classes else None


@per_process
def context(cfg: StudyConfig, setting: str, K: int) -> Context:
    out = Path(cfg.out_dir)
    device = init_distributed(cfg.device).device
    tok_dir = tokenizer_dir(out, setting, K) / "tokenizer"
    shard_dirs = {split: out / "tokens" / f"{setting}-k{K}" / split for split in ("train", "test")}
    shards = {split: TokenShards(d) for split, d in shard_dirs.items()}
    tok = Tokenizer.from_pretrained(tok_dir).to(device).eval()
    info = read_json(tokenizer_dir(out, setting, K) / "study.json")
    return Context(cfg, tok_dir, tok, shard_dirs, shards, info, device)


def arm_loss(
    arm: str, info: dict, seed: int, *, label_smoothing: float = 0.1, topk: int | None = None
) -> LossConfig:
    """The token loss of ``arm`` (see :mod:`snce.study.config`), with every temperature and epsilon explicit.

    ``info``: the tokenizer's ``tau`` (and ``matched_smoothing``, ``tau_latents`` for the arms that use them);
    ``seed`` fixes snce_shuffled's permutation; ``label_smoothing`` is ls's epsilon, ``topk`` SNCE's."""
    if arm == "ce":
        return LossConfig(kind="ce")
    if arm == "ls":
        return LossConfig(kind="label_smoothing", label_smoothing=label_smoothing)
    if arm == "ls_matched":
        return LossConfig(kind="label_smoothing", label_smoothing=info["matched_smoothing"])
    if arm == "snce_latents":
        return LossConfig(kind="snce", tau=info["tau_latents"], targets="latents", topk=topk)
    if arm == "snce_shuffled":
        return LossConfig(
            kind="snce", tau=info["tau"], topk=topk, shuffle_neighbors=True, shuffle_seed=seed
        )
    return LossConfig(kind="snce", tau=info["tau"] * arm_tau_scale(arm), topk=topk)


def study_loss(cfg: StudyConfig) -> dict:
    """The study-wide options of :func:`arm_loss`."""
    return {"label_smoothing": cfg.loss.label_smoothing, "topk": cfg.loss.topk}


@torch.no_grad()
def sample_and_measure(ctx: Context, model, evaluator: ImageEvaluator, seed: int, full: bool):
    """``num_samples`` balanced-class samples drawn with ``seed`` -> (metrics, tokens, images); ``full``: every
    metric of the evaluator, else the cheap ones (see :meth:`ImageEvaluator.__call__`)."""
    n = ctx.cfg.eval.num_samples
    classes = ctx.classes(n)
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    tokens, images = sample_images(
        model, ctx.tokenizer, classes, ctx.cfg.eval.sample, num_samples=n, batch_size=1000, generator=gen
    )  # fmt: skip
    return evaluator(images, classes, full=full), tokens, images


def evaluate(ctx: Context, model, step: int, seed: int, last: bool) -> tuple[dict, torch.Tensor]:
    """The metrics of one checkpoint; returns (metrics, the first ``grid_samples`` images).

    Every evaluation: FID, class consistency, code statistics, held-out NLL (what curves need). The last one
    also: the FID's bootstrap interval, KID, IS, precision/recall, and the val split's FID.
    """
    e, ev = ctx.cfg.eval, evaluators(ctx.cfg)
    start = time.perf_counter()
    metrics, tokens, images = sample_and_measure(ctx, model, ev.test, TEST_SAMPLING + seed, last)
    metrics = {"step": step, **metrics}
    metrics.update({f"code_{k}": v for k, v in code_statistics(tokens, ctx.info["K"]).items()})
    test = ctx.shards["test"]
    n = min(e.nll_samples, len(test))
    labels = test.labels[:n] if ctx.num_classes else None
    metrics.update(
        validation_nll(
            model, test.indices[:n].long(), labels, codebook=ctx.tokenizer.quantizer.codebook.detach(),
            metric=ctx.tokenizer.quantizer.metric, tau=ctx.info["tau"], seed=seed,
        )
    )  # fmt: skip
    if last:  # the val split, with other sampling noise: what a tau may be selected by
        val, _, _ = sample_and_measure(ctx, model, ev.val, VAL_SAMPLING + seed, False)
        metrics["val_fid"] = val["fid"]
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics, images[: e.grid_samples]


class EvalCallback(Callback):
    """Evaluate every ``every`` steps and at the last step (rank 0); keep ``evals.json`` up to date."""

    def __init__(self, ctx: Context, run_dir: Path, evals: list[dict], seed: int):
        self.ctx, self.run_dir, self.evals, self.seed = ctx, run_dir, evals, seed

    def due(self, step: int, last: int) -> bool:
        return step == last or step % self.ctx.cfg.eval.every == 0

    def on_step(self, trainer: Trainer, step: int) -> None:
        if not (self.due(step, trainer.cfg.steps) and trainer.dist.is_main):
            return
        if any(e["step"] == step for e in self.evals):
            return
        with trainer.eval_weights() as model:
            metrics, grid = evaluate(self.ctx, model, step, self.seed, step == trainer.cfg.steps)
        self.evals.append(metrics)
        write_json(self.run_dir / "evals.json", self.evals)
        save_image_grid(grid, self.run_dir / "samples.png", nrow=10, scale=2)


def run_generator(cfg: StudyConfig, key: RunKey, is_main: bool = True) -> dict:
    """Train one generator (or reuse/resume it) with evaluations along the way; returns its result dict.

    The run is a :class:`GeneratorRunConfig` like ``snce generator train``'s, trained through the same
    objective and Trainer, plus the study's evaluation callback; its ``generator/`` works with ``snce sample``
    and ``snce eval``.
    """
    ctx = context(cfg, key.setting, key.K)
    run_dir = key.directory(Path(cfg.out_dir))
    steps = cfg.generator.train.steps
    train = replace(
        cfg.generator.train, out_dir=str(run_dir), seed=key.seed, device=cfg.device,
        ckpt_every=min(cfg.eval.every, steps),
    )  # fmt: skip
    loss_cfg = arm_loss(key.arm, ctx.info, key.seed, **study_loss(cfg))
    run_cfg = GeneratorRunConfig(
        shards=str(ctx.shard_dirs["train"]), tokenizer=str(ctx.tokenizer_dir), family=key.family,
        preset=cfg.generator.preset, model=dict(cfg.generator.model), loss=loss_cfg, sample=cfg.eval.sample,
        train=train,
    )  # fmt: skip
    spec = {
        **run_cfg.to_dict(),
        "eval": cfg.eval.to_dict(),
        "codebook_hash": ctx.tokenizer.codebook_hash(),
    }
    result_path = run_dir / "result.json"
    if is_main:
        check_spec(run_dir, spec, GeneratorRunConfig().to_dict())
    barrier()
    if result_path.is_file():
        return read_json(result_path)

    manifest = ctx.shards["train"].manifest
    train_shards = TokenShards(ctx.shard_dirs["train"], load_latents=loss_cfg.targets == "latents")
    codebook = ctx.tokenizer.quantizer.codebook.detach().float()
    token_loss = TokenLoss(
        loss_cfg, codebook, ctx.tokenizer.quantizer.metric, has_latents=manifest.has_latents
    )
    torch.manual_seed(key.seed)  # the same initial weights for every arm of a seed
    model = build_model(run_cfg, manifest)
    evals_path = run_dir / "evals.json"
    resume = latest_checkpoint(run_dir) is not None
    evals = read_json(evals_path) if resume and evals_path.is_file() else []
    callback = EvalCallback(ctx, run_dir, evals, key.seed)
    trainer = Trainer(
        model, GeneratorObjective(token_loss), train_shards, train, config={"study_run": spec},
        callbacks=[callback], resume=resume,
    )  # fmt: skip
    evals[:] = [e for e in evals if e["step"] <= trainer.step]
    if resume and callback.due(
        trainer.step, steps
    ):  # interrupted between a checkpoint and its evaluation
        callback.on_step(trainer, trainer.step)
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start  # this invocation's share when the run was resumed
    result = {
        "setting": key.setting, "K": key.K, "family": key.family, "arm": key.arm, "seed": key.seed,
        "loss": token_loss.describe(), "params": model.num_params(), "train_seconds": seconds,
        "evals": sorted(evals, key=lambda e: e["step"]),
    }  # fmt: skip
    if is_main:
        with trainer.eval_weights() as trained:
            trained.save_pretrained(run_dir / "generator", overwrite=True)
        run_info = {
            "tokenizer": str(ctx.tokenizer_dir.resolve()), "shards": str(ctx.shard_dirs["train"].resolve()),
            "sample": cfg.eval.sample.to_dict(), "loss": token_loss.describe(),
            "codebook_hash": manifest.codebook_hash, "num_params": model.num_params(),
        }  # fmt: skip
        write_json(run_dir / "generator" / RUN_FILE, run_info)
        write_json(result_path, result)
    barrier()
    return result


# ------------------------------------------------------------------------------------------ workers


ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _one_thread() -> None:
    torch.set_num_threads(1)


@contextmanager
def environment(values: dict[str, str]):
    """Set environment variables for the duration of a ``with`` block (child processes inherit them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_all(fn: Callable, tasks: Sequence, workers: int, desc: str, progress: bool) -> list:
    """``[fn(*task) for task in tasks]``, in ``workers`` processes (one thread each) when workers > 1.

    Results come back in task order; the bar advances as tasks finish. A failing task stops the study with
    its error once the tasks already running have finished (their results are on disk and are reused).
    """
    bar = tqdm(total=len(tasks), desc=desc, disable=not progress)
    if workers <= 1 or len(tasks) <= 1:
        results = []
        for task in tasks:
            results.append(fn(*task))
            bar.update()
        bar.close()
        return results
    results = [None] * len(tasks)
    context_ = get_context("spawn")  # fresh interpreters: no forked thread pools or torch state
    with (
        environment(ONE_THREAD),  # the workers' BLAS libraries (numpy's too) read it when they load
        ProcessPoolExecutor(workers, mp_context=context_, initializer=_one_thread) as pool,
    ):
        futures = {pool.submit(fn, *task): i for i, task in enumerate(tasks)}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            bar.close()
    return results


# ------------------------------------------------------------------------------------------ the study


def run_study(cfg: StudyConfig, *, progress: bool = True) -> dict | None:
    """Run (or resume) the whole study and write its report; returns the results dict (None on ranks > 0)."""
    from snce.study.report import write_report

    dist = init_distributed(cfg.device)
    is_main = dist.is_main
    workers = 1 if dist.distributed else cfg.workers
    out = Path(cfg.out_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg.to_dict())
    start = time.perf_counter()

    floors = {}
    if is_main:  # trains the feature network (cached) before any worker needs it
        ev = evaluators(cfg, progress=progress)
        floors_path = out / "floors.json"
        if not floors_path.is_file():
            write_json(floors_path, data_floors(cfg))
        floors = {**read_json(floors_path), "features": ev.info}
    barrier()

    tok_tasks = {(s.name, K): (cfg, s, K, is_main) for s in cfg.settings for K in s.codebook_sizes}
    tokenizers = run_all(
        prepare_tokenizer, list(tok_tasks.values()), workers, "tokenizers", progress and is_main
    )
    run_tasks = [(cfg, key, is_main) for key in plan_runs(cfg)]
    runs = run_all(run_generator, run_tasks, workers, "generator runs", progress and is_main)
    if not is_main:
        return None
    test_images = class_sweep(build_dataset(cfg.data, split="test"), cfg.eval.grid_samples)
    results = {
        "config": cfg.to_dict(),
        "floors": floors,
        "tokenizers": tokenizers,
        "runs": runs,
        "study_seconds": time.perf_counter() - start,
    }
    write_report(results, out, test_images)
    return results
