"""Llama-style transformer pieces shared by both generator families, and their common base class.

Follows LlamaGen (FoundationVision/LlamaGen, ``autoregressive/models/gpt.py``): pre-norm RMSNorm blocks,
SwiGLU feed-forward, 2-D rotary position embeddings over the token grid, one class-embedding prefix token
(index ``num_classes`` is the "null" class used for classifier-free guidance), class dropout during training,
and an untied, zero-initialised output head ``Linear(dim, vocab_size, bias=False)``.

``GeneratorConfig.condition`` picks the prefix (``snce.generators.conditions``): "class" (the class token
above), "text" (projected text embeddings with their padding mask, then a start token) or "edit" (instruction
embeddings, the source image's tokens, a start token). Prefixes with padding are run with a boolean attention
mask (padded keys hidden from every other position); the class prefix keeps the unmasked attention of before.

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
from snce.generators.conditions import (
    CONDITIONS,
    ClassCondition,
    Conditioning,
    EditCondition,
    Prefix,
    TextCondition,
)

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
    class_dropout: probability of replacing a label by the null class while training (for CFG; LlamaGen: 0.1);
    for "text" / "edit" models, of replacing the text / the instruction by the null condition.
    condition: "class" (labels; num_classes=0 for an unconditional model), "text" (text embeddings) or "edit"
    (instruction embeddings + the source image's tokens); see ``snce.generators.conditions``.
    text_dim: E, width of the text encoder's embeddings; max_text_len: L, its tokens per text ("text" and "edit"
    only; 0 for "class").
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
    condition: str = "class"
    text_dim: int = 0
    max_text_len: int = 0

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
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {self.condition!r}")
        if self.condition == "class":
            for name in ("text_dim", "max_text_len"):
                if getattr(self, name) != 0:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} is for condition 'text' or 'edit'; "
                        f"condition is 'class' (leave {name} at 0)"
                    )
        else:
            _check_int(self.text_dim, "text_dim", 1)
            _check_int(self.max_text_len, "max_text_len", 1)
            if self.num_classes != 0:
                raise ValueError(
                    f"num_classes={self.num_classes} needs condition 'class'; condition "
                    f"{self.condition!r} takes text, not labels (set num_classes to 0)"
                )

    @property
    def seq_len(self) -> int:
        """N, image tokens per sample."""
        return self.grid[0] * self.grid[1]

    @property
    def prefix_len(self) -> int:
        """P, condition tokens before the image tokens: 1 (class), L + 1 (text), L + N + 1 (edit)."""
        if self.condition == "class":
            return 1
        return self.max_text_len + 1 + (self.seq_len if self.condition == "edit" else 0)

    @property
    def ffn_width(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 256 * math.ceil(int(2 * 4 * self.dim / 3) / 256)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        if self.condition == "class":  # class models keep the config.json they always had
            for name in ("condition", "text_dim", "max_text_len"):
                del d[name]
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


def rope_tables(config: GeneratorConfig):
    """cos, sin (P + N, hd/2) for a model's sequence [prefix (P), image grid (N)].

    Class and text prefixes are not rotated. The edit prefix [instruction (L), source (N), start] rotates its
    source tokens by the same 2-D angles as the target grid, so a target token and the source token at its
    grid position are at relative offset 0.
    """
    hd = config.dim // config.n_heads
    if config.condition != "edit":
        return rope_2d(config.grid, hd, config.prefix_len, config.rope_base)
    text = rope_2d(config.grid, hd, config.max_text_len, config.rope_base)  # [L zeros, grid]
    target = rope_2d(config.grid, hd, 1, config.rope_base)  # [start, grid]
    return torch.cat([text[0], target[0]]), torch.cat([text[1], target[1]])


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
        # (B, P) bool key mask of a padded prefix, set when the prefix is run (None: unmasked prefix)
        self.prefix_mask = None


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x, cos, sin, *, causal: bool, cache: KVCache | None = None, layer: int = 0, mask=None
    ):
        """x (B, L, H) at positions [start, start + L), start = cache.length (0 without a cache).

        mask: None, or the whole boolean attention mask (B, 1, L, start + L) (True = attend), causality
        included (``GeneratorModel.attention_mask``)."""
        B, L, H = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, H // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, nh, L, hd)
        is_causal = causal and mask is None  # a given mask already holds the causal structure
        if cache is not None:
            start = cache.length
            cache.k[layer][:, :, start : start + L] = k
            cache.v[layer][:, :, start : start + L] = v
            k, v = cache.k[layer][:, :, : start + L], cache.v[layer][:, :, : start + L]
            q = q.to(k.dtype)  # under autocast q is bf16 while the cache keeps the weights' dtype
            if (
                is_causal and start > 0
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

    def forward(
        self, x, cos, sin, *, causal: bool, cache: KVCache | None = None, layer: int = 0, mask=None
    ):
        # The compiled function runs inside this call, so module hooks (e.g. FSDP's all-gather) stay eager
        # around it; the KV-cache path of sampling always runs eagerly.
        if cache is None and self.compiled_body is not None:
            if mask is None:
                return self.compiled_body(self, x, cos, sin, causal)
            return self.compiled_body(self, x, cos, sin, causal, None, 0, mask)
        return self.body(x, cos, sin, causal, cache, layer, mask)

    def body(
        self, x, cos, sin, causal: bool, cache: KVCache | None = None, layer: int = 0, mask=None
    ):
        x = x + self.attn(
            self.attn_norm(x), cos, sin, causal=causal, cache=cache, layer=layer, mask=mask
        )
        return x + self.ffn(self.ffn_norm(x))


class GeneratorModel(nn.Module):
    """Condition prefix + token embeddings -> transformer -> RMSNorm; the head is used by the loss or the sampler.

    The condition module is ``cls_emb`` (class), ``text_cond`` (text) or ``edit_cond`` (edit), as
    ``config.condition`` says; ``condition_module`` returns it.

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
        if config.condition == "class":
            self.cls_emb = ClassCondition(config.num_classes, config.dim)  # last row: null class
        elif config.condition == "text":
            self.text_cond = TextCondition(config.text_dim, config.max_text_len, config.dim)
        else:
            self.edit_cond = EditCondition(
                config.text_dim, config.max_text_len, config.dim, config.seq_len
            )
        self.emb_drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = rope_tables(config)
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
        elif isinstance(m, TextCondition):
            m.init_weights(self.config.init_std)

    @property
    def condition_module(self) -> nn.Module:
        """``cls_emb``, ``text_cond`` or ``edit_cond``: the module that embeds this model's condition."""
        return getattr(
            self,
            {"class": "cls_emb", "text": "text_cond", "edit": "edit_cond"}[self.config.condition],
        )

    @property
    def prefix_len(self) -> int:
        """P, condition tokens before the image tokens (``GeneratorConfig.prefix_len``)."""
        return self.config.prefix_len

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def head_weight(self) -> torch.Tensor:
        """(K, H) output projection: logits = hidden @ head_weight.T."""
        return self.head.weight

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if embeddings:
            return n
        cond = self.cls_emb.weight.numel() if self.config.condition == "class" else 0
        return n - self.tok_emb.weight.numel() - cond

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

    def check_condition(self, condition, batch: int | None = None):
        """Validate a batch's condition for this model.

        condition: (B,) labels or None (class models, as ``check_classes``), or a :class:`Conditioning`.
        Returns class ids (B,) long for class models; for text / edit models a Conditioning with text
        (B, L, E) zero-padded to L = max_text_len (or None: the null condition), text_mask (B, L) bool (False
        past the given length) and source (B, N) long (edit).
        """
        cfg = self.config
        if cfg.condition == "class":
            if isinstance(condition, Conditioning):
                unused = [
                    n for n in ("text", "text_mask", "source") if getattr(condition, n) is not None
                ]
                if unused:
                    raise ValueError(f"a class-conditioned model takes classes only; got {unused}")
                condition = condition.classes
            return self.check_classes(condition, batch)
        if condition is None:
            condition = Conditioning()
        if not isinstance(condition, Conditioning):
            raise TypeError(
                f"a {cfg.condition!r}-conditioned model takes a Conditioning, got {_describe(condition)}"
            )
        if condition.classes is not None:
            raise ValueError(
                f"a {cfg.condition!r}-conditioned model takes no classes (condition.classes must be None)"
            )
        n = condition.batch_size
        if batch is not None and n is not None and n != batch:
            raise ValueError(f"the condition holds {n} rows, expected {batch} (one per sample)")
        batch = n if n is not None else batch
        if batch is None:
            raise ValueError("give a condition with tensors or a batch size (num_samples)")
        device = self.head.weight.device
        text, mask, source = condition.text, condition.text_mask, None
        if cfg.condition == "edit":
            if condition.source is None:
                raise ValueError(
                    "an editing model needs the source image's tokens (condition.source)"
                )
            source = self.check_tokens(condition.source.to(device), name="condition.source")
            if source.shape != (batch, cfg.seq_len):
                raise ValueError(
                    f"condition.source must hold {cfg.seq_len} tokens per image (grid {cfg.grid}), got "
                    f"{tuple(condition.source.shape)}"
                )
        elif condition.source is not None:
            raise ValueError(
                "condition.source is for editing models; this one is 'text'-conditioned"
            )
        if text is None:
            if mask is not None:
                raise ValueError("condition.text_mask without condition.text")
            return Conditioning(source=source)
        E, L = cfg.text_dim, cfg.max_text_len
        if not (torch.is_tensor(text) and text.is_floating_point() and text.dim() == 3):
            raise ValueError(
                f"condition.text must be a float tensor (B, L, E), got {_describe(text)}"
            )
        if text.shape[0] != batch or text.shape[2] != E or text.shape[1] > L:
            raise ValueError(
                f"condition.text must have shape ({batch}, <= {L}, {E}) (text_dim={E}, "
                f"max_text_len={L}), got {tuple(text.shape)}"
            )
        if mask is None:
            mask = torch.ones(text.shape[:2], dtype=torch.bool, device=device)
        if not (torch.is_tensor(mask) and mask.shape == text.shape[:2]) or mask.is_floating_point():
            raise ValueError(
                f"condition.text_mask must be a bool tensor of shape {tuple(text.shape[:2])} "
                f"(True = real token), got {_describe(mask)}"
            )
        pad = L - text.shape[1]
        text = F.pad(text.to(device), (0, 0, 0, pad))  # (B, L, E)
        mask = F.pad(mask.to(device, torch.bool), (0, pad), value=False)  # (B, L)
        return Conditioning(text=text, text_mask=mask, source=source)

    def embed_condition(self, condition, batch: int | None = None, *, drop=None) -> Prefix:
        """Condition -> prefix tokens (``check_condition``, then the condition module).

        drop: (B,) bool, rows to replace by the null condition (the null class, the null text, or for
        editing the null instruction with the source kept); None -> in training mode each row is dropped
        with p = class_dropout, in eval mode none.
        """
        cfg = self.config
        checked = self.check_condition(condition, batch)
        if cfg.condition == "class":
            if drop is None:
                return Prefix(self.class_prefix(checked))
            return self.cls_emb.prefix(checked, self._check_drop(drop, checked.shape[0]))
        B = checked.batch_size if checked.batch_size is not None else batch
        if drop is None and self.training and cfg.class_dropout > 0 and checked.text is not None:
            drop = torch.rand(B, device=self.head.weight.device) < cfg.class_dropout
        elif drop is not None:
            drop = self._check_drop(drop, B)
        if cfg.condition == "text":
            return self.text_cond.prefix(checked.text, checked.text_mask, drop, batch=B)
        source = self.tok_emb(checked.source)  # (B, N, H)
        return self.edit_cond.prefix(checked.text, checked.text_mask, source, drop, batch=B)

    def _check_drop(self, drop, batch: int) -> torch.Tensor:
        drop = torch.as_tensor(drop, device=self.head.weight.device)
        if drop.shape != (batch,) or drop.dtype != torch.bool:
            raise ValueError(f"drop must be a bool tensor ({batch},), got {_describe(drop)}")
        return drop

    def attention_mask(self, key_mask: torch.Tensor | None, length: int, start: int = 0):
        """Boolean attention mask (B, 1, length, start + length) for queries at [start, start + length).

        key_mask (B, >= start + length) bool says which keys are real; a padded key is seen by no other
        position, each query still sees itself (no empty attention row), and causal models see no later
        key. None -> None (unmasked attention, as for the class prefix).
        """
        if key_mask is None:
            return None
        total = start + length
        q = torch.arange(start, total, device=key_mask.device)[:, None]  # (length, 1)
        k = torch.arange(total, device=key_mask.device)[None, :]  # (1, total)
        allowed = key_mask[:, None, :total] | (k == q)  # (B, length, total)
        if self.causal:
            allowed = allowed & (k <= q)
        return allowed[:, None]

    def run(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings (B, L, H) at positions [start, start + L) -> normalised hidden states (B, L, H).

        key_mask: None, or (B, start + L) bool, False at padded positions (see ``attention_mask``).
        """
        start = 0 if cache is None else cache.length
        if start + x.shape[1] > self.rope_cos.shape[0]:
            raise ValueError(
                f"sequence of {start + x.shape[1]} positions exceeds the model's {self.rope_cos.shape[0]}"
            )
        cos, sin = (
            self.rope_cos[start : start + x.shape[1]],
            self.rope_sin[start : start + x.shape[1]],
        )
        mask = self.attention_mask(key_mask, x.shape[1], start)
        x = self.emb_drop(x)
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if recompute:
                x = checkpoint(
                    layer, x, cos, sin, causal=self.causal, mask=mask, use_reentrant=False
                )
            else:
                x = layer(x, cos, sin, causal=self.causal, cache=cache, layer=i, mask=mask)
        if cache is not None:
            cache.length += x.shape[1]
        return self.norm(x)

    @staticmethod
    def key_mask(prefix: Prefix, length: int) -> torch.Tensor | None:
        """(B, length) key mask of [prefix, image tokens]: the prefix's mask, then all real; None for an
        unmasked prefix."""
        if prefix.mask is None:
            return None
        B, P = prefix.mask.shape
        image = torch.ones(B, length - P, dtype=torch.bool, device=prefix.mask.device)
        return torch.cat([prefix.mask, image], dim=1)

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
    "Conditioning",
    "GeneratorConfig",
    "GeneratorModel",
    "KVCache",
    "RMSNorm",
    "SwiGLU",
    "apply_rope",
    "rope_2d",
]
