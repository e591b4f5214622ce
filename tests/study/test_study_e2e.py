"""End to end: `snce study --quick` runs every arm on two tokenizers (l2 VQ and dot-product IBQ) with two
seeds, writes intervals for every comparison, the report, the plots and a JSON with finite numbers for every
(setting, K, family, arm, seed, checkpoint); a second invocation reuses every finished run instead of
retraining."""

import json
import math
from pathlib import Path

from snce.cli import main
from snce.study import load_study_config
from snce.study.config import FIXED_ARMS

CONFIG = Path(__file__).parents[2] / "configs" / "study" / "mnist.yaml"
CURVES = ("fid", "class_acc", "nll", "soft_nll", "code_usage")
FINAL = ("fid_lo", "fid_hi", "kid", "is", "precision", "recall", "val_fid")


def test_quick_study_end_to_end_and_resume(tmp_path):
    out = tmp_path / "study"
    args = ["study", "--config", str(CONFIG), "--quick", "--set", f"out_dir={out}"]
    assert main(args) == 0

    cfg = load_study_config(CONFIG, [f"out_dir={out}"], quick=True)
    steps, every = cfg.generator.train.steps, cfg.eval.every
    eval_steps = list(range(every, steps + 1, every))
    expected = {
        (s.name, K, f, arm, seed)
        for s in cfg.settings for K in s.codebook_sizes for f in s.families
        for arm in cfg.arms(s) for seed in cfg.seeds
    }  # fmt: skip
    assert {a for *_, a, _ in expected} >= set(FIXED_ARMS) | {
        "snce_tau0.5x"
    }  # every arm is exercised

    results = json.loads((out / "results.json").read_text())
    runs = {(r["setting"], r["K"], r["family"], r["arm"], r["seed"]): r for r in results["runs"]}
    assert set(runs) == expected
    for key, run in runs.items():
        assert [e["step"] for e in run["evals"]] == eval_steps, key
        for e in run["evals"]:  # every evaluation: what curves need; the last one: everything
            for m in CURVES if e is not run["evals"][-1] else CURVES + FINAL:
                assert math.isfinite(e[m]), (key, e["step"], m, e[m])
    shuffled = runs[("vq", 64, "autoregressive", "snce_shuffled", 1)]["loss"]
    assert shuffled["shuffle_neighbors"] and shuffled["shuffle_seed"] == 1

    # Every comparison with CE carries a paired interval (two seeds) and a verdict word.
    for group in results["analysis"]:
        for arm, comparison in group["vs_ce"].items():
            d = comparison["final_fid"]
            assert comparison["seeds"] == [0, 1] and d["n"] == 2, (group["setting"], arm)
            assert d["lo"] <= d["mean"] <= d["hi"] and d["verdict"] in (
                "win",
                "loss",
                "no difference shown",
            )
    tokenizers = {(t["setting"], t["K"]): t for t in results["tokenizers"]}
    assert tokenizers[("ibq", 32)]["metric"] == "dot" and tokenizers[("vq", 64)]["metric"] == "l2"
    for t in tokenizers.values():
        assert (
            t["tau"] > 0 and 0 <= t["matched_smoothing"] < 1 and t["health"]["duplicate_codes"] == 0
        )
        arms = {a for s in cfg.settings if s.name == t["setting"] for a in cfg.arms(s)}
        assert set(t["target_floors"]) == arms - {"ce"}  # every arm's target, decoded and measured
        assert all(math.isfinite(m["fid"]) for m in t["target_floors"].values())
    assert math.isfinite(results["floors"]["train_vs_test"]["fid"])

    report = (out / "report.md").read_text()
    for heading in ("## Verdict", "## Floors", "What each arm's target", "## Controls", "## Convergence",
                    "## Tau sweep"):  # fmt: skip
        assert heading in report
    assert "[" in report.split("## Verdict table")[1]  # intervals are printed
    for line in report.splitlines():
        if line.startswith("!["):
            assert (out / line.split("(")[1].rstrip(")")).is_file(), line
    assert (out / "plots" / "fid_vs_step.png").stat().st_size > 0
    assert (out / "plots" / "paired_differences.png").stat().st_size > 0

    # An interrupted study picks up where it stopped: a run whose result was not written yet is completed from
    # its checkpoints and evaluations, every finished run is reused, and nothing is retrained.
    unfinished = out / "runs" / "vq-k64" / "autoregressive" / "ce" / "seed0"
    (unfinished / "result.json").unlink()
    checkpoints = {p: p.stat().st_mtime_ns for p in out.glob("**/checkpoints/**/*") if p.is_file()}
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints
    strip = lambda runs: [{k: v for k, v in r.items() if k != "train_seconds"} for r in runs]  # noqa: E731
    assert strip(again["runs"]) == strip(results["runs"])
