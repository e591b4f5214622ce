"""Study bookkeeping: the analysis on hand-made runs, config layering and checks, refusing to reuse results
made with other settings."""

import math
from pathlib import Path

import pytest
import torch

from snce.config import ConfigError
from snce.study import SettingsChanged, StudyConfig, analyse, load_study_config
from snce.study.config import arm_tau_scale
from snce.study.report import verdict_paragraph
from snce.study.run import arm_loss, check_spec, class_sweep, plan_runs, study_loss


def _run(arm, seed, fids, val_fid=None, setting="vq", K=256, family="autoregressive", tau=0.1):
    steps = [10 * (i + 1) for i in range(len(fids))]
    evals = [
        {"step": s, "fid": f, "nll": f / 10, "class_acc": 1 - f / 100}
        for s, f in zip(steps, fids, strict=True)
    ]
    if val_fid is not None:
        evals[-1]["val_fid"] = val_fid
    loss = {"kind": "ce"} if arm == "ce" else {"kind": "snce", "tau": tau}
    return {"setting": setting, "K": K, "family": family, "arm": arm, "seed": seed, "loss": loss,
            "evals": evals}  # fmt: skip


def test_analysis_pairs_by_seed_and_words_follow_the_intervals():
    ce = {0: [50, 40, 30], 1: [60, 50, 40], 2: [40, 30, 20]}
    runs = [_run("ce", s, f) for s, f in ce.items()]
    # SNCE: exactly 5 below CE at every evaluation of every seed -> paired interval is a point: a win
    # (the seed-to-seed spread of 10 would hide it in an unpaired comparison).
    runs += [_run("snce", s, [v - 5 for v in f]) for s, f in ce.items()]
    # shuffled: -1, +1, 0 at the end: interval straddles zero.
    runs += [
        _run("snce_shuffled", s, f[:-1] + [f[-1] + d])
        for (s, f), d in zip(ce.items(), (-1, 1, 0), strict=True)
    ]
    (group,) = analyse(runs)
    d = group["vs_ce"]["snce"]["final_fid"]
    assert (d["mean"], d["lo"], d["hi"], d["verdict"]) == (-5.0, -5.0, -5.0, "win")
    assert group["vs_ce"]["snce"]["auc_fid"]["verdict"] == "win"
    assert group["vs_ce"]["snce"]["class_acc"]["verdict"] == "win"  # higher is better
    shuffled = group["vs_ce"]["snce_shuffled"]["final_fid"]
    assert shuffled["mean"] == pytest.approx(0.0) and shuffled["verdict"] == "no difference shown"
    (geometry,) = [c for c in group["contrasts"] if c["baseline"] == "snce_shuffled"]
    assert geometry["final_fid"]["mean"] == pytest.approx(-5.0)
    # First reach: CE's best of seed 0 is 30 at step 30; SNCE (45, 35, 25) reaches 30 at step 25.
    conv = group["convergence"]["ce_best"]
    assert conv["ce"]["steps"][0] == 30.0 and conv["snce"]["steps"][0] == pytest.approx(25.0)
    # Seeds 1, 2 likewise (CE best at step 30, SNCE 5 lower everywhere: 25): ratio 25/30 in every seed.
    assert conv["snce"]["ce_steps"] == [30.0, 30.0, 30.0]
    assert conv["snce"]["fraction"]["mean"] == pytest.approx(25 / 30)
    assert conv["snce_shuffled"]["reached"] == 2 and "fraction" not in conv["snce_shuffled"]
    text = verdict_paragraph([group])
    assert "SNCE vs CE, final FID -5 [-5, -5]: SNCE better (win)" in text
    assert "vs SNCE, shuffled neighbours" in text


def test_one_seed_gives_numbers_but_no_verdict():
    runs = [_run("ce", 0, [50, 40]), _run("snce", 0, [30, 20])]
    (group,) = analyse(runs)
    d = group["vs_ce"]["snce"]["final_fid"]
    assert d["mean"] == -20 and math.isnan(d["lo"]) and d["verdict"] == "no difference shown"


def test_tau_is_selected_on_the_val_split_not_on_the_reported_metric():
    runs = [_run("ce", s, [50, 40]) for s in (0, 1)]
    # tau 0.5x has the better *test* FID, tau 2x the better *val* FID: the val FID decides.
    runs += [_run("snce_tau0.5x", s, [30, 20], val_fid=45) for s in (0, 1)]
    runs += [_run("snce", s, [30, 25], val_fid=40) for s in (0, 1)]
    runs += [_run("snce_tau2x", s, [30, 30], val_fid=35) for s in (0, 1)]
    (group,) = analyse(runs)
    sel = group["tau_selection"]
    assert sel["selected"] == "snce_tau2x" and sel["tau_scale"] == 2.0
    assert sel["candidates"] == {"snce": 40, "snce_tau0.5x": 45, "snce_tau2x": 35}


def test_arm_names_and_losses():
    assert arm_tau_scale("snce") == 1.0 and arm_tau_scale("snce_tau0.25x") == 0.25
    assert arm_tau_scale("ls") is None and arm_tau_scale("snce_shuffled") is None
    cfg = StudyConfig()
    info = {"tau": 0.2, "tau_latents": 0.05, "matched_smoothing": 0.37}
    assert arm_loss("ls", info, 0, **study_loss(cfg)).label_smoothing == 0.1
    assert arm_loss("ls_matched", info, 0, **study_loss(cfg)).label_smoothing == 0.37
    assert arm_loss("snce_tau0.5x", info, 0, **study_loss(cfg)).tau == pytest.approx(0.1)
    shuffled = arm_loss("snce_shuffled", info, 3, **study_loss(cfg))
    assert shuffled.shuffle_neighbors and shuffled.shuffle_seed == 3 and shuffled.tau == 0.2
    latents = arm_loss("snce_latents", info, 0, **study_loss(cfg))
    assert (latents.targets, latents.tau) == ("latents", 0.05)


def test_plan_covers_every_setting_family_arm_and_seed(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "seeds: [0, 1, 2]\n"
        "loss: {arms: [ce, ls, snce]}\n"
        "settings:\n"
        "  - {name: vq, codebook_sizes: [64, 256], families: [autoregressive]}\n"
        "  - {name: ibq, quantizer: {kind: ibq}, codebook_sizes: [256], families: [masked_diffusion],"
        " arms: [ce, snce]}\n"
    )
    keys = plan_runs(load_study_config(path))
    assert len(keys) == 2 * 3 * 3 + 1 * 2 * 3 == len(set(keys))
    assert {(k.setting, k.arm) for k in keys if k.setting == "ibq"} == {
        ("ibq", "ce"),
        ("ibq", "snce"),
    }


def test_quick_overrides_then_set(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "seeds: [0, 1, 2, 3, 4]\nquick:\n  seeds: [0, 1]\n  generator.train.steps: 7\n  eval.every: 7\n  out_dir: q\n"
    )
    full = load_study_config(path)
    assert full.seeds == (0, 1, 2, 3, 4) and full.out_dir == StudyConfig().out_dir
    quick = load_study_config(path, ["generator.train.steps=9"], quick=True)
    assert quick.seeds == (0, 1) and quick.out_dir == "q" and quick.generator.train.steps == 9


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "s.yaml"
    for text, key in [
        ("settings:\n  - {families: [autoregressive, gan]}\n", "settings.families"),
        ("loss:\n  arms: [ls, snce]\n", "loss.arms"),  # no CE to compare with
        ("loss:\n  arms: [ce, snce_tau0x]\n", "loss.arms"),
        ("loss:\n  arms: [ce, focal]\n", "loss.arms"),
        ("seeds: [1, 1]\n", "seeds"),
        (
            "settings:\n  - {name: a}\n  - {name: a, quantizer: {kind: ibq}}\n",
            "settings",
        ),  # one name, two kinds
        (
            "settings:\n  - {name: a}\n  - {name: a, families: [autoregressive]}\n",
            "settings",
        ),  # a run twice
        ("quick:\n  eval.num_sample: 3\n", "eval.num_sample"),
        ("eval:\n  bootstrap: 1\n", "eval.bootstrap"),
        ("loss:\n  arms: [ce, snce_tau1x]\n", "loss.arms"),  # that is 'snce'
        ("data: {name: photos}\n", "tokenizer.model.in_channels"),  # RGB images, a grey tokenizer
        ("data: {size: 18}\n", "data.size"),  # not a multiple of the tokenizer's downsampling
        (
            "tokenizer: {model: {in_channels: 1, quantizer: {kind: vq, metric: manhattan}}}\n",
            "tokenizer.model.quantizer",
        ),
        ("settings:\n  - {name: i, quantizer: {kind: ibq, codebook_sizee: 9}}\n", "settings"),
        ("eval: {every: 500}\ngenerator: {train: {steps: 400}}\n", "eval.every"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_study_config(path, quick=True)


def test_config_errors_survive_a_worker_process():
    import pickle

    error = pickle.loads(pickle.dumps(ConfigError("eval.every", "must be >= 1")))
    assert (
        isinstance(error, ConfigError)
        and error.key == "eval.every"
        and "must be >= 1" in str(error)
    )


def test_results_made_with_other_settings_are_never_reused(tmp_path):
    check_spec(tmp_path, {"steps": 10, "lr": 1e-3})
    check_spec(tmp_path, {"steps": 10, "lr": 1e-3})  # same settings: fine
    with pytest.raises(SettingsChanged, match="differences in: steps"):
        check_spec(tmp_path, {"steps": 20, "lr": 1e-3})


def test_results_survive_settings_added_since_at_their_defaults(tmp_path):
    defaults = {"train": {"steps": 1, "clip": None}, "model": {"dim": 8}}
    check_spec(tmp_path, {"train": {"steps": 10}, "model": {"dim": 16}}, defaults)
    # snce gained train.clip since; a run at its default is the same run, another value is not
    check_spec(tmp_path, {"train": {"steps": 10, "clip": None}, "model": {"dim": 16}}, defaults)
    with pytest.raises(SettingsChanged, match=r"differences in: train\.clip\)"):
        check_spec(tmp_path, {"train": {"steps": 10, "clip": 1.0}, "model": {"dim": 16}}, defaults)
    with pytest.raises(SettingsChanged, match=r"differences in: model\.dim, train\.clip"):
        check_spec(tmp_path, {"train": {"steps": 10, "clip": 1.0}, "model": {"dim": 8}}, defaults)


STUDY_CONFIGS = sorted(  # the class-conditional protocol's configs (scenes_*.yaml: tests/study/test_scenes_study.py)
    p for p in (Path(__file__).parents[2] / "configs" / "study").glob("*.yaml")
    if not p.stem.startswith("scenes")
)  # fmt: skip


@pytest.mark.parametrize("path", STUDY_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("quick", [False, True])
def test_shipped_study_configs_load_and_keep_the_protocol(path, quick):
    overrides = ["data.path=."] if "folder" in path.stem else []
    cfg = load_study_config(path, overrides, quick=quick)
    assert cfg.generator.train.schedule == "constant"  # checkpoints do not depend on the budget
    assert cfg.eval.every * 8 <= cfg.generator.train.steps or quick  # >= 8 evaluations per run
    if not quick:
        assert len(cfg.seeds) >= 3 and cfg.eval.num_samples >= 2000
        for s in cfg.settings:
            assert {"ce", "ls", "snce", "snce_shuffled"} <= set(cfg.arms(s))


def test_demo_and_full_configs_meet_the_issue():
    demo = load_study_config(STUDY_CONFIGS[0].parent / "mnist.yaml")
    assert len(demo.seeds) >= 3 and len({K for s in demo.settings for K in s.codebook_sizes}) >= 2
    full = load_study_config(STUDY_CONFIGS[0].parent / "mnist_full.yaml")
    assert len(full.seeds) >= 5 and max(K for s in full.settings for K in s.codebook_sizes) == 16384
    big = [s for s in full.settings if 16384 in s.codebook_sizes]
    assert set(full.arms(big[0])) >= {
        "ce",
        "ls",
        "ls_matched",
        "snce",
        "snce_shuffled",
        "snce_latents",
    }
    assert {s.quantizer_config(full.tokenizer.model.quantizer)["kind"] for s in full.settings} >= {
        "vq",
        "ibq",
    }


class _Labelled(torch.utils.data.Dataset):
    """Images whose single pixel value is their index; labels sorted by class (as a class-per-folder split)."""

    def __init__(self, labels, num_classes):
        self.labels, self.num_classes = labels, num_classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.full((1, 1, 1), float(i)), self.labels[i]


def test_real_image_panel_sweeps_the_classes_like_the_samples():
    """Item i of the real panel is of class i % C, as the generated samples are; class 2 has no image."""
    labels = [0] * 30 + [1] * 3 + [3] * 2  # sorted by class, as a folder's test split is
    got = class_sweep(_Labelled(labels, 4), 10).flatten().tolist()
    # index of: class 0 #0, class 1 #0, class 2 (none), class 3 #0, class 0 #1, 1 #1, -, 3 #1, 0 #2, 1 #2
    assert got == [0, 30, -1, 33, 1, 31, -1, 34, 2, 32]


def test_verdict_flags_groups_on_a_collapsed_tokenizer():
    """A tokenizer using under 1% of its codes on the test split: its groups are marked as no evidence."""
    runs = [_run("ce", s, [50, 40]) for s in (0, 1)] + [_run("snce", s, [45, 35]) for s in (0, 1)]
    (group,) = analyse(runs)
    tokenizer = {"setting": group["setting"], "K": group["K"], "test": {"perplexity": 16.0}}
    healthy = verdict_paragraph(
        [group], [{**tokenizer, "test": {"usage": 0.5, "perplexity": 500.0}}]
    )
    collapsed = verdict_paragraph(
        [group], [{**tokenizer, "test": {"usage": 0.004, "perplexity": 16.0}}]
    )
    assert "collapsed" not in healthy and "SNCE vs CE, final FID" in healthy
    assert (
        "its tokenizer collapsed: 0.40% of the" in collapsed
        and "not evidence about SNCE" in collapsed
    )
    assert "SNCE vs CE, final FID" in collapsed  # the numbers stay, with the warning before them


def test_a_setting_may_choose_its_own_code_dimension():
    """settings[].model overrides tokenizer.model (not its quantizer) for that setting's tokenizers only."""
    base = {
        "tokenizer": {"model": {"in_channels": 1, "latent_channels": 8}},
        "settings": [
            {"name": "vq", "codebook_sizes": [64], "families": ["autoregressive"]},
            {"name": "ibq", "quantizer": {"kind": "ibq"}, "model": {"latent_channels": 32},
             "codebook_sizes": [64], "families": ["autoregressive"]},
        ],
    }  # fmt: skip
    cfg = StudyConfig.from_dict(base)
    vq, ibq = cfg.settings
    assert cfg.tokenizer_run(vq, 64).model.latent_channels == 8
    run = cfg.tokenizer_run(ibq, 64)
    assert run.model.latent_channels == 32 and run.model.quantizer == {
        "kind": "ibq",
        "codebook_size": 64,
    }
    bad = {**base, "settings": [{**base["settings"][1], "model": {"quantizer": {"kind": "vq"}}}]}
    with pytest.raises(ConfigError, match="settings.*model.*unknown key 'quantizer'"):
        StudyConfig.from_dict(bad)
    clash = {
        **base,
        "settings": [base["settings"][1], {**base["settings"][1], "model": {}, "arms": ["ce"]}],
    }
    with pytest.raises(ConfigError, match="different tokenizers"):
        StudyConfig.from_dict(clash)
