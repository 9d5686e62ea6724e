"""The fault injectors: `begin(rig, fault)` puts a fault in place, `finish(rig, fault)` ends
it (restarts what was killed, brings the link up, frees the disk, steps the clock back).
Both return once the action is done, not once the system has recovered: recovery is what
the health watch measures."""

from __future__ import annotations

import contextlib
import errno
import signal
from collections.abc import Callable
from pathlib import Path

from .rig import Rig
from .schedule import DISK_AGENT, Fault

FILLER = "chaos-filler"


def _agent_kill(rig: Rig, fault: Fault, begin: bool) -> None:
    part = rig.agents[fault.params["agent"]].part
    if begin:
        part.kill()
    else:
        part.start()


def _broker_kill(rig: Rig, fault: Fault, begin: bool) -> None:
    assert rig.broker is not None
    if begin:
        rig.broker.kill()
    else:
        rig.broker.start()


def _coordinator_kill(rig: Rig, fault: Fault, begin: bool) -> None:
    part = rig.coordinators[fault.params["replica"]]
    if begin:
        part.kill()
    else:
        part.start()


def _coordinator_stop(rig: Rig, fault: Fault, begin: bool) -> None:
    rig.coordinators[fault.params["replica"]].signal(signal.SIGSTOP if begin else signal.SIGCONT)


def _link_cut(rig: Rig, fault: Fault, begin: bool) -> None:
    assert rig.netns is not None
    rig.netns.link(up=not begin)


def _link_slow(rig: Rig, fault: Fault, begin: bool) -> None:
    assert rig.netns is not None
    rig.netns.slow(fault.params["rate_kbit"] if begin else None)


def fill(directory: Path) -> int:
    """Write a file until the file system is full; the bytes written."""
    written = 0
    chunk = b"\0" * (1 << 20)
    with (directory / FILLER).open("wb", buffering=0) as out:
        while True:
            try:
                written += out.write(chunk) or 0
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:  # every last byte is taken
                    return written
                chunk = chunk[: len(chunk) // 16 or 1]


def _disk_full(rig: Rig, fault: Fault, begin: bool) -> None:
    data_dir = rig.agents[DISK_AGENT].data_dir
    if begin:
        fill(data_dir)
    else:
        with contextlib.suppress(FileNotFoundError):
            (data_dir / FILLER).unlink()


def _clock_step(rig: Rig, fault: Fault, begin: bool) -> None:
    offset = fault.params["offset_s"] if begin else 0
    rig.clock_file.write_text(f"{offset:+d}\n")


def _pg_restart(rig: Rig, fault: Fault, begin: bool) -> None:
    if begin:
        rig.pg.stop(immediate=fault.params["mode"] == "immediate")
    else:
        rig.pg.start()


INJECTORS: dict[str, Callable[[Rig, Fault, bool], None]] = {
    "agent_kill": _agent_kill,
    "broker_kill": _broker_kill,
    "coordinator_kill": _coordinator_kill,
    "coordinator_stop": _coordinator_stop,
    "link_cut": _link_cut,
    "link_slow": _link_slow,
    "disk_full": _disk_full,
    "clock_step": _clock_step,
    "pg_restart": _pg_restart,
}


def begin(rig: Rig, fault: Fault) -> None:
    INJECTORS[fault.kind](rig, fault, True)


def finish(rig: Rig, fault: Fault) -> None:
    INJECTORS[fault.kind](rig, fault, False)
