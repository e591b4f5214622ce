"""Files a run writes and reads back: a checksum record beside them, and reads that name the damaged file.

Every directory of weights snce writes (a checkpoint ``step_*/``, a saved tokenizer or generator) holds
``checksums.json``: for each file its size in bytes and SHA-256, recorded from the file as written. Reads go
through :func:`verified`, which checks the record (a truncated or overwritten file is caught before it is
deserialised) and turns any failure to decode into :class:`DamagedFileError`, one line that names the file.
Files without a record (written by other tools, or before records existed) are read unchecked.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from pathlib import Path

from snce.config import atomic_write_text

CHECKSUMS = "checksums.json"


class DamagedFileError(ValueError):
    """A file snce needs is missing, truncated, altered or cannot be decoded; the message names it."""


def sha256(path: Path) -> str:
    """SHA-256 of a file, hashed once per version of it in this process: finding the checkpoint to resume
    from and then loading it read the same files, which may be gigabytes."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int, chunk: int = 1 << 22) -> str:
    """(size and mtime_ns key the cache: a file rewritten or truncated is hashed again; only a same-size rewrite
    within one tick of a coarse filesystem clock, in the same process, would go unseen.)"""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def record_checksums(directory: str | os.PathLike, names: list[str]) -> None:
    """Add the size and SHA-256 of ``directory/name`` for each name to the directory's record (atomically)."""
    directory = Path(directory)
    record = _read_record(directory) or {}
    for name in names:
        path = directory / name
        record[name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    atomic_write_text(directory / CHECKSUMS, json.dumps(record, indent=2, sort_keys=True) + "\n")


def check_file(path: str | os.PathLike) -> None:
    """Raise :class:`DamagedFileError` if ``path`` is missing or differs from its directory's record."""
    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(f"{path} is missing")
    entry = (_read_record(path.parent) or {}).get(path.name)
    if entry is None:
        return
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise DamagedFileError(
            f"{path} is damaged: {size} bytes, {entry['bytes']} were written (truncated or overwritten)"
        )
    if sha256(path) != entry["sha256"]:
        raise DamagedFileError(
            f"{path} is damaged: its SHA-256 differs from the one recorded when written"
        )


def damage(directory: str | os.PathLike) -> str | None:
    """Why the files listed in ``directory``'s record do not verify, or None when they all do."""
    record = _read_record(Path(directory))
    for name in record or {}:
        try:
            check_file(Path(directory) / name)
        except DamagedFileError as e:
            return str(e)
    return None


@contextlib.contextmanager
def verified(path: str | os.PathLike):
    """Check ``path`` against its record, then run the block that reads it; any error decoding it becomes a
    :class:`DamagedFileError` naming the file (what went wrong inside is kept in the message)."""
    check_file(path)
    try:
        yield Path(path)
    except DamagedFileError:
        raise
    except Exception as e:  # safetensors, pickle and zip raise many types for bad bytes
        raise DamagedFileError(f"{path} could not be read ({type(e).__name__}: {e})") from e


def _read_record(directory: Path) -> dict | None:
    path = directory / CHECKSUMS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DamagedFileError(f"{path} could not be read ({e})") from e
