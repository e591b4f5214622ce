"""Study bookkeeping: headline arithmetic, config layering, refusing to reuse results made with other settings."""

import pytest

from snce.config import ConfigError
from snce.study import SettingsChanged, StudyConfig, headlines, load_study_config, steps_to_reach
from snce.study.report import verdict
from snce.study.run import check_spec


def _evals(pairs):
    return [{"step": s, "fid": f} for s, f in pairs]


def test_steps_to_reach_interpolates_between_evaluations():
    evals = _evals([(10, 50.0), (20, 30.0), (30, 10.0)])
    assert steps_to_reach(evals, 40.0) == pytest.approx(15.0)  # halfway from 50 to 30
    assert steps_to_reach(evals, 60.0) == 10.0  # already there at the first evaluation
    assert steps_to_reach(evals, 10.0) == 30.0
    assert steps_to_reach(evals, 5.0) is None


def _run(kind, fids, tau_scale=None, family="autoregressive", K=256):
    name = "ce" if kind == "ce" else f"snce_tau{tau_scale:g}x"
    return {
        "K": K, "family": family, "loss": name, "kind": kind, "tau_scale": tau_scale,
        "tau": None if kind == "ce" else 0.1 * tau_scale, "evals": _evals(fids),
    }  # fmt: skip


def test_headline_picks_the_best_tau_and_the_fraction_of_ce_steps():
    runs = [
        _run("ce", [(100, 40.0), (200, 20.0)]),
        _run(
            "snce", [(100, 20.0), (200, 12.0)], tau_scale=1.0
        ),  # reaches CE's final 20 at step 100
        _run("snce", [(100, 35.0), (200, 25.0)], tau_scale=2.0),
        _run("ce", [(100, 10.0), (200, 8.0)], family="masked_diffusion"),
        _run("snce", [(100, 12.0), (200, 9.0)], tau_scale=1.0, family="masked_diffusion"),
    ]
    ar, md = headlines(runs)
    assert (ar["family"], ar["best_tau_scale"], ar["snce_wins"]) == ("autoregressive", 1.0, True)
    assert ar["fraction_of_ce_steps"] == pytest.approx(0.5)
    assert ar["snce_fid"] == {"snce_tau1x": 12.0, "snce_tau2x": 25.0}
    assert (md["snce_wins"], md["fraction_of_ce_steps"]) == (False, None)
    text = verdict([ar, md])
    assert "1 of 2" in text and "did not in: masked_diffusion K=256" in text
    assert "after 50% of CE's steps (autoregressive K=256)" in text


def test_quick_overrides_then_set(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "codebook_sizes: [256, 1024, 4096]\n"
        "quick:\n  codebook_sizes: [16, 32]\n  generator.train.steps: 7\n  out_dir: q\n"
    )
    full = load_study_config(path)
    assert full.codebook_sizes == (256, 1024, 4096) and full.out_dir == StudyConfig().out_dir
    quick = load_study_config(path, ["generator.train.steps=9"], quick=True)
    assert (
        quick.codebook_sizes == (16, 32)
        and quick.out_dir == "q"
        and quick.generator.train.steps == 9
    )


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("generator:\n  families: [autoregressive, gan]\n")
    with pytest.raises(ConfigError, match="generator.families"):
        load_study_config(path)
    path.write_text("loss:\n  tau_scales: [0.0]\n")
    with pytest.raises(ConfigError, match="loss.tau_scales"):
        load_study_config(path)
    path.write_text("quick:\n  eval.num_sample: 3\n")
    with pytest.raises(ConfigError, match="eval.num_sample"):
        load_study_config(path, quick=True)


def test_results_made_with_other_settings_are_never_reused(tmp_path):
    check_spec(tmp_path, {"steps": 10, "lr": 1e-3})
    check_spec(tmp_path, {"steps": 10, "lr": 1e-3})  # same settings: fine
    with pytest.raises(SettingsChanged, match="differences in: steps"):
        check_spec(tmp_path, {"steps": 20, "lr": 1e-3})
