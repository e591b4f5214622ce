"""Generator sampling throughput on CPU: autoregressive with the KV cache vs without, and masked diffusion by steps.

Samples ``--batch`` class-conditional images of ``--grid`` x ``--grid`` tokens from an untrained model (head
weights ~ N(0, 0.02^2), so the draws are not degenerate), fp32, through ``snce.generators.sample``:

    ar kv-cache    ``sample_autoregressive(use_cache=True)``: the prefix runs once, then one position per step
    ar no-cache    ``sample_autoregressive(use_cache=False)``: the library's own uncached path, each of the N steps
                   re-runs the transformer over the whole prefix (class token + tokens so far); the baseline
    masked T       ``sample_masked(steps=T)`` for each T in ``--steps``: T passes over all N positions, the head
                   and the draw at the still-masked ones (no cache: every pass sees different inputs)

Each (K, sampler) runs in its own fresh process (``--reps`` processes, round-robin over the samplers): a warm-up
on one image, then the timed call on the batch. tokens/s = batch x grid^2 / seconds; head rows per image: tokens drawn (the head and the draw run at each), counted
around the samplers' per-step draw. Peak memory: peak RSS during
the timed call above the RSS before it. For "ar no-cache" the script also reports the fraction of its tokens equal
to the cached run's (same seed, so the same uniforms: it differs only where float rounding of the two
computations moves a draw across a CDF boundary, and then the rest of that image differs). "other load": CPU cores
kept busy by other processes on average while the sampler's processes ran (see bench_generator_train.py).

    python benchmarks/bench_sampling.py                      # K in {16384, 262144}, 8 images of 16x16 tokens
    python benchmarks/bench_sampling.py --k 16384 --cfg 2.0 --steps 8 16 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from bench_generator_train import machine, run_json
from measure import reset_peak_rss, rss_mib


def sampler_names(a) -> list[str]:
    return ["ar kv-cache", "ar no-cache"] + [f"masked {t}" for t in a.steps]


def worker(a) -> dict:
    import torch

    from snce.generators import build_generator, sample, sampling

    torch.set_num_threads(a.threads)
    name, k = a.worker, a.k[0]
    family = "masked_diffusion" if name.startswith("masked") else "autoregressive"
    torch.manual_seed(0)
    model = build_generator(
        family, vocab_size=k, grid=(a.grid, a.grid), num_classes=a.classes, dim=a.dim,
        n_layers=a.layers, n_heads=a.heads,
    ).eval()  # fmt: skip
    torch.nn.init.normal_(model.head.weight, std=0.02)
    classes = torch.arange(a.batch) % a.classes
    kw = dict(cfg_scale=None if a.cfg == "off" else float(a.cfg))
    if family == "masked_diffusion":
        kw["steps"] = int(name.split()[1])
    else:
        kw["use_cache"] = name == "ar kv-cache"

    drawn = [0]  # tokens drawn (head rows per branch), counted around the samplers' per-step draw
    inner = sampling._draw

    def counting_draw(model, hidden, cfg_scale, **opts):
        tokens, logp = inner(model, hidden, cfg_scale, **opts)
        drawn[0] += tokens.numel()
        return tokens, logp

    sampling._draw = counting_draw

    def run(c):
        drawn[0] = 0
        return sample(model, c, generator=torch.Generator().manual_seed(0), **kw)

    run(classes[:1])  # warm-up
    before = rss_mib()
    reset_peak_rss()
    t0 = time.perf_counter()
    tokens = run(classes)
    secs = time.perf_counter() - t0
    return {
        "seconds": secs,
        "peak_mib": max(0.0, rss_mib("VmHWM") - before),
        "head_rows": drawn[0] / a.batch,
        "tokens": tokens.flatten().tolist(),
    }


def run_worker(a, k: int, name: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--k", str(k)]
    for opt in ("dim", "layers", "heads", "grid", "batch", "classes", "cfg", "threads"):
        cmd += [f"--{opt}", str(getattr(a, opt))]
    return run_json(cmd)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--k", type=int, nargs="+", default=[16384, 262144], help="codebook sizes")
    p.add_argument(
        "--steps", type=int, nargs="+", default=[8, 16, 32], help="masked-diffusion step counts"
    )
    p.add_argument("--samplers", nargs="+", help="subset of the sampler names (default: all)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--grid", type=int, default=16, help="tokens per side")
    p.add_argument("--batch", type=int, default=8, help="images per sampler call")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--cfg", default="off", help="CFG scale ('off': conditional branch only)")
    p.add_argument(
        "--reps", type=int, default=1, help="fresh processes per sampler (round-robin; median)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return

    import torch

    names = a.samplers or sampler_names(a)
    unknown = [n for n in names if n not in sampler_names(a)]
    if unknown:
        p.error(f"unknown sampler(s) {unknown}; expected some of {sampler_names(a)} (masked T for each --steps T)")
    n_tok = a.batch * a.grid**2
    print(
        f"{machine()}; torch {torch.__version__}, {a.threads} thread(s), fp32; width {a.dim}, {a.layers} layers, "
        f"{a.heads} heads, {a.grid}x{a.grid} tokens, batch {a.batch} = {n_tok} tokens, CFG {a.cfg}; "
        f"{a.reps} fresh process(es) per sampler, round-robin; load average at start {os.getloadavg()[0]:.2f}\n"
    )
    print(
        "| K | sampler | transformer passes | head rows per image | seconds | images/s | tokens/s | speed vs ar no-cache | "
        "peak MiB | tokens equal to kv-cache run | other load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k in a.k:
        runs = {name: [] for name in names}
        for _ in range(a.reps):
            for name in names:
                runs[name].append(run_worker(a, k, name))
        res = {}
        for name, rs in runs.items():
            ok = [r for r in rs if "error" not in r]
            res[name] = (
                {
                    "seconds": statistics.median(r["seconds"] for r in ok),
                    "peak": max(r["peak_mib"] for r in ok),
                    "tokens": ok[0]["tokens"],
                    "others": max(r["others"] for r in ok),
                    "head_rows": ok[0]["head_rows"],
                }
                if ok
                else rs[0]
            )
        base = res.get("ar no-cache", {})
        ref = res.get("ar kv-cache", {}).get("tokens")
        for name in names:
            r = res[name]
            if "error" in r:
                print(f"| {k:,} | {name} | {r['error']} | | | | | | | | |", flush=True)
                continue
            passes = a.grid**2 if name.startswith("ar") else int(name.split()[1])
            speed = f"{base['seconds'] / r['seconds']:.1f}x" if "seconds" in base else "-"
            equal = "-"
            if name == "ar no-cache" and ref is not None:
                same = sum(x == y for x, y in zip(r["tokens"], ref, strict=True))
                equal = f"{same / len(ref):.1%}"
            print(
                f"| {k:,} | {name} | {passes} | {r['head_rows']:,.0f} | {r['seconds']:.2f} | {a.batch / r['seconds']:.2f} | "
                f"{n_tok / r['seconds']:,.0f} | {speed} | {r['peak']:,.0f} | {equal} | {r['others']:.2f} |",
                flush=True,
            )
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
