"""The fused series' threads: parts that repeat no row (each part's triangle reads the part
above's first rows) run on a pool of parked workers. Bit for bit the single-thread result
across many calls, from concurrent callers, with more parts than cores and after a fork;
bad input refused on every part; a process with parked workers exits."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from .test_series import banded, series

_spmm = pytest.importorskip(
    "dgdm.kernels._spmm", reason="the optional C extension is not built (no compiler?)"
)

N, BAND = 12_000, 30
COEFFS = 0.15 * 0.85 ** np.arange(11)


@pytest.fixture(scope="module")
def problem() -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """A banded T, features, and its one-thread series."""
    t = banded(N, BAND, 0.1, seed=3)
    x = np.random.default_rng(3).standard_normal((N, 16)).astype(np.float32)
    return t, x, series(t, COEFFS, x, band=BAND)


def test_many_calls_reuse_the_workers(problem) -> None:
    t, x, one = problem
    for threads in (2, 3, 2, 1, 4) * 20:
        np.testing.assert_array_equal(series(t, COEFFS, x, band=BAND, threads=threads), one)


def test_more_parts_than_cores(problem) -> None:
    t, x, one = problem
    threads = 4 * (os.cpu_count() or 1) + 1
    np.testing.assert_array_equal(series(t, COEFFS, x, band=BAND, threads=threads), one)


@pytest.mark.parametrize("band", [0, 1, 7, 300])
def test_narrow_and_wide_bands_split_or_fall_back(band) -> None:
    """Band 0 has no triangles; a band wide against the parts makes fewer of them."""
    t = banded(4_000, band, 0.2, seed=band)
    x = np.random.default_rng(band).standard_normal((4_000, 5)).astype(np.float32)
    one = series(t, COEFFS, x, band=band)
    for threads in (2, 3, 7):
        np.testing.assert_array_equal(series(t, COEFFS, x, band=band, threads=threads), one)


@pytest.mark.parametrize("steps", [1, 2, 30])
@pytest.mark.parametrize(("n", "band"), [(12_000, 30), (700, 80), (400, 45)])
def test_one_step_and_triangles_as_tall_as_the_parts(n, band, steps) -> None:
    """One product has no triangle; many steps over narrow parts make fewer parts."""
    t = banded(n, band, 0.1, seed=steps)
    x = np.random.default_rng(steps).standard_normal((n, 3)).astype(np.float32)
    coeffs = np.full(steps + 1, 0.5)
    one = series(t, coeffs, x, band=band)
    for threads in (2, 3, 4):
        np.testing.assert_array_equal(series(t, coeffs, x, band=band, threads=threads), one)


def test_concurrent_callers_share_the_pool(problem) -> None:
    """Callers that find the workers busy start more (or make fewer parts): none waits."""
    t, x, one = problem
    failures: list[str] = []

    def call(threads: int) -> None:
        for _ in range(10):
            if not np.array_equal(series(t, COEFFS, x, band=BAND, threads=threads), one):
                failures.append(f"threads={threads}")

    callers = [threading.Thread(target=call, args=(1 + i % 4,)) for i in range(8)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=120)
    assert not any(caller.is_alive() for caller in callers)
    assert failures == []


@pytest.mark.parametrize(
    ("row", "column", "message"),
    [
        (N // 2, N // 2 + BAND + 1, "more than band"),  # near the boundary of two parts
        (N // 2 - 200, N // 2 - 200 - BAND - 5, "more than band"),  # in a triangle
        (N - 3, N + 4, "indices must lie in"),  # in the top part
        (5, -1, "indices must lie in"),  # in the bottom part
    ],
)
@pytest.mark.parametrize("threads", [2, 3])
def test_bad_entries_are_refused_on_every_part(problem, row, column, message, threads) -> None:
    t, x, _ = problem
    indices = t.indices.astype(np.int32)
    indices[t.indptr[row]] = column
    with pytest.raises(ValueError, match=message):
        _spmm.csr_series(
            t.indptr.astype(np.int32), indices, t.data, COEFFS.astype(np.float32), x,
            np.empty_like(x), band=BAND, threads=threads,
        )  # fmt: skip


@pytest.mark.parametrize("threads", [2, 3])
def test_a_bad_indptr_is_refused_with_threads(problem, threads) -> None:
    t, x, _ = problem
    indptr = t.indptr.astype(np.int32)
    indptr[N // 2 + 1] = indptr[N // 2] - 1
    with pytest.raises(ValueError, match="non-decreasing"):
        _spmm.csr_series(
            indptr, t.indices.astype(np.int32), t.data, COEFFS.astype(np.float32), x,
            np.empty_like(x), band=BAND, threads=threads,
        )  # fmt: skip


def gathered_series(t, x, perm, *, threads, source=None):
    """The series of x[perm], x permuted by the kernel's threads (gather)."""
    xp, out = np.empty_like(x), np.full_like(x, np.nan)
    _spmm.csr_series(
        t.indptr.astype(np.int32), t.indices.astype(np.int32), t.data,
        COEFFS.astype(np.float32), xp, out, band=BAND, threads=threads, gather=perm,
        source=x if source is None else source,
    )  # fmt: skip
    return out, xp


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_threads_gather_x_first(problem, threads) -> None:
    t, x, _ = problem
    perm = np.random.default_rng(threads).permutation(N).astype(np.int32)
    out, xp = gathered_series(t, x, perm, threads=threads)
    np.testing.assert_array_equal(xp, x[perm])
    np.testing.assert_array_equal(out, series(t, COEFFS, x[perm], band=BAND))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("where", [0, N // 2, N - 1])
def test_a_gather_row_outside_source_is_refused(problem, threads, where) -> None:
    t, x, _ = problem
    perm = np.arange(N, dtype=np.int32)
    perm[where] = N
    with pytest.raises(ValueError, match=r"gather must hold rows of source, in \[0, 12000\)"):
        gathered_series(t, x, perm, threads=threads)


def test_gather_arguments_are_checked(problem) -> None:
    t, x, _ = problem
    perm = np.arange(N, dtype=np.int32)
    with pytest.raises(TypeError, match="gather and source together"):
        _spmm.csr_series(
            t.indptr.astype(np.int32), t.indices.astype(np.int32), t.data,
            COEFFS.astype(np.float32), x.copy(), np.empty_like(x), band=BAND, gather=perm,
        )  # fmt: skip
    with pytest.raises(ValueError, match="source must have the shape of out"):
        gathered_series(t, x, perm, threads=2, source=x[:-1])
    with pytest.raises(TypeError, match="gather must be int32"):
        gathered_series(t, x, perm.astype(np.int64), threads=2)
    xp = x.copy()
    with pytest.raises(ValueError, match="source must not share memory with x or out"):
        _spmm.csr_series(
            t.indptr.astype(np.int32), t.indices.astype(np.int32), t.data,
            COEFFS.astype(np.float32), xp, np.empty_like(x), band=BAND, gather=perm, source=xp,
        )  # fmt: skip


def _series_in_child(t: sp.csr_matrix, x: np.ndarray, one: np.ndarray) -> bool:
    return all(
        np.array_equal(series(t, COEFFS, x, band=BAND, threads=threads), one)
        for threads in (2, 3, 2)
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_workers(problem) -> None:
    """The child has none of the parent's threads (or their locks): it makes new ones."""
    t, x, one = problem
    series(t, COEFFS, x, band=BAND, threads=3)  # the parent's pool has workers now
    with warnings.catch_warnings():  # 3.12+: "this process is multi-threaded" (ours)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports by its exit status
        os._exit(0 if _series_in_child(t, x, one) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_multiprocessing_fork_children(problem) -> None:
    t, x, one = problem
    series(t, COEFFS, x, band=BAND, threads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with multiprocessing.get_context("fork").Pool(2) as pool:
            results = pool.starmap(_series_in_child, [(t, x, one)] * 2)
    assert results == [True, True]


EXIT_SCRIPT = textwrap.dedent(
    """
    import threading, numpy as np, scipy.sparse as sp
    from dgdm.kernels import _spmm

    n, band = 12_000, 30
    t = sp.diags([0.1] * 5, [-band, -1, 0, 1, band], shape=(n, n), format="csr", dtype=np.float32)
    x = np.ones((n, 16), np.float32)
    coeffs = np.full(11, 0.1, np.float32)
    ip, ix = t.indptr.astype(np.int32), t.indices.astype(np.int32)

    def call():
        while True:
            _spmm.csr_series(ip, ix, t.data, coeffs, x, np.empty_like(x), band=band, threads=2)

    call_once = lambda: _spmm.csr_series(ip, ix, t.data, coeffs, x, np.empty_like(x),
                                         band=band, threads=3)
    call_once()
    threading.Thread(target=call, daemon=True).start()  # still in a call at exit
    threading.Event().wait(0.2)
    print("exiting")
    """
)


def test_the_process_exits_with_workers_parked_and_busy() -> None:
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "exiting"
