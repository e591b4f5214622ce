"""Run a CE-vs-SNCE study: tokenizers at several codebook sizes, then CE and SNCE generators, evaluated over steps.

Directory layout under ``cfg.out_dir``::

    config.json                       the study configuration of the latest invocation
    cache/                            the domain classifier (feature network), keyed by dataset and seed
    tokenizers/k{K}/                  tokenizer run (tokenizer/, checkpoints/, metrics.json)
    tokens/k{K}/{train,test}/         token shards
    runs/k{K}/{family}/{loss}/        generator run: checkpoints/, evals.json (grows), samples.png,
                                      result.json (written once the run is finished)
    results.json, report.md, plots/   the study's numbers, its report and figures

Everything resumes: a finished tokenizer, shard set or generator run (``result.json``) is reused as long as
its settings are unchanged (otherwise the study stops and says which directory differs); an unfinished run
continues from its newest checkpoint with the evaluations it already made. Every file is written atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from snce.config import atomic_write_text
from snce.data import TokenShards, build_dataset
from snce.functional import suggest_tau
from snce.generators.objectives import GeneratorObjective, LossConfig, TokenLoss
from snce.metrics import ImageEvaluator, code_statistics, feature_network, validation_nll
from snce.study.config import StudyConfig
from snce.tokenizer import (
    Tokenizer,
    TokenizerRunConfig,
    evaluate_tokenizer,
    tokenize_dataset,
    train_tokenizer,
)
from snce.train import Callback, Trainer, latest_checkpoint, save_image_grid
from snce.train.distributed import barrier, init_distributed
from snce.train.generator import RUN_FILE, GeneratorRunConfig, build_model, sample_images


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def read_json(path: Path):
    return json.loads(path.read_text())


class SettingsChanged(ValueError):
    """A directory holds results made with other settings; the study never overwrites them silently."""


def check_spec(directory: Path, spec: dict) -> None:
    """Record ``spec`` in ``directory/spec.json``, or check it equals the one recorded there."""
    path = directory / "spec.json"
    if path.is_file():
        old = read_json(path)
        if old != spec:
            changed = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
            raise SettingsChanged(
                f"{directory} holds results made with other settings (differences in: {', '.join(changed)}); "
                "choose another out_dir (--set out_dir=...) or delete that directory to redo it"
            )
    else:
        write_json(path, spec)


def _stack(dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An image dataset in memory (``limit`` evenly spaced items, or all): (images (N, C, H, W), labels (N,))."""
    n = len(dataset)
    index = (
        range(n)
        if limit is None or limit >= n
        else torch.linspace(0, n - 1, limit).round().long().tolist()
    )
    images, labels = zip(*(dataset[i] for i in index), strict=True)
    return torch.stack(images), torch.as_tensor(labels)


# ------------------------------------------------------------------------------------------ tokenizers


def prepare_tokenizer(cfg: StudyConfig, K: int, out: Path, is_main: bool) -> tuple[Tokenizer, dict]:
    """Train (or reuse, or resume) the tokenizer of codebook size K; returns it with its test-split metrics."""
    run_dir = out / "tokenizers" / f"k{K}"
    t = cfg.tokenizer
    model = replace(t.model, quantizer={**t.model.quantizer, "codebook_size": K})
    train = replace(t.train, out_dir=str(run_dir), seed=cfg.seed, device=cfg.device)
    run_cfg = TokenizerRunConfig(data=cfg.data, model=model, loss=t.loss, train=train)
    if is_main:
        check_spec(run_dir, run_cfg.to_dict())
    barrier()
    metrics_path = run_dir / "metrics.json"
    if not (run_dir / "tokenizer" / "config.json").is_file() or not metrics_path.is_file():
        start = time.perf_counter()
        train_tokenizer(run_cfg, resume=latest_checkpoint(run_dir) is not None)
        seconds = time.perf_counter() - start
        if is_main:
            tok = Tokenizer.from_pretrained(run_dir / "tokenizer")
            test = build_dataset(cfg.data, split="test")
            metrics = evaluate_tokenizer(tok, test, device=cfg.device, progress=False)
            write_json(metrics_path, {**metrics, "train_seconds": seconds})
        barrier()
    tok = Tokenizer.from_pretrained(run_dir / "tokenizer")
    return tok, read_json(metrics_path)


def prepare_tokens(
    cfg: StudyConfig, tok: Tokenizer, K: int, out: Path, is_main: bool
) -> dict[str, Path]:
    """Token shards of the train and test splits (made once, reused while the tokenizer is the same)."""
    dirs = {}
    latents = cfg.loss.targets == "latents"
    for split in ("train", "test"):
        directory = out / "tokens" / f"k{K}" / split
        if is_main:
            reuse = (directory / "manifest.json").is_file()
            if reuse:
                existing = TokenShards(directory, load_latents=False).manifest
                reuse = (
                    existing.codebook_hash == tok.codebook_hash()
                    and existing.has_latents == latents
                )
            if not reuse:
                tokenize_dataset(
                    tok, build_dataset(cfg.data, split=split), directory, data_config=cfg.data,
                    latents=latents, device=cfg.device, overwrite=True, progress=False,
                )  # fmt: skip
        barrier()
        dirs[split] = directory
    return dirs


# ------------------------------------------------------------------------------------------ generators


@dataclass
class Context:
    """What every generator run of one codebook size shares."""

    cfg: StudyConfig
    K: int
    tokenizer_dir: Path
    tokenizer: Tokenizer
    shard_dirs: dict[str, Path]
    shards: dict[str, TokenShards]
    evaluator: ImageEvaluator | None  # None on ranks other than 0
    tau: float  # suggested tau of this tokenizer's codebook (soft NLL is always measured at it)
    device: torch.device

    @property
    def num_classes(self) -> int:
        return self.shards["train"].manifest.num_classes

    def eval_classes(self, n: int) -> torch.Tensor | None:
        return torch.arange(n) % self.num_classes if self.num_classes else None


@torch.no_grad()
def generate_images(
    ctx: Context, model, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """n samples with the study's fixed sampling seed -> (tokens (n, h, w), images (n, C, H, W), classes)."""
    classes = ctx.eval_classes(n)
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.cfg.seed + 1)
    tokens, images = sample_images(
        model,
        ctx.tokenizer,
        classes,
        ctx.cfg.eval.sample,
        num_samples=n,
        batch_size=256,
        generator=gen,
    )
    return tokens, images, classes


def evaluate(ctx: Context, model, step: int) -> tuple[dict, torch.Tensor]:
    """All metrics of one checkpoint; returns (metrics, the first ``grid_samples`` images)."""
    e = ctx.cfg.eval
    start = time.perf_counter()
    tokens, images, classes = generate_images(ctx, model, e.num_samples)
    metrics = {"step": step, **ctx.evaluator(images, classes)}
    metrics.update({f"code_{k}": v for k, v in code_statistics(tokens, ctx.K).items()})
    test = ctx.shards["test"]
    n = min(e.nll_samples, len(test))
    labels = test.labels[:n] if ctx.num_classes else None
    metrics.update(
        validation_nll(
            model, test.indices[:n].long(), labels, codebook=ctx.tokenizer.quantizer.codebook.detach(),
            metric=ctx.tokenizer.quantizer.metric, tau=ctx.tau, seed=ctx.cfg.seed,
        )
    )  # fmt: skip
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics, images[: e.grid_samples]


class EvalCallback(Callback):
    """Evaluate every ``every`` steps and at the last step (rank 0); keep ``evals.json`` up to date."""

    def __init__(self, ctx: Context, run_dir: Path, evals: list[dict]):
        self.ctx, self.run_dir, self.evals = ctx, run_dir, evals

    def due(self, step: int, last: int) -> bool:
        return step == last or step % self.ctx.cfg.eval.every == 0

    def on_step(self, trainer: Trainer, step: int) -> None:
        if not (self.due(step, trainer.cfg.steps) and trainer.dist.is_main):
            return
        if any(e["step"] == step for e in self.evals):
            return
        with trainer.eval_weights() as model:
            metrics, grid = evaluate(self.ctx, model, step)
        self.evals.append(metrics)
        write_json(self.run_dir / "evals.json", self.evals)
        save_image_grid(grid, self.run_dir / "samples.png", nrow=10, scale=2)


def loss_configs(cfg: StudyConfig) -> list[tuple[str, LossConfig]]:
    """(run name, loss) pairs: CE, then SNCE at each tau scale."""
    runs = [("ce", LossConfig(kind="ce"))]
    for s in cfg.loss.tau_scales:
        loss = LossConfig(
            kind="snce", tau_scale=float(s), topk=cfg.loss.topk, targets=cfg.loss.targets
        )
        runs.append((f"snce_tau{s:g}x", loss))
    return runs


def run_generator(
    ctx: Context, family: str, name: str, loss_cfg: LossConfig, out: Path, is_main: bool
) -> dict:
    """Train one generator (or reuse/resume it) with evaluations along the way; returns its result dict.

    The run is a :class:`GeneratorRunConfig` like ``snce generator train``'s, trained through the same
    objective and Trainer, plus the study's evaluation callback; ``runs/.../generator/`` works with
    ``snce sample`` and ``snce eval``.
    """
    cfg, K = ctx.cfg, ctx.K
    run_dir = out / "runs" / f"k{K}" / family / name
    train = replace(
        cfg.generator.train,
        out_dir=str(run_dir), seed=cfg.seed, device=cfg.device,
        ckpt_every=min(cfg.eval.every, cfg.generator.train.steps),
    )  # fmt: skip
    run_cfg = GeneratorRunConfig(
        shards=str(ctx.shard_dirs["train"]), tokenizer=str(ctx.tokenizer_dir), family=family,
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
        check_spec(run_dir, spec)
    barrier()
    if result_path.is_file():
        return read_json(result_path)

    manifest = ctx.shards["train"].manifest
    codebook = ctx.tokenizer.quantizer.codebook.detach().float()
    token_loss = TokenLoss(
        loss_cfg, codebook, ctx.tokenizer.quantizer.metric, has_latents=manifest.has_latents
    )
    torch.manual_seed(cfg.seed)  # identical initial weights for every loss of a family
    model = build_model(run_cfg, manifest)
    evals_path = run_dir / "evals.json"
    resume = latest_checkpoint(run_dir) is not None
    evals = read_json(evals_path) if resume and evals_path.is_file() else []
    callback = EvalCallback(ctx, run_dir, evals)
    trainer = Trainer(
        model, GeneratorObjective(token_loss), ctx.shards["train"], train, config={"study_run": spec},
        callbacks=[callback], resume=resume,
    )  # fmt: skip
    evals[:] = [e for e in evals if e["step"] <= trainer.step]
    if resume and callback.due(trainer.step, train.steps):
        callback.on_step(
            trainer, trainer.step
        )  # interrupted between a checkpoint and its evaluation
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start  # this invocation's share when the run was resumed
    result = {
        "K": K, "family": family, "loss": name, "kind": loss_cfg.kind,
        "tau": token_loss.tau, "tau_scale": loss_cfg.tau_scale if loss_cfg.kind == "snce" else None,
        "params": model.num_params(), "train_seconds": seconds,
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


# ------------------------------------------------------------------------------------------ the study


def run_study(cfg: StudyConfig, *, progress: bool = True) -> dict | None:
    """Run (or resume) the whole study and write its report; returns the results dict (None on ranks > 0)."""
    from snce.study.report import write_report

    dist = init_distributed(cfg.device)
    is_main = dist.is_main
    out = Path(cfg.out_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg.to_dict())
    start = time.perf_counter()

    real, labels = _stack(build_dataset(cfg.data, split="train"), cfg.eval.num_real)
    evaluator, features = None, {}
    if is_main:
        dataset_key = f"{cfg.data.kind}{cfg.data.size}px"
        net, features = feature_network(
            real, labels, dataset=dataset_key, cache_dir=out / "cache", inception_weights=cfg.eval.inception_weights,
            seed=cfg.seed, progress=progress, steps=cfg.eval.domain_steps, width=cfg.eval.domain_width,
        )  # fmt: skip
        evaluator = ImageEvaluator(
            net.to(dist.device), real, class_logits=features["class_logits"], seed=cfg.seed
        )

    runs, tokenizers = [], {}
    plan = [
        (K, f, n, l)
        for K in cfg.codebook_sizes
        for f in cfg.generator.families
        for n, l in loss_configs(cfg)
    ]
    bar = tqdm(total=len(plan), desc="study runs", disable=not (progress and is_main))
    for K in cfg.codebook_sizes:
        bar.set_postfix_str(f"K={K} tokenizer")
        tok, tok_metrics = prepare_tokenizer(cfg, K, out, is_main)
        shard_dirs = prepare_tokens(cfg, tok, K, out, is_main)
        shards = {split: TokenShards(d) for split, d in shard_dirs.items()}
        tau = float(suggest_tau(tok.quantizer.codebook.detach().float(), tok.quantizer.metric))
        tokenizers[K] = {**tok_metrics, "suggested_tau": tau, "metric": tok.quantizer.metric}
        tok_dir = out / "tokenizers" / f"k{K}" / "tokenizer"
        ctx = Context(
            cfg, K, tok_dir, tok.to(dist.device), shard_dirs, shards, evaluator, tau, dist.device
        )
        for family in cfg.generator.families:
            for name, loss_cfg in loss_configs(cfg):
                bar.set_postfix_str(f"K={K} {family} {name}")
                runs.append(run_generator(ctx, family, name, loss_cfg, out, is_main))
                bar.update()
    bar.close()
    if not is_main:
        return None
    results = {
        "config": cfg.to_dict(),
        "features": features,
        "real_images": int(real.shape[0]),
        "tokenizers": {str(k): v for k, v in tokenizers.items()},
        "runs": runs,
        "study_seconds": time.perf_counter() - start,
    }
    write_report(results, out, real[: cfg.eval.grid_samples])
    return results
