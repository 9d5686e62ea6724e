"""The start-up heap is frozen out of full collections (common/heap.py)."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator

import pytest

from dgdm.common import heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_what_lives_after_start_is_frozen_and_a_full_pass_skips_it(unfrozen: None) -> None:
    import aiohttp.web  # noqa: F401 - a service's heap: its modules
    import scipy.sparse  # noqa: F401

    def full_pass_s() -> float:
        start = time.perf_counter()
        gc.collect()
        return time.perf_counter() - start

    before = min(full_pass_s() for _ in range(3))
    frozen = heap.freeze_after_start()
    assert frozen == gc.get_freeze_count() > 10_000
    after = min(full_pass_s() for _ in range(3))
    assert after < before / 5, (before, after)


def test_garbage_made_later_is_still_collected(unfrozen: None) -> None:
    heap.freeze_after_start()

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # type: ignore[attr-defined]
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None  # a cycle: reference counting alone keeps it
    gc.collect()
    assert gone() is None
