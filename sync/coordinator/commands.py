"""What a command request may be (SPEC §6 command body), for one device or a job."""

from __future__ import annotations

from typing import Any

from dgdm.sync.errors import SyncError

COMMANDS = ("ping", "diffuse", "set_config")
DEFAULT_TTL_MS = 60_000
MAX_TTL_MS = 7 * 24 * 3600 * 1000


class BadCommand(SyncError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def check_command_request(cmd: Any, args: Any, ttl_ms: Any) -> dict[str, Any]:
    if cmd not in COMMANDS:
        raise BadCommand("cmd", f"must be one of {', '.join(COMMANDS)}")
    args = {} if args is None else args
    if not isinstance(args, dict):
        raise BadCommand("args", "must be a JSON object")
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or not 1 <= ttl_ms <= MAX_TTL_MS:
        raise BadCommand("ttl_ms", f"must be an integer from 1 to {MAX_TTL_MS}")
    if cmd == "diffuse" and not isinstance(args.get("graph"), dict):
        raise BadCommand("args.graph", "diffuse needs a graph object (SPEC §3)")
    return {"cmd": cmd, "args": args, "ttl_ms": ttl_ms}
