"""Typed configs: dataclasses, filled from YAML, overridden from the command line, saved beside a run.

A run's config is a dataclass tree with defaults. ``load_config(Cls, path, ["model.size=base", ...])`` starts
from the defaults, applies the YAML file, then each ``dotted.key=value`` override (the value is read as YAML,
so ``lr=1e-4``, ``flag=false`` and ``sizes=[1,2]`` work), and checks every key and type on the way: an unknown
key or a value of the wrong type is a one-line ``ConfigError`` naming the key, the source and the fix.

A field may also declare the values it accepts, next to its default, so that they are checked as the config is
read (before any model or framework is loaded)::

    keep_checkpoints: int = field(default=2, metadata=at_least(1, "the newest checkpoints kept"))
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from medvlp.errors import ConfigError

T = TypeVar("T")


# -- declared value ranges ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """A test a field's value must pass (``None`` always passes), and what the value must be, for the message."""

    test: Callable[[Any], bool]
    need: str


def check(test: Callable[[Any], bool], need: str) -> dict[str, Check]:
    """Field metadata declaring the accepted values: ``field(default=..., metadata=check(test, "must be ..."))``."""
    return {"check": Check(test, need)}


def _why(why: str) -> str:
    return f" ({why})" if why else ""


def at_least(low: float, why: str = "") -> dict[str, Check]:
    """A number ``>= low``."""
    return check(lambda v: v >= low, f"must be at least {low}{_why(why)}")


def within(low: float, high: float, why: str = "") -> dict[str, Check]:
    """A number in ``[low, high]``."""
    return check(lambda v: low <= v <= high, f"must be between {low} and {high}{_why(why)}")


def one_of(*choices: Any, why: str = "") -> dict[str, Check]:
    """One of a fixed set of values."""
    return check(lambda v: v in choices, f"must be one of {', '.join(map(str, choices))}{_why(why)}")


def not_empty(why: str = "") -> dict[str, Check]:
    """A text or path that is not empty."""
    return check(lambda v: bool(str(v).strip()), f"must not be empty{_why(why)}")


def _check_value(field: dataclasses.Field, value: Any, where: str) -> None:
    rule = field.metadata.get("check")
    if rule is not None and value is not None and not rule.test(value):
        raise ConfigError(f"{where} = {value!r} {rule.need}")


def _known(cls: type, key: str, where: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(fields)}"
        raise ConfigError(f"{where}: unknown config key {key!r}; {hint}")
    return fields[key]


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint (and convert where the conversion loses nothing)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {hint.__name__} keys, got {value!r}")
        return merge(hint(), value, where.partition(": ")[0], where.partition(": ")[2])
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected a whole number, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no point) as text
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected text, got {value!r}")
    if hint is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    return value


def merge(config: T, values: dict[str, Any], where: str = "config", prefix: str = "") -> T:
    """A copy of ``config`` with ``values`` (a nested mapping) applied and type-checked; errors name the
    source (``where``) and the dotted key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: {prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(config))
    changes = {}
    for key, value in values.items():
        field = _known(type(config), str(key), f"{where}: {prefix}" if prefix else where)
        label = f"{prefix}.{key}" if prefix else str(key)
        current = getattr(config, field.name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[field.name] = merge(current, value, where, label)
        else:
            changes[field.name] = _coerce(value, hints[field.name], f"{where}: {label}")
            _check_value(field, changes[field.name], f"{where}: {label}")
    return dataclasses.replace(config, **changes)


def parse_override(text: str) -> dict[str, Any]:
    """``"a.b=1"`` -> ``{"a": {"b": 1}}``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. model.size=base)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def load_config(cls: type[T], path: Path | str | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: T | None = None) -> T:
    """Defaults (or ``base``), then the YAML file, then the overrides, each checked."""
    config = base if base is not None else cls()
    if path is not None:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
        config = merge(config, values, str(path))
    for text in overrides:
        config = merge(config, parse_override(text), f"override {text!r}")
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def peek(path: Path | str | None, overrides: list[str] | tuple[str, ...], key: str, default: Any) -> Any:
    """The value a top-level key will have after the file and the overrides (read before the full load, for
    keys that choose the defaults of the rest, such as a named model size)."""
    value = default
    if path is not None and Path(path).is_file():
        try:
            value = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get(key, value)
        except (yaml.YAMLError, AttributeError):
            pass  # load_config reports it properly
    for text in overrides:
        value = parse_override(text).get(key, value)
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML-safe mapping of a config (paths as strings, tuples as lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def save_config(config: Any, path: Path) -> None:
    """Write the resolved config as YAML (what ``--config`` reads back), atomically: a process killed while
    writing leaves the previous file (or none), never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        staging.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
