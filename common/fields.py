"""The unknown-field check every JSON parser makes (graph, method, topology and job
bodies, the coordinator's command body): one rule, so that each names the same key."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any


def unknown_field(keys: Iterable[Any], known: Collection[Any]) -> str | None:
    """The first of `keys` not in `known`, in sorted order (so that the answer does not
    depend on the order of the JSON's members), or None when every key is known."""
    unknown = [key for key in keys if key not in known]
    return str(min(unknown, key=str)) if unknown else None
