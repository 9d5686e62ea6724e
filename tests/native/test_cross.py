"""The C kernels on every architecture we ship to: x86-64 here, aarch64 (Coral Dev Board,
Raspberry Pi 64-bit) and armv7 (32-bit Raspberry Pi OS) with Debian's cross compilers.

Both extensions' C code compiles with warnings as errors; the Python-free cores (the SpMM
kernels, the graph scanner with a C host) run tests/native/check_*.c, which compare them
with expected outputs, natively and under qemu-user. The cross builds are behind the
`cross` marker: the first run apt-installs the toolchains (~140 MB).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
WERROR = ["-O3", "-Wall", "-Wextra", "-Wpedantic", "-Wshadow", "-Werror"]
DRIVERS = ("check_spmm", "check_graphscan")
# target: (compiler, Debian packages, qemu-user runner)
TARGETS = {
    "aarch64": (
        "aarch64-linux-gnu-gcc",
        ["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross", "qemu-user-static"],
        "qemu-aarch64-static",
    ),
    "armv7": (
        "arm-linux-gnueabihf-gcc",
        ["gcc-arm-linux-gnueabihf", "libc6-dev-armhf-cross", "qemu-user-static"],
        "qemu-arm-static",
    ),
}


def build(compiler: str, source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [compiler, *WERROR, *extra, str(source), "-o", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc (apt install gcc)")
@pytest.mark.parametrize("name", ["_spmm", "_graphscan"])
def test_the_extensions_compile_without_warnings(name: str) -> None:
    include = sysconfig.get_paths()["include"]
    subprocess.run(
        ["gcc", *WERROR, "-Wconversion", "-fsyntax-only", f"-I{include}", f"kernels/{name}.c"],
        cwd=ROOT,
        check=True,
    )


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc (apt install gcc)")
@pytest.mark.parametrize("driver", DRIVERS)
def test_the_cores_give_the_expected_outputs_natively(driver: str, tmp_path: Path) -> None:
    build("gcc", HERE / f"{driver}.c", tmp_path / driver)
    done = subprocess.run([tmp_path / driver], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout
    assert done.stdout.startswith("ok ")


@pytest.fixture(scope="module", params=sorted(TARGETS))
def target(request: pytest.FixtureRequest) -> tuple[str, str, str]:
    name: str = request.param
    compiler, packages, runner = TARGETS[name]
    if shutil.which(compiler) is None or shutil.which(runner) is None:
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            pytest.skip(f"needs {' '.join(packages)} (apt install, as root)")
        subprocess.run(
            ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q",
             "--no-install-recommends", *packages],
            check=True,
            capture_output=True,
        )  # fmt: skip
    return name, compiler, runner


@pytest.mark.cross
@pytest.mark.parametrize("driver", DRIVERS)
def test_the_cores_give_the_expected_outputs_under_qemu(
    target: tuple[str, str, str], driver: str, tmp_path: Path
) -> None:
    _, compiler, runner = target
    build(compiler, HERE / f"{driver}.c", tmp_path / driver, "-static")
    done = subprocess.run([runner, tmp_path / driver], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout
    assert done.stdout.startswith("ok ")


def portable_kernel_asm(compiler: str, tmp_path: Path) -> str:
    asm = tmp_path / "check_spmm.s"
    build(compiler, HERE / "check_spmm.c", asm, "-S")
    text = asm.read_text()
    body = re.search(r"^spmm_portable_i32:\n(.*?)\.size\s+spmm_portable_i32", text, re.S | re.M)
    assert body is not None
    return body.group(1)


@pytest.mark.cross
def test_the_portable_kernel_keeps_its_block_in_neon_registers(
    target: tuple[str, str, str], tmp_path: Path
) -> None:
    """aarch64: the 16-column block is four 4-lane fused multiply-adds per neighbour (GCC 12
    gave two, and eight scalar ones, for the plain-loop version). armv7: scalar VFP. Debian's
    armhf baseline has no NEON, and even with -mfpu=neon GCC uses NEON for float only under
    -funsafe-math-optimizations (armv7 NEON flushes subnormals to zero), which we do not
    want: results would differ from every other platform's."""
    name, compiler, _ = target
    asm = portable_kernel_asm(compiler, tmp_path)
    if name == "aarch64":
        assert len(re.findall(r"\bfmla\s+v\d+\.4s", asm)) >= 4, asm
        assert len(re.findall(r"\bfmul\s+v\d+\.4s", asm)) >= 4, asm
    else:
        assert re.search(r"\bv(mla|fma|mul)\.f32\s+q", asm) is None, asm
