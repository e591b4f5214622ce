"""Sampling at scale: one lossless PNG per image in a directory, and the ``.npz`` the ADM evaluator reads.

``snce sample --checkpoint RUN --out-dir DIR --per-class 50`` (one process or under ``torchrun``) calls
:func:`sample_to_dir`; so can Python code. Its one job: the set of images is a function of the command's
settings alone, whatever the number of ranks and however often the job is interrupted.

**Determinism.** Images are drawn in fixed global batches of ``batch_size`` consecutive indices: batch ``b``
holds images ``b*B .. b*B+B-1`` (the last one may be shorter) and draws every random number from its own
``torch.Generator`` seeded by :func:`batch_seed` from ``(seed, b)`` (numpy's ``SeedSequence``, so nearby seeds
and batches give unrelated streams). Batches still to draw are dealt round-robin over the ranks; which rank
draws a batch, and whether it is drawn again after an interruption, changes nothing in it. So 1 or N ranks,
interrupted or not, give the same images, byte for byte, on the same device type and library versions. The
batch size is part of the result (the batch shares one random stream, and a batched forward's rounding can
depend on the batch shape), so it is recorded and checked like the seed.

**Classes.** ``per_class=N``: image ``i`` has class ``classes[i // N]`` (blocks: images 0..N-1 are the first
class), ``N * len(classes)`` images (50 x 1,000 for ImageNet); ``classes`` defaults to every class.
``num=M`` instead: ``classes[i % len(classes)]`` (interleaved, as balanced as M allows). Unconditional
generators take ``num``.

**Layout of DIR**::

    manifest.json   the settings: weight hashes of generator and tokenizer, seed, classes, per_class / num,
                    batch size, sampling settings, device type. Checked on every rerun: a mismatch is an
                    error naming each differing field (``--overwrite`` starts over instead)
    000000.png ...  image i, named by its global index (zero-padded to >= 6 digits), lossless, grey or RGB as
                    decoded; written to a temporary name and renamed, so a file under its final name is whole
    samples.npz     by default (``npz=`` puts it elsewhere), written by rank 0 once every image exists:
                    ``arr_0`` uint8 (N, H, W, 3) in index order (grey expanded to 3 channels) and ``labels``
                    int64 (N,) for a conditional generator: the layout the ADM evaluator
                    (guided-diffusion's ``evaluations/evaluator.py``) reads

**Resume.** Rerunning the same command skips every batch whose PNGs all exist; a batch that misses any is drawn
again whole (the same images) and only its missing files are written. The npz is streamed from the PNGs one
image at a time (memory: one image, never the N x H x W x 3 array; 50,000 x 256 x 256 x 3 is 9.8 GB) into a
zip with fixed timestamps, so the same images give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from PIL import Image
from tqdm.auto import tqdm

from snce.config import atomic_write_text
from snce.files import sha256
from snce.train.distributed import DistInfo, barrier
from snce.train.generator import SampleConfig, generator_dir, sample_images

MANIFEST = "manifest.json"
NPZ = "samples.npz"
FORMAT = 1  # layout version of DIR, recorded in the manifest
PNG_TRAILER = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with
_IMAGE = re.compile(r"^\d{6,}\.png$")
_TEMP = re.compile(r"^\.\d{6,}\.png\.tmp-\d+$")
# The zip epoch as every member's time stamp: the npz's bytes do not depend on when it was written.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class SampleDirResult:
    """What :func:`sample_to_dir` did (rank 0). ``drawn``: images sampled now over all ranks (a batch with a
    missing file is drawn whole); ``written``: PNG files written now; ``seconds``: wall time of the sampling."""

    out_dir: Path
    npz: Path
    num_images: int
    drawn: int
    written: int
    seconds: float
    world_size: int

    @property
    def images_per_s(self) -> float:
        return self.drawn / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        skipped = self.num_images - self.written
        return (
            f"{self.num_images} images in {self.out_dir} ({self.written} written now, {skipped} already there); "
            f"sampled {self.drawn} on {self.world_size} rank(s) in {self.seconds:.1f} s "
            f"({self.images_per_s:.2f} images/s); ADM npz: {self.npz}"
        )


def sample_labels(
    num_classes: int,
    *,
    classes: list[int] | None = None,
    per_class: int | None = None,
    num: int | None = None,
) -> torch.Tensor | None:
    """Class of every global image index, (N,) int64, or None for an unconditional generator (see module doc)."""
    if num_classes == 0:
        if classes:
            raise ValueError("--classes given, but the generator is unconditional (num_classes=0)")
        if per_class is not None:
            raise ValueError("--per-class needs a class-conditional generator (num_classes=0 here)")
        if num is None or num < 1:
            raise ValueError(f"an unconditional generator needs --num N >= 1 images, got {num}")
        return None
    if (per_class is None) == (num is None):
        raise ValueError("give one of --per-class N (N per class) and --num N (interleaved)")
    flag, count = ("--per-class", per_class) if per_class is not None else ("--num", num)
    if count < 1:
        raise ValueError(f"{flag} must be >= 1, got {count}")
    base = torch.tensor(classes, dtype=torch.long) if classes else torch.arange(num_classes)
    bad = base[(base < 0) | (base >= num_classes)]
    if len(bad):
        raise ValueError(
            f"--classes {bad.tolist()} out of range: the generator has {num_classes} classes (0..{num_classes - 1})"
        )
    if per_class is not None:
        return base.repeat_interleave(per_class)
    return base.repeat(-(-num // len(base)))[:num]


def batch_seed(seed: int, batch: int) -> int:
    """The seed of global batch ``batch``: 64 bits from ``SeedSequence([seed, batch])``."""
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    return int(np.random.SeedSequence([seed, batch]).generate_state(1, np.uint64)[0])


def image_name(index: int, total: int) -> str:
    """``000123.png``: the global index, zero-padded to 6 digits or to the width of the largest index."""
    return f"{index:0{max(6, len(str(total - 1)))}d}.png"


def png_complete(path: Path) -> bool:
    """True when ``path`` is a file ending with the PNG trailer (a truncated copy does not)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < len(PNG_TRAILER):
                return False
            f.seek(-len(PNG_TRAILER), os.SEEK_END)
            return f.read() == PNG_TRAILER
    except OSError:
        return False


def pending_batches(out_dir: Path, total: int, batch_size: int) -> list[int]:
    """Global batches with at least one image whose PNG is missing or incomplete."""
    present = {e.name for e in os.scandir(out_dir)} if out_dir.is_dir() else set()
    todo = []
    for b in range(-(-total // batch_size)):
        indices = range(b * batch_size, min(total, (b + 1) * batch_size))
        names = (image_name(i, total) for i in indices)
        if not all(n in present and png_complete(out_dir / n) for n in names):
            todo.append(b)
    return todo


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, rounded as everywhere in snce."""
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def write_png(pixels: np.ndarray, path: Path) -> None:
    """One (H, W, 1 | 3) uint8 image as a lossless PNG, via a temporary file and ``os.replace``."""
    img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def read_png_rgb(path: Path) -> np.ndarray:
    """A PNG as (H, W, 3) uint8; grey repeated to 3 channels."""
    with Image.open(path) as img:
        if img.mode not in ("L", "RGB"):
            raise ValueError(f"{path}: expected a grey or RGB PNG, got mode {img.mode}")
        pixels = np.asarray(img)
    return np.repeat(pixels[..., None], 3, axis=-1) if pixels.ndim == 2 else pixels


def write_adm_npz(path: Path, out_dir: Path, total: int, labels: torch.Tensor | None) -> Path:
    """Stream the PNGs of ``out_dir`` into ``path``: ``arr_0`` uint8 (N, H, W, 3) and ``labels`` (N,)."""
    first = read_png_rgb(out_dir / image_name(0, total))
    shape = (total, *first.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}  # np.save's header for uint8
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open(zipfile.ZipInfo("arr_0.npy", _ZIP_TIME), "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for i in range(total):
                file = out_dir / image_name(i, total)
                pixels = first if i == 0 else read_png_rgb(file)
                if pixels.shape != first.shape:
                    raise ValueError(f"{file}: {pixels.shape}, image 0: {first.shape}")
                f.write(np.ascontiguousarray(pixels).tobytes())
        if labels is not None:
            with zf.open(zipfile.ZipInfo("labels.npy", _ZIP_TIME), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, labels.numpy().astype(np.int64))
    os.replace(tmp, path)
    return path


def weights_digest(directory: str | os.PathLike) -> str:
    """SHA-256 over the config and weight files of a saved model directory (the files' own hashes)."""
    directory = Path(directory)
    names = sorted(
        p.name for p in directory.iterdir() if p.suffix == ".safetensors" or p.name == "config.json"
    )
    if not names:
        raise FileNotFoundError(f"{directory} holds no config.json or .safetensors files")
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}:{sha256(directory / name)}\n".encode())
    return digest.hexdigest()


def _differences(old: dict, new: dict) -> list[str]:
    def show(v):
        text = json.dumps(v)
        return text if len(text) <= 60 else text[:57] + "..."

    return [
        f"{k}: {show(old.get(k))} there, {show(new.get(k))} now"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]


def _prepare(
    out_dir: Path, npz: Path, settings: dict, info: dict, overwrite: bool, batch: int
) -> list[int]:
    """Rank 0, before any rank writes: check or write the manifest, clear stale temporary files, list the
    batches to draw."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / MANIFEST
    ours = [p for p in out_dir.iterdir() if _IMAGE.match(p.name) or _TEMP.match(p.name)]
    if overwrite:
        for p in ours:
            p.unlink()
        manifest.unlink(missing_ok=True)
        ours = []
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        diff = _differences(old.get("settings", {}), settings)
        if diff:
            raise ValueError(
                f"{out_dir} holds samples drawn with other settings ({'; '.join(diff)}): rerun with the "
                "recorded settings to resume, choose another --out-dir, or pass --overwrite to start over"
            )
    else:
        if any(_IMAGE.match(p.name) for p in ours):
            raise FileExistsError(
                f"{out_dir} holds numbered PNGs but no {MANIFEST}: not a snce sample directory to resume "
                "(pass --overwrite to replace them)"
            )
        if npz.exists() and not overwrite:
            raise FileExistsError(f"{npz} exists; pass --overwrite to replace it")
        record = {"format": FORMAT, "settings": settings, "info": info, "complete": False}
        atomic_write_text(manifest, json.dumps(record, indent=2) + "\n")
    for p in ours:
        if _TEMP.match(p.name):  # left by an interrupted write; its image is redrawn
            p.unlink()
    todo = pending_batches(out_dir, settings["num_images"], batch)
    record = json.loads(manifest.read_text())
    if todo and record.get("complete"):
        record["complete"] = False  # images were removed since: the npz is made again at the end
        atomic_write_text(manifest, json.dumps(record, indent=2) + "\n")
    return todo


def _share(payload, dist: DistInfo):
    """Rank 0's ``payload`` on every rank."""
    if not dist.distributed:
        return payload
    box = [payload]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def sample_to_dir(
    model,
    tokenizer,
    settings: SampleConfig,
    out_dir: str | os.PathLike,
    *,
    dist: DistInfo,
    checkpoint: str,
    tokenizer_path: str,
    classes: list[int] | None = None,
    per_class: int | None = None,
    num: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    npz: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SampleDirResult | None:
    """Sample ``model`` into ``out_dir`` (PNGs + manifest) and write the ADM ``.npz``; see the module doc.

    Every rank calls it with the same arguments (``model`` and ``tokenizer`` on ``dist.device``); the ranks
    share the batches still to draw. ``checkpoint`` / ``tokenizer_path`` are the saved directories the models
    came from: their weight hashes go into the manifest. Returns the result on rank 0, None elsewhere.
    """
    if tokenizer is None:
        raise ValueError("--out-dir needs a tokenizer to decode the samples (--tokenizer DIR)")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    labels = sample_labels(model.config.num_classes, classes=classes, per_class=per_class, num=num)
    total = num if labels is None else len(labels)
    out_dir = Path(out_dir)
    npz = Path(npz) if npz else out_dir / NPZ
    batch_seed(seed, 0)  # rejects a negative seed on every rank
    recorded = {
        "seed": seed,
        "classes": list(classes) if classes else None,
        "per_class": per_class,
        "num": num,
        "num_images": total,
        "batch_size": batch_size,
        "sampling": settings.kwargs(model.config.family),  # only what this family's sampler reads
        "device": dist.device.type,
    }

    payload = None
    # Rank 0 alone reads and writes the manifest, before any rank writes an image.
    if dist.is_main:
        try:
            gen_dir = generator_dir(checkpoint)
            recorded["generator_sha256"] = weights_digest(gen_dir)
            recorded["tokenizer_sha256"] = weights_digest(tokenizer_path)
            info = {
                "checkpoint": str(gen_dir.resolve()),
                "tokenizer": str(Path(tokenizer_path).resolve()),
                "torch": torch.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            payload = {"todo": _prepare(out_dir, npz, recorded, info, overwrite, batch_size)}
        except (ValueError, OSError) as e:
            if not dist.distributed:
                raise
            payload = {"error": e}
    payload = _share(payload, dist)
    if "error" in payload:
        raise payload["error"]
    mine = payload["todo"][dist.rank :: dist.world_size]

    start = time.perf_counter()
    drawn = written = 0
    sizes = [min(total, (b + 1) * batch_size) - b * batch_size for b in mine]
    bar = tqdm(
        total=sum(sizes), unit="img", disable=not (progress and dist.is_main),
        desc=f"sampling (rank 0 of {dist.world_size})" if dist.distributed else "sampling",
    )  # fmt: skip
    for b, n in zip(mine, sizes, strict=True):
        lo = b * batch_size
        gen = torch.Generator(device=dist.device).manual_seed(batch_seed(seed, b))
        c = None if labels is None else labels[lo : lo + n]
        _, images = sample_images(
            model, tokenizer, c, settings, num_samples=n, batch_size=n, generator=gen
        )
        pixels = to_uint8(images)  # (n, H, W, C)
        for j in range(n):
            path = out_dir / image_name(lo + j, total)
            if not png_complete(path):
                write_png(pixels[j], path)
                written += 1
        drawn += n
        bar.update(n)
    bar.close()
    counts = torch.tensor([drawn, written], dtype=torch.long, device=dist.device)
    if dist.distributed:
        torch_dist.all_reduce(counts)
    seconds = time.perf_counter() - start
    drawn, written = (int(v) for v in counts.tolist())

    result = None
    if dist.is_main:
        missing = pending_batches(out_dir, total, batch_size)
        if missing:
            raise RuntimeError(
                f"{out_dir}: batches {missing[:5]} miss images after sampling (another job there?)"
            )
        manifest = json.loads((out_dir / MANIFEST).read_text())
        done = manifest.get("complete") and manifest.get("npz") == str(npz.resolve())
        if written or not (done and npz.is_file()):
            write_adm_npz(npz, out_dir, total, labels)
        manifest.update(complete=True, npz=str(npz.resolve()))
        atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        result = SampleDirResult(out_dir, npz, total, drawn, written, seconds, dist.world_size)
    barrier()  # every rank returns once the npz exists
    return result
