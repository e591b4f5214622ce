"""The reference protocol: FID, sFID, IS, precision and recall of an ``.npz`` of samples against a reference
batch, as OpenAI's ADM evaluator (guided-diffusion ``evaluations/evaluator.py``) defines them.

This module is the one place snce computes the numbers papers on ImageNet generation report (LlamaGen, VAR,
RAR, MaskGIT and others all use the ADM evaluator). Its features come from the FID Inception-v3 in
:mod:`snce.metrics.inception` (a local weight file, never a download), via
:meth:`~snce.metrics.inception.InceptionV3.adm_features`. With S samples and R reference images:

=========  ======================  ==========================================================================
number     features                definition
=========  ======================  ==========================================================================
FID        pool_3 (2048)           ||mu_s - mu_r||^2 + Tr(S_s) + Tr(S_r) - 2 Tr sqrtm(S_s S_r), mean ``mu`` and
                                   covariance ``S`` (np.cov, N - 1) of each set; the reference's from its
                                   file's ``mu``/``sigma`` when it has them
sFID       mixed_6/conv (2023)     the same on the first 7 channels of ``mixed_6/conv`` (17 x 17 x 7,
                                   flattened in (H, W, C) order); ``mu_s``/``sigma_s`` in the file
IS         softmax(logits) (1008)  the samples, in file order, cut into splits of 5,000 (the last may be
                                   shorter); per split exp(mean_x KL(p(y|x) || mean_x p(y|x))); the mean over
                                   splits (50,000 samples: 10 splits, as papers report)
precision  pool_3                  fraction of samples inside the reference manifold
recall     pool_3                  fraction of reference images inside the samples' manifold
=========  ======================  ==========================================================================

A manifold (Kynkaanniemi et al., 2019, arXiv:1904.06991, as ADM adapts it) is a union of balls: around each
member of a set, the squared Euclidean distance to its k-th nearest other member (k = 3: entry k of its sorted
distances to the whole set, which start with its own 0). A point is inside when its squared distance to some
member is at most that member's radius. ADM computes the distances over 10,000 x 10,000 blocks, in float16
(inputs cast to float16, ``|u|^2 - 2 u.v + |v|^2`` clamped at 0), falling back to float32 for a block whose
float16 result is not finite (a norm above 65,504). :func:`manifold_radii` and :func:`precision_recall`
reproduce that: with ``distance_dtype="float16"`` (the default) inputs, squares, norms, dot products and each
step of the sum are rounded to float16 (norms and dot products accumulated in float32, as GPU GEMMs do), over
the same blocks, with the same per-block fallback; ``"float32"`` computes in float32 throughout.

Numerics: statistics in float64 (``np.cov``); ``scipy.linalg.sqrtm`` as ADM calls it (if the result is not
finite, 1e-6 is added to both covariances' diagonals; a complex result is an error when an imaginary part of
its diagonal exceeds 1e-3, and is otherwise replaced by its real part). Features are extracted in float32 with
TF32 off. Memory: the three feature sets in float32 (S x 5079 floats: 1 GB for 50,000 samples; ``np.cov``
makes a float64 copy of one at a time), one image batch, and for precision/recall one (row block x column block) distance matrix and its float16 copies
(~1.2 GB at ADM's 10,000 x 10,000; the k-nearest search keeps k + 1 running minima per row, never a row of
all S distances). Images are streamed from the ``.npz``, never loaded whole.

What differs from the ADM evaluator (each is also recorded in the result's ``protocol``):

- the network runs in PyTorch (float32 convolutions) from the PyTorch port of the same 2015-12-05 weights;
- the resize to 299 x 299: antialiased bilinear by default (clean-fid's advice; identical to plain bilinear
  with half-pixel centres when enlarging, e.g. 256 -> 299), or ``"tf-bilinear"``, the graph's own TF-1
  ``ResizeBilinear``; the TensorFlow graph's exact kernels are not reproduced bit for bit;
- ``mu`` is a float64 mean (ADM's is float32) and the softmax for IS is computed in float64 from the logits;
  a class probability that underflows to 0 contributes 0 (ADM's 0 * log 0 would be nan);
- sample statistics are always computed from the sample images (ADM reads ``mu``/``sigma`` from a samples file
  that has them); a reference without images (statistics only) gives FID and sFID but no precision/recall.

Reference batches use ADM's layout: an ``.npz`` with ``arr_0`` uint8 (R, H, W, 3) and optionally ``mu``,
``sigma``, ``mu_s``, ``sigma_s`` (float64); :func:`make_reference` writes one from a folder of real images
(plus ``arr_1`` labels for a class-per-subfolder tree and ``snce_protocol``, a JSON string the ADM evaluator
ignores).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from scipy.special import logsumexp

from snce.metrics.inception import (
    RESIZE_METHODS,
    InceptionV3,
    load_inception,
    resolve_weights_path,
)

IS_SPLIT_SIZE = 5000  # ADM's compute_inception_score(split_size=5000)
PR_K = 3  # ADM's ManifoldEstimator(nhood_sizes=(3,))
PR_BLOCK = 10000  # ADM's row_batch_size = col_batch_size
# ADM's Evaluator(batch_size=64); the features do not depend on it (BatchNorm in eval mode)
BATCH_SIZE = 64
DISTANCE_DTYPES = ("float16", "float32")
IMAGE_KEYS = ("arr_0", "images")  # ADM's layout, then snce sample --npz's
# guided-diffusion's image_sample.py saves (images, labels) as arr_0, arr_1
LABEL_KEYS = ("arr_1", "labels")
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
FEATURE_NETWORK = "FID Inception-v3 (TF 2015-12-05 graph, PyTorch port), snce.metrics.inception"


# ------------------------------------------------------------------------------------------- statistics


@dataclass
class GaussianStatistics:
    """Mean (d,) and covariance (d, d) of a feature set, float64, and the Frechet distance between two."""

    mu: np.ndarray
    sigma: np.ndarray

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        d = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if self.mu.ndim != 1 or self.sigma.shape != (d, d):
            raise ValueError(
                f"statistics need mu (d,) and sigma (d, d), got {self.mu.shape} and {self.sigma.shape}"
            )

    @classmethod
    def of(cls, features: np.ndarray) -> GaussianStatistics:
        """Statistics of features (N, d), N >= 2: mean and ``np.cov(rowvar=False)`` (divides by N - 1)."""
        x = np.asarray(features)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"features must be (N, d) with N >= 2, got {x.shape}")
        return cls(x.astype(np.float64).mean(axis=0), np.cov(x, rowvar=False))

    def frechet_distance(self, other: GaussianStatistics, eps: float = 1e-6) -> float:
        """||mu_1 - mu_2||^2 + Tr(S_1) + Tr(S_2) - 2 Tr sqrtm(S_1 S_2), with ADM's handling of a singular
        product (``eps`` on both diagonals) and of a complex square root (real part, unless an imaginary part
        of its diagonal exceeds 1e-3)."""
        if self.mu.shape != other.mu.shape:
            raise ValueError(
                f"statistics of different widths: {self.mu.shape[0]} and {other.mu.shape[0]}"
            )
        s1, s2 = self.sigma, other.sigma
        diff = self.mu - other.mu
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            warnings.warn(
                f"Frechet distance: the covariance product is singular; adding {eps} to both diagonals",
                stacklevel=2,
            )
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
        if np.iscomplexobj(covmean):
            imag = np.abs(np.diagonal(covmean).imag).max()
            if imag > 1e-3:
                raise ValueError(
                    f"Frechet distance: the covariance product's square root has an imaginary part of {imag:.3g} "
                    "on its diagonal (more than 1e-3): too few samples for these statistics?"
                )
            covmean = covmean.real
        return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's IS from classifier logits (N, C): softmax, then the samples in order in splits of ``split_size``
    (the last one shorter when N is not a multiple), exp(mean_x KL(p(y|x) || p_split(y))) per split, averaged
    over splits. Computed in float64."""
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"logits must be (N, C) with N >= 1, got {x.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    log_p = x - logsumexp(x, axis=1, keepdims=True)  # (N, C)
    p = np.exp(log_p)
    scores = []
    for start in range(0, x.shape[0], split_size):
        part, log_part = p[start : start + split_size], log_p[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)  # (1, C)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (log_part - np.log(marginal)), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def is_split_sizes(n: int, split_size: int = IS_SPLIT_SIZE) -> list[int]:
    """The sizes of the splits :func:`inception_score` uses for n samples."""
    return [min(split_size, n - start) for start in range(0, n, split_size)]


# ------------------------------------------------------------------------------------ precision / recall


def _sq_distances(u: torch.Tensor, v: torch.Tensor, dtype: str) -> torch.Tensor:
    """Squared Euclidean distances (a, b), float32, of rows u (a, d) and v (b, d) as ADM's DistanceBlock forms
    them: in float16 (each op's result rounded), or float32 when the float16 block is not finite."""
    if dtype == "float16":
        u16, v16 = u.half().float(), v.half().float()
        nu = (u16 * u16).half().float().sum(1).half()  # tf.square in float16, then the row sums
        nv = (v16 * v16).half().float().sum(1).half()
        dot = (u16 @ v16.T).half()  # (a, b)
        d = (nu[:, None] - 2 * dot + nv[None, :]).clamp_min(0)  # float16 arithmetic
        if torch.isfinite(d).all():
            return d.float()
    nu, nv = (u * u).sum(1), (v * v).sum(1)
    return (nu[:, None] - 2 * (u @ v.T) + nv[None, :]).clamp_min(0)


def _as_features(name: str, x, min_rows: int, device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2 or t.shape[0] < min_rows:
        raise ValueError(f"{name} must be (N, d) with N >= {min_rows}, got {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32)


def _check_options(k: int, block: int, distance_dtype: str) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if distance_dtype not in DISTANCE_DTYPES:
        raise ValueError(f"distance_dtype must be one of {DISTANCE_DTYPES}, got {distance_dtype!r}")


@torch.no_grad()
def manifold_radii(
    features,
    *,
    k: int = PR_K,
    block: int = PR_BLOCK,
    distance_dtype: str = "float16",
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Each feature's squared distance to its k-th nearest other member of the set (N,), float32.

    Distances are formed over (block x block) pieces; per row block, the k + 1 smallest distances seen so far
    are kept (exactly the k-th order statistic ADM's ``np.partition`` takes over the full row).
    """
    _check_options(k, block, distance_dtype)
    x = _as_features("features", features, k + 1, device)
    radii = []
    for r in range(0, x.shape[0], block):
        rows, best = x[r : r + block], None
        for c in range(0, x.shape[0], block):
            d = _sq_distances(rows, x[c : c + block], distance_dtype)  # (rows, cols)
            d = d if best is None else torch.cat([best, d], 1)
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values  # ascending
        radii.append(best[:, k])
    return torch.cat(radii)


@torch.no_grad()
def precision_recall(
    reference,
    samples,
    *,
    k: int = PR_K,
    block: int = PR_BLOCK,
    distance_dtype: str = "float16",
    reference_radii: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """(precision, recall) of ``samples`` (S, d) against ``reference`` (R, d), ADM's definition.

    precision: fraction of samples inside some reference ball; recall: fraction of reference features inside
    some sample ball. Distance blocks are (reference rows x sample columns), as ADM's ``evaluate_pr`` forms
    them. ``reference_radii``: the reference's :func:`manifold_radii` when already computed.
    """
    _check_options(k, block, distance_dtype)
    ref = _as_features("reference", reference, k + 1, device)
    fake = _as_features("samples", samples, k + 1, device)
    if ref.shape[1] != fake.shape[1]:
        raise ValueError(f"reference and samples widths differ: {ref.shape[1]} and {fake.shape[1]}")
    kwargs = dict(k=k, block=block, distance_dtype=distance_dtype, device=device)
    if reference_radii is None:
        reference_radii = manifold_radii(ref, **kwargs)
    ref_radii = reference_radii.to(device=device, dtype=torch.float32)
    fake_radii = manifold_radii(fake, **kwargs)
    ref_in = torch.zeros(ref.shape[0], dtype=torch.bool, device=device)
    fake_in = torch.zeros(fake.shape[0], dtype=torch.bool, device=device)
    for r in range(0, ref.shape[0], block):
        for c in range(0, fake.shape[0], block):
            # (rows, cols)
            d = _sq_distances(ref[r : r + block], fake[c : c + block], distance_dtype)
            ref_in[r : r + block] |= (d <= fake_radii[None, c : c + block]).any(1)
            fake_in[c : c + block] |= (d <= ref_radii[r : r + block, None]).any(0)
    return fake_in.double().mean().item(), ref_in.double().mean().item()


# -------------------------------------------------------------------------------------------- npz files


class NpzImages:
    """One uint8 image array (N, H, W, C) inside an ``.npz``, read in batches without loading it whole
    (``np.savez`` and ``np.savez_compressed`` files; a Fortran-ordered array is loaded whole)."""

    def __init__(self, path: str | os.PathLike, key: str) -> None:
        self.path, self.key = Path(path), key
        with self._member() as f:
            header = _read_npy_header(f)
        if header is None:
            arr = self._load_whole()
            self.shape, self.dtype, self._streams = arr.shape, arr.dtype, False
        else:
            self.shape, fortran, self.dtype = header
            self._streams = not fortran
        self.shape = tuple(int(s) for s in self.shape)
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] not in (1, 3):
            raise ValueError(
                f"{self.path}: {key!r} must be uint8 images (N, H, W, 3) (ADM's layout; pixels in [0, 255]), "
                f"got {self.dtype} {self.shape}"
            )

    def __len__(self) -> int:
        return self.shape[0]

    @contextlib.contextmanager
    def _member(self):
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            yield f

    def _load_whole(self) -> np.ndarray:
        with np.load(self.path) as z:
            return z[self.key]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive (b, H, W, C) uint8 batches, in file order."""
        if not self._streams:
            arr = self._load_whole()
            for i in range(0, len(arr), batch_size):
                yield arr[i : i + batch_size]
            return
        per_image = int(np.prod(self.shape[1:]))
        with self._member() as f:
            _read_npy_header(f)
            for i in range(0, self.shape[0], batch_size):
                b = min(batch_size, self.shape[0] - i)
                data = _read_exactly(f, b * per_image)
                yield np.frombuffer(data, dtype=np.uint8).reshape(b, *self.shape[1:])


def _read_npy_header(f) -> tuple | None:
    """(shape, fortran_order, dtype) of an .npy stream, positioned at its data; None for versions other than
    1.0 and 2.0 or object arrays (then the array is loaded whole)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        return None
    return None if dtype.hasobject else (shape, fortran, dtype)


def _read_exactly(f, size: int) -> bytearray:
    """``size`` bytes from a stream, into a writable buffer (so arrays over it are writable too)."""
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"truncated array data: expected {size} bytes, got {got}")
        got += n
    return buf


@dataclass
class NpzContents:
    """What an ADM-layout ``.npz`` holds: images (streamed), labels, statistics, snce's protocol record."""

    path: Path
    images: NpzImages | None
    labels: np.ndarray | None
    statistics: tuple[GaussianStatistics, GaussianStatistics] | None  # (pool_3, spatial)
    protocol: dict | None


def read_npz(path: str | os.PathLike, *, need_images: bool = False) -> NpzContents:
    """Open an ADM-layout ``.npz``: images under ``arr_0`` (or ``images``, as ``snce sample --npz`` writes),
    labels under ``arr_1`` or ``labels`` (1-D integers, one per image), statistics ``mu``/``sigma``/``mu_s``/
    ``sigma_s`` (all four or none), ``snce_protocol`` (JSON) when snce wrote it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    try:
        with np.load(path) as z:
            keys = set(z.files)
            stats = [z[k] for k in STAT_KEYS if k in keys]
            protocol = str(z["snce_protocol"]) if "snce_protocol" in keys else None
            raw_labels = {k: z[k] for k in LABEL_KEYS if k in keys}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz ({e})") from e
    image_key = next((k for k in IMAGE_KEYS if k in keys), None)
    images = NpzImages(path, image_key) if image_key else None
    if need_images and images is None:
        raise ValueError(
            f"{path}: no images (expected 'arr_0' uint8 (N, H, W, 3); keys: {sorted(keys)})"
        )
    if len(stats) not in (0, 4):
        raise ValueError(
            f"{path}: statistics need all of {STAT_KEYS}; found {sorted(keys & set(STAT_KEYS))}"
        )
    statistics = None
    if stats:
        mu, sigma, mu_s, sigma_s = stats
        statistics = (GaussianStatistics(mu, sigma), GaussianStatistics(mu_s, sigma_s))
    if images is None and statistics is None:
        raise ValueError(
            f"{path}: neither images ('arr_0') nor statistics ({', '.join(STAT_KEYS)})"
        )
    labels = None
    for arr in raw_labels.values():
        if arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer):
            if images is None or len(arr) == len(images):
                labels = arr
                break
    return NpzContents(path, images, labels, statistics, json.loads(protocol) if protocol else None)


def write_npz(
    path: str | os.PathLike,
    arrays: dict[str, np.ndarray | Iterator[np.ndarray]],
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> None:
    """Write an ``.npz`` that ``np.load`` and the ADM evaluator read, atomically (a temporary file, then a
    rename). Each value is an array, or an iterator of consecutive uint8 batches whose full shape is
    ``shapes[name] = (N, ...)``, so a large image array is never held whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_members(zf, arrays, shapes or {})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_members(zf: zipfile.ZipFile, arrays: dict, shapes: dict) -> None:
    for name, value in arrays.items():
        with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
            if isinstance(value, np.ndarray):
                np.lib.format.write_array(f, value, allow_pickle=False)
                continue
            shape = tuple(shapes[name])
            np.lib.format.write_array_header_2_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": shape}
            )
            written = 0
            for batch in value:
                batch = np.ascontiguousarray(batch, dtype=np.uint8)
                if batch.shape[1:] != shape[1:]:
                    raise ValueError(
                        f"{name}: a batch of shape {batch.shape}, expected (b, *{shape[1:]})"
                    )
                f.write(batch.tobytes())
                written += batch.shape[0]
            if written != shape[0]:
                raise ValueError(f"{name}: wrote {written} rows, declared {shape[0]}")


def write_reference(
    path: str | os.PathLike,
    images: np.ndarray | None,
    statistics: tuple[GaussianStatistics, GaussianStatistics] | None,
    *,
    labels: np.ndarray | None = None,
    protocol: dict | None = None,
) -> None:
    """A reference batch in ADM's layout: ``arr_0`` uint8 (R, H, W, 3), ``mu``/``sigma`` (pool_3) and
    ``mu_s``/``sigma_s`` (spatial) in float64; ``arr_1`` labels and ``snce_protocol`` when given."""
    arrays = {}
    if images is not None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        arrays["arr_0"] = images
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
    if statistics is not None:
        pool, spatial = statistics
        arrays.update(mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    if protocol is not None:
        arrays["snce_protocol"] = np.array(json.dumps(protocol, sort_keys=True))
    if not arrays:
        raise ValueError("a reference batch needs images or statistics")
    write_npz(path, arrays)


# -------------------------------------------------------------------------------------------- features


@dataclass
class Activations:
    """The ADM evaluator's features of one image set, float32 numpy, in file order."""

    pool: np.ndarray  # (N, 2048)
    spatial: np.ndarray  # (N, 2023)
    logits: np.ndarray  # (N, 1008)
    duplicates: int  # images that are byte-identical to an earlier one

    def statistics(self) -> tuple[GaussianStatistics, GaussianStatistics]:
        return GaussianStatistics.of(self.pool), GaussianStatistics.of(self.spatial)


@contextlib.contextmanager
def _no_tf32():
    """Full float32 convolutions and matmuls on GPUs that would otherwise use TF32 (10-bit mantissa)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def compute_activations(
    net: InceptionV3,
    batches: Iterator[np.ndarray],
    *,
    resize: str = "bilinear-antialias",
    total: int | None = None,
    progress: bool = False,
    desc: str = "features",
) -> Activations:
    """Features of uint8 batches (b, H, W, 3) through ``net.adm_features``; counts exact duplicate images."""
    if resize not in RESIZE_METHODS:
        raise ValueError(f"resize must be one of {RESIZE_METHODS}, got {resize!r}")
    pools, spatials, logits, seen, duplicates = [], [], [], set(), 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="img")
    with _no_tf32():
        for batch in batches:
            for img in batch:
                digest = hashlib.blake2b(img.tobytes(), digest_size=16).digest()
                duplicates += digest in seen
                seen.add(digest)
            out = net.adm_features(torch.from_numpy(np.ascontiguousarray(batch)), resize=resize)
            pools.append(out.pool.float().cpu().numpy())
            spatials.append(out.spatial.float().cpu().numpy())
            logits.append(out.logits.float().cpu().numpy())
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    if not pools:
        raise ValueError("no images to compute features of")
    return Activations(
        np.concatenate(pools), np.concatenate(spatials), np.concatenate(logits), duplicates
    )


def _file_record(path: Path) -> dict:
    from snce.files import sha256

    return {"path": str(path), "sha256": sha256(path), "bytes": path.stat().st_size}


def class_balance(labels: np.ndarray | None) -> dict | None:
    """Counts of each class present: {classes, min, max, balanced}; None without labels."""
    if labels is None:
        return None
    _, counts = np.unique(labels, return_counts=True)
    return {
        "classes": int(len(counts)),
        "min_per_class": int(counts.min()),
        "max_per_class": int(counts.max()),
        "balanced": bool(counts.min() == counts.max()),
    }


def _network(inception_weights, device) -> tuple[InceptionV3, dict]:
    path = resolve_weights_path(inception_weights)
    if path is None:
        raise FileNotFoundError(
            "the ADM protocol measures with the FID Inception-v3: pass --inception-weights PATH (a local copy "
            "of pt_inception-2015-12-05-6726825d.pth) or set $SNCE_INCEPTION_WEIGHTS; snce never downloads it"
        )
    net = load_inception(path).to(device)
    return net, {"name": FEATURE_NETWORK, "weights": _file_record(path)}


def _base_protocol(network: dict, resize: str, device) -> dict:
    import snce

    return {
        "definitions": "OpenAI ADM evaluator (guided-diffusion evaluations/evaluator.py), snce implementation",
        "feature_network": network,
        "features": {
            "fid": "pool_3 (2048)",
            "sfid": "mixed_6/conv = Mixed_6d.branch1x1 after BN+ReLU, channels 0-6, (H, W, C) order (2023)",
            "is": "softmax(pool_3 @ W), no bias, 1008 outputs",
            "precision_recall": "pool_3 (2048)",
        },
        "resize": {
            "method": resize,
            "size": [299, 299],
            "input_range": "uint8 [0, 255] -> (x - 128) / 128 after the resize",
        },
        "numerics": {
            "statistics": "float64 mean, np.cov (N - 1), scipy.linalg.sqrtm",
            "features": "float32, TF32 off",
            "snce": snce.__version__,
            "torch": torch.__version__,
            "device": str(device),
        },
    }


# ------------------------------------------------------------------------------------------- protocol


def evaluate(
    samples: str | os.PathLike,
    reference: str | os.PathLike,
    *,
    inception_weights: str | os.PathLike | None = None,
    resize: str = "bilinear-antialias",
    batch_size: int = BATCH_SIZE,
    device: str | torch.device = "cpu",
    k: int = PR_K,
    split_size: int = IS_SPLIT_SIZE,
    block: int = PR_BLOCK,
    distance_dtype: str = "float16",
    progress: bool = True,
) -> dict:
    """FID, sFID, IS, precision and recall of the samples ``.npz`` against the reference ``.npz``, with the
    protocol record (feature network and weight SHA-256, resize, counts, class balance, both files' SHA-256).

    Precision and recall are None when the reference holds statistics but no images.
    """
    net, network = _network(inception_weights, device)
    protocol = _base_protocol(network, resize, device)
    ref = read_npz(reference)
    fake = read_npz(samples, need_images=True)
    _check_reference_protocol(ref, network, resize)

    def features(images: NpzImages, desc: str) -> Activations:
        return compute_activations(
            net,
            images.batches(batch_size),
            resize=resize,
            total=len(images),
            progress=progress,
            desc=desc,
        )

    fake_acts = features(fake.images, "sample features")
    ref_acts = features(ref.images, "reference features") if ref.images is not None else None
    for name, acts in (("samples", fake_acts), ("reference", ref_acts)):
        if acts is not None and acts.duplicates:
            warnings.warn(
                f"{name}: {acts.duplicates} image(s) are exact copies of another (identical seeds on several "
                "ranks?)",
                stacklevel=2,
            )
    if ref.statistics is not None:
        ref_pool, ref_spatial = ref.statistics
        ref_source = "precomputed: mu/sigma, mu_s/sigma_s in the file"
    else:
        ref_pool, ref_spatial = ref_acts.statistics()
        ref_source = "computed from arr_0"
    fake_pool, fake_spatial = fake_acts.statistics()
    # samples first, as ADM's sample_stats.frechet_distance(ref_stats): sqrtm(S_samples @ S_reference)
    result: dict = {
        "fid": fake_pool.frechet_distance(ref_pool),
        "sfid": fake_spatial.frechet_distance(ref_spatial),
        "is": inception_score(fake_acts.logits, split_size),
        "precision": None,
        "recall": None,
    }
    pr_note = "reference has no images: not computed"
    if ref_acts is not None:
        result["precision"], result["recall"] = precision_recall(
            ref_acts.pool,
            fake_acts.pool,
            k=k,
            block=block,
            distance_dtype=distance_dtype,
            device=device,
        )
        pr_note = f"{len(ref_acts.pool)} reference images vs {len(fake_acts.pool)} samples"
    splits = is_split_sizes(len(fake_acts.logits), split_size)
    if len(splits) > 1 and splits[-1] < split_size:
        warnings.warn(
            f"IS: {len(fake_acts.logits)} samples make {len(splits)} splits of {split_size}, the last of only "
            f"{splits[-1]} (ADM's rule; 50,000 samples give 10 equal splits)",
            stacklevel=2,
        )
    balance = class_balance(fake.labels)
    if balance is not None and not balance["balanced"]:
        warnings.warn(
            f"samples: classes are not balanced ({balance['min_per_class']} to {balance['max_per_class']} per "
            "class); papers sample an equal number per class",
            stacklevel=2,
        )
    protocol["samples"] = {
        **_file_record(fake.path),
        "count": len(fake.images),
        "image_size": list(fake.images.shape[1:3]),
        "class_balance": balance,
        "duplicate_images": fake_acts.duplicates,
    }
    protocol["reference"] = {
        **_file_record(ref.path),
        "count": len(ref.images) if ref.images is not None else 0,
        "image_size": list(ref.images.shape[1:3]) if ref.images is not None else None,
        "statistics": ref_source,
        "made_by_snce": ref.protocol,
    }
    protocol["is"] = {"split_size": split_size, "splits": splits}
    protocol["precision_recall"] = {
        "k": k,
        "distance": f"squared Euclidean, {distance_dtype}"
        + (" with float32 fallback per block" if distance_dtype == "float16" else ""),
        "block": block,
        "sets": pr_note,
    }
    result["protocol"] = protocol
    return result


def _check_reference_protocol(ref: NpzContents, network: dict, resize: str) -> None:
    """A reference snce made records its weights and resize; warn when this run's differ (its statistics
    would then come from other features than the samples')."""
    if ref.protocol is None or ref.statistics is None:
        return
    theirs = ref.protocol.get("feature_network", {}).get("weights", {}).get("sha256")
    if theirs and theirs != network["weights"]["sha256"]:
        warnings.warn(
            f"{ref.path}: its statistics were computed with other Inception weights (SHA-256 {theirs[:12]}...)",
            stacklevel=3,
        )
    their_resize = ref.protocol.get("resize", {}).get("method")
    if their_resize and their_resize != resize:
        warnings.warn(
            f"{ref.path}: its statistics were computed with resize {their_resize!r}, this run uses {resize!r}",
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------------- references


def center_crop_adm(img: Image.Image, size: int) -> np.ndarray:
    """ADM's ImageNet preprocessing (guided-diffusion ``center_crop_arr``): halve with a box filter while the
    short side is at least 2 * size, resize (bicubic) so the short side is ``size``, crop the centre.
    Returns uint8 (size, size, 3)."""
    img = img.convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


def make_reference(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    size: int = 256,
    inception_weights: str | os.PathLike | None = None,
    resize: str = "bilinear-antialias",
    batch_size: int = BATCH_SIZE,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Write a reference batch from the real images under ``folder`` (one class per subfolder, or a flat
    folder): ``arr_0`` the images, ADM-cropped to ``size`` (:func:`center_crop_adm`), streamed to the file;
    ``mu``/``sigma``/``mu_s``/``sigma_s`` of their features; ``arr_1`` the class indices when there are
    subfolders; ``snce_protocol``. Returns the protocol record."""
    from snce.data.images import ImageFolder

    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"out must name an .npz file, got {str(out)!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if resize not in RESIZE_METHODS:
        raise ValueError(f"resize must be one of {RESIZE_METHODS}, got {resize!r}")
    items = ImageFolder(folder, size, split="all").items  # (path, class), readable files, sorted
    if len(items) < PR_K + 1:
        raise ValueError(
            f"{folder}: {len(items)} image(s); a reference batch needs at least {PR_K + 1}"
        )
    net, network = _network(inception_weights, device)
    acts: list[Activations] = []

    def batches() -> Iterator[np.ndarray]:
        for i in range(0, len(items), batch_size):
            batch = []
            for path, _ in items[i : i + batch_size]:
                try:
                    with Image.open(path) as img:
                        batch.append(center_crop_adm(img, size))
                except OSError as e:
                    raise ValueError(f"{path}: cannot be decoded ({e})") from e
            batch = np.stack(batch)
            acts.append(compute_activations(net, iter([batch]), resize=resize))
            yield batch

    labels = np.array([c for _, c in items], dtype=np.int64)
    classes = len({c for _, c in items})
    protocol = _base_protocol(network, resize, device)
    protocol["reference"] = {
        "folder": str(folder),
        "count": len(items),
        "image_size": [size, size],
        "crop": "ADM center_crop_arr: box-halving, bicubic short side to size, centre crop",
        "classes": classes,
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        # the images first (streamed), then their statistics, which exist only after that pass
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_members(zf, {"arr_0": batches()}, {"arr_0": (len(items), size, size, 3)})
            pool = np.concatenate([a.pool for a in acts])
            spatial = np.concatenate([a.spatial for a in acts])
            protocol["reference"]["duplicate_images"] = sum(a.duplicates for a in acts)
            pool_stats, spatial_stats = GaussianStatistics.of(pool), GaussianStatistics.of(spatial)
            arrays = {"arr_1": labels} if classes > 1 else {}
            arrays.update(
                mu=pool_stats.mu, sigma=pool_stats.sigma, mu_s=spatial_stats.mu, sigma_s=spatial_stats.sigma,
                snce_protocol=np.array(json.dumps(protocol, sort_keys=True)),
            )  # fmt: skip
            _write_members(zf, arrays, {})
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return protocol
