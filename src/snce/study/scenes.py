"""CE vs SNCE on the built-in scenes: text-to-image and image editing, with metrics that check the condition.

    snce study --config configs/study/scenes_t2i.yaml     # task: t2i
    snce study --config configs/study/scenes_edit.yaml    # task: edit

One tokenizer (trained on scene renders), one set of token shards with the built-in text encoder's
embeddings (captions, or editing instructions with the source image's tokens), then one generator per
(arm, seed): every arm sees the same seeds (initial weights, data order, sampling noise), so each difference
to CE is paired. The arms are the class-conditional study's (:mod:`snce.study.config`): ``ce``, ``ls``,
``ls_matched``, ``snce`` (the suggested tau of the tokenizer's codebook), ``snce_shuffled`` (the geometry
control: the same targets on random codes) and ``snce_tau{s}x``. Each generator is scored on the test split,
whose scenes include shape-colour pairs no training scene has:

- t2i: ``accuracy`` (the fraction of the captions' attributes an attribute classifier finds in the samples),
  also on the held-out pairs alone, ``exact`` and ``fid`` (in the classifier's feature space, against the
  test renders);
- edit: ``edit_success`` (the named attribute of the named object changed as asked), ``preservation`` (the
  other attributes kept), the pixel change outside the edited object and ``fid`` against the true targets.

Baselines beside them: real renders and another item's caption (chance) or the true target and the source
returned unchanged (no edit), and the tokenizer's reconstructions of the test images (what a generator that
predicts every token right would score).

Writes ``results.json``, ``report.md`` and ``plots/`` (scores per arm and sample sheets) in ``out_dir``;
finished runs are reused, so an interrupted study resumes (a run made with other settings is refused).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from snce.config import Config, ConfigError, atomic_write_text
from snce.study.config import check_arm
from snce.study.stats import paired_difference, t_interval, verdict


@dataclass
class SceneStudyConfig(Config):
    """A scenes study (see the module docstring). ``tokenizer`` / ``generator``: the ``model`` and ``train``
    sections of a tokenizer run and of a generator run (plus ``family`` and ``preset``)."""

    task: Literal["t2i", "edit"] = "t2i"
    out_dir: str = "runs/study-scenes"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: ["ce", "ls", "snce", "snce_shuffled"])
    device: str = "cpu"
    size: int = 32
    train_samples: int = 8192
    test_samples: int = 500
    text_encoder: dict = field(default_factory=lambda: {"kind": "builtin"})
    tokenizer_from: str = ""  # a scenes tokenizer directory to reuse instead of training one
    tokenizer: dict = field(default_factory=dict)
    generator: dict = field(default_factory=dict)
    label_smoothing: float = 0.1  # the ls arm's epsilon
    sample: dict = field(default_factory=dict)

    def check(self) -> None:
        if "ce" not in self.arms or len(set(self.arms)) != len(self.arms):
            raise ConfigError("arms", f"expected distinct arms including 'ce', got {self.arms}")
        for arm in self.arms:
            check_arm(arm)
            if arm == "snce_latents":
                raise ConfigError(
                    "arms", "snce_latents needs latents, which scenes shards do not store"
                )
        if not 0 < self.label_smoothing < 1:
            raise ConfigError("label_smoothing", f"must lie in (0, 1), got {self.label_smoothing}")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ConfigError("seeds", f"expected distinct seeds, got {self.seeds}")


def run_scene_study(cfg: SceneStudyConfig) -> dict:
    from snce.data import TokenShards
    from snce.data.scenes import SceneCaptions, SceneEdits
    from snce.study.run import check_spec, read_json, snce_targets, write_json
    from snce.text import build_text_encoder
    from snce.tokenizer import Tokenizer, TokenizerRunConfig, tokenize_dataset, train_tokenizer

    out = Path(cfg.out_dir)
    check_spec(out, shared_settings(cfg), shared_settings(SceneStudyConfig()))
    data = {"name": "scenes", "size": cfg.size, "num_samples": cfg.train_samples}
    tok_dir = Path(cfg.tokenizer_from).parent if cfg.tokenizer_from else out / "tokenizer"
    if not (tok_dir / "tokenizer" / "model.safetensors").is_file():
        if cfg.tokenizer_from:
            raise FileNotFoundError(f"tokenizer_from: {cfg.tokenizer_from} holds no tokenizer")
        tok_cfg = TokenizerRunConfig.from_dict({
            "data": data, **cfg.tokenizer,
            "train": {**cfg.tokenizer.get("train", {}), "out_dir": str(tok_dir), "device": cfg.device},
        })  # fmt: skip
        tok_cfg.check()
        train_tokenizer(tok_cfg, resume=(tok_dir / "checkpoints").is_dir())
    tokenizer = Tokenizer.from_pretrained(tok_dir / "tokenizer")
    encoder = build_text_encoder(cfg.text_encoder)
    dataset = SceneCaptions if cfg.task == "t2i" else SceneEdits
    shards = out / "tokens"
    if not (shards / "manifest.json").is_file():
        tokenize_dataset(
            tokenizer, dataset(cfg.size, cfg.train_samples, split="train"), shards,
            text_encoder=encoder, device=cfg.device, progress=False,
        )  # fmt: skip
    test = dataset(cfg.size, cfg.test_samples, split="test")
    targets_file = out / "targets.json"  # computed once: a resume never recomputes the arms' losses
    if not targets_file.is_file():
        codebook, metric = tokenizer.quantizer.codebook.detach().float(), tokenizer.quantizer.metric
        codes = TokenShards(shards).indices.reshape(-1).long()
        write_json(targets_file, {**snce_targets(codebook, metric, codes), "metric": metric})
    targets = read_json(targets_file)
    results = {
        "config": cfg.to_dict(), "targets": targets, "runs": {},
        "baselines": baselines(cfg, test, tokenizer, targets),
    }  # fmt: skip
    for arm in cfg.arms:
        for seed in cfg.seeds:
            results["runs"][f"{arm}/{seed}"] = train_and_score(
                cfg, arm, seed, shards, tok_dir, test, targets
            )
    results["analysis"] = analyse(cfg, results["runs"])
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(cfg, results, out)
    return results


def shared_settings(cfg: SceneStudyConfig) -> dict:
    """What the tokenizer, the shards and the test items are made from (every run depends on it)."""
    keys = (
        "task",
        "size",
        "train_samples",
        "test_samples",
        "text_encoder",
        "tokenizer_from",
        "tokenizer",
    )
    return {k: getattr(cfg, k) for k in keys}


def train_and_score(
    cfg, arm: str, seed: int, shards: Path, tok_dir: Path, test, targets: dict
) -> dict:
    """Train (or resume, or reuse) the generator of (arm, seed) and score it on ``test`` (cached in
    ``score.json``); a run directory made with other settings is refused (``spec.json``)."""
    from snce.study.run import arm_loss, check_spec
    from snce.train.generator import GeneratorRunConfig, train_generator

    run_dir = Path(cfg.out_dir) / "runs" / f"{arm}-seed{seed}"
    gen = cfg.generator
    loss = arm_loss(arm, targets, seed, label_smoothing=cfg.label_smoothing)
    run_cfg = GeneratorRunConfig.from_dict({
        "shards": str(shards), "tokenizer": str(tok_dir / "tokenizer"),
        "family": gen.get("family", "autoregressive"), "preset": gen.get("preset", "tiny"),
        "model": gen.get("model", {}), "loss": loss.to_dict(), "sample": cfg.sample,
        "train": {**gen.get("train", {}), "out_dir": str(run_dir), "seed": seed, "device": cfg.device},
    })  # fmt: skip
    run_cfg.check()
    check_spec(run_dir, run_cfg.to_dict(), GeneratorRunConfig().to_dict())
    score_path = run_dir / "score.json"
    if score_path.is_file():
        return json.loads(score_path.read_text())
    train_generator(run_cfg, resume=(run_dir / "checkpoints").is_dir())
    score = score_generator(cfg, run_dir, test, seed)
    atomic_write_text(score_path, json.dumps(score, indent=2) + "\n")
    return score


@torch.no_grad()
def score_generator(cfg, run_dir: Path, test, seed: int) -> dict:
    """Sample one image per test item (its caption, or its instruction and source) and score them."""
    from snce.train.generator import SampleConfig, load_for_sampling, sample_images, text_condition

    model, tokenizer, run = load_for_sampling(str(run_dir), device=cfg.device)
    items = [test[i] for i in range(len(test))]
    settings = SampleConfig.from_dict(run.get("sample", {}))
    gen = torch.Generator(device=cfg.device).manual_seed(10_000 + seed)
    if cfg.task == "t2i":
        condition = text_condition(run, [caption for _, caption, _ in items])
    else:
        sources = torch.stack([item["source"] for item in items])
        source_tokens = tokenizer.encode(sources.to(cfg.device)).indices
        condition = text_condition(
            run, [item["instruction"] for item in items], source=source_tokens
        )
    _, images = sample_images(model, tokenizer, condition, settings, generator=gen)
    torch.save(images[:16].cpu(), run_dir / "test_samples.pt")
    return score_images(cfg.task, test, items, images.cpu())


def score_images(task: str, test, items: list, images: torch.Tensor) -> dict:
    """The scores of ``images`` (one per test item, in order) as answers to the test items' conditions."""
    from snce.metrics.scenes import attribute_scores, edit_scores, scene_fid

    if task == "t2i":
        captions = [caption for _, caption, _ in items]
        scores = attribute_scores(images, captions)
        held = [i for i in range(len(items)) if test.held_out(i)]
        scores["held_out_accuracy"] = attribute_scores(images[held], [captions[i] for i in held])[
            "accuracy"
        ]
        reference = torch.stack([image for image, _, _ in items])
    else:
        scores = edit_scores(
            torch.stack([item["source_attributes"] for item in items]),
            torch.stack([item["target_attributes"] for item in items]),
            images, source_images=torch.stack([item["source"] for item in items]),
        )  # fmt: skip
        reference = torch.stack([item["target"] for item in items])
    scores["fid"] = scene_fid(images, reference)
    return {k: v for k, v in scores.items() if not isinstance(v, torch.Tensor)}


@torch.no_grad()
def baselines(cfg: SceneStudyConfig, test, tokenizer, targets: dict) -> dict:
    """What the scores give without a generator: for t2i the real renders with their own captions and with
    another item's (chance), for edits the true target and the source returned (no edit); for both, the
    tokenizer's reconstructions of the right answer (what a generator that learned CE's target exactly would
    give) and, per other arm, those tokens redrawn one by one from the arm's training target and decoded
    (its target floor: what sampling at temperature 1 from a generator that learned that target exactly
    would give)."""
    from snce.study.run import target_draws

    items = [test[i] for i in range(len(test))]
    if cfg.task == "t2i":
        real = torch.stack([image for image, _, _ in items])
        shuffled = [
            (image, caption, a)
            for (image, _, a), (_, caption, _) in zip(items, items[1:] + items[:1], strict=True)
        ]
        answers = {
            "real renders": (items, real),
            "real renders, another item's caption (chance)": (shuffled, real),
        }
    else:
        real = torch.stack([item["target"] for item in items])
        sources = torch.stack([item["source"] for item in items])
        answers = {"true target": (items, real), "no edit (source returned)": (items, sources)}

    def decode(tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokenizer.decode(t).clamp(-1, 1).cpu() for t in tokens.split(256)])

    indices = torch.cat([tokenizer.encode(x).indices for x in real.split(256)])  # (N, h, w)
    answers["tokenizer reconstructions of the real answer (CE's target)"] = (items, decode(indices))
    codebook, metric = tokenizer.quantizer.codebook.detach().float(), tokenizer.quantizer.metric
    draws = target_draws(
        cfg.arms, targets, cfg.seeds[0], codebook, metric, indices.reshape(-1),
        generator=torch.Generator().manual_seed(cfg.seeds[0]), label_smoothing=cfg.label_smoothing,
    )  # fmt: skip
    for arm, drawn in draws.items():
        answers[f"{arm}'s target floor"] = (items, decode(drawn.view_as(indices)))
    return {
        name: score_images(cfg.task, test, its, images) for name, (its, images) in answers.items()
    }


def headline(task: str) -> str:
    return "accuracy" if task == "t2i" else "edit_success"


SCORES = {  # the scores analysed per task; LOWER_IS_BETTER: the ones where smaller is better
    "t2i": ["accuracy", "held_out_accuracy", "exact", "fid"],
    "edit": ["edit_success", "preservation", "pixel_change_outside", "fid"],
}
LOWER_IS_BETTER = ("pixel_change_outside", "fid")
# (arm, reference) pairs compared besides every arm vs CE: the geometry control and the softness control
CONTROLS = (("snce", "snce_shuffled"), ("snce", "ls"), ("snce", "ls_matched"))


def comparisons(arms: list[str]) -> list[tuple[str, str]]:
    """Every arm vs CE, then SNCE vs its controls, of the pairs whose arms both ran."""
    pairs = [(arm, "ce") for arm in arms if arm != "ce"]
    return pairs + [(a, b) for a, b in CONTROLS if a in arms and b in arms]


def analyse(cfg: SceneStudyConfig, runs: dict) -> dict:
    """``arms``: per arm and score the mean [95% t-interval over seeds] and the values; ``comparisons``: the
    paired difference (arm - reference, by seed) of each score for the pairs of :func:`comparisons`."""
    values = {
        arm: {key: [runs[f"{arm}/{s}"][key] for s in cfg.seeds] for key in SCORES[cfg.task]}
        for arm in cfg.arms
    }
    arms = {}
    for arm, per_key in values.items():
        arms[arm] = {}
        for key, v in per_key.items():
            mean = t_interval(v)
            arms[arm][key] = {"mean": mean.mean, "lo": mean.lo, "hi": mean.hi, "values": v}
    pairs = []
    for arm, ref in comparisons(cfg.arms):
        for key in SCORES[cfg.task]:
            diff = paired_difference(values[arm][key], values[ref][key])
            pairs.append({
                "arm": arm, "reference": ref, "score": key, "mean": diff.mean, "lo": diff.lo, "hi": diff.hi,
                "verdict": verdict(diff, lower_is_better=key in LOWER_IS_BETTER),
            })  # fmt: skip
    return {"arms": arms, "comparisons": pairs}


def write_report(cfg: SceneStudyConfig, results: dict, out: Path) -> None:
    """``report.md`` (baselines, scores per arm, paired differences), ``plots/scores.png`` and
    ``plots/samples.png`` (the first test items answered by every arm, seed ``seeds[0]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from snce.data.scenes import SceneCaptions, SceneEdits, labelled_sheet

    analysis, keys = results["analysis"], SCORES[cfg.task]
    title = "text-to-image" if cfg.task == "t2i" else "image editing"
    gen_train = cfg.generator.get("train", {})
    head = "| | " + " | ".join(k.replace("_", " ") for k in keys) + " |"
    rule = "|---|" + "---|" * len(keys)
    lines = [
        f"# CE vs SNCE on the built-in scenes: {title}", "",
        f"{len(cfg.seeds)} paired seeds ({', '.join(map(str, cfg.seeds))}); {cfg.test_samples} test items, held-out "
        f"shape-colour pairs included; {gen_train.get('steps', '?')} generator steps per run; SNCE tau "
        f"{results['targets']['tau']:.4g} (suggested, {results['targets']['metric']}); ls epsilon "
        f"{cfg.label_smoothing}. FID: in the attribute classifier's feature space, against the test split's "
        f"{'renders' if cfg.task == 't2i' else 'true targets'}.", "",
        "## Baselines (no generator)", "", head, rule,
    ]  # fmt: skip
    for name, scores in results["baselines"].items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[k]:.3f}" for k in keys) + " |")
    lines += [
        "",
        "## Generators: mean [95% t-interval over seeds]",
        "",
        head.replace("| |", "| arm |"),
        rule,
    ]
    for arm, per_key in analysis["arms"].items():
        cells = [f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]" for v in per_key.values()]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "## Paired differences (arm - reference, same seeds): mean [95% t-interval]", "",
              "| arm vs reference | " + " | ".join(k.replace("_", " ") for k in keys) + " |", rule]  # fmt: skip
    for arm, ref in comparisons(cfg.arms):
        cells = [
            f"{c['mean']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}] {c['verdict']}"
            for c in analysis["comparisons"]
            if (c["arm"], c["reference"]) == (arm, ref)
        ]
        lines.append(f"| {arm} vs {ref} | " + " | ".join(cells) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    shown = [headline(cfg.task), "fid"]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.2))
    for ax, key in zip(axes, shown, strict=True):
        for x, arm in enumerate(cfg.arms):
            v = analysis["arms"][arm][key]
            ax.bar(x, v["mean"], yerr=[[v["mean"] - v["lo"]], [v["hi"] - v["mean"]]], capsize=4)
            ax.scatter([x] * len(v["values"]), v["values"], color="k", s=8, zorder=3)
        ax.set_xticks(range(len(cfg.arms)), cfg.arms, rotation=20)
        ax.set_ylabel(
            key.replace("_", " ") + (" (lower is better)" if key in LOWER_IS_BETTER else "")
        )
    fig.suptitle(f"{title} on held-out scenes: {len(cfg.seeds)} seeds per arm, 95% t-intervals")
    fig.tight_layout()
    fig.savefig(plots / "scores.png", dpi=120)
    plt.close(fig)

    n = min(8, cfg.test_samples)
    test = (SceneCaptions if cfg.task == "t2i" else SceneEdits)(cfg.size, n, split="test")
    samples = {
        arm: torch.load(out / "runs" / f"{arm}-seed{cfg.seeds[0]}" / "test_samples.pt")
        for arm in cfg.arms
    }
    if cfg.task == "t2i":
        rows = [[test[i][0]] + [samples[arm][i] for arm in cfg.arms] for i in range(n)]
        labels, headers = [test[i][1] for i in range(n)], ["real"]
    else:
        rows = [
            [test[i]["source"], test[i]["target"]] + [samples[a][i] for a in cfg.arms]
            for i in range(n)
        ]
        labels, headers = [test[i]["instruction"] for i in range(n)], ["source", "target"]
    labelled_sheet(rows, labels, headers=headers + list(cfg.arms)).save(plots / "samples.png")
