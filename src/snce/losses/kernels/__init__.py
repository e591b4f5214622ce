"""Triton kernels for SNCE: the fused linear loss (forward + backward) and the nearest-code search.

Nothing here imports Triton until a kernel is asked for, so ``import snce`` works on machines without Triton
or a GPU. The kernels run on CUDA tensors; on CPU tensors only under ``TRITON_INTERPRET=1`` (set before the
first kernel use; slow, for tests at tiny shapes).

    from snce.losses import kernels
    if kernels.supports(hidden, head_weight, codebook, topk=topk, table=table):
        loss = kernels.fused_linear_snce_loss_triton(hidden, head_weight, target, codebook=codebook, tau=tau)
    dist, idx = kernels.nearest_codes_triton(z, codebook, "l2", k=8)

Kernel modules: :mod:`.linear_snce` (loss), :mod:`.search` (nearest codes), :mod:`.tiles` (shared tiles).

Until the kernels have passed their GPU tests (``pytest -m gpu tests/kernels``) on real hardware, ``impl="auto"``
does not pick them (:data:`VERIFIED_ON`); ``impl="triton"`` still runs them on CUDA tensors, with a one-time
warning.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Where the kernels passed their GPU tests (GPU, torch and Triton versions); None: only under Triton's CPU
# interpreter so far. While None, impl="auto" keeps CUDA tensors on the chunked torch path.
VERIFIED_ON: str | None = None
_LAZY = {
    "fused_linear_snce_loss_triton": "linear_snce",
    "KernelConfig": "linear_snce",
    "LinearSNCEFunction": "linear_snce",
    "nearest_codes_triton": "search",
}
__all__ = [
    "KERNEL_DTYPES", "VERIFIED_ON", "interpreting", "supports", "triton_available", "warn_unverified", *_LAZY,
]  # fmt: skip


def triton_available() -> bool:
    """True when the ``triton`` package is installed (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(
    hidden: torch.Tensor, *tensors: torch.Tensor | None, topk=None, table=None, shuffle=None
) -> bool:
    """Whether ``impl="auto"`` should take the Triton path: kernels verified on a GPU (:data:`VERIFIED_ON`),
    Triton installed, CUDA tensors, a kernel dtype (float32 / bfloat16 / float16 hidden) and no ``topk`` /
    ``table`` / ``shuffle`` (those stay on the torch path)."""
    on_cuda = all(t.is_cuda for t in (hidden, *tensors) if t is not None)
    torch_only = topk is not None or table is not None or shuffle is not None
    usable = on_cuda and hidden.dtype in KERNEL_DTYPES and triton_available()
    return VERIFIED_ON is not None and not torch_only and usable


_warned = False


def warn_unverified(hidden: torch.Tensor) -> None:
    """Warn once per process when unverified kernels are forced onto CUDA tensors (``impl="triton"``)."""
    global _warned
    if hidden.is_cuda and VERIFIED_ON is None and not _warned:
        _warned = True
        warnings.warn(
            "impl='triton': the snce Triton kernels have not yet passed their GPU tests on real hardware "
            "(pytest -m gpu tests/kernels); impl='auto' uses the chunked torch path until they have",
            stacklevel=3,
        )


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not triton_available():
        raise ImportError(f"snce.losses.kernels.{name} needs Triton: pip install triton (or use impl='torch')")
    module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
    return getattr(module, name)
