"""The diffusion method block of a request (SPEC §2, §3 `method`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dgdm.common.fields import unknown_field
from dgdm.kernels.errors import MethodError

KINDS = ("ppr", "heat", "poly")
NORMALIZATIONS = ("sym", "col", "row")
MAX_K = 1000
MAX_COEFFICIENTS = 1000
# Below this the exact ppr needs over 10^7 products (ln(tol) / ln(1 - alpha)) and the
# series no longer decays: a denormal alpha only ever ends at the deadline, or overflows.
MIN_ALPHA = 1e-6
_METHOD_KEYS = frozenset({"kind", "alpha", "t", "coefficients", "normalization", "self_loops", "k"})


@dataclass(frozen=True)
class Method:
    """What to compute. `k` None means the exact form (ppr solve, heat expm action)."""

    kind: str = "ppr"
    alpha: float = 0.15
    t: float = 5.0
    coefficients: tuple[float, ...] = ()
    normalization: str = "sym"
    self_loops: bool = True
    k: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "normalization": self.normalization,
            "self_loops": self.self_loops,
        }
        if self.kind == "ppr":
            out |= {"alpha": self.alpha, "k": self.k}
        elif self.kind == "heat":
            out |= {"t": self.t, "k": self.k}
        else:
            out["coefficients"] = list(self.coefficients)
        return out


def parse_method(obj: Any, field: str = "method") -> Method:
    """Validate a JSON method block; every error names the offending field."""
    if obj is None:
        return Method()
    if not isinstance(obj, Mapping):
        raise MethodError(field, "must be an object")
    unknown = unknown_field(obj, _METHOD_KEYS)
    if unknown is not None:
        raise MethodError(f"{field}.{unknown}", "is not a known method field")
    kind = obj.get("kind", "ppr")
    if kind not in KINDS:
        raise MethodError(f"{field}.kind", f"must be one of {', '.join(KINDS)}")
    norm = obj.get("normalization", "sym")
    if norm not in NORMALIZATIONS:
        raise MethodError(f"{field}.normalization", f"must be one of {', '.join(NORMALIZATIONS)}")
    self_loops = obj.get("self_loops", True)
    if not isinstance(self_loops, bool):
        raise MethodError(f"{field}.self_loops", "must be true or false")
    alpha = _number(obj.get("alpha", 0.15), f"{field}.alpha")
    if not MIN_ALPHA <= alpha <= 1.0:
        raise MethodError(f"{field}.alpha", f"must be in [{MIN_ALPHA:g}, 1] (0 excluded)")
    t = _number(obj.get("t", 5.0), f"{field}.t")
    if not 0.0 <= t <= 1000.0:
        raise MethodError(f"{field}.t", "must be in [0, 1000]")
    k = _parse_k(obj.get("k"), f"{field}.k")
    coefficients = _parse_coefficients(obj.get("coefficients"), kind, field)
    return Method(kind, alpha, t, coefficients, norm, self_loops, k)


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MethodError(field, "must be a number")
    if not math.isfinite(value):
        raise MethodError(field, "must be finite")
    return float(value)


def _parse_k(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise MethodError(field, "must be an integer or null")
    if not 0 <= value <= MAX_K:
        raise MethodError(field, f"must be in [0, {MAX_K}]")
    return value


def _parse_coefficients(value: Any, kind: str, field: str) -> tuple[float, ...]:
    if kind != "poly":
        if value is not None:
            raise MethodError(f"{field}.coefficients", "only applies to kind 'poly'")
        return ()
    if not isinstance(value, list) or not value:
        raise MethodError(f"{field}.coefficients", "must be a non-empty list of numbers")
    if len(value) > MAX_COEFFICIENTS:
        raise MethodError(f"{field}.coefficients", f"has more than {MAX_COEFFICIENTS} entries")
    return tuple(_number(c, f"{field}.coefficients[{i}]") for i, c in enumerate(value))
