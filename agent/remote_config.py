"""`set_config` from the coordinator: the reloadable settings it may change, kept on disk.

A `set_config` command (or a job of them) carries settings as `{"section": {"key": value}}`
or `{"section.key": value}`; `null` hands a key back to the config file. Only keys in
`config.RELOADABLE` are taken (others need a restart, so an operator sets them in the file),
secrets never (`http.token`: a coordinator must not be able to open a box's API). Each
value is checked as the same value in the TOML file would be, then rules across keys, and
a command is taken whole or not at all.

What the coordinator set is saved in `<data_dir>/remote-config.json` (0600, replaced
atomically) and applied over the file at every start and SIGHUP, so a site's telemetry
interval does not fall back at the next reboot. Pure functions here; the agent does the I/O.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dgdm.agent.config import RELOADABLE, AgentConfig, check
from dgdm.sync.errors import ConfigError
from dgdm.sync.settings import with_overrides

OVERLAY_NAME = "remote-config.json"
MAX_KEYS = 32


def overlay_path(config: AgentConfig) -> Path:
    return config.device.data_dir / OVERLAY_NAME


def parse(args: Any) -> dict[str, Any]:
    """The command's settings as flat dotted keys (None: back to the file's value)."""
    if not isinstance(args, dict) or not args:
        raise ConfigError("args", 'must be an object of settings, e.g. {"telemetry": {...}}')
    flat: dict[str, Any] = {}
    for name, value in args.items():
        if isinstance(value, dict):
            for key, inner in value.items():
                flat[f"{name}.{key}"] = inner
        else:
            flat[str(name)] = value
    if len(flat) > MAX_KEYS:
        raise ConfigError("args", f"at most {MAX_KEYS} settings per command")
    for name in flat:
        if name not in RELOADABLE:
            raise ConfigError(name, "cannot be set remotely (not reloadable: set it in the file)")
    return flat


def merged(overlay: Mapping[str, Any], change: Mapping[str, Any]) -> dict[str, Any]:
    """The saved settings after a command: None removes a key."""
    out = {k: v for k, v in overlay.items() if k not in change}
    out.update({k: v for k, v in change.items() if v is not None})
    return out


def apply(base: AgentConfig, overlay: Mapping[str, Any]) -> AgentConfig:
    """The file's config with the coordinator's settings over it, checked whole."""
    config = with_overrides(base, overlay)
    check(config)
    return config


def load(path: Path) -> dict[str, Any]:
    """The saved settings; none when the file is missing. A file that is not what this
    module writes raises ConfigError naming it (start-up stops with exit 2)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(str(path), f"cannot be read: {exc.strerror}") from exc
    try:
        overlay = json.loads(text)
    except ValueError as exc:
        raise ConfigError(str(path), f"is not JSON: {exc}") from exc
    if not isinstance(overlay, dict) or any(k not in RELOADABLE for k in overlay):
        raise ConfigError(str(path), "must be an object of reloadable settings")
    return overlay


def save(path: Path, overlay: Mapping[str, Any]) -> None:
    """Replace the file atomically (write, fsync, rename), owner-only."""
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(dict(sorted(overlay.items())), handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
