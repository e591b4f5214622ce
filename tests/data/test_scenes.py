"""Built-in scenes: deterministic rendering, complete captions, held-out combinations, exact edits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from snce.data import DataConfig, build_dataset
from snce.data.scenes import (
    ATTRIBUTES,
    COLOURS,
    HELD_OUT,
    PHRASES,
    POSITIONS,
    SHAPES,
    VOCABULARY,
    Edit,
    Scene,
    SceneCaptions,
    SceneEdits,
    SceneObject,
    Scenes,
    apply_edit,
    caption,
    cell_mask,
    edit_between,
    instruction,
    labelled_sheet,
    parse_caption,
    render,
)

N = 200  # samples per split in the split checks


def _plain(scene: Scene) -> Scene:
    """The scene without offsets (what a caption can say)."""
    return Scene(tuple(SceneObject(o.shape, o.colour, o.size, o.position) for o in scene.objects))


def test_rendering_is_deterministic_and_in_range():
    scene = Scene(
        (
            SceneObject("circle", "red", "large", "left", (0.03, -0.05)),
            SceneObject("triangle", "blue", "small", "bottom right"),
        )
    )
    a, b = render(scene, 32), render(scene, 32)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3) and np.array_equal(a, b)
    assert render(scene, 17).shape == (17, 17, 3)
    # Each object shows its colour in its cell; the centre cell is pure background.
    assert a[16, 5, 0] > 200 and a[16, 5, 2] < 60  # red circle on the left
    assert np.ptp(a[11:21, 11:21].reshape(-1, 3), axis=0).max() == 0

    d1, d2 = (
        SceneCaptions(32, 50, seed=3, split="train"),
        SceneCaptions(32, 50, seed=3, split="train"),
    )
    for i in (17, 3, 42):  # any reading order gives the same samples
        x1, c1, a1 = d1[i]
        x2, c2, a2 = d2[i]
        assert torch.equal(x1, x2) and c1 == c2 and torch.equal(a1, a2)
    x, _, _ = d1[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() < x.max() <= 1
    other = SceneCaptions(32, 50, seed=4, split="train")
    assert sum(d1.caption(i) != other.caption(i) for i in range(50)) > 40
    e1, e2 = SceneEdits(32, 20, seed=1), SceneEdits(32, 20, seed=1)
    assert all(
        torch.equal(e1[i]["target"], e2[i]["target"]) and e1[i]["edit"] == e2[i]["edit"]
        for i in (5, 0, 19)
    )


def test_objects_stay_inside_their_cells():
    """At the largest offsets every shape and size leaves the pixels outside its cell as background."""
    for size in (32, 20):
        for shape in SHAPES:
            for big in ("small", "large"):
                for offset in ((0.06, 0.06), (-0.06, -0.06), (0.06, -0.06), (-0.06, 0.06)):
                    obj = SceneObject(shape, "yellow", big, "centre", offset)
                    img = render(Scene((obj,)), size)
                    outside = ~cell_mask(["centre"], size, margin=0).numpy()
                    assert np.array_equal(
                        img[outside], np.broadcast_to(img[0, 0], img[outside].shape)
                    )


def test_captions_mention_every_attribute_and_parse_back():
    data = SceneCaptions(32, N, split="test")
    words = set(VOCABULARY)
    for i in range(N):
        image, text, attributes = data[i]
        scene = data.scene(i)
        assert text == caption(scene)
        assert set(text.split()) <= words
        # every attribute of every object is named, in object order
        parts = text.split(" and ")
        assert len(parts) == len(scene.objects)
        for part, o in zip(parts, scene.objects, strict=True):
            assert part == f"a {o.size} {o.colour} {o.shape} {PHRASES[o.position]}"
        assert parse_caption(text) == _plain(scene)
        assert Scene.from_attributes(attributes) == _plain(scene)
        assert attributes.shape == (8,) and (attributes[4 * len(scene.objects) :] == -1).all()
    assert parse_caption("A large red circle in the center.") == Scene(
        (SceneObject("circle", "red", "large", "centre"),)
    )
    with pytest.raises(ValueError, match="cannot read 'a red circle'"):
        parse_caption("a red circle")


def test_splits_hold_out_the_combinations():
    def combos(scenes):
        return {(o.shape, o.colour) for s in scenes for o in s.objects}

    train, val, test = (SceneCaptions(32, N, split=s) for s in ("train", "val", "test"))
    train_scenes = [train.scene(i) for i in range(N)]
    assert not combos(train_scenes) & set(HELD_OUT)
    assert not combos(val.scene(i) for i in range(N)) & set(HELD_OUT)
    # every shape and every colour still occurs in training, and every regular combination
    regular = {(s, c) for s in SHAPES for c in COLOURS} - set(HELD_OUT)
    assert combos(train_scenes) == regular
    # test: even indices hold a held-out combination, odd ones do not; all three held-out pairs occur
    assert all(test.held_out(i) == (i % 2 == 0) for i in range(N))
    assert combos(test.scene(i) for i in range(0, N, 2)) >= set(HELD_OUT)
    # the splits are different draws (offsets are continuous: equal scenes would be the same draw)
    assert not set(train_scenes) & {val.scene(i) for i in range(N)}
    assert not set(train_scenes) & {test.scene(i) for i in range(N)}

    edits = {s: SceneEdits(32, N, split=s) for s in ("train", "val", "test")}
    for split in ("train", "val"):
        for i in range(N):
            source, _, target = edits[split].triple(i)
            assert not (source.held_out or target.held_out), (split, i)
    assert all(edits["test"].held_out(i) == (i % 2 == 0) for i in range(N))


def test_edits_change_exactly_the_named_attribute_of_the_named_object():
    data = SceneEdits(32, N, split="test")
    kinds = set()
    for i in range(N):
        item = data[i]
        source, edit, target = data.triple(i)
        assert item["edit"] == edit.to_dict() and edit_between(source, target) == edit
        assert apply_edit(source, edit) == target
        kinds.add(edit.kind)
        # only the named attribute of the named object differs; offsets are kept
        for j, (s, t) in enumerate(zip(source.objects, target.objects, strict=True)):
            for a in ATTRIBUTES:
                assert (s.value(a) != t.value(a)) == (j == edit.object and a == edit.attribute)
            assert s.offset == t.offset
        assert Scene.from_attributes(item["target_attributes"]) == _plain(target)
        # the pixels change only inside the edited object's cells (before and after)
        moved = source.objects[edit.object], target.objects[edit.object]
        outside = ~cell_mask([moved[0].position, moved[1].position], 32, margin=0)
        assert torch.equal(item["source"][:, outside], item["target"][:, outside])
        assert not torch.equal(item["source"], item["target"])
        # the instruction names the new value and picks out the object (one object fits its words)
        text = item["instruction"]
        assert text == instruction(source, edit) and set(text.split()) <= set(VOCABULARY)
        if edit.attribute != "position":
            assert text.endswith(edit.value)
        else:  # moves go one cell
            (r0, c0), (r1, c1) = moved[0].cell, moved[1].cell
            assert abs(r0 - r1) + abs(c0 - c1) == 1
            assert text.split()[-1] in ("left", "right", "up", "down")
    assert kinds == {"reshape", "recolour", "resize", "move"}


def test_object_references_are_unique():
    twins = Scene(
        (
            SceneObject("circle", "red", "small", "left"),
            SceneObject("circle", "red", "small", "right"),
            SceneObject("circle", "blue", "large", "top"),
        )
    )
    assert instruction(twins, Edit(0, "colour", "green")) == "make the circle on the left green"
    assert instruction(twins, Edit(2, "size", "small")) == "make the blue circle small"
    assert (
        instruction(twins, Edit(1, "shape", "square"))
        == "turn the circle on the right into a square"
    )
    assert (
        instruction(twins, Edit(0, "position", "bottom left")) == "move the circle on the left down"
    )
    assert (
        instruction(twins, Edit(0, "position", "bottom right"))
        == "move the circle on the left to the bottom right"
    )


def test_image_dataset_loaders_and_errors():
    cfg = DataConfig(name="scenes", size=32, num_samples=64)
    cfg.check()
    data = build_dataset(cfg, "val")
    assert isinstance(data, Scenes) and len(data) == 64 and data.num_classes == 12
    x, label = data[5]
    first = data.scene(5).objects[0]
    assert x.shape == (3, 32, 32) and data.class_names[label] == f"{first.colour} {first.shape}"
    assert data.text(5) == data.caption(5)
    # the same scenes with captions, and the editing triples, by name
    captions = build_dataset(DataConfig(name="scene_captions", size=32, num_samples=64), "val")
    assert isinstance(captions, SceneCaptions) and torch.equal(captions[5][0], x)
    edits = build_dataset(DataConfig(name="scene_edits", size=16, num_samples=8, seed=2), "test")
    assert isinstance(edits, SceneEdits) and edits.split == "test" and edits.seed == 2

    images, texts, attributes = next(iter(DataLoader(SceneCaptions(16, 8), batch_size=4)))
    assert images.shape == (4, 3, 16, 16) and len(texts) == 4 and attributes.shape == (4, 8)
    batch = next(iter(DataLoader(SceneEdits(16, 8, attributes=("colour",)), batch_size=4)))
    assert batch["source"].shape == batch["target"].shape == (4, 3, 16, 16)
    assert batch["edit"]["kind"] == ["recolour"] * 4 and len(batch["instruction"]) == 4

    with pytest.raises(ValueError, match="colour must be one of"):
        SceneObject("circle", "purple", "small", "left")
    with pytest.raises(ValueError, match="share a cell"):
        Scene((SceneObject("circle", "red", "small", "left"),) * 2)
    with pytest.raises(ValueError, match="exactly one attribute"):
        s = Scene((SceneObject("circle", "red", "small", "left"),))
        edit_between(s, s)
    with pytest.raises(ValueError, match="split"):
        SceneCaptions(32, 4, split="holdout")
    with pytest.raises(IndexError):
        SceneCaptions(32, 4)[4]


def test_labelled_sheet():
    data = SceneEdits(16, 3)
    rows = [[data[i]["source"], data[i]["target"]] for i in range(3)]
    sheet = labelled_sheet(rows, [data.instruction(i) for i in range(3)], headers=["a", "b"])
    assert sheet.mode == "RGB" and sheet.width > 2 * 16 * 4 and sheet.height > 3 * 16 * 4
    assert POSITIONS[4] == "centre"
