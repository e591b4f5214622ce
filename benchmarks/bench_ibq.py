"""CPU benchmark of IBQ's memory: chunked soft paths (recompute in backward) vs the dense released formulation.

One IBQuantizer forward + backward (index backprop, commitment/codebook terms and the entropy loss) per
process, ``chunked=True`` against ``chunked=False`` (which holds the (N, K) logits, softmax, one-hot and the
entropy softmaxes, like the released code). Reports best wall time over ``--reps`` (after a warm-up when
reps > 1) and peak extra memory = peak RSS during the runs minus RSS once inputs and model exist. Both must
give the same loss and gradients (compared through digests).

    python benchmarks/bench_ibq.py                      # K=262144, D=256, N=512 tokens (2 images of 16x16)
    python benchmarks/bench_ibq.py --k 16384 --n 4096 --reps 3

Peak memory uses Linux's ``/proc/self/clear_refs`` and ``VmHWM``.
"""

from __future__ import annotations

import argparse
import json

from measure import measure, run_worker

METHODS = {"dense (released formulation)": False, "chunked (snce)": True}


def worker(chunked: bool, n: int, k: int, d: int, reps: int, threads: int) -> dict:
    import torch

    from snce.quantize import IBQuantizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    q = IBQuantizer(d, k, chunked=chunked)
    z = (0.1 * torch.randn(1, n, d)).requires_grad_()
    w = torch.randn(1, n, d)

    def step():
        q.zero_grad(set_to_none=True)
        z.grad = None
        out = q(z)
        total = out.loss + (out.quantized * w).sum()  # a stand-in decoder gradient for z_q
        total.backward()
        return total.detach()

    if reps > 1:
        step()
    # gradient buffers exist before the measurement (both methods)
    q.embed.grad, z.grad = torch.zeros_like(q.embed), torch.zeros_like(z)
    m = measure(step, reps, warmup=False)
    loss = m.pop("result")
    return {
        **m,
        "loss": float(loss),
        "grad_z": float(z.grad.norm()),
        "grad_codebook": float(q.embed.grad.norm()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=512, help="tokens N")
    parser.add_argument("--d", type=int, default=256, help="dimension D")
    parser.add_argument("--k", type=int, default=262144, help="codebook size K")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=["dense", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(
            json.dumps(
                worker(args.worker == "chunked", args.n, args.k, args.d, args.reps, args.threads)
            )
        )
        return

    print(
        f"IBQ forward + backward, K={args.k:,}, D={args.d}, N={args.n}, fp32, {args.threads} threads\n"
    )
    print("| method | best s | peak extra MiB | loss | grad norm z | grad norm codebook |")
    print("|---|---|---|---|---|---|")
    results = []
    for label, chunked in METHODS.items():
        try:
            r = run_worker(__file__, "chunked" if chunked else "dense", "--n", args.n, "--d", args.d,
                           "--k", args.k, "--reps", args.reps, "--threads", args.threads)
        except RuntimeError as err:
            print(f"| {label} | failed ({err}) | | | | |")
            continue
        results.append(r)
        print(
            f"| {label} | {r['best_s']:.2f} | {r['peak_mib']:.0f} | {r['loss']:.6g} | {r['grad_z']:.6g} "
            f"| {r['grad_codebook']:.6g} |",
            flush=True,
        )
    if len(results) == 2:
        for key in ("loss", "grad_z", "grad_codebook"):
            a, b = results[0][key], results[1][key]
            if abs(a - b) > 1e-3 * max(abs(a), abs(b), 1e-12):
                raise SystemExit(f"{key} differs between dense ({a}) and chunked ({b})")


if __name__ == "__main__":
    main()
