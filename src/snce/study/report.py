"""The study's outputs: headline numbers, ``results.json``, ``report.md``, metric-vs-step plots, sample grids."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from snce.study.run import write_json
from snce.train import image_grid

PLOTTED = {
    "fid": "FID (lower is better)",
    "kid": "KID (lower is better)",
    "nll": "validation NLL, nats/token",
    "soft_nll": "validation soft NLL at suggested tau, nats/token",
    "class_acc": "class consistency (higher is better)",
    "precision": "precision",
    "recall": "recall",
    "code_usage": "fraction of codes used by samples",
}


def steps_to_reach(evals: list[dict], target: float, key: str = "fid") -> float | None:
    """First step at which ``key`` falls to ``target`` or below, interpolating linearly between evaluations."""
    prev = None
    for e in evals:
        if e[key] <= target:
            if prev is None or prev[1] == e[key]:
                return float(e["step"])
            (s0, v0), (s1, v1) = prev, (e["step"], e[key])
            return s0 + (v0 - target) / (v0 - v1) * (s1 - s0)
        prev = (e["step"], e[key])
    return None


def headlines(runs: list[dict]) -> list[dict]:
    """Per (K, family): CE's final FID, each SNCE tau's, the winning tau, and the fraction of CE's steps the
    winner needed to reach CE's final FID (None: it never did)."""
    out = []
    keys = sorted({(r["K"], r["family"]) for r in runs}, key=lambda kf: (kf[0], kf[1]))
    for K, family in keys:
        group = [r for r in runs if r["K"] == K and r["family"] == family]
        ce = next((r for r in group if r["kind"] == "ce"), None)
        snce = [r for r in group if r["kind"] == "snce"]
        if ce is None or not snce:
            continue
        ce_final = ce["evals"][-1]
        best = min(snce, key=lambda r: r["evals"][-1]["fid"])
        reached = steps_to_reach(best["evals"], ce_final["fid"])
        out.append(
            {
                "K": K,
                "family": family,
                "ce_fid": ce_final["fid"],
                "ce_steps": ce_final["step"],
                "snce_fid": {r["loss"]: r["evals"][-1]["fid"] for r in snce},
                "best_tau_scale": best["tau_scale"],
                "best_tau": best["tau"],
                "best_snce_fid": best["evals"][-1]["fid"],
                "steps_to_ce_fid": reached,
                "fraction_of_ce_steps": None if reached is None else reached / ce_final["step"],
                "snce_wins": best["evals"][-1]["fid"] < ce_final["fid"],
            }
        )
    return out


# ------------------------------------------------------------------------------------------ figures


def plot_metrics(runs: list[dict], out: Path) -> list[Path]:
    """One PNG per metric: a panel per (family, K) with CE and every SNCE tau on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ks = sorted({r["K"] for r in runs})
    families = sorted({r["family"] for r in runs})
    paths = []
    for key, label in PLOTTED.items():
        if not any(key in e for r in runs for e in r["evals"]):
            continue
        fig, axes = plt.subplots(
            len(families), len(Ks), figsize=(4 * len(Ks), 3.2 * len(families)), squeeze=False
        )
        for i, family in enumerate(families):
            for j, K in enumerate(Ks):
                ax = axes[i][j]
                group = sorted(
                    (r for r in runs if r["K"] == K and r["family"] == family),
                    key=lambda r: (r["kind"] != "ce", r["tau_scale"] or 0),
                )
                for r in group:
                    steps = [e["step"] for e in r["evals"] if key in e]
                    values = [e[key] for e in r["evals"] if key in e]
                    style = dict(color="black", lw=2.2) if r["kind"] == "ce" else dict(lw=1.5)
                    name = (
                        "CE"
                        if r["kind"] == "ce"
                        else f"SNCE tau={r['tau_scale']:g}x ({r['tau']:.3g})"
                    )
                    ax.plot(steps, values, marker="o", ms=3, label=name, **style)
                ax.set_title(f"{family}, K={K}", fontsize=10)
                ax.set_xlabel("generator step")
                ax.grid(alpha=0.3)
                if j == 0:
                    ax.set_ylabel(label, fontsize=9)
                ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(_save_figure(fig, out / "plots" / f"{key}_vs_step.png"))
        plt.close(fig)
    return paths


def sample_grids(runs: list[dict], out: Path, real: torch.Tensor) -> list[Path]:
    """Per (K, family): real images, then each run's final samples (same classes, same seed) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real_grid = image_grid(real, nrow=10)
    paths = []
    for K, family in sorted({(r["K"], r["family"]) for r in runs}):
        group = sorted(
            (r for r in runs if r["K"] == K and r["family"] == family),
            key=lambda r: (r["kind"] != "ce", r["tau_scale"] or 0),
        )
        panels = [("real images", real_grid)]
        for r in group:
            path = out / "runs" / f"k{K}" / family / r["loss"] / "samples.png"
            if path.is_file():
                name = "CE" if r["kind"] == "ce" else f"SNCE tau={r['tau_scale']:g}x"
                fid = r["evals"][-1]["fid"]
                panels.append(
                    (
                        f"{name}\nFID {fid:.3g} @ step {r['evals'][-1]['step']}",
                        np.asarray(Image.open(path)),
                    )
                )
        h, w = real_grid.shape[:2]
        fig, axes = plt.subplots(
            1, len(panels), figsize=(3.2 * len(panels), 3.2 * h / w + 1.0), squeeze=False
        )
        for ax, (title, img) in zip(axes[0], panels, strict=True):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.suptitle(
            f"{family}, K={K}: final samples (classes 0, 1, 2, ... along each row)", fontsize=10
        )
        fig.tight_layout()
        paths.append(_save_figure(fig, out / "plots" / f"samples_k{K}_{family}.png"))
        plt.close(fig)
    return paths


def _save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------ report


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _where(heads: list[dict]) -> str:
    return ", ".join(f"{h['family']} K={h['K']}" for h in heads)


def verdict(heads: list[dict]) -> str:
    """One plain paragraph: where SNCE beat CE (final FID) and where it did not."""
    if not heads:
        return "No (CE, SNCE) pair finished, so there is no comparison yet."
    wins = [h for h in heads if h["snce_wins"]]
    losses = [h for h in heads if not h["snce_wins"]]
    text = (
        f"SNCE (best tau) reached a lower final FID than CE in {len(wins)} of {len(heads)} settings"
    )
    text += f" ({_where(wins)})." if wins else "."
    if losses:
        text += f" It did not in: {_where(losses)}."
    faster = [
        h for h in heads if h["fraction_of_ce_steps"] is not None and h["fraction_of_ce_steps"] < 1
    ]
    if faster:
        text += (
            " SNCE first matched CE's final FID after "
            + ", ".join(
                f"{h['fraction_of_ce_steps']:.0%} of CE's steps ({h['family']} K={h['K']})"
                for h in faster
            )
            + "."
        )
    return text


def render_report(results: dict, figures: list[Path], out: Path) -> str:
    cfg, heads = results["config"], results["headlines"]
    feats = results["features"]
    if feats.get("features") == "inception":
        space = f"Inception-v3 features from `{feats['weights']}`"
    else:
        space = (
            f"features of the built-in domain classifier ({feats.get('task')}; held-out accuracy "
            f"{_f(feats.get('heldout_accuracy'))}). These FIDs compare runs with each other; they are not "
            "comparable to published Inception FIDs"
        )
    g = cfg["generator"]
    lines = [
        "# CE vs SNCE study",
        "",
        f"Data: `{cfg['data']['path'] or cfg['data']['name']}` at {cfg['data']['size']} px "
        f"({results['real_images']} training images). Codebook sizes: {', '.join(map(str, cfg['codebook_sizes']))}. "
        f"Generators: {', '.join(g['families'])} (preset `{g['preset']}` {g['model'] or ''}), "
        f"{g['train']['steps']} steps at batch {g['train']['batch_size']}, seed {cfg['seed']}, the same for every "
        f"loss. SNCE at the suggested tau times {', '.join(f'{s:g}' for s in cfg['loss']['tau_scales'])} "
        f"(targets: {cfg['loss']['targets']}). Metrics every {cfg['eval']['every']} steps on "
        f"{cfg['eval']['num_samples']} samples, in {space}.",
        "",
        "## Headline",
        "",
        verdict(heads),
        "",
        "| K | family | CE final FID | best SNCE final FID | best tau | SNCE steps to CE's final FID |",
        "|---|---|---|---|---|---|",
    ]
    for h in heads:
        frac = h["fraction_of_ce_steps"]
        reach = (
            "not reached"
            if frac is None
            else f"{frac:.0%} ({h['steps_to_ce_fid']:.0f} of {h['ce_steps']})"
        )
        lines.append(
            f"| {h['K']} | {h['family']} | {_f(h['ce_fid'])} | {_f(h['best_snce_fid'])} | "
            f"{h['best_tau_scale']:g}x ({_f(h['best_tau'])}) | {reach} |"
        )
    lines += [
        "",
        "## Every run (final checkpoint)",
        "",
        "| K | family | loss | tau | FID | KID | IS | precision | recall | class acc | NLL | soft NLL | code usage | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        results["runs"], key=lambda r: (r["K"], r["family"], r["kind"] != "ce", r["tau_scale"] or 0)
    ):
        e = r["evals"][-1]
        lines.append(
            f"| {r['K']} | {r['family']} | {r['loss']} | {_f(r['tau'])} | {_f(e['fid'])} | {_f(e['kid'])} | "
            f"{_f(e['is'])} | {_f(e['precision'])} | {_f(e['recall'])} | {_f(e.get('class_acc'))} | "
            f"{_f(e['nll'])} | {_f(e['soft_nll'])} | {_f(e['code_usage'])} | {r['train_seconds']:.0f} |"
        )
    lines += [
        "",
        "## Tokenizers (test split)",
        "",
        "| K | PSNR dB | SSIM | codebook usage | perplexity | suggested tau | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for K, t in results["tokenizers"].items():
        lines.append(
            f"| {K} | {_f(t['psnr'])} | {_f(t['ssim'])} | {_f(t['usage'])} | {_f(t['perplexity'])} | "
            f"{_f(t['suggested_tau'])} | {t['train_seconds']:.0f} |"
        )
    lines += ["", "## Figures", ""]
    lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in figures]
    lines += [
        "",
        f"Every number is in `results.json`. Study wall time: {results['study_seconds'] / 60:.1f} min "
        "(reused runs count as zero). One seed: differences of a few FID points are within run-to-run noise.",
        "",
    ]
    return "\n".join(lines)


def write_report(results: dict, out: Path, real: torch.Tensor) -> None:
    """Add the headlines to ``results`` and write results.json, the figures and report.md (atomically)."""
    from snce.config import atomic_write_text

    results["headlines"] = headlines(results["runs"])
    write_json(out / "results.json", results)
    figures = plot_metrics(results["runs"], out) + sample_grids(results["runs"], out, real)
    atomic_write_text(out / "report.md", render_report(results, figures, out))
