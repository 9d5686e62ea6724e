"""The TFLite interpreter, from whichever runtime imports: ai-edge-litert or tflite-runtime.

ai-edge-litert first (numpy 2, 3-5x faster for these models); tflite-runtime is what Coral
hosts use with libedgetpu (KERNELS-FACTS.md: Runtimes). Library errors become BackendError
or BackendUnavailable here, so callers never see a runtime's own exception types.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgdm.kernels.errors import BackendError, BackendUnavailable

_MODULES = (
    ("ai-edge-litert", "ai_edge_litert.interpreter"),
    ("tflite-runtime", "tflite_runtime.interpreter"),
)


@dataclass(frozen=True)
class Runtime:
    name: str
    interpreter_cls: Any
    load_delegate: Any


def find_runtime() -> Runtime:
    """The first runtime that imports, or BackendUnavailable naming both."""
    for name, module_name in _MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        return Runtime(name, module.Interpreter, module.load_delegate)
    raise BackendUnavailable("neither ai-edge-litert nor tflite-runtime is installed.")


def open_interpreter(
    runtime: Runtime, model_path: Path, num_threads: int = 1, delegates: list | None = None
) -> Any:
    """An interpreter with tensors allocated; a missing or corrupt model raises BackendError."""
    kwargs: dict[str, Any] = {"model_path": str(model_path), "num_threads": num_threads}
    if delegates:
        kwargs["experimental_delegates"] = delegates
    try:
        interpreter = runtime.interpreter_cls(**kwargs)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError, OSError) as exc:
        raise BackendError(f"{runtime.name} could not load {model_path.name}: {exc}") from exc
    return interpreter


def load_delegate(runtime: Runtime, library: str, options: dict[str, str]) -> Any:
    """A delegate from a shared library; absent or unusable -> BackendUnavailable."""
    try:
        return runtime.load_delegate(library, options)
    except (OSError, ValueError, RuntimeError) as exc:
        raise BackendUnavailable(f"the {library} delegate could not be loaded ({exc}).") from exc
