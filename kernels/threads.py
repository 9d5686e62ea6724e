"""How many threads one diffusion's compiled kernel may use (`kernels.threads`).

Kept apart from the backends so that the agent can set it at start-up without importing
scipy (the sparse backend loads on its first diffusion). 0 means the CPUs this process
may run on (`os.sched_getaffinity`: what systemd's CPUAffinity= or a container gives it),
read when asked, so a changed affinity takes effect on the next diffusion.
"""

from __future__ import annotations

import os

_configured = 0


def configure(threads: int) -> None:
    """Set `kernels.threads`: a positive count, or 0 for the CPUs the process may use."""
    global _configured  # noqa: PLW0603 - one process-wide setting
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    _configured = threads


def available() -> int:
    """The CPUs this process may run on (os.cpu_count() where affinity is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on every platform
        return max(1, os.cpu_count() or 1)


def count() -> int:
    """The threads a large diffusion may use now."""
    return _configured or available()
