"""A tiny model, dataset and objective shared by the training-loop tests and the torchrun worker."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from snce.train import TrainConfig


def tiny_dataset(n: int = 24, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = x.mean(dim=(1, 2, 3), keepdim=False)[:, None] * 3 + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.SiLU(),
        nn.Flatten(),
        nn.Linear(144, 1),
    )


def mse_loss(model, batch, step):
    x, y = batch
    err = model(x) - y
    return (err**2).mean(), {"abs_err": err.abs().mean()}


def make_cfg(out_dir, **kw) -> TrainConfig:
    base = dict(
        out_dir=str(out_dir),
        steps=6,
        batch_size=8,
        grad_accum=2,
        lr=1e-2,
        warmup_steps=2,
        ema_decay=0.9,
        weight_decay=0.1,
        device="cpu",
        progress=False,
        tensorboard=False,
        log_every=1,
        ckpt_every=3,
    )
    return TrainConfig(**{**base, **kw})
