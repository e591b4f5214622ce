"""CPU benchmark of the chunked nearest-code search against cdist + argmin.

Each (method, K) runs in its own process: best / median wall time over ``--reps`` runs after one warm-up
(none with ``--reps 1``), and peak extra memory = peak RSS during the runs minus RSS once the inputs exist.
Both methods must return the same indices (checked by a digest of the index tensor).

    python benchmarks/bench_search.py                         # N=4096, D=256, K in {16384, 262144}
    python benchmarks/bench_search.py --k 65536 --reps 5 --threads 2

Peak memory uses Linux's ``/proc/self/clear_refs`` and ``VmHWM``.
"""

from __future__ import annotations

import argparse
import json

from measure import measure, run_worker

METHODS = {"cdist + argmin": "cdist", "nearest_codes (chunked)": "chunked"}


def worker(method: str, n: int, k: int, d: int, reps: int, threads: int) -> dict:
    import torch

    from snce.quantize import nearest_codes

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)

    def run():
        if method == "cdist":
            return torch.cdist(z, codebook).argmin(dim=1)  # (N, K) float32 distances
        return nearest_codes(z, codebook, "l2")[1][:, 0]

    m = measure(run, reps, warmup=reps > 1)
    idx = m.pop("result")
    return {
        **m,
        "digest": int((idx * torch.arange(1, n + 1)).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=4096, help="latents N")
    parser.add_argument("--d", type=int, default=256, help="dimension D")
    parser.add_argument(
        "--k", type=int, nargs="+", default=[16384, 262144], help="codebook sizes K"
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, k = args.worker
        print(json.dumps(worker(method, args.n, int(k), args.d, args.reps, args.threads)))
        return

    print(f"N={args.n}, D={args.d}, fp32, {args.threads} threads, reps={args.reps}\n")
    print("| K | method | best s | median s | peak extra MiB |")
    print("|---|---|---|---|---|")
    for k in args.k:
        digests = set()
        for label, method in METHODS.items():
            try:
                r = run_worker(__file__, method, k, "--n", args.n, "--d", args.d, "--reps", args.reps,
                               "--threads", args.threads)
            except RuntimeError as err:
                print(f"| {k:,} | {label} | failed ({err}) | | |")
                continue
            digests.add(r["digest"])
            print(
                f"| {k:,} | {label} | {r['best_s']:.2f} | {r['median_s']:.2f} | {r['peak_mib']:.0f} |",
                flush=True,
            )
        if len(digests) > 1:
            raise SystemExit(f"K={k}: the methods returned different indices")


if __name__ == "__main__":
    main()
