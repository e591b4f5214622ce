"""MaskGIT's VQGAN tokenizer as published by MaskBit (markweberdev/maskbit, ``maskgit_tokenizer.bin``).

MaskBit loads it with ``ConvVQModel(config, legacy=True).load_pretrained(path)``: ``torch.load`` of a
flat state dict (no wrapper key; ``state_dict`` / ``model`` wrappers are accepted too), loaded strictly.
Its 168 keys (the published 256x256 f16 model: width 128, channel_mult (1, 1, 2, 2, 4), 2 residual
blocks, 1024 codes of dimension 256) are ``encoder.*``, ``decoder.*`` and ``quantize.embedding.weight``
(K x D, squared-l2 assignment, no normalisation); there is no ``quant_conv``, ``post_quant_conv`` or loss.
snce's maskgit architecture (:mod:`snce.tokenizer.maskgit`) keeps the port's module names, so only the
codebook is renamed. The architecture is read from the shapes:

    channels, in_channels  <- encoder.conv_in.weight (channels, in_channels, 3, 3)
    channel_mult           <- encoder.down.{l}.res_blocks.0.conv1.weight (channels x mult_l, ., 3, 3)
    num_res_blocks         <- the res_blocks of encoder.down.0
    latent_channels        <- encoder.conv_out.weight (D, ., 1, 1)
    codebook_size          <- quantize.embedding.weight (K, D)

MaskBit's own tokenizers use the non-legacy decoder (``up.0`` is the coarsest level), whose keys look the
same but mean other levels; such a file is refused by name (``decoder.up.0.upsample_conv``).
"""

from __future__ import annotations

import torch

from snce.tokenizer.formats import CheckpointKeyError, Format, encoder_levels, register
from snce.tokenizer.model import TokenizerConfig

CODEBOOK = ("quantize.embedding.weight", "quantizer.embed")  # (MaskBit name, snce name)


def _config(state: dict[str, torch.Tensor]) -> TokenizerConfig:
    if "decoder.up.0.upsample_conv.weight" in state:
        raise CheckpointKeyError(
            "decoder.up.0.upsample_conv.weight is present: this is MaskBit's non-legacy decoder layout "
            "(ConvVQModel(legacy=False), up.0 = the coarsest level), not MaskGIT's legacy layout"
        )
    codebook_size, _ = state[CODEBOOK[0]].shape
    return TokenizerConfig(
        **encoder_levels(state, "res_blocks"),
        latent_channels=state["encoder.conv_out.weight"].shape[0],
        quantizer={"kind": "vq", "codebook_size": codebook_size, "metric": "l2"},
        architecture="maskgit",
    )


def _to_snce(key: str, cfg: TokenizerConfig) -> str:
    return CODEBOOK[1] if key == CODEBOOK[0] else key


def _from_snce(key: str, cfg: TokenizerConfig) -> str:
    return CODEBOOK[0] if key == CODEBOOK[1] else key


MASKGIT = register(
    Format(
        name="maskgit",
        description="MaskGIT VQGAN in MaskBit's PyTorch port (flat state dict; squared-l2 codebook)",
        nesting=("state_dict", "model"),
        signature=(r"encoder\.down\.\d+\.res_blocks\.\d+\.conv1\.weight",
                   r"decoder\.up\.\d+\.upsample_conv\.weight", r"quantize\.embedding\.weight"),
        ignored=(),
        config=_config,
        to_snce=_to_snce,
        from_snce=_from_snce,
    )
)  # fmt: skip
