"""Commands from the coordinator (MQTT `cmd` topic, SPEC §6): ping, status, diffuse,
set_config (reloadable settings, see `remote_config`).

`on_command` is what the link awaits for each command; it always returns a reply body,
with `ok: false` and the reason for bad input or an unknown command.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from dgdm.agent import status
from dgdm.agent.answers import command_answer
from dgdm.agent.errors import AgentError
from dgdm.common.errors import DgdmError
from dgdm.kernels.errors import GraphError
from dgdm.sync.replies import reply_body

if TYPE_CHECKING:
    from dgdm.agent.runtime import Agent


async def on_command(agent: Agent, cmd_seq: int, body: dict[str, Any]) -> dict[str, Any]:
    """Execute one command; the reply body (SPEC §6) never raises for bad input."""
    cmd = body.get("cmd")
    args = body.get("args") or {}
    try:
        data = await _command(agent, str(cmd), args)
    except (DgdmError, ValueError, TypeError) as exc:
        agent.metrics.commands.labels(str(cmd)[:32], "false").inc()
        return reply_body(cmd_seq, error=str(exc))
    agent.metrics.commands.labels(str(cmd), "true").inc()
    return reply_body(cmd_seq, data)


async def _command(agent: Agent, cmd: str, args: Any) -> Any:
    if cmd == "ping":
        return {"pong": True, "ts_ms": int(time.time() * 1000)}
    if cmd == "status":
        return await status.status(agent.view())
    if cmd == "diffuse":
        if not isinstance(args, dict):
            raise GraphError("args", "must be a graph object")
        result, seq = await agent.diffuse("command", args.get("graph", args), queue=True)
        return command_answer(result, seq)
    if cmd == "set_config":
        return await agent.set_config(args)
    raise AgentError(f"unknown command {cmd!r} (known: ping, status, diffuse, set_config)")
