"""The agent's JSON codec: orjson when the box has it, else the stdlib with a float32 path.

Decoding refuses NaN/Infinity and turns any failure into `BadJson`. Encoding writes numpy
arrays as lists; without orjson a float32 embedding is written with 9 significant digits.
"""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

from dgdm.agent.errors import BadJson


def _find_orjson() -> ModuleType | None:
    """orjson is optional: 2-3x faster on the hot path when a box has it."""
    try:
        import orjson
    except ImportError:  # pragma: no cover - depends on the installation
        return None
    return orjson


_orjson = _find_orjson()


def library() -> str:
    """Which encoder is in use, for benchmark reports."""
    return "orjson" if _orjson is not None else "json (stdlib)"


def loads(data: bytes | str) -> Any:
    """Decode JSON (no NaN/Infinity); any failure is `BadJson` with the parser's reason."""
    try:
        if _orjson is not None:
            return _orjson.loads(data)
        if isinstance(data, bytes):  # as json.loads does, without its per-call decoder
            data = data.decode(json.detect_encoding(data), "surrogatepass")
        return _DECODER.decode(data)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise BadJson(f"body is not valid JSON: {exc}") from exc


def dumps(obj: Any) -> bytes:
    if _orjson is not None:
        return _orjson.dumps(obj, default=_plain, option=_orjson.OPT_SERIALIZE_NUMPY)
    return _stdlib_dumps(obj).encode()


def dumps_answer_chunked(answer: dict[str, Any], values_per_chunk: int = 20_000) -> bytes:
    """`dumps(answer)` for a large embedding, encoded a block of rows at a time: each
    encoder call holds the GIL only briefly, so the event loop thread keeps getting it."""
    z = answer["embedding"]
    head = dumps({k: v for k, v in answer.items() if k != "embedding"})
    rows = max(1, values_per_chunk // max(1, z.shape[1]))
    blocks = [dumps(z[i : i + rows])[1:-1] for i in range(0, z.shape[0], rows)]
    return head[:-1] + b',"embedding":[' + b",".join(blocks) + b"]}"


def _stdlib_dumps(obj: Any) -> str:
    """json's encoder, except for a float32 embedding (alone or in an answer): written with
    9 significant digits, which round-trip float32 exactly, instead of the 17 of its float64
    repr (half the bytes, ~2x faster)."""
    if _is_float32_matrix(obj):
        return _float32_matrix(obj)
    if isinstance(obj, dict) and _is_float32_matrix(obj.get("embedding")):
        head = _ENCODER.encode({k: v for k, v in obj.items() if k != "embedding"})
        sep = "," if len(obj) > 1 else ""
        return f'{head[:-1]}{sep}"embedding":{_float32_matrix(obj["embedding"])}}}'
    return _ENCODER.encode(obj)


def _is_float32_matrix(value: Any) -> bool:
    return getattr(value, "ndim", None) == 2 and str(value.dtype) == "float32"


def _float32_matrix(z: Any) -> str:
    import numpy as np

    if not np.isfinite(z).all():  # json's own spelling (Infinity, NaN), as before
        return _ENCODER.encode(z.tolist())
    if z.shape[0] == 0:
        return "[]"
    rows = "],[".join(",".join(map(_FLOAT32.format, row)) for row in z.tolist())
    return f"[[{rows}]]"


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars: one C conversion to lists
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


# The stdlib path, when orjson is absent: json.loads/dumps with options build a new decoder
# or encoder on every call; these are made once (both are stateless and thread-safe).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_plain)
_FLOAT32 = "{:.9g}"
