"""LlamaGen VQ-8 / VQ-16 checkpoints (FoundationVision/LlamaGen, ``tokenizer/tokenizer_image/vq_model.py``).

The architecture is taming's under other names: ``conv_blocks.{i}.res.{j}`` / ``.attn.{j}`` /
``.downsample`` / ``.upsample`` per level, ``mid.{0,1,2}`` for (block, attention, block), and the decoder's
``conv_blocks`` stored in the order it runs (``conv_blocks.0`` is the lowest resolution, taming's last
``up``). Attention follows every block of the lowest-resolution level. The codebook (16384 x 8) is stored
raw and l2-normalised at use, as are the latents: cosine assignment, normalised code vectors to the
decoder, which is snce's ``vq`` quantizer with ``metric: cosine``. Files hold ``model`` (training saves
also ``ema`` under the same names; ``--ema`` takes it) and a ``quantize.codebook_used`` usage buffer,
which is training bookkeeping and not imported. FVQ (VQBridge) releases its tokenizers in this layout.
"""

from __future__ import annotations

import re

from snce.tokenizer.formats import Format, register
from snce.tokenizer.formats.taming import move_from_snce, move_to_snce, taming_config
from snce.tokenizer.model import TokenizerConfig

MID = {"0": "block_1", "1": "attn_1", "2": "block_2"}
PARTS = {"res": "block", "attn": "attn", "downsample": "downsample", "upsample": "upsample"}


def _levels(cfg: TokenizerConfig) -> int:
    return len(cfg.channel_mult)


def to_taming(key: str, levels: int) -> str:
    """A LlamaGen key in taming's names (``levels``: the number of resolutions)."""
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.(\d)\.(.*)", key):
        return f"{m[1]}.mid.{MID[m[2]]}.{m[3]}"
    if m := re.fullmatch(
        r"(encoder|decoder)\.conv_blocks\.(\d+)\.(res|attn|downsample|upsample)\.(.*)", key
    ):
        level = int(m[2]) if m[1] == "encoder" else levels - 1 - int(m[2])
        stage = "down" if m[1] == "encoder" else "up"
        return f"{m[1]}.{stage}.{level}.{PARTS[m[3]]}.{m[4]}"
    return key


def from_taming(key: str, levels: int) -> str:
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|attn_1|block_2)\.(.*)", key):
        return f"{m[1]}.mid.{dict(map(reversed, MID.items()))[m[2]]}.{m[3]}"
    if m := re.fullmatch(
        r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(.*)", key
    ):
        index = int(m[3]) if m[1] == "encoder" else levels - 1 - int(m[3])
        part = "res" if m[4] == "block" else m[4]
        return f"{m[1]}.conv_blocks.{index}.{part}.{m[5]}"
    return key


def _config(state: dict) -> TokenizerConfig:
    levels = 1 + max(
        int(m[1]) for k in state if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))
    )
    codebook_size, _ = state["quantize.embedding.weight"].shape
    quantizer = {"kind": "vq", "codebook_size": codebook_size, "metric": "cosine"}
    return taming_config({to_taming(k, levels): v for k, v in state.items()}, quantizer)


def _to_snce(key: str, cfg: TokenizerConfig) -> str:
    if key == "quantize.embedding.weight":
        return "quantizer.embed"
    return move_to_snce(to_taming(key, _levels(cfg)))


def _from_snce(key: str, cfg: TokenizerConfig) -> str:
    if key == "quantizer.embed":
        return "quantize.embedding.weight"
    return from_taming(move_from_snce(key), _levels(cfg))


LLAMAGEN = register(
    Format(
        name="llamagen",
        description="LlamaGen VQ-8/VQ-16 and FVQ (.pt with 'model'; cosine codebook)",
        nesting=("model", "state_dict"),
        ema_nesting="ema",
        signature=(
            r"encoder\.conv_blocks\.\d+\.res\.\d+\.conv1\.weight",
            r"quantize\.embedding\.weight",
        ),
        ignored=(r"quantize\.codebook_used$",),
        config=_config,
        to_snce=_to_snce,
        from_snce=_from_snce,
    )
)
