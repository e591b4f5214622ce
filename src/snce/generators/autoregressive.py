"""LlamaGen-style autoregressive image generator (decoder-only, raster order), conditioned on a class, a text or
an edit (instruction + source image).

Sequence: [prefix (P), x_0, ..., x_{N-2}]; the hidden state at the last prefix position predicts x_0 and the one
at x_{i-1} predicts x_i, from the condition and x_{<i} (LlamaGen ``autoregressive/models/gpt.py``; Sun et al.
2024, arXiv 2406.06525). The prefix is one class token (P = 1), or text tokens with their padding mask and a start
token (P = L + 1), or instruction tokens, the source's tokens and a start token (P = L + N + 1); see
``snce.generators.conditions``. Attention is causal over the whole sequence (text tokens too, as LlamaGen's
text-to-image model), padded prefix keys hidden. Prefix tokens are not rotated except the source's, which take
the target grid's 2-D RoPE; image tokens get 2-D RoPE by grid position. Sampling (with a KV cache and CFG) is in
``snce.generators.sampling``; training losses in ``snce.generators.objectives``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from snce.generators.conditions import Prefix
from snce.generators.transformer import GeneratorConfig, GeneratorModel, KVCache


@dataclass
class ARConfig(GeneratorConfig):
    """Autoregressive generator architecture (all fields documented on :class:`GeneratorConfig`)."""

    family: ClassVar[str] = "autoregressive"


class AutoregressiveTransformer(GeneratorModel):
    """Causal transformer over a condition prefix and raster-ordered image tokens.

    >>> model = AutoregressiveTransformer(ARConfig.preset("tiny", vocab_size=1024, grid=(8, 8), num_classes=10))
    >>> hidden = model(tokens, classes)          # tokens (B, 8, 8) long, classes (B,) -> hidden (B, 64, H)
    """

    config_class = ARConfig
    causal = True

    def forward(self, tokens: torch.Tensor, condition=None, *, drop=None) -> torch.Tensor:
        """Teacher forcing: tokens (B, N) or (B, h, w) -> hidden (B, N, H); hidden[:, i] predicts tokens[:, i].

        condition: (B,) class labels (or None for an unconditional class model), or a :class:`Conditioning`
        for text / edit models. drop: (B,) bool rows forced to the null condition (None: random condition
        dropout while training; see ``embed_condition``).
        """
        tokens = self.check_tokens(tokens)
        prefix = self.embed_condition(condition, tokens.shape[0], drop=drop)
        x = torch.cat([prefix.emb, self.tok_emb(tokens[:, :-1])], dim=1)  # (B, P + N - 1, H)
        hidden = self.run(x, key_mask=self.key_mask(prefix, x.shape[1]))
        return hidden if prefix.length == 1 else hidden[:, prefix.length - 1 :]

    def new_cache(self, batch: int) -> KVCache:
        cfg = self.config
        w = self.head.weight
        return KVCache(
            cfg.n_layers,
            batch,
            cfg.n_heads,
            cfg.prefix_len + cfg.seq_len - 1,
            cfg.dim // cfg.n_heads,
            dtype=w.dtype,
            device=w.device,
        )

    def next_hidden(
        self, prefix: torch.Tensor, condition: torch.Tensor | Prefix, cache: KVCache | None = None
    ):
        """Hidden state (B, H) that predicts token ``prefix.shape[1]`` from the condition and prefix (B, t).

        condition: valid class ids (B,) (see ``check_classes``; the null class gives the unconditional branch)
        or a :class:`Prefix` from ``embed_condition``. With a cache, only the positions the cache has not seen
        yet are run (the condition and the whole input the first time, one token per call after that; the
        cache keeps the prefix's padding mask); without one the full sequence is recomputed.
        """
        if torch.is_tensor(condition):
            condition = Prefix(self.cls_emb(condition)[:, None])
        P = condition.length
        if cache is None or cache.length == 0:
            x = torch.cat([condition.emb, self.tok_emb(prefix)], dim=1)
            if cache is not None:
                cache.prefix_mask = condition.mask
            return self.run(x, cache, self.key_mask(condition, x.shape[1]))[:, -1]
        if cache.length != P - 1 + prefix.shape[1]:
            raise ValueError(
                f"cache holds {cache.length} positions, expected {P - 1 + prefix.shape[1]} "
                f"(a prefix of {P} and {prefix.shape[1]} tokens, the last one new)"
            )
        key_mask = None
        if cache.prefix_mask is not None:
            key_mask = self.key_mask(Prefix(condition.emb, cache.prefix_mask), cache.length + 1)
        return self.run(self.tok_emb(prefix[:, -1:]), cache, key_mask)[:, -1]
