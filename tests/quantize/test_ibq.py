"""IBQ: the chunked soft paths against the dense released formulation, and who receives gradient."""

import pytest
import torch

from snce.quantize import IBQuantizer, VectorQuantizer
from snce.quantize.ibq import (
    EntropyTerms,
    IndexBackprop,
    dense_entropy_terms,
    dense_index_backprop,
    softmax_stats,
)
from snce.quantize.search import nearest_codes

# (N, D, K, block bytes): odd sizes, codes split into several blocks; rows too in the second case
SHAPES = [(37, 5, 301, 4 * 37 * 50), (1100, 4, 50, 4 * 1024 * 20), (64, 16, 1024, 4 * 64 * 256)]
BLOCK = 4 * 16 * 97


def case(n, d, k, scale=0.5):
    z = (torch.randn(n, d) * scale).requires_grad_()
    codebook = torch.randn(k, d).requires_grad_()
    return z, codebook


@pytest.mark.parametrize("n,d,k,block", SHAPES)
def test_index_backprop_matches_dense(n, d, k, block):
    z, codebook = case(n, d, k)
    g = torch.randn(n, d)
    zq_dense, idx_dense = dense_index_backprop(z, codebook)
    grads_dense = torch.autograd.grad((zq_dense * g).sum(), [z, codebook])
    row_max, idx, log_sum = softmax_stats(z, codebook, 1.0, block)
    assert torch.equal(idx, nearest_codes(z.detach(), codebook.detach(), "dot")[1][:, 0])
    assert torch.equal(idx, idx_dense)
    torch.testing.assert_close(row_max + log_sum, (z @ codebook.T).logsumexp(dim=1))
    zq = IndexBackprop.apply(z, codebook, idx, row_max, log_sum, block)
    grads = torch.autograd.grad((zq * g).sum(), [z, codebook])
    torch.testing.assert_close(zq, zq_dense, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_dense, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,d,k,block", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.01])
def test_entropy_terms_match_dense(n, d, k, block, temperature):
    """Rule: error vs the float64 dense gold <= the float32 dense reference's own error + slack."""
    z, codebook = case(n, d, k)

    def values_and_grads(fn, z, codebook):
        sample_h, batch_h = fn(z, codebook)
        grads = torch.autograd.grad(0.7 * sample_h - 1.3 * batch_h, [z, codebook])
        return (sample_h, batch_h, *grads)

    def dense(z, codebook):
        return dense_entropy_terms(z @ codebook.T, temperature)

    z64, codebook64 = (t.detach().double().requires_grad_() for t in (z, codebook))
    gold = values_and_grads(dense, z64, codebook64)
    ref = values_and_grads(dense, z, codebook)
    got = values_and_grads(lambda z, e: EntropyTerms.apply(z, e, temperature, block), z, codebook)
    for name, g, r, want in zip(["sample H", "batch H", "dz", "dE"], got, ref, gold, strict=True):
        err, ref_err = (g.double() - want).abs().max(), (r.double() - want).abs().max()
        slack = 1e-6 * (1 + want.abs().max())
        assert err <= 2 * ref_err + slack, f"{name}: error {err:.3g} vs dense float32 {ref_err:.3g}"


def test_entropy_terms_closed_form():
    """All logits equal: every p_i is uniform, so both entropies are log K."""
    k = 50
    z = torch.zeros(7, 4)
    sample_h, batch_h = EntropyTerms.apply(z, torch.randn(k, 4), 0.01, BLOCK)
    torch.testing.assert_close(sample_h, torch.log(torch.tensor(float(k))))
    torch.testing.assert_close(batch_h, torch.log(torch.tensor(float(k))))


@pytest.mark.parametrize("beta_on", ["codebook", "commitment"])
def test_quantizer_chunked_equals_dense(beta_on):
    chunked = IBQuantizer(12, 257, beta_on=beta_on, max_block_bytes=BLOCK)
    dense = IBQuantizer(12, 257, beta_on=beta_on, chunked=False)
    dense.load_state_dict(chunked.state_dict())
    z = (0.3 * torch.randn(2, 12, 5, 7)).requires_grad_()
    w = torch.randn(2, 12, 5, 7)
    results = []
    for q in (chunked, dense):
        out = q(z)
        grads = torch.autograd.grad(out.loss + (out.quantized * w).sum(), [z, q.embed])
        results.append((out, grads))
    (out_c, grads_c), (out_d, grads_d) = results
    assert torch.equal(out_c.indices, out_d.indices)
    torch.testing.assert_close(out_c.loss, out_d.loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads_c, grads_d, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item())


def test_released_loss_terms():
    """Loss value = mse(zq, z) (1 + 1 + beta) since z_q = z_q' = E[k*] in value, plus the entropy term."""
    q = IBQuantizer(8, 64, beta=0.25)
    z = torch.randn(3, 10, 8)
    out = q(z)
    zf = z.reshape(-1, 8)
    mse = (q.embed[(zf @ q.embed.T).argmax(1)] - zf).square().mean()
    sample_h, batch_h = dense_entropy_terms(zf @ q.embed.T, 0.01)
    torch.testing.assert_close(
        out.loss, 2.25 * mse + 0.05 * (sample_h - batch_h), rtol=1e-5, atol=1e-6
    )


def test_every_code_gets_gradient():
    q = IBQuantizer(8, 512, entropy_weight=0.0)
    out = q(torch.randn(2, 8, 4, 4))
    (out.quantized.square().sum() + out.loss).backward()
    assert bool((q.embed.grad.abs().sum(dim=1) > 0).all())
    assert out.indices.unique().numel() < 512  # ... although far fewer codes were selected


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_plain_vq_gradient_only_reaches_selected_codes(metric):
    q = VectorQuantizer(8, 512, metric=metric)
    out = q(torch.randn(2, 8, 4, 4))
    (out.quantized.square().sum() + out.loss).backward()
    has_grad = q.embed.grad.abs().sum(dim=1) > 0
    selected = torch.zeros(512, dtype=torch.bool)
    selected[out.indices.unique()] = True
    assert torch.equal(has_grad, selected)


def test_without_autograd_codes_are_the_argmax_and_the_loss_the_squared_errors():
    """Tokenizing (no_grad): same codes as the dense reference, loss 2.25 mse, no entropy passes."""
    q = IBQuantizer(8, 64, beta=0.25).eval()
    z = torch.randn(3, 10, 8)
    zf = z.reshape(-1, 8)
    with torch.no_grad():
        out = q(z)
    _, want_indices = dense_index_backprop(zf, q.embed)
    assert torch.equal(out.indices.reshape(-1), want_indices)
    mse = (q.embed[want_indices] - zf).square().mean()
    torch.testing.assert_close(out.loss, 2.25 * mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.quantized.reshape(-1, 8), q.embed.detach()[want_indices])
    assert "sample_entropy" not in out.stats
