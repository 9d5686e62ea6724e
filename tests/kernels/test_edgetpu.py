"""Edge TPU discovery, compile step and backend, on a fake sysfs/dev tree (no TPU here)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from dgdm.kernels import edgetpu
from dgdm.kernels.backends.edgetpu_backend import EdgeTPUBackend
from dgdm.kernels.backends.tflite_backend import Int8Runner, ModelStore
from dgdm.kernels.diffusion import dense_propagator
from dgdm.kernels.errors import BackendError, BackendUnavailable
from dgdm.kernels.tflite_bench import rgg_problem
from dgdm.kernels.tflite_runtime import find_runtime, open_interpreter


def fake_usb(root: Path, name: str, vendor: str, product: str) -> None:
    dev = root / "sys/bus/usb/devices" / name
    dev.mkdir(parents=True)
    (dev / "idVendor").write_text(vendor + "\n")
    (dev / "idProduct").write_text(product + "\n")


def fake_apex(root: Path, index: int, millidegrees: str | None) -> None:
    (root / "dev").mkdir(exist_ok=True)
    (root / "dev" / f"apex_{index}").touch()
    if millidegrees is not None:
        folder = root / "sys/class/apex" / f"apex_{index}"
        folder.mkdir(parents=True)
        (folder / "temp").write_text(millidegrees + "\n")


def test_empty_machine_has_no_tpu_and_one_sentence(tmp_path: Path) -> None:
    fake_usb(tmp_path, "1-1", "046d", "c52b")  # a mouse
    state = edgetpu.discover(tmp_path)
    assert not state.present
    assert state.devices == []
    assert state.reason.endswith(".")
    assert state.reason.count(". ") == 0
    assert "no Edge TPU" in state.reason


@pytest.mark.parametrize(("vendor", "product"), [("1a6e", "089a"), ("18d1", "9302")])
def test_usb_accelerator_either_id(tmp_path: Path, vendor: str, product: str) -> None:
    fake_usb(tmp_path, "2-1", vendor, product)
    state = edgetpu.discover(tmp_path, library_loads=lambda: True)
    assert state.present
    assert state.devices == ["usb:0"]
    assert state.runtime == edgetpu.LIBRARY


def test_pcie_devices_and_hottest_temperature(tmp_path: Path) -> None:
    fake_apex(tmp_path, 0, "51250")
    fake_apex(tmp_path, 1, "63800")
    state = edgetpu.discover(tmp_path, library_loads=lambda: True)
    assert state.devices == ["pci:0", "pci:1"]
    assert state.temp_c == pytest.approx(63.8)


def test_unreadable_temperature_is_none(tmp_path: Path) -> None:
    fake_apex(tmp_path, 0, "garbage")
    assert edgetpu.temperature_c(tmp_path) is None
    assert edgetpu.temperature_c(tmp_path / "nowhere") is None


def test_device_without_runtime_library_explains(tmp_path: Path) -> None:
    fake_apex(tmp_path, 0, "40000")
    state = edgetpu.discover(tmp_path, library_loads=lambda: False)
    assert not state.present
    assert state.devices == ["pci:0"]
    assert edgetpu.LIBRARY in state.reason
    assert state.temp_c == pytest.approx(40.0)


def test_real_library_probe_is_false_here(tmp_path: Path) -> None:
    fake_apex(tmp_path, 0, None)
    state = edgetpu.discover(tmp_path)  # the real ctypes check: libedgetpu is absent here
    assert not state.present
    assert "not installed" in state.reason


def test_compiler_absent_and_nothing_precompiled(tmp_path: Path) -> None:
    model = tmp_path / "m-f4.tflite"
    model.write_bytes(b"x")
    with pytest.raises(BackendUnavailable, match="edgetpu_compiler") as info:
        edgetpu.compile_for_edgetpu(model, which=lambda _name: None)
    assert "m-f4_edgetpu.tflite" in str(info.value)


def test_precompiled_model_next_to_it_or_in_search_dirs(tmp_path: Path) -> None:
    model = tmp_path / "cache" / "m-f4.tflite"
    model.parent.mkdir()
    model.write_bytes(b"x")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "m-f4_edgetpu.tflite").write_bytes(b"y")
    found = edgetpu.compile_for_edgetpu(model, (shipped,), which=lambda _name: None)
    assert found == shipped / "m-f4_edgetpu.tflite"
    (model.parent / "m-f4_edgetpu.tflite").write_bytes(b"z")
    assert (
        edgetpu.compile_for_edgetpu(model, (shipped,), which=lambda _name: None).read_bytes()
        == b"z"
    )


def _executable(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_compiler_on_path_is_run(tmp_path: Path) -> None:
    """A stand-in edgetpu_compiler (the real one only runs on x86-64 Debian/Ubuntu hosts)
    that honours the real CLI: -s -o OUTDIR MODEL writes OUTDIR/<stem>_edgetpu.tflite."""
    log = tmp_path / "argv"
    script = _executable(
        tmp_path / "edgetpu_compiler",
        f'echo "$@" > {log}\nstem=$(basename "$4" .tflite)\n'
        'cp "$4" "$3/${stem}_edgetpu.tflite"\n',
    )
    model = tmp_path / "m-f2.tflite"
    model.write_bytes(b"model")
    out = edgetpu.compile_for_edgetpu(model, which=lambda _name: script)
    assert out == tmp_path / "m-f2_edgetpu.tflite"
    assert out.read_bytes() == b"model"
    assert log.read_text().split() == ["-s", "-o", str(tmp_path), str(model)]


def test_compiler_failure_is_a_backend_error(tmp_path: Path) -> None:
    script = _executable(tmp_path / "edgetpu_compiler", "echo 'Model not quantized' >&2\nexit 1\n")
    model = tmp_path / "m.tflite"
    model.write_bytes(b"model")
    with pytest.raises(BackendError, match="Model not quantized"):
        edgetpu.compile_for_edgetpu(model, which=lambda _name: script)


def test_backend_probe_gives_the_discovery_reason(tmp_path: Path) -> None:
    backend = EdgeTPUBackend(tmp_path / "cache", root=tmp_path)
    with pytest.raises(BackendUnavailable) as info:
        backend.probe()
    assert str(info.value) == edgetpu.discover(tmp_path).reason
    with pytest.raises(BackendUnavailable):
        backend.load(rgg_problem(64))


def test_backend_refuses_operators_too_big_for_the_sram(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="limit of 50"):
        EdgeTPUBackend(tmp_path, max_nodes=50, root=tmp_path).load(rgg_problem(60))


def test_runner_uses_the_precompiled_model(tmp_path: Path) -> None:
    """The Edge TPU runner's wiring (compile step, then open) with the CPU interpreter in
    place of the delegate: a shipped `*_edgetpu.tflite` is what gets opened."""
    problem = rgg_problem(64, seed=9)
    store = ModelStore(tmp_path)
    opened: list[Path] = []

    def open_model(path: Path):
        opened.append(path)
        return open_interpreter(find_runtime(), path)

    def compile_model(path: Path) -> Path:
        shipped = path.with_name(edgetpu.compiled_name(path))
        shipped.write_bytes(path.read_bytes())  # what an off-device compile would ship
        return edgetpu.compile_for_edgetpu(path, (store.dir,), which=lambda _name: None)

    runner = Int8Runner("edgetpu", problem, store, open_model, compile_model)
    out = runner.run(np.random.default_rng(0).uniform(-1, 1, (64, 4)))
    assert opened == [tmp_path / f"{problem.key}-f4_edgetpu.tflite"]
    assert out.error_bound <= 0.03


@pytest.mark.edgetpu
def test_runs_on_a_real_edge_tpu(tmp_path: Path) -> None:
    """Needs a Coral attached, libedgetpu, and edgetpu_compiler or a pre-compiled model."""
    problem = rgg_problem(256, seed=3)
    runner = EdgeTPUBackend(Path(os.environ.get("DGDM_EDGETPU_CACHE", tmp_path))).load(problem)
    x = np.random.default_rng(0).uniform(-1, 1, (256, 16))
    out = runner.run(x)
    exact = dense_propagator(problem.t, problem.method) @ x
    assert np.linalg.norm(out.z - exact) / np.linalg.norm(exact) <= out.error_bound <= 0.03
