"""Discrete image generators: LlamaGen-style autoregressive and MaskGIT-style masked diffusion transformers.

Models return hidden states; the loss (``objectives``) and the samplers (``sampling``) use ``model.head_weight``.
Nothing here imports the tokenizer or the training loop: decoding samples to images happens in the caller.

Python API in a few lines (tokens: (B, h, w) code indices, classes: (B,) labels, codebook: the tokenizer's
``quantizer.codebook`` and metric)::

    from snce.generators import build_generator, sample
    from snce.generators.objectives import LossConfig, TokenLoss, generator_loss, validation_loss

    model = build_generator("masked_diffusion", "tiny", vocab_size=K, grid=(4, 4), num_classes=10)
    loss = TokenLoss(LossConfig(kind="snce", tau_scale=1.0), codebook, metric)    # or LossConfig(kind="ce")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(N):                                                   # or snce.train.Trainer with
        opt.zero_grad()                                                     # GeneratorObjective(loss)
        generator_loss(model, tokens[idx], classes[idx], loss).backward()
        opt.step()
    nll = validation_loss(model, val_tokens, val_classes, TokenLoss(LossConfig(kind="ce")))   # nats / token
    grid = sample(model, torch.arange(10), cfg_scale=2.0, steps=8)          # (10, 4, 4) -> tokenizer.decode

Text-to-image and editing models (``condition="text"`` / ``"edit"``, with ``text_dim`` and ``max_text_len``)
take a :class:`Conditioning` where class models take labels::

    model = build_generator("autoregressive", "tiny", vocab_size=K, grid=(4, 4), condition="text",
                            text_dim=E, max_text_len=L)
    generator_loss(model, tokens, Conditioning(text=emb, text_mask=mask), loss).backward()
    grid = sample(model, Conditioning(text=emb, text_mask=mask), cfg_scale=3.0)

Full runs on token shards (checkpoints, EMA, resume, DDP, sample grids): ``snce.train.generator``.
"""

import json
from pathlib import Path

from snce.generators.autoregressive import ARConfig, AutoregressiveTransformer
from snce.generators.conditions import Conditioning
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
    "Conditioning",
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
