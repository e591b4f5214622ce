"""Generator throughput on CPU: training tokens/s (CE vs SNCE, same run) and sampling images/s.

For each codebook size K and family (autoregressive, masked diffusion) of the ``tiny`` preset, times full training
steps (forward, fused loss, backward, AdamW), round-robin, with the baseline hard CE next to SNCE (exact q over all K codes, and
top-k targets from a NeighborTable), and reports the peak resident memory of each step above the memory held
before it. Then times sampling (AR with KV cache; masked diffusion with 8 steps), with and without CFG.

    python benchmarks/bench_generators.py                      # K = 1024 and 16384, 8x8 tokens, batch 32
    python benchmarks/bench_generators.py --k 65536 --steps 2  # larger codebooks

Peak memory comes from the kernel's high-water mark (``VmHWM``), reset before every measurement
(``/proc/self/clear_refs``), so it needs Linux.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from snce.generators import build_generator, sample
from snce.generators.objectives import LossConfig, TokenLoss, generator_loss

LOSSES = {
    "ce": dict(kind="ce"),
    "snce": dict(kind="snce"),
    "snce-top32": dict(kind="snce", topk=32),
}


def rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter to the current RSS


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def training_setups(family, k, grid, batch, loss_names, codebook):
    """One (step function, model) per loss, same initial weights and data; each warmed up once."""
    tokens, classes = torch.randint(0, k, (batch, grid, grid)), torch.randint(0, 10, (batch,))
    setups = {}
    for name in loss_names:
        torch.manual_seed(0)
        model = build_generator(family, "tiny", vocab_size=k, grid=(grid, grid), num_classes=10)
        loss = TokenLoss(LossConfig(**LOSSES[name]), codebook, "l2")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, loss=loss, opt=opt):
            opt.zero_grad(set_to_none=True)
            generator_loss(model, tokens, classes, loss).backward()
            opt.step()

        step()  # warm-up: allocates optimizer state and gradients
        setups[name] = step
    return setups


def bench_training(setups, steps):
    """Median seconds per step of every setup, timed round-robin (so load changes hit all alike), and the peak
    RSS of one step of each above the RSS before it."""
    times = {name: [] for name in setups}
    for _ in range(steps):
        for name, step in setups.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    peaks = {}
    for name, step in setups.items():
        before = rss_mib("VmRSS")
        rss_reset()
        step()
        peaks[name] = rss_mib("VmHWM") - before
    return {name: statistics.median(t) for name, t in times.items()}, peaks


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
    p.add_argument("--steps", type=int, default=3, help="timed training steps per configuration (median)")
    p.add_argument("--samples", type=int, default=16, help="images per sampling measurement")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--families", nargs="+", default=["autoregressive", "masked_diffusion"])
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, tiny preset, {args.grid}x{args.grid} tokens, "
          f"batch {args.batch}, median of {args.steps} steps\n")
    print("| family | K | loss | step (s) | train tokens/s | vs CE | peak extra RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for k in args.k:
        codebook = torch.randn(k, 8)
        for family in args.families:
            setups = training_setups(family, k, args.grid, args.batch, args.losses, codebook)
            secs, peaks = bench_training(setups, args.steps)
            del setups
            for name in args.losses:
                tps = args.batch * args.grid**2 / secs[name]
                rel = f"{secs['ce'] / secs[name]:.2f}x" if "ce" in secs else "-"
                print(f"| {family} | {k} | {name} | {secs[name]:.3f} | {tps:,.0f} | {rel} | {peaks[name]:.0f} |",
                      flush=True)
    print("\n| family | K | CFG | sampling images/s |")
    print("|---|---|---|---|")
    for k in args.k:
        for family in args.families:
            for cfg_scale in (None, 2.0):
                ips = bench_sampling(family, k, args.grid, args.samples, cfg_scale)
                print(f"| {family} | {k} | {cfg_scale or 'off'} | {ips:.2f} |", flush=True)


if __name__ == "__main__":
    main()
