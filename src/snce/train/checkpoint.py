"""Atomic training checkpoints: one directory per step, published by ``os.replace``.

Layout of ``<out_dir>/checkpoints/``::

    step_0000500/
        model.safetensors     weights of the (unwrapped) model, buffers included
        ema.safetensors       EMA weights (only when EMA is on)
        config.json           the run's full configuration
        state.pt              step, optimizer state, RNG states of every rank
        checksums.json        size and SHA-256 of each file above, as written
    latest                    text file naming the newest complete step directory
    unreadable-step_*/        checkpoints that failed to verify, set aside (never deleted)

A directory is written under a temporary name and renamed when complete, then ``latest`` is replaced
atomically, so a run killed at any moment leaves the previous checkpoint intact. Resuming takes the newest
checkpoint that verifies against its checksums; one that does not is reported, renamed ``unreadable-...``
(so that pruning never removes it) and skipped.

Every file holds full, unsharded tensors, whatever the run's parallelism: under FSDP the trainer gathers the
weights, the EMA and the optimizer state to rank 0 first (:func:`full_model_state`,
:func:`full_optimizer_state`), and a run resumes on any number of processes, sharded or not. The optimizer
state is stored keyed by parameter name (``torch.distributed.checkpoint.state_dict``'s full form, state.pt
``optimizer_format: "fqn"``); checkpoints from before that hold ``torch.optim``'s index-keyed form and are
converted on load (:func:`load_optimizer_state`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from snce.config import atomic_write_text
from snce.files import damage, record_checksums, verified

LATEST = "latest"
UNREADABLE = "unreadable-"


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``out_dir`` whose files verify, or None.

    Starts from the one ``latest`` names (or the newest ``step_*`` when ``latest`` is missing or names no
    folder); each one that does not verify is reported in a warning, renamed ``unreadable-<name>`` and
    skipped for the next older one.
    """
    root = checkpoint_root(out_dir)
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    pointer = root / LATEST
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    # ``latest`` normally names the newest; never skip past it to a newer one
    if named is not None and named in steps:
        steps = steps[steps.index(named) :]
    for path in steps:
        reason = damage(path)
        if reason is None:
            return path
        aside = path.with_name(UNREADABLE + path.name)
        for n in range(1, 1000):
            if not aside.exists():
                break
            aside = path.with_name(f"{UNREADABLE}{path.name}-{n}")
        os.replace(path, aside)
        warnings.warn(
            f"skipping checkpoint {path.name}: {reason}; kept as {aside.name}, trying the previous one",
            stacklevel=2,
        )
    return None


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model: nn.Module | dict[str, torch.Tensor],
    state: dict,
    config: dict | None = None,
    ema: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``step_<step>/`` atomically, point ``latest`` at it, keep the newest ``keep`` checkpoints.

    ``model``: the unwrapped module, or its full state dict (what :func:`full_model_state` gathers from a
    sharded model)."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final = root / name
    if not final.is_dir():
        tmp = root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if isinstance(model, nn.Module):
            save_model(model, str(tmp / "model.safetensors"))
        else:
            save_file({k: v.contiguous() for k, v in model.items()}, str(tmp / "model.safetensors"))
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config or {}, indent=2) + "\n")
        torch.save(state, tmp / "state.pt")
        record_checksums(tmp, [p.name for p in sorted(tmp.iterdir())])
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
    with verified(path / "model.safetensors") as weights:
        missing, unexpected = load_model(model, str(weights), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    ema = None
    if (path / "ema.safetensors").is_file():
        with verified(path / "ema.safetensors") as ema_file:
            ema = load_file(str(ema_file))
    with verified(path / "state.pt") as state_file:
        return torch.load(state_file, map_location="cpu", weights_only=True), ema


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


# ---------------------------------------------------------------- full (unsharded) state dicts

OPTIMIZER_FORMAT = "fqn"  # state.pt's optimizer: keyed by parameter name, full tensors


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # rank 0 receives the full tensors on the CPU, the other ranks an empty dict
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full weights and persistent buffers of a (possibly FSDP-sharded) model, on the CPU of rank 0.

    Collective under FSDP (every rank calls it; parameters are all-gathered one at a time); other ranks get {}.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name, with full tensors on the CPU of rank 0 (collective under
    FSDP; other ranks get {}). ``model`` is the module the optimizer's parameters belong to (not a DDP wrapper).
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_optimizer_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    names: list[str] | None = None,
    *,
    fmt: str | None = OPTIMIZER_FORMAT,
) -> None:
    """Load a full optimizer state into ``optimizer`` over ``model``'s (possibly sharded) parameters.

    Every rank passes the same full state; each keeps its shard. ``fmt=None`` marks ``torch.optim``'s
    index-keyed form (checkpoints written before names were stored): its indices are mapped to ``names``, the
    parameter names in the optimizer's order (all groups, in order).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if fmt is None:
        if names is None:
            raise ValueError("an index-keyed optimizer state needs the parameter names (names=...)")
        index = [i for group in state["param_groups"] for i in group["params"]]
        if len(index) != len(names):
            raise ValueError(
                f"the checkpoint's optimizer holds {len(index)} parameters, the model trains {len(names)}"
            )
        name_of = dict(zip(index, names, strict=True))
        state = {
            "state": {name_of[i]: v for i, v in state["state"].items()},
            "param_groups": [
                {**g, "params": [name_of[i] for i in g["params"]]} for g in state["param_groups"]
            ],
        }
    elif fmt != OPTIMIZER_FORMAT:
        raise ValueError(f"unknown optimizer state format {fmt!r}; expected {OPTIMIZER_FORMAT!r}")
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )
