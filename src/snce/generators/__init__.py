"""Discrete image generators: LlamaGen-style autoregressive and MaskGIT-style masked diffusion transformers.

Models return hidden states; the loss (``objectives``) and the samplers (``sampling``) use ``model.head_weight``.
Nothing here imports the tokenizer or the training loop: decoding samples to images happens in the caller.
"""

import json
from pathlib import Path

from snce.generators.autoregressive import ARConfig, AutoregressiveTransformer
from snce.generators.masked_diffusion import MaskedDiffusionConfig, MaskedDiffusionTransformer
from snce.generators.sampling import sample, sample_autoregressive, sample_masked
from snce.generators.transformer import PRESETS, GeneratorConfig, GeneratorModel

FAMILIES = {
    "autoregressive": AutoregressiveTransformer,
    "masked_diffusion": MaskedDiffusionTransformer,
}


def build_generator(family: str, preset: str | None = None, **config) -> GeneratorModel:
    """A fresh model of ``family`` ("autoregressive" | "masked_diffusion"), from a named size plus overrides."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    cls = FAMILIES[family].config_class
    return FAMILIES[family](cls.preset(preset, **config) if preset else cls(**config))


def load_generator(directory, *, map_location="cpu") -> GeneratorModel:
    """Load a model saved with ``save_pretrained``, whichever family it is."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no config.json in {directory}: not a saved generator")
    family = json.loads(path.read_text()).get("family")
    if family not in FAMILIES:
        raise ValueError(f"{path} names family {family!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[family].from_pretrained(directory, map_location=map_location)


__all__ = [
    "FAMILIES",
    "PRESETS",
    "ARConfig",
    "AutoregressiveTransformer",
    "GeneratorConfig",
    "GeneratorModel",
    "MaskedDiffusionConfig",
    "MaskedDiffusionTransformer",
    "build_generator",
    "load_generator",
    "sample",
    "sample_autoregressive",
    "sample_masked",
]
