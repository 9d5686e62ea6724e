"""The body of a command reply (SPEC §6, kind 17): one builder for the agent's command
handler and the device link, so that the shape is written once."""

from __future__ import annotations

from typing import Any


def reply_body(cmd_seq: int, result: Any = None, error: str | None = None) -> dict[str, Any]:
    """`ok` is true exactly when there is no `error`; `data` is the command's result."""
    return {"cmd_seq": cmd_seq, "ok": error is None, "error": error, "data": result}
