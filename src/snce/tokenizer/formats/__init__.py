"""Import published tokenizer checkpoints as snce tokenizers: one module per checkpoint layout.

    tok = import_tokenizer("vq_ds16_c2i.pt", "llamagen")      # -> Tokenizer, in eval mode
    tok.save_pretrained("tokenizers/llamagen-vq16")             # then Tokenizer.from_pretrained(...)

A format names where the weights sit in the file (``nesting``), which keys are not the tokenizer
(``ignored``: losses, discriminators, EMA copies) and how each remaining key maps to snce's module names
and back (``to_snce`` / ``from_snce``: a bijection, so the weights round-trip). Its ``config`` reads the
architecture (widths, levels, attention, code dimension, codebook) from the weights' shapes, so no config
file is needed. Nothing else in snce knows a format: an imported tokenizer is an ordinary
:class:`~snce.tokenizer.Tokenizer` whose ``quantizer.codebook`` and ``quantizer.metric`` reproduce the
original's assignment, which is all that SNCE targets, ``suggest_tau`` and ``NeighborTable`` need.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from snce.tokenizer.model import Tokenizer, TokenizerConfig


class CheckpointKeyError(ValueError):
    """A checkpoint's keys do not fit the format (unknown, missing or misshapen keys)."""


@dataclass(frozen=True)
class Format:
    """How one published layout stores a tokenizer. Keys below are the original's, after unnesting.

    nesting: top-level entries that may hold the state dict, tried in order (none: a flat file).
    signature: regexes; a state dict with a key matching each looks like this format.
    ignored: regexes of keys that are not the tokenizer (losses, discriminators, EMA copies, usage counts).
    config: original state -> the architecture, read from shapes.
    to_snce / from_snce: original key <-> snce key (a bijection over the imported keys).
    ema_nesting: the top-level entry holding EMA weights under the plain names (``--ema``), or
    ema: a function from the original state to its EMA weights under the plain names.
    codebook_key: the key of a frozen codebook that may ship as a file of its own (``--codebook``).
    """

    name: str
    description: str
    nesting: tuple[str, ...]
    signature: tuple[str, ...]
    ignored: tuple[str, ...]
    config: Callable[[dict], TokenizerConfig]
    to_snce: Callable[[str, TokenizerConfig], str]
    from_snce: Callable[[str, TokenizerConfig], str]
    ema_nesting: str | None = None
    ema: Callable[[dict], dict] | None = None
    codebook_key: str | None = None


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


def read_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict:
    """The object stored in a ``.pt`` / ``.pth`` / ``.ckpt`` (torch.load) or ``.safetensors`` file.

    Pickled files load with ``weights_only=True`` (tensors and plain containers only); a file that needs
    more (e.g. a Lightning checkpoint that pickled its hyper-parameters) is refused unless
    ``trust_pickle``, since unpickling runs code from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=True)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise ValueError(f"{path} is not a readable torch checkpoint: {e}") from None
        raise ValueError(
            f"{path} holds pickled objects besides tensors ({str(e).splitlines()[0]}); if you trust the "
            f"file, pass --trust-pickle (trust_pickle=True) to unpickle it in full"
        ) from None
    except RuntimeError as e:  # not a zip/pickle file at all
        raise ValueError(f"{path} is not a readable torch checkpoint: {e}") from None


def state_dict_of(obj: Mapping, fmt: Format, *, ema: bool = False) -> dict[str, torch.Tensor]:
    """The original-named tensors of the tokenizer inside a loaded checkpoint, unnested and filtered."""
    if ema and fmt.ema_nesting is None and fmt.ema is None:
        raise ValueError(f"format {fmt.name!r} stores no EMA weights (drop --ema)")
    nesting = (fmt.ema_nesting,) if ema and fmt.ema_nesting else fmt.nesting
    state = obj
    for key in nesting:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    else:
        if ema and fmt.ema_nesting:
            found = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointKeyError(
                f"no EMA weights: no '{fmt.ema_nesting}' entry (found {found})"
            )
    if not isinstance(state, Mapping) or not any(torch.is_tensor(v) for v in state.values()):
        top = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointKeyError(
            f"no state dict found: expected tensors at the top level or under one of "
            f"{list(nesting)}, found {top}"
        )
    state = {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
    if ema and fmt.ema is not None:
        state = fmt.ema(state)
    elif fmt.ema is not None and any(k.startswith("model_ema.") for k in state):
        warnings.warn(
            "the file also holds EMA weights (model_ema.*), which published results use; "
            "pass --ema (ema=True) to import those",
            stacklevel=3,
        )
    ignored = [re.compile(p) for p in fmt.ignored]
    return {k: v for k, v in state.items() if not any(p.match(k) for p in ignored)}


def detect_formats(keys) -> list[str]:
    """Names of the formats whose signature the keys match (original names, after unnesting)."""
    keys = list(keys)
    return [
        name
        for name, fmt in FORMATS.items()
        if all(any(re.fullmatch(p, k) for k in keys) for p in fmt.signature)
    ]


def import_tokenizer(
    path: str | os.PathLike,
    format: str,
    *,
    ema: bool = False,
    codebook: str | os.PathLike | None = None,
    trust_pickle: bool = False,
) -> Tokenizer:
    """Read a published checkpoint in ``format`` (see ``FORMATS``) and return the snce Tokenizer (eval).

    ema: import the EMA weights the file holds. codebook: a file holding the format's frozen codebook
    tensor when the checkpoint lacks it (VQGAN-LC's ``codebook-100K.pth``; checked against the
    checkpoint's copy when both exist).
    """
    fmt = _format(format)
    obj = read_checkpoint(path, trust_pickle=trust_pickle)
    try:
        state = state_dict_of(obj, fmt, ema=ema)
        if codebook is not None:
            state = _with_codebook(state, fmt, codebook, trust_pickle)
        unmatched = [p for p in fmt.signature if not any(re.fullmatch(p, k) for k in state)]
        if unmatched:
            shown = ", ".join(p.replace("\\", "").replace("d+", "N") for p in unmatched)
            lacks_codebook = fmt.codebook_key and fmt.codebook_key not in state
            extra = (
                f" (is {fmt.codebook_key} in a separate --codebook file?)" if lacks_codebook else ""
            )
            raise CheckpointKeyError(f"no key like {shown}{extra}")
        tokenizer = tokenizer_from_state(state, fmt)
    except CheckpointKeyError as e:
        others = [name for name in detect_formats(_flat_keys(obj)) if name != fmt.name]
        hint = f"; its keys look like format {' or '.join(map(repr, others))}" if others else ""
        raise CheckpointKeyError(f"{path} as {fmt.name!r}: {e}{hint}") from None
    return tokenizer


def _with_codebook(state: dict, fmt: Format, path, trust_pickle: bool) -> dict:
    if fmt.codebook_key is None:
        raise ValueError(f"format {fmt.name!r} has no separate codebook file (drop --codebook)")
    table = read_checkpoint(path, trust_pickle=trust_pickle)
    if not torch.is_tensor(table) or table.dim() != 2:
        raise ValueError(
            f"{path} must hold one (K, D) tensor (the codebook), got {type(table).__name__}"
        )
    held = state.get(fmt.codebook_key)
    if held is not None and not torch.equal(held.float(), table.float()):
        raise ValueError(f"{path} differs from the checkpoint's own {fmt.codebook_key}")
    return {**state, fmt.codebook_key: table}


def tokenizer_from_state(state: dict[str, torch.Tensor], fmt: Format) -> Tokenizer:
    """Build the tokenizer a format's state dict describes and load the weights (strict, by shape)."""
    try:
        cfg = fmt.config(state)
    except KeyError as e:
        raise CheckpointKeyError(f"key {e} is missing (needed to read the architecture)") from None
    cfg.check()
    with torch.device("meta"):
        expected = Tokenizer(cfg).state_dict()
    renamed = {fmt.to_snce(k, cfg): k for k in state}
    if len(renamed) < len(state):
        clashes = sorted(k for k in state if renamed[fmt.to_snce(k, cfg)] != k)
        raise CheckpointKeyError(f"keys that map onto others' names: {', '.join(clashes[:6])}")
    unknown = sorted(orig for new, orig in renamed.items() if new not in expected)
    missing = sorted(fmt.from_snce(k, cfg) for k in expected if k not in renamed and _is_weight(k))
    misshapen = sorted(
        f"{orig} {tuple(state[orig].shape)} (expected {tuple(expected[new].shape)})"
        for new, orig in renamed.items()
        if new in expected and state[orig].shape != expected[new].shape
    )
    problems = [
        f"{label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''} ({len(items)} keys)"
        for label, items in (("unknown", unknown), ("missing", missing), ("wrong shape", misshapen))
        if items
    ]
    if problems:
        raise CheckpointKeyError("; ".join(problems))
    tokenizer = Tokenizer(cfg)
    weights = {new: state[orig].float() for new, orig in renamed.items()}
    tokenizer.load_state_dict(weights, strict=False)  # bookkeeping buffers keep their values, but
    if hasattr(tokenizer.quantizer, "initialized"):  # the codebook came from the file: no k-means
        tokenizer.quantizer.initialized.fill_(True)
    return tokenizer.eval()


def export_state(tokenizer: Tokenizer, format: str) -> dict[str, torch.Tensor]:
    """The tokenizer's weights under the original format's names (the inverse of the import)."""
    fmt = _format(format)
    return {
        fmt.from_snce(k, tokenizer.config): v
        for k, v in tokenizer.state_dict().items()
        if _is_weight(k)
    }


def encoder_levels(state: dict[str, torch.Tensor], blocks: str) -> dict:
    """``in_channels``, ``channels``, ``channel_mult`` and ``num_res_blocks`` of an encoder stored as
    ``encoder.conv_in`` + ``encoder.down.{level}.{blocks}.{j}`` (``blocks``: "block" in taming's and
    Open-MAGVIT2's layouts, "res_blocks" in MaskGIT's), read from the weights' shapes."""
    conv_in = state["encoder.conv_in.weight"]  # (channels, in_channels, 3, 3)
    channels = conv_in.shape[0]
    levels = count_indices(state, r"encoder\.down\.(\d+)\.")
    first = f"encoder.down.{{}}.{blocks}.0.conv1.weight"
    widths = [state[first.format(i)].shape[0] for i in range(levels)]
    if any(w % channels for w in widths):
        raise KeyError(f"{first.format('*')} (widths {widths} not multiples of {channels})")
    return {
        "in_channels": conv_in.shape[1],
        "channels": channels,
        "channel_mult": tuple(w // channels for w in widths),
        "num_res_blocks": count_indices(state, rf"encoder\.down\.0\.{blocks}\.(\d+)\."),
    }


def count_indices(state: dict, pattern: str) -> int:
    """1 + the largest index the pattern's group takes over the keys (0 if none matches)."""
    found = [int(m.group(1)) for k in state if (m := re.match(pattern, k))]
    return 1 + max(found) if found else 0


def _is_weight(snce_key: str) -> bool:
    """Keys a published checkpoint holds; snce's own bookkeeping buffers are not among them."""
    return not snce_key.endswith(("initialized", "cluster_size", "embed_avg"))


def _format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown tokenizer format {name!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[name]


def _flat_keys(obj) -> list[str]:
    """Every tensor key of a checkpoint, one level of nesting deep (for format detection)."""
    if not isinstance(obj, Mapping):
        return []
    keys = [k for k, v in obj.items() if torch.is_tensor(v)]
    for v in obj.values():
        if isinstance(v, Mapping):
            keys += [k.removeprefix("module.") for k, t in v.items() if torch.is_tensor(t)]
    return keys


# each module registers its format
from snce.tokenizer.formats import ibq, llamagen, maskgit, open_magvit2, taming, vqgan_lc  # noqa: E402,F401
