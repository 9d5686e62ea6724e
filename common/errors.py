"""The root of every error dgdm raises on purpose.

A user sees `str(err)` (one sentence), logs get `__cause__`. Each package derives its own
tree from it (`dgdm.kernels.errors`, `dgdm.sync.errors`, `dgdm.agent.errors`), so that
`sync` and `kernels` share the root without importing each other.
"""

from __future__ import annotations


class DgdmError(Exception):
    """Root of every error dgdm raises on purpose."""
