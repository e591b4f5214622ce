"""Method-specific behaviour of FVQ (VQBridge, learning annealing), VQGAN-LC and Regularized VQ."""

import math

import pytest
import torch

from snce.quantize import (
    FVQuantizer,
    LCQuantizer,
    RegularizedQuantizer,
    VQBridge,
    learning_annealing,
)
from snce.quantize.fvq import learning_annealing_scheduler
from snce.quantize.regvq import VGG19Features


def test_learning_annealing_schedule_points():
    total, warm = 1000, 100
    assert learning_annealing(0, total, warm) == pytest.approx(0.005)
    assert learning_annealing(50, total, warm) == pytest.approx(0.005 + 0.995 * 0.5)
    assert learning_annealing(100, total, warm) == 1.0
    assert learning_annealing(370, total, warm) == 1.0  # flat for 30% of the 900 remaining steps
    assert learning_annealing(370 + 315, total, warm) == pytest.approx(1 + (0.01 - 1) * 0.5)
    assert learning_annealing(total, total, warm) == pytest.approx(0.01)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = learning_annealing_scheduler(opt, total, warm)
    for _ in range(100):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0)


def test_fvq_codebook_size_must_be_square_and_patch_must_divide():
    with pytest.raises(ValueError, match="perfect square"):
        FVQuantizer(8, 1000)
    with pytest.raises(ValueError, match="patch_size must divide"):
        FVQuantizer(8, 36, patch_size=4)
    assert FVQuantizer(8, 16384, bridge_width=8, bridge_heads=2).bridge.patch == 4
    assert FVQuantizer(8, 65536, bridge_width=8, bridge_heads=2).bridge.patch == 8


def test_vqbridge_starts_as_identity_and_patches_are_local():
    q = FVQuantizer(4, 64, bridge_width=16, bridge_heads=2)
    torch.testing.assert_close(q.codebook, q.embed)  # zero-initialised output layer
    # Without transformer blocks a code's output depends only on the codes in its p x p patch.
    bridge = VQBridge(4, 64, patch_size=4, width=16, depth=0, heads=2, mlp_ratio=2)
    torch.nn.init.normal_(bridge.recover.weight)
    codebook = torch.randn(64, 4)
    moved = codebook.clone()
    moved[8 * 5 + 6] += 1.0  # pixel (5, 6) -> patch (1, 1) of the 8 x 8 codebook image
    changed = (bridge(moved) - bridge(codebook)).abs().sum(dim=1) > 0
    rows, cols = torch.arange(64) // 8, torch.arange(64) % 8
    assert torch.equal(changed, (rows // 4 == 1) & (cols // 4 == 1))


def test_fvq_every_code_moves_through_the_bridge():
    q = FVQuantizer(4, 64, bridge_width=16, bridge_heads=2)
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    before = q.codebook.detach().clone()
    for _ in range(2):
        out = q(torch.randn(1, 3, 4))  # at most 3 codes selected per step
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    moved = (q.codebook.detach() - before).abs().sum(dim=1) > 0
    assert bool(moved.all())


def test_lc_base_is_frozen_and_projected():
    base = torch.randn(50, 12)
    q = LCQuantizer(6, base)
    torch.testing.assert_close(q.codebook, base @ q.projector.weight.T + q.projector.bias)
    out = q(torch.randn(3, 7, 6))
    out.loss.backward()
    assert [name for name, p in q.named_parameters()] == ["projector.weight", "projector.bias"]
    assert q.projector.weight.grad.abs().sum() > 0
    assert torch.equal(q.base, base)


def test_lc_bad_base_features():
    with pytest.raises(ValueError, match="rank 2"):
        LCQuantizer(6, torch.randn(5, 4, 3))
    with pytest.raises(ValueError, match="does not match"):
        LCQuantizer(6, torch.randn(5, 4), codebook_size=6)
    with pytest.raises(ValueError, match="codebook_size and feature_dim"):
        LCQuantizer(6)
    with pytest.raises(ValueError, match="NaN or Inf"):
        LCQuantizer(6, torch.full((5, 4), float("inf")))


def regvq(**kw):
    return RegularizedQuantizer(6, 40, contrastive_weight=0.0, **kw)


def test_regvq_prior_kl_is_log_k_minus_entropy_of_the_histogram():
    q = regvq(mask_ratio=0.0, prior_weight=1.0, beta=0.0)
    q.eval()
    z = torch.randn(2, 30, 6)
    out = q(z)
    counts = torch.bincount(out.indices.reshape(-1), minlength=40).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    assert out.stats["prior_kl"] == pytest.approx(float(math.log(40) - entropy), rel=1e-5)


def test_regvq_stochastic_mask_only_in_training():
    q = regvq(mask_ratio=1.0, tau=100.0)  # every token sampled from a nearly uniform distribution
    z = torch.randn(4, 50, 6)
    argmin = torch.cdist(z.reshape(-1, 6), q.codebook).argmin(dim=1)
    sampled = q(z).indices.reshape(-1)
    assert (sampled != argmin).float().mean() > 0.5
    assert q.token_weights.shape == (4, 50)
    assert torch.equal(q.token_weights.reshape(-1) > 0, sampled != argmin)
    q.eval()
    assert torch.equal(q(z).indices.reshape(-1), argmin)


def test_regvq_gradient_reaches_latents_and_all_codes_through_the_softmax():
    q = regvq(mask_ratio=0.4)
    z = torch.randn(2, 6, 3, 3, requires_grad=True)
    out = q(z)
    (out.quantized.square().sum() + out.loss).backward()
    assert z.grad.abs().sum() > 0
    assert bool((q.embed.grad.abs().sum(dim=1) > 0).all())


def test_regvq_contrastive_loss_off_without_weights():
    with pytest.warns(UserWarning, match="contrastive loss is off"):
        q = RegularizedQuantizer(6, 40)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert q.contrastive_loss(images, images.clone()) == 0


def test_regvq_contrastive_loss_is_zero_without_stochastic_tokens(tmp_path):
    path = tmp_path / "vgg19.pth"
    torch.save(VGG19Features().state_dict(), path)
    q = RegularizedQuantizer(6, 40, perceptual_weights=str(path), mask_ratio=0.0)
    q(torch.randn(2, 6, 4, 4))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert q.contrastive_loss(images, images.clone()) == 0


def test_regvq_contrastive_loss_with_local_weights(tmp_path):
    path = tmp_path / "vgg19.pth"
    torch.save(VGG19Features().state_dict(), path)  # random weights stand in for a real VGG-19 file
    q = RegularizedQuantizer(
        6, 40, perceptual_weights=str(path), contrastive_locations=16, tau=10.0
    )
    q(torch.randn(2, 6, 4, 4))  # training forward: token weights on the 4 x 4 grid
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = (images + 0.1 * torch.randn_like(images)).requires_grad_()
    assert not any("vgg" in name for name in q.state_dict())  # the VGG weights stay in their file
    loss = q.contrastive_loss(images, recon)
    loss.backward()
    assert loss > 0 and torch.isfinite(loss)
    assert recon.grad.abs().sum() > 0
    q.token_weights.zero_()  # no token sampled away from its argmax code: nothing to contrast
    assert q.contrastive_loss(images, recon) == 0
    with pytest.raises(FileNotFoundError, match="perceptual_weights"):
        VGG19Features.from_file(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="not a VGG-19 state dict"):
        torch.save({"features.0.weight": torch.zeros(1)}, path)
        VGG19Features.from_file(str(path))


def test_lc_built_from_config_refuses_to_quantize_until_it_has_features():
    """No all-zero codebook: an empty base is an error; init_codebook sets the k-means centres of real features."""
    q = LCQuantizer(4, codebook_size=16, feature_dim=4)
    assert q.pending_init
    with pytest.raises(ValueError, match="base features are empty"):
        q(torch.randn(2, 5, 4))
    features = torch.randn(400, 4)
    q.init_codebook(features, generator=torch.Generator().manual_seed(0))
    assert not q.pending_init and torch.unique(q.base, dim=0).shape[0] == 16
    # each centre is the mean of the features nearest to it (a Lloyd fixed point, up to the last step)
    nearest = torch.cdist(features, q.base).argmin(1)
    used = nearest.unique()
    means = torch.stack([features[nearest == k].mean(0) for k in used])
    torch.testing.assert_close(q.base[used], means, atol=0.15, rtol=0)
    out = q(torch.randn(2, 5, 4, requires_grad=True))
    out.loss.backward()
    assert q.projector.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        q.init_codebook(torch.randn(10, 3))
