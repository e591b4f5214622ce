"""bf16 autocast on CUDA: a training step of both families and guided sampling (opt-in: pytest -m gpu)."""

import pytest
import torch

from snce.generators import build_generator, sample
from snce.generators.objectives import LossConfig, TokenLoss, generator_loss

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.parametrize("family", ["autoregressive", "masked_diffusion"])
@pytest.mark.parametrize("kind", ["ce", "snce"])
def test_bf16_autocast_step_and_sampling(family, kind):
    dev = torch.device("cuda")
    k = 4096
    model = build_generator(family, "tiny", vocab_size=k, grid=(8, 8), num_classes=10).to(dev)
    loss = TokenLoss(LossConfig(kind=kind, tau=0.5), torch.randn(k, 8, device=dev), "l2")
    tokens, classes = (
        torch.randint(0, k, (16, 8, 8), device=dev),
        torch.randint(0, 10, (16,), device=dev),
    )
    with torch.autocast("cuda", dtype=torch.bfloat16):
        value = generator_loss(model, tokens, classes, loss)
    value.backward()
    assert torch.isfinite(value) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = sample(
            model, classes[:4], cfg_scale=2.0, generator=torch.Generator(device=dev).manual_seed(0)
        )
    assert out.shape == (4, 8, 8) and out.min() >= 0 and out.max() < k
