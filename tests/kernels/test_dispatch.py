"""fused_linear_snce_loss's impl switch: "triton" runs the kernels, "torch" the chunked path, same numbers."""

import pytest
import torch

from snce import FusedLinearSNCELoss
from snce.functional import fused_linear_snce_loss

pytest.importorskip("triton")


def test_impl_triton_equals_impl_torch(device):
    n, h, k, d = 19, 16, 37, 8
    hidden = torch.randn(n, h, device=device)
    weight = torch.randn(k, h, device=device)
    codebook = torch.randn(k, d, device=device)
    target = torch.randint(0, k, (n,), device=device)
    results = {}
    for impl in ("torch", "triton"):
        hd, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fused_linear_snce_loss(hd, w, target, codebook=codebook, tau=0.5, impl=impl)
        loss.backward()
        results[impl] = (loss.detach(), hd.grad, w.grad)
    for a, b in zip(results["torch"], results["triton"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    module = FusedLinearSNCELoss(codebook, tau=0.5, impl="triton")
    torch.testing.assert_close(module(hidden, weight, target), results["torch"][0], rtol=1e-4, atol=1e-6)


def test_auto_stays_on_torch_for_cpu_tensors_and_topk(monkeypatch):
    from snce.losses import kernels

    monkeypatch.setattr(kernels, "fused_linear_snce_loss_triton", None, raising=False)
    hidden, weight = torch.randn(5, 4), torch.randn(9, 4)
    out = fused_linear_snce_loss(hidden, weight, torch.arange(5), codebook=torch.randn(9, 3), tau=1.0, topk=2)
    assert torch.isfinite(out)
    with pytest.raises(ValueError, match="impl"):
        fused_linear_snce_loss(hidden, weight, torch.arange(5), codebook=torch.randn(9, 3), tau=1.0, impl="cuda")
