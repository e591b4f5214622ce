"""Imported taming-family tokenizers (taming, LlamaGen, IBQ, VQGAN-LC) against an independent reference.

The reference below is written from the original repositories' code, not from snce: plain functions over a
state dict in the ORIGINAL key names (F.conv2d, F.group_norm, bmm attention, F.interpolate), one for
taming's Encoder/Decoder (``taming/modules/diffusionmodules/model.py``, also used by IBQ and VQGAN-LC),
one for LlamaGen's (``tokenizer/tokenizer_image/vq_model.py``: ``conv_blocks``, ``mid.{0,1,2}``, the
decoder's blocks stored lowest resolution first), and each format's quantizer in eval mode:

    format     assignment                                 code vector to the decoder
    taming     argmin ||z - e||^2 (expanded formula)      z + (e - z)
    llamagen   same on l2-normalised z and e (cosine)      z^ + (e^ - z^)
    ibq        max softmax(z.e) over codes (dot product)  (hard - soft + soft) @ E  (the raw code)
    vqgan-lc   argmin ||z - P(B)||^2, P = Linear(768, D)   z + (P(B)_k - z)

Factories build small random state dicts with the originals' exact key names and nesting (plus the
extras real files carry: taming/IBQ ``loss.*``, IBQ ``model_ema.*``, LlamaGen ``quantize.codebook_used``,
VQGAN-LC ``discriminator.*``); the tests import them with ``snce.tokenizer.formats`` and require the
original's indices exactly and its decode (run in float64) within 1e-5. Shapes of the full-size layouts
(key counts) are checked on the meta device; importing and running them on a 256 x 256 image is slow.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from snce.cli import main
from snce.tokenizer import Tokenizer
from snce.tokenizer.formats import (
    CheckpointKeyError,
    detect_formats,
    export_state,
    import_tokenizer,
)

FORMATS = ("taming", "llamagen", "ibq", "vqgan-lc")
METRIC = {"taming": "l2", "llamagen": "cosine", "ibq": "dot", "vqgan-lc": "l2"}
DECODE_ATOL = 1e-5


# ----------------------------------------------------------------------------------------------------------
# Architectures and random original-named state dicts


@dataclass(frozen=True)
class Arch:
    """One tokenizer's hyper-parameters, as the originals' configs name them."""

    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    # taming's ddconfig resolution: its levels get attention where curr_res is in attn_resolutions
    resolution: int = 32
    attn_resolutions: tuple[int, ...] = (8,)
    z_channels: int = 32
    embed_dim: int = 8  # code dimension
    n_embed: int = 64  # codebook size
    feature_dim: int = 768  # VQGAN-LC: width of the frozen base codebook
    in_channels: int = 3


SMALL = {
    "taming": Arch(num_res_blocks=1),
    "llamagen": Arch(num_res_blocks=2),
    "ibq": Arch(num_res_blocks=2),
    "vqgan-lc": Arch(num_res_blocks=1),
}
F16 = Arch(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, resolution=256, attn_resolutions=(16,),
           z_channels=256)  # fmt: skip
FULL = {
    "llamagen": replace(F16, embed_dim=8, n_embed=16384),  # VQ-16
    "taming": replace(F16, embed_dim=256, n_embed=16384),  # ImageNet f16-16384
    "ibq": replace(F16, num_res_blocks=4, embed_dim=256, n_embed=1024),  # the 1024 tokenizer
    "vqgan-lc": replace(F16, embed_dim=8, n_embed=100_000),  # f16, 100k x 768 base
}
FULL_KEYS = {
    "llamagen": 344,
    "taming": 343,
    "ibq": 543,
    "vqgan-lc": 345,
}  # the spec's enumerated counts


class Weights:
    """Random weights at the originals' shapes, written into ``self.sd`` under the given names.

    Convolutions N(0, gain^2 / fan_in), biases N(0, 0.05^2), GroupNorm weights 1 + N(0, 0.2^2) and biases
    N(0, 0.1^2): activations stay O(1) through every level. On the meta device only shapes are made.
    """

    def __init__(self, seed: int, device: str = "cpu"):
        self.g = torch.Generator().manual_seed(seed)
        self.device = device
        self.sd: dict[str, torch.Tensor] = {}

    def randn(self, *shape: int, std: float = 1.0) -> torch.Tensor:
        if self.device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=self.g) * std

    def conv(self, p: str, cin: int, cout: int, k: int, gain: float = 1.0) -> None:
        self.sd[f"{p}.weight"] = self.randn(cout, cin, k, k, std=gain / math.sqrt(cin * k * k))
        self.sd[f"{p}.bias"] = self.randn(cout, std=0.05)

    def norm(self, p: str, c: int) -> None:
        self.sd[f"{p}.weight"] = 1.0 + self.randn(c, std=0.2)
        self.sd[f"{p}.bias"] = self.randn(c, std=0.1)

    def resblock(self, p: str, cin: int, cout: int) -> None:
        self.norm(f"{p}.norm1", cin)
        self.conv(f"{p}.conv1", cin, cout, 3)
        self.norm(f"{p}.norm2", cout)
        self.conv(f"{p}.conv2", cout, cout, 3, gain=0.5)
        if cin != cout:
            self.conv(f"{p}.nin_shortcut", cin, cout, 1)

    def attn(self, p: str, c: int) -> None:
        self.norm(f"{p}.norm", c)
        for name in ("q", "k", "v"):
            self.conv(f"{p}.{name}", c, c, 1)
        self.conv(f"{p}.proj_out", c, c, 1, gain=0.5)


def taming_generator(w: Weights, a: Arch) -> None:
    """taming's Encoder, Decoder, quant_conv and post_quant_conv (as their constructors register them)."""
    L, in_mult, cur = len(a.ch_mult), (1, *a.ch_mult), a.resolution
    w.conv("encoder.conv_in", a.in_channels, a.ch, 3)
    for i in range(L):
        bi, bo = a.ch * in_mult[i], a.ch * a.ch_mult[i]
        for j in range(a.num_res_blocks):
            w.resblock(f"encoder.down.{i}.block.{j}", bi, bo)
            bi = bo
            if cur in a.attn_resolutions:
                w.attn(f"encoder.down.{i}.attn.{j}", bi)
        if i != L - 1:
            w.conv(f"encoder.down.{i}.downsample.conv", bi, bi, 3)
            cur //= 2
    w.resblock("encoder.mid.block_1", bi, bi)
    w.attn("encoder.mid.attn_1", bi)
    w.resblock("encoder.mid.block_2", bi, bi)
    w.norm("encoder.norm_out", bi)
    w.conv("encoder.conv_out", bi, a.z_channels, 3)

    bi, cur = a.ch * a.ch_mult[-1], a.resolution // 2 ** (L - 1)
    w.conv("decoder.conv_in", a.z_channels, bi, 3)
    w.resblock("decoder.mid.block_1", bi, bi)
    w.attn("decoder.mid.attn_1", bi)
    w.resblock("decoder.mid.block_2", bi, bi)
    for i in reversed(range(L)):
        bo = a.ch * a.ch_mult[i]
        for j in range(a.num_res_blocks + 1):
            w.resblock(f"decoder.up.{i}.block.{j}", bi, bo)
            bi = bo
            if cur in a.attn_resolutions:
                w.attn(f"decoder.up.{i}.attn.{j}", bi)
        if i != 0:
            w.conv(f"decoder.up.{i}.upsample.conv", bi, bi, 3)
            cur *= 2
    w.norm("decoder.norm_out", bi)
    w.conv("decoder.conv_out", bi, a.in_channels, 3)
    w.conv("quant_conv", a.z_channels, a.embed_dim, 1)
    w.conv("post_quant_conv", a.embed_dim, a.z_channels, 1)


def llamagen_generator(w: Weights, a: Arch) -> None:
    """LlamaGen's Encoder and Decoder under its own names: attention after every block of the last
    encoder level and of the first decoder block list (``decoder.conv_blocks.0``, the lowest resolution)."""
    L, in_mult = len(a.ch_mult), (1, *a.ch_mult)
    w.conv("encoder.conv_in", a.in_channels, a.ch, 3)
    for i in range(L):
        bi, bo = a.ch * in_mult[i], a.ch * a.ch_mult[i]
        for j in range(a.num_res_blocks):
            w.resblock(f"encoder.conv_blocks.{i}.res.{j}", bi, bo)
            bi = bo
            if i == L - 1:
                w.attn(f"encoder.conv_blocks.{i}.attn.{j}", bi)
        if i != L - 1:
            w.conv(f"encoder.conv_blocks.{i}.downsample.conv", bi, bi, 3)
    w.resblock("encoder.mid.0", bi, bi)
    w.attn("encoder.mid.1", bi)
    w.resblock("encoder.mid.2", bi, bi)
    w.norm("encoder.norm_out", bi)
    w.conv("encoder.conv_out", bi, a.z_channels, 3)

    bi = a.ch * a.ch_mult[-1]
    w.conv("decoder.conv_in", a.z_channels, bi, 3)
    w.resblock("decoder.mid.0", bi, bi)
    w.attn("decoder.mid.1", bi)
    w.resblock("decoder.mid.2", bi, bi)
    for k, i_level in enumerate(reversed(range(L))):  # conv_blocks appended lowest resolution first
        bo = a.ch * a.ch_mult[i_level]
        for j in range(a.num_res_blocks + 1):
            w.resblock(f"decoder.conv_blocks.{k}.res.{j}", bi, bo)
            bi = bo
            if i_level == L - 1:
                w.attn(f"decoder.conv_blocks.{k}.attn.{j}", bi)
        if i_level != 0:
            w.conv(f"decoder.conv_blocks.{k}.upsample.conv", bi, bi, 3)
    w.norm("decoder.norm_out", bi)
    w.conv("decoder.conv_out", bi, a.in_channels, 3)
    w.conv("quant_conv", a.z_channels, a.embed_dim, 1)
    w.conv("post_quant_conv", a.embed_dim, a.z_channels, 1)


def codebook_weights(w: Weights, fmt: str, a: Arch) -> None:
    if fmt == "vqgan-lc":
        w.sd["tok_embeddings.weight"] = w.randn(a.n_embed, a.feature_dim)  # frozen feature centres
        w.sd["codebook_projection.weight"] = w.randn(a.embed_dim, a.feature_dim,
                                                     std=a.feature_dim**-0.5)  # fmt: skip
        w.sd["codebook_projection.bias"] = w.randn(a.embed_dim, std=0.1)
    else:
        w.sd["quantize.embedding.weight"] = w.randn(a.n_embed, a.embed_dim)


def generator_state(
    fmt: str, a: Arch, seed: int = 0, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """The tokenizer's own weights under the original names: what ``export_state`` must give back."""
    w = Weights(seed, device)
    (llamagen_generator if fmt == "llamagen" else taming_generator)(w, a)
    codebook_weights(w, fmt, a)
    return w.sd


def extra_state(fmt: str, a: Arch, seed: int = 1, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Non-tokenizer tensors real files carry beside the weights (losses, EMA copies, usage counts)."""
    w = Weights(seed, device)
    if fmt in ("taming", "ibq"):  # LPIPS + PatchGAN inside the Lightning module's loss
        w.sd["loss.logvar"] = w.randn()
        w.sd["loss.perceptual_loss.scaling_layer.shift"] = w.randn(1, 3, 1, 1)
        w.sd["loss.perceptual_loss.scaling_layer.scale"] = w.randn(1, 3, 1, 1)
        w.conv("loss.perceptual_loss.net.slice1.0", 3, 64, 3)
        w.sd["loss.perceptual_loss.lin0.model.1.weight"] = w.randn(1, 64, 1, 1)
        w.conv("loss.discriminator.main.0", 3, 64, 4)
        w.norm("loss.discriminator.main.2", 64)
        w.sd["loss.discriminator.main.2.running_mean"] = w.randn(64)
        w.sd["loss.discriminator.main.2.running_var"] = w.randn(64).abs()
        w.sd["loss.discriminator.main.2.num_batches_tracked"] = torch.tensor(10, device=device)
    if fmt == "ibq":  # LitEma over every trainable parameter, dots removed from the names
        ema = generator_state(fmt, a, seed=seed + 100, device=device)
        ema["loss.discriminator.main.0.weight"] = w.sd["loss.discriminator.main.0.weight"] + 0.01
        for k, v in ema.items():
            w.sd["model_ema." + k.replace(".", "")] = v
        w.sd["model_ema.decay"] = torch.tensor(0.999, device=device)
        w.sd["model_ema.num_updates"] = torch.tensor(-1, dtype=torch.int, device=device)
    if fmt == "llamagen":
        used = torch.zeros(65536, device=device)
        w.sd["quantize.codebook_used"] = (
            used if device == "meta" else used.index_fill(0, torch.arange(0, 9000, 7), 3.0)
        )
    if fmt == "vqgan-lc":  # NLayerDiscriminator(n_layers=2) and the LPIPS of the plain module
        w.conv("discriminator.main.0", 3, 64, 4)
        w.norm("discriminator.main.3", 128)
        w.sd["discriminator.main.3.running_mean"] = w.randn(128)
        w.sd["discriminator.main.3.num_batches_tracked"] = torch.tensor(3, device=device)
        w.sd["perceptual_loss.scaling_layer.shift"] = w.randn(1, 3, 1, 1)
        w.conv("perceptual_loss.net.slice1.0", 3, 64, 3)
    return w.sd


def ema_of(sd_with_extras: dict) -> dict[str, torch.Tensor]:
    """IBQ: the EMA values of the tokenizer's weights, under the plain names (as ``ema_scope`` applies them)."""
    return {
        k: sd_with_extras["model_ema." + k.replace(".", "")]
        for k in sd_with_extras
        if not k.startswith(("model_ema.", "loss."))
    }


def checkpoint(fmt: str, a: Arch, seed: int = 0, device: str = "cpu", nesting: str | None = None):
    """(object to torch.save as the original publishes it, the tokenizer's weights under original names)."""
    sd = generator_state(fmt, a, seed, device)
    full = {**sd, **extra_state(fmt, a, seed + 1, device)}
    lightning = {"epoch": 3, "global_step": 10, "pytorch-lightning_version": "1.9.0",
                 "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "params": [0, 1]}]}],
                 "lr_schedulers": []}  # fmt: skip
    if fmt == "llamagen":
        obj = {nesting or "model": full, "steps": 250_000}
    elif fmt == "vqgan-lc":
        obj = {nesting or "state_dict": full, "epoch": 99}
    else:
        obj = {"state_dict": full, **lightning}
    return obj, sd


def save(tmp_path, obj, name: str = "tokenizer.ckpt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# The reference: the originals' forward, functionally, on original-named weights


def swish(x):
    return x * torch.sigmoid(x)


def group_norm(x, sd, p):
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def conv(x, sd, p, stride: int = 1, padding: int | None = None):
    weight = sd[f"{p}.weight"]
    pad = weight.shape[-1] // 2 if padding is None else padding
    return F.conv2d(x, weight, sd[f"{p}.bias"], stride=stride, padding=pad)


def resnet_block(x, sd, p):
    h = conv(swish(group_norm(x, sd, f"{p}.norm1")), sd, f"{p}.conv1")
    h = conv(swish(group_norm(h, sd, f"{p}.norm2")), sd, f"{p}.conv2")  # dropout 0
    if f"{p}.nin_shortcut.weight" in sd:
        x = conv(x, sd, f"{p}.nin_shortcut")
    return x + h


def attn_block(x, sd, p):
    h_ = group_norm(x, sd, f"{p}.norm")
    q, k, v = (conv(h_, sd, f"{p}.{n}") for n in ("q", "k", "v"))
    b, c, h, w = q.shape
    q = q.reshape(b, c, h * w).permute(0, 2, 1)  # b, hw, c
    k = k.reshape(b, c, h * w)  # b, c, hw
    w_ = torch.bmm(q, k) * (int(c) ** (-0.5))  # b, hw, hw
    w_ = torch.softmax(w_, dim=2)
    h_ = torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + conv(h_, sd, f"{p}.proj_out")


def downsample(x, sd, p):
    return conv(
        F.pad(x, (0, 1, 0, 1), mode="constant", value=0), sd, f"{p}.conv", stride=2, padding=0
    )


def upsample(x, sd, p):
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), sd, f"{p}.conv")


def taming_encoder(sd, x, a: Arch, p: str = "encoder"):
    L, cur = len(a.ch_mult), a.resolution
    h = conv(x, sd, f"{p}.conv_in")
    for i in range(L):
        for j in range(a.num_res_blocks):
            h = resnet_block(h, sd, f"{p}.down.{i}.block.{j}")
            if cur in a.attn_resolutions:
                h = attn_block(h, sd, f"{p}.down.{i}.attn.{j}")
        if i != L - 1:
            h = downsample(h, sd, f"{p}.down.{i}.downsample")
            cur //= 2
    h = resnet_block(h, sd, f"{p}.mid.block_1")
    h = attn_block(h, sd, f"{p}.mid.attn_1")
    h = resnet_block(h, sd, f"{p}.mid.block_2")
    return conv(swish(group_norm(h, sd, f"{p}.norm_out")), sd, f"{p}.conv_out")


def taming_decoder(sd, z, a: Arch, p: str = "decoder"):
    L, cur = len(a.ch_mult), a.resolution // 2 ** (len(a.ch_mult) - 1)
    h = conv(z, sd, f"{p}.conv_in")
    h = resnet_block(h, sd, f"{p}.mid.block_1")
    h = attn_block(h, sd, f"{p}.mid.attn_1")
    h = resnet_block(h, sd, f"{p}.mid.block_2")
    for i in reversed(range(L)):  # up.0 is the full resolution, run last
        for j in range(a.num_res_blocks + 1):
            h = resnet_block(h, sd, f"{p}.up.{i}.block.{j}")
            if cur in a.attn_resolutions:
                h = attn_block(h, sd, f"{p}.up.{i}.attn.{j}")
        if i != 0:
            h = upsample(h, sd, f"{p}.up.{i}.upsample")
            cur *= 2
    return conv(swish(group_norm(h, sd, f"{p}.norm_out")), sd, f"{p}.conv_out")  # no tanh


def llamagen_encoder(sd, x, a: Arch, p: str = "encoder"):
    L = len(a.ch_mult)
    h = conv(x, sd, f"{p}.conv_in")
    for i in range(L):
        for j in range(a.num_res_blocks):
            h = resnet_block(h, sd, f"{p}.conv_blocks.{i}.res.{j}")
            if i == L - 1:
                h = attn_block(h, sd, f"{p}.conv_blocks.{i}.attn.{j}")
        if i != L - 1:
            h = downsample(h, sd, f"{p}.conv_blocks.{i}.downsample")
    h = resnet_block(h, sd, f"{p}.mid.0")
    h = attn_block(h, sd, f"{p}.mid.1")
    h = resnet_block(h, sd, f"{p}.mid.2")
    return conv(swish(group_norm(h, sd, f"{p}.norm_out")), sd, f"{p}.conv_out")


def llamagen_decoder(sd, z, a: Arch, p: str = "decoder"):
    L = len(a.ch_mult)
    h = conv(z, sd, f"{p}.conv_in")
    h = resnet_block(h, sd, f"{p}.mid.0")
    h = attn_block(h, sd, f"{p}.mid.1")
    h = resnet_block(h, sd, f"{p}.mid.2")
    for i_level in range(L):  # conv_blocks in storage order: lowest resolution first
        for j in range(a.num_res_blocks + 1):
            h = resnet_block(h, sd, f"{p}.conv_blocks.{i_level}.res.{j}")
            if i_level == 0:
                h = attn_block(h, sd, f"{p}.conv_blocks.{i_level}.attn.{j}")
        if i_level != L - 1:
            h = upsample(h, sd, f"{p}.conv_blocks.{i_level}.upsample")
    return conv(swish(group_norm(h, sd, f"{p}.norm_out")), sd, f"{p}.conv_out")


def reference_codes(fmt: str, sd) -> torch.Tensor:
    """(K, D) code vectors as the original's decode-from-indices path looks them up."""
    if fmt == "llamagen":
        return F.normalize(sd["quantize.embedding.weight"], p=2, dim=-1)
    if fmt == "vqgan-lc":
        return F.linear(sd["tok_embeddings.weight"], sd["codebook_projection.weight"],
                        sd["codebook_projection.bias"])  # fmt: skip
    return sd["quantize.embedding.weight"]


def reference_quantize(fmt: str, sd, z):
    """Latents (b, d, h, w) -> (indices (b, h, w), code vectors for the decoder (b, d, h, w), scores (n, K)
    with the chosen code scoring highest)."""
    b, d, h, w = z.shape
    if fmt == "ibq":  # IndexPropagationQuantize, eval
        E = sd["quantize.embedding.weight"]
        logits = torch.einsum("b d h w, n d -> b n h w", z, E)
        soft = F.softmax(logits, dim=1)
        ind = soft.max(1, keepdim=True)[1]
        hard = torch.zeros_like(logits).scatter_(1, ind, 1.0)
        one_hot = hard - soft + soft
        z_q = torch.einsum("b n h w, n d -> b d h w", one_hot, E)
        return ind.reshape(b, h, w), z_q, logits.permute(0, 2, 3, 1).reshape(-1, E.shape[0])
    z = z.permute(0, 2, 3, 1).contiguous()
    z_flat = z.view(-1, d)
    E = reference_codes(fmt, sd)
    if fmt == "llamagen":  # l2_norm=True: z and the codebook on the unit sphere
        z = F.normalize(z, p=2, dim=-1)
        z_flat = F.normalize(z_flat, p=2, dim=-1)
    dist = (torch.sum(z_flat**2, dim=1, keepdim=True) + torch.sum(E**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", z_flat, E.T))  # fmt: skip
    idx = torch.argmin(dist, dim=1)
    z_q = E[idx].view(z.shape)
    z_q = z + (z_q - z)
    return idx.reshape(b, h, w), z_q.permute(0, 3, 1, 2).contiguous(), -dist


class Reference:
    """The original tokenizer of ``fmt`` over original-named weights ``sd``."""

    def __init__(self, fmt: str, sd: dict, a: Arch):
        self.fmt, self.sd, self.a = fmt, sd, a
        llama = fmt == "llamagen"
        self.encoder = llamagen_encoder if llama else taming_encoder
        self.decoder = llamagen_decoder if llama else taming_decoder

    @torch.no_grad()
    def encode(self, x):
        """images -> (latents after quant_conv, indices (b, h, w), decoder input, scores (n, K))."""
        h = conv(self.encoder(self.sd, x, self.a), self.sd, "quant_conv")
        idx, z_q, scores = reference_quantize(self.fmt, self.sd, h)
        return h, idx, z_q, scores

    @torch.no_grad()
    def decode_quant(self, z_q):
        return self.decoder(self.sd, conv(z_q, self.sd, "post_quant_conv"), self.a)

    @torch.no_grad()
    def decode(self, idx):
        """indices (b, h, w) -> images, through the code lookup (get_codebook_entry / decode_code)."""
        codes = reference_codes(self.fmt, self.sd)[idx].permute(0, 3, 1, 2)
        return self.decode_quant(codes)


# ----------------------------------------------------------------------------------------------------------
# Checks


def images(b: int = 2, h: int = 32, w: int = 48, seed: int = 5) -> torch.Tensor:
    """Non-square on purpose: a transposed raster order cannot pass."""
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def nearest(z_flat: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """argmin of the metric's distance, written directly (not through the expanded formula)."""
    if metric == "l2":
        return (z_flat[:, None, :] - codebook[None]).square().sum(-1).argmin(1)
    if metric == "cosine":
        return (F.normalize(z_flat, dim=-1) @ F.normalize(codebook, dim=-1).T).argmax(1)
    assert metric == "dot"
    return (z_flat @ codebook.T).argmax(1)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def check_against_reference(tok: Tokenizer, fmt: str, sd: dict, a: Arch, x: torch.Tensor) -> None:
    """Indices equal the original's (fp32, as it runs); the decode of those indices is within
    ``DECODE_ATOL`` of the original's in float64 (fp32 rounding alone puts either implementation ~5e-6
    from it here, so a fp32-vs-fp32 comparison would leave little room)."""
    ref = Reference(fmt, sd, a)
    h, idx, z_q, scores = ref.encode(x)
    gold = Reference(fmt, {k: v.double() for k, v in sd.items()}, a).decode(idx)
    # The case must be well posed: spread-out codes, a clear winner at every position (a gap far above
    # float32 rounding of the scores), O(1) activations.
    top2 = scores.topk(2, dim=1).values
    gap = float((top2[:, 0] - top2[:, 1]).min())
    assert gap > 1e-6 * max(1.0, float(scores.abs().max())), (
        f"near-tie ({gap:.2g}): change the seed"
    )
    assert idx.unique().numel() >= 8, f"the reference uses only codes {idx.unique().tolist()}"
    assert 0.05 < float(gold.std()) < 5 and 0.05 < float(h.std()) < 20, (gold.std(), h.std())
    assert (
        max_abs(ref.decode_quant(z_q).double(), gold) <= DECODE_ATOL
    )  # z + (e - z) = e up to rounding

    assert tok.quantizer.metric == METRIC[fmt]
    assert tok.codebook_size == a.n_embed
    latents, indices = tok.encode(x)  # grad enabled, as a caller might run it
    assert torch.equal(indices, idx), (
        f"{int((indices != idx).sum())} of {idx.numel()} indices differ"
    )
    with torch.no_grad():
        latents_ng, indices_ng = tok.encode(x)
        out = tok.decode(indices)
        codebook = tok.quantizer.codebook
        lookup = tok.quantizer.lookup(idx)
    assert torch.equal(indices_ng, idx) and torch.equal(latents_ng, latents.detach())
    assert max_abs(latents_ng, h) <= 1e-5 * max(1.0, float(h.abs().max()))
    assert out.shape == x.shape
    err = max_abs(out.double(), gold)
    assert err <= DECODE_ATOL, f"decode differs by {err:.3g} from the original in float64"
    # The codebook and metric alone give the original's assignment (what SNCE targets rely on).
    assert codebook.shape == (a.n_embed, a.embed_dim)
    z_flat = h.permute(0, 2, 3, 1).reshape(-1, a.embed_dim)
    assert torch.equal(nearest(z_flat, codebook, tok.quantizer.metric), idx.reshape(-1))
    ref_codes = reference_codes(fmt, sd)
    scale = max(1.0, float(ref_codes.abs().max()))
    assert max_abs(lookup, ref_codes[idx].permute(0, 3, 1, 2)) <= 1e-6 * scale


# ----------------------------------------------------------------------------------------------------------
# Tests: numerics against the reference


@pytest.mark.parametrize("fmt", FORMATS)
def test_import_matches_the_original(tmp_path, fmt):
    a = SMALL[fmt]
    obj, sd = checkpoint(fmt, a)
    tok = import_tokenizer(save(tmp_path, obj), fmt)
    assert not tok.training
    check_against_reference(tok, fmt, sd, a, images())


@pytest.mark.parametrize(("fmt", "nesting"), [("llamagen", "state_dict"), ("vqgan-lc", "model")])
def test_other_nesting(tmp_path, fmt, nesting):
    a = SMALL[fmt]
    obj, sd = checkpoint(fmt, a, seed=3, nesting=nesting)
    tok = import_tokenizer(save(tmp_path, obj), fmt)
    check_against_reference(tok, fmt, sd, a, images(1, 32, 32))


def test_ibq_ema_weights_are_used_with_ema(tmp_path):
    a = SMALL["ibq"]
    obj, sd = checkpoint("ibq", a)
    path = save(tmp_path, obj)
    ema = ema_of(obj["state_dict"])
    assert set(ema) == set(sd) and not torch.equal(
        ema["encoder.conv_in.weight"], sd["encoder.conv_in.weight"]
    )
    x = images()
    tok_ema = import_tokenizer(path, "ibq", ema=True)
    check_against_reference(tok_ema, "ibq", ema, a, x)
    tok_raw = import_tokenizer(path, "ibq")
    check_against_reference(tok_raw, "ibq", sd, a, x)
    assert not torch.equal(tok_ema.quantizer.codebook, tok_raw.quantizer.codebook)
    exported = export_state(tok_ema, "ibq")
    assert set(exported) == set(ema)
    assert all(torch.equal(exported[k], ema[k]) for k in ema)


def test_ibq_ema_copy_missing(tmp_path):
    obj, _ = checkpoint("ibq", SMALL["ibq"])
    del obj["state_dict"]["model_ema.decoderup0block1conv2bias"]
    path = save(tmp_path, obj)
    with pytest.raises(CheckpointKeyError, match=r"decoder\.up\.0\.block\.1\.conv2\.bias"):
        import_tokenizer(path, "ibq", ema=True)
    import_tokenizer(path, "ibq")  # the plain weights are complete


def test_llamagen_ema_entry(tmp_path):
    a = SMALL["llamagen"]
    obj, sd = checkpoint("llamagen", a)
    ema_obj, ema = checkpoint("llamagen", a, seed=7)
    obj["ema"] = ema_obj["model"]  # vq_train.py --ema: a deepcopy of the model, same names
    path = save(tmp_path, obj)
    x = images(1)
    check_against_reference(import_tokenizer(path, "llamagen", ema=True), "llamagen", ema, a, x)
    check_against_reference(import_tokenizer(path, "llamagen"), "llamagen", sd, a, x)
    del obj["ema"]
    with pytest.raises(CheckpointKeyError, match="ema"):
        import_tokenizer(save(tmp_path, obj, "no_ema.pt"), "llamagen", ema=True)


def test_ema_refused_where_the_format_has_none(tmp_path):
    obj, _ = checkpoint("taming", SMALL["taming"])
    with pytest.raises(ValueError, match="EMA"):
        import_tokenizer(save(tmp_path, obj), "taming", ema=True)


def test_llamagen_args_need_trust_pickle(tmp_path):
    """vq_train.py pickles its argparse Namespace as ``args``: refused by default, read when trusted."""
    a = SMALL["llamagen"]
    obj, sd = checkpoint("llamagen", a)
    obj["args"] = argparse.Namespace(codebook_size=a.n_embed, vq_model="VQ-16")
    path = save(tmp_path, obj)
    with pytest.raises(ValueError, match="trust"):
        import_tokenizer(path, "llamagen")
    tok = import_tokenizer(path, "llamagen", trust_pickle=True)
    check_against_reference(tok, "llamagen", sd, a, images(1, 32, 32))


# ----------------------------------------------------------------------------------------------------------
# Tests: round trips


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_state_gives_the_original_weights_back(tmp_path, fmt):
    a = SMALL[fmt]
    obj, sd = checkpoint(fmt, a, seed=11)
    tok = import_tokenizer(save(tmp_path, obj), fmt)
    exported = export_state(tok, fmt)
    exported.pop("quantize.codebook_used", None)  # usage bookkeeping, optional
    assert set(exported) == set(sd), (
        sorted(set(exported) - set(sd)),
        sorted(set(sd) - set(exported)),
    )
    differ = [k for k in sd if not torch.equal(exported[k], sd[k])]
    assert not differ, differ[:6]


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_pretrained_round_trip(tmp_path, fmt):
    a = SMALL[fmt]
    obj, _ = checkpoint(fmt, a, seed=13)
    tok = import_tokenizer(save(tmp_path, obj), fmt)
    tok.save_pretrained(tmp_path / "pretrained")
    loaded = Tokenizer.from_pretrained(tmp_path / "pretrained")
    assert loaded.full_config() == tok.full_config()
    assert loaded.quantizer.metric == tok.quantizer.metric
    x = images(1)
    with torch.no_grad():
        z, idx = tok.encode(x)
        z2, idx2 = loaded.encode(x)
        assert torch.equal(idx, idx2) and torch.equal(z, z2)
        assert torch.equal(tok.decode(idx), loaded.decode(idx))
    assert loaded.codebook_hash() == tok.codebook_hash()


def test_cli_import(tmp_path, capsys):
    a = SMALL["ibq"]
    obj, _ = checkpoint("ibq", a)
    path = save(tmp_path, obj)
    out = tmp_path / "ibq-ema"
    assert (
        main(["tokenizer", "import", "--format", "ibq", "--ema", str(path), "--out", str(out)]) == 0
    )
    assert "64 codes of dim 8 (dot)" in capsys.readouterr().out
    loaded = Tokenizer.from_pretrained(out)
    check_against_reference(loaded, "ibq", ema_of(obj["state_dict"]), a, images(1))


# ----------------------------------------------------------------------------------------------------------
# Tests: errors


def _one_key(sd: dict, pattern: str) -> str:
    return next(k for k in sd if re.fullmatch(pattern, k))


UNKNOWN = {  # a key of the format's own style that no module has
    "taming": "encoder.down.0.block.0.conv3.weight",
    "llamagen": "decoder.conv_blocks.1.res.0.conv3.weight",
    "ibq": "decoder.up.2.attn.7.q.weight",
    "vqgan-lc": "codebook_projection.scale",
}
MISSING = {  # a weight the architecture needs but whose absence does not change the inferred architecture
    "taming": "decoder.up.1.block.1.conv2.bias",
    "llamagen": "decoder.conv_blocks.0.attn.1.proj_out.weight",  # taming's decoder.up.2.attn.1
    "ibq": "quant_conv.bias",
    "vqgan-lc": "codebook_projection.bias",
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_unknown_and_missing_keys_are_named(tmp_path, fmt):
    obj, sd = checkpoint(fmt, SMALL[fmt])
    nested = next(v for v in obj.values() if isinstance(v, dict))
    nested[UNKNOWN[fmt]] = torch.zeros(3)
    del nested[MISSING[fmt]]
    with pytest.raises(CheckpointKeyError) as e:
        import_tokenizer(save(tmp_path, obj), fmt)
    msg = str(e.value)
    assert re.search(rf"unknown: [^;]*{re.escape(UNKNOWN[fmt])}", msg), msg
    assert re.search(rf"missing: [^;]*{re.escape(MISSING[fmt])}", msg), msg


@pytest.mark.parametrize("fmt", FORMATS)
def test_misshapen_key_is_named(tmp_path, fmt):
    a = SMALL[fmt]
    obj, _ = checkpoint(fmt, a)
    nested = next(v for v in obj.values() if isinstance(v, dict))
    key = "post_quant_conv.weight"
    nested[key] = torch.zeros(a.z_channels, a.embed_dim + 1, 1, 1)
    with pytest.raises(CheckpointKeyError, match=rf"wrong shape: [^;]*{re.escape(key)}"):
        import_tokenizer(save(tmp_path, obj), fmt)


def test_llamagen_file_as_taming_names_llamagen(tmp_path):
    obj, _ = checkpoint("llamagen", SMALL["llamagen"])
    with pytest.raises(CheckpointKeyError, match="'llamagen'"):
        import_tokenizer(save(tmp_path, obj), "taming")


def test_ibq_file_as_taming_names_ibq(tmp_path):
    obj, _ = checkpoint("ibq", replace(SMALL["ibq"], num_res_blocks=4))  # IBQ's 4 blocks per level
    with pytest.raises(CheckpointKeyError, match="'ibq'"):
        import_tokenizer(save(tmp_path, obj), "taming")


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        import_tokenizer(text, "taming")
    empty = save(tmp_path, {"epoch": 3, "global_step": 10}, "empty.ckpt")
    with pytest.raises(CheckpointKeyError, match="no state dict"):
        import_tokenizer(empty, "taming")
    with pytest.raises(FileNotFoundError):
        import_tokenizer(tmp_path / "absent.ckpt", "taming")
    with pytest.raises(ValueError, match="unknown tokenizer format 'vqgan'"):
        import_tokenizer(empty, "vqgan")


# ----------------------------------------------------------------------------------------------------------
# Tests: full-size layouts


@pytest.mark.parametrize("fmt", FORMATS)
def test_full_size_key_counts_and_detection(fmt):
    """Shapes only (meta tensors): the enumerated key counts of the published files, and detection."""
    obj, sd = checkpoint(fmt, FULL[fmt], device="meta")
    nested = next(v for v in obj.values() if isinstance(v, dict))
    kept = {
        k
        for k in nested
        if not k.startswith(("loss.", "model_ema.", "discriminator.", "perceptual_loss."))
    }
    assert len(kept) == FULL_KEYS[fmt]
    assert fmt in detect_formats(nested)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_full_size_imports_and_runs(tmp_path, fmt):
    a = FULL[fmt]
    obj, sd = checkpoint(fmt, a)
    path = save(tmp_path, obj)
    del obj
    tok = import_tokenizer(path, fmt)
    x = images(1, 256, 256)
    with torch.no_grad():
        latents, indices = tok.encode(x)
        out = tok.decode(indices)
    assert latents.shape == (1, a.embed_dim, 16, 16) and indices.shape == (1, 16, 16)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    ref = Reference(fmt, sd, a)
    h, idx, _, scores = ref.encode(x)
    top2 = scores.topk(2, dim=1).values
    gap = float((top2[:, 0] - top2[:, 1]).min())
    assert gap > 1e-6 * max(1.0, float(scores.abs().max())), (
        f"near-tie ({gap:.2g}): change the seed"
    )
    assert max_abs(latents, h) <= 1e-5 * max(1.0, float(h.abs().max()))
    assert torch.equal(indices, idx), (
        f"{int((indices != idx).sum())} of {idx.numel()} indices differ"
    )
    assert max_abs(out, ref.decode(idx)) <= 1e-4  # fp32 vs fp32 through 40-60 layers (~1.3e-5 seen)
