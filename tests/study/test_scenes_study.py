"""The scenes study (CE vs SNCE on text-to-image and editing): its config and, slow, a tiny run end to end."""

import json

import pytest
import yaml

from snce.cli import main
from snce.config import ConfigError, load_config
from snce.study.scenes import SceneStudyConfig


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"arms": ["snce"]}, "arms"),
        ({"arms": ["ce", "focal"]}, "arms"),
        ({"arms": ["ce", "snce", "snce"]}, "arms"),
        ({"arms": ["ce", "snce_latents"]}, "arms"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"seeds": [1, 1]}, "seeds"),
    ],
)
def test_bad_scene_study_configs_stop_naming_the_key(changes, key):
    with pytest.raises(ConfigError, match=key):
        SceneStudyConfig.from_dict(changes).check()


@pytest.mark.parametrize("name", ["scenes_t2i", "scenes_edit"])
def test_shipped_scene_study_configs_load(name):
    cfg = load_config(SceneStudyConfig, f"configs/study/{name}.yaml")
    cfg.check()
    assert cfg.task == name.removeprefix("scenes_") and cfg.arms[0] == "ce" and len(cfg.seeds) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_a_tiny_scene_study_runs_and_reports(tmp_path, task, capsys):
    config = yaml.safe_load(open("configs/study/scenes_t2i.yaml"))
    config.update(task=task, out_dir=str(tmp_path / "out"), seeds=[0, 1], train_samples=128,
                  test_samples=12)  # fmt: skip
    config["tokenizer"]["train"].update(steps=5, warmup_steps=1)
    config["generator"]["train"].update(steps=4, batch_size=8, warmup_steps=1, ckpt_every=4)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(config))
    assert main(["study", "--config", str(tmp_path / "s.yaml")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    key = "accuracy" if task == "t2i" else "edit_success"
    arms = results["analysis"]["arms"]
    assert set(arms) == {"ce", "ls", "snce", "snce_shuffled"}
    assert len(arms["ce"][key]["values"]) == 2 and "fid" in arms["snce"]
    pairs = {(c["arm"], c["reference"]) for c in results["analysis"]["comparisons"]}
    assert (
        ("snce", "ce") in pairs and ("snce", "snce_shuffled") in pairs and ("snce", "ls") in pairs
    )
    shuffled = json.loads(
        (tmp_path / "out" / "runs" / "snce_shuffled-seed1" / "spec.json").read_text()
    )
    loss = shuffled["loss"]
    assert loss["kind"] == "snce" and loss["shuffle_neighbors"] and loss["shuffle_seed"] == 1
    floors = results["baselines"]
    assert floors["tokenizer reconstructions of the real answer (CE's target)"][key] >= 0
    assert {f"{arm}'s target floor" for arm in ("ls", "snce", "snce_shuffled")} <= set(floors)
    for name in ("scores.png", "samples.png"):
        assert (tmp_path / "out" / "plots" / name).is_file()
    assert "snce vs snce_shuffled" in (tmp_path / "out" / "report.md").read_text()
    # a rerun reuses the finished runs; other generator settings, or other data, are refused
    assert main(["study", "--config", str(tmp_path / "s.yaml")]) == 0
    (tmp_path / "out" / "runs" / "ce-seed0" / "score.json").unlink()  # as if stopped before scoring
    for change, differing in (("generator", "train.lr"), ("data", "train_samples")):
        changed = yaml.safe_load(yaml.safe_dump(config))
        if change == "generator":
            changed["generator"]["train"]["lr"] = 1e-3
        else:
            changed["train_samples"] = 64
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(changed))
        assert main(["study", "--config", str(tmp_path / "s.yaml")]) == 2
        err = capsys.readouterr().err
        assert "other settings" in err and differing in err


def test_analysis_pairs_by_seed_and_reads_each_score_the_right_way():
    from snce.study.scenes import analyse, comparisons

    cfg = SceneStudyConfig(task="t2i", seeds=[0, 1, 2], arms=["ce", "snce", "snce_shuffled"])
    base = {"accuracy": 0.5, "held_out_accuracy": 0.4, "exact": 0.1, "fid": 100.0}
    runs = {}
    for s, noise in zip(
        cfg.seeds, (0.0, 0.03, -0.02), strict=True
    ):  # seed effects shared by the arms
        runs[f"ce/{s}"] = {k: v + noise for k, v in base.items()}
        # snce: higher accuracy (better) and higher FID (worse) on every seed; shuffled: CE's values
        runs[f"snce/{s}"] = {
            **runs[f"ce/{s}"],
            "accuracy": 0.6 + noise + 0.001 * s,
            "fid": 120.0 + noise,
        }
        runs[f"snce_shuffled/{s}"] = dict(runs[f"ce/{s}"])
    assert comparisons(cfg.arms) == [
        ("snce", "ce"),
        ("snce_shuffled", "ce"),
        ("snce", "snce_shuffled"),
    ]
    result = analyse(cfg, runs)
    got = {(c["arm"], c["reference"], c["score"]): c for c in result["comparisons"]}
    win = got["snce", "ce", "accuracy"]
    assert win["verdict"] == "win" and win["mean"] == pytest.approx(0.101) and win["lo"] > 0
    assert got["snce", "ce", "fid"]["verdict"] == "loss"  # lower is better for FID
    assert got["snce", "ce", "fid"]["mean"] == pytest.approx(20.0)
    assert got["snce_shuffled", "ce", "exact"]["verdict"] == "no difference shown"
    assert got["snce", "snce_shuffled", "accuracy"]["verdict"] == "win"
    assert result["arms"]["ce"]["accuracy"]["values"] == [0.5, 0.53, 0.48]
