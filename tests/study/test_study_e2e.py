"""End to end: `snce study --quick` writes the report, the plots and a JSON with finite numbers for every
(K, loss, family, checkpoint); a second invocation reuses every finished run instead of retraining."""

import json
import math
from pathlib import Path

import pytest
import torch

from snce.cli import main
from snce.study import load_study_config

CONFIG = Path(__file__).parents[2] / "configs" / "study" / "digits.yaml"
METRICS = (
    "fid", "kid", "is", "precision", "recall", "class_acc", "nll", "soft_nll", "code_usage", "code_entropy_bits",
)  # fmt: skip


@pytest.fixture
def one_thread():
    """One intra-op thread: the test shares the CPU with other pytest workers (2-thread spinning is slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quick_study_end_to_end_and_resume(tmp_path, one_thread):
    out = tmp_path / "study"
    args = ["study", "--config", str(CONFIG), "--quick", "--set", f"out_dir={out}"]
    assert main(args) == 0

    cfg = load_study_config(CONFIG, [f"out_dir={out}"], quick=True)
    steps, every = cfg.generator.train.steps, cfg.eval.every
    eval_steps = sorted(set(range(every, steps + 1, every)) | {steps})
    losses = ["ce"] + [f"snce_tau{s:g}x" for s in cfg.loss.tau_scales]
    expected = {
        (K, f, n) for K in cfg.codebook_sizes for f in cfg.generator.families for n in losses
    }

    results = json.loads((out / "results.json").read_text())
    runs = {(r["K"], r["family"], r["loss"]): r for r in results["runs"]}
    assert set(runs) == expected
    for key, run in runs.items():
        assert [e["step"] for e in run["evals"]] == eval_steps, key
        for e in run["evals"]:
            for m in METRICS:
                assert math.isfinite(e[m]), (key, e["step"], m, e[m])
        if run["kind"] == "snce":
            assert run["tau"] > 0
    for K, t in results["tokenizers"].items():
        assert math.isfinite(t["psnr"]) and t["suggested_tau"] > 0, K
    assert len(results["headlines"]) == len(cfg.codebook_sizes) * len(cfg.generator.families)

    report = (out / "report.md").read_text()
    assert "## Headline" in report
    for K in cfg.codebook_sizes:
        for family in cfg.generator.families:
            assert f"| {K} | {family} |" in report
            assert (out / "plots" / f"samples_k{K}_{family}.png").stat().st_size > 0
    for name in ("fid", "nll", "soft_nll", "class_acc"):
        assert (out / "plots" / f"{name}_vs_step.png").stat().st_size > 0
    for line in report.splitlines():
        if line.startswith("!["):
            assert (out / line.split("(")[1].rstrip(")")).is_file(), line

    # An interrupted study picks up where it stopped: a run whose result was not written yet is completed from
    # its checkpoints and evaluations, every finished run is reused, and nothing is retrained.
    unfinished = out / "runs" / f"k{cfg.codebook_sizes[0]}" / cfg.generator.families[0] / "ce"
    (unfinished / "result.json").unlink()
    checkpoints = {p: p.stat().st_mtime_ns for p in out.glob("**/checkpoints/**/*") if p.is_file()}
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints
    strip = lambda runs: [{k: v for k, v in r.items() if k != "train_seconds"} for r in runs]  # noqa: E731
    assert strip(again["runs"]) == strip(results["runs"])
