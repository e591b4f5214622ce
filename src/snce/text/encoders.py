"""Text encoders: the one place snce turns captions and instructions into the embeddings generators condition on.

A text encoder maps a batch of strings to a fixed-length sequence of embeddings and a padding mask::

    encode(texts)  ->  embeddings (B, L, E) float32,  mask (B, L) bool (True = a real token)

with L = ``max_length`` (longer texts are truncated, shorter ones padded) and E = ``dim``. Padded positions
hold zeros. The generators project the embeddings into prefix tokens and attend only where the mask is True
(LlamaGen's text-to-image recipe, Sun et al. 2024, arXiv 2406.06525, with T5 features).

Two kinds, chosen by a spec dict (:func:`build_text_encoder`):

    kind        spec                                               needs
    "builtin"   {"kind": "builtin", "dim": 64, "max_length": 32,   nothing: word vectors are hashed from the
                 "seed": 0}                                         words, position is a sinusoid
    "hf"        {"kind": "hf", "path": DIR, "max_length": None,    ``transformers`` (the ``snce[text]`` extra)
                 "dtype": "float32"}                                and a local model directory

:meth:`TextEncoder.fingerprint` is a SHA-256 of what the embeddings mean (weights, vocabulary, max_length,
the adapter's rules); token shards record it so that shards embedded by one encoder refuse another
(:meth:`snce.data.ShardManifest.check_text_encoder`), the way ``codebook_hash`` ties indices to a tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

KINDS = ("builtin", "hf")
# texts whose encodings enter every fingerprint: a change to tokenisation or embedding rules shows up in them
_PROBES = (
    "a large red circle on the left and a small blue square at the bottom",
    "make the triangle green",
    "move the square left",
    "",
)


class TextEncoder(ABC):
    """Strings -> ``(embeddings (B, L, E) float32, mask (B, L) bool)`` on :attr:`device`.

    Attributes: ``dim`` (E), ``max_length`` (L), ``device``. :attr:`spec` is the dict that
    :func:`build_text_encoder` rebuilds this encoder from (token shards store it beside the fingerprint).
    """

    dim: int
    max_length: int
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``texts`` (B strings) -> embeddings (B, L, E) float32 (zeros at padding), mask (B, L) bool."""

    @abstractmethod
    def fingerprint(self) -> str:
        """SHA-256 hex digest of what the embeddings mean: weights, vocabulary, max_length, adapter rules."""

    @property
    @abstractmethod
    def spec(self) -> dict:
        """The spec dict :func:`build_text_encoder` rebuilds this encoder from."""

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(texts)

    def _check_texts(self, texts) -> list[str]:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, got one string (wrap it in a list)")
        texts = list(texts)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be strings, got {bad[0]}")
        return texts


# ----------------------------------------------------------------------------------------------- builtin


class BuiltinTextEncoder(TextEncoder):
    """A text encoder without weights, for the demo and tests: hashed word vectors plus sinusoidal positions.

    Text is lower-cased and split into words (runs of letters and digits; punctuation is dropped), cut to
    ``max_length - 1`` words and closed by an end token, so every text, even "", has at least one real token.
    Token i with word w is embedded as

        e_i = v(w) + p(i),   v(w)_j = sqrt(3) (2 u_j(w) - 1),   p(i)_{2k} = sin(i / 10000^{2k/E}),
                                                               p(i)_{2k+1} = cos(i / 10000^{2k/E})

    where u(w) in (0, 1)^E are SHAKE-256 bytes of (seed, w) read as uint32: every word has its own vector of
    unit-variance entries (no vocabulary, no unknown words; two words share a vector with probability ~0), the
    same on every machine and torch version, and p makes "red circle, blue square" differ from
    "blue circle, red square". Nothing is learned: a generator's input projection learns what the words mean.
    """

    def __init__(self, *, dim: int = 64, max_length: int = 32, seed: int = 0):
        for name, value, low in (("dim", dim, 2), ("max_length", max_length, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if dim % 2:
            raise ValueError(f"dim must be even (sin/cos position pairs), got {dim}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.dim, self.max_length, self.seed = dim, max_length, seed
        self.device = torch.device("cpu")
        pos = torch.arange(max_length, dtype=torch.float64)[:, None]  # (L, 1)
        freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (E/2,)
        table = torch.zeros(max_length, dim, dtype=torch.float64)
        table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        self._positions = table.float()  # (L, E)
        self._fingerprint: str | None = None

    END = "</s>"  # the end token's word (no text word can equal it: words are letters and digits)

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    def tokens(self, text: str) -> list[str]:
        """The words kept (at most max_length - 1) and the end token."""
        return [*self.words(text)[: self.max_length - 1], self.END]

    def word_vector(self, word: str) -> torch.Tensor:
        """v(word): (E,) float32."""
        return _hashed_vector(word, self.seed, self.dim).clone()

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = self._check_texts(texts)
        out = torch.zeros(len(texts), self.max_length, self.dim)  # (B, L, E)
        mask = torch.zeros(len(texts), self.max_length, dtype=torch.bool)  # (B, L)
        for b, text in enumerate(texts):
            tokens = self.tokens(text)
            out[b, : len(tokens)] = torch.stack(
                [_hashed_vector(w, self.seed, self.dim) for w in tokens]
            )
            mask[b, : len(tokens)] = True
        out += self._positions * mask[..., None]
        return out, mask

    def fingerprint(self) -> str:
        """Over the spec, the rule's name and the words and word vectors of fixed probe texts: exact on every
        machine (integer hashing and correctly rounded arithmetic), unlike the sinusoid, whose last bit may
        follow the CPU's libm; its formula is part of the rule's name."""
        if self._fingerprint is None:
            h = hashlib.sha256(
                json.dumps({**self.spec, "rule": "shake256-words+sinusoid/1"}).encode()
            )
            for text in _PROBES:
                tokens = self.tokens(text)
                h.update(json.dumps(tokens).encode())
                for w in tokens:
                    h.update(_hashed_vector(w, self.seed, self.dim).numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @property
    def spec(self) -> dict:
        return {
            "kind": "builtin",
            "dim": self.dim,
            "max_length": self.max_length,
            "seed": self.seed,
        }

    def __repr__(self) -> str:
        return f"BuiltinTextEncoder(dim={self.dim}, max_length={self.max_length}, seed={self.seed})"


@lru_cache(maxsize=65536)
def _hashed_vector(word: str, seed: int, dim: int) -> torch.Tensor:
    """v(word), (E,) float32; cached, so callers must not modify it."""
    raw = hashlib.shake_256(f"snce-builtin-text|{seed}|{word}".encode()).digest(4 * dim)
    u = (np.frombuffer(raw, dtype="<u4").astype(np.float64) + 0.5) / 2.0**32  # (E,) in (0, 1)
    return torch.from_numpy((math.sqrt(3.0) * (2.0 * u - 1.0)).astype(np.float32))  # mean 0, var 1


# ---------------------------------------------------------------------------------------- Hugging Face

# model_type -> the class that loads only the text encoder (AutoModel would build T5's decoder too, or a
# whole CLIP/SigLIP model that wants images); any other model_type goes through AutoModel
_ENCODER_CLASSES = {
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
    "clip": "CLIPTextModel",
    "clip_text_model": "CLIPTextModel",
    "siglip": "SiglipTextModel",
    "siglip_text_model": "SiglipTextModel",
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_HF_MAX_LENGTH = 128


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "a Hugging Face text encoder needs the `transformers` package, which is not installed: "
            "pip install 'snce[text]' (or use the builtin encoder: {'kind': 'builtin'})"
        ) from e
    return transformers


class HFTextEncoder(TextEncoder):
    """A local Hugging Face text encoder directory (T5 / mT5 / UMT5 encoder, CLIP or SigLIP text model, BERT-like
    encoders): its tokenizer and model, loaded with ``local_files_only`` (snce downloads nothing).

    The embeddings are the model's ``last_hidden_state`` over the tokenizer's ids, padded to ``max_length``
    (default: the smallest of the tokenizer's ``model_max_length``, the model's ``max_position_embeddings``
    and 128) with the tokenizer's own special tokens (T5 appends ``</s>``, CLIP wraps in start/end tokens);
    padded positions are zeroed. Encoder-decoder models other than the T5 family use their encoder.
    ``dtype`` ("float32", "bfloat16", "float16") is the weights' dtype; outputs are float32 on ``device``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_length: int | None = None,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
    ):
        directory = Path(path).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(
                f"Hugging Face text encoder directory {str(path)!r} does not exist (or is not a directory); "
                "snce downloads nothing: save or download the model first (e.g. `huggingface-cli download "
                "google/flan-t5-base --local-dir DIR`) and give that directory"
            )
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"{directory} has no config.json: not a Hugging Face model directory (write one with "
                "model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR))"
            )
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
        if max_length is not None and (
            not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1
        ):
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        transformers = _import_transformers()
        self.path, self.dtype = directory.resolve(), dtype
        config = transformers.AutoConfig.from_pretrained(self.path, local_files_only=True)
        name = _ENCODER_CLASSES.get(config.model_type)
        model_cls = getattr(transformers, name) if name else transformers.AutoModel
        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar per load
        try:
            model = model_cls.from_pretrained(self.path, local_files_only=True)
        finally:
            if bars:
                transformers.utils.logging.enable_progress_bar()
        if name is None and getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        self.model = model.to(device=device, dtype=_DTYPES[dtype]).eval().requires_grad_(False)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            self.path, local_files_only=True
        )
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(
                    f"the tokenizer in {directory} has neither a pad nor an end token to pad with"
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token  # padding is masked out anyway
        cfg = self.model.config
        self.dim = int(getattr(cfg, "hidden_size", None) or cfg.d_model)
        self._spec_max_length = max_length
        if max_length is None:
            limits = [DEFAULT_HF_MAX_LENGTH, getattr(cfg, "max_position_embeddings", None)]
            limits.append(self.tokenizer.model_max_length)
            max_length = min(int(x) for x in limits if isinstance(x, int) and 0 < x < 10**6)
        self.max_length = max_length
        self.device = torch.device(device)
        self._fingerprint: str | None = None

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask, (B, L) each, on the CPU."""
        return self.tokenizer(
            self._check_texts(texts), padding="max_length", truncation=True,
            max_length=self.max_length, return_tensors="pt",
        )  # fmt: skip

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenize(texts)
        mask = batch["attention_mask"].to(self.device).bool()  # (B, L)
        if mask.shape[0] == 0:
            return torch.zeros(0, self.max_length, self.dim, device=self.device), mask
        out = self.model(
            input_ids=batch["input_ids"].to(self.device), attention_mask=mask.long()
        ).last_hidden_state  # (B, L, E)
        return out.float() * mask[..., None], mask

    def fingerprint(self) -> str:
        """Over the weights (names, dtypes, shapes, bytes), the vocabulary and special tokens, the token ids
        of fixed probe texts (normalisation and merge rules), max_length and the loading class; computed once
        (hashing reads every weight: seconds for a billion parameters)."""
        if self._fingerprint is None:
            h = hashlib.sha256(b"snce-hf-text/1")
            h.update(json.dumps([type(self.model).__name__, self.max_length]).encode())
            for name, t in sorted(self.model.state_dict().items()):
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                flat = t.detach().cpu().contiguous().reshape(-1)  # 1-D: any dtype views as bytes
                h.update(flat.view(torch.uint8).numpy().tobytes())
            vocab = sorted(self.tokenizer.get_vocab().items())
            h.update(json.dumps([vocab, self.tokenizer.all_special_tokens]).encode())
            h.update(self.tokenize(list(_PROBES))["input_ids"].numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @property
    def spec(self) -> dict:
        return {
            "kind": "hf", "path": str(self.path), "max_length": self._spec_max_length, "dtype": self.dtype,
        }  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"HFTextEncoder({str(self.path)!r}, model={type(self.model).__name__}, dim={self.dim}, "
            f"max_length={self.max_length}, dtype={self.dtype})"
        )


# --------------------------------------------------------------------------------------------- building

_OPTIONS = {"builtin": ("dim", "max_length", "seed"), "hf": ("path", "max_length", "dtype")}


def parse_text_encoder(text: str) -> dict:
    """A command-line spec -> spec dict: ``builtin``, ``hf:DIR`` or a JSON object."""
    text = text.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"text encoder spec {text!r} is not valid JSON: {e}") from e
        if not isinstance(spec, dict):
            raise ValueError(f"text encoder spec must be a JSON object, got {text!r}")
        return spec
    if text == "builtin":
        return {"kind": "builtin"}
    if text.startswith("hf:") and len(text) > 3:
        return {"kind": "hf", "path": text[3:]}
    raise ValueError(
        f"text encoder spec must be 'builtin', 'hf:DIR' or a JSON object such as "
        f'\'{{"kind": "builtin", "dim": 64}}\', got {text!r}'
    )


def build_text_encoder(spec: dict | str, *, device: str | torch.device = "cpu") -> TextEncoder:
    """A text encoder from its spec: ``{"kind": "builtin", ...}`` or ``{"kind": "hf", "path": DIR, ...}``
    (see the module docstring for the options), or the command-line form (:func:`parse_text_encoder`).
    ``device`` places a Hugging Face model; the builtin encoder computes on the CPU."""
    if isinstance(spec, str):
        spec = parse_text_encoder(spec)
    if not isinstance(spec, dict):
        raise TypeError(f"text encoder spec must be a dict or str, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"text encoder kind must be one of {KINDS}, got {kind!r}")
    options = {k: v for k, v in spec.items() if k != "kind"}
    unknown = sorted(set(options) - set(_OPTIONS[kind]))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for a {kind!r} text encoder; it takes {list(_OPTIONS[kind])}"
        )
    if kind == "builtin":
        return BuiltinTextEncoder(**options)
    if "path" not in options:
        raise ValueError("an 'hf' text encoder spec needs 'path': the local model directory")
    return HFTextEncoder(options.pop("path"), device=device, **options)
