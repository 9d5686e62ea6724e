"""Typed, frozen settings from a TOML file with `DGDM__SECTION__KEY` environment overrides.

A schema is a frozen dataclass whose fields are sections, each itself a frozen dataclass of
typed settings with defaults (SPEC §7). Loading checks every key: an unknown section or key,
a value of the wrong type or outside its allowed range raises `ConfigError` naming
``section.key``, so a bad config stops start-up with one line.

Secrets (fields declared with ``setting(..., secret=True)``) may be given as ``"file:PATH"``
(the file's content is used), or left unset and supplied by systemd as the credential file
``$CREDENTIALS_DIRECTORY/<section>.<key>``. `summary()` shows a config without them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from dgdm.sync.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")
ENV_PREFIX = "DGDM__"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def setting(
    default: Any = dataclasses.MISSING,
    *,
    choices: tuple[Any, ...] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    pattern: str | None = None,
    pattern_hint: str | None = None,
    secret: bool = False,
    help: str = "",
) -> Any:
    """A dataclass field carrying the checks the loader applies to it. `pattern_hint` is
    the sentence a value not matching `pattern` is refused with (default: the pattern)."""
    meta = {
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "pattern": pattern,
        "pattern_hint": pattern_hint,
        "secret": secret,
        "help": help,
    }
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple (immutable) default for settings")
    # A secret stays out of repr(), so a logged or printed config never shows it.
    return dataclasses.field(default=default, metadata=meta, repr=not secret)


def load_settings(
    schema: type[T],
    path: Path | str | None,
    *,
    env: Mapping[str, str] | None = None,
    require_file: bool = False,
) -> T:
    """Read `path` (if it exists, or fail when `require_file`), apply env overrides, check."""
    env = os.environ if env is None else env
    raw = _read_toml(Path(path) if path else None, require_file)
    _apply_env(raw, env, schema)
    return _build(schema, raw, _credentials_dir(env))


def summary(settings: Any) -> dict[str, Any]:
    """The settings as plain JSON-able data with every secret replaced by "***" (or None)."""
    out: dict[str, Any] = {}
    for section in dataclasses.fields(settings):
        values = getattr(settings, section.name)
        shown: dict[str, Any] = {}
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if f.metadata.get("secret"):
                value = None if value in (None, "") else "***"
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            shown[f.name] = value
        out[section.name] = shown
    return out


# mqtt[s]://host[:port] and nothing else: no user:pass@ (a URL is logged, shown in /status
# and pasted into bug reports; credentials go in username/password or a credential file).
BROKER_URL_PATTERN = r"mqtts?://[^\s/@]+(:\d+)?/?"
BROKER_URL_HINT = (
    "must be mqtt://host[:port] or mqtts://host[:port], without user:pass@ "
    "(set the username and password keys instead)"
)

# A host name or an IP address (v4 or v6), as a bind address or an allowed Host header.
HOST_NAME_PATTERN = r"[A-Za-z0-9.-]{1,253}|[0-9A-Fa-f:.]{2,45}"
HOST_NAME_HINT = "must be a host name or an IP address"


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts local connections (then no token is required)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_toml(path: Path | None, require_file: bool) -> dict[str, Any]:
    if path is None or not path.exists():
        if require_file:
            raise ConfigError("file", f"{path} does not exist")
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("file", f"cannot read {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("file", f"{path} is not valid TOML: {exc}") from exc
    return data


def _apply_env(raw: dict[str, Any], env: Mapping[str, str], schema: type) -> None:
    sections = {f.name.upper(): f.name for f in dataclasses.fields(schema)}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].split("__")
        if len(parts) != 2 or parts[0] not in sections:
            raise ConfigError(name, "is not a known DGDM__SECTION__KEY setting")
        section = sections[parts[0]]
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(section, "must be a table")
        table[parts[1].lower()] = _EnvString(value)


class _EnvString(str):
    """A value that came from the environment, so it is text to be converted to its type."""


def _credentials_dir(env: Mapping[str, str]) -> Path | None:
    value = env.get("CREDENTIALS_DIRECTORY")
    return Path(value) if value else None


def _build(schema: type[T], raw: dict[str, Any], creds: Path | None) -> T:
    section_fields = {f.name: f for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    for name in raw:
        if name not in section_fields:
            raise ConfigError(name, "is not a known section")
    hints = typing.get_type_hints(schema)
    built = {}
    for name in section_fields:
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(name, "must be a table")
        built[name] = _build_section(hints[name], name, table, creds)
    return schema(**built)


def _build_section(cls: type, section: str, table: dict[str, Any], creds: Path | None) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise ConfigError(f"{section}.{key}", "is not a known setting")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, f in fields.items():
        name = f"{section}.{key}"
        if key in table:
            values[key] = _convert(table[key], hints[key], name, f)
        elif f.metadata.get("secret") and creds and (creds / name).is_file():
            values[key] = _read_secret(creds / name, name)
        elif f.default is dataclasses.MISSING:
            raise ConfigError(name, "is required")
    return cls(**values)


def _convert(value: Any, hint: Any, name: str, f: dataclasses.Field[Any]) -> Any:
    if f.metadata.get("secret") and isinstance(value, str) and value.startswith("file:"):
        value = _read_secret(Path(value[5:]), name)
    converted = _coerce(value, hint, name)
    _check(converted, name, f.metadata)
    return converted


def _coerce(value: Any, hint: Any, name: str) -> Any:
    from_env = isinstance(value, _EnvString)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (from_env and value == ""):
            return None
        return _coerce(value, args[0], name)
    if origin is typing.Literal:
        return _coerce_literal(value, typing.get_args(hint), name)
    if origin is tuple:
        return _coerce_tuple(value, typing.get_args(hint)[0], name)
    coerce = _SCALARS.get(hint)
    if coerce is None:
        raise TypeError(f"unsupported setting type {hint!r} for {name}")
    return coerce(value, name, from_env)


def _coerce_literal(value: Any, allowed: tuple[Any, ...], name: str) -> Any:
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ConfigError(name, f"must be one of {choices}")
    return str(value) if isinstance(value, _EnvString) else value


def _coerce_tuple(value: Any, item: Any, name: str) -> tuple[Any, ...]:
    if isinstance(value, _EnvString):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ConfigError(name, "must be a list")
    return tuple(_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value))


def _to_str(value: Any, name: str, from_env: bool) -> str:
    if not isinstance(value, str):
        raise ConfigError(name, "must be a string")
    return str(value)


def _to_path(value: Any, name: str, from_env: bool) -> Path:
    return Path(_to_str(value, name, from_env))


def _to_bool(value: Any, name: str, from_env: bool) -> bool:
    if from_env and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    if not isinstance(value, bool):
        raise ConfigError(name, "must be true or false")
    return value


def _to_int(value: Any, name: str, from_env: bool) -> int:
    if from_env:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(name, "must be an integer") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, "must be an integer")
    return value


def _to_float(value: Any, name: str, from_env: bool) -> float:
    if from_env:
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(name, "must be a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, "must be a number")
    if not math.isfinite(value):
        raise ConfigError(name, "must be finite")
    return float(value)


_SCALARS: dict[Any, Callable[[Any, str, bool], Any]] = {
    str: _to_str,
    Path: _to_path,
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
}


def _check(value: Any, name: str, meta: Mapping[str, Any]) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(map(str, choices))}")
    low, high = meta.get("minimum"), meta.get("maximum")
    if low is not None and value < low:
        raise ConfigError(name, f"must be >= {low}")
    if high is not None and value > high:
        raise ConfigError(name, f"must be <= {high}")
    pattern = meta.get("pattern")
    if pattern is not None and not re.fullmatch(pattern, str(value)):
        raise ConfigError(name, meta.get("pattern_hint") or f"must match {pattern}")


def _read_secret(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(name, f"cannot read secret file {path}: {exc.strerror}") from exc


def with_overrides(settings: T, overrides: Mapping[str, Any]) -> T:
    """`settings` with some dotted keys (`section.key`) replaced, each value converted and
    range-checked as the same value in the TOML file would be. An unknown key, a secret (set
    in the file or a credential, never over the wire) or a bad value raises `ConfigError`
    naming the key."""
    hints = typing.get_type_hints(type(settings))
    sections = {f.name for f in dataclasses.fields(settings)}  # type: ignore[arg-type]
    changed: dict[str, dict[str, Any]] = {}
    for name, value in overrides.items():
        section, _, key = name.partition(".")
        if section not in sections:
            raise ConfigError(name, "is not a known setting")
        cls = hints[section]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if key not in fields:
            raise ConfigError(name, "is not a known setting")
        if fields[key].metadata.get("secret"):
            raise ConfigError(name, "is a secret: set it in the config file or a credential")
        hint = typing.get_type_hints(cls)[key]
        changed.setdefault(section, {})[key] = _convert(value, hint, name, fields[key])
    replaced = {
        section: dataclasses.replace(getattr(settings, section), **values)
        for section, values in changed.items()
    }
    return dataclasses.replace(settings, **replaced)  # type: ignore[type-var]
