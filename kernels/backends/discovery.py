"""Which backends this machine has: each one constructed (or deferred) and probed once,
wrapped in a `Slot` that the engine then keeps its health in.

The numpy backend is always there; the int8 and sparse ones are imported on their first
`load` (`_DeferredBackend`) so that an agent that never uses them does not pay for their
imports. A backend that cannot start is a Slot marked unavailable, with the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgdm.kernels.backends.base import Backend, Problem, Runner
from dgdm.kernels.errors import BackendUnavailable

BACKEND_NAMES = ("edgetpu", "tflite", "numpy", "sparse")
_BACKEND_CLASSES = {
    "numpy": ("dgdm.kernels.backends.numpy_backend", "NumpyBackend"),
    "sparse": ("dgdm.kernels.backends.sparse_backend", "SparseBackend"),
    "tflite": ("dgdm.kernels.backends.tflite_backend", "TFLiteBackend"),
    "edgetpu": ("dgdm.kernels.backends.edgetpu_backend", "EdgeTPUBackend"),
}
_WITH_CACHE_DIR = frozenset({"tflite", "edgetpu"})
FIRST_BACKOFF_S = 1.0


@dataclass
class Slot:
    """One backend and what the engine knows about its health."""

    name: str
    backend: Backend | None
    available: bool
    reason: str
    healthy: bool = True
    failures: int = 0
    fallbacks: int = 0
    # Its last run failed (a re-probe makes it eligible again; only a run clears this).
    failing: bool = False
    last_error: str = ""
    backoff: float = FIRST_BACKOFF_S
    next_probe: float = 0.0

    @property
    def eligible(self) -> bool:
        return self.backend is not None and self.available and self.healthy


def discover(cache_dir: Path | None, now: float) -> list[Slot]:
    return [_construct(name, cache_dir, now) for name in BACKEND_NAMES]


def _construct(name: str, cache_dir: Path | None, now: float) -> Slot:
    args = (cache_dir / name if cache_dir else None,) if name in _WITH_CACHE_DIR else ()
    if name in _CHEAP_PROBES:
        return _probed(name, _DeferredBackend(name, args, _CHEAP_PROBES[name]), now)
    try:
        backend = _backend_class(name)(*args)
    except ImportError as exc:
        return Slot(name, None, False, f"{name} is not installed ({exc}).")
    except Exception as exc:  # noqa: BLE001 - a backend that cannot start is only unavailable
        return Slot(name, None, False, f"{name} could not start: {exc}")
    return _probed(name, backend, now)


def _backend_class(name: str) -> Any:
    module_name, class_name = _BACKEND_CLASSES[name]
    return getattr(importlib.import_module(module_name), class_name)


class _DeferredBackend:
    """A backend whose module is imported on its first `load`, not when the engine starts:
    the int8 ones bring the TFLite schema and runtime (~11 MB), sparse brings scipy's csgraph
    and linalg (~11 MB); an agent that only diffuses small graphs on numpy never pays for
    them. Until then `probe` is a cheap check that the packages are installed (and, for the
    Edge TPU, that one is attached); after, it is the backend's own."""

    def __init__(self, name: str, args: tuple[Any, ...], cheap_probe: Callable[[], None]) -> None:
        self.name = name
        self._args = args
        self._cheap_probe = cheap_probe
        self._backend: Backend | None = None
        self._lock = threading.Lock()

    def probe(self) -> None:
        backend = self._backend
        if backend is None:
            self._cheap_probe()
        else:
            backend.probe()

    def load(self, problem: Problem) -> Runner:
        return self._loaded().load(problem)

    def _loaded(self) -> Backend:
        with self._lock:
            if self._backend is None:
                try:
                    backend = _backend_class(self.name)(*self._args)
                except ImportError as exc:
                    raise BackendUnavailable(f"{self.name} is not installed ({exc}).") from exc
                backend.probe()
                self._backend = backend
            return self._backend


def _tflite_installed() -> None:
    for package in ("flatbuffers", "tflite"):  # the model writer
        if importlib.util.find_spec(package) is None:
            raise BackendUnavailable(f"tflite is not installed (no {package} package).")
    if not any(importlib.util.find_spec(m) for m in ("ai_edge_litert", "tflite_runtime")):
        raise BackendUnavailable("neither ai-edge-litert nor tflite-runtime is installed.")


def _edgetpu_attached() -> None:
    from dgdm.kernels import edgetpu

    state = edgetpu.discover()
    if not state.present:
        raise BackendUnavailable(state.reason)
    _tflite_installed()


def _always() -> None:
    """scipy.sparse is a dependency; only its csgraph (~11 MB with scipy.linalg) waits."""


_CHEAP_PROBES: dict[str, Callable[[], None]] = {
    "sparse": _always,
    "tflite": _tflite_installed,
    "edgetpu": _edgetpu_attached,
}


def given(backends: Sequence[Backend], now: float) -> list[Slot]:
    return [_probed(b.name, b, now) for b in backends]


def _probed(name: str, backend: Backend, now: float) -> Slot:
    try:
        backend.probe()
    except Exception as exc:  # noqa: BLE001 - BackendUnavailable or a runtime's own error
        slot = Slot(name, backend, False, str(exc) or type(exc).__name__)
        slot.next_probe = now + slot.backoff
        return slot
    return Slot(name, backend, True, "")
