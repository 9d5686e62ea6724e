"""Errors raised by the agent, rooted in the shared `DgdmError`.

The HTTP layer maps each one to a status (agent/http.py `_REFUSALS`); a command reply
carries its message.
"""

from __future__ import annotations

from dgdm.common.errors import DgdmError


class AgentError(DgdmError):
    """Something went wrong in the agent service."""


class QueueFull(AgentError):
    """The diffusion queue is full; the caller should retry after `retry_after_s`."""

    retry_after_s = 1


class ShuttingDown(AgentError):
    """The agent is draining for shutdown and takes no new work."""


class NoOutbox(AgentError):
    """Queuing was asked for but no outbox is configured (sync.coordinator_public_key)."""


class BadJson(AgentError):
    """A request body is not valid JSON."""


class DemoError(AgentError):
    """`dgdm demo` could not finish: the agent did not start, or results did not arrive."""
