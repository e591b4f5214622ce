"""Token shards: a dataset turned into code indices once, read by generator training.

Layout of a shard directory::

    manifest.json             format, grid shape, codebook size / metric / hash, tokenizer config, counts
    shard_00000.safetensors   "indices" int32 (n, h, w), "labels" int64 (n,), ["latents" float16 (n, h, w, D)]
    shard_00001.safetensors   ...

``latents`` (optional) are the continuous encoder outputs the quantizer assigned, in the layout of the
indices with the code dimension last, so exact-latent SNCE targets can be built from them. The manifest's
``codebook_hash`` identifies the tokenizer that made the shards; :meth:`ShardManifest.check_tokenizer`
rejects decoding or SNCE targets with any other tokenizer.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from snce.config import atomic_write_text
from snce.files import verified

FORMAT = "snce-token-shards/1"
MANIFEST = "manifest.json"


@dataclass
class ShardManifest:
    """What ``manifest.json`` holds; ``shards`` lists ``{"file": name, "count": n}`` in order."""

    grid: tuple[int, int]  # (h, w) tokens per image
    codebook_size: int
    metric: str
    codebook_hash: str
    tokenizer: dict  # the tokenizer's config (Tokenizer.config.to_dict())
    num_classes: int
    latent_dim: int | None = None  # D when latents are stored, else None
    class_names: list[str] = field(default_factory=list)
    dataset: dict = field(default_factory=dict)  # the data config the shards were made from
    num_samples: int = 0
    shards: list[dict] = field(default_factory=list)
    format: str = FORMAT

    @property
    def has_latents(self) -> bool:
        return self.latent_dim is not None

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_dict(self) -> dict:
        return {**asdict(self), "grid": list(self.grid)}

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ShardManifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a token shard directory (no {MANIFEST})")
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(
                f"{path}: unknown shard format {data.get('format')!r}, expected {FORMAT!r}"
            )
        data["grid"] = tuple(data["grid"])
        return cls(**data)

    def check_tokenizer(self, tokenizer) -> None:
        """Raise ValueError unless ``tokenizer.codebook_hash()`` is the hash these shards were made with."""
        got = tokenizer.codebook_hash()
        if got != self.codebook_hash:
            raise ValueError(
                f"these token shards were made by a tokenizer with codebook hash {self.codebook_hash[:16]}..., "
                f"but the given tokenizer's codebook hashes to {got[:16]}...; decode and build SNCE targets "
                "with the tokenizer that made the shards (or re-run `snce tokenize`)"
            )


class ShardWriter:
    """Append batches of tokens, then :meth:`close` to write the manifest (the directory's commit point).

    Refuses a directory that already holds a manifest unless ``overwrite=True`` (then it is replaced).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        manifest: ShardManifest,
        shard_size: int = 65536,
        overwrite: bool = False,
    ):
        self.dir = Path(directory)
        if (self.dir / MANIFEST).exists():
            if not overwrite:
                raise FileExistsError(
                    f"{self.dir} already holds token shards; pass --overwrite to replace them"
                )
            (self.dir / MANIFEST).unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("shard_*.safetensors"):  # left by a replaced or unfinished run
            stale.unlink()
        self.manifest, self.shard_size = manifest, shard_size
        self.manifest.shards, self.manifest.num_samples = [], 0
        self._buf: dict[str, list[torch.Tensor]] = {"indices": [], "labels": [], "latents": []}
        self._buffered = 0

    def add(
        self, indices: torch.Tensor, labels: torch.Tensor, latents: torch.Tensor | None = None
    ) -> None:
        """indices (B, h, w) int; labels (B,) int; latents (B, h, w, D) float when the manifest has latent_dim."""
        h, w = self.manifest.grid
        if indices.dim() != 3 or tuple(indices.shape[1:]) != (h, w):
            raise ValueError(f"indices must be (B, {h}, {w}), got {tuple(indices.shape)}")
        if labels.shape != indices.shape[:1]:
            raise ValueError(f"labels must be ({indices.shape[0]},), got {tuple(labels.shape)}")
        if (latents is None) != (not self.manifest.has_latents):
            raise ValueError("latents must be given exactly when the manifest has a latent_dim")
        if latents is not None and tuple(latents.shape) != (
            *indices.shape,
            self.manifest.latent_dim,
        ):
            raise ValueError(
                f"latents must be (B, {h}, {w}, {self.manifest.latent_dim}), got {tuple(latents.shape)}"
            )
        self._buf["indices"].append(indices.detach().to("cpu", torch.int32))
        self._buf["labels"].append(labels.detach().to("cpu", torch.int64))
        if latents is not None:
            self._buf["latents"].append(latents.detach().to("cpu", torch.float16))
        self._buffered += indices.shape[0]
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, count: int) -> None:
        tensors = {k: torch.cat(v) for k, v in self._buf.items() if v}
        name = f"shard_{len(self.manifest.shards):05d}.safetensors"
        save_file({k: v[:count].contiguous() for k, v in tensors.items()}, str(self.dir / name))
        self._buf = {k: [tensors[k][count:]] if k in tensors else [] for k in self._buf}
        self._buffered -= count
        self.manifest.shards.append({"file": name, "count": count})
        self.manifest.num_samples += count

    def close(self) -> ShardManifest:
        if self._buffered:
            self._flush(self._buffered)
        atomic_write_text(self.dir / MANIFEST, json.dumps(self.manifest.to_dict(), indent=2) + "\n")
        return self.manifest


class TokenShards(Dataset):
    """A shard directory as a Dataset (all shards loaded into memory).

    Item i: ``{"indices": (L,) long, "label": long scalar[, "latents": (L, D) float32]}`` with
    L = h * w tokens in raster order. Whole arrays: ``.indices`` (N, h, w) int32, ``.labels`` (N,),
    ``.latents`` (N, h, w, D) float16 or None.
    """

    def __init__(self, directory: str | os.PathLike, *, load_latents: bool = True):
        self.dir = Path(directory)
        self.manifest = ShardManifest.load(self.dir)
        parts: dict[str, list[torch.Tensor]] = {"indices": [], "labels": [], "latents": []}
        for shard in self.manifest.shards:
            path = self.dir / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in the manifest is missing")
            with verified(path):
                tensors = load_file(str(path))
            if tensors["indices"].shape[0] != shard["count"]:
                raise ValueError(
                    f"shard {path} holds {tensors['indices'].shape[0]} samples, manifest says {shard['count']}"
                )
            for k in parts:
                if k in tensors and (k != "latents" or load_latents):
                    parts[k].append(tensors[k])
        h, w = self.manifest.grid
        self.indices = (
            torch.cat(parts["indices"])
            if parts["indices"]
            else torch.zeros(0, h, w, dtype=torch.int32)
        )
        self.labels = (
            torch.cat(parts["labels"]) if parts["labels"] else torch.zeros(0, dtype=torch.int64)
        )
        self.latents = torch.cat(parts["latents"]) if parts["latents"] else None

    def __len__(self) -> int:
        return self.indices.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"indices": self.indices[i].reshape(-1).long(), "label": self.labels[i]}
        if self.latents is not None:
            item["latents"] = self.latents[i].reshape(self.manifest.seq_len, -1).float()
        return item
