"""Scene metrics: the attribute classifier's held-out accuracy and cache, attribute accuracy of real renders vs
shuffled captions, edit scores of the true target vs the no-edit baseline."""

from __future__ import annotations

import time

import pytest
import torch

from snce.data.scenes import SceneCaptions, SceneEdits, caption
from snce.metrics.scenes import (
    attribute_accuracy,
    attribute_scores,
    edit_scores,
    load_or_train_attribute_classifier,
)

# The default classifier (400 steps of 128 cells from 3,000 renders: about 5 s on one core), checked as used.
TRAIN: dict = {}
N = 120


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    cache = tmp_path_factory.mktemp("scenes-cache")
    model, report = load_or_train_attribute_classifier(cache_dir=cache, progress=False, **TRAIN)
    return model, report, cache


def test_classifier_reaches_high_held_out_accuracy_and_is_cached(classifier):
    model, report, cache = classifier
    # Unseen real renders: in-distribution (val), test split, and the held-out combinations alone.
    assert report["val_accuracy"] >= 0.99 and report["test_accuracy"] >= 0.99, report
    assert report["held_out_accuracy"] >= 0.99 and report["val_exact"] >= 0.97, report
    files = list(cache.glob("scenes-attributes-32px-seed0-*.safetensors"))
    assert len(files) == 1
    start = time.perf_counter()
    again, report2 = load_or_train_attribute_classifier(cache_dir=cache, progress=False, **TRAIN)
    assert time.perf_counter() - start < 5 and report2 == report
    for (k, v), (k2, v2) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)


def test_attribute_accuracy_real_vs_shuffled_captions(classifier):
    model = classifier[0]
    data = SceneCaptions(32, N, split="test")
    images = torch.stack([data[i][0] for i in range(N)])
    scenes = [data.scene(i) for i in range(N)]
    real = attribute_scores(images, scenes, classifier=model)
    assert real["accuracy"] >= 0.99 and real["exact"] >= 0.97, real
    # captions, scenes and attribute tensors are the same conditions
    texts = [caption(s) for s in scenes]
    attributes = torch.stack([s.attributes() for s in scenes])
    assert attribute_accuracy(images, texts, classifier=model) == real["accuracy"]
    assert attribute_accuracy(images, attributes, classifier=model) == real["accuracy"]
    # each image scored against another image's caption: near chance (an object's cell is occupied about
    # 1 time in 6, and then shape, colour and size match 1/3, 1/4, 1/2 of the time: about 0.09)
    shuffled = attribute_scores(images, texts[1:] + texts[:1], classifier=model)
    assert shuffled["accuracy"] < 0.2 and shuffled["exact"] < 0.05, shuffled
    print(f"\nattribute accuracy: real {real['accuracy']:.3f}, shuffled {shuffled['accuracy']:.3f}")


def test_edit_scores_true_target_vs_no_edit_baseline(classifier):
    model = classifier[0]
    data = SceneEdits(32, N, split="test")
    items = [data[i] for i in range(N)]
    sources = torch.stack([it["source"] for it in items])
    targets = torch.stack([it["target"] for it in items])
    src_attr = torch.stack([it["source_attributes"] for it in items])
    tgt_attr = torch.stack([it["target_attributes"] for it in items])

    oracle = edit_scores(src_attr, tgt_attr, targets, source_images=sources, classifier=model)
    assert oracle["edit_success"] >= 0.97 and oracle["preservation"] >= 0.99, oracle
    assert oracle["pixel_change_outside"] == 0.0
    assert set(oracle["edit_success_by_kind"]) == {"reshape", "recolour", "resize", "move"}

    no_edit = edit_scores(src_attr, tgt_attr, sources, source_images=sources, classifier=model)
    assert no_edit["edit_success"] <= 0.05, no_edit
    # everything is preserved except, for moves, the moved object's shape, colour and size (read in its new
    # cell, which the source leaves empty)
    assert 0.7 <= no_edit["preservation"] < oracle["preservation"], no_edit
    not_moved = [i for i in range(N) if items[i]["edit"]["kind"] != "move"]
    kept = edit_scores(
        src_attr[not_moved], tgt_attr[not_moved], sources[not_moved], classifier=model
    )
    assert kept["preservation"] >= 0.99 and kept["edit_success"] <= 0.05, kept
    assert no_edit["pixel_change_outside"] == 0.0
    # scenes work as conditions, and the default source images are the renders of the source scenes
    triples = [data.triple(i) for i in range(N)]
    same = edit_scores([t[0] for t in triples], [t[2] for t in triples], targets, classifier=model)
    assert same["edit_success"] == oracle["edit_success"]

    # an edit that also repaints the rest of the image is caught outside the edited object
    noisy = (targets + 0.2 * torch.randn_like(targets)).clamp(-1, 1)
    assert edit_scores(src_attr, tgt_attr, noisy, classifier=model)["pixel_change_outside"] > 0.03
    print(
        f"\nedit success: true target {oracle['edit_success']:.3f}, no-edit {no_edit['edit_success']:.3f}; "
        f"preservation {oracle['preservation']:.3f} / {no_edit['preservation']:.3f}"
    )


def test_metric_argument_errors(classifier):
    model = classifier[0]
    data = SceneEdits(32, 4)
    x = torch.stack([data[i]["source"] for i in range(4)])
    attr = torch.stack([data[i]["source_attributes"] for i in range(4)])
    with pytest.raises(ValueError, match="3 conditions for 4 images"):
        attribute_accuracy(x, attr[:3], classifier=model)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        attribute_accuracy(x[:, :1], attr, classifier=model)
    with pytest.raises(ValueError, match="exactly one attribute"):
        edit_scores(attr, attr, x, classifier=model)


def test_scene_fid_is_the_frechet_distance_of_the_cell_logits(classifier):
    import numpy as np
    from scipy import linalg

    from snce.metrics.scenes import scene_fid

    model = classifier[0]
    real = torch.stack([SceneCaptions(32, 200, split="test")[i][0] for i in range(200)])
    other = torch.stack([SceneCaptions(32, 200, split="val")[i][0] for i in range(200)])
    blank = (
        real[:, :, :1, :1].expand_as(real).contiguous()
    )  # every pixel the top-left one: background

    def reference(a, b):  # the closed form, in float64 numpy, on the 90 logits per image
        with torch.no_grad():
            fa, fb = (torch.cat(model(x), -1).flatten(1).double().numpy() for x in (a, b))
        mu_a, mu_b = fa.mean(0), fb.mean(0)
        cov_a, cov_b = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
        root = linalg.sqrtm(cov_a @ cov_b).real
        return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))

    assert scene_fid(real, real, classifier=model) == pytest.approx(0, abs=1e-2)
    for fake in (other, blank):
        assert scene_fid(fake, real, classifier=model) == pytest.approx(
            reference(real, fake), rel=1e-3
        )
    # other real scenes are far closer to the test scenes than empty backgrounds are
    assert scene_fid(other, real, classifier=model) < 0.1 * scene_fid(blank, real, classifier=model)
