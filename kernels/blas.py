"""One BLAS thread per diffusion, unless the operator says otherwise.

The agent already spreads diffusions over its own threads (`kernels.workers`, and
`kernels.threads` inside the compiled series); a BLAS or OpenMP pool inside each of them
only oversubscribes the box's cores, and its spinning threads fight the event loop. On this
2-core box with other load, an agent with OpenBLAS's default pool spent 3.5-4.5x the CPU per
OIP request (`dgdm bench http --oip`, 100 nodes: 520-700 us against 150-160 us; B = 64:
5.4-6.3 ms against 1.2-1.4 ms). The libraries read these variables once, when numpy loads,
so the `dgdm` command sets them before anything imports numpy.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_CNT",
    "NUMEXPR_NUM_THREADS",
)


def one_thread_unless_set(environ: MutableMapping[str, str] = os.environ) -> None:
    """Each variable the environment does not set yet becomes "1"."""
    for name in THREAD_VARS:
        environ.setdefault(name, "1")
