"""The diffusion core's exception tree, below the shared root `dgdm.common.errors.DgdmError`
(a user sees `str(err)`, one sentence; logs get `__cause__`)."""

from __future__ import annotations

from dgdm.common.errors import DgdmError


class KernelError(DgdmError):
    """Something went wrong in the diffusion core."""


class GraphError(KernelError):
    """A graph (JSON or in memory) is malformed or exceeds a limit.

    `field` names the offending field with its index, e.g. ``edges[3].weight``.
    `code` is the HTTP-ish category: ``invalid`` (422) or ``too_large`` (413).
    """

    def __init__(self, field: str, message: str, *, code: str = "invalid") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.code = code


class MethodError(GraphError):
    """The diffusion method block is malformed (unknown kind, alpha out of range, ...)."""


class BackendError(KernelError):
    """A compute backend failed while running."""


class PrecisionExceeded(BackendError):
    """An int8 backend refused one call because its error bound would exceed the contract
    (0.03 relative); the input needs a float backend. The backend itself is healthy."""


class BackendUnavailable(BackendError):
    """A backend cannot be used on this machine; the message says why, in one sentence."""


class UnknownTopology(KernelError):
    """No topology is registered under this graph_id."""


class DeadlineExceeded(KernelError):
    """A diffusion passed its deadline (or was stopped early) and was ended; nothing about
    the backend or the input is wrong."""
