"""GPU benchmark: Triton fused linear SNCE vs the torch SNCE paths and hard-label fused CE kernels.

One run measures, at N tokens, hidden size H, codebook sizes K and code dims D (bf16 by default):

    snce triton          snce.losses.kernels.fused_linear_snce_loss_triton: gemm backward (default), atomic
                         backward, atomic backward with gradient filtering
    snce torch chunked   snce.functional.fused_linear_snce_loss on the torch path
    snce naive           dense torch: logits, q and log-softmax as (N, K) float32 tensors (OOM is reported)
    ce torch             linear + F.cross_entropy (hard labels)
    ce liger             Liger-Kernel's fused linear cross-entropy, when installed
    ce cce               Cut Cross-Entropy (apple/ml-cross-entropy), when installed (its default filter_eps)

Each: median fwd+bwd time (gradients for hidden and head weight) and the peak memory above what was allocated
before the step (torch.cuda.max_memory_allocated), next to the FLOP limit (8*N*K*H + 4*N*K*D FLOPs at the
device's dense bf16 peak) and the fastest hard-CE time of the same run. Prints a markdown table.

    python benchmarks/bench_loss_gpu.py                       # the issue's grid: K 16384/262144, D 8/256
    python benchmarks/bench_loss_gpu.py --k 262144 --d 256 --sweep --only "snce triton"   # tile configs
    pip install --no-deps liger-kernel cut-cross-entropy      # the hard-CE baselines (optional)
"""

from __future__ import annotations

import argparse
import csv
import inspect
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

GiB = 2**30
DEVICE = "cuda"
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendor datasheets, matched in order.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("L40S", 362.1), ("A10G", 70.0))
SWEEP = (  # (block_n, block_k, block_h, num_warps, num_stages) tried with --sweep
    (64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 128, 32, 4, 4),
    (128, 128, 32, 8, 4), (64, 256, 64, 8, 3),
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8192, help="tokens")
    p.add_argument("--h", type=int, default=1024, help="hidden size")
    p.add_argument("--k", type=int, nargs="+", default=[16384, 262144], help="codebook sizes")
    p.add_argument("--d", type=int, nargs="+", default=[8, 256], help="code dimensions")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--metric", choices=["l2", "cosine", "dot"], default="l2")
    p.add_argument("--pretokenized", action="store_true", help="latents=None (z = codebook[target])")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions (Triton compiles here)")
    p.add_argument("--filter-eps", type=float, default=2.0**-12, help="threshold of the filtered kernel row")
    p.add_argument("--sweep", action="store_true", help="time several kernel tile configs (gemm backward)")
    p.add_argument("--only", nargs="+", default=None, help="run only methods whose name contains one of these")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak if the device is unknown")
    p.add_argument("--csv", default=None, help="append result rows to this CSV file")
    return p.parse_args()


def device_peak_tflops(name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    return next((tf for key, tf in BF16_PEAK_TFLOPS if key in name), None)


def measure(step, reps: int, warmup: int) -> tuple[float, float]:
    """(median ms, peak GiB above the memory allocated before the step) of ``step()``.

    Out of GPU memory, or a kernel tile config that needs more shared memory than the device has: (nan, nan).
    """
    from triton.runtime.errors import OutOfResources

    try:
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / GiB
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), peak
    except (torch.cuda.OutOfMemoryError, OutOfResources) as err:
        print(f"    skipped: {type(err).__name__}: {str(err)[:200]}")
        return float("nan"), float("nan")
    finally:
        torch.cuda.empty_cache()


def methods(args, x, w, target, codebook, latents, tau):
    """name -> fwd+bwd step. Every step returns the loss and the grads of hidden and head weight."""
    from snce.functional import fused_linear_snce_loss, neighbor_distribution
    from snce.losses.kernels import KernelConfig, fused_linear_snce_loss_triton

    kw = dict(codebook=codebook, latents=latents, tau=tau, metric=args.metric)
    torch_kw = {"impl": "torch"} if "impl" in inspect.signature(fused_linear_snce_loss).parameters else {}

    def grads(loss):
        return loss, *torch.autograd.grad(loss, (x, w))

    def kernel(config):
        return lambda: grads(fused_linear_snce_loss_triton(x, w, target, config=config, **kw))

    def naive():  # what a user would write: (N, K) float32 logits, q and log-probabilities
        logits = (x @ w.T).float()
        q = neighbor_distribution(codebook[target] if latents is None else latents, codebook, tau=tau,
                                  metric=args.metric)
        return grads(-(q * logits.log_softmax(dim=-1)).sum(-1).mean())

    steps = {}
    tiles = [{}]
    if args.sweep:
        tiles = [dict(block_n=bn, block_k=bk, block_h=bh, num_warps=nw, num_stages=ns) for bn, bk, bh, nw, ns in SWEEP]
    for t in tiles:
        tag = " [{block_n}x{block_k}x{block_h} w{num_warps} s{num_stages}]".format(**t) if t else ""
        steps["snce triton" + tag] = kernel(KernelConfig(**t))
    steps["snce triton, atomic bwd"] = kernel(KernelConfig(backward="atomic"))
    steps[f"snce triton, atomic bwd, filter_eps={args.filter_eps:.1e}"] = kernel(
        KernelConfig(backward="atomic", filter_eps=args.filter_eps)
    )
    steps["snce torch chunked"] = lambda: grads(fused_linear_snce_loss(x, w, target, **kw, **torch_kw))
    steps["snce naive"] = naive
    steps["ce torch"] = lambda: grads(F.cross_entropy((x @ w.T).float(), target))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        steps["ce liger"] = lambda: grads(liger(w, x, target))
    except ImportError:
        print("Liger-Kernel not installed: skipping its fused linear CE (pip install --no-deps liger-kernel)")
    try:
        from cut_cross_entropy import linear_cross_entropy

        steps["ce cce"] = lambda: grads(linear_cross_entropy(x, w, target))
    except ImportError:
        print("Cut Cross-Entropy not installed: skipping it (pip install --no-deps cut-cross-entropy)")
    keep = [label for label in steps if args.only is None or any(o in label for o in args.only)]
    return {label: steps[label] for label in keep}


def agreement(steps) -> str:
    """Relative difference of loss and grads: exact kernel vs the torch chunked path (same inputs)."""
    ours = next((v for k, v in steps.items() if k.startswith("snce triton") and "filter" not in k), None)
    ref = steps.get("snce torch chunked")
    if ours is None or ref is None:
        return "not measured (--only left out the kernel or the torch path)"
    ours, ref = ours(), ref()
    err = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(ours, ref, strict=True)]
    return f"loss {err[0]:.1e}, grad hidden {err[1]:.1e}, grad weight {err[2]:.1e}"


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_loss_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "the CPU loss benchmark is benchmarks/bench_loss.py")
    import triton  # noqa: F401  (fail early with the real error if Triton is missing)

    from snce.functional import suggest_tau

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    name = torch.cuda.get_device_name()
    peak = device_peak_tflops(name, args.peak_tflops)
    torch.manual_seed(0)
    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}; N={args.n}, H={args.h}, "
          f"{args.dtype}, metric={args.metric}, latents={'None' if args.pretokenized else 'given'}; "
          f"median of {args.reps}")
    rows = []
    for k in args.k:
        for d in args.d:
            x = torch.randn(args.n, args.h, device=DEVICE, dtype=dtype).requires_grad_()
            w = (torch.randn(k, args.h, device=DEVICE) / args.h**0.5).to(dtype).requires_grad_()
            target = torch.randint(0, k, (args.n,), device=DEVICE)
            codebook = torch.randn(k, d, device=DEVICE).to(dtype)
            latents = None if args.pretokenized else codebook[target] + 0.1 * torch.randn_like(codebook[target])
            tau = suggest_tau(codebook.float(), args.metric, None if latents is None else latents.float())
            flops = 8 * args.n * k * args.h + 4 * args.n * k * d
            limit_ms = flops / (peak * 1e12) * 1e3 if peak else float("nan")
            steps = methods(args, x, w, target, codebook, latents, tau)
            results = {}
            for label, step in steps.items():
                t0 = time.perf_counter()
                results[label] = measure(step, args.reps, args.warmup)
                print(f"  K={k} D={d} {label}: {results[label][0]:.2f} ms, {results[label][1]:.3f} GiB "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            agree = agreement(steps)
            ce_times = [t for label, (t, _) in results.items() if label.startswith("ce ") and t == t]
            best_ce = min(ce_times) if ce_times else float("nan")
            for label, (ms, mem) in results.items():
                rows.append(dict(device=name, K=k, D=d, method=label, ms=ms, peak_gib=mem, vs_best_ce=ms / best_ce,
                                 vs_flop_limit=ms / limit_ms, flop_limit_ms=limit_ms, tau=tau, agreement=agree))
            del x, w, target, codebook, latents, steps
            torch.cuda.empty_cache()

    print(f"\n### {name} (N={args.n}, H={args.h}, {args.dtype}, metric {args.metric})\n")
    print("| K | D | method | fwd+bwd ms | x fastest hard CE | x FLOP limit (ms) | peak extra GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']:,} | {r['D']} | {r['method']} | {r['ms']:.2f} | {r['vs_best_ce']:.2f} | "
              f"{r['vs_flop_limit']:.2f} ({r['flop_limit_ms']:.2f}) | {r['peak_gib']:.3f} |")
    for k in args.k:
        for d in args.d:
            agree = next(r["agreement"] for r in rows if r["K"] == k and r["D"] == d)
            print(f"\nK={k}, D={d}: kernel vs torch chunked: {agree}")
    if args.csv:
        write_csv(args.csv, rows)


def write_csv(path: str, rows: list[dict]) -> None:
    import triton

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    extra = dict(torch=torch.__version__, triton=triton.__version__, commit=commit)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], *extra])
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**r, **extra})


if __name__ == "__main__":
    main()
