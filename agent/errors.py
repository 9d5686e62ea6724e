"""Errors raised by the agent, rooted in the shared `DgdmError`."""

from __future__ import annotations

from dgdm.kernels.errors import DgdmError


class AgentError(DgdmError):
    """Something went wrong in the agent service."""
