"""kernels/_graphscan.c built with AddressSanitizer + UBSan, fed hypothesis and mutated JSON.

The scanner reads untrusted request bodies byte by byte with pointer arithmetic: an
out-of-bounds read, an overflow or a refcount slip there is memory corruption in the
agent. The sanitized build aborts on the first such report (-fno-sanitize-recover), and
every input is also checked against the general parser (tests/kernels/test_graphscan.py's
oracle). The default suite runs a few thousand inputs; `pytest -m sanitize` runs 100,000.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("fuzz_graphscan.py")
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def _libasan() -> str | None:
    found = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else None


@pytest.fixture(scope="module")
def sanitized_scanner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None or _libasan() is None:
        pytest.skip("needs gcc with libasan (apt install gcc)")
    out = tmp_path_factory.mktemp("asan") / f"_graphscan{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(
        [
            "gcc", "-shared", "-fPIC", "-O1", "-g", *SANITIZE, "-Wall", "-Wextra", "-Werror",
            f"-I{sysconfig.get_paths()['include']}", str(ROOT / "kernels" / "_graphscan.c"),
            "-o", str(out),
        ],
        check=True,
    )  # fmt: skip
    return out


def fuzz(module: Path, count: int, seed: int) -> str:
    env = {
        **os.environ,
        # ASan must be the first library loaded; python itself is not instrumented.
        "LD_PRELOAD": str(_libasan()),
        # CPython keeps its interned objects until exit: leak reports would be noise.
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=99",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        # Objects through malloc: ASan then sees a use after free of a scanner-made object.
        "PYTHONMALLOC": "malloc",
    }
    done = subprocess.run(
        [sys.executable, str(DRIVER), str(module), str(count), str(seed)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    assert "AddressSanitizer" not in done.stderr
    assert "runtime error" not in done.stderr
    return done.stdout


def inputs_run(stdout: str) -> int:
    return int(stdout.split("inputs: ")[1].split(maxsplit=1)[0])


def test_a_sanitizer_report_fails_the_run(sanitized_scanner: Path, tmp_path: Path) -> None:
    """Without this, a harness that lost LD_PRELOAD or the flags would pass silently."""
    bad = tmp_path / "_graphscan.c"
    source = (ROOT / "kernels" / "_graphscan.c").read_text()
    # A number literal copied past its stack buffer: the class of bug the harness exists for.
    source = source.replace(
        "if (n > MAX_NUMBER_CHARS) return 0;", "if (n > 4 * MAX_NUMBER_CHARS) return 0;"
    )
    assert "4 * MAX_NUMBER_CHARS" in source
    bad.write_text(source)
    module = tmp_path / sanitized_scanner.name
    subprocess.run(
        [
            "gcc", "-shared", "-fPIC", "-O1", "-g", *SANITIZE,
            f"-I{sysconfig.get_paths()['include']}", str(bad), "-o", str(module),
        ],
        check=True,
    )  # fmt: skip
    with pytest.raises(AssertionError, match=r"AddressSanitizer|runtime error"):
        fuzz(module, 200, seed=1)


def test_sanitized_scanner_short_run(sanitized_scanner: Path) -> None:
    out = fuzz(sanitized_scanner, 1500, seed=20261206)
    assert inputs_run(out) >= 1500


@pytest.mark.sanitize
@pytest.mark.timeout(7200)  # ~15 min on an idle core; far more on a loaded machine
def test_sanitized_scanner_100k_inputs(sanitized_scanner: Path) -> None:
    out = fuzz(sanitized_scanner, 100_000, seed=12)
    assert inputs_run(out) >= 100_000
