"""CPU benchmark of the SNCE loss against hard cross-entropy and naive dense SNCE.

Each (method, shape) runs in its own process: median / best fwd+bwd wall time over ``--reps`` runs after one
warm-up, and peak extra memory = peak RSS during the runs minus RSS once the inputs exist (gradients
included, for every method alike).

    python benchmarks/bench_loss.py                      # N=4096, H=256, K in {16384, 65536}, D in {8, 256}
    python benchmarks/bench_loss.py --k 65536 --d 256 --reps 5
"""

from __future__ import annotations

import argparse
import json

from measure import measure, run_worker

METHODS = {
    "linear + F.cross_entropy": "ce",
    "naive dense SNCE": "naive",
    "snce_loss (logits given)": "snce",
    "fused_linear_snce_loss": "fused",
}


def worker(method: str, n: int, h: int, k: int, d: int, reps: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from snce.functional import fused_linear_snce_loss, snce_loss
    from snce.losses.reference import snce_loss_reference

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(k, h, generator=g) / h**0.5).requires_grad_()
    codebook = torch.randn(k, d, generator=g)
    target = torch.randint(0, k, (n,), generator=g)
    latents = codebook[target] + 0.1 * torch.randn(n, d, generator=g)
    tau = 1.0
    opts = dict(codebook=codebook, latents=latents, tau=tau, metric="l2")

    def step():
        if method == "ce":
            loss = F.cross_entropy(F.linear(hidden, weight), target)
        elif method == "naive":
            loss = snce_loss_reference(F.linear(hidden, weight), target, **opts)
        elif method == "snce":
            loss = snce_loss(F.linear(hidden, weight), target, **opts)
        else:
            loss = fused_linear_snce_loss(hidden, weight, target, **opts)
        loss.backward()
        hidden.grad = weight.grad = None
        return loss

    m = measure(step, reps)
    return {"median_s": m["median_s"], "best_s": m["best_s"], "peak_extra_mib": m["peak_mib"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--h", type=int, default=256)
    p.add_argument("--k", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--d", type=int, nargs="+", default=[8, 256])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=list(METHODS.values()), choices=list(METHODS.values()))
    p.add_argument("--worker", choices=list(METHODS.values()), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.n, a.h, a.k[0], a.d[0], a.reps, a.threads)))
        return

    print(f"N={a.n}, H={a.h}, fp32, {a.threads} threads, fwd+bwd, {a.reps} reps after a warm-up\n")
    print("| K | D | method | median s | best s | peak extra MiB | time vs CE (best) | memory vs CE | memory vs naive |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in a.k:
        for d in a.d:
            res = {}
            for key in METHODS.values():
                if key in a.methods:
                    res[key] = run_worker(__file__, key, "--n", a.n, "--h", a.h, "--k", k, "--d", d, "--reps", a.reps,
                                          "--threads", a.threads)
            for name, key in METHODS.items():
                if key not in res:
                    continue
                r = res[key]
                ce, naive = res.get("ce"), res.get("naive")
                vs_ce_t = f"{r['best_s'] / ce['best_s']:.2f}x" if ce else "-"
                vs_ce_m = f"{r['peak_extra_mib'] / ce['peak_extra_mib']:.1%}" if ce else "-"
                vs_nv_m = f"{r['peak_extra_mib'] / naive['peak_extra_mib']:.1%}" if naive else "-"
                print(f"| {k} | {d} | {name} | {r['median_s']:.3f} | {r['best_s']:.3f} | "
                      f"{r['peak_extra_mib']:.0f} | {vs_ce_t} | {vs_ce_m} | {vs_nv_m} |", flush=True)


if __name__ == "__main__":
    main()
