"""Codebook usage of the large-codebook quantizers on the toy task (MNIST at 16 px, the study's tokenizer).

Trains one tokenizer per (quantizer, seed) with the study's recipe (16-channel encoder, 4x4 tokens, 1,000
steps of batch 64, lr 2e-3) and measures, on the held-out test split, the fraction of the K codes used,
the perplexity of the code histogram and the PSNR. The quantizers:

- ``vq``: plain VQ as in taming's VQGAN (codebook learned by its loss, random init, no restarts);
- ``lc``: VQGAN-LC (frozen base = k-means centres of the encoder's latents, trained linear projection);
- ``ibq-d32`` / ``ibq-d256``: IBQ (dot-product assignment) with 32- and 256-dimensional codes.

    python benchmarks/codebook_usage.py                         # all four, seeds 0 and 1 (~25 min, 2 cores)
    python benchmarks/codebook_usage.py --only vq lc --seeds 0

Runs go to ``--out`` (default runs/codebook_usage); a finished run is reused, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

SETTINGS = {
    "vq": ({"kind": "vq", "codebook_size": 16384}, 8),
    "lc": ({"kind": "lc", "codebook_size": 16384}, 8),
    "ibq-d32": ({"kind": "ibq", "codebook_size": 4096}, 32),
    "ibq-d256": ({"kind": "ibq", "codebook_size": 4096}, 256),
}


def run(name: str, seed: int, out: Path, steps: int) -> dict:
    from snce.data import build_dataset
    from snce.tokenizer import Tokenizer, TokenizerRunConfig, evaluate_tokenizer, train_tokenizer

    quantizer, dim = SETTINGS[name]
    run_dir = out / f"{name}-seed{seed}"
    if (run_dir / "tokenizer" / "model.safetensors").is_file():
        tokenizer = Tokenizer.from_pretrained(run_dir / "tokenizer")
    else:
        cfg = TokenizerRunConfig.from_dict({
            "data": {"name": "mnist", "size": 16},
            "model": {"in_channels": 1, "channels": 16, "channel_mult": [1, 2, 2],
                      "latent_channels": dim, "quantizer": quantizer},
            "train": {"out_dir": str(run_dir), "steps": steps, "batch_size": 64, "lr": 2e-3,
                      "warmup_steps": 50, "seed": seed, "progress": False, "tensorboard": False,
                      "device": "cpu"},
        })  # fmt: skip
        cfg.check()
        tokenizer = train_tokenizer(cfg)
    test = build_dataset(tokenizer_data(), split="test")
    metrics = evaluate_tokenizer(tokenizer, test, device="cpu", progress=False)
    return {"setting": name, "seed": seed, "K": tokenizer.codebook_size, "D": dim, **metrics}


def tokenizer_data():
    from snce.data import DataConfig

    return DataConfig(name="mnist", size=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("runs/codebook_usage"))
    args = parser.parse_args()
    rows = [run(name, seed, args.out, args.steps) for name in args.only for seed in args.seeds]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{'setting':<10} {'K':>6} {'D':>4}  usage (per seed)        perplexity        PSNR dB")
    for name in args.only:
        mine = [r for r in rows if r["setting"] == name]
        usage = " ".join(f"{r['usage']:.3f}" for r in mine)
        print(
            f"{name:<10} {mine[0]['K']:>6} {mine[0]['D']:>4}  {usage:<22}"
            f"{statistics.mean(r['perplexity'] for r in mine):>10.0f}"
            f"{statistics.mean(r['psnr'] for r in mine):>15.2f}"
        )


if __name__ == "__main__":
    main()
