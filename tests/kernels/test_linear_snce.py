"""Triton fused linear SNCE vs the dense float64 reference (and the torch path): loss and every gradient.

Default run: CPU under TRITON_INTERPRET=1 at tiny shapes with small tiles (several row blocks, code blocks
and code splits, K not a multiple of the tile). ``-m gpu``: the same on CUDA, plus larger shapes and bf16.
"""

import pytest
import torch

pytest.importorskip("triton")

from snce.functional import fused_linear_snce_loss  # noqa: E402
from snce.losses.kernels import KernelConfig, fused_linear_snce_loss_triton  # noqa: E402
from snce.losses.reference import dense_targets, fused_linear_snce_loss_reference  # noqa: E402

N, H, K, D = 37, 24, 70, 8
# Small tiles: 2 row blocks, 3 code blocks, 2 forward code splits; the gemm backward runs 3 code chunks.
TINY = KernelConfig(block_n=32, block_k=32, block_h=32, block_d=16, chunk_bytes=N * 4 * 32)
TINY_ATOMIC = KernelConfig(block_n=32, block_k=32, block_h=32, block_d=16, backward="atomic")
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def make_problem(device, dtype=torch.float32, n=N, h=H, k=K, d=D, *, bias=True, latents=True, weight=True):
    x = torch.randn(n, h, device=device).to(dtype).requires_grad_()
    w = (torch.randn(k, h, device=device) / h**0.5).to(dtype).requires_grad_()
    b = torch.randn(k, device=device).to(dtype).requires_grad_() if bias else None
    codebook = torch.randn(k, d, device=device)
    target = torch.randint(0, k, (n,), device=device)
    target[::7] = -100  # some ignored tokens
    kw = dict(
        codebook=codebook,
        latents=codebook[target.clamp_min(0)] + 0.3 * torch.randn(n, d, device=device) if latents else None,
        tau=0.5 * d**0.5,
        weight=torch.rand(n, device=device) + 0.5 if weight else None,
    )
    return x, w, b, target, kw


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def assert_rel(actual, expected, tol, name):
    err = rel_err(actual, expected)
    if err > tol:
        diff = (actual.double() - expected.double()).abs().flatten()
        i = int(diff.argmax())
        raise AssertionError(
            f"{name}: relative error {err:.2e} > {tol:.0e}; worst at flat index {i}: "
            f"{actual.flatten()[i].item():.6g} vs {expected.flatten()[i].item():.6g}"
        )


def assert_grads(grads, expected, tol):
    names = ("grad hidden", "grad head_weight", "grad head_bias")[: len(grads)]
    for name, g, g_ref in zip(names, grads, expected, strict=True):
        assert_rel(g, g_ref, tol, name)


def check_against_reference(x, w, b, target, kw, *, config=TINY, reduction="mean", tol=1e-4):
    params = [p for p in (x, w, b) if p is not None]
    loss = fused_linear_snce_loss_triton(x, w, target, b, reduction=reduction, config=config, **kw)
    ref = fused_linear_snce_loss_reference(x, w, target, b, reduction=reduction, **kw)
    upstream = torch.randn_like(ref) if reduction == "none" else torch.ones_like(ref)
    grads = torch.autograd.grad(loss, params, upstream.to(loss.dtype))
    ref_grads = torch.autograd.grad(ref, params, upstream)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert_rel(loss, ref, tol, "loss")
    assert_grads(grads, ref_grads, tol)


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
@pytest.mark.parametrize("latents", [True, False], ids=["latents", "pretokenized"])
def test_matches_reference(device, metric, latents):
    x, w, b, target, kw = make_problem(device, latents=latents)
    check_against_reference(x, w, b, target, dict(kw, metric=metric))


@pytest.mark.parametrize(
    ("metric", "latents", "reduction"), [("l2", True, "mean"), ("cosine", False, "none")], ids=["l2", "cosine"]
)
def test_atomic_backward_matches_reference(device, metric, latents, reduction):
    x, w, b, target, kw = make_problem(device, latents=latents)
    check_against_reference(x, w, b, target, dict(kw, metric=metric), config=TINY_ATOMIC, reduction=reduction)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_without_bias_or_weight(device, reduction):
    x, w, b, target, kw = make_problem(device, bias=False, weight=False)
    check_against_reference(x, w, b, target, dict(kw, metric="l2"), reduction=reduction)


def test_matches_torch_path_with_batch_dims(device):
    x, w, b, target, kw = make_problem(device, n=36)
    x3, t3 = x.view(4, 9, H), target.view(4, 9)
    kw3 = dict(kw, latents=kw["latents"].view(4, 9, D), weight=kw["weight"].view(4, 9), metric="cosine")
    loss = fused_linear_snce_loss_triton(x3, w, t3, b, reduction="none", config=TINY, **kw3)
    ref = fused_linear_snce_loss(x3, w, t3, b, reduction="none", **kw3)
    assert loss.shape == (4, 9)
    upstream = torch.randn(4, 9, device=device)
    grads = torch.autograd.grad(loss, (x, w, b), upstream)
    ref_grads = torch.autograd.grad(ref, (x, w, b), upstream)
    assert_rel(loss, ref, 1e-4, "loss")
    assert_grads(grads, ref_grads, 1e-4)


@pytest.mark.parametrize("config", [TINY, TINY_ATOMIC], ids=["gemm", "atomic"])
def test_only_hidden_needs_grad(device, config):
    x, w, b, target, kw = make_problem(device)
    w.requires_grad_(False)
    b.requires_grad_(False)
    (g,) = torch.autograd.grad(fused_linear_snce_loss_triton(x, w, target, b, config=config, **kw), (x,))
    (g_ref,) = torch.autograd.grad(fused_linear_snce_loss_reference(x, w, target, b, **kw), (x,))
    assert_rel(g, g_ref, 1e-4, "grad hidden")


@pytest.mark.parametrize("config", [TINY, TINY_ATOMIC], ids=["gemm", "atomic"])
def test_all_ignored_gives_zero_loss_and_grads(device, config):
    x, w, b, target, kw = make_problem(device)
    target.fill_(-100)
    loss = fused_linear_snce_loss_triton(x, w, target, b, config=config, **kw)
    grads = torch.autograd.grad(loss, (x, w, b))
    assert loss.item() == 0.0
    assert all(bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize("config", [TINY, TINY_ATOMIC], ids=["gemm", "atomic"])
def test_empty_batch_gives_zero_loss(device, config):
    x, w, b, target, kw = make_problem(device, n=0, latents=False, weight=False)
    loss = fused_linear_snce_loss_triton(x, w, target, b, config=config, **kw)
    grads = torch.autograd.grad(loss, (x, w, b))
    assert loss.item() == 0.0 and grads[0].shape == (0, H)
    assert not bool(grads[1].any()) and not bool(grads[2].any())


def test_gradient_filtering_drops_exactly_the_negligible_tiles(device):
    """Dense oracle of filtering: zero the gradient on (block_n x block_k) tiles where every p and q < eps."""
    x, w, b, target, kw = make_problem(device, bias=True, weight=False, latents=False)
    # q nearly one-hot on targets among the first 16 codes; p nearly uniform (1/70): the tiles of codes
    # 16..69 carry only p < eps and get skipped.
    target = torch.where(target == -100, target, target % 16)
    kw = dict(kw, tau=0.05)
    with torch.no_grad():
        w.mul_(0.1)
        b.mul_(0.1)
    eps = 0.05
    cfg = KernelConfig(block_n=16, block_k=16, block_h=32, block_d=16, backward="atomic", filter_eps=eps)
    loss = fused_linear_snce_loss_triton(x, w, target, b, reduction="sum", config=cfg, **kw)
    grads = torch.autograd.grad(loss, (x, w, b))

    logits = x.double() @ w.double().T + b.double()
    p = logits.softmax(dim=1)
    q = dense_targets(target, kw["codebook"], kw["latents"], tau=kw["tau"], metric="l2")
    dl = torch.where((target != -100)[:, None], p - q, 0.0)
    big = torch.maximum(p, q)
    tile_max = torch.nn.functional.pad(big, (0, (-K) % 16, 0, (-N) % 16)).view(3, 16, 5, 16).amax(dim=(1, 3))
    keep = (tile_max >= eps).repeat_interleave(16, 0).repeat_interleave(16, 1)[:N, :K]
    assert 0 < int((~keep).sum()) and bool(keep.any())  # the case really filters something
    dl = torch.where(keep, dl, 0.0)
    expected = (dl @ w.double(), dl.T @ x.double(), dl.sum(0))
    assert_grads(grads, expected, 1e-4)


def test_float16_inputs_accumulate_in_float32(device):
    # float16 codebook and latents: the teacher matmul runs "native" (exact products, float32 sums).
    # bfloat16 is covered on the GPU only: Triton 3.9's interpreter mis-reads bfloat16 operands of tl.dot.
    x, w, b, target, kw = make_problem(device, dtype=torch.float16)
    kw = dict(kw, codebook=kw["codebook"].half(), latents=kw["latents"].half(), metric="l2")
    check_against_reference(x, w, b, target, kw, tol=TOL[torch.float16])


def test_rejects_bad_input_before_work(device):
    x, w, b, target, kw = make_problem(device)
    with pytest.raises(ValueError, match="topk"):
        fused_linear_snce_loss_triton(x, w, target, b, topk=4, **kw)
    with pytest.raises(TypeError, match="dtype"):
        fused_linear_snce_loss_triton(x.double(), w.double(), target, None, **kw)
    with pytest.raises(ValueError, match="target holds index 70"):
        fused_linear_snce_loss_triton(x, w, torch.full_like(target, K), b, **kw)
    with pytest.raises(ValueError, match="tau"):
        fused_linear_snce_loss_triton(x, w, target, b, **dict(kw, tau=0.0))
    with pytest.raises(ValueError, match="metric"):
        fused_linear_snce_loss_triton(x, w, target, b, metric="manhattan", **kw)
    with pytest.raises(ValueError, match="latents"):
        fused_linear_snce_loss_triton(x, w, target, b, **dict(kw, latents=kw["latents"][:, :4]))
    with pytest.raises(ValueError, match="filter_eps > 0 needs backward='atomic'"):
        KernelConfig(filter_eps=1e-3)
    with pytest.raises(ValueError, match="block_k"):
        KernelConfig(block_k=48)


@pytest.mark.gpu
@pytest.mark.parametrize("backward", ["gemm", "atomic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_default_tiles_at_larger_shapes_on_gpu(metric, dtype, backward):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x, w, b, target, kw = make_problem("cuda", dtype, n=1000, h=256, k=5003, d=64)
    config = KernelConfig(backward=backward, chunk_bytes=1000 * 4 * 2048)  # several code chunks
    check_against_reference(x, w, b, target, dict(kw, metric=metric), config=config, tol=TOL[dtype])

