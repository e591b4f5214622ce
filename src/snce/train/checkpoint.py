"""Atomic training checkpoints: one directory per step, published by ``os.replace``.

Layout of ``<out_dir>/checkpoints/``::

    step_0000500/
        model.safetensors     weights of the (unwrapped) model, buffers included
        ema.safetensors       EMA weights (only when EMA is on)
        config.json           the run's full configuration
        state.pt              step, optimizer state, RNG states of every rank
    latest                    text file naming the newest complete step directory

A directory is written under a temporary name and renamed when complete, then ``latest`` is replaced
atomically, so a run killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from snce.config import atomic_write_text

LATEST = "latest"


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory under ``out_dir``, or None."""
    pointer = checkpoint_root(out_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_root(out_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    state: dict,
    config: dict | None = None,
    ema: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``step_<step>/`` atomically, point ``latest`` at it, keep the newest ``keep`` checkpoints."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final = root / name
    if not final.is_dir():
        tmp = root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config or {}, indent=2) + "\n")
        torch.save(state, tmp / "state.pt")
        os.replace(tmp, final)
    atomic_write_text(root / LATEST, name + "\n")
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[: max(0, len(steps) - keep)]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module
) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Load weights into ``model``; return (state dict of state.pt, EMA tensors or None)."""
    path = Path(path)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    ema_file = path / "ema.safetensors"
    ema = load_file(str(ema_file)) if ema_file.is_file() else None
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True), ema


def rng_state() -> dict:
    """This process's RNG states (torch CPU, CUDA if present, Python's ``random``)."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
