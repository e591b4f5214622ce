"""k-means codebook initialisation from the whole training set (issue 12), in one process and under torchrun.

A new run initialises a ``kmeans_init`` VectorQuantizer from latents of the whole training set before step 1
(not from the first batch, whose B h w latents are fewer than K here); a resumed run keeps its checkpoint's
codebook; under torchrun every rank starts from rank 0's codebook, so the run follows the single process.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from snce.cli import main
from snce.config import load_config
from snce.data import build_dataset
from snce.quantize import IBQuantizer, VectorQuantizer
from snce.quantize.base import codebook_health
from snce.tokenizer import (
    Tokenizer,
    TokenizerConfig,
    TokenizerRunConfig,
    evaluate_tokenizer,
    pipeline,
)
from snce.tokenizer.pipeline import (
    init_codebook_from_data,
    pending_codebook_init,
    train_tokenizer,
)
from snce.train import latest_checkpoint
from snce.train.loop import unwrap

K = 512  # > one batch's 8 images x 16 tokens
SETTINGS = [
    "data.size=16", "model.in_channels=1", "model.channels=8", "model.channel_mult=[1, 2, 2]",
    "model.latent_channels=8", f"model.quantizer.codebook_size={K}", "model.quantizer.metric=cosine",
    "model.quantizer.kmeans_init=true", "model.quantizer.ema_decay=0.9", "train.batch_size=8",
    "train.steps=2", "train.device=cpu", "train.progress=false", "train.tensorboard=false",
    "train.ckpt_every=1", "train.log_every=1",
]  # fmt: skip


@pytest.fixture
def spies(monkeypatch):
    """Records every init_codebook call (number of latents) and the quantizer at the first loss call."""
    calls, first = [], {}
    init_codebook = VectorQuantizer.init_codebook

    def init_spy(self, z, **kwargs):
        calls.append(z.shape[0])
        return init_codebook(self, z, **kwargs)

    loss = pipeline.tokenizer_loss

    def loss_spy(model, batch, step):
        if not first:
            q = unwrap(model).tokenizer.quantizer
            first.update(
                step=step, initialized=bool(q.initialized), codebook=q.codebook.detach().clone()
            )
        return loss(model, batch, step)

    monkeypatch.setattr(VectorQuantizer, "init_codebook", init_spy)
    monkeypatch.setattr(pipeline, "tokenizer_loss", loss_spy)
    return calls, first


def test_new_run_initialises_from_the_training_set_and_resume_does_not(tmp_path, spies):
    calls, first = spies
    cfg = load_config(TokenizerRunConfig, None, [*SETTINGS, f"train.out_dir={tmp_path}"])
    train_tokenizer(cfg)
    train = build_dataset(cfg.data, split="train")
    assert calls == [len(train) * 16]  # every latent of the training set (fewer than kmeans_points)
    assert first["step"] == 0 and first["initialized"]
    codebook = first["codebook"]
    assert torch.unique(codebook, dim=0).shape[0] == K
    assert codebook_health(codebook, "cosine")["duplicate_codes"] == 0
    # the same draw from a fresh tokenizer gives the run's initial codebook exactly
    torch.manual_seed(cfg.train.seed)
    fresh = Tokenizer(cfg.model)
    info = init_codebook_from_data(fresh, train, batch_size=8, device="cpu", seed=cfg.train.seed)
    assert info == {"images": len(train), "latents": len(train) * 16, "points": len(train) * 16}
    assert torch.equal(fresh.quantizer.codebook, codebook)
    del calls[1:]  # that call was ours

    first.clear()
    more = load_config(
        TokenizerRunConfig, None, [*SETTINGS, "train.steps=3", f"train.out_dir={tmp_path}"]
    )
    train_tokenizer(more, resume=True)
    assert calls == [len(train) * 16]  # not re-initialised
    assert first["step"] == 2 and first["initialized"]


def test_init_codebook_from_data_caps_points_and_images():
    torch.manual_seed(0)
    tok = Tokenizer(
        TokenizerConfig(
            in_channels=1, channels=8, channel_mult=(1, 2, 2), latent_channels=8,
            quantizer={"kind": "vq", "codebook_size": 64, "kmeans_init": True, "ema_decay": 0.9},
        )
    )  # fmt: skip
    train = build_dataset(load_config(TokenizerRunConfig, None, SETTINGS).data, split="train")
    assert pending_codebook_init(tok.quantizer)
    tok.train()
    info = init_codebook_from_data(tok, train, max_points=1000, max_images=200, batch_size=64)
    assert info == {"images": 200, "latents": 200 * 16, "points": 1000}
    assert not pending_codebook_init(tok.quantizer) and tok.training
    assert float(tok.quantizer.cluster_size.sum()) == pytest.approx(1000)
    assert torch.unique(tok.quantizer.codebook, dim=0).shape[0] == 64


def test_quantizers_without_kmeans_keep_their_own_initialisation():
    ibq = IBQuantizer(8, 64)
    assert not pending_codebook_init(ibq)
    assert not pending_codebook_init(VectorQuantizer(8, 64))  # kmeans_init off
    tok = Tokenizer(
        TokenizerConfig(in_channels=1, channels=8, quantizer={"kind": "ibq", "codebook_size": 64})
    )
    with pytest.raises(TypeError, match="no k-means initialisation"):
        init_codebook_from_data(tok, [(torch.zeros(1, 16, 16), 0)])


def test_evaluate_tokenizer_reports_dead_and_duplicate_codes():
    torch.manual_seed(0)
    tok = Tokenizer(
        TokenizerConfig(in_channels=1, channels=8, quantizer={"kind": "vq", "codebook_size": 64})
    )
    with torch.no_grad():
        tok.quantizer.embed[5] = tok.quantizer.embed[1]  # one planted copy
    data = build_dataset(load_config(TokenizerRunConfig, None, SETTINGS).data, split="test")
    metrics = evaluate_tokenizer(tok, data, device="cpu", progress=False)
    assert metrics["duplicate_codes"] >= 1
    used = round(metrics["usage"] * 64)
    assert metrics["dead_codes"] == 64 - used


# ------------------------------------------------------------------------------------------ torchrun

# As tests/tokenizer/test_ddp.py, with k-means: a rank's first micro-batch holds 8 x 16 = 128 latents, K = 128.
DDP_SETTINGS = [
    "data.size=8", "model.in_channels=1", "model.channels=8", "model.channel_mult=[1, 2]",
    "model.latent_channels=4", "model.quantizer.codebook_size=128", "model.quantizer.kmeans_init=true",
    "train.steps=2", "train.batch_size=16", "train.lr=1e-2", "train.device=cpu", "train.progress=false",
    "train.tensorboard=false", "train.ckpt_every=100", "train.adam_eps=1e-4",
]  # fmt: skip


def run_args(out_dir) -> list[str]:
    return [
        "tokenizer",
        "train",
        *(a for s in [*DDP_SETTINGS, f"train.out_dir={out_dir}"] for a in ("--set", s)),
    ]


def test_torchrun_ranks_start_from_the_same_codebook(tmp_path, torchrun):
    """The codebook is a parameter (codebook loss) initialised from the data on rank 0: the two-rank run follows
    the single process. (DDP's constructor also copies rank 0's state, so this alone does not show the
    broadcast; test_broadcast_state_gives_every_rank_rank_0s_quantizer does.)"""
    torchrun(run_args(tmp_path / "ddp"))
    assert main(run_args(tmp_path / "single")) == 0
    ddp = load_file(str(latest_checkpoint(tmp_path / "ddp") / "model.safetensors"))
    single = load_file(str(latest_checkpoint(tmp_path / "single") / "model.safetensors"))
    for key in ("tokenizer.quantizer.embed", "tokenizer.decoder.conv_out.weight"):
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    assert bool(ddp["tokenizer.quantizer.initialized"])


def _broadcast_worker(rank: int, directory: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/pg", rank=rank, world_size=2
    )  # fmt: skip
    torch.manual_seed(rank)  # different codebooks on the two ranks
    q = VectorQuantizer(4, 32, ema_decay=0.9, kmeans_init=True)
    if rank == 0:
        q.init_codebook(torch.randn(500, 4))
    pipeline.broadcast_state(q)
    torch.save({k: v.clone() for k, v in q.state_dict().items()}, f"{directory}/rank{rank}.pt")
    dist.destroy_process_group()


def test_broadcast_state_gives_every_rank_rank_0s_quantizer(tmp_path):
    """DDP's constructor would also copy rank 0's parameters and buffers, but the init does not rely on it."""
    import torch.multiprocessing as mp

    mp.start_processes(_broadcast_worker, args=(str(tmp_path),), nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert bool(r1["initialized"]) and r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


def test_lc_tokenizer_takes_its_frozen_base_from_the_training_set(tmp_path):
    """A new LC run sets the base to k-means centres of encoder latents of the whole training set; the base
    is then frozen (equal after training) and saved with the tokenizer."""
    lc = [s for s in SETTINGS if "quantizer" not in s] + [
        "model.quantizer.kind=lc", f"model.quantizer.codebook_size={K}", "model.quantizer.feature_dim=8",
    ]  # fmt: skip
    cfg = load_config(TokenizerRunConfig, None, [*lc, f"train.out_dir={tmp_path}"])
    tok = train_tokenizer(cfg)
    base = tok.quantizer.base
    assert not tok.quantizer.pending_init and torch.unique(base, dim=0).shape[0] == K
    torch.manual_seed(cfg.train.seed)
    fresh = Tokenizer(cfg.model)
    init_codebook_from_data(
        fresh, build_dataset(cfg.data, split="train"), batch_size=8, seed=cfg.train.seed
    )
    assert torch.equal(fresh.quantizer.base, base)  # frozen: training did not move it
    assert torch.equal(Tokenizer.from_pretrained(tmp_path / "tokenizer").quantizer.base, base)
    with pytest.raises(Exception, match="feature_dim"):
        load_config(TokenizerRunConfig, None, [*lc, "model.quantizer.feature_dim=6"])


def test_fvq_learning_annealing_shows_in_the_logged_learning_rate(tmp_path):
    from snce.quantize.fvq import learning_annealing

    fvq = [s for s in SETTINGS if "quantizer" not in s and "steps" not in s] + [
        "model.quantizer.kind=fvq", "model.quantizer.codebook_size=64", "train.schedule=annealing",
        "train.steps=10", "train.warmup_steps=2", "train.lr=1e-3",
    ]  # fmt: skip
    train_tokenizer(load_config(TokenizerRunConfig, None, [*fvq, f"train.out_dir={tmp_path}"]))
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    logged = {r["step"]: r["lr"] for r in map(json.loads, lines)}
    # the LR of optimizer step s (logged at step s) is lr x annealing(s - 1 finished steps)
    want = {s: 1e-3 * learning_annealing(s - 1, 10, 2) for s in logged}
    assert sorted(logged) == list(range(1, 11))
    assert logged == pytest.approx(want)
    # warmup from 0.005 lr, flat at lr, then annealed linearly toward 0.01 lr
    assert (
        logged[1] == pytest.approx(0.005e-3)
        and logged[5] == pytest.approx(1e-3)
        and logged[10] < 0.2e-3
    )
