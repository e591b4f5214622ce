"""Generator training throughput on CPU at large codebooks: the fused SNCE head against full-logit CE.

One training step = the generator's forward, the token loss, backward and an AdamW step (the Trainer's
``zero_grad(set_to_none=True)``), on a fixed batch of ``--batch`` images of ``--grid`` x ``--grid`` tokens, fp32.
Losses (the model's hidden states (tokens, H) and head weight (K, H) go in):

    ce-unfused  baseline, as LlamaGen and IBQ train: logits = F.linear(hidden, W) (tokens x K), F.cross_entropy
    ce          snce's fused linear CE (``TokenLoss(LossConfig(kind="ce"))`` -> fused_linear_cross_entropy)
    snce        snce's fused linear SNCE (``TokenLoss(LossConfig(kind="snce"))`` -> fused_linear_snce_loss):
                exact q over all K codes from the code embeddings (z = e_y, pre-tokenized data)
    snce-top32  the same with a NeighborTable of the 32 nearest codes (``LossConfig(kind="snce", topk=32)``)

Each (K, loss) runs in its own fresh process (``--reps`` processes per loss, taken round-robin over the losses so
that load changes on a shared machine hit every loss alike): build the model, optimizer and batch, ``--warmup``
untimed steps (the first allocates AdamW's state), then ``--steps`` timed steps. Reported: the median step over
all timed steps of all processes (and the best), train tokens/s = batch x grid^2 / median step, peak step memory =
peak RSS during the timed steps (VmHWM after ``/proc/self/clear_refs``) minus the RSS just before them (model,
AdamW state and batch already exist; the step's gradients, activations, logits and loss buffers count), and the
process's whole peak RSS. "other load": the CPU cores other processes kept busy on average while the loss's
processes ran (machine CPU time from /proc/stat minus the worker's own; the most of its processes), so a shared
machine shows in the table.

    python benchmarks/bench_generator_train.py                         # K in {16384, 65536, 262144}
    python benchmarks/bench_generator_train.py --k 65536 --reps 3 --losses ce-unfused snce
    python benchmarks/bench_generator_train.py --k 65536 --profile snce   # torch.profiler table of one step
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from measure import reset_peak_rss, rss_mib

LOSSES = ("ce-unfused", "ce", "snce", "snce-top32")


def build(a, k: int, loss_name: str):
    """Model, optimizer, batch and loss closure for one (K, loss): same weights and batch for every loss."""
    import torch
    import torch.nn.functional as F

    from snce.generators import build_generator
    from snce.generators.objectives import LossConfig, TokenLoss, generator_loss

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, k, (a.batch, a.grid, a.grid), generator=g)
    classes = torch.randint(0, a.classes, (a.batch,), generator=g)
    torch.manual_seed(0)
    model = build_generator(
        a.family, vocab_size=k, grid=(a.grid, a.grid), num_classes=a.classes, dim=a.dim,
        n_layers=a.layers, n_heads=a.heads,
    )  # fmt: skip
    if loss_name == "ce-unfused":

        def loss(hidden, head_weight, target, latents=None, weight=None):
            # The (tokens x K) logits, then CE (LlamaGen: F.cross_entropy(logits.view(-1, K), targets)).
            return F.cross_entropy(F.linear(hidden, head_weight), target)

    else:
        codebook = torch.randn(k, a.code_dim, generator=torch.Generator().manual_seed(2))
        spec = dict(kind="snce", tau=a.tau) if loss_name.startswith("snce") else dict(kind="ce")
        if loss_name == "snce-top32":
            spec["topk"] = 32
        loss = TokenLoss(LossConfig(**spec, memory_budget_mb=a.budget_mb), codebook, "l2")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step():
        opt.zero_grad(set_to_none=True)  # as snce.train.Trainer
        out = generator_loss(model, tokens, classes, loss)
        out.backward()
        opt.step()
        return out

    return model, step


def worker(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    k, loss_name = a.k[0], a.worker
    _, step = build(a, k, loss_name)
    for _ in range(a.warmup):
        step()
    setup_peak = rss_mib("VmHWM")  # setup and warm-up
    before = rss_mib()
    reset_peak_rss()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    peak = rss_mib("VmHWM")
    return {
        "times": times,
        "loss": float(loss),
        "state_mib": before,
        "step_peak_mib": max(0.0, peak - before),
        "process_peak_mib": max(setup_peak, peak),
    }


def profile(a) -> None:
    """torch.profiler table (self CPU time) of one timed step after the warm-up, in this process."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(a.threads)
    _, step = build(a, a.k[0], a.profile)
    for _ in range(max(1, a.warmup)):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"{a.profile}, K={a.k[0]}, {a.batch * a.grid**2} tokens, {a.threads} thread(s)\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def run_worker(a, k: int, loss_name: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", loss_name, "--k", str(k)]
    for name in ("family", "dim", "layers", "heads", "grid", "batch", "classes", "code_dim", "tau",
                 "budget_mb", "steps", "warmup", "threads"):  # fmt: skip
        cmd += [f"--{name.replace('_', '-')}", str(getattr(a, name))]
    return run_json(cmd)


def busy_cpu_s() -> float:
    """CPU seconds spent by the whole machine so far (all processes; Linux /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_json(cmd: list[str]) -> dict:
    """Run a worker; the JSON of its last stdout line plus ``others``: the CPU cores that other processes kept
    busy on average while it ran (machine CPU time minus the worker's, over the wall time)."""
    busy0, own0, t0 = busy_cpu_s(), os.times(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    busy1, own1, wall = busy_cpu_s(), os.times(), time.perf_counter() - t0
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        return {"error": f"exit {proc.returncode}: {tail[0]}"}
    child = own1.children_user + own1.children_system - own0.children_user - own0.children_system
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["others"] = max(0.0, (busy1 - busy0) - child) / wall
    return out


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--k", type=int, nargs="+", default=[16384, 65536, 262144], help="codebook sizes"
    )
    p.add_argument("--losses", nargs="+", default=["ce-unfused", "ce", "snce"], choices=LOSSES)
    p.add_argument(
        "--family", default="autoregressive", choices=["autoregressive", "masked_diffusion"]
    )
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument(
        "--grid", type=int, default=16, help="tokens per side (16: LlamaGen's 256-token images)"
    )
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--classes", type=int, default=1000, help="class labels (ImageNet: 1000)")
    p.add_argument(
        "--code-dim", type=int, default=8, help="codebook dimension D of the SNCE targets"
    )
    p.add_argument(
        "--tau", type=float, default=1.0, help="SNCE temperature (fixed: no suggest_tau search)"
    )
    p.add_argument(
        "--budget-mb", type=int, default=256, help="fused losses' block budget (LossConfig's)"
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per process")
    p.add_argument("--reps", type=int, default=1, help="fresh processes per loss (round-robin)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--profile", choices=LOSSES, help="print a torch.profiler table of one step instead"
    )
    p.add_argument("--worker", choices=LOSSES, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    if a.profile:
        profile(a)
        return

    import torch

    tokens = a.batch * a.grid**2
    print(
        f"{machine()}; torch {torch.__version__}, {a.threads} thread(s), fp32; {a.family}, width {a.dim}, "
        f"{a.layers} layers, {a.heads} heads, {a.grid}x{a.grid} tokens, batch {a.batch} = {tokens} tokens/step; "
        f"SNCE D={a.code_dim}, tau={a.tau}; fused block budget {a.budget_mb} MiB; {a.warmup} warm-up + "
        f"{a.steps} timed steps per process, {a.reps} process(es) per loss, round-robin; "
        f"load average at start {os.getloadavg()[0]:.2f}\n"
    )
    print(
        "| K | loss | median step s | best step s | train tokens/s | speed vs ce-unfused | "
        "peak step MiB | memory vs ce-unfused | process peak RSS MiB | other load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in a.k:
        runs = {name: [] for name in a.losses}
        for _ in range(a.reps):
            for name in a.losses:
                runs[name].append(run_worker(a, k, name))
        res = {}
        for name, rs in runs.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                res[name] = {"error": rs[0]["error"]}
                continue
            times = [t for r in ok for t in r["times"]]
            res[name] = {
                "median": statistics.median(times),
                "best": min(times),
                "step_mib": max(r["step_peak_mib"] for r in ok),
                "proc_mib": max(r["process_peak_mib"] for r in ok),
                "others": max(r["others"] for r in ok),
            }
        base = res.get("ce-unfused", {})
        for name in a.losses:
            r = res[name]
            if "error" in r:
                print(f"| {k:,} | {name} | {r['error']} | | | | | | | |", flush=True)
                continue
            speed = f"{base['median'] / r['median']:.2f}x" if "median" in base else "-"
            mem = f"{r['step_mib'] / base['step_mib']:.1%}" if "step_mib" in base else "-"
            print(
                f"| {k:,} | {name} | {r['median']:.2f} | {r['best']:.2f} | {tokens / r['median']:,.0f} | "
                f"{speed} | {r['step_mib']:,.0f} | {mem} | {r['proc_mib']:,.0f} | {r['others']:.2f} |",
                flush=True,
            )
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
