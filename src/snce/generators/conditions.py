"""What a generator is conditioned on, and the modules that turn it into prefix tokens.

One interface for both families: a :class:`Conditioning` holds the batch's condition (class labels, text
embeddings with their padding mask, or, for editing, an instruction's embeddings plus the source image's
tokens); the model's condition module turns it into a :class:`Prefix`, embeddings (B, P, H) placed before the
image tokens with a key mask (B, P) saying which of them may be attended to.

    condition  prefix tokens (P)                                   null condition (dropout, CFG)
    "class"    [class embedding]                          (1)      the null class, row num_classes
    "text"     [text (L), start]                          (L + 1)  L learned null tokens replace the text
    "edit"     [instruction (L), source (N), start]       (L+N+1)  the instruction only; the source stays

Text embeddings (B, L', E), L' <= L = ``max_text_len``, are zero-padded to L, masked where ``text_mask`` is
False and projected by one ``Linear(E, H)`` (LlamaGen's text-to-image model: T5 features projected into the
prefix with their padding mask; Sun et al. 2024, arXiv 2406.06525). Padded positions are never attended to by
any other position; each still attends to itself, so no attention row is empty. The learned ``start`` token ends
every text/edit prefix: its hidden state predicts the first image token (autoregressive), whatever the
padding. Source tokens share the model's token embedding, plus a learned per-position embedding that marks
them as the source; they get the same 2-D RoPE angles as the target grid (the rotary tables are built in
``snce.generators.transformer``), text and start tokens are not rotated.

Condition dropout (``class_dropout``, for classifier-free guidance) replaces a row's class / text / instruction
by the null condition. An editing model with a dropped instruction sees only the source: the
source-reconstruction path, which is also what ``Conditioning(source=...)`` without text asks for.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn

CONDITIONS = ("class", "text", "edit")


@dataclass
class Conditioning:
    """What a batch is conditioned on; the fields a model's ``condition`` does not use stay None.

    classes: (B,) long labels ("class"). text: (B, L, E) float text embeddings ("text", "edit": the
    instruction), None = the null condition for every row. text_mask: (B, L) bool, True = real token, False =
    padding; None = all real. source: (B, h, w) or (B, N) long, the source image's tokens ("edit").
    """

    classes: torch.Tensor | None = None
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    source: torch.Tensor | None = None

    @property
    def batch_size(self) -> int | None:
        """B of the first tensor given (None when all are None)."""
        for f in fields(self):
            t = getattr(self, f.name)
            if t is not None:
                return int(t.shape[0])
        return None

    def map(self, fn) -> Conditioning:
        """A copy with ``fn`` applied to every tensor that is not None."""
        return replace(
            self,
            **{f.name: fn(t) for f in fields(self) if (t := getattr(self, f.name)) is not None},
        )

    def to(self, device) -> Conditioning:
        return self.map(lambda t: t.to(device))

    def select(self, index) -> Conditioning:
        """Rows ``index`` (a slice, an index tensor or a list) of every tensor."""
        return self.map(lambda t: t[index])

    __getitem__ = select  # so code that slices a batch's labels slices a Conditioning alike

    @classmethod
    def from_batch(cls, batch: dict, condition: str) -> Conditioning | torch.Tensor | None:
        """The condition a collated token-shard batch carries for a model with ``condition``.

        "class": ``batch["label"]`` (a plain (B,) tensor, as class models have always taken) or None when the
        batch has no labels; "text": ``text`` (+ ``text_mask``); "edit": ``text`` (+ ``text_mask``) and
        ``source``.
        """
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
        if condition == "class":
            return batch.get("label")
        needed = ("text",) if condition == "text" else ("text", "source")
        missing = [k for k in needed if k not in batch]
        if missing:
            raise ValueError(
                f"a {condition!r}-conditioned batch needs keys {missing}; it has {sorted(batch)}"
            )
        return cls(
            text=batch["text"],
            text_mask=batch.get("text_mask"),
            source=batch["source"] if condition == "edit" else None,
        )


@dataclass
class Prefix:
    """Condition tokens in model space: emb (B, P, H) and mask (B, P) bool (True = may be attended to;
    None = all, as for the class token)."""

    emb: torch.Tensor
    mask: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.emb.shape[1]

    @staticmethod
    def cat(a: Prefix, b: Prefix) -> Prefix:
        """Rows of a then rows of b (the [cond; uncond] batch of classifier-free guidance)."""
        if (a.mask is None) != (b.mask is None):
            raise ValueError("cannot join a masked prefix and an unmasked one")
        mask = None if a.mask is None else torch.cat([a.mask, b.mask])
        return Prefix(torch.cat([a.emb, b.emb]), mask)


class ClassCondition(nn.Embedding):
    """Class labels -> one prefix token: an embedding of ``num_classes + 1`` rows, the last the null class.

    A subclass of ``nn.Embedding`` so that class models keep their ``cls_emb.weight`` checkpoint key.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__(num_classes + 1, dim)
        self.num_classes = num_classes

    @property
    def null_class(self) -> int:
        return self.num_classes

    def prefix(self, classes: torch.Tensor, drop: torch.Tensor | None = None) -> Prefix:
        """classes (B,) label ids (null allowed), drop (B,) bool or None -> Prefix (B, 1, H), no mask."""
        if drop is not None:
            classes = torch.where(drop, torch.full_like(classes, self.null_class), classes)
        return Prefix(self(classes)[:, None])


class TextCondition(nn.Module):
    """Text embeddings (B, L', E) -> prefix [projected text (L), start] with its key mask (B, L + 1).

    The null condition is ``null`` (L, H): L learned tokens, all attended to, in place of the projected text.
    """

    def __init__(self, text_dim: int, max_text_len: int, dim: int):
        super().__init__()
        self.text_dim, self.max_text_len = text_dim, max_text_len
        self.proj = nn.Linear(text_dim, dim)
        self.null = nn.Parameter(torch.zeros(max_text_len, dim))
        self.start = nn.Parameter(torch.zeros(dim))

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.proj.weight, std=std)
        nn.init.zeros_(self.proj.bias)
        nn.init.normal_(self.null, std=std)
        nn.init.normal_(self.start, std=std)

    def text_tokens(self, text, text_mask, drop, batch: int):
        """Checked text (B, L, E) (or None: null), mask (B, L) bool, drop (B,) bool or None ->
        (tokens (B, L, H), mask (B, L))."""
        null = self.null.expand(batch, -1, -1)
        ones = torch.ones(batch, self.max_text_len, dtype=torch.bool, device=null.device)
        if text is None:
            return null, ones
        # padding content never enters the model
        text = text.masked_fill(~text_mask[..., None], 0.0)
        # (B, L, H) in the weights' dtype (under autocast the projection returns bf16; the residual stream and
        # the other prefix tokens stay in the weights' dtype, as token embeddings do)
        tokens = self.proj(text.to(self.proj.weight.dtype)).to(null.dtype)
        if drop is None:
            return tokens, text_mask
        tokens = torch.where(drop[:, None, None], null, tokens)
        return tokens, text_mask | drop[:, None]

    def start_token(self, batch: int):
        ones = torch.ones(batch, 1, dtype=torch.bool, device=self.start.device)
        return self.start.expand(batch, 1, -1), ones

    def prefix(self, text, text_mask, drop=None, *, batch: int) -> Prefix:
        tokens, mask = self.text_tokens(text, text_mask, drop, batch)
        start, start_mask = self.start_token(batch)
        return Prefix(torch.cat([tokens, start], 1), torch.cat([mask, start_mask], 1))


class EditCondition(TextCondition):
    """Instruction (B, L', E) + source token embeddings (B, N, H) -> prefix [instruction (L), source (N),
    start] with its key mask (B, L + N + 1); dropout and the null condition touch the instruction only."""

    def __init__(self, text_dim: int, max_text_len: int, dim: int, num_tokens: int):
        super().__init__(text_dim, max_text_len, dim)
        self.source_pos = nn.Parameter(torch.zeros(num_tokens, dim))

    def init_weights(self, std: float) -> None:
        super().init_weights(std)
        nn.init.normal_(self.source_pos, std=std)

    def prefix(self, text, text_mask, source_emb, drop=None, *, batch: int) -> Prefix:
        """source_emb: (B, N, H) the model's token embeddings of the source tokens."""
        tokens, mask = self.text_tokens(text, text_mask, drop, batch)
        source = source_emb + self.source_pos  # (B, N, H)
        start, start_mask = self.start_token(batch)
        src_mask = torch.ones(source.shape[:2], dtype=torch.bool, device=source.device)
        return Prefix(
            torch.cat([tokens, source, start], 1),
            torch.cat([mask, src_mask, start_mask], 1),
        )


__all__ = [
    "CONDITIONS",
    "ClassCondition",
    "Conditioning",
    "EditCondition",
    "Prefix",
    "TextCondition",
]
