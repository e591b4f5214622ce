"""`torchrun --nproc_per_node 2` (gloo, CPU) follows one process on the combined batch."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from snce.cli import main
from snce.config import load_config
from snce.tokenizer import Tokenizer, TokenizerRunConfig
from snce.train import latest_checkpoint

# Gradient accumulation and EMA on; the VQ codebook learns by gradient (its losses are batch means).
# adam_eps=1e-4: Adam's first steps move every weight by ~lr * sign(grad), so a weight whose exact gradient
# is ~0 (e.g. a conv bias right before a GroupNorm) would turn float rounding into lr-sized differences.
SETTINGS = [
    "data.size=8", "model.in_channels=1", "model.channels=8", "model.channel_mult=[1, 2]",
    "model.latent_channels=4", "model.quantizer.codebook_size=32", "train.steps=3", "train.batch_size=16",
    "train.grad_accum=2", "train.lr=1e-2", "train.warmup_steps=1", "train.ema_decay=0.9", "train.device=cpu",
    "train.progress=false", "train.tensorboard=false", "train.ckpt_every=100", "train.adam_eps=1e-4",
]  # fmt: skip


def run_args(out_dir) -> list[str]:
    sets = [a for item in [*SETTINGS, f"train.out_dir={out_dir}"] for a in ("--set", item)]
    return ["tokenizer", "train", *sets]


def test_torchrun_matches_one_process(tmp_path, torchrun):
    torchrun(run_args(tmp_path / "ddp"))
    assert main(run_args(tmp_path / "single")) == 0
    cfg = load_config(TokenizerRunConfig, None, SETTINGS)
    torch.manual_seed(cfg.train.seed)
    init = Tokenizer(cfg.model)
    # Parameters must agree; buffers such as the VQ's running code counts are statistics of each rank's batch.
    params = {f"tokenizer.{k}" for k, _ in init.named_parameters()}
    for name in ("model.safetensors", "ema.safetensors"):
        ddp = load_file(str(latest_checkpoint(tmp_path / "ddp") / name))
        single = load_file(str(latest_checkpoint(tmp_path / "single") / name))
        assert params <= ddp.keys() and params <= single.keys()
        for k in params:
            # atol 1e-4 = 1% of one Adam step (lr 1e-2): a wrong gradient average moves weights by ~lr, while
            # the two reduction orders' float32 rounding, amplified by Adam, reached 1.7e-5 on some CPUs
            torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-4, msg=f"{name}: {k}")
    # The runs trained: weights moved away from the shared initialisation (seeded by train.seed).
    key = "decoder.conv_out.weight"
    assert not torch.allclose(single[f"tokenizer.{key}"], init.state_dict()[key], atol=1e-3)
