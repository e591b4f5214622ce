"""taming-transformers VQGAN checkpoints (CompVis/taming-transformers), and what its family shares.

A Lightning checkpoint: weights under ``state_dict`` as ``encoder.*``, ``decoder.*``, ``quant_conv.*``,
``post_quant_conv.*``, ``quantize.embedding.weight`` (K x D, squared-l2 assignment), plus the loss's
``loss.*`` (perceptual network, discriminator), which is not the tokenizer. snce's taming architecture
(:mod:`snce.tokenizer.taming`) uses taming's own module names, so only the 1x1 convolutions move (into the
encoder and decoder) and the codebook is renamed. LlamaGen, IBQ and VQGAN-LC reuse :func:`taming_config`.
"""

from __future__ import annotations

import torch

from snce.tokenizer.formats import Format, encoder_levels, register
from snce.tokenizer.model import TokenizerConfig

# taming name <-> snce name, outside the encoder and decoder bodies (which keep taming's names)
MOVED = {
    "quant_conv.": "encoder.quant_conv.",
    "post_quant_conv.": "decoder.post_quant_conv.",
}


def move_to_snce(key: str) -> str:
    for old, new in MOVED.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def move_from_snce(key: str) -> str:
    for old, new in MOVED.items():
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def taming_config(state: dict[str, torch.Tensor], quantizer: dict) -> TokenizerConfig:
    """The architecture of a state dict in taming's names (encoder side; the decoder must mirror it)."""
    levels = encoder_levels(state, "block")
    return TokenizerConfig(
        **levels,
        mid_attention="encoder.mid.attn_1.q.weight" in state,
        latent_channels=state["quant_conv.weight"].shape[0],
        quantizer=quantizer,
        architecture="taming",
        z_channels=state["encoder.conv_out.weight"].shape[0],
        attn_levels=tuple(
            i
            for i in range(len(levels["channel_mult"]))
            if f"encoder.down.{i}.attn.0.q.weight" in state
        ),
    )


def _config(state: dict) -> TokenizerConfig:
    codebook_size, _ = state["quantize.embedding.weight"].shape
    return taming_config(state, {"kind": "vq", "codebook_size": codebook_size, "metric": "l2"})


def _to_snce(key: str, cfg: TokenizerConfig) -> str:
    return "quantizer.embed" if key == "quantize.embedding.weight" else move_to_snce(key)


def _from_snce(key: str, cfg: TokenizerConfig) -> str:
    return "quantize.embedding.weight" if key == "quantizer.embed" else move_from_snce(key)


TAMING = register(
    Format(
        name="taming",
        description="taming-transformers VQGAN (Lightning state_dict; squared-l2 codebook)",
        nesting=("state_dict",),
        signature=(r"encoder\.down\.\d+\.block\.\d+\.conv1\.weight", r"quantize\.embedding\.weight",
                   r"quant_conv\.weight"),
        ignored=(r"loss\.", r"discriminator\."),
        config=_config,
        to_snce=_to_snce,
        from_snce=_from_snce,
    )
)  # fmt: skip
