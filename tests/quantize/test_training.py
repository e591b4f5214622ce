"""Short CPU training on a toy Gaussian mixture (direct latent fitting, K = 1024): codebook usage.

Fixed 8-D latents from a 16-component Gaussian mixture; each quantizer's parameters are trained with
Adam on its own loss plus the reconstruction mse(z_q, z) (which reaches the codebook only where the method
routes gradient through z_q, as IBQ does). Usage is counted over a held-out set of 32,768 latents
(32 per code on average) in eval mode. IBQ, FVQ and VQGAN-LC must use >= 90% of the codes; plain VQ is
measured and printed beside them (run with -s to see the table).
"""

import pytest
import torch

from snce.quantize import FVQuantizer, IBQuantizer, LCQuantizer, VectorQuantizer, codebook_usage

D, K = 8, 1024
MEANS = torch.randn(16, D, generator=torch.Generator().manual_seed(5))


def mixture(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MEANS[torch.randint(0, 16, (n,), generator=g)] + 0.7 * torch.randn(n, D, generator=g)


QUANTIZERS = {  # name: (factory, training steps, required usage or None = measured only)
    "ibq": (lambda: IBQuantizer(D, K), 150, 0.9),
    # a narrower bridge than the published 256 keeps the test short; the mechanism is the same
    "fvq": (lambda: FVQuantizer(D, K, bridge_width=64), 200, 0.9),
    "lc": (lambda: LCQuantizer(D, torch.randn(K, 32)), 150, 0.9),
    "vq": (lambda: VectorQuantizer(D, K), 150, None),
}


def train_and_measure(name: str) -> float:
    factory, steps, _ = QUANTIZERS[name]
    q = factory()
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    train = mixture(65536, seed=1)
    for _ in range(steps):
        z = train[torch.randint(0, len(train), (512,))].view(4, 128, D)
        out = q(z)
        loss = (out.quantized - z).square().mean() + out.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.eval()
    with torch.no_grad():
        indices = q(mixture(32768, seed=2).view(1, -1, D)).indices
    return codebook_usage(indices, K)[0]


@pytest.mark.parametrize("name", QUANTIZERS)
def test_codebook_usage_after_short_training(name):
    usage = train_and_measure(name)
    print(f"\n{name}: usage {usage:.1%} of {K} codes after {QUANTIZERS[name][1]} steps")
    required = QUANTIZERS[name][2]
    if required is not None:
        assert usage >= required, f"{name} uses {usage:.1%} of the codes (needs >= {required:.0%})"
