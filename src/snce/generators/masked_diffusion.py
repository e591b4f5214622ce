"""Masked discrete diffusion (MaskGIT-style) image generator: a bidirectional transformer with a [MASK] token.

Training (Chang et al. 2022, MaskGIT, arXiv 2202.04200): draw r ~ U[0, 1), mask ceil(gamma(r) * N) random tokens of
each image (gamma(0) = 1: all masked, gamma(1) = 0), predict the masked ones from the rest; the loss covers masked
tokens only. Mask schedules gamma:

    "cosine"  gamma(r) = cos(pi/2 r)              (MaskGIT)
    "arccos"  gamma(r) = arccos(r) / (pi/2)       (Halton-MaskGIT)
    "linear"  gamma(r) = 1 - r                    (MDLM's log-linear noise: masked fraction = diffusion time t)

Optional MDLM weighting (Sahoo et al. 2024, arXiv 2406.07524): each masked token's loss is weighted by the
continuous-time ELBO weight -gamma'(r) / gamma(r) (= 1/t for the linear schedule, t = masked fraction), clamped
at ``1 / min_mask_ratio``. Sampling (confidence-based parallel decoding with annealed Gumbel noise) is in
``snce.generators.sampling``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from snce.generators.conditions import Prefix
from snce.generators.transformer import GeneratorConfig, GeneratorModel

SCHEDULES = ("cosine", "arccos", "linear")
WEIGHTINGS = ("none", "mdlm")


def mask_ratio(r: torch.Tensor, schedule: str) -> torch.Tensor:
    """gamma(r): fraction of tokens masked at progress r in [0, 1] (1 -> 0 as r goes 0 -> 1)."""
    if schedule == "cosine":
        return torch.cos(0.5 * math.pi * r)
    if schedule == "arccos":
        return torch.arccos(r) / (0.5 * math.pi)
    if schedule == "linear":
        return 1.0 - r
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def mdlm_weight(r: torch.Tensor, schedule: str) -> torch.Tensor:
    """-gamma'(r) / gamma(r): MDLM's continuous-time ELBO weight for the masked tokens at progress r."""
    if schedule == "cosine":
        return 0.5 * math.pi * torch.tan(0.5 * math.pi * r)
    if schedule == "arccos":  # gamma' = -(2/pi) / sqrt(1 - r^2)
        return 1.0 / (torch.sqrt(1.0 - r * r) * torch.arccos(r))
    if schedule == "linear":
        return 1.0 / (1.0 - r)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


@dataclass
class MaskedDiffusionConfig(GeneratorConfig):
    """Masked-diffusion generator: architecture (see :class:`GeneratorConfig`) plus its training corruption.

    schedule: mask schedule gamma used to train and, by default, to sample. weighting: "none" (MaskGIT: plain mean
    over masked tokens) or "mdlm" (ELBO weight -gamma'/gamma). min_mask_ratio: lower clamp of gamma(r) for the
    weight (and floor of one masked token per image).
    """

    family: ClassVar[str] = "masked_diffusion"

    schedule: str = "cosine"
    weighting: str = "none"
    min_mask_ratio: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not (0.0 < self.min_mask_ratio < 1.0):
            raise ValueError(f"min_mask_ratio must lie in (0, 1), got {self.min_mask_ratio!r}")


class MaskedDiffusionTransformer(GeneratorModel):
    """Bidirectional transformer over [condition prefix, x_0 .. x_{N-1}] where masked tokens read ``mask_id`` = K.

    The prefix (a class token, or text / edit tokens with their padding mask: ``snce.generators.conditions``) is
    context that every token attends to; the hidden states of the image tokens are returned.

    Besides 2-D RoPE, image tokens get a learned absolute position embedding (as MaskGIT): when every input is
    [MASK], relative rotations alone barely tell positions apart.

    >>> model = MaskedDiffusionTransformer(MaskedDiffusionConfig.preset("tiny", vocab_size=1024, grid=(8, 8)))
    >>> hidden = model(tokens_with_masks)        # (B, 8, 8) ids in [0, K] -> hidden (B, 64, H)
    """

    config_class = MaskedDiffusionConfig
    causal = False
    extra_tokens = 1  # [MASK]

    def __init__(self, config: MaskedDiffusionConfig):
        super().__init__(config)
        self.pos_emb = torch.nn.Parameter(torch.randn(config.seq_len, config.dim) * config.init_std)

    @property
    def mask_id(self) -> int:
        return self.config.vocab_size

    def forward(self, tokens: torch.Tensor, condition=None, *, drop=None) -> torch.Tensor:
        """tokens (B, N) or (B, h, w) with ``mask_id`` at masked positions -> hidden (B, N, H).

        condition: (B,) class labels (or None for an unconditional class model), or a :class:`Conditioning`
        for text / edit models. drop: (B,) bool rows forced to the null condition (None: random condition
        dropout while training; see ``embed_condition``).
        """
        tokens = self.check_tokens(tokens, extra=1)
        prefix = self.embed_condition(condition, tokens.shape[0], drop=drop)
        return self.hidden(tokens, prefix)

    def hidden(self, tokens: torch.Tensor, condition: torch.Tensor | Prefix) -> torch.Tensor:
        """Unchecked forward for the sampler: valid (B, N) ids and label ids (null class allowed) or a
        :class:`Prefix` from ``embed_condition``. The image tokens attend to the whole prefix (its padding
        excepted) and to each other."""
        if torch.is_tensor(condition):
            condition = Prefix(self.class_prefix(condition))
        x = torch.cat([condition.emb, self.tok_emb(tokens) + self.pos_emb], dim=1)
        return self.run(x, key_mask=self.key_mask(condition, x.shape[1]))[:, condition.length :]

    def corrupt(self, tokens: torch.Tensor, generator: torch.Generator | None = None):
        """Training corruption of clean tokens (B, N).

        Returns (inputs (B, N) with mask_id at masked positions, masked (B, N) bool, weight (B,) float32: the
        per-token loss weight of each image's masked tokens, all ones unless weighting="mdlm").
        """
        cfg = self.config
        B, N = tokens.shape
        r = torch.rand(B, device=tokens.device, generator=generator)
        ratio = mask_ratio(r, cfg.schedule).clamp(cfg.min_mask_ratio, 1.0)
        n_masked = torch.ceil(ratio * N).clamp(1, N)  # (B,)
        # The n_masked positions with the smallest uniform scores are a uniformly random subset.
        scores = torch.rand(B, N, device=tokens.device, generator=generator)
        rank = scores.argsort(dim=1).argsort(dim=1)
        masked = rank < n_masked[:, None]
        inputs = tokens.masked_fill(masked, self.mask_id)
        if cfg.weighting == "mdlm":
            weight = mdlm_weight(r, cfg.schedule).clamp(max=1.0 / cfg.min_mask_ratio)
        else:
            weight = torch.ones(B, device=tokens.device)
        return inputs, masked, weight
