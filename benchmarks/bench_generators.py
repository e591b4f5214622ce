"""Generator throughput on CPU: training tokens/s and peak memory (CE vs SNCE), sampling time and memory (the
inverse-CDF sampler vs the Gumbel-max one it replaced), each in one run with its baseline.

For each codebook size K and family (autoregressive, masked diffusion) of the ``tiny`` preset, times full training
steps (forward, loss, backward, AdamW) for every loss round-robin, so load changes on a shared machine hit all
alike:

    ce-unfused   baseline: logits = hidden @ W.T (tokens x K), then F.cross_entropy
    ce           fused linear CE (snce.functional.fused_linear_cross_entropy): no (tokens x K) logits
    snce         fused linear SNCE, exact q over all K codes (code mode, z = e_y)
    snce-top32   fused linear SNCE, q from a NeighborTable of the 32 nearest codes

Peak memory: each (family, K, loss) step runs once more in a fresh subprocess; the figure is the kernel's peak
RSS during that step (``VmHWM``) minus the RSS just before it, after the model, its gradients and the optimizer
state exist (Linux, glibc).

Sampling: ``--samples`` images (2,000; the study's evaluation size) in batches of ``--sample-batch`` from a model of
the study's size (width 64, 3 layers, 4x4 tokens), AR with a KV cache and masked diffusion with 8 steps, by

    gumbel-max   baseline: the draw before this sampler, swapped in for ``sampling._draw``: the full (tokens x K)
                 logits, CFG as ``uncond + (cond - uncond) * s``, Gumbel-max over K uniforms per token (two logs
                 each), log p by a separate logsumexp
    inverse-cdf  ``snce.generators.sampling`` (two-level inverse CDF, one uniform per token, head and draw in row
                 blocks)

Seconds: all images, after a one-batch warm-up, in a fresh process per run (``--sample-reps`` runs, round-robin
over the samplers; the best is printed). Peak memory: one batch in another fresh process (after a 2-image warm-up,
glibc's mmap threshold at 64 KiB as for the training steps), peak RSS during it above the RSS before. Then the
draw alone: ``sample_logits`` against the baseline's ``gumbel_max_sample`` on ``--draw-rows`` rows of logits.

    python benchmarks/bench_generators.py                      # K = 1024 and 16384, 8x8 tokens, batch 32
    python benchmarks/bench_generators.py --k 65536 --steps 2  # larger codebooks
    python benchmarks/bench_generators.py --threads 1 --parts sampling draw --sample-reps 2 --cfg off 2.0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from measure import measure

from snce.generators import build_generator, sample, sampling
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


SAMPLERS = ("gumbel-max", "inverse-cdf")


def gumbel_max_sample(logits, *, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """The baseline ``sample_logits``: argmax(logits / T + Gumbel noise), log p by a separate logsumexp."""
    logits = sampling.filter_logits(logits.float() / temperature, top_k, top_p)
    u = torch.rand(logits.shape, device=logits.device, generator=generator).clamp_(1e-20, 1 - 1e-7)
    tokens = u.log_().neg_().log_().neg_().add_(logits).argmax(dim=-1)  # K uniforms, two logs each
    logp = logits.gather(-1, tokens[..., None])[..., 0] - logits.logsumexp(dim=-1)
    return tokens, logp


def gumbel_max_draw(model, hidden, cfg_scale, *, generator, **opts):
    """The baseline per-step draw: the full (tokens x K) logits, CFG, then ``gumbel_max_sample``."""
    logits = model.logits(hidden)  # (tokens or 2 x tokens, K)
    if cfg_scale is not None:
        cond, uncond = logits.chunk(2, dim=0)
        logits = uncond + (cond - uncond) * cfg_scale
    return gumbel_max_sample(logits, generator=generator, **opts)


@contextlib.contextmanager
def sampler(name):
    """Run the library's samplers with the given draw."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")
    saved = sampling._draw
    if name == "gumbel-max":
        sampling._draw = gumbel_max_draw
    try:
        yield
    finally:
        sampling._draw = saved


@torch.no_grad()
def sampling_worker(mode, family, k, name, cfg, threads, grid, dim, layers, heads, n, batch):
    """One fresh process (``--worker``). mode "time": seconds to sample n images in batches, after one batch
    of warm-up. mode "memory": peak RSS (MiB) above the RSS before sampling one batch, after a 2-image warm-up."""
    torch.set_num_threads(int(threads))
    k, grid, n, batch = int(k), int(grid), int(n), int(batch)
    cfg_scale = None if cfg == "off" else float(cfg)
    torch.manual_seed(0)
    model = build_generator(
        family, vocab_size=k, grid=(grid, grid), num_classes=10, dim=int(dim),
        n_layers=int(layers), n_heads=int(heads),
    ).eval()  # fmt: skip
    torch.nn.init.normal_(model.head.weight, std=0.02)
    classes = torch.arange(n) % 10
    kw = dict(cfg_scale=cfg_scale)
    if family == "masked_diffusion":
        kw["steps"] = 8

    def run(count):
        gen = torch.Generator().manual_seed(0)
        for start in range(0, count, batch):
            sample(model, classes[start : min(start + batch, count)], generator=gen, **kw)

    with sampler(name):
        if mode == "time":
            run(batch)  # warm-up
            return measure(lambda: run(n), reps=1, warmup=False)["best_s"]
        run(2)
        return measure(lambda: run(batch), reps=1, warmup=False)["peak_mib"]


def sampling_run(mode, *args):
    """``sampling_worker`` in a fresh process; memory probes run with glibc's mmap threshold at 64 KiB."""
    cmd = [sys.executable, __file__, "--worker", mode, *map(str, args)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**16)} if mode == "memory" else None
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=[1024, 16384], help="codebook sizes")
    p.add_argument("--grid", type=int, default=8, help="tokens per side")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--steps", type=int, default=3, help="timed training steps per configuration (median)"
    )
    p.add_argument("--samples", type=int, default=2000, help="images per sampling measurement")
    p.add_argument("--sample-batch", type=int, default=500, help="images per sampler call")
    p.add_argument(
        "--sample-grid", type=int, default=4, help="tokens per side of the sampled images"
    )
    p.add_argument(
        "--sample-model", type=int, nargs=3, default=[64, 3, 4], metavar=("DIM", "LAYERS", "HEADS"),
        help="size of the sampled model (default: the study's, width 64, 3 layers, 4 heads)",
    )  # fmt: skip
    p.add_argument(
        "--cfg", nargs="+", default=["off"], help="CFG scales to sample with ('off': none)"
    )
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument(
        "--sample-reps",
        type=int,
        default=1,
        help="fresh-process runs per sampler (round-robin; best)",
    )
    p.add_argument(
        "--parts", nargs="+", default=["training", "sampling", "draw"],
        choices=["training", "sampling", "draw"], help="which tables to measure",
    )  # fmt: skip
    p.add_argument("--draw-rows", type=int, default=8000, help="rows of logits for the draw table")
    p.add_argument("--draw-reps", type=int, default=3, help="calls per sampler for the draw table")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--families", nargs="+", default=["autoregressive", "masked_diffusion"])
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    p.add_argument(
        "--budget-mb", type=int, default=64, help="fused losses' per-block buffer budget (MiB)"
    )
    p.add_argument("--memory", nargs=7, help=argparse.SUPPRESS)  # internal: one memory probe
    p.add_argument("--worker", nargs=12, help=argparse.SUPPRESS)  # internal: one sampling probe
    args = p.parse_args()
    if args.worker:
        print(json.dumps(sampling_worker(*args.worker)))
        return
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
    if "training" in args.parts:
        bench_training(args)
    if "sampling" in args.parts:
        bench_sampling(args)
    if "draw" in args.parts:
        bench_draw(args)


def bench_training(args) -> None:
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
    print()


def bench_sampling(args) -> None:
    dim, layers, heads = args.sample_model
    g, n, batch = args.sample_grid, args.samples, args.sample_batch
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), fp32; sampling {n} images in batches of "
        f"{batch}, {g}x{g} tokens, width {dim}, {layers} layers, {heads} heads; AR with KV cache, "
        f"masked diffusion 8 steps; seconds: best of {args.sample_reps} fresh-process run(s); peak memory: "
        f"one batch in a fresh process\n"
    )
    print(
        "| family | K | CFG | sampler | seconds | images/s | speed vs gumbel-max | peak memory (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for k in args.k:
        for family in args.families:
            for cfg in args.cfg:
                spec = (family, k)
                rest = (cfg, args.threads, g, dim, layers, heads, n, batch)
                secs = {name: [] for name in args.samplers}
                for _ in range(args.sample_reps):  # round-robin: load changes hit both samplers
                    for name in args.samplers:
                        secs[name].append(sampling_run("time", *spec, name, *rest))
                best = {name: min(t) for name, t in secs.items()}
                for name in args.samplers:
                    mem = sampling_run("memory", *spec, name, *rest)
                    rel = f"{best['gumbel-max'] / best[name]:.1f}x" if "gumbel-max" in best else "-"
                    print(
                        f"| {family} | {k} | {cfg} | {name} | {best[name]:.2f} | {n / best[name]:,.0f} | "
                        f"{rel} | {mem:.0f} |",
                        flush=True,
                    )


def bench_draw(args) -> None:
    """Drawing alone: ``sample_logits`` on given (rows x K) logits, no model (median of round-robin reps)."""
    fns = {"gumbel-max": gumbel_max_sample, "inverse-cdf": sampling.sample_logits}
    print(
        f"\nDrawing alone: {args.draw_rows} rows of logits ~ N(0, 2^2), unfiltered, temperature 1, "
        f"{args.threads} thread(s), median of {args.draw_reps} round-robin calls after a warm-up\n"
    )
    print("| K | sampler | seconds | ns per logit | speed vs gumbel-max |")
    print("|---|---|---|---|---|")
    for k in args.k:
        x = torch.randn(args.draw_rows, k, generator=torch.Generator().manual_seed(0)) * 2.0
        gen = torch.Generator().manual_seed(0)
        times = {name: [] for name in fns}
        for fn in fns.values():
            fn(x, generator=gen)  # warm-up
        for _ in range(args.draw_reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x, generator=gen)
                times[name].append(time.perf_counter() - t0)
        secs = {name: statistics.median(t) for name, t in times.items()}
        for name in fns:
            print(
                f"| {k} | {name} | {secs[name]:.3f} | {secs[name] / x.numel() * 1e9:.2f} | "
                f"{secs['gumbel-max'] / secs[name]:.1f}x |",
                flush=True,
            )
    del x


if __name__ == "__main__":
    main()
