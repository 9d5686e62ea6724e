"""Pure decisions of the outbox: what a message costs, what to evict, what has expired.

Kept free of SQLite so that the rules can be read and tested on their own; the outbox
feeds it sizes, priorities and the time, and executes what it returns.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping

# Bytes one row costs on top of its payload: the table cell (rowid, header, five columns)
# and the (priority, seq) and (kind, seq) index entries, measured on SQLite 3.40 with
# 4 KiB pages and rounded up so that the accounted total stays at or above the file's use.
ROW_OVERHEAD_BYTES = 64
# Pages SQLite needs regardless of rows: the schema, the state and counter tables, the
# roots of the message table and its indexes, and the migrations table.
FIXED_PAGES = 12
# The file may exceed the budget by this fraction before inserts fail with SQLITE_FULL.
SLACK = 0.05

# Priorities of the kinds the outbox carries, most evictable first: telemetry, then
# results, then replies; alerts go last (SPEC §5 priorities, lower is more urgent).
EVICTION_ORDER = (3, 2, 1, 0)


def row_cost(payload_len: int) -> int:
    """Accounted bytes of one stored message."""
    return payload_len + ROW_OVERHEAD_BYTES


def row_budget(max_bytes: int, page_size: int) -> int:
    """Bytes available to rows once the fixed pages are paid for."""
    return max(0, max_bytes - FIXED_PAGES * page_size)


def page_cap(max_bytes: int, page_size: int) -> int:
    """PRAGMA max_page_count: the hard ceiling on the database file, `SLACK` above budget."""
    return max(FIXED_PAGES + 4, math.floor(max_bytes * (1 + SLACK) / page_size))


# SQLITE_FULL with less than this free on the file system is a full disk, not the page cap.
DISK_MARGIN_BYTES = 256 * 1024

# Steer the file's used pages to this fraction of max_bytes, leaving SLACK as headroom.
TARGET_FILL = 0.97


def calibrated_budget(accounted: int, used_page_bytes: int, max_bytes: int, page_size: int) -> int:
    """The row budget that would put the used pages at TARGET_FILL of max_bytes, assuming
    pages per accounted byte stay as they are now; never above the uncalibrated budget."""
    ceiling = row_budget(max_bytes, page_size)
    if accounted <= 0 or used_page_bytes <= 0:
        return ceiling
    ideal = accounted * (max_bytes * TARGET_FILL) / used_page_bytes
    return max(page_size, min(ceiling, int(ideal)))


def wal_pages(max_bytes: int, page_size: int, free_bytes: int) -> int:
    """WAL auto-checkpoint threshold: about 2 % of the budget and of the free disk space,
    between 32 and 1000 pages; on a small disk a big WAL would be what fills it."""
    return max(32, min(1000, max_bytes // page_size // 50, free_bytes // page_size // 50))


def eviction_headroom(budget: int) -> int:
    """Evict this much beyond what is needed, so a full outbox evicts once per many inserts
    rather than on every one (each eviction is a query and a delete)."""
    return budget // 50


def bytes_to_free(used: int, incoming: int, budget: int) -> int:
    """How much must go before `incoming` more bytes fit (0 when they already do)."""
    return max(0, used + incoming - budget)


def eviction_tiers(incoming_priority: int) -> tuple[int, ...]:
    """Priorities a new message may evict, in order: never anything more urgent than itself."""
    return tuple(p for p in EVICTION_ORDER if p >= incoming_priority)


def plan_eviction(
    need: int, bytes_by_priority: Mapping[int, int], incoming_priority: int
) -> dict[int, int] | None:
    """Bytes to free from each priority tier (oldest first within it), or None if the
    evictable tiers together cannot free `need` bytes and the new message must be refused."""
    plan: dict[int, int] = {}
    remaining = need
    for priority in eviction_tiers(incoming_priority):
        if remaining <= 0:
            break
        take = min(remaining, bytes_by_priority.get(priority, 0))
        if take > 0:
            plan[priority] = take
            remaining -= take
    return plan if remaining <= 0 else None


def oldest_covering(rows: Iterable[tuple[int, int]], need: int) -> tuple[int, int, int]:
    """Walk (seq, cost) rows oldest first until `need` bytes are covered.

    Returns (last seq to delete, how many rows, bytes freed); (0, 0, 0) when need <= 0.
    """
    last_seq = count = freed = 0
    for seq, cost in rows:
        if freed >= need:
            break
        last_seq, count, freed = seq, count + 1, freed + cost
    return last_seq, count, freed


def expiry_cutoffs(ttl_s: Mapping[int, float] | None, now_ms: int) -> dict[int, int]:
    """For each kind with a TTL, the created_ms below which its messages have expired."""
    if not ttl_s:
        return {}
    return {kind: now_ms - round(ttl * 1000) for kind, ttl in ttl_s.items() if ttl is not None}


class WriteFallback(enum.Enum):
    """What the writer does after a batch's transaction failed and was rolled back."""

    FAIL_ALL = "fail_all"  # not SQLITE_FULL: every request of the batch fails with it
    SHRINK_BUDGET = "shrink_budget"  # rows took more pages than accounted: evict more, retry
    REFUSE_AT_PAGE_CAP = "refuse_at_page_cap"  # shrunk enough: refuse the messages, retry
    TRUNCATE_WAL = "truncate_wal"  # the WAL is what gives space back at once; retry
    FAIL_OTHERS = "fail_others"  # the disk is full even for receipts and state
    ENTER_FULL_MODE = "enter_full_mode"  # free the ballast, refuse the messages, retry


# Budget shrinks per batch before its messages are refused at the page cap.
MAX_BUDGET_SHRINKS = 20
BUDGET_SHRINK = 0.9


def after_write_error(
    *,
    sqlite_full: bool,
    has_messages: bool,
    disk_has_room: bool,
    shrinks: int,
    wal_truncated: bool,
    full_mode: bool,
) -> WriteFallback:
    """SQLITE_FULL means the page cap (the file system still has room for the batch) or a
    full disk. The page cap is met by a smaller budget (more eviction); a full disk first
    by truncating the WAL, then by full mode, where only reads and deletes work."""
    if not sqlite_full:
        return WriteFallback.FAIL_ALL
    if has_messages and disk_has_room:
        if shrinks < MAX_BUDGET_SHRINKS:
            return WriteFallback.SHRINK_BUDGET
        return WriteFallback.REFUSE_AT_PAGE_CAP
    if not wal_truncated:
        return WriteFallback.TRUNCATE_WAL
    if not has_messages or full_mode:
        return WriteFallback.FAIL_OTHERS
    return WriteFallback.ENTER_FULL_MODE
