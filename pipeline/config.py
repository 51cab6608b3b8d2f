"""Typed configs from YAML: load, override with dotted keys, validate, save.

Any dataclass can be built from a plain dict with `from_dict`: field types come from the
annotations (int, float, str, bool, Literal, X | None, list[X], dict[str, X], nested
dataclasses, Any). Every error names the source (file or `--set`) and the dotted key, so
a user can fix it without reading a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from eval.predictions import write_text_atomic
from pipeline.errors import ConfigError

T = TypeVar("T")

_MISSING = dataclasses.MISSING


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against annotation `tp` and convert it (nested dataclasses, int -> float)."""

    def fail() -> ConfigError:
        shown = repr(value) if not isinstance(value, dict) else "a mapping"
        return ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {type(value).__name__} {shown}")

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise fail()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except ConfigError:
                continue
        raise fail()
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise fail()
    if origin is list:
        if not isinstance(value, list | tuple):
            raise fail()
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise fail()
        return from_dict(tp, value, source=source, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail()


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and checking every type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'top level'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        name = str(raw_key)
        dotted = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{dotted}'{hint}")
        kwargs[name] = _convert(value, hints[name], dotted, source)
    for name, f in fields.items():
        if name not in kwargs and f.default is _MISSING and f.default_factory is _MISSING:
            dotted = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{source}: missing required key '{dotted}' ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{source}: {prefix or cls.__name__}: {err}") from None


def to_dict(obj: Any) -> Any:
    """A plain, YAML-safe dict of a (nested) dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 3e-4). The value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set train.max_steps=10")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item}: value is not valid YAML ({err.__class__.__name__})") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str], cls: type | None = None) -> dict[str, Any]:
    """Apply dotted overrides to a raw config dict (a copy). With `cls`, unknown keys fail here with `--set`."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        tp = cls
        for depth, part in enumerate(parts):
            if tp is not None and dataclasses.is_dataclass(tp):
                names = {f.name for f in dataclasses.fields(tp)}
                if part not in names:
                    dotted = ".".join(parts[: depth + 1])
                    close = difflib.get_close_matches(part, list(names), n=1)
                    hint = f" (did you mean '{'.'.join(parts[:depth] + [close[0]])}'?)" if close else ""
                    raise ConfigError(f"--set {item}: unknown key '{dotted}'{hint}")
                tp = _unwrap_optional(typing.get_type_hints(tp)[part])
            else:
                tp = None
            if depth == len(parts) - 1:
                node[part] = value
            else:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = {}
                    node[part] = child
                node = child
    return out


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: Path, overrides: list[str] | None = None) -> T:
    """Read YAML `path`, apply `--set` overrides, validate into `cls`."""
    raw = read_yaml(path)
    raw = apply_overrides(raw, overrides or [], cls)
    source = str(path) + (" (with --set overrides)" if overrides else "")
    return from_dict(cls, raw, source=source)


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config atomically (temp file, then rename). Every rank of a launch writes it
    before the ranks know each other, so each writes its own temp file: a shared one was moved away
    by one rank under the other (seen under torchrun)."""
    write_text_atomic(yaml.safe_dump(to_dict(cfg), sort_keys=False), Path(path))
