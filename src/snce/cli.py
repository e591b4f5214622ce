"""The ``snce`` command.

Each command group is registered by one ``add_<group>_commands(subparsers)`` function listed in
``COMMAND_GROUPS``; its handlers take the parsed ``args`` and import what they need lazily, so
``snce --help`` stays fast. To add a group, write such a function and append it to ``COMMAND_GROUPS``.
Run settings live in config dataclasses (``--config FILE`` then ``--set key.sub=value``), not in flags.

Errors a user can cause (config, data, files, checkpoints: ``ValueError`` and its subclasses such as
``ConfigError``, missing or existing files) end the command with one line on stderr and exit code 2;
``--debug`` anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
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
    ev.add_argument("--rfid", action="store_true", help="also measure rFID (reconstructions vs images)")
    ev.add_argument(
        "--inception-weights",
        help="local FID Inception-v3 weights for --rfid (default: $SNCE_INCEPTION_WEIGHTS, else the "
        "built-in domain classifier trained on the data's train split)",
    )
    ev.add_argument("--cache-dir", default=".snce_cache", help="where the domain classifier is cached")
    ev.set_defaults(func=tokenizer_eval)

    imp = actions.add_parser(
        "import", help="turn a published checkpoint (LlamaGen, taming, IBQ, VQGAN-LC, MaskGIT, Open-MAGVIT2) into a tokenizer"
    )
    imp.add_argument("checkpoint", help="the published file (.pt / .pth / .ckpt / .safetensors)")
    imp.add_argument("--format", required=True, help="its layout: llamagen | taming | ibq | vqgan-lc | maskgit | open-magvit2")
    imp.add_argument("--out", required=True, help="tokenizer directory to create")
    imp.add_argument("--ema", action="store_true", help="import the EMA weights the file holds (ibq, llamagen, open-magvit2)")
    imp.add_argument("--codebook", help="vqgan-lc: the frozen code features file (codebook-100K.pth) if the checkpoint lacks them")
    imp.add_argument(
        "--trust-pickle", action="store_true",
        help="unpickle a file that holds more than tensors (runs code from the file: trusted files only)",
    )  # fmt: skip
    imp.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    imp.set_defaults(func=tokenizer_import)

    tok = sub.add_parser(
        "tokenize", help="encode a dataset into token shards for generator training"
    )
    tok.add_argument("--tokenizer", required=True, help="tokenizer directory")
    tok.add_argument("--out", required=True, help="shard directory to create")
    _add_data_args(tok, default_split="train")
    tok.add_argument("--latents", action="store_true", help="also store the encoder latents (fp16)")
    tok.add_argument(
        "--text-encoder", default=None, metavar="SPEC",
        help="embed the dataset's captions with this text encoder and store them: builtin | hf:DIR | "
        'a JSON spec such as \'{"kind": "builtin", "dim": 64}\'',
    )  # fmt: skip
    tok.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    tok.set_defaults(func=tokenize)


def _add_data_args(parser: argparse.ArgumentParser, default_split: str) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
        help="change the data (default: what the tokenizer was trained on), e.g. --set data.path=DIR",
    )  # fmt: skip
    parser.add_argument("--split", default=default_split, choices=["train", "val", "test", "all"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")


def tokenizer_train(args) -> int:
    from snce.config import load_config
    from snce.tokenizer import TokenizerRunConfig, evaluate_tokenizer, train_tokenizer
    from snce.train import cleanup_distributed

    cfg = load_config(TokenizerRunConfig, args.config, args.overrides)
    tokenizer = train_tokenizer(cfg, resume=args.resume)
    cleanup_distributed()
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
    feature_net = None
    if args.rfid:
        import torch

        from snce.metrics import feature_network

        train = build_dataset(data, split="train")
        images = torch.stack([train[i][0] for i in range(len(train))])
        labels = torch.tensor([train[i][1] for i in range(len(train))])
        feature_net, _ = feature_network(
            images, labels, dataset=data.kind, cache_dir=args.cache_dir,
            inception_weights=args.inception_weights,
        )  # fmt: skip
    metrics = evaluate_tokenizer(
        tokenizer, build_dataset(data, split=args.split), batch_size=args.batch_size, device=args.device,
        feature_net=feature_net,
    )  # fmt: skip
    print(json.dumps(metrics, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def tokenizer_import(args) -> int:
    from snce.tokenizer.formats import FORMATS, import_tokenizer

    out = Path(args.out)
    if args.format not in FORMATS:
        raise ValueError(f"unknown --format {args.format!r}; expected one of {sorted(FORMATS)}")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace the tokenizer there")
    tokenizer = import_tokenizer(
        args.checkpoint, args.format, ema=args.ema, codebook=args.codebook, trust_pickle=args.trust_pickle
    )
    tokenizer.save_pretrained(out)
    q = tokenizer.quantizer
    print(
        f"imported {args.format} tokenizer to {out}: {q.codebook_size} codes of dim {q.dim} "
        f"({q.metric}), downsampling {tokenizer.config.downsample}"
    )
    return 0


def tokenize(args) -> int:
    from snce.data import build_dataset
    from snce.tokenizer import Tokenizer, load_data_config, tokenize_dataset

    data = load_data_config(args.tokenizer, args.overrides)
    text_encoder = None
    if args.text_encoder is not None:
        from snce.text import build_text_encoder
        from snce.train.distributed import resolve_device

        text_encoder = build_text_encoder(args.text_encoder, device=resolve_device(args.device))
    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    manifest = tokenize_dataset(
        tokenizer, build_dataset(data, split=args.split), args.out, data_config=data, latents=args.latents,
        batch_size=args.batch_size, device=args.device, overwrite=args.overwrite, text_encoder=text_encoder,
    )  # fmt: skip
    print(
        f"wrote {manifest.num_samples} token grids of {manifest.grid[0]}x{manifest.grid[1]} "
        f"(K={manifest.codebook_size}) to {args.out}"
    )
    return 0


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


# ------------------------------------------------------------------------------------------- generators


def add_generator_commands(sub) -> None:
    group = sub.add_parser("generator", help="train autoregressive / masked-diffusion generators on token shards")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = actions.add_parser("train", help="train a generator with CE or SNCE (single process or torchrun)")
    add_config_args(train, config_required=True)
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    train.set_defaults(func=generator_train)

    smp = sub.add_parser(
        "sample",
        help="sample a trained generator, decode with its tokenizer: a PNG grid, or --out-dir DIR "
        "(one PNG per image + ADM .npz; resumable; torchrun splits it, same images on any ranks)",
    )
    smp.add_argument("--checkpoint", required=True, help="a run directory or its generator/ directory")
    smp.add_argument("--tokenizer", help="tokenizer directory (default: the one recorded at training time)")
    smp.add_argument("--classes", type=int, nargs="+", help="class ids to sample (default: every class)")
    smp.add_argument(
        "--prompt", action="append", default=[],
        help="text-to-image generators: a prompt (repeatable; --num samples each, one grid row per prompt)",
    )  # fmt: skip
    smp.add_argument("--num", type=int, help="number of samples (classes repeat to fill it)")
    smp.add_argument(
        "--per-class", type=int, metavar="N",
        help="with --out-dir: N images per class (--classes, default all); image i: class i // N",
    )  # fmt: skip
    smp.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the run's)")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--out", help="PNG grid to write")
    smp.add_argument(
        "--npz",
        help="also write tokens, labels and uint8 images (N, H, W, C) to this .npz; --out-dir: "
        "the ADM evaluator's .npz (arr_0 uint8 (N, H, W, 3), labels), default DIR/samples.npz",
    )
    smp.add_argument(
        "--out-dir", metavar="DIR",
        help="one lossless PNG per image (000000.png, ...), manifest.json, the npz; rerun: resume",
    )  # fmt: skip
    smp.add_argument(
        "--batch-size", type=int, default=64,
        help="images per forward; with --out-dir part of the result (one seed per global batch)",
    )  # fmt: skip
    smp.add_argument("--device", default="auto", help="auto | cpu | cuda")
    smp.add_argument(
        "--overwrite", action="store_true",
        help="replace existing --out / --npz; --out-dir: delete its PNGs, manifest, start over",
    )  # fmt: skip
    smp.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="sampling setting, e.g. --set temperature=0.9 --set top_k=100 --set steps=12",
    )  # fmt: skip
    smp.set_defaults(func=sample_command)

    edit = sub.add_parser("edit", help="edit an image with an instruction (a generator trained on edits)")
    edit.add_argument("--checkpoint", required=True, help="an editing generator's run directory")
    edit.add_argument("--image", required=True, help="the source image (any size: centre square, resized)")
    edit.add_argument("--instruction", required=True, help='e.g. "make the circle green"')
    edit.add_argument("--out", required=True, help="PNG of the edited image")
    edit.add_argument("--num", type=int, default=1, help="edits to draw (> 1: a grid beside the source)")
    edit.add_argument("--cfg", type=float, help="guidance on the instruction (default: the run's)")
    edit.add_argument("--tokenizer", help="tokenizer directory (default: the one recorded at training time)")
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--device", default="auto", help="auto | cpu | cuda")
    edit.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    edit.set_defaults(func=edit_command)


def generator_train(args) -> int:
    from snce.config import load_config
    from snce.train.generator import GeneratorRunConfig, train_generator

    cfg = load_config(GeneratorRunConfig, args.config, args.overrides)
    model = train_generator(cfg, resume=args.resume)
    if model is not None:
        print(f"generator ({model.num_params():,} parameters) saved to {Path(cfg.train.out_dir) / 'generator'}")
    return 0


def sample_command(args) -> int:
    import numpy as np
    import torch

    from snce.config import apply_override, parse_override
    from snce.train.distributed import cleanup_distributed, init_distributed, resolve_device
    from snce.train.generator import SampleConfig, load_for_sampling, sample_images
    from snce.train.images import save_image_grid

    if args.out_dir and args.out:
        raise ConfigError("", "--out (a grid) and --out-dir (one PNG per image): give one of them")
    if not (args.out or args.npz or args.out_dir):
        raise ConfigError("", "give --out grid.png and/or --npz samples.npz, or --out-dir DIR")
    if args.per_class is not None and not args.out_dir:
        raise ConfigError("", "--per-class needs --out-dir DIR (one PNG per image)")
    for path in () if args.out_dir else (args.out, args.npz):
        if path and Path(path).exists() and not args.overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    dist = init_distributed(args.device) if args.out_dir else None  # torchrun splits --out-dir jobs
    device = dist.device if dist else resolve_device(args.device)
    model, tokenizer, run = load_for_sampling(args.checkpoint, args.tokenizer, device)
    data = dict(run.get("sample", {}))
    if args.cfg is not None:
        data["cfg_scale"] = args.cfg
    for item in args.overrides:
        apply_override(data, SampleConfig, *parse_override(item))
    settings = SampleConfig.from_dict(data)
    n_cls = model.config.num_classes
    text_model = model.config.condition != "class"
    if settings.cfg_scale is not None and n_cls == 0 and not text_model:
        raise ValueError("--cfg needs a conditional generator; this one has num_classes=0")
    if model.config.condition == "edit":
        raise ValueError("this generator edits images: use snce edit --image IN --instruction TEXT")
    if (model.config.condition == "text") != bool(args.prompt):
        need = "needs --prompt TEXT" if text_model else "takes no --prompt (it is not a text model)"
        raise ValueError(f"this generator {need}")
    if args.out_dir:
        from snce.train.sample_job import sample_to_dir

        result = sample_to_dir(
            model, tokenizer, settings, args.out_dir, dist=dist, checkpoint=args.checkpoint,
            tokenizer_path=args.tokenizer or run.get("tokenizer", ""), classes=args.classes,
            per_class=args.per_class, num=args.num, seed=args.seed, batch_size=args.batch_size,
            npz=args.npz, overwrite=args.overwrite,
        )  # fmt: skip
        cleanup_distributed()
        if result is not None:  # rank 0
            print(result.summary())
        return 0
    classes = None
    if text_model:
        from snce.train.generator import text_condition

        per_prompt = args.num or 4
        classes = text_condition(run, [p for p in args.prompt for _ in range(per_prompt)])
    elif n_cls > 0:
        base = torch.tensor(args.classes) if args.classes else torch.arange(n_cls)
        model.check_classes(base)
        classes = base.repeat(-(-(args.num or len(base)) // len(base)))[: args.num or len(base)]
    elif args.classes:
        raise ValueError("--classes given, but the generator is unconditional (num_classes=0)")
    if args.out and tokenizer is None:
        raise ValueError("--out needs a tokenizer to decode the samples (--tokenizer DIR)")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    tokens, images = sample_images(
        model, tokenizer, classes, settings, num_samples=args.num or 16, batch_size=args.batch_size,
        generator=gen,
    )  # fmt: skip
    if args.out:
        nrow = (args.num or 4) if text_model else len(args.classes) if args.classes else None
        save_image_grid(images, args.out, nrow=nrow, scale=4)
        print(f"wrote {len(tokens)} samples to {args.out}")
    if args.npz:
        arrays = {"tokens": tokens.numpy().astype(np.int32)}
        if classes is not None and not text_model:
            arrays["labels"] = classes.numpy()
        if images is not None:
            pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            arrays["images"] = pixels.numpy()
        tmp = Path(args.npz).with_name(f".{Path(args.npz).name}.tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(args.npz)
        print(f"wrote {len(tokens)} samples to {args.npz}")
    return 0


def edit_command(args) -> int:
    import torch
    from PIL import Image

    from snce.data.images import load_square, to_channels
    from snce.train.distributed import resolve_device
    from snce.train.generator import SampleConfig, load_for_sampling, sample_images, text_condition
    from snce.train.images import image_grid, save_image_grid

    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    if not Path(args.image).is_file():
        raise FileNotFoundError(f"--image {args.image} does not exist")
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    device = resolve_device(args.device)
    model, tokenizer, run = load_for_sampling(args.checkpoint, args.tokenizer, device)
    if model.config.condition != "edit":
        raise ValueError(f"{args.checkpoint} is not an editing generator (condition: {model.config.condition})")
    if tokenizer is None:
        raise ValueError("the run records no tokenizer to encode the image with (--tokenizer DIR)")
    size = model.config.grid[0] * tokenizer.config.downsample
    with Image.open(args.image) as img:
        source = to_channels(load_square(img, size)[None], tokenizer.config.in_channels)
    source_tokens = tokenizer.encode(source.to(device)).indices.repeat(args.num, 1, 1)
    data = dict(run.get("sample", {}))
    if args.cfg is not None:
        data["cfg_scale"] = args.cfg
    condition = text_condition(run, [args.instruction] * args.num, source=source_tokens)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    _, images = sample_images(
        model, tokenizer, condition, SampleConfig.from_dict(data), generator=gen
    )
    if args.num == 1:  # the edited image itself, at the generator's resolution
        Image.fromarray(image_grid(images, nrow=1, padding=0)).save(args.out)
    else:
        save_image_grid(torch.cat([source.cpu(), images]), args.out, nrow=args.num + 1, scale=4)
    print(f"wrote {'the edit' if args.num == 1 else f'the source and {args.num} edits'} to {args.out}")
    return 0


# ------------------------------------------------------------------------------------------- study / eval


def add_study_commands(sub) -> None:
    study = sub.add_parser(
        "study", help="CE vs SNCE: tokenizers at several K, generators of each family, report + plots"
    )
    add_config_args(study, config_required=True)
    study.add_argument(
        "--quick", action="store_true", help="apply the config's quick: overrides (a few minutes)"
    )
    study.set_defaults(func=study_command)

    ev = sub.add_parser(
        "eval", help="FID/KID/IS/precision-recall/class consistency of a generator or of sample images",
        description="snce eval SAMPLES.npz --ref REF.npz: the ADM evaluator's FID, sFID, IS, precision and "
        "recall (the numbers papers report) with a protocol record; snce eval --make-ref FOLDER --out REF.npz: "
        "a reference batch in ADM's layout; --checkpoint / --samples: snce's metrics against a dataset.",
    )  # fmt: skip
    ev.add_argument("npz", nargs="?", metavar="SAMPLES.npz", help="samples in ADM's layout (arr_0 uint8 N x H x W x 3)")
    src = ev.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="generator run directory (or its generator/): sample, decode, measure")
    src.add_argument("--samples", help="an .npz from `snce sample --npz`, or a folder of images")
    src.add_argument("--make-ref", metavar="FOLDER", help="write a reference batch of these real images to --out")
    ev.add_argument("--ref", metavar="REF.npz", help="reference batch (arr_0 images and/or mu, sigma, mu_s, sigma_s)")
    ev.add_argument(
        "--resize", default="bilinear-antialias", choices=["bilinear-antialias", "tf-bilinear"],
        help="ADM protocol: how images reach 299 x 299 (tf-bilinear: the ADM graph's own)",
    )  # fmt: skip
    ev.add_argument("--size", type=int, default=256, help="--make-ref: image size (ADM's centre crop)")
    ev.add_argument("--batch-size", type=int, default=64, help="ADM protocol: images per Inception batch")
    ev.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
        help="the real data to compare with (default: the tokenizer's, else digits), e.g. --set data.path=DIR",
    )  # fmt: skip
    ev.add_argument("--num", type=int, default=1000, help="samples to draw from --checkpoint")
    ev.add_argument("--inception-weights", help="local FID Inception-v3 weights (or $SNCE_INCEPTION_WEIGHTS)")
    ev.add_argument("--cache-dir", help="where the built-in domain classifier is cached (default ~/.cache/snce)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ev.add_argument("--out", help="also write the numbers to this JSON file (--make-ref: the REF.npz to write)")
    ev.set_defaults(func=eval_command)


def study_command(args) -> int:
    import yaml

    from snce.study import load_study_config, run_study

    if Path(args.config).is_file() and "task" in (yaml.safe_load(Path(args.config).read_text()) or {}):
        from snce.config import load_config
        from snce.study.scenes import SceneStudyConfig, run_scene_study

        cfg = load_config(SceneStudyConfig, args.config, args.overrides)
        run_scene_study(cfg)
        out = Path(cfg.out_dir)
        print(f"report: {out / 'report.md'}; numbers: {out / 'results.json'}; figures: {out / 'plots'}")
        return 0
    cfg = load_study_config(args.config, args.overrides, quick=args.quick)
    results = run_study(cfg)
    if results is not None:  # rank 0
        out = Path(cfg.out_dir)
        print(f"report: {out / 'report.md'}; numbers: {out / 'results.json'}; figures: {out / 'plots'}")
    return 0


def eval_command(args) -> int:
    chosen = [n for n, v in (("SAMPLES.npz", args.npz), ("--checkpoint", args.checkpoint),
                             ("--samples", args.samples), ("--make-ref", args.make_ref)) if v]  # fmt: skip
    if len(chosen) != 1:
        raise ValueError(
            "snce eval takes one of SAMPLES.npz (with --ref), --checkpoint, --samples or --make-ref (with --out), "
            f"got {', '.join(chosen) or 'none'}"
        )
    if args.npz or args.make_ref:
        return _eval_adm(args)
    if args.ref:
        raise ValueError("--ref goes with SAMPLES.npz (the ADM protocol), not with --checkpoint or --samples")
    import torch

    from snce.metrics.samples import DEFAULT_CACHE, evaluate_samples, load_samples
    from snce.tokenizer import load_data_config

    cache = args.cache_dir or DEFAULT_CACHE
    if args.checkpoint:
        from snce.train.distributed import resolve_device
        from snce.train.generator import SampleConfig, load_for_sampling, sample_images

        device = resolve_device(args.device)
        model, tokenizer, run = load_for_sampling(args.checkpoint, None, device)
        if tokenizer is None:
            raise ValueError(f"{args.checkpoint} records no tokenizer to decode its samples")
        data = load_data_config(run["tokenizer"], args.overrides)
        n_cls = model.config.num_classes
        labels = torch.arange(args.num) % n_cls if n_cls else None
        gen = torch.Generator(device=device).manual_seed(args.seed)
        settings = SampleConfig.from_dict(run.get("sample", {}))
        tokens, images = sample_images(
            model, tokenizer, labels, settings, num_samples=args.num, batch_size=256, generator=gen
        )
        metrics = evaluate_samples(
            images, data, labels=labels, tokens=tokens, codebook_size=model.config.vocab_size,
            inception_weights=args.inception_weights, cache_dir=cache, seed=args.seed,
        )  # fmt: skip
    else:
        data = load_data_config(args.samples, args.overrides)  # defaults (digits) + --set data.*
        channels = data.image_channels
        images, extras = load_samples(args.samples, data.size, channels)
        metrics = evaluate_samples(
            images, data, labels=extras.get("labels"), inception_weights=args.inception_weights,
            cache_dir=cache, seed=args.seed,
        )  # fmt: skip
    print(json.dumps(metrics, indent=2))
    if args.out:
        from snce.config import atomic_write_text

        atomic_write_text(args.out, json.dumps(metrics, indent=2) + "\n")
    return 0


def _eval_adm(args) -> int:
    """``snce eval SAMPLES.npz --ref REF.npz`` and ``snce eval --make-ref FOLDER --out REF.npz``."""
    from snce.config import atomic_write_text
    from snce.metrics import adm
    from snce.train.distributed import resolve_device

    device = resolve_device(args.device)
    options = dict(inception_weights=args.inception_weights, resize=args.resize, batch_size=args.batch_size,
                   device=device)  # fmt: skip
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.make_ref:
        if not args.out:
            raise ValueError("--make-ref needs --out REF.npz, the reference batch to write")
        protocol = adm.make_reference(args.make_ref, args.out, size=args.size, **options)
        ref = protocol["reference"]
        print(f"wrote {args.out}: {ref['count']} images at {args.size} px, {ref['classes']} class(es), "
              f"mu/sigma and mu_s/sigma_s ({args.resize} resize to 299)")  # fmt: skip
        return 0
    if not args.ref:
        raise ValueError("SAMPLES.npz needs --ref REF.npz, the reference batch to compare with")
    result = adm.evaluate(args.npz, args.ref, **options)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return 0


# ------------------------------------------------------------------------------------------- entry

COMMAND_GROUPS = [add_tokenizer_commands, add_generator_commands, add_study_commands]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snce", description="SNCE: discrete image generators over very large VQ codebooks"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMAND_GROUPS:
        add(sub)
    return parser


# What a user can cause: bad config values (ConfigError), data, inputs that do not fit together, damaged files
# (all ValueError), and files that are missing, already there, or of the wrong kind.
USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    if not debug:
        warnings.formatwarning = _one_line_warning
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"snce: error: {_one_line(str(e))} (--debug shows where)", file=sys.stderr)
        return 2


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"snce: warning: {_one_line(str(message))}\n"


if __name__ == "__main__":
    sys.exit(main())
