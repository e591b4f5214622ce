"""Open-MAGVIT2's LFQ tokenizers (TencentARC Open-MAGVIT2 / SEED-Voken, ``src/Open_MAGVIT2``).

A Lightning checkpoint (``imagenet_256_L.ckpt``, ``imagenet_128_L.ckpt``): weights under ``state_dict`` as
``encoder.*`` and ``decoder.*`` (339 keys for the 256 model: width 128, channel_mult (1, 1, 2, 2, 4),
4 residual blocks, 18 bits), the loss's ``loss.*`` (discriminator, perceptual network: not the
tokenizer) and the EMA copies ``model_ema.<name with the dots removed>`` (LitEma) with
``model_ema.decay`` / ``model_ema.num_updates``. The LFQ quantizer stores nothing (its buffers are not
persistent), so there is no ``quantize.*`` key. The published numbers use the EMA weights: import with
``--ema``. snce's open-magvit2 architecture (:mod:`snce.tokenizer.magvit2`) keeps the original's module
names, so no key is renamed; the quantizer is snce's ``lfq`` (sign per bit, channel 0 the least
significant bit, +-1 codes, "dot" metric). The architecture is read from the shapes:

    channels, in_channels  <- encoder.conv_in.weight (channels, in_channels, 3, 3)
    channel_mult           <- encoder.down.{l}.block.0.conv1.weight (channels x mult_l, ., 3, 3)
    num_res_blocks         <- the blocks of encoder.down.0
    latent_channels (bits) <- encoder.conv_out.weight (bits, ., 1, 1); K = 2 ** bits
"""

from __future__ import annotations

import torch

from snce.tokenizer.formats import Format, encoder_levels, register
from snce.tokenizer.formats.ibq import EMA_PREFIX, ema_weights
from snce.tokenizer.model import TokenizerConfig


def _config(state: dict[str, torch.Tensor]) -> TokenizerConfig:
    return TokenizerConfig(
        **encoder_levels(state, "block"),
        latent_channels=state["encoder.conv_out.weight"].shape[0],
        quantizer={"kind": "lfq"},
        architecture="open-magvit2",
    )


def _same(key: str, cfg: TokenizerConfig) -> str:
    return key


OPEN_MAGVIT2 = register(
    Format(
        name="open-magvit2",
        description="Open-MAGVIT2 LFQ tokenizer (Lightning state_dict; sign bits, 2^D implicit codes; "
        "--ema for model_ema.*)",
        nesting=("state_dict",),
        signature=(r"encoder\.mid_block\.\d+\.conv1\.weight", r"decoder\.adaptive\.\d+\.gamma\.weight",
                   r"decoder\.up\.\d+\.upsample\.conv1\.weight"),
        ignored=(r"loss\.", rf"{EMA_PREFIX}"),
        config=_config,
        to_snce=_same,
        from_snce=_same,
        ema=ema_weights,
    )
)  # fmt: skip
