"""Token-level metrics: usage and entropy of generated codes, validation NLL (hard) and soft NLL."""

from __future__ import annotations

import math

import torch

from snce.quantize import codebook_usage


def code_statistics(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Histogram statistics of code indices (any shape) over a codebook of K codes.

    usage: fraction of the K codes that occur; perplexity: exp(H) of the code histogram; entropy_bits: H in
    bits; entropy_ratio: H / log(K) (1 = every code equally often).
    """
    usage, perplexity = codebook_usage(indices, codebook_size)
    entropy = math.log(perplexity) if perplexity > 0 else 0.0
    return {
        "usage": usage,
        "perplexity": perplexity,
        "entropy_bits": entropy / math.log(2),
        "entropy_ratio": entropy / math.log(codebook_size) if codebook_size > 1 else 0.0,
    }


def validation_nll(
    model,
    tokens: torch.Tensor,
    classes: torch.Tensor | None,
    *,
    codebook: torch.Tensor,
    metric: str,
    tau: float,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out per-token NLL of a generator, in nats: hard (``nll``, -log p(y)) and soft (``soft_nll``).

    soft_nll = -sum_k q_k log p_k with q = softmax(-d(e_y, e_k) / tau) over the codebook: the SNCE loss at
    ``tau``, which rewards probability on codes near the true one. Both use the same masked-diffusion masks
    (``seed``), so checkpoints and runs are compared on equal terms.
    """
    from snce.generators.objectives import LossConfig, TokenLoss, validation_loss

    hard = TokenLoss(LossConfig(kind="ce"))
    soft = TokenLoss(LossConfig(kind="snce", tau=float(tau)), codebook, metric)
    kwargs = dict(batch_size=batch_size, seed=seed)
    return {
        "nll": validation_loss(model, tokens, classes, hard, **kwargs),
        "soft_nll": validation_loss(model, tokens, classes, soft.to(codebook.device), **kwargs),
    }
