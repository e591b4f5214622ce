"""Generator throughput on CPU: training tokens/s and peak memory (CE vs SNCE, same run), sampling images/s.

For each codebook size K and family (autoregressive, masked diffusion) of the ``tiny`` preset, times full training
steps (forward, loss, backward, AdamW) for every loss round-robin, so load changes on a shared machine hit all
alike:

    ce-unfused   baseline: logits = hidden @ W.T (tokens x K), then F.cross_entropy
    ce           fused linear CE (snce.functional.fused_linear_cross_entropy): no (tokens x K) logits
    snce         fused linear SNCE, exact q over all K codes (code mode, z = e_y)
    snce-top32   fused linear SNCE, q from a NeighborTable of the 32 nearest codes

Peak memory: each (family, K, loss) step runs once more in a fresh subprocess; the figure is the kernel's peak
RSS during that step (``VmHWM``) minus the RSS just before it, after the model, its gradients and the optimizer
state exist (Linux, glibc). Then sampling is timed (AR with KV cache; masked diffusion with 8 steps), with and
without CFG.

    python benchmarks/bench_generators.py                      # K = 1024 and 16384, 8x8 tokens, batch 32
    python benchmarks/bench_generators.py --k 65536 --steps 2  # larger codebooks
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from measure import measure

from snce.generators import build_generator, sample
from snce.generators.objectives import LossConfig, TokenLoss, generator_loss

LOSSES = {
    "ce-unfused": None,
    "ce": dict(kind="ce"),
    "snce": dict(kind="snce"),
    "snce-top32": dict(kind="snce", topk=32),
}


def unfused_ce(hidden, head_weight, target, latents=None, weight=None):
    """The baseline: the full (tokens x K) logits, then cross-entropy."""
    return F.cross_entropy(hidden @ head_weight.T, target)


def make_step(family, k, grid, batch, loss_name, codebook, budget_mb):
    """A training-step closure (same initial weights and data for every loss), warmed up once."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, k, (batch, grid, grid), generator=g)
    classes = torch.randint(0, 10, (batch,), generator=g)
    torch.manual_seed(0)
    model = build_generator(family, "tiny", vocab_size=k, grid=(grid, grid), num_classes=10)
    spec = LOSSES[loss_name]
    loss = (
        unfused_ce
        if spec is None
        else TokenLoss(LossConfig(**spec, memory_budget_mb=budget_mb), codebook, "l2")
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(
            set_to_none=False
        )  # keep the gradient buffers: they are not part of a step's peak
        generator_loss(model, tokens, classes, loss).backward()
        opt.step()

    step()  # allocates gradients and optimizer state
    return step


def peak_step_memory(family, k, grid, batch, loss_name, budget_mb) -> float:
    """Run in a fresh process (``--memory``): peak RSS of one training step above the RSS before it, MiB."""
    codebook = torch.randn(k, 8, generator=torch.Generator().manual_seed(0))
    step = make_step(family, k, grid, batch, loss_name, codebook, budget_mb)
    return measure(step, reps=1, warmup=False)["peak_mib"]


def measure_memory(family, k, grid, batch, loss_name, threads, budget_mb) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--memory",
        family,
        str(k),
        str(grid),
        str(batch),
        loss_name,
        str(threads),
        str(budget_mb),
    ]
    # A fixed mmap threshold makes glibc return every large freed block at once, so memory freed by the warm-up
    # step is not reused silently and the high-water mark sees the step's real peak.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**16)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


@torch.no_grad()
def bench_sampling(family, k, grid, n, cfg_scale):
    torch.manual_seed(0)
    model = build_generator(family, "tiny", vocab_size=k, grid=(grid, grid), num_classes=10).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)
    classes = torch.arange(n) % 10
    kw = dict(cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(0))
    if family == "masked_diffusion":
        kw["steps"] = 8
    sample(model, classes[:2], **kw)  # warm-up
    t0 = time.perf_counter()
    sample(model, classes, **kw)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=[1024, 16384], help="codebook sizes")
    p.add_argument("--grid", type=int, default=8, help="tokens per side")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--steps", type=int, default=3, help="timed training steps per configuration (median)"
    )
    p.add_argument("--samples", type=int, default=16, help="images per sampling measurement")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--families", nargs="+", default=["autoregressive", "masked_diffusion"])
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    p.add_argument(
        "--budget-mb", type=int, default=64, help="fused losses' per-block buffer budget (MiB)"
    )
    p.add_argument("--memory", nargs=7, help=argparse.SUPPRESS)  # internal: one memory probe
    args = p.parse_args()
    if args.memory:
        family, k, grid, batch, loss_name, threads, budget = args.memory
        torch.set_num_threads(int(threads))
        print(
            json.dumps(
                peak_step_memory(family, int(k), int(grid), int(batch), loss_name, int(budget))
            )
        )
        return
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), fp32, tiny preset, {args.grid}x{args.grid} tokens, "
        f"batch {args.batch} ({args.batch * args.grid**2} tokens), median of {args.steps} steps, "
        f"fused-loss block budget {args.budget_mb} MiB\n"
    )
    print(
        "| family | K | loss | step (s) | train tokens/s | speed vs ce-unfused | peak step memory (MiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for k in args.k:
        codebook = torch.randn(k, 8, generator=torch.Generator().manual_seed(0))
        for family in args.families:
            steps = {
                name: make_step(family, k, args.grid, args.batch, name, codebook, args.budget_mb)
                for name in args.losses
            }
            times = {name: [] for name in steps}
            for _ in range(args.steps):
                for name, step in steps.items():
                    t0 = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - t0)
            del steps
            secs = {name: statistics.median(t) for name, t in times.items()}
            for name in args.losses:
                mem = measure_memory(
                    family, k, args.grid, args.batch, name, args.threads, args.budget_mb
                )
                tps = args.batch * args.grid**2 / secs[name]
                rel = f"{secs['ce-unfused'] / secs[name]:.2f}x" if "ce-unfused" in secs else "-"
                print(
                    f"| {family} | {k} | {name} | {secs[name]:.3f} | {tps:,.0f} | {rel} | {mem:.0f} |",
                    flush=True,
                )
    print("\n| family | K | CFG | sampling images/s |")
    print("|---|---|---|---|")
    for k in args.k:
        for family in args.families:
            for cfg_scale in (None, 2.0):
                ips = bench_sampling(family, k, args.grid, args.samples, cfg_scale)
                print(f"| {family} | {k} | {cfg_scale or 'off'} | {ips:.2f} |", flush=True)


if __name__ == "__main__":
    main()
