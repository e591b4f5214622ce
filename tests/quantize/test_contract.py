"""One contract for every quantizer: layouts, lookup round trip, geometry, config + state-dict round trip."""

import json

import pytest
import torch

from snce.functional import neighbor_distribution
from snce.quantize import (
    FVQuantizer,
    IBQuantizer,
    LCQuantizer,
    QuantizerOutput,
    RegularizedQuantizer,
    VectorQuantizer,
    build_quantizer,
    nearest_code,
)

DIM, K = 8, 64

FACTORIES = {
    "vq-l2": lambda: VectorQuantizer(DIM, K),
    "vq-cosine": lambda: VectorQuantizer(DIM, K, metric="cosine"),
    "vq-ema-kmeans": lambda: VectorQuantizer(
        DIM, K, ema_decay=0.8, kmeans_init=True, dead_code_threshold=0.5
    ),
    "ibq": lambda: IBQuantizer(DIM, K),
    "ibq-dense": lambda: IBQuantizer(DIM, K, chunked=False, beta_on="commitment"),
    "fvq": lambda: FVQuantizer(DIM, K, bridge_width=16, bridge_heads=2),
    "lc": lambda: LCQuantizer(DIM, torch.randn(K, 12)),
    "regvq": lambda: RegularizedQuantizer(DIM, K, contrastive_weight=0.0),
    "regvq-cosine": lambda: RegularizedQuantizer(
        DIM, K, metric="cosine", contrastive_weight=0.0, tau=0.1
    ),
}

LAYOUTS = {"BDHW": (2, DIM, 3, 5), "BLD": (3, 7, DIM)}


def flat(z):
    """Reference flattening: (B, D, H, W) -> (B*H*W, D); (B, L, D) -> (B*L, D)."""
    return z.permute(0, 2, 3, 1).reshape(-1, DIM) if z.dim() == 4 else z.reshape(-1, DIM)


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_contract(name, layout):
    q = FACTORIES[name]()
    z = torch.randn(LAYOUTS[layout], requires_grad=True)
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    index_shape = z.shape[:1] + z.shape[2:] if layout == "BDHW" else z.shape[:2]
    assert out.indices.shape == index_shape and out.indices.dtype == torch.long
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert {"usage", "perplexity"} <= set(out.stats) and all(
        isinstance(v, float) for v in out.stats.values()
    )
    (out.quantized.square().sum() + out.loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_geometry_and_lookup(name, layout):
    q = FACTORIES[name]()
    q(torch.randn(LAYOUTS[layout]))  # one training step (k-means init, EMA update, ...)
    q.eval()
    z = torch.randn(LAYOUTS[layout])
    with torch.no_grad():
        out = q(z)
        codebook = q.codebook
    # SNCE targets built from (q.codebook, q.metric) peak at q's own assignment.
    targets = neighbor_distribution(flat(z), codebook, tau=0.5, metric=q.metric)
    assert torch.equal(targets.argmax(dim=1), out.indices.reshape(-1))
    assert torch.equal(nearest_code(flat(z), codebook, q.metric), out.indices.reshape(-1))
    # lookup(indices) is the quantized value, in the input's layout.
    torch.testing.assert_close(q.lookup(out.indices), out.quantized, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        flat(out.quantized), codebook[out.indices.reshape(-1)], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", FACTORIES)
def test_config_and_state_dict_round_trip(name):
    q = FACTORIES[name]()
    q(torch.randn(4, 9, DIM))  # move the state away from initialisation
    config = json.loads(json.dumps(q.config))
    q2 = build_quantizer(config)
    assert type(q2) is type(q) and q2.config == q.config
    q2.load_state_dict(q.state_dict())
    q.eval(), q2.eval()
    z = torch.randn(2, DIM, 4, 4)
    torch.testing.assert_close(q2.codebook, q.codebook)
    assert torch.equal(q2(z).indices, q(z).indices)


@pytest.mark.parametrize("name", FACTORIES)
def test_bad_input(name):
    q = FACTORIES[name]()
    with pytest.raises(ValueError, match="latent dimension 5"):
        q(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="latent dimension 5"):
        q(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="NaN or Inf"):
        q(torch.full((1, 2, DIM), float("nan")))
    with pytest.raises(ValueError, match=r"\(B, D, H, W\) or \(B, L, D\)"):
        q(torch.randn(4, DIM))
    with pytest.raises(TypeError, match="floating"):
        q(torch.ones(1, 2, DIM, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 64\)"):
        q.lookup(torch.tensor([[0, K]]))


def test_unknown_kind_and_metric():
    with pytest.raises(ValueError, match="kind"):
        build_quantizer({"kind": "nope"})
    with pytest.raises(ValueError, match="metric"):
        VectorQuantizer(DIM, K, metric="hamming")
    with pytest.raises(ValueError, match="metric must be 'l2' or 'cosine'"):
        VectorQuantizer(DIM, K, metric="dot")
