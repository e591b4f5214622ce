"""The ``snce`` command.

Each command group is registered by one ``add_<group>_commands(subparsers)`` function listed in
``COMMAND_GROUPS``; its handlers take the parsed ``args`` and import what they need lazily, so
``snce --help`` stays fast. To add a group, write such a function and append it to ``COMMAND_GROUPS``.
Run settings live in config dataclasses (``--config FILE`` then ``--set key.sub=value``), not in flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from snce.config import ConfigError


def add_config_args(parser: argparse.ArgumentParser, *, config_required: bool = False) -> None:
    """``--config FILE`` (YAML) and repeatable ``--set key.sub=value`` overrides."""
    parser.add_argument("--config", required=config_required, help="YAML run configuration")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- tokenizer


def add_tokenizer_commands(sub) -> None:
    group = sub.add_parser("tokenizer", help="train and evaluate image tokenizers")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")

    train = actions.add_parser("train", help="train a tokenizer (single process or under torchrun)")
    add_config_args(train)
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    train.set_defaults(func=tokenizer_train)

    ev = actions.add_parser("eval", help="PSNR, SSIM and codebook usage of a trained tokenizer")
    ev.add_argument("tokenizer", help="tokenizer directory (e.g. <out_dir>/tokenizer)")
    _add_data_args(ev, default_split="test")
    ev.add_argument("--out", help="also write the numbers to this JSON file")
    ev.set_defaults(func=tokenizer_eval)

    tok = sub.add_parser(
        "tokenize", help="encode a dataset into token shards for generator training"
    )
    tok.add_argument("--tokenizer", required=True, help="tokenizer directory")
    tok.add_argument("--out", required=True, help="shard directory to create")
    _add_data_args(tok, default_split="train")
    tok.add_argument("--latents", action="store_true", help="also store the encoder latents (fp16)")
    tok.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    tok.set_defaults(func=tokenize)


def _add_data_args(parser: argparse.ArgumentParser, default_split: str) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
        help="change the data (default: what the tokenizer was trained on), e.g. --set data.path=DIR",
    )  # fmt: skip
    parser.add_argument("--split", default=default_split, choices=["train", "test", "all"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")


def tokenizer_train(args) -> int:
    from snce.config import load_config
    from snce.tokenizer import TokenizerRunConfig, evaluate_tokenizer, train_tokenizer

    cfg = load_config(TokenizerRunConfig, args.config, args.overrides)
    tokenizer = train_tokenizer(cfg, resume=args.resume)
    if tokenizer is not None:  # rank 0
        from snce.data import build_dataset

        metrics = evaluate_tokenizer(
            tokenizer,
            build_dataset(cfg.data, split="test"),
            device=cfg.train.device,
            progress=False,
        )
        print(
            f"tokenizer saved to {Path(cfg.train.out_dir) / 'tokenizer'}; test split: {_fmt(metrics)}"
        )
    return 0


def tokenizer_eval(args) -> int:
    from snce.data import build_dataset
    from snce.tokenizer import Tokenizer, evaluate_tokenizer, load_data_config

    data = load_data_config(args.tokenizer, args.overrides)  # config errors before loading weights
    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    metrics = evaluate_tokenizer(
        tokenizer,
        build_dataset(data, split=args.split),
        batch_size=args.batch_size,
        device=args.device,
    )
    print(json.dumps(metrics, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def tokenize(args) -> int:
    from snce.data import build_dataset
    from snce.tokenizer import Tokenizer, load_data_config, tokenize_dataset

    data = load_data_config(args.tokenizer, args.overrides)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    manifest = tokenize_dataset(
        tokenizer, build_dataset(data, split=args.split), args.out, data_config=data, latents=args.latents,
        batch_size=args.batch_size, device=args.device, overwrite=args.overwrite,
    )  # fmt: skip
    print(
        f"wrote {manifest.num_samples} token grids of {manifest.grid[0]}x{manifest.grid[1]} "
        f"(K={manifest.codebook_size}) to {args.out}"
    )
    return 0


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


# ------------------------------------------------------------------------------------------- entry

COMMAND_GROUPS = [add_tokenizer_commands]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snce", description="SNCE: discrete image generators over very large VQ codebooks"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMAND_GROUPS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileExistsError, FileNotFoundError) as e:
        print(f"snce: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
