"""The `dgdm` command gives BLAS one thread unless the operator set a count (kernels/blas.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dgdm.agent import cli
from dgdm.kernels import blas


def test_every_unset_variable_becomes_one_and_a_set_one_is_kept() -> None:
    env = {"OMP_NUM_THREADS": "3"}
    blas.one_thread_unless_set(env)
    assert env == {name: "3" if name == "OMP_NUM_THREADS" else "1" for name in blas.THREAD_VARS}


def test_the_command_sets_them_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in blas.THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert os.environ["OPENBLAS_NUM_THREADS"] == "2"
    others = [name for name in blas.THREAD_VARS if name != "OPENBLAS_NUM_THREADS"]
    assert all(os.environ[name] == "1" for name in others)


def test_numpy_loaded_by_a_command_sees_one_thread() -> None:
    """What OpenBLAS read when numpy loaded inside `dgdm`: its pool has one thread."""
    code = (
        "import sys; from dgdm.agent import cli; from dgdm.kernels import blas;"
        "blas.one_thread_unless_set(); import numpy, ctypes, glob, os;"
        "from numpy._core import _multiarray_umath as m;"
        "libs = glob.glob(os.path.join(os.path.dirname(numpy.__file__), '..', 'scipy_openblas*', "
        "'lib', '*.so*')) + glob.glob(os.path.join(os.path.dirname(numpy.__file__), '..', "
        "'numpy.libs', '*openblas*'));"
        "lib = ctypes.CDLL(libs[0]) if libs else None;"
        "f = [getattr(lib, n) for n in ('scipy_openblas_get_num_threads64_', "
        "'openblas_get_num_threads64_', 'openblas_get_num_threads') if lib and hasattr(lib, n)];"
        "print(f[0]() if f else 'unknown')"
    )
    env = {k: v for k, v in os.environ.items() if k not in blas.THREAD_VARS}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    if out == "unknown":
        pytest.skip("this numpy's OpenBLAS does not export its thread count")
    assert out == "1"
