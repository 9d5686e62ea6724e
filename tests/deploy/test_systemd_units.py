"""The systemd units in systemd/: `systemd-analyze verify` is silent, the agent is hardened.

systemd is not PID 1 in CI, but `verify` and `security --offline=yes` work on files. `verify`
exits 0 on unknown keys and bad values and only prints warnings, so any output fails. It
needs the ExecStart binary to exist: each unit is checked in a temporary root with the stock
units copied in and stub executables at its Exec*= paths (KERNELS-FACTS, systemd section).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or (
    "/usr/bin/systemd-analyze" if os.access("/usr/bin/systemd-analyze", os.X_OK) else None
)
STOCK_UNITS = Path("/usr/lib/systemd/system")
MAX_EXPOSURE = 2.0

pytestmark = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian package `systemd`; .ci/run installs it)",
)


def unit_settings(text: str) -> list[tuple[str, str]]:
    """(key, value) pairs of a unit file, in order; comments and section headers dropped."""
    pairs = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        pairs.append((key.strip(), value.strip()))
    return pairs


def exec_paths(text: str) -> list[str]:
    """The absolute programs of every Exec*= line (prefixes like `-` or `+` removed)."""
    paths = []
    for key, value in unit_settings(text):
        if key.startswith("Exec") and value:
            program = value.split()[0].lstrip("-+!@:")
            if program.startswith("/"):
                paths.append(program)
    return paths


def make_root(tmp_path: Path, unit_text: str, name: str, dropins: tuple[Path, ...] = ()) -> Path:
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    if STOCK_UNITS.is_dir():
        shutil.copytree(STOCK_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    for program in exec_paths(unit_text):
        stub = root / program.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    (root / "etc/systemd/system" / name).write_text(unit_text)
    for dropin in dropins:
        target = root / "etc/systemd/system" / dropin.parent.name / dropin.name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(dropin, target)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False
    )


def verify(
    tmp_path: Path, unit_text: str, name: str, dropins: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess[str]:
    root = make_root(tmp_path, unit_text, name, dropins)
    unit = root / "etc/systemd/system" / name
    return analyze("verify", f"--root={root}", "--man=no", str(unit))


def exposure(
    tmp_path: Path, name: str, dropins: tuple[Path, ...] = ()
) -> tuple[float, subprocess.CompletedProcess[str]]:
    root = make_root(tmp_path, (UNITS / name).read_text(), name, dropins)
    result = analyze("security", "--offline=yes", "--threshold=20", f"--root={root}", name)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, f"no exposure level in:\n{result.stdout}\n{result.stderr}"
    return float(match.group(1)), result


@pytest.mark.parametrize("name", ["dgdm-agent.service", "dgdm-coordinator.service"])
def test_unit_verifies_without_any_output(tmp_path: Path, name: str) -> None:
    result = verify(tmp_path, (UNITS / name).read_text(), name)
    assert result.returncode == 0
    assert result.stdout + result.stderr == ""


def test_verify_check_catches_a_bad_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key only warns, and the warning is the signal."""
    text = (UNITS / "dgdm-agent.service").read_text().replace("WatchdogSec=", "WatchdogSecs=")
    result = verify(tmp_path, text, "dgdm-agent.service")
    assert "WatchdogSecs" in result.stdout + result.stderr


def test_agent_exposure_is_ok(tmp_path: Path) -> None:
    score, result = exposure(tmp_path, "dgdm-agent.service")
    print(f"systemd-analyze security dgdm-agent.service: exposure {score}")
    assert score <= MAX_EXPOSURE
    assert result.returncode == 0, result.stdout[-2000:]


def test_usb_coral_dropin_verifies_and_keeps_the_exposure_ok(tmp_path: Path) -> None:
    """Hosts with a Coral USB Accelerator also get AF_NETLINK (libusb needs udev events)."""
    dropin = UNITS / "dgdm-agent.service.d" / "coral-usb.conf"
    name = "dgdm-agent.service"
    result = verify(tmp_path / "verify", (UNITS / name).read_text(), name, (dropin,))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    score, result = exposure(tmp_path / "security", name, (dropin,))
    print(f"systemd-analyze security dgdm-agent.service + coral-usb.conf: exposure {score}")
    assert "RestrictAddressFamilies=~AF_NETLINK" in result.stdout
    assert score <= MAX_EXPOSURE


def test_coordinator_exposure_is_ok(tmp_path: Path) -> None:
    score, _ = exposure(tmp_path, "dgdm-coordinator.service")
    print(f"systemd-analyze security dgdm-coordinator.service: exposure {score}")
    assert score <= MAX_EXPOSURE


def test_agent_unit_has_what_the_service_relies_on() -> None:
    """The agent's contract with systemd (issue 5): notify + watchdog, credentials, devices."""
    settings = unit_settings((UNITS / "dgdm-agent.service").read_text())
    one = dict(settings)
    many: dict[str, list[str]] = {}
    for key, value in settings:
        many.setdefault(key, []).append(value)
    assert one["Type"] == "notify"
    assert one["WatchdogSec"]
    assert one["Restart"] == "on-failure"
    assert int(one["StartLimitBurst"]) > 0
    assert one["User"] == "dgdm"
    assert one["StateDirectory"] == "dgdm"
    assert one["ConfigurationDirectory"] == "dgdm"
    assert one["LoadCredential"] == "device.key:/etc/dgdm/device.key"
    assert "DGDM__DEVICE__PRIVATE_KEY=%d/device.key" in many["Environment"]
    assert one["ExecStart"] == "/opt/dgdm/current/bin/dgdm agent --config /etc/dgdm/agent.toml"
    assert one["DevicePolicy"] == "closed"
    assert {"/dev/apex_0 rw", "char-usb_device rw"} <= set(many["DeviceAllow"])
    assert {"apex", "plugdev"} <= set(one["SupplementaryGroups"].split())
    assert one["CapabilityBoundingSet"] == ""
    assert one["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert "@system-service" in many["SystemCallFilter"]
    assert "PrivateDevices" not in one, "PrivateDevices=yes would hide /dev/apex_0"
    assert "ProcSubset" not in one, "ProcSubset=pid hides /proc/stat and /proc/meminfo"


@pytest.mark.parametrize("name", ["dgdm-agent.service", "dgdm-coordinator.service"])
def test_unit_bounds_memory_tasks_and_files_on_purpose(name: str) -> None:
    """Each bound set (not inherited: 1024 files let 1,010 half-open connections stop it)."""
    one = dict(unit_settings((UNITS / name).read_text()))
    size = {"K": 2**10, "M": 2**20, "G": 2**30}
    high, peak = (int(one[k][:-1]) * size[one[k][-1]] for k in ("MemoryHigh", "MemoryMax"))
    assert 0 < high < peak
    assert 64 <= int(one["TasksMax"]) <= 4096
    # A single number: soft = hard, as the service cannot call setrlimit (~@resources).
    assert int(one["LimitNOFILE"]) >= 8192
    assert "@resources" in one["SystemCallFilter"]  # the reason soft = hard
