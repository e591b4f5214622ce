"""Layered configuration: typed dataclasses, filled from YAML, then from ``--set key.sub=value`` overrides.

Every configurable object in snce (tokenizer, generator, data, training loop, study) is a small dataclass
deriving from :class:`Config`. Sections nest (a field whose type is another ``Config``), and
``to_dict`` / ``from_dict`` round-trip through plain JSON/YAML types. Loading is strict, so a typo never
silently falls back to a default:

- an unknown key fails and lists the keys that exist there;
- a value of the wrong type fails and says what was expected (ints are accepted where floats are, and
  strings such as ``"1e-4"`` are read as floats, because YAML 1.1 parses them as strings);
- a section may add its own checks in :meth:`Config.check` (e.g. "data.path must exist").

Each failure is a :class:`ConfigError` naming the dotted key, raised before any work starts::

    cfg = load_config(TokenizerTrainConfig, "configs/tokenizer/digits_k1k.yaml",
                      ["train.lr=3e-4", "model.quantizer.codebook_size=4096"])

Fields typed ``dict`` are free-form (e.g. a quantizer's options, checked by whatever consumes them);
``--set`` may add keys inside them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type. ``key`` is the dotted name."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}" if key else message)
        self.message = message

    def __reduce__(self):  # rebuilt from (key, message), e.g. when raised in a worker process
        return type(self), (self.key, self.message)


class _Mismatch(Exception):
    """Internal: a value does not fit a type (carries what was expected)."""


@dataclasses.dataclass
class Config:
    """Base for snce configuration dataclasses: strict ``from_dict`` / plain ``to_dict`` / JSON files."""

    def check(self) -> None:
        """Semantic checks beyond types; raise ``ConfigError(field_name, message)``. Override as needed."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], *, prefix: str = "") -> C:
        """Build from a (possibly partial) dict; missing keys keep their defaults."""
        if not isinstance(data, dict):
            raise ConfigError(prefix.rstrip("."), f"expected a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for key in data:
            if key not in fields:
                raise ConfigError(
                    f"{prefix}{key}", f"unknown key; expected one of: {', '.join(sorted(fields))}"
                )
        values = {}
        for name, value in data.items():
            key = f"{prefix}{name}"
            try:
                values[name] = _coerce(value, hints[name], key)
            except _Mismatch as e:
                raise ConfigError(
                    key, f"expected {e}, got {type(value).__name__} {value!r}"
                ) from None
        missing = [
            n
            for n, f in fields.items()
            if n not in values
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"{prefix}{missing[0]}", "is required but was not given")
        obj = cls(**values)
        try:
            obj.check()
        except ConfigError as e:
            raise ConfigError(f"{prefix}{e.key}", str(e).split(": ", 1)[-1]) from None
        return obj

    def save_json(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls: type[C], path: str | os.PathLike) -> C:
        return cls.from_dict(json.loads(Path(path).read_text()))


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides=()) -> C:
    """YAML file (optional) -> apply ``key.sub=value`` overrides -> strictly validated ``cls`` instance."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("", f"config file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError("", f"config file {str(path)!r} must hold a mapping at the top level")
    for item in overrides:
        key, value = parse_override(item)
        apply_override(data, cls, key, value)
    return cls.from_dict(data)


def parse_override(item: str) -> tuple[str, str]:
    """``"a.b=1"`` -> ``("a.b", "1")``."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError("", f"override {item!r} must look like key.sub=value")
    return key.strip(), value


def apply_override(data: dict, cls: type, key: str, raw: str) -> None:
    """Set dotted ``key`` in the nested dict ``data`` to ``raw`` parsed for the field type found in ``cls``."""
    parts = key.split(".")
    node, tp = data, cls
    for i, part in enumerate(parts):
        where = ".".join(parts[: i + 1])
        default = None
        if _is_config(tp):
            hints = typing.get_type_hints(tp)
            fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
            if part not in fields:
                raise ConfigError(
                    where, f"unknown key; expected one of: {', '.join(sorted(fields))}"
                )
            f = fields[part]
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            tp = _config_in(hints[part]) or hints[part]
        elif _origin(tp) is dict or tp is dict:
            tp = Any
        else:
            raise ConfigError(
                where, f"'{'.'.join(parts[:i])}' is not a section, it holds a single value"
            )
        if i == len(parts) - 1:
            node[part] = _parse_value(raw, tp, where)
        else:
            child = node.get(part)
            if child is None:
                # A free-form dict section starts from its default, so one key can be changed alone.
                child = node[part] = dict(default) if isinstance(default, dict) else {}
            elif not isinstance(child, dict):
                raise ConfigError(where, f"expected a mapping, got {type(child).__name__}")
            node = child


def _parse_value(raw: str, tp, key: str):
    """Parse a CLI string with YAML; fall back to the raw string where the field takes strings."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    if tp is Any:
        return value
    try:
        _coerce(value, tp, key)
        return value
    except _Mismatch as e:
        try:
            _coerce(raw, tp, key)
            return raw
        except _Mismatch:
            raise ConfigError(key, f"expected {e}, got {raw!r}") from None


def _origin(tp):
    return typing.get_origin(tp)


def _is_config(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, Config)


def _config_in(tp):
    """The Config class inside ``tp`` (itself, or ``X | None``), else None."""
    if _is_config(tp):
        return tp
    if _origin(tp) in (Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if _is_config(a)]
        return found[0] if found else None
    return None


def _describe(tp) -> str:
    origin = _origin(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
        return f"a list of {_describe(args[0]) if args else 'values'}"
    if origin is dict or tp is dict:
        return "a mapping"
    if _is_config(tp):
        return f"a mapping (section {tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    """Return ``value`` converted to ``tp`` (lists -> tuples, ints -> floats, sections -> Config)."""
    origin = _origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch("null")
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except _Mismatch:
                pass
        raise _Mismatch(_describe(tp))
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise _Mismatch(_describe(tp))
    if _is_config(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _Mismatch(_describe(tp))
        return tp.from_dict(value, prefix=f"{key}.")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(_describe(tp))
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch(_describe(tp))
            items = [_coerce(v, a, key) for v, a in zip(value, args, strict=True)]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch("a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch("bool (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch("int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch("float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch("str")
    raise TypeError(f"config key '{key}': unsupported field type {tp!r}")


def _plain(value):
    """Config values -> JSON/YAML-safe Python objects."""
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
