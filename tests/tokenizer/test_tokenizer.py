"""Tokenizer: overfitting, encode/decode contract, save/load, GAN and perceptual terms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from snce.config import ConfigError, load_config
from snce.data import Digits
from snce.tokenizer import (
    LossConfig,
    PatchDiscriminator,
    Tokenizer,
    TokenizerConfig,
    TokenizerObjective,
    TokenizerRunConfig,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    psnr,
    ssim,
)
from snce.tokenizer.pipeline import tokenizer_loss
from snce.train import TrainConfig, Trainer


def tiny_tokenizer(k: int = 64, mult=(1, 2), quantizer=None) -> Tokenizer:
    q = quantizer or {"kind": "vq", "codebook_size": k}
    cfg = TokenizerConfig(
        in_channels=1, channels=16, channel_mult=mult, latent_channels=8, quantizer=q
    )
    return Tokenizer(cfg)


def test_overfits_a_handful_of_digits(tmp_path):
    x = Digits(16, split="all").images[:8]
    tok = tiny_tokenizer()
    cfg = TrainConfig(
        out_dir=str(tmp_path), steps=60, batch_size=8, lr=3e-3, warmup_steps=10, device="cpu",
        progress=False, tensorboard=False, ckpt_every=1000,
    )  # fmt: skip
    objective = TokenizerObjective(tok, LossConfig(reconstruction="l2"))
    Trainer(
        objective, tokenizer_loss, TensorDataset(x, torch.zeros(8, dtype=torch.long)), cfg
    ).fit()
    tok.eval()
    with torch.no_grad():
        rec = tok.decode(tok.encode(x).indices)
    # Predicting the mean image scores ~10 dB here; 60 steps must reach 25 dB.
    assert float(psnr(x, rec).mean()) > 25.0


def test_psnr_closed_form():
    x = torch.zeros(2, 1, 4, 4)
    y = x + 0.2  # error 0.1 on the [0, 1] scale -> 20 dB
    torch.testing.assert_close(psnr(x, y), torch.full((2,), 20.0))


@pytest.mark.parametrize("mult", [(1, 2), (1, 2, 2), (1, 1, 2, 2)])
def test_shapes_and_decode_of_encode(mult):
    tok = tiny_tokenizer(mult=mult).eval()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    f = 2 ** (len(mult) - 1)
    with torch.no_grad():
        out = tok(x)
        enc = tok.encode(x)
        assert out.reconstruction.shape == x.shape and enc.indices.shape == (3, 16 // f, 16 // f)
        assert enc.latents.shape == (3, 8, 16 // f, 16 // f) and torch.equal(
            enc.latents, out.latents
        )
        # Indices are the nearest codes of the latents (a brute-force search, not the quantizer's own).
        z = enc.latents.permute(0, 2, 3, 1).reshape(-1, 8)
        brute = torch.cdist(z, tok.quantizer.codebook).argmin(1)
        assert torch.equal(enc.indices.reshape(-1), brute)
        # decode(indices) is the decoder applied to the looked-up codes; (B, L) raster order works too.
        expect = tok.decoder(tok.quantizer.codebook[enc.indices].permute(0, 3, 1, 2))
        torch.testing.assert_close(tok.decode(enc.indices), expect, rtol=0, atol=0)
        torch.testing.assert_close(tok.decode(enc.indices.flatten(1)), expect, rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiples of the downsampling"):
        tok.encode(torch.zeros(1, 1, 15, 16))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        tok.encode(torch.zeros(1, 3, 16, 16))


def test_save_and_load_pretrained(tmp_path):
    tok = tiny_tokenizer(quantizer={"kind": "vq", "codebook_size": 32, "metric": "cosine"}).eval()
    tok.save_pretrained(tmp_path)
    back = Tokenizer.from_pretrained(tmp_path)
    assert back.codebook_hash() == tok.codebook_hash() and back.quantizer.metric == "cosine"
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(back.decode(back.encode(x).indices), tok.decode(tok.encode(x).indices))
    other = tiny_tokenizer(32)
    assert other.codebook_hash() != tok.codebook_hash()
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        Tokenizer.from_pretrained(tmp_path / "missing")


def test_adaptive_weight_closed_form():
    w = torch.randn(4, 3, requires_grad=True)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    lam = adaptive_weight((a * w).sum(), (b * w).sum(), w)  # gradients are a and b
    torch.testing.assert_close(lam, a.norm() / (b.norm() + 1e-4))


def test_hinge_losses_closed_form():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2.5] -> mean 7/6
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 7 / 6)))
    torch.testing.assert_close(hinge_g_loss(fake), torch.tensor(0.5 / 3))  # -mean(fake)


def test_gan_terms_move_only_their_own_network():
    tok = tiny_tokenizer()
    objective = TokenizerObjective(tok, LossConfig(disc_weight=0.5, disc_start=2, disc_layers=1))
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    loss, logs = objective(x, step=1)  # before disc_start: no GAN terms
    assert "d_loss" not in logs
    loss, logs = objective(x, step=2)
    loss.backward()
    disc = objective.discriminator
    got = [p.grad.clone() for p in disc.parameters()]
    # Reference: the discriminator's gradient is that of the hinge loss alone on detached reconstructions.
    disc.zero_grad()
    with torch.no_grad():
        rec = tok(x).reconstruction
    hinge_d_loss(disc(x), disc(rec)).backward()
    for g, p in zip(got, disc.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    assert logs["adaptive_weight"] > 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="too small"):
        PatchDiscriminator(1, 8, layers=3)(x)


def test_perceptual_term_needs_a_local_file(tmp_path):
    from safetensors.torch import save_file

    from snce.quantize.regvq import VGG19Features

    with pytest.raises(ConfigError, match="'loss.perceptual_weights': a local VGG-19 weight file"):
        load_config(TokenizerRunConfig, None, ["loss.perceptual_weight=1.0"])
    with pytest.raises(ConfigError, match="'loss.perceptual_weights': expected an existing file"):
        load_config(
            TokenizerRunConfig, None, ["loss.perceptual_weight=1", "loss.perceptual_weights=/no.pt"]
        )
    path = tmp_path / "vgg.safetensors"
    save_file(VGG19Features().state_dict(), str(path))
    objective = TokenizerObjective(
        tiny_tokenizer(), LossConfig(perceptual_weight=1.0, perceptual_weights=str(path))
    )
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert float(objective.perceptual(x, x)) == 0.0
    assert float(objective.perceptual(x, -x)) > 0.0
    # The frozen VGG stays out of the trainable parameters and of the checkpoint.
    assert not any("vgg" in k or "features" in k for k in objective.state_dict())
    _, logs = objective(x, step=0)
    assert logs["perceptual"] > 0


def test_run_config_cross_checks():
    with pytest.raises(ConfigError, match="'model.in_channels': must equal the data's channels"):
        load_config(TokenizerRunConfig, None, ["data.name=digits", "model.in_channels=3"])
    with pytest.raises(ConfigError, match="'data.size': must be a multiple"):
        load_config(TokenizerRunConfig, None, ["data.name=shapes", "data.size=18"])
    with pytest.raises(ConfigError, match="'model.quantizer.dim': must equal latent_channels"):
        load_config(TokenizerRunConfig, None, ["data.name=shapes", "model.quantizer.dim=3"])


class _PixelFeatures(torch.nn.Module):
    """A fixed feature network: the first 6 pixels as features (and as logits)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        f = x.flatten(1)[:, 40:46]
        return f, f


def test_evaluate_tokenizer_against_closed_forms():
    from scipy import linalg

    from snce.tokenizer import evaluate_tokenizer

    tok = tiny_tokenizer(k=16).eval()
    data = TensorDataset(Digits(16, split="all").images[:40], torch.zeros(40, dtype=torch.long))
    m = evaluate_tokenizer(
        tok, data, batch_size=16, device="cpu", progress=False, feature_net=_PixelFeatures()
    )
    x = data.tensors[0]
    with torch.no_grad():
        idx = tok.encode(x).indices
        rec = tok.decode(idx)
    mse = (((x - rec) / 2) ** 2).flatten(1).mean(1).double()
    assert m["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-5)
    assert m["usage"] == pytest.approx(idx.unique().numel() / 16) and m["num_images"] == 40
    counts = torch.bincount(idx.flatten(), minlength=16).double()
    p = counts[counts > 0] / counts.sum()
    assert m["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)
    # Frechet distance between Gaussians fitted to the features: |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)
    a, b = (
        x.flatten(1)[:, 40:46].double().numpy(),
        rec.clamp(-1, 1).flatten(1)[:, 40:46].double().numpy(),
    )
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert m["rfid"] == pytest.approx(ref, rel=1e-3, abs=1e-6)
    assert -1 <= m["ssim"] <= 1
    torch.testing.assert_close(ssim(x[:4], x[:4]), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize(
    "quantizer",
    [
        {"kind": "vq", "codebook_size": 32, "ema_decay": 0.9},
        {"kind": "ibq", "codebook_size": 32},
        {"kind": "fvq", "codebook_size": 64},
        {"kind": "lc", "codebook_size": 32, "feature_dim": 4},
        {"kind": "regvq", "codebook_size": 32, "contrastive_weight": 0.0},
    ],
    ids=lambda q: q["kind"],
)
def test_every_quantizer_trains_and_round_trips(quantizer, tmp_path):
    tok = tiny_tokenizer(quantizer=quantizer)
    if quantizer["kind"] == "lc":  # its frozen base: k-means centres of (here: random) 4-d features
        tok.quantizer.init_codebook(torch.randn(200, 4), generator=torch.Generator().manual_seed(0))
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    loss, logs = TokenizerObjective(tok, LossConfig())(x, step=0)
    loss.backward()
    assert torch.isfinite(loss) and tok.encoder.layers[0].weight.grad.abs().sum() > 0
    tok.eval().save_pretrained(tmp_path)
    back = Tokenizer.from_pretrained(tmp_path)
    assert back.codebook_hash() == tok.codebook_hash()
    with torch.no_grad():
        enc = tok.encode(x)
        assert enc.indices.max() < tok.codebook_size
        assert torch.equal(back.decode(back.encode(x).indices), tok.decode(enc.indices))
