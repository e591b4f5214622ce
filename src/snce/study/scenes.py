"""CE vs SNCE on the built-in scenes: text-to-image and image editing, with metrics that check the condition.

    snce study --config configs/study/scenes_t2i.yaml     # task: t2i
    snce study --config configs/study/scenes_edit.yaml    # task: edit

One tokenizer (trained on scene renders), one set of token shards with the built-in text encoder's
embeddings (captions, or editing instructions with the source image's tokens), then one generator per
(arm, seed): every arm sees the same seeds, so each difference to CE is paired. Each generator is scored
on the test split, whose scenes include shape-colour pairs no training scene has:

- t2i: ``attribute accuracy`` (the fraction of the captions' attributes an attribute classifier finds in
  the samples; chance about 0.09), also on the held-out pairs alone;
- edit: ``edit success`` (the named attribute of the named object changed as asked), ``preservation`` (the
  other attributes kept) and the pixel change outside the edited object, next to the no-edit baseline
  (the source returned unchanged) and the true target.

Writes ``results.json``, ``report.md`` and ``plots/`` (scores per arm and sample sheets) in ``out_dir``;
finished runs are reused, so an interrupted study resumes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from snce.config import Config, ConfigError
from snce.study.stats import paired_difference, t_interval, verdict

ARMS = ("ce", "ls", "snce")


@dataclass
class SceneStudyConfig(Config):
    """A scenes study (see the module docstring). ``tokenizer`` / ``generator``: the ``model`` and ``train``
    sections of a tokenizer run and of a generator run (plus ``family`` and ``preset``)."""

    task: Literal["t2i", "edit"] = "t2i"
    out_dir: str = "runs/study-scenes"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: ["ce", "snce"])
    device: str = "cpu"
    size: int = 32
    train_samples: int = 8192
    test_samples: int = 500
    text_encoder: dict = field(default_factory=lambda: {"kind": "builtin"})
    tokenizer_from: str = ""  # an existing scenes tokenizer directory to reuse instead of training one
    tokenizer: dict = field(default_factory=dict)
    generator: dict = field(default_factory=dict)
    loss: dict = field(
        default_factory=dict
    )  # shared loss options (tau, tau_scale, label_smoothing)
    sample: dict = field(default_factory=dict)

    def check(self) -> None:
        bad = [a for a in self.arms if a not in ARMS]
        if bad or "ce" not in self.arms:
            raise ConfigError("arms", f"expected 'ce' and any of {ARMS}, got {self.arms}")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ConfigError("seeds", f"expected distinct seeds, got {self.seeds}")


def run_scene_study(cfg: SceneStudyConfig) -> dict:
    from snce.data.scenes import SceneCaptions, SceneEdits
    from snce.text import build_text_encoder
    from snce.tokenizer import Tokenizer, TokenizerRunConfig, tokenize_dataset, train_tokenizer

    out = Path(cfg.out_dir)
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
    results = {"config": cfg.to_dict(), "runs": {}, "baselines": baselines(cfg.task, test)}
    for arm in cfg.arms:
        for seed in cfg.seeds:
            results["runs"][f"{arm}/{seed}"] = train_and_score(
                cfg, arm, seed, shards, tok_dir, test
            )
    results["analysis"] = analyse(cfg, results["runs"])
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(cfg, results, out)
    return results


def train_and_score(cfg, arm: str, seed: int, shards: Path, tok_dir: Path, test) -> dict:
    """Train (or reuse) the generator of (arm, seed) and score it on ``test`` (cached in ``score.json``)."""
    from snce.train.generator import GeneratorRunConfig, train_generator

    run_dir = Path(cfg.out_dir) / "runs" / f"{arm}-seed{seed}"
    score_path = run_dir / "score.json"
    if score_path.is_file():
        return json.loads(score_path.read_text())
    kind = {"ce": "ce", "ls": "label_smoothing", "snce": "snce"}[arm]
    gen = cfg.generator
    run_cfg = GeneratorRunConfig.from_dict({
        "shards": str(shards), "tokenizer": str(tok_dir / "tokenizer"),
        "family": gen.get("family", "autoregressive"), "preset": gen.get("preset", "tiny"),
        "model": gen.get("model", {}), "loss": {**cfg.loss, "kind": kind}, "sample": cfg.sample,
        "train": {**gen.get("train", {}), "out_dir": str(run_dir), "seed": seed, "device": cfg.device},
    })  # fmt: skip
    run_cfg.check()
    train_generator(run_cfg, resume=(run_dir / "checkpoints").is_dir())
    score = score_generator(cfg, run_dir, test, seed)
    score_path.write_text(json.dumps(score, indent=2) + "\n")
    return score


@torch.no_grad()
def score_generator(cfg, run_dir: Path, test, seed: int) -> dict:
    """Sample one image per test item (its caption, or its instruction and source) and score them."""
    from snce.metrics.scenes import attribute_scores, edit_scores
    from snce.train.generator import SampleConfig, load_for_sampling, sample_images, text_condition

    model, tokenizer, run = load_for_sampling(str(run_dir), device=cfg.device)
    items = [test[i] for i in range(len(test))]
    settings = SampleConfig.from_dict(run.get("sample", {}))
    gen = torch.Generator(device=cfg.device).manual_seed(10_000 + seed)
    if cfg.task == "t2i":
        captions = [caption for _, caption, _ in items]
        _, images = sample_images(
            model, tokenizer, text_condition(run, captions), settings, generator=gen
        )
        scores = attribute_scores(images, captions)
        held = [i for i in range(len(test)) if test.held_out(i)]
        scores["held_out_accuracy"] = attribute_scores(images[held], [captions[i] for i in held])[
            "accuracy"
        ]
    else:
        sources = torch.stack([item["source"] for item in items])
        source_tokens = tokenizer.encode(sources.to(cfg.device)).indices
        condition = text_condition(
            run, [item["instruction"] for item in items], source=source_tokens
        )
        _, images = sample_images(model, tokenizer, condition, settings, generator=gen)
        scores = edit_scores(
            torch.stack([item["source_attributes"] for item in items]),
            torch.stack([item["target_attributes"] for item in items]),
            images, source_images=sources,
        )  # fmt: skip
    torch.save(images[:16].cpu(), run_dir / "test_samples.pt")
    return {k: v for k, v in scores.items() if not isinstance(v, torch.Tensor)}


def baselines(task: str, test) -> dict:
    """What the metrics give without a generator: real renders (t2i), the true target and no edit (edit)."""
    from snce.metrics.scenes import attribute_scores, edit_scores

    items = [test[i] for i in range(len(test))]
    if task == "t2i":
        images = torch.stack([image for image, _, _ in items])
        captions = [caption for _, caption, _ in items]
        shuffled = captions[1:] + captions[:1]
        return {
            "real renders": attribute_scores(images, captions)["accuracy"],
            "real renders, another item's caption (chance)": attribute_scores(images, shuffled)[
                "accuracy"
            ],
        }
    sources = torch.stack([item["source"] for item in items])
    src = torch.stack([item["source_attributes"] for item in items])
    tgt = torch.stack([item["target_attributes"] for item in items])
    targets = torch.stack([item["target"] for item in items])
    keys = ("edit_success", "preservation", "pixel_change_outside")
    return {
        name: {k: edit_scores(src, tgt, images, source_images=sources)[k] for k in keys}
        for name, images in (("true target", targets), ("no edit (source returned)", sources))
    }


def headline(task: str) -> str:
    return "accuracy" if task == "t2i" else "edit_success"


def analyse(cfg: SceneStudyConfig, runs: dict) -> dict:
    """Per arm: the mean [t-interval] of each score; per arm but CE: the paired difference to CE."""
    keys = ["accuracy", "held_out_accuracy", "exact"] if cfg.task == "t2i" else [
        "edit_success", "preservation", "pixel_change_outside"]  # fmt: skip
    analysis = {}
    for arm in cfg.arms:
        per_key = {}
        for key in keys:
            values = [runs[f"{arm}/{s}"][key] for s in cfg.seeds]
            mean = t_interval(values)
            entry = {"mean": mean.mean, "lo": mean.lo, "hi": mean.hi, "values": values}
            if arm != "ce":
                base = [runs[f"ce/{s}"][key] for s in cfg.seeds]
                diff = paired_difference(values, base)
                lower_better = key == "pixel_change_outside"
                entry["vs_ce"] = {"mean": diff.mean, "lo": diff.lo, "hi": diff.hi,
                                  "verdict": verdict(diff, lower_is_better=lower_better)}  # fmt: skip
            per_key[key] = entry
        analysis[arm] = per_key
    return analysis


def write_report(cfg: SceneStudyConfig, results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from snce.data.scenes import SceneCaptions, SceneEdits, labelled_sheet

    analysis, key = results["analysis"], headline(cfg.task)
    title = "text-to-image" if cfg.task == "t2i" else "image editing"
    lines = [f"# CE vs SNCE on the built-in scenes: {title}", "",
             f"{len(cfg.seeds)} paired seeds; {cfg.test_samples} test items (held-out shape-colour pairs "
             "included); mean [95% t-interval over seeds].", "", "Baselines: " + json.dumps(
                 results["baselines"]), "",
             "| arm | " + " | ".join(analysis["ce"]) + " | " + key + " vs CE |",
             "|---|" + "---|" * (len(analysis["ce"]) + 1)]  # fmt: skip
    for arm, per_key in analysis.items():
        cells = [f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]" for v in per_key.values()]
        vs = per_key[key].get("vs_ce")
        diff = (
            f"{vs['mean']:+.3f} [{vs['lo']:+.3f}, {vs['hi']:+.3f}] {vs['verdict']}" if vs else "n/a"
        )
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {diff} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 3))
    for x, arm in enumerate(cfg.arms):
        v = analysis[arm][key]
        ax.bar(x, v["mean"], yerr=[[v["mean"] - v["lo"]], [v["hi"] - v["mean"]]], capsize=4)
        ax.scatter([x] * len(v["values"]), v["values"], color="k", s=8, zorder=3)
    ax.set_xticks(range(len(cfg.arms)), cfg.arms)
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(f"{title}: {key.replace('_', ' ')} (test split)")
    fig.tight_layout()
    fig.savefig(plots / f"{key}.png", dpi=120)
    plt.close(fig)

    test = (SceneCaptions if cfg.task == "t2i" else SceneEdits)(cfg.size, 8, split="test")
    for arm in cfg.arms:
        images = torch.load(out / "runs" / f"{arm}-seed{cfg.seeds[0]}" / "test_samples.pt")
        if cfg.task == "t2i":
            rows = [[test[i][0], images[i]] for i in range(8)]
            labels = [test[i][1] for i in range(8)]
            headers = ["real", arm]
        else:
            rows = [[test[i]["source"], test[i]["target"], images[i]] for i in range(8)]
            labels = [test[i]["instruction"] for i in range(8)]
            headers = ["source", "target", arm]
        labelled_sheet(rows, labels, headers=headers).save(plots / f"samples_{arm}.png")
