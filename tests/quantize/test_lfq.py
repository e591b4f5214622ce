"""LFQ: sign bits, channel 0 the least significant; the explicit +-1 codebook under "dot" gives the same
codes (checked against an argmax over a table built here, not by the quantizer)."""

import json

import pytest
import torch

from snce.functional import neighbor_distribution
from snce.quantize import LFQuantizer, QuantizerOutput, build_quantizer, nearest_code


def explicit_codebook(bits: int) -> torch.Tensor:
    """Row k: +1 where bit d of k is set, else -1 (bit d = channel d)."""
    rows = [[1.0 if k & (1 << d) else -1.0 for d in range(bits)] for k in range(2**bits)]
    return torch.tensor(rows)


def flat(z):
    return (
        z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if z.dim() == 4
        else z.reshape(-1, z.shape[-1])
    )


@pytest.mark.parametrize("bits", [1, 6, 10])
def test_indices_are_the_argmax_over_the_explicit_codebook(bits):
    q = LFQuantizer(bits).eval()
    table = explicit_codebook(bits)
    assert torch.equal(q.codebook, table)
    assert q.metric == "dot" and q.codebook_size == 2**bits
    z = torch.randn(3, bits, 9, 7)
    with torch.no_grad():
        out = q(z)
    zf = flat(z)
    argmax = (zf @ table.T).argmax(dim=1)  # the nearest code under "dot", dense
    assert torch.equal(out.indices.reshape(-1), argmax)
    assert torch.equal(nearest_code(zf, q.codebook, q.metric), argmax)
    targets = neighbor_distribution(zf, q.codebook, tau=0.5, metric=q.metric)  # SNCE targets
    assert torch.equal(targets.argmax(dim=1), argmax)
    assert torch.equal(flat(out.quantized), table[argmax])  # the +-1 codes themselves
    assert torch.equal(flat(out.quantized), torch.where(zf > 0, 1.0, -1.0))


def test_bit_order_channel_zero_is_the_least_significant_bit():
    q = LFQuantizer(5)
    z = -torch.ones(5, 1, 5)  # (B, L, D): sample d has only channel d positive
    for d in range(5):
        z[d, 0, d] = 0.3
    assert q(z).indices.reshape(-1).tolist() == [1, 2, 4, 8, 16]
    every = torch.tensor([[1.0 if k >> d & 1 else -1.0 for d in range(5)] for k in range(32)])
    assert q(every[None]).indices.reshape(-1).tolist() == list(range(32))


def test_zero_maps_to_minus_one_and_the_search_breaks_the_tie_the_same_way():
    q = LFQuantizer(4)
    z = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.5, 0.0, -2.0, 0.0], [-0.0, 1.0, 0.0, 3.0]]])
    out = q(z)
    assert out.indices.reshape(-1).tolist() == [0, 1, 10]
    assert torch.equal(out.quantized, torch.where(z > 0, 1.0, -1.0))
    # codes differing only in a zero channel tie exactly; the search takes the lower index (bit 0 -> -1)
    assert nearest_code(z[0], q.codebook, "dot").tolist() == [0, 1, 10]


def test_lookup_gives_the_codes_in_both_layouts():
    q = LFQuantizer(6).eval()
    for shape in [(2, 6, 4, 5), (3, 7, 6)]:
        z = torch.randn(shape)
        with torch.no_grad():
            out = q(z)
        assert torch.equal(q.lookup(out.indices), out.quantized)
    indices = torch.randint(0, 64, (2, 3, 4))
    assert torch.equal(q.lookup(indices), explicit_codebook(6)[indices].permute(0, 3, 1, 2))
    assert torch.equal(q.lookup(indices[:, 0]), explicit_codebook(6)[indices[:, 0]])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 64\)"):
        q.lookup(torch.tensor([[0, 64]]))
    with pytest.raises(TypeError, match="integer"):
        q.lookup(torch.zeros(2, 3))


def test_output_contract_straight_through_and_commitment():
    q = LFQuantizer(8, commitment_weight=0.5)
    z = torch.randn(2, 8, 3, 5, requires_grad=True)
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == z.shape and out.indices.shape == (2, 3, 5)
    assert out.indices.dtype == torch.long
    codes = torch.where(z > 0, 1.0, -1.0)
    torch.testing.assert_close(out.loss, 0.5 * ((z - codes) ** 2).mean())
    assert {"usage", "perplexity", "commitment"} <= set(out.stats)
    out.quantized.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through: identity gradient
    half = q(torch.randn(4, 3, 8).half())
    assert half.quantized.dtype == torch.float16


def test_config_round_trip_and_no_weights():
    q = LFQuantizer(7, commitment_weight=0.1)
    assert q.state_dict() == {}  # the codebook is implicit: nothing for a checkpoint to hold
    config = json.loads(json.dumps(q.config))
    assert config["kind"] == "lfq" and config["codebook_size"] == 128
    q2 = build_quantizer(config)
    assert type(q2) is LFQuantizer and q2.config == q.config
    assert q2.codebook.shape == (128, 7) and q2.state_dict() == {}  # still none after building it
    assert build_quantizer({"kind": "lfq", "dim": 3, "codebook_size": 8}).codebook_size == 8


def test_bad_options_and_input():
    with pytest.raises(ValueError, match="codebook_size must be 2 \\*\\* dim = 64"):
        LFQuantizer(6, codebook_size=100)
    for dim in (0, 25, 3.0, True):
        with pytest.raises(ValueError, match="dim"):
            LFQuantizer(dim)
    with pytest.raises(ValueError, match="commitment_weight"):
        LFQuantizer(4, commitment_weight=-1.0)
    q = LFQuantizer(4)
    with pytest.raises(ValueError, match="latent dimension 5"):
        q(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        q(torch.full((1, 2, 4), float("nan")))


def test_eighteen_bits_built_lazily_and_searchable():
    """Open-MAGVIT2's size: 2^18 codes of 18 bits (19 MB), made on first use of ``codebook`` only."""
    q = LFQuantizer(18).eval()
    assert q._codebook.numel() == 0  # quantize and lookup never need the table
    z = torch.randn(64, 18)
    with torch.no_grad():
        out = q(z[None])
    assert q._codebook.numel() == 0
    table = q.codebook
    assert table.shape == (2**18, 18) and table.dtype == torch.float32
    assert q.codebook is table  # cached
    assert torch.equal(nearest_code(z, table, "dot"), out.indices.reshape(-1))
    some = torch.tensor([0, 1, 2**17, 2**18 - 1, 12345])
    for k, row in zip(some.tolist(), table[some], strict=True):
        assert row.tolist() == [1.0 if k >> d & 1 else -1.0 for d in range(18)]


def test_codebook_first_built_under_inference_mode_serves_autograd():
    q = LFQuantizer(5)
    with torch.inference_mode():
        q(torch.randn(2, 3, 5))
        table = q.codebook
    assert not table.is_inference()
    h = torch.randn(4, 5, requires_grad=True)
    (h @ q.codebook.T).logsumexp(dim=1).sum().backward()  # saves the codebook for backward
    assert h.grad is not None
