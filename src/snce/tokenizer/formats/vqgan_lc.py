"""VQGAN-LC checkpoints (zh460045050/VQGAN-LC, ``vqgan-gpt-lc/models/models_vq.py``).

taming's encoder and decoder and 1x1 convolutions; the codebook is a frozen K x 768 matrix of feature
cluster centres (``tok_embeddings.weight``, K = 100,000) mapped by ``codebook_projection`` (Linear 768 ->
D, with bias); latents take the code nearest in squared l2 in the projected space, and the projected code
goes to the decoder: snce's ``lc`` quantizer (``base`` = the centres, ``projector`` = the projection).
Weights sit under ``state_dict`` (``model`` in files named "last"); ``discriminator.*`` and
``perceptual_loss.*`` are not the tokenizer. Where a file lacks the centres, ``--codebook
codebook-100K.pth`` (the (K, 768) tensor VQGAN-LC loads them from) supplies them.
"""

from __future__ import annotations

from snce.tokenizer.formats import Format, register
from snce.tokenizer.formats.taming import move_from_snce, move_to_snce, taming_config
from snce.tokenizer.model import TokenizerConfig

RENAMED = {
    "tok_embeddings.weight": "quantizer.base",
    "codebook_projection.weight": "quantizer.projector.weight",
    "codebook_projection.bias": "quantizer.projector.bias",
}


def _config(state: dict) -> TokenizerConfig:
    codebook_size, feature_dim = state["tok_embeddings.weight"].shape
    quantizer = {"kind": "lc", "codebook_size": codebook_size, "feature_dim": feature_dim}
    return taming_config(state, quantizer)


def _to_snce(key: str, cfg: TokenizerConfig) -> str:
    return RENAMED.get(key) or move_to_snce(key)


def _from_snce(key: str, cfg: TokenizerConfig) -> str:
    return {new: old for old, new in RENAMED.items()}.get(key) or move_from_snce(key)


VQGAN_LC = register(
    Format(
        name="vqgan-lc",
        description="VQGAN-LC (state_dict or model; frozen 100k x 768 codes + a linear projection)",
        nesting=("state_dict", "model"),
        signature=(r"tok_embeddings\.weight", r"codebook_projection\.weight"),
        ignored=(r"discriminator\.", r"perceptual_loss\."),
        config=_config,
        to_snce=_to_snce,
        from_snce=_from_snce,
        codebook_key="tok_embeddings.weight",
    )
)
