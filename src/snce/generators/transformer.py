"""Llama-style transformer pieces shared by both generator families, and their common base class.

Follows LlamaGen (FoundationVision/LlamaGen, ``autoregressive/models/gpt.py``): pre-norm RMSNorm blocks,
SwiGLU feed-forward, 2-D rotary position embeddings over the token grid, one class-embedding prefix token
(index ``num_classes`` is the "null" class used for classifier-free guidance), class dropout during training,
and an untied, zero-initialised output head ``Linear(dim, vocab_size, bias=False)``.

Shapes: B batch, L sequence length (prefix + tokens), N = grid_h * grid_w image tokens, H model width,
K codebook size (``vocab_size``), nh heads, hd = H / nh head width.

Models return hidden states (B, N, H), never logits: training feeds ``hidden`` and ``head.weight`` to a fused
linear loss (``snce.generators.objectives``), so the (tokens x K) logits are never held at once.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from snce.files import check_file, record_checksums, verified

# Named sizes: (n_layers, dim, n_heads). B to 3B are LlamaGen's class-conditional GPT sizes (Sun et al. 2024,
# arXiv 2406.06525, Table 6; ``GPT_B`` .. ``GPT_3B`` in ``autoregressive/models/gpt.py``); the parameter counts in
# the comments hold for the autoregressive family at 16,384 codes and 1,000 classes (tests/generators/
# test_presets.py counts them on the meta device). The SwiGLU width follows LlamaGen's rule (``ffn_width``).
# The models from XL up are meant for sharded training: ``train.parallel: fsdp`` (snce.train.distributed).
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layers=4, dim=128, n_heads=4),  # ~1M parameters + embeddings: a minute on a CPU
    "small": dict(n_layers=8, dim=256, n_heads=8),
    "B": dict(n_layers=12, dim=768, n_heads=12),  # 111M
    "L": dict(n_layers=24, dim=1024, n_heads=16),  # 343M
    "XL": dict(n_layers=36, dim=1280, n_heads=20),  # 775M
    "XXL": dict(n_layers=48, dim=1536, n_heads=24),  # 1.4B
    "3B": dict(n_layers=24, dim=3200, n_heads=32),  # 3.1B (head width 100)
}


@dataclass
class GeneratorConfig:
    """Architecture of a generator; fields shared by both families.

    vocab_size: K, the tokenizer's codebook size. grid: (h, w) token grid of one image.
    num_classes: number of class labels; 0 makes an unconditional model (the prefix is then a learned start token).
    ffn_hidden: SwiGLU width; None -> LlamaGen's rule, 2/3 * 4 * dim rounded up to a multiple of 256.
    dropout: on token embeddings, attention output and feed-forward output (LlamaGen: 0.1).
    class_dropout: probability of replacing a label by the null class while training (for CFG; LlamaGen: 0.1).
    """

    family: ClassVar[str] = ""

    vocab_size: int
    grid: tuple[int, int] = (16, 16)
    num_classes: int = 0
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_hidden: int | None = None
    dropout: float = 0.0
    class_dropout: float = 0.1
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        self.grid = tuple(int(g) for g in self.grid)
        _check_int(self.vocab_size, "vocab_size", 2)
        if len(self.grid) != 2:
            raise ValueError(f"grid must be (height, width) in tokens, got {self.grid!r}")
        for g in self.grid:
            _check_int(g, "grid", 1)
        _check_int(self.num_classes, "num_classes", 0)
        for name in ("dim", "n_layers", "n_heads"):
            _check_int(getattr(self, name), name, 1)
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 4:
            raise ValueError(
                f"dim / n_heads must be an integer divisible by 4 (2-D RoPE rotates pairs along each axis), "
                f"got dim={self.dim}, n_heads={self.n_heads}"
            )
        if self.ffn_hidden is not None:
            _check_int(self.ffn_hidden, "ffn_hidden", 1)
        for name in ("dropout", "class_dropout"):
            p = getattr(self, name)
            if not (isinstance(p, int | float) and 0.0 <= p < 1.0):
                raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")

    @property
    def seq_len(self) -> int:
        """N, image tokens per sample."""
        return self.grid[0] * self.grid[1]

    @property
    def ffn_width(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 256 * math.ceil(int(2 * 4 * self.dim / 3) / 256)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return {"family": self.family, **d}

    @classmethod
    def from_dict(cls, d: dict) -> GeneratorConfig:
        d = dict(d)
        family = d.pop("family", cls.family)
        if family != cls.family:
            raise ValueError(f"config is for a {family!r} generator, not {cls.family!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} keys {unknown}; expected a subset of {sorted(known)}"
            )
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> GeneratorConfig:
        """A named size (``tiny``, ``small``, ``B``, ``L``, ``XL``, ``XXL``, ``3B``) plus overrides (vocab_size is
        required)."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (or float64 for float64 inputs)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), the Llama feed-forward."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def rope_2d(grid: tuple[int, int], head_dim: int, n_prefix: int, base: float = 10000.0):
    """Rotary tables for ``n_prefix`` prefix tokens followed by a row-major (h, w) grid.

    The first half of each head's rotation pairs turns with the row index, the second half with the column
    index (LlamaGen's 2-D RoPE); prefix tokens are not rotated. Returns cos, sin: (n_prefix + h*w, hd/2).
    """
    h, w = grid
    freqs = 1.0 / base ** (
        torch.arange(0, head_dim // 2, 2, dtype=torch.float64) / (head_dim // 2)
    )  # (hd/4,)
    rows = torch.arange(h, dtype=torch.float64)[:, None, None] * freqs  # (h, 1, hd/4)
    cols = torch.arange(w, dtype=torch.float64)[None, :, None] * freqs  # (1, w, hd/4)
    angles = torch.cat([rows.expand(h, w, -1), cols.expand(h, w, -1)], dim=-1).reshape(h * w, -1)
    angles = torch.cat([torch.zeros(n_prefix, angles.shape[1], dtype=angles.dtype), angles])
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1) of x (B, nh, L, hd) by the angles of cos/sin (L, hd/2)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache:
    """Keys and values of every layer for incremental decoding: (B, nh, max_len, hd) per layer."""

    def __init__(
        self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int, *, dtype, device
    ):
        shape = (batch, n_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = 0  # positions filled so far


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, cos, sin, *, causal: bool, cache: KVCache | None = None, layer: int = 0):
        """x (B, L, H) at positions [start, start + L), start = cache.length (0 without a cache)."""
        B, L, H = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, H // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, nh, L, hd)
        mask, is_causal = None, causal
        if cache is not None:
            start = cache.length
            cache.k[layer][:, :, start : start + L] = k
            cache.v[layer][:, :, start : start + L] = v
            k, v = cache.k[layer][:, :, : start + L], cache.v[layer][:, :, : start + L]
            q = q.to(k.dtype)  # under autocast q is bf16 while the cache keeps the weights' dtype
            if (
                causal and start > 0
            ):  # queries at start..start+L-1 see keys up to their own position
                is_causal = False
                mask = (
                    torch.ones(L, start + L, dtype=torch.bool, device=x.device).tril(start)
                    if L > 1
                    else None
                )
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, L, H)))


class Block(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.dropout)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_width, cfg.dropout)
        # torch.compile'd Block.body, shared by all blocks (GeneratorModel.configure_training); None = eager
        self.compiled_body = None

    def forward(self, x, cos, sin, *, causal: bool, cache: KVCache | None = None, layer: int = 0):
        # The compiled function runs inside this call, so module hooks (e.g. FSDP's all-gather) stay eager
        # around it; the KV-cache path of sampling always runs eagerly.
        if cache is None and self.compiled_body is not None:
            return self.compiled_body(self, x, cos, sin, causal)
        return self.body(x, cos, sin, causal, cache, layer)

    def body(self, x, cos, sin, causal: bool, cache: KVCache | None = None, layer: int = 0):
        x = x + self.attn(self.attn_norm(x), cos, sin, causal=causal, cache=cache, layer=layer)
        return x + self.ffn(self.ffn_norm(x))


class GeneratorModel(nn.Module):
    """Class prefix + token embeddings -> transformer -> RMSNorm; the head is used by the loss or the sampler.

    Subclasses set ``config_class``, ``causal`` and ``extra_tokens`` (input ids beyond the codebook, e.g. [MASK]).
    """

    config_class: ClassVar[type[GeneratorConfig]] = GeneratorConfig
    causal: ClassVar[bool] = True
    extra_tokens: ClassVar[int] = 0

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"config must be a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size + self.extra_tokens, config.dim)
        self.cls_emb = nn.Embedding(config.num_classes + 1, config.dim)  # last row: null class
        self.emb_drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = rope_2d(config.grid, config.dim // config.n_heads, 1, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        nn.init.zeros_(self.head.weight)
        self.activation_checkpointing = False  # see configure_training

    def configure_training(
        self,
        *,
        activation_checkpointing: bool = False,
        compile: bool = False,
        compile_options: dict | None = None,
    ) -> None:
        """Execution options for training; the weights, their names and the outputs stay as they are.

        activation_checkpointing: keep only each block's input (B, L, H) in the forward and recompute the
        block's activations in the backward (``torch.utils.checkpoint``, non-reentrant; the RNG state is
        restored, so dropout repeats). Applies to cache-free forwards with gradients on.
        compile: run every block's cache-free forward through one ``torch.compile``'d ``Block.body``
        (``compile_options`` are passed to ``torch.compile``); blocks of one shape share its graphs. Sampling
        with a KV cache stays eager. Calling this again replaces both settings.
        """
        self.activation_checkpointing = bool(activation_checkpointing)
        body = torch.compile(Block.body, **(compile_options or {})) if compile else None
        for block in self.layers:
            block.compiled_body = body

    def shard_units(self) -> list[nn.Module]:
        """The submodules a sharded (FSDP) trainer wraps one unit each: the transformer blocks.

        Everything else (embeddings, final norm, output head) forms the root unit, which the trainer gathers
        once per forward and keeps gathered through the backward, so the fused loss reads the whole head
        weight as one tensor (``snce.train.distributed.shard_model``).
        """
        return list(self.layers)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=self.config.init_std)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def head_weight(self) -> torch.Tensor:
        """(K, H) output projection: logits = hidden @ head_weight.T."""
        return self.head.weight

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.tok_emb.weight.numel() - self.cls_emb.weight.numel()

    def check_classes(self, classes, batch: int | None = None) -> torch.Tensor:
        """Validate class ids (B,) in [0, num_classes) (or None for an unconditional model) -> long tensor."""
        n = self.config.num_classes
        if classes is None:
            if n > 0:
                raise ValueError(f"classes must be given: the model is conditional on {n} classes")
            return torch.full(
                (batch or 1,), self.null_class, dtype=torch.long, device=self.head.weight.device
            )
        classes = torch.as_tensor(classes, device=self.head.weight.device)
        if classes.dim() != 1 or classes.dtype.is_floating_point:
            raise ValueError(
                f"classes must be a 1-D integer tensor (B,), got shape {tuple(classes.shape)}"
            )
        if batch is not None and classes.shape[0] != batch:
            raise ValueError(
                f"classes must hold {batch} labels (one per sample), got {classes.shape[0]}"
            )
        if n == 0:
            if (classes != 0).any():
                raise ValueError("the model is unconditional (num_classes=0): pass classes=None")
            return torch.full_like(classes, self.null_class, dtype=torch.long)
        if classes.numel() and (classes.min() < 0 or classes.max() >= n):
            raise ValueError(
                f"class ids must lie in [0, {n}), got min {classes.min()}, max {classes.max()}"
            )
        return classes.long()

    def check_tokens(
        self, tokens: torch.Tensor, name: str = "tokens", extra: int = 0
    ) -> torch.Tensor:
        """(B, h, w) or (B, N) token ids in [0, K + extra) -> (B, N) long."""
        if (
            not torch.is_tensor(tokens)
            or tokens.dtype.is_floating_point
            or tokens.dim() not in (2, 3)
        ):
            raise ValueError(
                f"{name} must be an integer tensor (B, N) or (B, h, w), got {_describe(tokens)}"
            )
        tokens = tokens.reshape(tokens.shape[0], -1).long()
        limit = self.config.vocab_size + extra
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= limit):
            raise ValueError(
                f"{name} must lie in [0, {limit}), got min {tokens.min()}, max {tokens.max()}"
            )
        return tokens

    def class_prefix(self, classes: torch.Tensor) -> torch.Tensor:
        """(B,) labels -> (B, 1, H); while training, labels become the null class with p = class_dropout."""
        if self.training and self.config.num_classes > 0 and self.config.class_dropout > 0:
            drop = torch.rand(classes.shape, device=classes.device) < self.config.class_dropout
            classes = torch.where(drop, torch.full_like(classes, self.null_class), classes)
        return self.cls_emb(classes)[:, None]

    def run(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Input embeddings (B, L, H) at positions [start, start + L) -> normalised hidden states (B, L, H)."""
        start = 0 if cache is None else cache.length
        if start + x.shape[1] > self.rope_cos.shape[0]:
            raise ValueError(
                f"sequence of {start + x.shape[1]} positions exceeds the model's {self.rope_cos.shape[0]}"
            )
        cos, sin = (
            self.rope_cos[start : start + x.shape[1]],
            self.rope_sin[start : start + x.shape[1]],
        )
        x = self.emb_drop(x)
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if recompute:
                x = checkpoint(layer, x, cos, sin, causal=self.causal, use_reentrant=False)
            else:
                x = layer(x, cos, sin, causal=self.causal, cache=cache, layer=i)
        if cache is not None:
            cache.length += x.shape[1]
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., K) float32 logits; only for sampling and small checks (training never builds them)."""
        return hidden.float() @ self.head.weight.float().T

    # ---- persistence -------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (atomically, file by file)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        weights, config = directory / "model.safetensors", directory / "config.json"
        if not overwrite and (weights.exists() or config.exists()):
            raise FileExistsError(
                f"{directory} already holds a model; pass overwrite=True to replace it"
            )
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        _atomic_write(weights, lambda p: save_file(state, str(p)))
        _atomic_write(config, lambda p: p.write_text(json.dumps(self.config.to_dict(), indent=2)))
        record_checksums(directory, [weights.name, config.name])
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, map_location="cpu") -> GeneratorModel:
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path = directory / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"no config.json in {directory}: not a saved generator")
        check_file(config_path)
        model = cls(cls.config_class.from_dict(json.loads(config_path.read_text())))
        with verified(directory / "model.safetensors") as weights:
            model.load_state_dict(load_file(str(weights), device=str(map_location)))
        return model


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _describe(x) -> str:
    if torch.is_tensor(x):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


__all__ = [
    "PRESETS",
    "GeneratorConfig",
    "GeneratorModel",
    "KVCache",
    "RMSNorm",
    "SwiGLU",
    "apply_rope",
    "rope_2d",
]
