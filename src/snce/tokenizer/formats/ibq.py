"""IBQ checkpoints (TencentARC/SEED-Voken, ``src/IBQ/``): taming's layout, dot-product codes.

A Lightning checkpoint (``state_dict``) in taming's module names with 4 residual blocks per level; the
codebook ``quantize.embedding.weight`` (K x 256, K up to 262,144) is assigned by the unnormalised dot
product z.e_k (argmax) and the raw code vector goes to the decoder: snce's ``ibq`` quantizer. The published
numbers use the EMA weights, stored beside the plain ones as ``model_ema.<name with the dots removed>``
(LitEma); ``--ema`` imports those. ``loss.*`` (LPIPS, discriminator) is not the tokenizer. Its keys are
taming's, so nothing in a file without ``model_ema.*`` tells an IBQ from a taming VQGAN: ``--format``
decides the assignment rule (dot product or squared l2).
"""

from __future__ import annotations

from snce.tokenizer.formats import CheckpointKeyError, Format, register
from snce.tokenizer.formats.taming import TAMING, taming_config
from snce.tokenizer.model import TokenizerConfig

EMA_PREFIX = "model_ema."


def ema_weights(state: dict) -> dict:
    """The EMA value of every tokenizer weight, under the weight's plain name."""
    plain = [k for k in state if not k.startswith((EMA_PREFIX, "loss."))]
    missing = [k for k in plain if EMA_PREFIX + k.replace(".", "") not in state]
    if missing:
        raise CheckpointKeyError(
            f"no EMA copy ({EMA_PREFIX}<name without dots>) of {', '.join(missing[:6])} "
            f"({len(missing)} keys); import without --ema"
        )
    return {k: state[EMA_PREFIX + k.replace(".", "")] for k in plain}


def _config(state: dict) -> TokenizerConfig:
    codebook_size, _ = state["quantize.embedding.weight"].shape
    return taming_config(state, {"kind": "ibq", "codebook_size": codebook_size})


IBQ = register(
    Format(
        name="ibq",
        description="SEED-Voken IBQ (Lightning state_dict; dot-product codebook; --ema for model_ema.*)",
        nesting=("state_dict",),
        signature=TAMING.signature,  # the same keys: only the assignment rule tells them apart
        ignored=(r"loss\.", rf"{EMA_PREFIX}"),
        config=_config,
        to_snce=TAMING.to_snce,
        from_snce=TAMING.from_snce,
        ema=ema_weights,
    )
)
