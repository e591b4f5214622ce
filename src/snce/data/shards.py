"""Token shards: a dataset turned into code indices once, read by generator training.

Layout of a shard directory::

    manifest.json             format, grid shape, codebook size / metric / hash, tokenizer config, counts
    shard_00000.safetensors   "indices" int32 (n, h, w), "labels" int64 (n,), ["latents" float16 (n, h, w, D)],
                              ["text" float16 (n, L, E), "text_mask" bool (n, L)], ["source" int32 (n, h, w)]
    shard_00001.safetensors   ...

``latents`` (optional) are the continuous encoder outputs the quantizer assigned, in the layout of the
indices with the code dimension last, so exact-latent SNCE targets can be built from them. The manifest's
``codebook_hash`` identifies the tokenizer that made the shards; :meth:`ShardManifest.check_tokenizer`
rejects decoding or SNCE targets with any other tokenizer.

``text`` / ``text_mask`` (optional) are each item's caption or instruction embedded by a text encoder
(:mod:`snce.text`; padding zeroed, mask True at real tokens); the raw texts ride along in each shard's
safetensors metadata (key ``"texts"``, a JSON list). The manifest's ``text_encoder`` records the encoder's spec,
dim, max_length and fingerprint; :meth:`ShardManifest.check_text_encoder` (and ``TokenShards(...,
text_encoder=...)``) refuse any other encoder, whose embeddings would mean something else. Shards written
before text existed have no such entry and load as before.

Editing shards (manifest ``edit: true``) hold triples: ``indices`` are the target image's tokens, ``source`` the
source image's tokens (same grid) and the text is the instruction.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
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
    # {"spec", "fingerprint", "dim", "max_length"} of the text encoder when text embeddings are stored
    text_encoder: dict | None = None
    edit: bool = False  # items are edits: "source" tokens beside the target's "indices"

    @property
    def has_latents(self) -> bool:
        return self.latent_dim is not None

    @property
    def has_text(self) -> bool:
        return self.text_encoder is not None

    @staticmethod
    def text_entry(encoder) -> dict:
        """The ``text_encoder`` entry for a :class:`snce.text.TextEncoder`."""
        return {
            "spec": encoder.spec, "fingerprint": encoder.fingerprint(), "dim": int(encoder.dim),
            "max_length": int(encoder.max_length),
        }  # fmt: skip

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_dict(self) -> dict:
        data = {**asdict(self), "grid": list(self.grid)}
        for key, absent in (("text_encoder", None), ("edit", False)):
            if data[key] == absent:  # shards without them keep the manifest they always had
                del data[key]
        return data

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

    def check_text_encoder(self, encoder) -> None:
        """Raise ValueError unless ``encoder`` (a TextEncoder, or its fingerprint as a str) made the stored text
        embeddings; the message names both encoders."""
        if not self.has_text:
            raise ValueError(
                "these token shards hold no text embeddings (made from a dataset without texts, or "
                "without --text-encoder); a text encoder cannot be checked against them"
            )
        got = encoder if isinstance(encoder, str) else encoder.fingerprint()
        want = self.text_encoder["fingerprint"]
        if got != want:
            given = "" if isinstance(encoder, str) else f" {encoder.spec}"
            raise ValueError(
                f"these token shards hold text embeddings of the text encoder {self.text_encoder['spec']} "
                f"(fingerprint {want[:16]}...), but the given text encoder{given} has fingerprint "
                f"{got[:16]}...: its embeddings mean something else; use the shards' encoder (or re-run "
                "`snce tokenize` with this one)"
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
        self._buf: dict[str, list[torch.Tensor]] = {
            "indices": [], "labels": [], "latents": [], "text": [], "text_mask": [], "source": [],
        }  # fmt: skip
        self._texts: list[str] = []
        self._buffered = 0

    def add(
        self,
        indices: torch.Tensor,
        labels: torch.Tensor,
        latents: torch.Tensor | None = None,
        *,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        texts: list[str] | None = None,
        source: torch.Tensor | None = None,
    ) -> None:
        """indices (B, h, w) int; labels (B,) int; latents (B, h, w, D) float when the manifest has latent_dim;
        text (B, L, E) float, text_mask (B, L) bool and texts (B strings) when the manifest has a
        text_encoder (L, E: its max_length and dim); source (B, h, w) int when the manifest is an edit one."""
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
        if (source is None) == self.manifest.edit:
            raise ValueError("source must be given exactly when the manifest has edit=True")
        if source is not None and source.shape != indices.shape:
            raise ValueError(
                f"source must be shaped like indices {tuple(indices.shape)}, got {tuple(source.shape)}"
            )
        self._check_text(indices.shape[0], text, text_mask, texts)
        # all checked: buffer
        if self.manifest.has_text:
            self._buf["text"].append(text.detach().to("cpu", torch.float16))
            self._buf["text_mask"].append(text_mask.detach().cpu())
            self._texts.extend(texts)
        if source is not None:
            self._buf["source"].append(source.detach().to("cpu", torch.int32))
        self._buf["indices"].append(indices.detach().to("cpu", torch.int32))
        self._buf["labels"].append(labels.detach().to("cpu", torch.int64))
        if latents is not None:
            self._buf["latents"].append(latents.detach().to("cpu", torch.float16))
        self._buffered += indices.shape[0]
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _check_text(self, n: int, text, text_mask, texts) -> None:
        if not self.manifest.has_text:
            if text is not None or text_mask is not None or texts is not None:
                raise ValueError(
                    "text embeddings need a manifest with a text_encoder (ShardManifest.text_entry)"
                )
            return
        L, E = self.manifest.text_encoder["max_length"], self.manifest.text_encoder["dim"]
        if text is None or text_mask is None or texts is None:
            raise ValueError(
                "text, text_mask and texts must be given: the manifest has a text_encoder"
            )
        if tuple(text.shape) != (n, L, E) or tuple(text_mask.shape) != (n, L):
            raise ValueError(
                f"text must be ({n}, {L}, {E}) and text_mask ({n}, {L}), got "
                f"{tuple(text.shape)} and {tuple(text_mask.shape)}"
            )
        if text_mask.dtype != torch.bool:
            raise ValueError(f"text_mask must be bool (True = token), got {text_mask.dtype}")
        if len(texts) != n or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts must be {n} strings")

    def _flush(self, count: int) -> None:
        tensors = {k: torch.cat(v) for k, v in self._buf.items() if v}
        name = f"shard_{len(self.manifest.shards):05d}.safetensors"
        metadata = None
        if self.manifest.has_text:
            metadata = {"texts": json.dumps(self._texts[:count])}
            self._texts = self._texts[count:]
        save_file(
            {k: v[:count].contiguous() for k, v in tensors.items()}, str(self.dir / name), metadata
        )
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

    Item i: ``{"indices": (L,) long, "label": long scalar[, "latents": (L, D) float32][, "text": (T, E)
    float32, "text_mask": (T,) bool][, "source": (L,) long]}`` with L = h * w tokens in raster order and T, E
    the text encoder's max_length and dim. Whole arrays: ``.indices`` (N, h, w) int32, ``.labels`` (N,),
    ``.latents`` (N, h, w, D) float16 or None, ``.text`` (N, T, E) float16 and ``.text_mask`` (N, T) bool or
    None, ``.texts`` (N strings) or None, ``.source`` (N, h, w) int32 or None.

    ``text_encoder`` (a TextEncoder or its fingerprint) is checked against the manifest before anything is
    read: shards embedded by another encoder are refused. ``load_text=False`` skips the embeddings.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        load_latents: bool = True,
        load_text: bool = True,
        text_encoder=None,
    ):
        self.dir = Path(directory)
        self.manifest = ShardManifest.load(self.dir)
        if text_encoder is not None:
            self.manifest.check_text_encoder(text_encoder)
        skip = set() if load_latents else {"latents"}
        if not load_text:
            skip |= {"text", "text_mask"}
        parts: dict[str, list[torch.Tensor]] = {
            "indices": [], "labels": [], "latents": [], "text": [], "text_mask": [], "source": [],
        }  # fmt: skip
        texts: list[str] = []
        for shard in self.manifest.shards:
            path = self.dir / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in the manifest is missing")
            with verified(path):
                tensors = load_file(str(path))
                if self.manifest.has_text:
                    with safe_open(str(path), "pt") as f:
                        texts.extend(json.loads((f.metadata() or {}).get("texts", "[]")))
            if tensors["indices"].shape[0] != shard["count"]:
                raise ValueError(
                    f"shard {path} holds {tensors['indices'].shape[0]} samples, manifest says {shard['count']}"
                )
            for k in parts:
                if k in tensors and k not in skip:
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
        self.text = self.text_mask = None
        if self.manifest.has_text and load_text:
            L, E = self.manifest.text_encoder["max_length"], self.manifest.text_encoder["dim"]
            self.text = (
                torch.cat(parts["text"])
                if parts["text"]
                else torch.zeros(0, L, E, dtype=torch.float16)
            )
            self.text_mask = (
                torch.cat(parts["text_mask"])
                if parts["text_mask"]
                else torch.zeros(0, L, dtype=torch.bool)
            )
        self.texts = texts if self.manifest.has_text else None
        self.source = None
        if self.manifest.edit:
            self.source = (
                torch.cat(parts["source"])
                if parts["source"]
                else torch.zeros(0, h, w, dtype=torch.int32)
            )
        if self.manifest.has_text and len(texts) != len(self.indices):
            raise ValueError(
                f"{self.dir}: {len(texts)} texts stored for {len(self.indices)} samples"
            )

    def __len__(self) -> int:
        return self.indices.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"indices": self.indices[i].reshape(-1).long(), "label": self.labels[i]}
        if self.latents is not None:
            item["latents"] = self.latents[i].reshape(self.manifest.seq_len, -1).float()
        if self.text is not None:
            item["text"], item["text_mask"] = self.text[i].float(), self.text_mask[i]
        if self.source is not None:
            item["source"] = self.source[i].reshape(-1).long()
        return item
