"""Samplers for both generator families, with classifier-free guidance (CFG) on logits.

CFG (LlamaGen): the conditional and unconditional (null-class) branches run as one batch of 2B and combine as
``uncond + (cond - uncond) * cfg_scale``. ``cfg_scale=None`` runs the conditional branch only; ``cfg_scale=1``
runs both and gives the conditional logits up to rounding (a check of the guided path).

Tokens are drawn by the Gumbel-max trick, ``argmax(logits / temperature + G)``, after optional top-k and top-p
(nucleus) filtering; every random number comes from the ``generator`` argument, so a seed fixes the samples.
"""

from __future__ import annotations

import math

import torch

from snce.generators.autoregressive import AutoregressiveTransformer
from snce.generators.masked_diffusion import SCHEDULES, MaskedDiffusionTransformer, mask_ratio
from snce.generators.transformer import GeneratorModel


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits (..., K) outside the top-k and outside the nucleus of mass top_p to -inf (0 / 1.0: off).

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p; the most likely token
    always stays.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = (
            probs.cumsum(dim=-1) - probs >= top_p
        )  # mass before this token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def gumbel_noise(shape, *, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel samples -log(-log U), float32."""
    u = torch.rand(shape, device=device, generator=generator).clamp_(1e-20, 1.0 - 1e-7)
    return u.log_().neg_().log_().neg_()  # in place: sampling touches (tokens x K) of these


def sample_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of logits (..., K).

    Returns (tokens (...,) long, log-probabilities (...,) of the drawn tokens under the tempered, filtered
    distribution the token was drawn from).
    """
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    noise = gumbel_noise(logits.shape, device=logits.device, generator=generator)
    tokens = noise.add_(logits).argmax(dim=-1)
    logp = logits.gather(-1, tokens[..., None])[..., 0] - logits.logsumexp(dim=-1)
    return tokens, logp


def guide(logits: torch.Tensor, cfg_scale: float | None) -> torch.Tensor:
    """(2B, ...) logits of [cond; uncond] -> (B, ...) guided logits; (B, ...) unchanged when cfg_scale is None."""
    if cfg_scale is None:
        return logits
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + (cond - uncond) * cfg_scale


def _prepare(model, classes, num_samples, cfg_scale, temperature, top_k, top_p):
    """Validate sampler arguments; returns (labels (B,) or (2B,) with the null class appended for CFG, B)."""
    if not isinstance(model, GeneratorModel):
        raise TypeError(f"model must be a snce generator, got {type(model).__name__}")
    if classes is None:
        if num_samples is None:
            raise ValueError("give classes (B,) or, for an unconditional model, num_samples")
        labels = model.check_classes(None, num_samples)
    else:
        labels = model.check_classes(classes, num_samples)
    if cfg_scale is not None:
        if model.config.num_classes == 0:
            raise ValueError(
                "cfg_scale needs a class-conditional model; this one has num_classes=0"
            )
        if not (isinstance(cfg_scale, int | float) and math.isfinite(cfg_scale)):
            raise ValueError(f"cfg_scale must be a finite number or None, got {cfg_scale!r}")
        labels = torch.cat([labels, torch.full_like(labels, model.null_class)])
    if not (isinstance(temperature, int | float) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if isinstance(top_k, bool) or not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top_k must be an int >= 0 (0: off), got {top_k!r}")
    if not (isinstance(top_p, int | float) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
    return labels, labels.shape[0] // (1 if cfg_scale is None else 2)


@torch.no_grad()
def sample_autoregressive(
    model: AutoregressiveTransformer,
    classes: torch.Tensor | None = None,
    *,
    num_samples: int | None = None,
    cfg_scale: float | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Raster-order sampling: classes (B,) (or num_samples for an unconditional model) -> tokens (B, h, w)."""
    if not isinstance(model, AutoregressiveTransformer):
        raise TypeError(f"model must be an AutoregressiveTransformer, got {type(model).__name__}")
    labels, B = _prepare(model, classes, num_samples, cfg_scale, temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    cache = model.new_cache(labels.shape[0]) if use_cache else None
    tokens = torch.zeros(B, 0, dtype=torch.long, device=labels.device)
    for _ in range(model.config.seq_len):
        prefix = tokens if cfg_scale is None else tokens.repeat(2, 1)
        hidden = model.next_hidden(prefix, labels, cache)  # (B or 2B, H)
        logits = guide(model.logits(hidden), cfg_scale)
        nxt, _ = sample_logits(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    model.train(was_training)
    return tokens.view(B, *model.config.grid)


@torch.no_grad()
def sample_masked(
    model: MaskedDiffusionTransformer,
    classes: torch.Tensor | None = None,
    *,
    num_samples: int | None = None,
    steps: int = 8,
    schedule: str | None = None,
    cfg_scale: float | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    choice_temperature: float = 4.5,
    generator: torch.Generator | None = None,
    return_history: bool = False,
):
    """MaskGIT parallel decoding in exactly ``steps`` forward passes.

    Step t of T (ratio = (t+1)/T): draw a token at every masked position, keep already revealed tokens, score
    the new ones by log p(drawn) + choice_temperature * (1 - ratio) * Gumbel, and re-mask the
    mask_len = floor(N * gamma(ratio)) least confident, clipped to [steps left, still masked - 1] (none at the last
    step). Each step therefore reveals at least one token, and revealed tokens never change.

    Returns tokens (B, h, w); with return_history also the list of the T states after each step (mask_id where
    still masked).
    """
    if not isinstance(model, MaskedDiffusionTransformer):
        raise TypeError(f"model must be a MaskedDiffusionTransformer, got {type(model).__name__}")
    labels, B = _prepare(model, classes, num_samples, cfg_scale, temperature, top_k, top_p)
    N = model.config.seq_len
    if isinstance(steps, bool) or not (isinstance(steps, int) and 1 <= steps <= N):
        raise ValueError(
            f"steps must be an int in [1, {N}] (at least one token is revealed per step), got {steps!r}"
        )
    schedule = model.config.schedule if schedule is None else schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not (isinstance(choice_temperature, int | float) and choice_temperature >= 0):
        raise ValueError(f"choice_temperature must be >= 0, got {choice_temperature!r}")
    was_training = model.training
    model.eval()
    tokens = torch.full((B, N), model.mask_id, dtype=torch.long, device=labels.device)
    history = []
    for t in range(steps):
        unknown = tokens == model.mask_id  # (B, N); every row has the same count
        inputs = tokens if cfg_scale is None else tokens.repeat(2, 1)
        hidden = model.hidden(inputs, labels)  # (B or 2B, N, H)
        sel = unknown if cfg_scale is None else unknown.repeat(2, 1)
        logits = guide(
            model.logits(hidden[sel]), cfg_scale
        )  # (masked tokens, K): logits at masked slots only
        drawn, logp = sample_logits(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        sampled = tokens.clone()
        sampled[unknown] = drawn
        if t == steps - 1:
            tokens = sampled
        else:
            ratio = (t + 1) / steps
            n_unknown = int(unknown[0].sum())
            mask_len = int(
                math.floor(
                    N * float(mask_ratio(torch.tensor(ratio, dtype=torch.float64), schedule))
                )
            )
            mask_len = max(
                steps - 1 - t, min(n_unknown - 1, mask_len)
            )  # >= 1 left per remaining step
            confidence = torch.full((B, N), math.inf, device=tokens.device)
            noise = gumbel_noise(logp.shape, device=tokens.device, generator=generator)
            confidence[unknown] = logp + choice_temperature * (1.0 - ratio) * noise
            remask = confidence.argsort(dim=1)[:, :mask_len]  # least confident new tokens
            tokens = sampled.scatter(1, remask, model.mask_id)
        if return_history:
            history.append(tokens.view(B, *model.config.grid).clone())
    model.train(was_training)
    out = tokens.view(B, *model.config.grid)
    return (out, history) if return_history else out


def sample(model: GeneratorModel, classes: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Dispatch to :func:`sample_autoregressive` or :func:`sample_masked` by the model's family."""
    if isinstance(model, AutoregressiveTransformer):
        return sample_autoregressive(model, classes, **kwargs)
    if isinstance(model, MaskedDiffusionTransformer):
        return sample_masked(model, classes, **kwargs)
    raise TypeError(f"model must be a snce generator, got {type(model).__name__}")
