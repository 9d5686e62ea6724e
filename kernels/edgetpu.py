"""Edge TPU discovery, temperature and model compilation (no hardware needed to import).

Discovery reads the file system only (roots are parameters so tests use a fake tree):
`/dev/apex_*` for PCIe/M.2 modules, USB ids 1a6e:089a (before first use) and 18d1:9302
(after) under /sys/bus/usb/devices, and whether `libedgetpu.so.1` loads. pycoral's
`list_edge_tpus()` is consulted only when pycoral imports (it is not on PyPI).
"""

from __future__ import annotations

import ctypes
import importlib
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dgdm.kernels.errors import BackendError, BackendUnavailable

LIBRARY = "libedgetpu.so.1"
USB_IDS = {("1a6e", "089a"), ("18d1", "9302")}
COMPILE_TIMEOUT_S = 300


@dataclass(frozen=True)
class TpuState:
    """`reason` says in one sentence why no TPU is usable ("" when one is)."""

    present: bool
    devices: list[str] = field(default_factory=list)
    reason: str = ""
    temp_c: float | None = None
    runtime: str | None = None


def discover(root: Path | str = "/", library_loads: Callable[[], bool] | None = None) -> TpuState:
    """Find Edge TPUs under `root`; `library_loads` defaults to trying libedgetpu.so.1."""
    root = Path(root)
    devices = pci_devices(root) + usb_devices(root) + _pycoral_devices()
    temp = temperature_c(root)
    if not devices:
        reason = "no Edge TPU found (no /dev/apex_* device and no Coral USB accelerator)."
        return TpuState(False, [], reason, temp, None)
    if not (library_loads or _library_loads)():
        reason = f"an Edge TPU is attached but {LIBRARY} (the Edge TPU runtime) is not installed."
        return TpuState(False, devices, reason, temp, None)
    return TpuState(True, devices, "", temp, LIBRARY)


def pci_devices(root: Path) -> list[str]:
    """PCIe/M.2 modules as pycoral names them: pci:0, pci:1, ..."""
    nodes = sorted((root / "dev").glob("apex_*"))
    return [f"pci:{i}" for i in range(len(nodes))]


def usb_devices(root: Path) -> list[str]:
    """Coral USB accelerators (either USB id): usb:0, usb:1, ..."""
    found = 0
    for dev in sorted((root / "sys/bus/usb/devices").glob("*")):
        ids = (_read(dev / "idVendor"), _read(dev / "idProduct"))
        if ids in USB_IDS:
            found += 1
    return [f"usb:{i}" for i in range(found)]


def temperature_c(root: Path | str = "/") -> float | None:
    """The hottest PCIe Edge TPU's temperature (sysfs reports millidegrees), or None."""
    temps = []
    for path in sorted(Path(root, "sys/class/apex").glob("apex_*/temp")):
        try:
            temps.append(int(_read(path)) / 1000.0)
        except ValueError:
            continue
    return max(temps) if temps else None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip().lower()
    except OSError:
        return ""


def _library_loads() -> bool:
    try:
        ctypes.CDLL(LIBRARY)
    except OSError:
        return False
    return True


def _pycoral_devices() -> list[str]:
    """Devices pycoral enumerates, when the real pycoral is installed (Coral's own index)."""
    try:
        edgetpu = importlib.import_module("pycoral.utils.edgetpu")
    except ImportError:
        return []
    try:
        return [f"{d['type']}:{i}" for i, d in enumerate(edgetpu.list_edge_tpus())]
    except (RuntimeError, OSError, KeyError, TypeError):
        return []


def compiled_name(model_path: Path) -> str:
    """edgetpu_compiler's output name: model.tflite -> model_edgetpu.tflite."""
    return f"{model_path.stem}_edgetpu.tflite"


def compile_for_edgetpu(
    model_path: Path,
    search_dirs: tuple[Path, ...] = (),
    which: Callable[[str], str | None] = shutil.which,
) -> Path:
    """The Edge TPU version of a model: compiled here when `edgetpu_compiler` is on PATH,
    else a pre-compiled `*_edgetpu.tflite` next to the model or in `search_dirs`."""
    for folder in (model_path.parent, *search_dirs):
        candidate = folder / compiled_name(model_path)
        if candidate.is_file():  # the name carries the problem key and F: never stale
            return candidate
    compiler = which("edgetpu_compiler")
    if compiler is None:
        raise BackendUnavailable(
            f"edgetpu_compiler is not installed and no pre-compiled "
            f"{compiled_name(model_path)} was found; compile the model on an x86-64 host."
        )
    return _run_compiler(compiler, model_path)


def _run_compiler(compiler: str, model_path: Path) -> Path:
    cmd = [compiler, "-s", "-o", str(model_path.parent), str(model_path)]
    try:
        done = subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"edgetpu_compiler failed to run: {exc}") from exc
    output = model_path.parent / compiled_name(model_path)
    if done.returncode != 0 or not output.is_file():
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BackendError(f"edgetpu_compiler failed (exit {done.returncode}): {last[0]}")
    return output
