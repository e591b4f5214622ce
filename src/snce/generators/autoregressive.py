"""LlamaGen-style class-conditional autoregressive image generator (decoder-only, raster order).

Sequence: [class token, x_0, ..., x_{N-2}]; the hidden state at position i predicts image token x_i from the class
and x_{<i} (LlamaGen ``autoregressive/models/gpt.py``; Sun et al. 2024, arXiv 2406.06525). The class token is not
rotated; image tokens get 2-D RoPE by grid position. Sampling (with a KV cache and CFG) is in
``snce.generators.sampling``; training losses in ``snce.generators.objectives``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from snce.generators.transformer import GeneratorConfig, GeneratorModel, KVCache


@dataclass
class ARConfig(GeneratorConfig):
    """Autoregressive generator architecture (all fields documented on :class:`GeneratorConfig`)."""

    family: ClassVar[str] = "autoregressive"


class AutoregressiveTransformer(GeneratorModel):
    """Causal transformer over a class prefix and raster-ordered image tokens.

    >>> model = AutoregressiveTransformer(ARConfig.preset("tiny", vocab_size=1024, grid=(8, 8), num_classes=10))
    >>> hidden = model(tokens, classes)          # tokens (B, 8, 8) long, classes (B,) -> hidden (B, 64, H)
    """

    config_class = ARConfig
    causal = True

    def forward(self, tokens: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: tokens (B, N) or (B, h, w), classes (B,) -> hidden (B, N, H); hidden[:, i] predicts
        tokens[:, i]."""
        tokens = self.check_tokens(tokens)
        classes = self.check_classes(classes, tokens.shape[0])
        x = torch.cat([self.class_prefix(classes), self.tok_emb(tokens[:, :-1])], dim=1)
        return self.run(x)

    def new_cache(self, batch: int) -> KVCache:
        cfg = self.config
        w = self.head.weight
        return KVCache(
            cfg.n_layers,
            batch,
            cfg.n_heads,
            cfg.seq_len,
            cfg.dim // cfg.n_heads,
            dtype=w.dtype,
            device=w.device,
        )

    def next_hidden(
        self, prefix: torch.Tensor, classes: torch.Tensor, cache: KVCache | None = None
    ):
        """Hidden state (B, H) that predicts token ``prefix.shape[1]`` from the class and prefix (B, t).

        classes must already be valid label ids (see ``check_classes``); the null class gives the unconditional
        branch. With a cache, only the positions the cache has not seen yet are run (the whole input the first
        time, one token per call after that); without one the full sequence is recomputed.
        """
        if cache is None or cache.length == 0:
            x = torch.cat([self.cls_emb(classes)[:, None], self.tok_emb(prefix)], dim=1)
        else:
            if cache.length != prefix.shape[1]:
                raise ValueError(
                    f"cache holds {cache.length} positions, expected prefix length {prefix.shape[1]}"
                )
            x = self.tok_emb(prefix[:, -1:])
        return self.run(x, cache)[:, -1]
