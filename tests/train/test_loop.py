"""The shared training loop: resume equals an uninterrupted run, accumulation, schedule, logs.

The torchrun (DDP) equivalence test runs the real tokenizer command: tests/tokenizer/test_ddp.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from snce.config import ConfigError
from snce.train import Callback, ImageCallback, StepSampler, TrainConfig, Trainer, latest_checkpoint


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


class Kill(Callback):
    def __init__(self, at: int):
        self.at = at

    def on_step(self, trainer, step):
        if step == self.at:
            raise KeyboardInterrupt


def trainer_state(t: Trainer):
    return (
        {k: v.clone() for k, v in t.model.state_dict().items()},
        {k: v.clone() for k, v in t.ema.items()},
        t.optimizer.state_dict()["state"],
    )


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    full = Trainer(tiny_model(), mse_loss, tiny_dataset(), make_cfg(tmp_path / "full"))
    full.fit()

    killed = Trainer(
        tiny_model(), mse_loss, tiny_dataset(), make_cfg(tmp_path / "cut"), callbacks=[Kill(4)]
    )
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert latest_checkpoint(tmp_path / "cut").name == "step_0000003"
    # A differently initialised model: every weight must come from the checkpoint.
    resumed = Trainer(
        tiny_model(seed=1), mse_loss, tiny_dataset(), make_cfg(tmp_path / "cut"), resume=True
    )
    assert resumed.step == 3
    resumed.fit()

    (w1, e1, o1), (w2, e2, o2) = trainer_state(full), trainer_state(resumed)
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    for k in e1:
        assert torch.equal(e1[k], e2[k]), k
    for i in o1:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(o1[i][k], o2[i][k])
    # The uninterrupted run changed the weights and kept a log.
    assert not torch.equal(w1["0.weight"], tiny_model().state_dict()["0.weight"])
    lines = (tmp_path / "full" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 7))


def test_out_dir_is_never_reused_silently(tmp_path):
    Trainer(tiny_model(), mse_loss, tiny_dataset(), make_cfg(tmp_path, steps=1)).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(tiny_model(), mse_loss, tiny_dataset(), make_cfg(tmp_path, steps=1))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(tiny_model(), mse_loss, tiny_dataset(), make_cfg(tmp_path / "new"), resume=True)


def test_accumulation_equals_one_big_batch(tmp_path):
    runs = []
    for accum in (1, 4):
        t = Trainer(
            tiny_model(),
            mse_loss,
            tiny_dataset(),
            make_cfg(tmp_path / str(accum), grad_accum=accum, ema_decay=None, steps=3),
        )
        t.fit()
        runs.append(t.model.state_dict())
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=1e-5, atol=1e-6)


def test_batches_cover_each_epoch_once(tmp_path):
    seen = []

    def record(model, batch, step):
        seen.append(batch[0][:, 0, 0, 0].clone())
        return mse_loss(model, batch, step)

    data = tiny_dataset(n=20)
    cfg = make_cfg(tmp_path, steps=5, batch_size=4, grad_accum=1, ema_decay=None)
    Trainer(tiny_model(), record, data, cfg).fit()
    first_epoch = torch.cat(seen).sort().values
    assert torch.equal(first_epoch, data.tensors[0][:, 0, 0, 0].sort().values)


def test_lr_schedule_closed_form(tmp_path):
    t = Trainer(
        tiny_model(), mse_loss, tiny_dataset(), make_cfg(tmp_path, steps=10, warmup_steps=4)
    )
    assert [t.lr_at(s) for s in range(4)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    # cosine from lr at the end of warmup to min_lr_ratio * lr at the last step
    for s in (4, 7, 10):
        p = (s - 4) / 6
        assert t.lr_at(s) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))))
    t.cfg = make_cfg(tmp_path, schedule="constant", warmup_steps=0)
    assert t.lr_at(5) == 1e-2


def test_image_callback_and_tensorboard(tmp_path):
    cb = ImageCallback(2, lambda m: torch.linspace(-1, 1, 4 * 36).reshape(4, 1, 6, 6), name="grid")
    cfg = make_cfg(tmp_path, steps=3, tensorboard=True)
    Trainer(tiny_model(), mse_loss, tiny_dataset(), cfg, callbacks=[cb]).fit()
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "grid_0000002.png",
        "grid_0000003.png",
    ]
    assert any((tmp_path / "tb").iterdir())


def test_batch_size_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'train.batch_size': must be divisible"):
        Trainer(tiny_model(), mse_loss, tiny_dataset(), make_cfg(tmp_path, batch_size=7))
    with pytest.raises(ConfigError, match="'train.batch_size'.*fewer than one micro-batch"):
        Trainer(tiny_model(), mse_loss, tiny_dataset(n=4), make_cfg(tmp_path, batch_size=16))
    with pytest.raises(ConfigError, match="'lr': must be > 0"):
        TrainConfig.from_dict({"lr": 0})


def test_ranks_split_the_single_process_batches():
    """Rank r's j-th micro-batch of size B/W, over all ranks, is the single process's j-th batch of size B."""
    n, b, w = 23, 6, 3
    single = list(StepSampler(n, 0, 1, seed=5))
    ranks = [list(StepSampler(n, r, w, seed=5)) for r in range(w)]
    for j in range(n // b):
        union = sorted(i for r in range(w) for i in ranks[r][j * b // w : (j + 1) * b // w])
        assert union == sorted(single[j * b : (j + 1) * b])
    sampler = StepSampler(n, 1, w, seed=5)
    sampler.set_position(epoch=0, start=2)
    assert list(sampler) == ranks[1][2:] and len(sampler) == len(ranks[1]) - 2
    sampler.set_position(epoch=1, start=0)
    assert list(sampler) != ranks[1]  # a new permutation each epoch


class TinyQuantized(nn.Module):
    """A projection then a 16-code VQ whose usage window (10 batches) spans the resume point."""

    def __init__(self):
        super().__init__()
        from snce.quantize import VectorQuantizer

        torch.manual_seed(0)
        self.proj = nn.Linear(36, 8)
        self.quantizer = VectorQuantizer(2, 16, usage_window=10)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        out = self.quantizer(self.proj(x.flatten(1)).view(-1, 4, 2))
        return self.head(out.quantized.flatten(1)), out


def quantized_loss(model, batch, step):
    x, y = batch
    pred, out = model(x)
    return ((pred - y) ** 2).mean() + out.loss, {"usage": out.stats["usage"]}


def test_resume_reports_the_same_codebook_usage(tmp_path):
    """The usage window is part of the checkpoint: logged usage after a resume equals the uninterrupted run's."""
    cfg = dict(ema_decay=None, grad_accum=1, batch_size=2, steps=8, ckpt_every=4)
    Trainer(
        TinyQuantized(), quantized_loss, tiny_dataset(), make_cfg(tmp_path / "full", **cfg)
    ).fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(
            TinyQuantized(), quantized_loss, tiny_dataset(), make_cfg(tmp_path / "cut", **cfg),
            callbacks=[Kill(5)],
        ).fit()  # fmt: skip
    Trainer(
        TinyQuantized(), quantized_loss, tiny_dataset(), make_cfg(tmp_path / "cut", **cfg), resume=True
    ).fit()  # fmt: skip

    def usage(run):
        lines = (tmp_path / run / "log.jsonl").read_text().splitlines()
        return {(r := json.loads(line))["step"]: r["usage"] for line in lines}

    full, cut = usage("full"), usage("cut")
    assert sorted(full) == list(range(1, 9)) and all(cut[s] == full[s] for s in range(5, 9))
    assert full[8] > full[1]  # the window holds more than one batch: the test would see a reset
