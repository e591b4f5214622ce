"""Text-to-image and editing data from files: images named by a JSON-lines file.

Two layouts, each one JSON object per line (blank lines are ignored)::

    captions   {"image": "cats/001.png", "text": "a cat asleep on a red sofa"}
    edits      {"source": "a/001.png", "instruction": "make the sofa blue", "target": "b/001.png"}

Relative image paths are read from ``root`` (``data.path``; by default the folder that holds the file).
:class:`CaptionedImages` yields ``(image, text)`` and :class:`ImageEdits` yields ``dict(source, instruction,
target)``, the item layouts of :class:`snce.data.scenes.SceneCaptions` / ``SceneEdits``, so ``snce tokenize
--text-encoder ...`` turns either into text or editing shards. Images (3, H, W) float32 in [-1, 1] are
centre-cropped to a square and resized to ``size`` like :class:`snce.data.images.ImageFolder`.

Splits follow the file's line order as for folders (of every ``TEST_EVERY`` records the last is a test
record and the one before a val record). The whole file is checked when the dataset is built: a malformed
line, a missing key or a missing image file is an error naming the line; an image whose header cannot be
read is reported in one warning and its record skipped; an image that fails to decode later (a truncated
file) is reported once and its item replaced by the next readable one, as in ``ImageFolder``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from snce.data.images import _check_split, _held_out, _verifies, load_image, read_or_next

CAPTION_KEYS = {"image": "image", "text": "text"}  # JSON key -> what it holds
EDIT_KEYS = {"source": "image", "instruction": "text", "target": "image"}


def read_records(
    file: str | os.PathLike, keys: dict[str, str], root: str | os.PathLike | None = None
) -> list[dict]:
    """The records of a JSON-lines ``file`` (UTF-8) with ``keys`` (key -> ``"image"`` or ``"text"``); image
    values become Paths (relative ones joined to ``root``, default the file's folder). Raises ValueError naming
    the first bad lines (not JSON, not an object, a key missing, an empty text) and FileNotFoundError naming
    the missing images."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist (expected a JSON-lines file)")
    root = Path(root) if root is not None else file.parent
    expected = (
        "{"
        + ", ".join(f'"{k}": {"PATH" if v == "image" else "TEXT"}' for k, v in keys.items())
        + "}"
    )
    records, errors, missing = [], [], []
    # split on newlines only: str.splitlines would also split inside strings at U+2028 and the like
    for number, line in enumerate(file.read_text(encoding="utf-8-sig").split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"line {number}: not JSON ({e.msg})")
            continue
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in keys):
            errors.append(f"line {number}: expected {expected}, got {line.strip()[:120]}")
            continue
        if any(kind == "text" and not record[k].strip() for k, kind in keys.items()):
            errors.append(f"line {number}: empty text")
            continue
        for key, kind in keys.items():
            if kind == "image":
                path = root / record[key]
                record[key] = path
                if not path.is_file():
                    missing.append(f"line {number}: {path}")
        records.append({k: record[k] for k in keys})
    if errors:
        raise ValueError(
            f"{file}: {len(errors)} bad line(s): "
            + "; ".join(errors[:5])
            + (" ..." if len(errors) > 5 else "")
        )
    if missing:
        raise FileNotFoundError(
            f"{file}: {len(missing)} image(s) not found: " + "; ".join(missing[:5])
            + (" ..." if len(missing) > 5 else "")
        )  # fmt: skip
    if not records:
        raise ValueError(f"{file} holds no records (expected lines like {expected})")
    return records


class _Records(Dataset):
    """The records of a JSON-lines file (with readable images) in ``split``; see the module docstring."""

    keys: dict[str, str]

    def __init__(
        self,
        file: str | os.PathLike,
        size: int = 32,
        *,
        root: str | os.PathLike | None = None,
        split: str = "all",
        channels: int = 3,
    ):
        self.file = Path(file)
        records = read_records(file, self.keys, root)
        images = [k for k, kind in self.keys.items() if kind == "image"]
        bad = {r[k] for r in records for k in images if not _verifies(r[k])}
        if bad:
            names = ", ".join(str(p) for p in sorted(bad)[:10]) + (" ..." if len(bad) > 10 else "")
            warnings.warn(
                f"skipping the records of {len(bad)} unreadable image file(s) in {file}: {names}",
                stacklevel=2,
            )
            records = [r for r in records if not any(r[k] in bad for k in images)]
            if not records:
                raise ValueError(f"none of the images named in {file} can be decoded")
        self.records = [records[i] for i in _held_out(len(records), _check_split(split))]
        self.size, self.channels = size, channels
        self.num_classes, self.class_names = 0, []
        self._reported: set[int] = set()  # positions of the records already warned about

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        return read_or_next(
            self.records, i, self.item, self._reported, lambda _: f"a record of {self.file}"
        )

    def image(self, path: Path) -> torch.Tensor:
        return load_image(path, self.size, self.channels)


class CaptionedImages(_Records):
    """``(image (C, H, W) in [-1, 1], text)`` per line ``{"image": PATH, "text": TEXT}``."""

    keys = CAPTION_KEYS

    def item(self, record: dict) -> tuple[torch.Tensor, str]:
        return self.image(record["image"]), record["text"]


class ImageEdits(_Records):
    """``dict(source, instruction, target)`` per line ``{"source": PATH, "instruction": TEXT, "target":
    PATH}``; source and target (C, H, W) in [-1, 1]."""

    keys = EDIT_KEYS

    def item(self, record: dict) -> dict:
        return {
            "source": self.image(record["source"]),
            "instruction": record["instruction"],
            "target": self.image(record["target"]),
        }
