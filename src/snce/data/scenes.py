"""Built-in scenes with ground truth: procedurally rendered objects, compositional captions and editing triples.

The one place snce makes text-to-image and image-editing data whose every attribute is known, so that a
generator's samples can be checked against their condition (:mod:`snce.metrics.scenes`).

A :class:`Scene` holds 1 to ``max_objects`` (default 2) objects on a plain dark background, each with

=========  ==========================================================================================
attribute  values
=========  ==========================================================================================
shape      circle, square, triangle
colour     red, green, blue, yellow
size       small (radius 0.3 of a cell), large (radius 0.42 of a cell)
position   a cell of a 3 x 3 grid: top left, top, top right, left, centre, right, bottom left, ...
=========  ==========================================================================================

at most one object per cell, each nudged inside its cell by a small offset (up to ``JITTER`` of a cell, so an
object never leaves its cell). :func:`render` draws a scene at any size with numpy (4 x 4 supersampled edges):
the same scene always gives the same pixels. :func:`caption` describes every attribute of every object,
``"a large red circle on the left and a small blue square at the bottom"``; :func:`parse_caption` inverts it.

Datasets (images (3, H, W) float32 in [-1, 1], like :mod:`snce.data.images`; sample ``i`` is drawn from
``numpy.random.default_rng([seed, stream + i])`` and never depends on other samples):

- :class:`Scenes`: ``(image, label)`` with label = the first object's colour and shape (12 classes), so the
  scenes work wherever an image dataset does (``DataConfig(name="scenes")``, tokenizers, FID references).
- :class:`SceneCaptions`: ``(image, caption, attributes)``; ``attributes`` is a LongTensor (4 * max_objects,)
  of value indices (shape, colour, size, position per object in caption order, -1 for absent objects).
- :class:`SceneEdits`: ``dict(source, instruction, target, edit, source_attributes, target_attributes)``: one
  attribute of one object changed ("make the circle green", "make the triangle small", "turn the square into
  a circle", "move the square left" by one cell), everything else, offsets included, kept; ``edit`` is
  ``dict(kind, object, attribute, value)``.

Splits hold out attribute combinations. ``HELD_OUT`` lists three (shape, colour) pairs (green triangle, blue
square, yellow circle) that never occur in the training split, neither in a captioned scene nor in an edit's
source or target (every shape and every colour still occurs in training, with other partners):

- ``"train"`` and ``"val"``: only regular combinations (separate random streams; val is the in-distribution
  check);
- ``"test"``: even indices contain a held-out combination (in the scene; for edits in the source or the
  target), odd indices do not. :meth:`Scenes.held_out` says which.

Samples are drawn by rejection within their own random stream until they fit the split's rule.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from snce.data.images import STREAMS, _check_split, to_channels

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
GRID = 3  # the positions are the cells of a GRID x GRID grid, row-major from the top left
POSITIONS = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
# the order of an object's entries in attributes
ATTRIBUTES = ("shape", "colour", "size", "position")
VALUES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}
MAX_OBJECTS = 2
# (shape, colour) pairs absent from the training split
HELD_OUT = (("triangle", "green"), ("square", "blue"), ("circle", "yellow"))

RGB = {
    "red": (0.9, 0.15, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.85, 0.1),
}
BACKGROUND = (0.18, 0.18, 0.2)
# in cells; large + JITTER < 0.5 keeps every object in its cell
RADIUS = {"small": 0.3, "large": 0.42}
JITTER = 0.06  # largest offset of an object's centre from its cell's centre, in cells
SUPERSAMPLE = 4
# Bump when the pixels a scene renders to change (a cached attribute classifier is keyed by it).
RENDER_VERSION = 1

PHRASES = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "centre": "in the centre",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (d row, d column)
EDIT_KINDS = {"shape": "reshape", "colour": "recolour", "size": "resize", "position": "move"}
# Every word a caption or an instruction can use (for word-level text encoders).
VOCABULARY = tuple(
    sorted(
        {"a", "and", "make", "turn", "into", "move", "to", "the", "at", "on", "in"}
        | set(SHAPES) | set(COLOURS) | set(SIZES) | set(DIRECTIONS)
        | {w for phrase in PHRASES.values() for w in phrase.split()}
    )
)  # fmt: skip


@dataclass(frozen=True)
class SceneObject:
    """One object: attribute names (see the module table) and its centre's offset inside its cell, (dy, dx) in
    cells, each in [-JITTER, JITTER]."""

    shape: str
    colour: str
    size: str
    position: str
    offset: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        for name in ATTRIBUTES:
            value = getattr(self, name)
            if value not in VALUES[name]:
                raise ValueError(f"{name} must be one of {VALUES[name]}, got {value!r}")
        if len(self.offset) != 2 or max(abs(float(o)) for o in self.offset) > JITTER + 1e-9:
            raise ValueError(f"offset must be (dy, dx) within +-{JITTER} cells, got {self.offset}")

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)

    def index(self, attribute: str) -> int:
        """The value's index in ``VALUES[attribute]``."""
        return VALUES[attribute].index(getattr(self, attribute))

    @property
    def cell(self) -> tuple[int, int]:
        """(row, column) of its grid cell."""
        return divmod(POSITIONS.index(self.position), GRID)

    @property
    def held_out(self) -> bool:
        return (self.shape, self.colour) in HELD_OUT


@dataclass(frozen=True)
class Scene:
    """Objects in caption order, at most one per cell."""

    objects: tuple[SceneObject, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        object.__setattr__(self, "objects", objects)
        if not objects:
            raise ValueError("a scene needs at least one object")
        positions = [o.position for o in objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"two objects share a cell: positions {positions}")

    @property
    def held_out(self) -> bool:
        """True if any object is a held-out (shape, colour) combination."""
        return any(o.held_out for o in self.objects)

    def attributes(self, max_objects: int = MAX_OBJECTS) -> torch.Tensor:
        """LongTensor (4 * max_objects,): per object (shape, colour, size, position) indices, -1 after the last."""
        if len(self.objects) > max_objects:
            raise ValueError(f"the scene has {len(self.objects)} objects, more than {max_objects}")
        out = torch.full((max_objects, len(ATTRIBUTES)), -1, dtype=torch.long)
        for j, o in enumerate(self.objects):
            out[j] = torch.tensor([o.index(a) for a in ATTRIBUTES])
        return out.flatten()

    @classmethod
    def from_attributes(cls, attributes: torch.Tensor | Sequence[int]) -> Scene:
        """Inverse of :meth:`attributes` (offsets are zero)."""
        a = torch.as_tensor(attributes).long().flatten()
        if a.numel() % len(ATTRIBUTES):
            raise ValueError(f"attributes must hold 4 entries per object, got {a.numel()} entries")
        objects = []
        for row in a.view(-1, len(ATTRIBUTES)).tolist():
            if all(v == -1 for v in row):
                continue
            for name, v in zip(ATTRIBUTES, row, strict=True):
                if not 0 <= v < len(VALUES[name]):
                    raise ValueError(f"{name} index must be in [0, {len(VALUES[name])}), got {v}")
            objects.append(
                SceneObject(*(VALUES[n][v] for n, v in zip(ATTRIBUTES, row, strict=True)))
            )
        return cls(tuple(objects))


@dataclass(frozen=True)
class Edit:
    """Set ``attribute`` of object ``object`` (its index in the scene) to ``value``."""

    object: int
    attribute: str
    value: str

    @property
    def kind(self) -> str:
        return EDIT_KINDS[self.attribute]

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "object": self.object,
            "attribute": self.attribute,
            "value": self.value,
        }


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The scene with one attribute of one object changed; everything else (its offset included) kept."""
    if not 0 <= edit.object < len(scene.objects):
        raise ValueError(f"edit.object must be in [0, {len(scene.objects)}), got {edit.object}")
    if edit.attribute not in VALUES:
        raise ValueError(f"edit.attribute must be one of {ATTRIBUTES}, got {edit.attribute!r}")
    objects = list(scene.objects)
    objects[edit.object] = replace(objects[edit.object], **{edit.attribute: edit.value})
    return Scene(tuple(objects))


def edit_between(source: Scene, target: Scene) -> Edit:
    """The single-attribute :class:`Edit` that turns ``source`` into ``target`` (objects matched by index)."""
    if len(source.objects) != len(target.objects):
        raise ValueError(
            f"source and target differ in object count: {len(source.objects)} vs {len(target.objects)}"
        )
    diffs = [
        Edit(j, a, t.value(a))
        for j, (s, t) in enumerate(zip(source.objects, target.objects, strict=True))
        for a in ATTRIBUTES
        if s.value(a) != t.value(a)
    ]
    if len(diffs) != 1:
        raise ValueError(
            f"source and target must differ in exactly one attribute, they differ in {len(diffs)}"
        )
    return diffs[0]


def caption(scene: Scene) -> str:
    """Every attribute of every object, in object order:
    ``"a large red circle on the left and a small blue square at the bottom"``."""
    return " and ".join(
        f"a {o.size} {o.colour} {o.shape} {PHRASES[o.position]}" for o in scene.objects
    )


_OBJECT = re.compile(
    rf"^an? ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
    rf"({'|'.join(sorted(PHRASES.values(), key=len, reverse=True))})$"
)


def parse_caption(text: str) -> Scene:
    """Inverse of :func:`caption` (case, repeated spaces and a final full stop are ignored; "center" reads as
    "centre"). Raises ValueError naming the part that does not fit the caption grammar."""
    norm = " ".join(text.lower().replace("center", "centre").rstrip(".").split())
    by_phrase = {p: name for name, p in PHRASES.items()}
    objects = []
    for part in norm.split(" and "):
        m = _OBJECT.match(part)
        if m is None:
            raise ValueError(
                f"cannot read {part!r} in caption {text!r}: expected 'a <size> <colour> <shape> <position>', "
                f"e.g. 'a large red circle on the left'"
            )
        size, colour, shape, phrase = m.groups()
        objects.append(SceneObject(shape, colour, size, by_phrase[phrase]))
    return Scene(tuple(objects))


def reference(scene: Scene, j: int) -> str:
    """The shortest description that picks out object j among the scene's objects: "the circle", "the red
    circle", "the small circle", "the small red circle" or "the circle on the left"."""
    o = scene.objects[j]
    others = [p for i, p in enumerate(scene.objects) if i != j]
    for names in (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape")):
        if not any(all(p.value(n) == o.value(n) for n in names) for p in others):
            return "the " + " ".join(o.value(n) for n in names)
    return f"the {o.shape} {PHRASES[o.position]}"


def instruction(scene: Scene, edit: Edit) -> str:
    """The instruction for ``edit`` on ``scene``: "make the circle green", "make the triangle small", "turn
    the square into a circle", "move the square left" (one cell; farther: "move the square to the top left")."""
    ref = reference(scene, edit.object)
    if edit.attribute in ("colour", "size"):
        return f"make {ref} {edit.value}"
    if edit.attribute == "shape":
        return f"turn {ref} into a {edit.value}"
    (r0, c0), (r1, c1) = scene.objects[edit.object].cell, divmod(POSITIONS.index(edit.value), GRID)
    for name, step in DIRECTIONS.items():
        if (r1 - r0, c1 - c0) == step:
            return f"move {ref} {name}"
    return f"move {ref} to the {edit.value}"


def _cell_span(index: int, size: int, margin: int = 1) -> slice:
    """Pixel rows (or columns) of cell row (column) ``index``, grown by ``margin`` pixels, clipped."""
    return slice(
        max(0, math.floor(index * size / GRID) - margin),
        min(size, math.ceil((index + 1) * size / GRID) + margin),
    )


def coverage(obj: SceneObject, size: int) -> np.ndarray:
    """Fraction of each pixel (size, size) in [0, 1] covered by the object (4 x 4 samples per pixel, evaluated
    only inside the object's cell: it never leaves it)."""
    row, col = obj.cell
    rows, cols = _cell_span(row, size), _cell_span(col, size)
    n = SUPERSAMPLE
    sub = (np.arange(n) + 0.5) / n
    # sample centres in cell units, relative to the object's centre
    y = ((np.arange(rows.start, rows.stop)[:, None] + sub).ravel() * GRID / size)[:, None]
    x = ((np.arange(cols.start, cols.stop)[:, None] + sub).ravel() * GRID / size)[None, :]
    y, x = y - (row + 0.5 + obj.offset[0]), x - (col + 0.5 + obj.offset[1])
    r = RADIUS[obj.size]
    if obj.shape == "circle":
        inside = x * x + y * y <= r * r
    elif obj.shape == "square":  # half-side 0.85 r: about the circle's area
        inside = (np.abs(x) <= 0.85 * r) & (np.abs(y) <= 0.85 * r)
    else:  # upward equilateral triangle, circumradius 1.2 r (closer in area), bounding box centred
        t, y = 1.2 * r, y - 0.3 * r  # the centroid sits 0.25 t below the box's centre
        inside = (y <= 0.5 * t) & (y >= math.sqrt(3) * np.abs(x) - t)
    h, w = rows.stop - rows.start, cols.stop - cols.start
    out = np.zeros((size, size))
    out[rows, cols] = inside.reshape(h, n, w, n).mean(axis=(1, 3))
    return out


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """The scene as uint8 (size, size, 3): flat background, objects painted in order with antialiased edges."""
    if size < GRID * 2:
        raise ValueError(f"size must be >= {GRID * 2} pixels, got {size}")
    img = np.broadcast_to(np.array(BACKGROUND), (size, size, 3)).copy()
    for o in scene.objects:
        a = coverage(o, size)[..., None]
        img = a * np.array(RGB[o.colour]) + (1 - a) * img
    return np.round(img * 255).astype(np.uint8)


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0


def cell_mask(positions: Sequence[str], size: int, margin: int = 1) -> torch.Tensor:
    """Bool (size, size): the pixels of the named cells, grown by ``margin`` pixels (an object's footprint
    never leaves its cell)."""
    mask = torch.zeros(size, size, dtype=torch.bool)
    for p in positions:
        row, col = divmod(POSITIONS.index(p), GRID)
        mask[_cell_span(row, size, margin), _cell_span(col, size, margin)] = True
    return mask


def random_scene(rng: np.random.Generator, max_objects: int = MAX_OBJECTS) -> Scene:
    """1 to ``max_objects`` objects with uniform attributes in distinct uniform cells, uniform offsets."""
    n = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(len(POSITIONS), size=n, replace=False)
    objects = []
    for c in cells:
        shape, colour, size = (int(rng.integers(len(VALUES[a]))) for a in ATTRIBUTES[:3])
        offset = tuple(float(v) for v in rng.uniform(-JITTER, JITTER, 2))
        objects.append(
            SceneObject(SHAPES[shape], COLOURS[colour], SIZES[size], POSITIONS[int(c)], offset)
        )
    return Scene(tuple(objects))


def possible_edits(scene: Scene) -> list[Edit]:
    """Every single-attribute edit: any other shape, colour or size; a move one cell in any direction to a free
    cell inside the grid."""
    edits = []
    taken = {o.position for o in scene.objects}
    for j, o in enumerate(scene.objects):
        for a in ("shape", "colour", "size"):
            edits += [Edit(j, a, v) for v in VALUES[a] if v != o.value(a)]
        row, col = o.cell
        for dr, dc in DIRECTIONS.values():
            r, c = row + dr, col + dc
            if 0 <= r < GRID and 0 <= c < GRID and POSITIONS[r * GRID + c] not in taken:
                edits.append(Edit(j, "position", POSITIONS[r * GRID + c]))
    return edits


MAX_TRIES = 1000


def _wanted(split: str, i: int) -> bool | None:
    """Whether sample i of ``split`` must hold a held-out combination (None: either)."""
    if split in ("train", "val"):
        return False
    if split == "test":
        return i % 2 == 0
    return None


class _SceneSamples(Dataset):
    """What the scene datasets share: the checks, the split's random streams (sample i of a split draws from
    ``default_rng([seed, stream + i])``) and rendering."""

    stream_offset = 0  # keeps a dataset's streams apart from the other scene datasets'

    def __init__(self, size, num_samples, *, seed, split, channels, max_objects):
        if size < GRID * 2:
            raise ValueError(f"size must be >= {GRID * 2} pixels, got {size}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 1 <= max_objects <= len(POSITIONS):
            raise ValueError(f"max_objects must be in [1, {len(POSITIONS)}], got {max_objects}")
        self.split = _check_split(split)
        self.size, self.num_samples, self.seed = size, num_samples, seed
        self.channels, self.max_objects = channels, max_objects
        self.stream = STREAMS.get(split, 0) + self.stream_offset

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, i: int) -> np.random.Generator:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        return np.random.default_rng([self.seed, self.stream + i])

    def _image(self, scene: Scene) -> torch.Tensor:
        return to_channels(to_tensor(render(scene, self.size)), self.channels)


class Scenes(_SceneSamples):
    """Rendered scenes as an image dataset: ``(image, label)``, label = the first object's class
    ``shape * 4 + colour`` (12 classes, named like "red circle"). ``scene(i)``, ``caption(i)`` (also as
    ``text(i)``) and ``held_out(i)`` give the ground truth of sample i. See the module docstring for splits."""

    def __init__(
        self,
        size: int = 32,
        num_samples: int = 4096,
        *,
        seed: int = 0,
        split: str = "train",
        channels: int = 3,
        max_objects: int = MAX_OBJECTS,
    ):
        super().__init__(
            size, num_samples, seed=seed, split=split, channels=channels, max_objects=max_objects
        )
        self.class_names = [f"{c} {s}" for s in SHAPES for c in COLOURS]
        self.num_classes = len(self.class_names)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (datasets live as long as their users)
    def scene(self, i: int) -> Scene:
        """The ground truth of sample i."""
        rng, wanted = self._rng(i), _wanted(self.split, i)
        for _ in range(MAX_TRIES):
            s = random_scene(rng, self.max_objects)
            if wanted is None or s.held_out == wanted:
                return s
        raise RuntimeError(f"no scene fits split {self.split!r} after {MAX_TRIES} draws")

    def caption(self, i: int) -> str:
        return caption(self.scene(i))

    text = caption

    def held_out(self, i: int) -> bool:
        return self.scene(i).held_out

    def image(self, i: int) -> torch.Tensor:
        return self._image(self.scene(i))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        first = self.scene(i).objects[0]
        return self.image(i), first.index("shape") * len(COLOURS) + first.index("colour")


class SceneCaptions(Scenes):
    """Text-to-image pairs: ``(image, caption, attributes)`` with attributes a LongTensor (4 * max_objects,)
    (see :meth:`Scene.attributes`)."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, torch.Tensor]:
        s = self.scene(i)
        return self.image(i), caption(s), s.attributes(self.max_objects)


class SceneEdits(_SceneSamples):
    """Editing triples: ``dict(source, instruction, target, edit, source_attributes, target_attributes)``.

    Sample i draws a source scene, then one of :func:`possible_edits` uniformly, from its own random stream
    (redrawn until the split's held-out rule holds for source and target together, see the module docstring).
    ``edit`` is ``dict(kind, object, attribute, value)``: kind "reshape" | "recolour" | "resize" | "move",
    object the edited object's index (its slot in the attributes), value the new value's name.
    """

    stream_offset = 500_009  # apart from the captioned scenes' streams

    def __init__(
        self,
        size: int = 32,
        num_samples: int = 4096,
        *,
        seed: int = 0,
        split: str = "train",
        channels: int = 3,
        max_objects: int = MAX_OBJECTS,
        attributes: Sequence[str] = ATTRIBUTES,
    ):
        bad = [a for a in attributes if a not in ATTRIBUTES]
        if bad or not attributes:
            raise ValueError(
                f"attributes must be a non-empty subset of {ATTRIBUTES}, got {attributes}"
            )
        super().__init__(
            size, num_samples, seed=seed, split=split, channels=channels, max_objects=max_objects
        )
        self.edit_attributes = tuple(attributes)

    @functools.lru_cache(maxsize=4096)  # noqa: B019
    def triple(self, i: int) -> tuple[Scene, Edit, Scene]:
        """(source scene, edit, target scene) of sample i."""
        rng, wanted = self._rng(i), _wanted(self.split, i)
        for _ in range(MAX_TRIES):
            source = random_scene(rng, self.max_objects)
            edits = [e for e in possible_edits(source) if e.attribute in self.edit_attributes]
            if not edits:
                continue
            edit = edits[int(rng.integers(len(edits)))]
            target = apply_edit(source, edit)
            if wanted is None or (source.held_out or target.held_out) == wanted:
                return source, edit, target
        raise RuntimeError(f"no edit fits split {self.split!r} after {MAX_TRIES} draws")

    def held_out(self, i: int) -> bool:
        source, _, target = self.triple(i)
        return source.held_out or target.held_out

    def instruction(self, i: int) -> str:
        source, edit, _ = self.triple(i)
        return instruction(source, edit)

    def __getitem__(self, i: int) -> dict:
        source, edit, target = self.triple(i)
        return {
            "source": self._image(source),
            "instruction": instruction(source, edit),
            "target": self._image(target),
            "edit": edit.to_dict(),
            "source_attributes": source.attributes(self.max_objects),
            "target_attributes": target.attributes(self.max_objects),
        }


def _to_pil(image: torch.Tensor | np.ndarray, scale: int) -> Image.Image:
    """(3, H, W) float in [-1, 1] or uint8 (H, W, 3) -> PIL RGB, enlarged ``scale`` times (nearest)."""
    if isinstance(image, torch.Tensor):
        image = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
        image = image.permute(1, 2, 0).numpy()
    img = Image.fromarray(np.ascontiguousarray(image))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line]


def labelled_sheet(
    rows: Sequence[Sequence[torch.Tensor | np.ndarray]],
    labels: Sequence[str],
    *,
    headers: Sequence[str] | None = None,
    scale: int = 4,
    font_size: int = 11,
) -> Image.Image:
    """A picture: each row one or more images side by side and its label beside them (wrapped); ``headers``
    name the image columns. Used for caption grids (image | caption) and edit grids (source | target | edited
    with the instruction)."""
    font = ImageFont.load_default(size=font_size)
    cols = max(len(r) for r in rows)
    tiles = [[_to_pil(x, scale) for x in r] for r in rows]
    tile = max(t.width for r in tiles for t in r)
    pad, text_w, line_h = 6, 260, font_size + 3
    wrapped = [_wrap(label, font, text_w) for label in labels]
    top = line_h + pad if headers else 0
    row_h = [max(tile, len(w) * line_h) + pad for w in wrapped]
    sheet = Image.new(
        "RGB", (pad + cols * (tile + pad) + text_w + pad, top + pad + sum(row_h)), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for c, h in enumerate(headers or []):
        draw.text((pad + c * (tile + pad), pad), h, fill="black", font=font)
    y = top + pad
    for r, (images, lines) in enumerate(zip(tiles, wrapped, strict=True)):
        for c, t in enumerate(images):
            sheet.paste(t, (pad + c * (tile + pad), y))
        for k, line in enumerate(lines):
            draw.text((pad + cols * (tile + pad), y + k * line_h), line, fill="black", font=font)
        y += row_h[r]
    return sheet
