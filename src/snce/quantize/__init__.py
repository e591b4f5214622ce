"""Large-codebook quantizers behind one contract, and the shared chunked nearest-code search.

Every quantizer returns a :class:`QuantizerOutput` and exposes ``codebook`` / ``metric`` (the exact geometry
it assigns with) and ``config`` (a JSON-able dict that :func:`build_quantizer` turns back into a quantizer).
"""

import torch

from snce.quantize.base import (
    Quantizer,
    QuantizerOutput,
    UsageTracker,
    codebook_health,
    codebook_usage,
    distinct_rows,
    kmeans,
)
from snce.quantize.fvq import (
    FVQuantizer,
    VQBridge,
    learning_annealing,
    learning_annealing_scheduler,
)
from snce.quantize.ibq import IBQuantizer
from snce.quantize.lc import LCQuantizer
from snce.quantize.lfq import LFQuantizer
from snce.quantize.regvq import RegularizedQuantizer
from snce.quantize.search import METRICS, code_blocks, nearest_code, nearest_codes
from snce.quantize.vq import VectorQuantizer

QUANTIZERS: dict[str, type[Quantizer]] = {
    cls.kind: cls
    for cls in (
        VectorQuantizer,
        IBQuantizer,
        FVQuantizer,
        LCQuantizer,
        RegularizedQuantizer,
        LFQuantizer,
    )
}


def build_quantizer(config: dict) -> Quantizer:
    """Build a freshly initialised quantizer from ``quantizer.config`` (a dict with a "kind" key).

    Weights are not part of the config: load them with ``load_state_dict`` afterwards.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    kwargs = dict(config)
    kind = kwargs.pop("kind", None)
    if kind not in QUANTIZERS:
        raise ValueError(f"config['kind'] must be one of {sorted(QUANTIZERS)}, got {kind!r}")
    return QUANTIZERS[kind](**kwargs)


def check_quantizer_config(config: dict) -> None:
    """Raise the TypeError / ValueError that ``build_quantizer(config)`` would, without allocating a codebook:
    the quantizer is built on the meta device (on the CPU when its constructor computes on its tensors)."""
    try:
        with torch.device("meta"):
            build_quantizer(config)
        return
    except (NotImplementedError, RuntimeError) as e:
        if "meta" not in str(e):
            raise
    build_quantizer(config)


__all__ = [
    "FVQuantizer",
    "IBQuantizer",
    "LCQuantizer",
    "LFQuantizer",
    "METRICS",
    "QUANTIZERS",
    "Quantizer",
    "QuantizerOutput",
    "RegularizedQuantizer",
    "UsageTracker",
    "VQBridge",
    "VectorQuantizer",
    "build_quantizer",
    "check_quantizer_config",
    "code_blocks",
    "codebook_health",
    "codebook_usage",
    "distinct_rows",
    "kmeans",
    "learning_annealing",
    "learning_annealing_scheduler",
    "nearest_code",
    "nearest_codes",
]
