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
def test_a_tiny_scene_study_runs_and_reports(tmp_path, task):
    config = yaml.safe_load(open("configs/study/scenes_t2i.yaml"))
    config.update(task=task, out_dir=str(tmp_path / "out"), seeds=[0, 1], train_samples=128,
                  test_samples=12)  # fmt: skip
    config["tokenizer"]["train"].update(steps=5, warmup_steps=1)
    config["generator"]["train"].update(steps=4, batch_size=8, warmup_steps=1, ckpt_every=4)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(config))
    assert main(["study", "--config", str(tmp_path / "s.yaml")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    key = "accuracy" if task == "t2i" else "edit_success"
    assert set(results["analysis"]) == {"ce", "snce"}
    assert "vs_ce" in results["analysis"]["snce"][key]
    assert len(results["analysis"]["ce"][key]["values"]) == 2
    assert (tmp_path / "out" / "plots" / f"{key}.png").is_file()
    assert (tmp_path / "out" / "plots" / "samples_snce.png").is_file()
