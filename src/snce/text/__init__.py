"""Text encoders for text-to-image and editing: one interface, a builtin weightless encoder, a local Hugging Face
adapter (the ``snce[text]`` extra)."""

from snce.text.encoders import (
    BuiltinTextEncoder,
    HFTextEncoder,
    TextEncoder,
    build_text_encoder,
    parse_text_encoder,
)

__all__ = [
    "BuiltinTextEncoder",
    "HFTextEncoder",
    "TextEncoder",
    "build_text_encoder",
    "parse_text_encoder",
]
