"""The ``maskgit`` format: MaskGIT's VQGAN in MaskBit's port (``ConvVQModel(config, legacy=True)``).

The reference below is written from the original's architecture, not from snce's modules: plain
``F.conv2d`` / ``F.group_norm`` on the original-named state dict, images in [0, 1], the residual shortcut
on conv2's output, 2x2 average pooling, nearest x2 + conv, a squared-l2 argmin over the codebook.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from snce.config import ConfigError
from snce.tokenizer import Tokenizer, TokenizerConfig
from snce.tokenizer.formats import (
    FORMATS,
    CheckpointKeyError,
    detect_formats,
    export_state,
    import_tokenizer,
)

# ---------------------------------------------------------------------------------------------------
# The original's layout: key -> shape, in its state_dict order (encoder, decoder, quantize)


def original_shapes(channels, channel_mult, blocks, *, dim, codebook_size, in_channels=3):
    """MaskBit's ConvVQModel(legacy=True) parameters: name -> shape, in state_dict order."""
    shapes = {}

    def res_block(prefix, cin, cout):
        shapes[f"{prefix}.norm1.weight"] = shapes[f"{prefix}.norm1.bias"] = (cin,)
        shapes[f"{prefix}.conv1.weight"] = (cout, cin, 3, 3)  # no bias
        shapes[f"{prefix}.norm2.weight"] = shapes[f"{prefix}.norm2.bias"] = (cout,)
        shapes[f"{prefix}.conv2.weight"] = (cout, cout, 3, 3)
        if cin != cout:
            shapes[f"{prefix}.nin_shortcut.weight"] = (cout, cout, 1, 1)  # out -> out: it reads h

    def stage(prefix, cin, cout):
        for j in range(blocks):
            res_block(f"{prefix}.res_blocks.{j}", cin if j == 0 else cout, cout)

    levels = len(channel_mult)
    enc_mult = (1, *channel_mult)  # encoder level l: channels x enc_mult[l] -> x enc_mult[l + 1]
    top = channels * channel_mult[-1]
    shapes["encoder.conv_in.weight"] = (channels, in_channels, 3, 3)
    for level in range(levels):
        stage(f"encoder.down.{level}", channels * enc_mult[level], channels * enc_mult[level + 1])
    stage("encoder.mid", top, top)
    shapes["encoder.norm_out.weight"] = shapes["encoder.norm_out.bias"] = (top,)
    shapes["encoder.conv_out.weight"], shapes["encoder.conv_out.bias"] = (dim, top, 1, 1), (dim,)

    dec_mult = (
        *channel_mult,
        channel_mult[-1],
    )  # decoder level l: x dec_mult[l + 1] -> x dec_mult[l]
    shapes["decoder.conv_in.weight"], shapes["decoder.conv_in.bias"] = (top, dim, 3, 3), (top,)
    stage("decoder.mid", top, top)
    for level in range(levels):  # legacy layout: up.{l} is resolution level l
        cout = channels * dec_mult[level]
        stage(f"decoder.up.{level}", channels * dec_mult[level + 1], cout)
        if level > 0:
            shapes[f"decoder.up.{level}.upsample_conv.weight"] = (cout, cout, 3, 3)
            shapes[f"decoder.up.{level}.upsample_conv.bias"] = (cout,)
    bottom = channels * channel_mult[0]
    shapes["decoder.norm_out.weight"] = shapes["decoder.norm_out.bias"] = (bottom,)
    shapes["decoder.conv_out.weight"] = (in_channels, bottom, 3, 3)
    shapes["decoder.conv_out.bias"] = (in_channels,)
    shapes["quantize.embedding.weight"] = (codebook_size, dim)
    return shapes


def random_state(shapes, generator=None):
    """Weights that keep activations at unit scale: conv ~ N(0, 1 / fan_in), GroupNorm scale in
    [0.5, 1.5] and shift ~ N(0, 0.1^2), biases ~ N(0, 0.1^2), codes ~ N(0, 0.5^2)."""
    state = {}
    for name, shape in shapes.items():
        if len(shape) == 4:
            t = torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
        elif name.startswith("quantize."):
            t = 0.5 * torch.randn(shape, generator=generator)
        elif ".norm" in name and name.endswith(".weight"):
            t = 0.5 + torch.rand(shape, generator=generator)
        else:
            t = 0.1 * torch.randn(shape, generator=generator)
        state[name] = t
    return state


# ---------------------------------------------------------------------------------------------------
# Reference forward, from the original's architecture


def _gn(sd, prefix, x):
    return F.group_norm(x, 32, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=1e-6)


def _res_block(sd, prefix, x):
    h = F.conv2d(F.silu(_gn(sd, f"{prefix}.norm1", x)), sd[f"{prefix}.conv1.weight"], padding=1)
    h = F.conv2d(F.silu(_gn(sd, f"{prefix}.norm2", h)), sd[f"{prefix}.conv2.weight"], padding=1)
    if h.shape[1] != x.shape[1]:  # MaskGIT's shortcut: a 1x1 conv of h itself; x is dropped
        return h + F.conv2d(h, sd[f"{prefix}.nin_shortcut.weight"])
    return h + x


def _stage(sd, prefix, h, blocks):
    for j in range(blocks):
        h = _res_block(sd, f"{prefix}.res_blocks.{j}", h)
    return h


def ref_encode(sd, x01, levels, blocks):
    """images in [0, 1] -> (latents (B, D, h, w), indices (B, h, w))."""
    h = F.conv2d(x01, sd["encoder.conv_in.weight"], padding=1)
    for level in range(levels):
        h = _stage(sd, f"encoder.down.{level}", h, blocks)
        if level < levels - 1:
            h = F.avg_pool2d(h, kernel_size=2, stride=2)
    h = _stage(sd, "encoder.mid", h, blocks)
    h = F.silu(_gn(sd, "encoder.norm_out", h))
    z = F.conv2d(h, sd["encoder.conv_out.weight"], sd["encoder.conv_out.bias"])
    b, d, hh, ww = z.shape
    zf = z.permute(0, 2, 3, 1).reshape(-1, d)
    e = sd["quantize.embedding.weight"]
    dist = (zf**2).sum(1, keepdim=True) + (e**2).sum(1) - 2 * zf @ e.T  # squared l2, (N, K)
    return z, dist.argmin(1).view(b, hh, ww)


def ref_decode(sd, indices, levels, blocks):
    """indices (B, h, w) -> images in about [0, 1] (MaskBit's decode_tokens)."""
    zq = sd["quantize.embedding.weight"][indices].permute(0, 3, 1, 2)
    h = F.conv2d(zq, sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"], padding=1)
    h = _stage(sd, "decoder.mid", h, blocks)
    for level in reversed(range(levels)):
        h = _stage(sd, f"decoder.up.{level}", h, blocks)
        if level > 0:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            w, bias = (sd[f"decoder.up.{level}.upsample_conv.{n}"] for n in ("weight", "bias"))
            h = F.conv2d(h, w, bias, padding=1)
    h = F.silu(_gn(sd, "decoder.norm_out", h))
    return F.conv2d(h, sd["decoder.conv_out.weight"], sd["decoder.conv_out.bias"], padding=1)


# ---------------------------------------------------------------------------------------------------

SMALL = [
    dict(channels=32, channel_mult=(1, 2), blocks=2, size=32),
    dict(channels=32, channel_mult=(2, 1, 2), blocks=1, size=16),  # channel_mult[0] != 1
]
DIM, CODES = 16, 64


def _small(arch):
    shapes = original_shapes(
        arch["channels"], arch["channel_mult"], arch["blocks"], dim=DIM, codebook_size=CODES
    )
    return random_state(shapes)


def _save(tmp_path, obj, name="maskgit_tokenizer.bin"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("arch", SMALL, ids=["c32-m12-b2", "c32-m212-b1"])
def test_matches_reference_forward(tmp_path, arch):
    sd = _small(arch)
    tok = import_tokenizer(_save(tmp_path, sd), "maskgit")
    cfg = tok.config
    assert (cfg.architecture, cfg.channels, cfg.channel_mult, cfg.num_res_blocks) == (
        "maskgit", arch["channels"], arch["channel_mult"], arch["blocks"]
    )  # fmt: skip
    assert (cfg.latent_channels, tok.codebook_size, tok.quantizer.metric) == (DIM, CODES, "l2")

    levels, blocks = len(arch["channel_mult"]), arch["blocks"]
    x = torch.rand(2, 3, arch["size"], arch["size"]) * 2 - 1  # snce's range
    x01 = (x + 1) / 2  # the original's range
    with torch.no_grad():
        z_ref, idx_ref = ref_encode(sd, x01, levels, blocks)
        y_ref = ref_decode(sd, idx_ref, levels, blocks)
        enc = tok.encode(x)
        out = tok.decode(enc.indices)
        rec = tok(x).reconstruction  # straight-through path: z + (zq - z), within an ulp of zq
    assert len(idx_ref.unique()) >= 8, "degenerate test: too few distinct codes"
    torch.testing.assert_close(enc.latents, z_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(enc.indices, idx_ref)
    assert out.shape == x.shape
    assert y_ref.std() > 0.1, "degenerate test: vanishing output"
    torch.testing.assert_close(out, 2 * y_ref - 1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rec, 2 * y_ref - 1, atol=1e-4, rtol=1e-4)


def test_round_trip_and_pretrained(tmp_path):
    sd = _small(SMALL[0])
    tok = import_tokenizer(_save(tmp_path, sd), "maskgit")
    exported = export_state(tok, "maskgit")
    assert set(exported) == set(sd)
    assert all(torch.equal(exported[k], sd[k]) for k in sd)

    x = torch.rand(1, 3, 32, 32) * 2 - 1
    loaded = Tokenizer.from_pretrained(tok.save_pretrained(tmp_path / "pretrained"))
    assert loaded.full_config() == tok.full_config()
    with torch.no_grad():
        a, b = tok.encode(x), loaded.encode(x)
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(tok.decode(a.indices), loaded.decode(b.indices))


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_checkpoints_and_detection(tmp_path, wrapper):
    sd = _small(SMALL[0])
    tok = import_tokenizer(_save(tmp_path, {wrapper: sd, "step": 3}), "maskgit")
    assert all(torch.equal(v, sd[k]) for k, v in export_state(tok, "maskgit").items())
    assert detect_formats(sd) == ["maskgit"]
    assert "maskgit" in FORMATS


def test_full_size_published_layout(tmp_path):
    """The published model: 128 wide, channel_mult (1, 1, 2, 2, 4), 2 blocks, 1024 x 256 codebook."""
    shapes = original_shapes(128, (1, 1, 2, 2, 4), 2, dim=256, codebook_size=1024)
    assert len(shapes) == 168
    assert sum(math.prod(s) for s in shapes.values()) == 54_515_587
    assert shapes["encoder.down.4.res_blocks.0.nin_shortcut.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.up.3.res_blocks.0.nin_shortcut.weight"] == (256, 256, 1, 1)
    assert sum(k.endswith(".bias") and len(shapes[k.replace("bias", "weight")]) == 4
               for k in shapes) == 7  # convs with a bias  # fmt: skip
    sd = random_state(shapes)
    tok = import_tokenizer(_save(tmp_path, sd), "maskgit")
    assert tok.config.channel_mult == (1, 1, 2, 2, 4) and tok.config.downsample == 16
    assert set(export_state(tok, "maskgit")) == set(shapes)
    with torch.no_grad():
        enc = tok.encode(torch.rand(1, 3, 256, 256) * 2 - 1)
        assert enc.indices.shape == (1, 16, 16) and enc.latents.shape == (1, 256, 16, 16)
        out = tok.decode(enc.indices)
    assert out.shape == (1, 3, 256, 256) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "edit, named",
    [
        ("extra", "encoder.down.0.res_blocks.0.extra.weight"),
        ("missing", "decoder.up.1.upsample_conv.bias"),
        ("missing", "encoder.down.1.res_blocks.0.nin_shortcut.weight"),
        ("missing", "encoder.conv_out.weight"),  # needed to read the architecture
        ("shape", "decoder.conv_out.bias"),
    ],
)
def test_wrong_keys_are_named(tmp_path, edit, named):
    sd = _small(SMALL[0])
    if edit == "extra":
        sd[named] = torch.zeros(3)
    elif edit == "missing":
        del sd[named]
    else:
        sd[named] = torch.zeros(4)
    with pytest.raises(CheckpointKeyError, match=named.replace(".", r"\.")):
        import_tokenizer(_save(tmp_path, sd), "maskgit")


def test_non_legacy_decoder_is_refused(tmp_path):
    """MaskBit's own tokenizers number the decoder levels the other way round (up.0 = coarsest)."""
    sd = _small(SMALL[0])
    sd["decoder.up.0.upsample_conv.weight"] = sd.pop("decoder.up.1.upsample_conv.weight")
    sd["decoder.up.0.upsample_conv.bias"] = sd.pop("decoder.up.1.upsample_conv.bias")
    with pytest.raises(CheckpointKeyError, match="legacy"):
        import_tokenizer(_save(tmp_path, sd), "maskgit")


def test_config_check():
    ok = TokenizerConfig(
        architecture="maskgit", channels=32, channel_mult=(1, 3), latent_channels=8
    )
    ok.check()  # 32 and 96 wide: multiples of 32
    bad = [
        ("channels", dict(channels=16, channel_mult=(2, 4))),  # conv_in is 16 wide
        ("channels", dict(channels=48, channel_mult=(1, 2))),
        ("architecture", dict(channels=32, mid_attention=True)),
        ("architecture", dict(channels=32, z_channels=8)),
    ]
    for field, options in bad:
        with pytest.raises(ConfigError, match=field):
            TokenizerConfig(architecture="maskgit", **options).check()
