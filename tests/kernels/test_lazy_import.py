"""`import snce` and `import snce.losses.kernels` must not import Triton (it loads only when a kernel is used)."""

import subprocess
import sys


def test_importing_snce_and_the_kernels_package_does_not_import_triton():
    code = (
        "import sys, snce, snce.functional, snce.losses.kernels as k; "
        "assert 'triton' not in sys.modules, 'triton was imported'; "
        "print(k.supports.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_unverified_kernels_are_not_the_default_on_cuda(monkeypatch):
    """Until the kernels pass their GPU tests, impl="auto" keeps CUDA tensors on the torch path; impl="triton"
    still runs them, warning once."""
    import types
    import warnings

    import torch

    from snce.losses import kernels

    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    on_gpu = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)  # all `supports` looks at
    assert kernels.VERIFIED_ON is None and not kernels.supports(on_gpu, on_gpu)
    monkeypatch.setattr(kernels, "VERIFIED_ON", "H100, torch 2.13, triton 3.9")
    assert kernels.supports(on_gpu, on_gpu)
    monkeypatch.setattr(kernels, "VERIFIED_ON", None)
    monkeypatch.setattr(kernels, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            kernels.warn_unverified(on_gpu)
        kernels.warn_unverified(types.SimpleNamespace(is_cuda=False))
    assert len(caught) == 1 and "not yet passed their GPU tests" in str(caught[0].message)
