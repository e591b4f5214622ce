"""The ``open-magvit2`` format: Open-MAGVIT2's LFQ tokenizer (TencentARC Open-MAGVIT2 / SEED-Voken).

The reference below is written from the original's architecture, not from snce's modules: plain
``F.conv2d`` / ``F.group_norm`` / ``F.linear`` on the original-named state dict, images in [-1, 1], the
shortcut on the block input, stride-2 conv downsampling, the adaptive group norm with the UNBIASED
variance of the codes, conv to 4C followed by the DCR depth-to-space written out index by index, and LFQ
as sign bits (channel 0 the least significant, 0 -> -1).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from snce.cli import main
from snce.config import ConfigError
from snce.tokenizer import Tokenizer, TokenizerConfig
from snce.tokenizer.formats import (
    FORMATS,
    CheckpointKeyError,
    detect_formats,
    export_state,
    import_tokenizer,
)
from snce.tokenizer.magvit2 import depth_to_space

# ---------------------------------------------------------------------------------------------------
# The original's layout: key -> shape, in its state_dict order (encoder, then decoder)


def original_shapes(channels, channel_mult, blocks, *, bits, in_channels=3):
    """Open-MAGVIT2's Encoder + Decoder parameters: name -> shape, in state_dict order."""
    shapes = {}

    def res_block(prefix, cin, cout):
        shapes[f"{prefix}.norm1.weight"] = shapes[f"{prefix}.norm1.bias"] = (cin,)
        shapes[f"{prefix}.norm2.weight"] = shapes[f"{prefix}.norm2.bias"] = (cout,)
        shapes[f"{prefix}.conv1.weight"] = (cout, cin, 3, 3)  # no bias
        shapes[f"{prefix}.conv2.weight"] = (cout, cout, 3, 3)
        if cin != cout:
            shapes[f"{prefix}.nin_shortcut.weight"] = (cout, cin, 1, 1)  # reads the block input

    levels = len(channel_mult)
    top = channels * channel_mult[-1]
    shapes["encoder.conv_in.weight"] = (channels, in_channels, 3, 3)
    enc_mult = (1, *channel_mult)
    for level in range(levels):
        cin, cout = channels * enc_mult[level], channels * enc_mult[level + 1]
        for j in range(blocks):
            res_block(f"encoder.down.{level}.block.{j}", cin if j == 0 else cout, cout)
        if level < levels - 1:
            shapes[f"encoder.down.{level}.downsample.weight"] = (cout, cout, 3, 3)
            shapes[f"encoder.down.{level}.downsample.bias"] = (cout,)
    for j in range(blocks):
        res_block(f"encoder.mid_block.{j}", top, top)
    shapes["encoder.norm_out.weight"] = shapes["encoder.norm_out.bias"] = (top,)
    shapes["encoder.conv_out.weight"], shapes["encoder.conv_out.bias"] = (bits, top, 1, 1), (bits,)

    shapes["decoder.conv_in.weight"], shapes["decoder.conv_in.bias"] = (top, bits, 3, 3), (top,)
    for j in range(blocks):
        res_block(f"decoder.mid_block.{j}", top, top)
    dec_in = [channels * m for m in (*channel_mult[1:], channel_mult[-1])]  # level l's input width
    for level in range(levels):  # up.{l} is resolution level l (up.0: full resolution)
        cout = channels * channel_mult[level]
        for j in range(blocks):
            res_block(f"decoder.up.{level}.block.{j}", dec_in[level] if j == 0 else cout, cout)
        if level > 0:
            shapes[f"decoder.up.{level}.upsample.conv1.weight"] = (4 * cout, cout, 3, 3)
            shapes[f"decoder.up.{level}.upsample.conv1.bias"] = (4 * cout,)
    for level in range(levels):
        for name in ("gamma", "beta"):
            shapes[f"decoder.adaptive.{level}.{name}.weight"] = (dec_in[level], bits)
            shapes[f"decoder.adaptive.{level}.{name}.bias"] = (dec_in[level],)
    bottom = channels * channel_mult[0]
    shapes["decoder.norm_out.weight"] = shapes["decoder.norm_out.bias"] = (bottom,)
    shapes["decoder.conv_out.weight"] = (in_channels, bottom, 3, 3)
    shapes["decoder.conv_out.bias"] = (in_channels,)
    return shapes


def random_state(shapes, generator=None):
    """Weights that keep activations at unit scale: conv ~ N(0, 1 / fan_in), GroupNorm scale in
    [0.5, 1.5], the adaptive norm's gamma about 1 (bias 1 + N(0, 0.1^2), weight N(0, 0.1^2 / D)), other
    linear weights N(0, 0.5^2 / D), biases and shifts ~ N(0, 0.1^2)."""
    state = {}
    for name, shape in shapes.items():
        if len(shape) == 4:
            t = torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
        elif len(shape) == 2:
            scale = 0.1 if ".gamma." in name else 0.5
            t = scale * torch.randn(shape, generator=generator) / math.sqrt(shape[1])
        elif ".norm" in name and name.endswith(".weight"):
            t = 0.5 + torch.rand(shape, generator=generator)
        else:
            t = 0.1 * torch.randn(shape, generator=generator)
            if ".gamma." in name:
                t = t + 1.0
        state[name] = t
    return state


# ---------------------------------------------------------------------------------------------------
# Reference forward, from the original's architecture


def _swish(x):
    return x * torch.sigmoid(x)


def _gn(sd, prefix, x):
    return F.group_norm(x, 32, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=1e-6)


def _res_block(sd, prefix, x):
    h = F.conv2d(_swish(_gn(sd, f"{prefix}.norm1", x)), sd[f"{prefix}.conv1.weight"], padding=1)
    h = F.conv2d(_swish(_gn(sd, f"{prefix}.norm2", h)), sd[f"{prefix}.conv2.weight"], padding=1)
    if f"{prefix}.nin_shortcut.weight" in sd:  # the standard shortcut, on the block input
        return h + F.conv2d(x, sd[f"{prefix}.nin_shortcut.weight"])
    return h + x


def _blocks(sd, prefix, h, blocks):
    for j in range(blocks):
        h = _res_block(sd, f"{prefix}.{j}", h)
    return h


def _adaptive_group_norm(sd, prefix, x, style):
    b, d = style.shape[:2]
    s = style.reshape(b, d, -1)
    n = s.shape[-1]
    mean = s.sum(-1) / n
    var = ((s - mean[..., None]) ** 2).sum(-1) / (n - 1)  # unbiased, as torch's default .var()
    scale = F.linear((var + 1e-6).sqrt(), sd[f"{prefix}.gamma.weight"], sd[f"{prefix}.gamma.bias"])
    bias = F.linear(mean, sd[f"{prefix}.beta.weight"], sd[f"{prefix}.beta.bias"])
    return scale[..., None, None] * F.group_norm(x, 32, eps=1e-6) + bias[..., None, None]


def _dcr_depth_to_space(x):
    """out[n, c, 2y + i, 2x + j] = in[n, i * 2C + j * C + c, y, x] (C = channels / 4)."""
    n, c4, h, w = x.shape
    c = c4 // 4
    out = x.new_empty(n, c, 2 * h, 2 * w)
    for i in range(2):
        for j in range(2):
            out[:, :, i::2, j::2] = x[:, i * 2 * c + j * c : i * 2 * c + j * c + c]
    return out


def ref_encode(sd, x, levels, blocks):
    """images in [-1, 1] -> (latents (B, D, h, w), indices (B, h, w), +-1 codes (B, D, h, w))."""
    h = F.conv2d(x, sd["encoder.conv_in.weight"], padding=1)
    for level in range(levels):
        h = _blocks(sd, f"encoder.down.{level}.block", h, blocks)
        if level < levels - 1:
            w, b = (sd[f"encoder.down.{level}.downsample.{n}"] for n in ("weight", "bias"))
            h = F.conv2d(h, w, b, stride=2, padding=1)
    h = _blocks(sd, "encoder.mid_block", h, blocks)
    h = _swish(_gn(sd, "encoder.norm_out", h))
    z = F.conv2d(h, sd["encoder.conv_out.weight"], sd["encoder.conv_out.bias"])
    codes = torch.where(z > 0, 1.0, -1.0)
    powers = 2 ** torch.arange(z.shape[1])  # channel d is bit d
    indices = ((codes > 0).long() * powers[:, None, None]).sum(1)
    return z, indices, codes


def ref_codes(indices, bits):
    """The original's get_codebook_entry: bits of the index, times 2, minus 1; (B, h, w) -> (B, D, h, w)."""
    powers = 2 ** torch.arange(bits)
    return ((indices[..., None] & powers) != 0).float().mul(2).sub(1).permute(0, 3, 1, 2)


def ref_decode(sd, codes, levels, blocks):
    """+-1 codes (B, D, h, w) -> images in about [-1, 1]."""
    style = codes
    h = F.conv2d(codes, sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"], padding=1)
    h = _blocks(sd, "decoder.mid_block", h, blocks)
    for level in reversed(range(levels)):
        h = _adaptive_group_norm(sd, f"decoder.adaptive.{level}", h, style)
        h = _blocks(sd, f"decoder.up.{level}.block", h, blocks)
        if level > 0:
            w, b = (sd[f"decoder.up.{level}.upsample.conv1.{n}"] for n in ("weight", "bias"))
            h = _dcr_depth_to_space(F.conv2d(h, w, b, padding=1))
    h = _swish(_gn(sd, "decoder.norm_out", h))
    return F.conv2d(h, sd["decoder.conv_out.weight"], sd["decoder.conv_out.bias"], padding=1)


# ---------------------------------------------------------------------------------------------------

SMALL = [
    dict(channels=32, channel_mult=(1, 2), blocks=2, size=32),
    dict(channels=32, channel_mult=(2, 1, 2), blocks=1, size=16),  # channel_mult[0] != 1
]
BITS = 6


def _small(arch, seed=0):
    shapes = original_shapes(arch["channels"], arch["channel_mult"], arch["blocks"], bits=BITS)
    return random_state(shapes, torch.Generator().manual_seed(seed))


def _lightning(sd, ema=None, seed=1):
    """A Lightning checkpoint as Open-MAGVIT2 writes it: weights, LitEma copies, the loss's modules."""
    ema = ema if ema is not None else random_state({k: tuple(v.shape) for k, v in sd.items()})
    state = dict(sd)
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(8, 3, 3, 3)
    state["model_ema.decay"] = torch.tensor(0.999)
    state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int)
    state["model_ema.lossdiscriminatormain0weight"] = torch.randn(8, 3, 4, 4)
    state.update({"model_ema." + k.replace(".", ""): v for k, v in ema.items()})
    return {"state_dict": state, "epoch": 3, "global_step": 1000}


def _save(tmp_path, obj, name="imagenet_256_L.ckpt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("arch", SMALL, ids=["c32-m12-b2", "c32-m212-b1"])
def test_matches_reference_forward(tmp_path, arch):
    sd = _small(arch)
    tok = import_tokenizer(_save(tmp_path, _lightning(sd)), "open-magvit2")
    cfg = tok.config
    assert (cfg.architecture, cfg.channels, cfg.channel_mult, cfg.num_res_blocks) == (
        "open-magvit2", arch["channels"], arch["channel_mult"], arch["blocks"]
    )  # fmt: skip
    assert (cfg.latent_channels, tok.codebook_size, tok.quantizer.metric) == (BITS, 2**BITS, "dot")
    assert tok.quantizer.kind == "lfq" and not tok.training

    levels, blocks = len(arch["channel_mult"]), arch["blocks"]
    x = torch.rand(2, 3, arch["size"], arch["size"]) * 2 - 1  # the original's range too
    with torch.no_grad():
        z_ref, idx_ref, codes_ref = ref_encode(sd, x, levels, blocks)
        y_ref = ref_decode(sd, ref_codes(idx_ref, BITS), levels, blocks)
        enc = tok.encode(x)
        out = tok.decode(enc.indices)
        rec = tok(x).reconstruction  # straight-through path: z + (c - z)
    assert len(idx_ref.unique()) >= 8, "degenerate test: too few distinct codes"
    assert torch.equal(ref_codes(idx_ref, BITS), codes_ref)
    torch.testing.assert_close(enc.latents, z_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(enc.indices, idx_ref)
    assert out.shape == x.shape
    assert y_ref.std() > 0.1, "degenerate test: vanishing output"
    torch.testing.assert_close(out, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rec, y_ref, atol=1e-5, rtol=1e-5)
    # The codebook and metric alone give the original's assignment (what SNCE targets rely on).
    z_flat = enc.latents.permute(0, 2, 3, 1).reshape(-1, BITS)
    scores = z_flat @ tok.quantizer.codebook.T  # "dot"
    assert torch.equal(scores.argmax(dim=1), idx_ref.reshape(-1))


def test_ema_weights(tmp_path):
    sd = _small(SMALL[0])
    ema = _small(SMALL[0], seed=5)
    path = _save(tmp_path, _lightning(sd, ema))
    plain = import_tokenizer(path, "open-magvit2")
    averaged = import_tokenizer(path, "open-magvit2", ema=True)
    assert all(torch.equal(v, sd[k]) for k, v in export_state(plain, "open-magvit2").items())
    exported = export_state(averaged, "open-magvit2")
    assert set(exported) == set(ema) and all(torch.equal(exported[k], ema[k]) for k in ema)

    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        _, idx_ref, _ = ref_encode(ema, x, 2, 2)
        assert torch.equal(averaged.encode(x).indices, idx_ref)

    obj = _lightning(sd, ema)
    del obj["state_dict"]["model_ema.decoderadaptive1gammaweight"]
    with pytest.raises(
        CheckpointKeyError, match=r"no EMA copy .*decoder\.adaptive\.1\.gamma\.weight"
    ):
        import_tokenizer(_save(tmp_path, obj, "no_ema.ckpt"), "open-magvit2", ema=True)


def test_round_trip_and_pretrained(tmp_path):
    sd = _small(SMALL[0])
    tok = import_tokenizer(_save(tmp_path, _lightning(sd)), "open-magvit2")
    exported = export_state(tok, "open-magvit2")
    assert list(exported) == list(sd)  # the original's names and order; no quantizer keys
    assert all(torch.equal(exported[k], sd[k]) for k in sd)

    # the exported state dict is itself an importable (flat) checkpoint of the same tokenizer
    again = import_tokenizer(
        _save(tmp_path, {"state_dict": exported}, "again.ckpt"), "open-magvit2"
    )
    loaded = Tokenizer.from_pretrained(tok.save_pretrained(tmp_path / "pretrained"))
    assert loaded.full_config() == tok.full_config() == again.full_config()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = tok.encode(x), loaded.encode(x)
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(tok.decode(a.indices), loaded.decode(b.indices))


def test_cli_import_with_ema(tmp_path, capsys):
    sd, ema = _small(SMALL[0]), _small(SMALL[0], seed=7)
    path = _save(tmp_path, _lightning(sd, ema))
    out = tmp_path / "open-magvit2"
    args = [
        "tokenizer",
        "import",
        "--format",
        "open-magvit2",
        "--ema",
        str(path),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert "64 codes of dim 6 (dot)" in capsys.readouterr().out
    loaded = Tokenizer.from_pretrained(out)
    assert loaded.config.architecture == "open-magvit2"
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        _, idx_ref, codes_ref = ref_encode(ema, x, 2, 2)
        assert torch.equal(loaded.encode(x).indices, idx_ref)
        torch.testing.assert_close(
            loaded.decode(idx_ref), ref_decode(ema, codes_ref, 2, 2), atol=1e-5, rtol=1e-5
        )


def test_detection(tmp_path):
    sd = _small(SMALL[0])
    obj = _lightning(sd)
    assert detect_formats(sd) == ["open-magvit2"]
    assert detect_formats(obj["state_dict"]) == ["open-magvit2"]
    assert "open-magvit2" in FORMATS
    with pytest.raises(CheckpointKeyError, match="look like format 'open-magvit2'"):
        import_tokenizer(_save(tmp_path, obj), "taming")


def test_full_size_published_layout():
    """The 256 model: 128 wide, channel_mult (1, 1, 2, 2, 4), 4 blocks, 18 bits: 339 keys."""
    shapes = original_shapes(128, (1, 1, 2, 2, 4), 4, bits=18)
    assert len(shapes) == 339
    assert sum(k.startswith("encoder.") for k in shapes) == 159
    assert sum(math.prod(s) for s in shapes.values()) == 115_127_829
    assert shapes["decoder.up.4.upsample.conv1.weight"] == (2048, 512, 3, 3)
    assert shapes["decoder.adaptive.2.gamma.weight"] == (256, 18)
    with torch.device("meta"):
        state = {k: torch.empty(s) for k, s in shapes.items()}
        cfg = FORMATS["open-magvit2"].config(state)
        snce = Tokenizer(cfg).state_dict()
    assert (cfg.channels, cfg.channel_mult, cfg.num_res_blocks, cfg.latent_channels) == (
        128, (1, 1, 2, 2, 4), 4, 18
    )  # fmt: skip
    assert cfg.downsample == 16
    assert {k: tuple(v.shape) for k, v in snce.items()} == shapes


@pytest.mark.slow
def test_full_size_imports_and_runs(tmp_path):
    """Real random weights at full size (460 MB) and one 256 x 256 image (about 20 s on 2 CPU cores)."""
    shapes = original_shapes(128, (1, 1, 2, 2, 4), 4, bits=18)
    tok = import_tokenizer(_save(tmp_path, {"state_dict": random_state(shapes)}), "open-magvit2")
    assert tok.codebook_size == 2**18
    with torch.no_grad():
        enc = tok.encode(torch.rand(1, 3, 256, 256) * 2 - 1)
        assert enc.indices.shape == (1, 16, 16) and enc.latents.shape == (1, 18, 16, 16)
        out = tok.decode(enc.indices)
    assert out.shape == (1, 3, 256, 256) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "edit, named",
    [
        ("extra", "encoder.down.0.block.0.extra.weight"),
        ("extra", "quantize.codebook"),
        ("missing", "decoder.up.1.upsample.conv1.bias"),
        ("missing", "decoder.adaptive.0.beta.weight"),
        ("missing", "encoder.down.0.downsample.weight"),
        ("missing", "encoder.down.1.block.0.nin_shortcut.weight"),
        ("missing", "encoder.conv_out.weight"),  # needed to read the architecture
        ("shape", "decoder.adaptive.1.gamma.weight"),
    ],
)
def test_wrong_keys_are_named(tmp_path, edit, named):
    sd = _small(SMALL[0])
    if edit == "extra":
        sd[named] = torch.zeros(3)
    elif edit == "missing":
        del sd[named]
    else:
        sd[named] = torch.zeros(4, 6)
    with pytest.raises(CheckpointKeyError, match=re.escape(named)):
        import_tokenizer(_save(tmp_path, {"state_dict": sd}), "open-magvit2")


def test_depth_to_space_is_dcr_not_pixel_shuffle():
    x = torch.randn(2, 12, 3, 4)
    out = depth_to_space(x)
    assert torch.equal(out, _dcr_depth_to_space(x))
    c = 3
    for i in range(2):
        for j in range(2):
            assert torch.equal(
                out[:, :, 2 * 1 + i, 2 * 2 + j], x[:, i * 2 * c + j * c :][:, :c, 1, 2]
            )
    assert not torch.equal(out, F.pixel_shuffle(x, 2))
    perm = [i * 2 * c + j * c + k for k in range(c) for i in range(2) for j in range(2)]
    assert torch.equal(out, F.pixel_shuffle(x[:, perm], 2))


def test_decoder_needs_two_code_positions():
    """The adaptive norm's unbiased variance over a single position is undefined (0 / 0)."""
    cfg = TokenizerConfig(
        architecture="open-magvit2", channels=32, channel_mult=(1, 2), latent_channels=4,
        quantizer={"kind": "lfq"},
    )  # fmt: skip
    tok = Tokenizer(cfg).eval()
    with pytest.raises(ValueError, match="at least 2 positions"):
        tok.decode(torch.zeros(1, 1, 1, dtype=torch.long))
    assert torch.isfinite(tok.decode(torch.tensor([[[3, 5]]]))).all()


def test_config_check():
    ok = TokenizerConfig(
        architecture="open-magvit2", channels=32, channel_mult=(1, 3), latent_channels=8,
        quantizer={"kind": "lfq"},
    )  # fmt: skip
    ok.check()
    bad = [
        ("channels", dict(channels=16, channel_mult=(2, 4))),
        ("architecture", dict(channels=32, mid_attention=True)),
        ("architecture", dict(channels=32, z_channels=8)),
        ("quantizer", dict(channels=32, latent_channels=30)),  # 2^30 codes: too many bits
    ]
    for field, options in bad:
        cfg = TokenizerConfig(architecture="open-magvit2", quantizer={"kind": "lfq"}, **options)
        with pytest.raises(ConfigError, match=field):
            cfg.check()
