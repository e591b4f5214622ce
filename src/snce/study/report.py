"""The study's outputs: the analysis (paired intervals and verdict words), ``results.json``, ``report.md``,
plots with interval bands, and sample grids.

Every word of the report follows from :mod:`snce.study.stats`: a difference is a "win" or a "loss" only when
its paired 95% interval over seeds excludes zero, otherwise "no difference shown".
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from snce.study.config import arm_tau_scale
from snce.study.run import write_json
from snce.study.stats import (
    LOSS,
    WIN,
    area_under_curve,
    first_reach,
    paired_difference,
    t_interval,
    verdict,
)
from snce.train import image_grid

# Per-run numbers compared between arms: name -> (how to read it off a run, lower is better)
METRICS = {
    "final_fid": (lambda r: r["evals"][-1]["fid"], True),
    "auc_fid": (lambda r: area_under_curve(*_curve(r, "fid")), True),
    "nll": (lambda r: r["evals"][-1]["nll"], True),
    "class_acc": (lambda r: r["evals"][-1].get("class_acc", math.nan), False),
}
# Pairs compared beyond "arm vs CE": (arm, baseline, what the difference measures)
CONTRASTS = [
    ("snce", "snce_shuffled", "geometry: SNCE vs the same targets on random codes"),
    ("snce", "ls_matched", "SNCE vs smoothing of equal entropy"),
    ("snce", "ls", "SNCE vs label smoothing 0.1"),
    ("snce_latents", "snce", "targets from z vs from the code"),
]
ARM_ORDER = ["ce", "ls", "ls_matched", "snce", "snce_shuffled", "snce_latents"]
ARM_LABEL = {
    "ce": "CE",
    "ls": "LS 0.1",
    "ls_matched": "LS, SNCE's entropy",
    "snce": "SNCE (tau 1x)",
    "snce_shuffled": "SNCE, shuffled neighbours",
    "snce_latents": "SNCE, targets from z",
}


def _number(x) -> float:
    """A metric as read back from results.json (where NaN is stored as null)."""
    return math.nan if x is None else float(x)


def _curve(run: dict, key: str) -> tuple[list[int], list[float]]:
    evals = [e for e in run["evals"] if key in e]
    return [e["step"] for e in evals], [e[key] for e in evals]


def arm_sort_key(arm: str) -> tuple:
    scale = arm_tau_scale(arm)
    return (ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER), scale or 0.0)


def arm_label(arm: str) -> str:
    return ARM_LABEL.get(arm) or f"SNCE (tau {arm_tau_scale(arm):g}x)"


# ------------------------------------------------------------------------------------------ analysis


def compare(runs_a: dict[int, dict], runs_b: dict[int, dict], confidence: float) -> dict:
    """Paired differences (a - b) over the seeds both arms ran, for every metric in METRICS."""
    seeds = sorted(set(runs_a) & set(runs_b))
    out = {"seeds": seeds}
    for name, (read, lower_is_better) in METRICS.items():
        a, b = [read(runs_a[s]) for s in seeds], [read(runs_b[s]) for s in seeds]
        if not seeds or any(math.isnan(x) for x in a + b):
            continue
        diff = paired_difference(a, b, confidence)
        out[name] = {**diff.to_dict(), "verdict": verdict(diff, lower_is_better=lower_is_better)}
    return out


def convergence(by_arm: dict[str, dict[int, dict]], confidence: float) -> dict:
    """For the targets CE's best and CE's final FID (per seed: CE(s)'s own), the step at which each arm first
    reaches it (None: not within the run), CE's own first-reach step of the same target, and, when the arm
    reached it in every seed, the ratio arm / CE of those steps as a t-interval over seeds."""
    ce = by_arm["ce"]
    out = {}
    for target in ("ce_best", "ce_final"):
        rows = {}
        for arm, runs in by_arm.items():
            seeds = sorted(set(runs) & set(ce))
            steps, own = [], []
            for seed in seeds:
                ce_curve = _curve(ce[seed], "fid")
                value = min(ce_curve[1]) if target == "ce_best" else ce_curve[1][-1]
                steps.append(first_reach(*_curve(runs[seed], "fid"), value))
                own.append(first_reach(*ce_curve, value))
            row = {
                "seeds": seeds,
                "steps": steps,
                "ce_steps": own,
                "reached": sum(s is not None for s in steps),
            }
            if row["reached"] == len(seeds):
                row["fraction"] = t_interval(
                    [a / b for a, b in zip(steps, own, strict=True)], confidence
                ).to_dict()
            rows[arm] = row
        out[target] = rows
    return out


def analyse(runs: list[dict], confidence: float = 0.95) -> list[dict]:
    """One entry per (setting, K, family): every arm's summary, its comparison with CE and the contrasts,
    first-reach steps, and the tau selected on the val split (when the group swept tau)."""
    groups = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        groups[(r["setting"], r["K"], r["family"])][r["arm"]][r["seed"]] = r
    out = []
    for (setting, K, family), by_arm in sorted(groups.items()):
        arms = sorted(by_arm, key=arm_sort_key)
        summary = {}
        for arm in arms:
            seeds = sorted(by_arm[arm])
            row = {"seeds": seeds, "tau": by_arm[arm][seeds[0]]["loss"].get("tau")}
            for name, (read, _) in METRICS.items():
                values = [read(by_arm[arm][s]) for s in seeds]
                if not any(math.isnan(v) for v in values):
                    row[name] = {**t_interval(values, confidence).to_dict(), "values": values}
            val = [by_arm[arm][s]["evals"][-1].get("val_fid") for s in seeds]
            if None not in val:
                row["val_fid"] = float(np.mean(val))
            finals = [by_arm[arm][s]["evals"][-1] for s in seeds]
            widths = [_number(e.get("fid_hi")) - _number(e.get("fid_lo")) for e in finals]
            if not any(math.isnan(w) for w in widths):
                row["fid_sampling_halfwidth"] = float(np.mean(widths)) / 2
            summary[arm] = row
        group = {"setting": setting, "K": K, "family": family, "arms": summary}
        if "ce" in by_arm:
            group["vs_ce"] = {
                arm: compare(by_arm[arm], by_arm["ce"], confidence) for arm in arms if arm != "ce"
            }
            group["convergence"] = convergence(by_arm, confidence)
        group["contrasts"] = [
            {"arm": a, "baseline": b, "measures": what, **compare(by_arm[a], by_arm[b], confidence)}
            for a, b, what in CONTRASTS
            if a in by_arm and b in by_arm
        ]
        swept = [a for a in arms if arm_tau_scale(a) is not None and "val_fid" in summary[a]]
        if len(swept) > 1:
            chosen = min(swept, key=lambda a: summary[a]["val_fid"])
            group["tau_selection"] = {
                "candidates": {a: summary[a]["val_fid"] for a in swept},
                "selected": chosen,
                "tau_scale": arm_tau_scale(chosen),
            }
        out.append(group)
    return out


# ------------------------------------------------------------------------------------------ words


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _diff(d: dict | None) -> str:
    """'-3.2 [-5.1, -1.3]' or '-3.2 (one seed)'."""
    if not d:
        return "n/a"
    if d["n"] < 2:
        return f"{d['mean']:+.3g} (one seed)"
    return f"{d['mean']:+.3g} [{d['lo']:+.3g}, {d['hi']:+.3g}]"


def _mean(d: dict | None) -> str:
    if not d:
        return "n/a"
    if d["n"] < 2:
        return _f(d["mean"])
    return f"{d['mean']:.3g} [{d['lo']:.3g}, {d['hi']:.3g}]"


def _where(g: dict) -> str:
    return f"{g['setting']} K={g['K']:,} {g['family'].replace('_', ' ')}"


# A tokenizer using fewer than this fraction of its codes on the test split has collapsed: its tokens carry
# little of the image, so generators trained on them say nothing about the loss.
COLLAPSED_USAGE = 0.01


def collapsed_tokenizers(tokenizers: list[dict]) -> dict[tuple[str, int], str]:
    """(setting, K) -> why, for every tokenizer that collapsed (test-split usage below COLLAPSED_USAGE)."""
    return {
        (t["setting"], t["K"]): (
            f"its tokenizer collapsed: {t['test']['usage']:.2%} of the {t['K']:,} codes in use on the test "
            f"split (perplexity {t['test']['perplexity']:.3g}), so these runs are not evidence about SNCE"
        )
        for t in tokenizers
        if t["test"]["usage"] < COLLAPSED_USAGE
    }


def verdict_paragraph(groups: list[dict], tokenizers: list[dict] = ()) -> str:
    """Plain sentences, one per comparison that matters, each saying only what its interval says; groups on a
    collapsed tokenizer say so first."""
    if not groups or not any("vs_ce" in g for g in groups):
        return "No arm has been compared with CE yet."
    collapsed = collapsed_tokenizers(list(tokenizers))
    lines = []
    for g in groups:
        why = collapsed.get((g["setting"], g["K"]))
        parts = [f"**{why}**"] if why else []
        vs = g.get("vs_ce", {})
        if "snce" in vs and "final_fid" in vs["snce"]:
            d = vs["snce"]["final_fid"]
            parts.append(f"SNCE vs CE, final FID {_diff(d)}: {_word(d['verdict'], 'SNCE')}")
            a = vs["snce"].get("auc_fid")
            if a:
                parts.append(
                    f"FID averaged over training {_diff(a)}: {_word(a['verdict'], 'SNCE')}"
                )
            reach = g["convergence"]["ce_best"]["snce"]
            parts.append("CE's best FID reached: " + _reach(reach))
        for c in g["contrasts"]:
            if c["arm"] == "snce" and "final_fid" in c:
                d = c["final_fid"]
                parts.append(
                    f"vs {arm_label(c['baseline'])} {_diff(d)}: {_word(d['verdict'], 'SNCE')}"
                )
        if parts:
            lines.append(f"- **{_where(g)}**: " + "; ".join(parts) + ".")
    return "\n".join(lines) if lines else "SNCE (tau 1x) was not among the arms."


def _word(word: str, who: str) -> str:
    if word == WIN:
        return f"{who} better (win)"
    if word == LOSS:
        return f"{who} worse (loss)"
    return "no difference shown"


def render_report(results: dict, figures: list[Path], out: Path) -> str:
    cfg, groups, floors = results["config"], results["analysis"], results["floors"]
    e, g = cfg["eval"], cfg["generator"]
    feats = floors.get("features", {})
    if feats.get("features") == "inception":
        space = f"Inception-v3 features from `{feats['weights']}`"
    else:
        space = (
            f"features of the built-in domain classifier (trained on {e['feature_images']:,} training images; "
            f"its held-out accuracy {_f(feats.get('heldout_accuracy'))}). These FIDs compare runs with each "
            "other; they are not comparable with published Inception FIDs"
        )
    seeds = cfg["seeds"]
    confidence = f"{e['confidence']:.0%}"
    lines = [
        "# CE vs SNCE study",
        "",
        "## Protocol",
        "",
        f"- Data: `{cfg['data']['path'] or cfg['data']['name']}` at {cfg['data']['size']} px. Tokenizers, "
        "generators and the feature network train on the train split; every reported metric is measured "
        "against the held-out test split, which none of them saw; a tau is selected (if at all) on the val split.",
        "- Settings (tokenizers): "
        + "; ".join(
            f"`{s['name']}` ({s['quantizer'] or cfg['tokenizer']['model']['quantizer']}"
            + (f", model {s['model']}" if s.get("model") else "")
            + ") at K = "
            + ", ".join(f"{k:,}" for k in s["codebook_sizes"])
            + f", families {', '.join(s['families'])}"
            for s in cfg["settings"]
        )
        + ".",
        f"- Generators: preset `{g['preset']}` {g['model'] or ''}, {g['train']['steps']} steps at batch "
        f"{g['train']['batch_size']}, lr {g['train']['lr']:g} ({g['train']['schedule']} after "
        f"{g['train']['warmup_steps']} warmup steps), identical for every arm.",
        f"- Seeds: {len(seeds)} generator seeds ({', '.join(map(str, seeds))}); seed s of every arm shares the "
        "initial weights, data order, masks and sampling noise. Differences are paired by seed: mean and "
        f"{confidence} t-interval; a difference is a win or a loss only when its interval excludes zero.",
        f"- Evaluation: every {e['every']} steps ({g['train']['steps'] // e['every']} evaluations per run), "
        f"{e['num_samples']:,} samples (classes balanced), FID in {space}; FID intervals of single runs are "
        f"bootstrap intervals over the samples at the last step ({e['bootstrap']} resamples); intervals of arms "
        "are over seeds.",
        f"- Arms: {', '.join(f'`{a}`' for a in cfg['loss']['arms'])} (per setting: see the tables). The "
        "headline arm, fixed before any run, is `snce` at the suggested tau (1x); `snce_shuffled` has the "
        "same entropy and true-code mass with the geometry removed, `ls_matched` the same entropy.",
        "",
        "## Verdict",
        "",
        "The pre-registered test is SNCE (tau 1x) vs CE in final FID, per setting. Every other comparison "
        f"below is exploratory: several metrics and arms, each at {confidence} without correction for "
        "multiplicity, so an isolated win or loss among them may be chance.",
        "",
        verdict_paragraph(groups, results["tokenizers"]),
        "",
        "## Floors (what a perfect generator would score at this sample size)",
        "",
        "| reference | FID [bootstrap] | precision | recall | class acc |",
        "|---|---|---|---|---|",
        _floor_row("real train images vs test split", floors.get("train_vs_test")),
    ]
    for t in results["tokenizers"]:
        lines.append(
            _floor_row(
                f"{t['setting']} K={t['K']:,} reconstructions of test images",
                t["reconstruction_floor"],
            )
        )
    if "test_class_acc" in floors:
        lines += [
            "",
            f"Class consistency of the real test images: {_f(floors['test_class_acc'])} (the training images' "
            "class column above is optimistic: the classifier was trained on training images).",
        ]
    lines += _target_floor_section(results["tokenizers"])
    lines += [
        "",
        "## Verdict table: every arm vs CE, paired by seed",
        "",
        f"Differences arm - CE: mean [{confidence} interval]. FID and NLL: lower is better; class acc: higher.",
        "",
        "| setting | K | family | arm | final FID | FID, training average | held-out NLL | class acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for grp in groups:
        for arm, c in grp.get("vs_ce", {}).items():
            cells = [
                f"{_diff(c.get(m))} {c[m]['verdict']}" if m in c else "n/a"
                for m in ("final_fid", "auc_fid", "nll", "class_acc")
            ]
            lines.append(
                f"| {grp['setting']} | {grp['K']:,} | {grp['family']} | {arm_label(arm)} | "
                + " | ".join(cells)
                + " |"
            )
    lines += [
        "",
        "## Controls: what SNCE's effect comes from",
        "",
        "| setting | K | family | comparison | final FID | FID, training average | held-out NLL |",
        "|---|---|---|---|---|---|---|",
    ]
    for grp in groups:
        for c in grp["contrasts"]:
            cells = [
                f"{_diff(c.get(m))} {c[m]['verdict']}" if m in c else "n/a"
                for m in ("final_fid", "auc_fid", "nll")
            ]
            lines.append(
                f"| {grp['setting']} | {grp['K']:,} | {grp['family']} | {arm_label(c['arm'])} - "
                f"{arm_label(c['baseline'])} ({c['measures']}) | " + " | ".join(cells) + " |"
            )
    lines += [
        "",
        "## Every arm (mean over seeds, t-interval)",
        "",
        "The interval of each mean is over seeds (training and sampling noise together); '± sampling' is the "
        "mean half-width of the single runs' bootstrap intervals of their final FID (sampling noise alone).",
        "",
        "| setting | K | family | arm | tau | final FID | ± sampling | FID, training average | held-out NLL | "
        "class acc | val FID |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for grp in groups:
        for arm, s in grp["arms"].items():
            lines.append(
                f"| {grp['setting']} | {grp['K']:,} | {grp['family']} | {arm_label(arm)} | {_f(s['tau'])} | "
                f"{_mean(s.get('final_fid'))} | {_f(s.get('fid_sampling_halfwidth'), 2)} | "
                f"{_mean(s.get('auc_fid'))} | {_mean(s.get('nll'))} | {_mean(s.get('class_acc'))} | "
                f"{_f(s.get('val_fid'))} |"
            )
    lines += _convergence_section(groups)
    lines += _tau_section(groups)
    lines += [
        "",
        "## Tokenizers",
        "",
        "Quality on the test split; code health over the training tokens (duplicates: codes equal to another "
        "code; dead: codes no training token uses); tau: the suggested temperature; H(q): mean entropy of the "
        "SNCE targets over training tokens (nats); eps: the label smoothing of equal entropy.",
        "",
        "| setting | K | metric | PSNR dB | SSIM | test usage | perplexity | duplicates | dead | tau | H(q) | eps | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in results["tokenizers"]:
        q, h = t["test"], t["health"]
        lines.append(
            f"| {t['setting']} | {t['K']:,} | {t['metric']} | {_f(q['psnr'])} | {_f(q['ssim'])} | "
            f"{_f(q['usage'])} | {_f(q['perplexity'], 4)} | {int(h['duplicate_codes'])} | {int(h['dead_codes'])} | "
            f"{_f(t['tau'])} | {_f(t['target_entropy'])} | {_f(t['matched_smoothing'])} | "
            f"{t['train_seconds']:.0f} |"
        )
    lines += ["", "## Figures", ""]
    lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in figures]
    lines += [
        "",
        f"Every number is in `results.json` (per run: every evaluation; per group: the analysis). Study wall "
        f"time: {results['study_seconds'] / 60:.1f} min (runs reused from an earlier invocation count as zero).",
        "",
    ]
    return "\n".join(lines)


def _target_floor_section(tokenizers: list[dict]) -> list[str]:
    """FID of the test images' tokens redrawn from each arm's training target."""
    rows = [
        (t, arm, m) for t in tokenizers for arm, m in sorted(t.get("target_floors", {}).items())
    ]
    if not rows:
        return []
    lines = [
        "",
        "What each arm's target does to images on its own: the test images' tokens redrawn token by token from "
        "the arm's training target, decoded, against the test split (CE's target gives the reconstructions "
        "above). A generator that learned its target exactly and sampled it at temperature 1 would score this; "
        "targets whose off-true mass lands on unrelated codes (label smoothing, shuffled neighbours) pay for it "
        "in FID whatever they do to learning.",
        "",
        "| setting | K | target | FID | class acc |",
        "|---|---|---|---|---|",
    ]
    for t, arm, m in rows:
        lines.append(
            f"| {t['setting']} | {t['K']:,} | {arm_label(arm)} | {_f(m['fid'])} | {_f(m.get('class_acc'))} |"
        )
    return lines


def _floor_row(name: str, m: dict | None) -> str:
    if not m:
        return f"| {name} | n/a | | | |"
    return (
        f"| {name} | {_f(m['fid'])} [{_f(m['fid_lo'])}, {_f(m['fid_hi'])}] | {_f(m['precision'])} | "
        f"{_f(m['recall'])} | {_f(m.get('class_acc'))} |"
    )


def _convergence_section(groups: list[dict]) -> list[str]:
    lines = [
        "",
        "## Convergence: the step at which each arm first reaches CE's FID",
        "",
        "Per seed s the target is CE(s)'s best FID over its run (or its final FID). Each cell lists the arm's "
        "first-reach steps over the seeds (interpolated between evaluations; '-': never within the run), then, "
        "when every seed got there, the ratio to CE's own first-reach step of the same target (mean "
        "[t-interval over seeds]; below 1: faster than CE).",
        "",
        "| setting | K | family | arm | reaches CE's best FID | reaches CE's final FID |",
        "|---|---|---|---|---|---|",
    ]
    for grp in groups:
        conv = grp.get("convergence")
        if not conv:
            continue
        for arm in (
            a for a in conv["ce_best"] if a != "ce"
        ):  # CE reaches its own targets by definition
            cells = [_reach(conv[t][arm]) for t in ("ce_best", "ce_final")]
            lines.append(
                f"| {grp['setting']} | {grp['K']:,} | {grp['family']} | {arm_label(arm)} | "
                + " | ".join(cells)
                + " |"
            )
    return lines


def _reach(row: dict) -> str:
    """'steps 307, 248, 286 (0.701 [0.513, 0.889] of CE's steps)', 'steps 307, -, 286 (2 of 3 seeds)' or
    'never (0 of 3 seeds)'."""
    if row["reached"] == 0:
        return f"never (0 of {len(row['seeds'])} seeds)"
    steps = "steps " + ", ".join("-" if v is None else f"{v:.0f}" for v in row["steps"])
    if "fraction" not in row:
        return f"{steps} ({row['reached']} of {len(row['seeds'])} seeds)"
    return f"{steps} ({_mean(row['fraction'])} of CE's steps)"


def _tau_section(groups: list[dict]) -> list[str]:
    swept = [g for g in groups if "tau_selection" in g]
    if not swept:
        return []
    lines = [
        "",
        "## Tau sweep (reported apart from the headline)",
        "",
        "The tau is selected by the val split's FID (other sampling seeds, another split); the selected arm's "
        "test-split comparison with CE is then read off the verdict table, not re-chosen by it.",
        "",
        "| setting | K | family | val FID per tau | selected | selected vs CE, final FID |",
        "|---|---|---|---|---|---|",
    ]
    for g in swept:
        sel = g["tau_selection"]
        cands = ", ".join(f"{arm_tau_scale(a):g}x: {_f(v)}" for a, v in sel["candidates"].items())
        c = g["vs_ce"].get(sel["selected"], {}).get("final_fid")
        word = f"{_diff(c)} {c['verdict']}" if c else "n/a"
        lines.append(
            f"| {g['setting']} | {g['K']:,} | {g['family']} | {cands} | {sel['tau_scale']:g}x | {word} |"
        )
    return lines


# ------------------------------------------------------------------------------------------ figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    results: dict, out: Path, key: str = "fid", label: str = "FID vs test split"
) -> Path:
    """A panel per (setting, family, K): each arm's mean curve over seeds with its t-interval band, and the
    floors (real training images; the tokenizer's reconstructions) as dashed lines."""
    plt = _plt()
    runs, confidence = results["runs"], results["config"]["eval"]["confidence"]
    panels = sorted({(r["setting"], r["family"], r["K"]) for r in runs})
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    floors = {(t["setting"], t["K"]): t["reconstruction_floor"] for t in results["tokenizers"]}
    arms = sorted({r["arm"] for r in runs} - {"ce"}, key=arm_sort_key)
    # one colour per arm, the same in every panel
    colour = dict(zip(arms, plt.get_cmap("tab10").colors * 2, strict=False))
    for ax, (setting, family, K) in zip(axes.flat, panels, strict=False):
        group = [r for r in runs if (r["setting"], r["family"], r["K"]) == (setting, family, K)]
        for arm in sorted({r["arm"] for r in group}, key=arm_sort_key):
            curves = [_curve(r, key) for r in group if r["arm"] == arm]
            steps = curves[0][0]
            if any(c[0] != steps for c in curves):
                continue
            values = np.array([c[1] for c in curves])  # (seeds, evals)
            mean = values.mean(0)
            style = dict(color="black", lw=2.2) if arm == "ce" else dict(color=colour[arm], lw=1.5)
            ax.plot(steps, mean, marker="o", ms=2.5, label=arm_label(arm), **style)
            if len(values) > 1:
                bands = [t_interval(values[:, j], confidence) for j in range(values.shape[1])]
                ax.fill_between(
                    steps,
                    [b.lo for b in bands],
                    [b.hi for b in bands],
                    alpha=0.15,
                    color=style["color"],
                )
        if key == "fid":
            real = results["floors"].get("train_vs_test", {}).get("fid")
            if real is not None:
                ax.axhline(real, ls="--", lw=1, color="grey", label="real images")
            recon = floors.get((setting, K), {}).get("fid")
            if recon is not None:
                ax.axhline(recon, ls=":", lw=1, color="grey", label="reconstructions")
        ax.set_title(f"{setting}, K={K:,}, {family.replace('_', ' ')}", fontsize=10)
        ax.set_xlabel("generator step")
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"mean over seeds with {confidence:.0%} t-interval bands", fontsize=10)
    fig.tight_layout()
    path = _save_figure(fig, out / "plots" / f"{key}_vs_step.png")
    plt.close(fig)
    return path


def plot_differences(results: dict, out: Path) -> Path:
    """Forest plot: each arm's paired final-FID difference to CE (and the controls), with its interval."""
    plt = _plt()
    rows = []
    for g in results["analysis"]:
        for arm, c in g.get("vs_ce", {}).items():
            if "final_fid" in c:
                rows.append((f"{_where(g)}: {arm_label(arm)} - CE", c["final_fid"]))
        for c in g["contrasts"]:
            if "final_fid" in c:
                rows.append(
                    (
                        f"{_where(g)}: {arm_label(c['arm'])} - {arm_label(c['baseline'])}",
                        c["final_fid"],
                    )
                )
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.2))
    for i, (_, d) in enumerate(reversed(rows)):
        colour = {"win": "tab:green", "loss": "tab:red"}.get(d["verdict"], "tab:grey")
        if d["n"] >= 2:
            ax.plot([d["lo"], d["hi"]], [i, i], color=colour, lw=2)
        ax.plot([d["mean"]], [i], "o", color=colour, ms=4)
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(range(len(rows)), [name for name, _ in reversed(rows)], fontsize=7)
    ax.set_xlabel("paired difference in final FID (negative: the first arm is better)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = _save_figure(fig, out / "plots" / "paired_differences.png")
    plt.close(fig)
    return path


def sample_grids(results: dict, out: Path, real: torch.Tensor) -> list[Path]:
    """Per (setting, K, family): real test images, then the final samples of seed 0 of each arm."""
    plt = _plt()
    runs = results["runs"]
    first_seed = min(results["config"]["seeds"])
    real_grid = image_grid(real, nrow=10)
    paths = []
    for setting, K, family in sorted({(r["setting"], r["K"], r["family"]) for r in runs}):
        group = sorted(
            (r for r in runs if (r["setting"], r["K"], r["family"]) == (setting, K, family)
             and r["seed"] == first_seed),
            key=lambda r: arm_sort_key(r["arm"]),
        )  # fmt: skip
        panels = [("real test images", real_grid)]
        for r in group:
            path = (
                out
                / "runs"
                / f"{setting}-k{K}"
                / family
                / r["arm"]
                / f"seed{first_seed}"
                / "samples.png"
            )
            if path.is_file():
                last = r["evals"][-1]
                title = f"{arm_label(r['arm'])}\nFID {last['fid']:.3g} @ step {last['step']}"
                panels.append((title, np.asarray(Image.open(path))))
        h, w = real_grid.shape[:2]
        fig, axes = plt.subplots(
            1, len(panels), figsize=(3.0 * len(panels), 3.0 * h / w + 1.0), squeeze=False
        )
        for ax, (title, img) in zip(axes[0], panels, strict=True):
            ax.imshow(img, interpolation="nearest", cmap="gray")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        fig.suptitle(
            f"{setting}, K={K:,}, {family}: final samples of seed {first_seed} (classes 0, 1, ... along rows)",
            fontsize=10,
        )
        fig.tight_layout()
        paths.append(_save_figure(fig, out / "plots" / f"samples_{setting}_k{K}_{family}.png"))
        plt.close(fig)
    return paths


def _save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def write_report(results: dict, out: Path, real: torch.Tensor) -> None:
    """Add the analysis to ``results`` and write results.json, the figures and report.md (atomically)."""
    from snce.config import atomic_write_text

    results["analysis"] = analyse(results["runs"], results["config"]["eval"]["confidence"])
    write_json(out / "results.json", results)
    figures = [plot_curves(results, out), plot_differences(results, out)]
    if any("class_acc" in e for r in results["runs"] for e in r["evals"]):
        figures.append(plot_curves(results, out, "class_acc", "class consistency"))
    figures += sample_grids(results, out, real)
    atomic_write_text(out / "report.md", render_report(results, figures, out))
