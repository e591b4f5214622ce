"""Large-generator training switches of the Trainer: FSDP2, activation checkpointing, bf16 autocast, compile.

Multi-process checks run this file as a script under ``torchrun --nproc_per_node 2`` (gloo, CPU) once per
session (the ``runs`` fixture); each scenario writes its checkpoints, and the tests compare them with
single-process runs of the same global batch. The model is a tiny class-conditional AR generator with an odd
codebook (K = 61: FSDP's shards of the head and embeddings are uneven) trained with the fused SNCE loss over
several row blocks, so the head weight's gradient comes from the chunked loss under sharding.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train/test_fsdp.py OUT SCENARIO...
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from snce.config import ConfigError
from snce.functional import fused_linear_snce_loss
from snce.generators import build_generator
from snce.generators.objectives import loss_terms
from snce.train import Callback, TrainConfig, Trainer, latest_checkpoint

K, GRID, CLASSES, DIM, SAMPLES = 61, (3, 3), 3, 32, 48
STEPS = 4


class Tokens(Dataset):
    """Random token grids with labels, as token shards yield them."""

    def __init__(self, n: int = SAMPLES):
        g = torch.Generator().manual_seed(1)
        self.indices = torch.randint(0, K, (n, GRID[0] * GRID[1]), generator=g)
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return {"indices": self.indices[i], "label": self.labels[i]}


def make_model(dropout: float = 0.0, family: str = "autoregressive"):
    torch.manual_seed(0)
    model = build_generator(
        family, vocab_size=K, grid=GRID, num_classes=CLASSES, dim=DIM, n_layers=2, n_heads=2,
        class_dropout=0.0, dropout=dropout,
    )  # fmt: skip
    # a zero head would hide head-gradient mistakes
    torch.nn.init.normal_(model.head.weight, std=0.02)
    return model


CODEBOOK = torch.randn(K, 4, generator=torch.Generator().manual_seed(2))


class SNCE:
    """The fused SNCE loss over 3 row blocks per micro-batch; records what the head weight looked like."""

    def __init__(self):
        self.seen: list[tuple[str, tuple, torch.dtype]] = []
        self.autocast: list[bool] = []

    def __call__(self, model, batch, step):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        hidden, head_weight, target, _, _ = loss_terms(model, batch["indices"], batch["label"])
        self.seen.append((type(head_weight).__name__, tuple(head_weight.shape), head_weight.dtype))
        loss = fused_linear_snce_loss(
            hidden, head_weight, target, codebook=CODEBOOK, tau=0.5, metric="l2", block_rows=8
        )
        return loss, {}


def make_cfg(out_dir, **kw) -> TrainConfig:
    # adam_eps=1e-4: see tests/tokenizer/test_ddp.py (Adam's first steps amplify float rounding otherwise)
    base = dict(
        out_dir=str(out_dir), steps=STEPS, batch_size=8, grad_accum=2, lr=1e-2, warmup_steps=1,
        ema_decay=0.9, weight_decay=0.1, adam_eps=1e-4, device="cpu", progress=False,
        tensorboard=False, log_every=1, ckpt_every=2,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


class Kill(Callback):
    def __init__(self, at: int):
        self.at = at

    def on_step(self, trainer, step):
        if step == self.at:
            raise KeyboardInterrupt


class EvalOutputs(Callback):
    """At checkpoint steps, rank 0 runs the evaluation weights (EMA) on fixed tokens; saved as evals.pt."""

    def __init__(self):
        self.outputs = {}

    def on_step(self, trainer, step):
        if step % trainer.cfg.ckpt_every or not trainer.dist.is_main:
            return
        data = Tokens(4)
        with trainer.eval_weights() as model, torch.no_grad():
            self.outputs[step] = model(data.indices, data.labels)
        torch.save(self.outputs, trainer.out_dir / "evals.pt")


def train(out_dir, callbacks=(), resume=False, loss=None, model=None, **kw) -> Trainer:
    trainer = Trainer(
        model or make_model(), loss or SNCE(), Tokens(), make_cfg(out_dir, **kw),
        callbacks=list(callbacks), resume=resume,
    )  # fmt: skip
    try:
        trainer.fit()
    except KeyboardInterrupt:
        pass
    return trainer


# ------------------------------------------------------------------------------ torchrun scenarios


def scenario(root: Path, name: str) -> None:
    out = root / name
    if name == "fsdp":
        loss = SNCE()
        with count_root_gathers() as gathers:
            trainer = train(out, [EvalOutputs()], parallel="fsdp", loss=loss)
        if trainer.dist.is_main:  # after fit
            data = Tokens(4)
            with trainer.eval_weights() as model, torch.no_grad():
                torch.save(model(data.indices, data.labels), out / "after_fit.pt")
        info = {"head_seen": sorted({str(s) for s in loss.seen}), "root_gathers": gathers}
        info["sharded"] = type(trainer.model.head.weight).__name__
        _write_json(trainer, out / "info.json", info)
    elif name == "fsdp_ac":
        train(out, parallel="fsdp", activation_checkpointing=True)
    elif name in ("fsdp_cut", "ddp_cut"):
        train(out, [Kill(2)], parallel=name.split("_")[0])
    elif name == "fsdp_resume":  # the test put a 1-process checkpoint of step 2 here
        train(out, parallel="fsdp", resume=True)
    elif name == "fsdp_compile":  # with activation checkpointing; the quick aot_eager backend
        original = torch.compile
        torch.compile = functools.partial(original, backend="aot_eager")
        try:
            train(out, parallel="fsdp", compile=True, activation_checkpointing=True)
        finally:
            torch.compile = original
    elif name == "fsdp_mdm":  # masked diffusion: ranks draw their own masks, so only a smoke run
        model = make_model(family="masked_diffusion")
        train(out, parallel="fsdp", model=model, loss=SNCE(), steps=2)
    elif name == "fsdp_amp":
        loss = SNCE()
        trainer = train(out, parallel="fsdp", amp=True, amp_cpu=True, steps=1, loss=loss)
        opt = [v.dtype for s in trainer.optimizer.state.values() for v in s.values() if v.dim()]
        info = {
            "params": sorted({str(p.dtype) for p in trainer.model.parameters()}),
            "optimizer": sorted({str(d) for d in opt}),
            "ema": sorted({str(v.dtype) for v in trainer.ema.values()}),
            "autocast": loss.autocast,
        }
        _write_json(trainer, out / "info.json", info)
    else:
        raise ValueError(f"unknown scenario {name!r}")


@contextmanager
def count_root_gathers():
    """Counts the all-gathers of the root unit (embeddings, final norm, head) through FSDP2's private
    FSDPParamGroup; yields a list that holds the count afterwards (empty if that class is not found)."""
    result = []
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    except ImportError:
        yield result
        return
    original, count = FSDPParamGroup.unshard, [0]

    def unshard(self, *args, **kwargs):
        if not self._module_fqn and not self.is_unsharded:  # the root's fqn is ""
            count[0] += 1
        return original(self, *args, **kwargs)

    FSDPParamGroup.unshard = unshard
    try:
        yield result
    finally:
        FSDPParamGroup.unshard = original
        result.append(count[0])


def _write_json(trainer: Trainer, path: Path, info: dict) -> None:
    if trainer.dist.is_main:
        path.write_text(json.dumps(info))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references, then every 2-process scenario in one torchrun launch."""
    root = tmp_path_factory.mktemp("fsdp")
    train(root / "single", [EvalOutputs()])
    train(root / "single_cut", [Kill(2)])
    shutil.copytree(root / "single_cut", root / "fsdp_resume")
    names = ["fsdp", "fsdp_ac", "fsdp_compile", "fsdp_cut", "ddp_cut", "fsdp_resume", "fsdp_amp"]
    names.append("fsdp_mdm")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, __file__, str(root), *names], env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def final(run: Path) -> tuple[dict, dict, dict]:
    """(weights, EMA, optimizer state by name) of a run's newest checkpoint."""
    ckpt = latest_checkpoint(run)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["step"] == STEPS and state["optimizer_format"] == "fqn"
    return (
        load_file(str(ckpt / "model.safetensors")),
        load_file(str(ckpt / "ema.safetensors")),
        state["optimizer"]["state"],
    )


def assert_same_run(a: Path, b: Path, rtol=1e-4, atol=1e-5) -> None:
    (wa, ea, oa), (wb, eb, ob) = final(a), final(b)
    assert wa.keys() == wb.keys() and ea.keys() == eb.keys() and oa.keys() == ob.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=atol, msg=f"weights {k}")
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=rtol, atol=atol, msg=f"EMA {k}")
    for k in oa:
        for s in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(oa[k][s], ob[k][s], rtol=rtol, atol=atol, msg=f"{k} {s}")


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ FSDP


def test_fsdp_steps_equal_one_process(runs):
    """2 ranks x 4 samples per micro-step (FSDP2) follow 1 process x 8: losses, weights, EMA, Adam moments."""
    assert_same_run(runs / "fsdp", runs / "single")
    torch.testing.assert_close(losses(runs / "fsdp"), losses(runs / "single"), rtol=1e-5, atol=0)
    # the run trained: weights moved from the shared initialisation
    init = make_model().state_dict()["head.weight"]
    assert not torch.allclose(final(runs / "single")[0]["head.weight"], init, atol=1e-3)


def test_fsdp_head_is_one_full_tensor_in_the_fused_loss(runs):
    """Under FSDP the parameters are sharded DTensors, but the fused loss (3 row blocks per micro-step) got the
    whole (K, H) head weight as one plain tensor, never a shard or a DTensor; the root unit that holds it was
    all-gathered once per micro-step (forward, loss and backward), not once per block."""
    info = json.loads((runs / "fsdp" / "info.json").read_text())
    assert info["sharded"] == "DTensor"
    assert info["head_seen"] == [str(("Parameter", (K, DIM), torch.float32))]
    if not info["root_gathers"]:
        pytest.skip("FSDP2's FSDPParamGroup (private) not found: gathers not counted")
    assert info["root_gathers"] == [STEPS * make_cfg("").grad_accum]


def test_fsdp_evaluation_weights_equal_one_process(runs):
    """eval_weights() on rank 0 (callbacks at checkpoint steps, and after fit) gives the EMA model of the
    single-process run."""
    fsdp = torch.load(runs / "fsdp" / "evals.pt", weights_only=True)
    single = torch.load(runs / "single" / "evals.pt", weights_only=True)
    assert sorted(fsdp) == sorted(single) == [2, 4]
    for step in single:
        torch.testing.assert_close(fsdp[step], single[step], rtol=1e-4, atol=1e-5)
    after = torch.load(runs / "fsdp" / "after_fit.pt", weights_only=True)
    torch.testing.assert_close(after, single[4], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cut", ["fsdp_cut", "ddp_cut"])
def test_two_rank_checkpoint_resumes_on_one_process(runs, tmp_path, cut):
    """A checkpoint written by 2 ranks (sharded or replicated) resumes in 1 process; the next steps equal the
    uninterrupted single-process run."""
    assert latest_checkpoint(runs / cut).name == "step_0000002"
    resumed = tmp_path / cut
    shutil.copytree(runs / cut, resumed)
    # a differently initialised model: every weight must come from the checkpoint
    trainer = train(resumed, resume=True, model=build_generator(
        "autoregressive", vocab_size=K, grid=GRID, num_classes=CLASSES, dim=DIM, n_layers=2, n_heads=2,
        class_dropout=0.0,
    ))  # fmt: skip
    assert trainer.step == STEPS
    assert_same_run(resumed, runs / "single")


def test_one_process_checkpoint_resumes_under_fsdp(runs):
    assert_same_run(runs / "fsdp_resume", runs / "single")


def test_activation_checkpointing_under_fsdp(runs):
    assert_same_run(runs / "fsdp_ac", runs / "fsdp", rtol=1e-6, atol=1e-7)
    assert losses(runs / "fsdp_ac") == pytest.approx(losses(runs / "fsdp"), rel=1e-6)


def test_compile_and_activation_checkpointing_under_fsdp(runs):
    assert_same_run(runs / "fsdp_compile", runs / "fsdp", rtol=1e-5, atol=1e-6)


def test_masked_diffusion_trains_under_fsdp(runs, tmp_path):
    assert all(math.isfinite(v) for v in losses(runs / "fsdp_mdm"))
    resumed = tmp_path / "mdm"
    shutil.copytree(runs / "fsdp_mdm", resumed)
    model = make_model(family="masked_diffusion")
    assert train(resumed, model=model, loss=SNCE(), steps=3, resume=True).step == 3


def test_amp_under_fsdp_keeps_fp32_master_weights(runs):
    info = json.loads((runs / "fsdp_amp" / "info.json").read_text())
    assert info["autocast"] == [True, True]  # 1 step x 2 micro-steps
    assert info["params"] == info["optimizer"] == info["ema"] == ["torch.float32"]


def test_generator_cli_under_fsdp(tmp_path):
    """`snce generator train` under torchrun with train.parallel=fsdp: sample grids and validation losses at
    checkpoint steps and the saved generator (all from weights gathered to rank 0) equal one process's."""
    from snce.cli import main
    from snce.data import ShardManifest, ShardWriter
    from snce.tokenizer import Tokenizer, TokenizerConfig

    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig(
        in_channels=1, channels=8, channel_mult=(1, 2), latent_channels=4,
        quantizer={"kind": "vq", "codebook_size": 32},
    )).eval()  # fmt: skip
    tok.save_pretrained(tmp_path / "tok")
    for name, n in (("shards", 24), ("val", 6)):
        writer = ShardWriter(tmp_path / name, ShardManifest(
            grid=(2, 2), codebook_size=32, metric=tok.quantizer.metric, codebook_hash=tok.codebook_hash(),
            tokenizer=tok.full_config(), num_classes=3,
        ))  # fmt: skip
        labels = torch.arange(n) % 3
        writer.add((labels[:, None, None] * 5 + torch.arange(4).view(1, 2, 2)) % 32, labels)
        writer.close()

    def args(out, parallel):
        sets = [
            f"shards={tmp_path / 'shards'}", f"tokenizer={tmp_path / 'tok'}", f"val_shards={tmp_path / 'val'}",
            "family=autoregressive", "model.dim=32", "model.n_layers=2", "model.n_heads=2",
            "model.class_dropout=0.0", "loss.kind=snce", "sample.num_images=6", f"train.out_dir={out}",
            "train.steps=4", "train.batch_size=8", "train.grad_accum=2", "train.lr=1e-2", "train.device=cpu",
            "train.progress=false", "train.tensorboard=false", "train.ckpt_every=2", "train.image_every=2",
            "train.ema_decay=0.9", "train.adam_eps=1e-4", f"train.parallel={parallel}",
        ]  # fmt: skip
        (tmp_path / "run.yaml").write_text("{}\n")  # everything comes from --set
        config = ["--config", str(tmp_path / "run.yaml")]
        return ["generator", "train", *config, *[a for item in sets for a in ("--set", item)]]

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, "-m", "snce.cli", *args(tmp_path / "fsdp", "fsdp")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert main(args(tmp_path / "single", "ddp")) == 0
    fsdp, single = tmp_path / "fsdp", tmp_path / "single"
    a = load_file(str(fsdp / "generator" / "model.safetensors"))
    b = load_file(str(single / "generator" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    val = [
        [json.loads(line) for line in (run / "val.jsonl").read_text().splitlines()]
        for run in (fsdp, single)
    ]
    assert [r["step"] for r in val[0]] == [r["step"] for r in val[1]] == [2, 4]
    for x, y in zip(*val, strict=True):
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-4)
    grids = [sorted(p.name for p in (run / "images").glob("*.png")) for run in (fsdp, single)]
    assert grids[0] == grids[1] == ["samples_0000002.png", "samples_0000004.png"]


# ------------------------------------------------------------------------------ one process


def test_checkpoint_with_index_keyed_optimizer_resumes(tmp_path):
    """Checkpoints written before optimizer states were keyed by name (torch.optim's own form) still resume
    exactly."""
    from snce.files import record_checksums

    train(tmp_path / "full")
    cut = train(tmp_path / "cut", [Kill(2)])
    ckpt = latest_checkpoint(tmp_path / "cut")
    state = torch.load(ckpt / "state.pt", weights_only=True)
    del state["optimizer_format"]
    state["optimizer"] = cut.optimizer.state_dict()
    torch.save(state, ckpt / "state.pt")
    record_checksums(ckpt, [p.name for p in sorted(ckpt.iterdir()) if p.name != "checksums.json"])
    resumed = train(tmp_path / "cut", resume=True)
    assert resumed.step == STEPS
    assert_same_run(tmp_path / "cut", tmp_path / "full", rtol=0, atol=0)


def test_activation_checkpointing_same_loss_and_grads():
    """Recomputing each block in the backward gives the same loss and gradients, dropout included (the RNG
    state is restored for the recomputation)."""
    data = Tokens(6)
    results = []
    for recompute in (False, True):
        model = make_model(dropout=0.1).train()
        model.configure_training(activation_checkpointing=recompute)
        torch.manual_seed(5)
        loss, _ = SNCE()(model, {"indices": data.indices, "label": data.labels}, 0)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=0, atol=0, msg=n)


def test_activation_checkpointing_switch_in_trainer(tmp_path):
    plain = train(tmp_path / "plain", steps=2)
    ac = train(tmp_path / "ac", steps=2, activation_checkpointing=True)
    assert ac.model.activation_checkpointing and not plain.model.activation_checkpointing
    assert losses(tmp_path / "ac") == losses(tmp_path / "plain")


def test_amp_switch_on_cpu_keeps_fp32_master_weights(tmp_path):
    """amp + amp_cpu: the forward and loss run under bf16 autocast on CPU; weights, gradients' optimizer moments
    and EMA stay float32, and the loss is logged as a float32 number. amp alone leaves CPU runs in fp32."""
    seen = {}

    def loss_fn(model, batch, step):
        seen.setdefault("autocast", []).append(torch.is_autocast_enabled("cpu"))
        seen.setdefault("qkv", []).append(model.layers[0].attn.qkv(model.tok_emb.weight[:2]).dtype)
        return SNCE()(model, batch, step)

    trainer = train(tmp_path / "amp", loss=loss_fn, steps=1, amp=True, amp_cpu=True)
    assert all(seen["autocast"]) and set(seen["qkv"]) == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    moments = [v for s in trainer.optimizer.state.values() for k, v in s.items() if k != "step"]
    assert moments and {v.dtype for v in moments} == {torch.float32}
    assert {v.dtype for v in trainer.ema.values()} == {torch.float32}
    assert all(isinstance(v, float) for v in losses(tmp_path / "amp"))

    seen.clear()
    train(tmp_path / "fp32", loss=loss_fn, steps=1, amp=True)  # amp_cpu off
    assert not any(seen["autocast"]) and set(seen["qkv"]) == {torch.float32}


def test_compile_switch(tmp_path, monkeypatch):
    """compile=True runs the blocks' training forward through torch.compile (here with the quick aot_eager
    backend; tests/train/test_fsdp.py::test_compile_inductor runs the default one); same losses as eager."""
    compiled = []
    original = torch.compile

    def quick_compile(fn, **kw):
        compiled.append(fn)
        return original(fn, backend="aot_eager", **kw)

    monkeypatch.setattr(torch, "compile", quick_compile)
    eager = train(tmp_path / "eager", steps=2)
    fast = train(tmp_path / "compiled", steps=2, compile=True)
    assert len(compiled) == 1 and all(b.compiled_body is not None for b in fast.model.layers)
    assert all(b.compiled_body is None for b in eager.model.layers)
    torch.testing.assert_close(losses(tmp_path / "compiled"), losses(tmp_path / "eager"))
    # the checkpoint is the plain model's: same keys, loadable without compile
    assert final_keys(tmp_path / "compiled") == final_keys(tmp_path / "eager")


def final_keys(run: Path) -> set[str]:
    return set(load_file(str(latest_checkpoint(run) / "model.safetensors")))


@pytest.mark.slow
def test_compile_inductor(tmp_path):
    """The default backend (inductor; needs a C++ compiler, ~1-2 min on a CPU)."""
    train(tmp_path / "eager", steps=1)
    train(tmp_path / "compiled", steps=1, compile=True)
    torch.testing.assert_close(
        losses(tmp_path / "compiled"), losses(tmp_path / "eager"), rtol=1e-5, atol=1e-6
    )


def test_training_switches_need_the_model_hook(tmp_path):
    model = torch.nn.Linear(4, 4)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4))
    for key in ("activation_checkpointing", "compile"):
        with pytest.raises(ConfigError, match=key):
            Trainer(
                model, lambda m, b, s: (m(b[0]).sum(), {}), data, make_cfg(tmp_path, **{key: True})
            )


def test_parallel_setting_is_checked():
    with pytest.raises(ConfigError, match="parallel"):
        from snce.config import load_config

        load_config(TrainConfig, None, ["parallel=zero3"])


if __name__ == "__main__":  # a torchrun worker: OUT SCENARIO...
    torch.set_num_threads(1)
    for name in sys.argv[2:]:
        scenario(Path(sys.argv[1]), name)
