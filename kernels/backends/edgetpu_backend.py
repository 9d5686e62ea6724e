"""Edge TPU backend: the tflite backend's int8 model, compiled for and run on a Coral TPU.

Same model, host-side quantisation, caching and error bound as `tflite_backend`; the
differences are the compile step (`edgetpu.compile_for_edgetpu`) and the interpreter, which
gets the `libedgetpu.so.1` delegate for one device (":0" = the first TPU of any kind).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from dgdm.kernels import edgetpu
from dgdm.kernels.backends.base import Problem
from dgdm.kernels.backends.tflite_backend import Int8Runner, ModelStore, check_size
from dgdm.kernels.errors import BackendUnavailable
from dgdm.kernels.tflite_runtime import find_runtime, load_delegate, open_interpreter

# Up to here an N x N int8 operator stays in the ~8 MB on-chip SRAM (KERNELS-FACTS.md).
DEFAULT_MAX_NODES = 2700


class EdgeTPUBackend:
    """The int8 model on a Coral Edge TPU (USB, PCIe or M.2)."""

    name = "edgetpu"

    def __init__(
        self,
        cache_dir: Path | None = None,
        max_nodes: int = DEFAULT_MAX_NODES,
        device: str = ":0",
        root: Path | str = "/",
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_nodes = max_nodes
        self.device = device
        self.root = Path(root)
        self._store: ModelStore | None = None
        self._delegate: Any = None
        self._lock = threading.Lock()

    def probe(self) -> None:
        state = edgetpu.discover(self.root)
        if not state.present:
            raise BackendUnavailable(state.reason)
        find_runtime()

    def load(self, problem: Problem) -> Int8Runner:
        check_size(problem, self.max_nodes, self.name)
        self.probe()
        runtime = find_runtime()
        delegate = self._shared_delegate(runtime)
        store = self._model_store()

        def open_model(path: Path) -> Any:
            return open_interpreter(runtime, path, 1, [delegate])

        def compile_model(path: Path) -> Path:
            return edgetpu.compile_for_edgetpu(path, (store.dir,))

        return Int8Runner(self.name, problem, store, open_model, compile_model)

    def _shared_delegate(self, runtime) -> Any:
        """One delegate per device, shared by every interpreter of this backend."""
        with self._lock:
            if self._delegate is None:
                options = {"device": self.device}
                self._delegate = load_delegate(runtime, edgetpu.LIBRARY, options)
            return self._delegate

    def _model_store(self) -> ModelStore:
        with self._lock:
            if self._store is None:
                self._store = ModelStore(self.cache_dir)
            return self._store
