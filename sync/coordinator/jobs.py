"""Jobs: one command sent to a group of devices. The pure decisions, no I/O.

A job's request (`parse_job`), each device's state machine (`TRANSITIONS`), the failure
gate (`gate`) and the pacing of sends (`pace`); jobs_store.py applies them in the store's
transactions and jobs_runner.py drives them.

Per-device states: `queued` (not sent yet: the device is offline or the pace holds it),
`sent` (its command seq is allocated and published, or being published), then one of
`succeeded` (reply ok), `failed` (error reply), `timed_out` (no reply within `timeout_s`
of the send, or the job's TTL ran out while it was queued), `cancelled` (the job was
cancelled or aborted before the device's turn). A job is `running` until every device is
decided (`completed`), the gate stops it (`aborted`) or an operator does (`cancelled`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dgdm.common.fields import unknown_field
from dgdm.sync.coordinator.commands import MAX_TTL_MS, BadCommand, check_command_request
from dgdm.sync.coordinator.tags import TagError, check_tags
from dgdm.sync.envelope import valid_device_id

TARGET_STATES = ("queued", "sent", "succeeded", "failed", "timed_out", "cancelled")
DECIDED = ("succeeded", "failed", "timed_out", "cancelled")
JOB_STATES = ("running", "completed", "aborted", "cancelled")

# (state, event) -> next state; an event not listed for a state changes nothing (a late
# reply to a timed-out command, a cancel after the reply).
TRANSITIONS: dict[tuple[str, str], str] = {
    ("queued", "claim"): "sent",
    ("queued", "ttl_expired"): "timed_out",
    ("queued", "cancel"): "cancelled",
    ("sent", "reply_ok"): "succeeded",
    ("sent", "reply_error"): "failed",
    ("sent", "reply_timeout"): "timed_out",
    ("sent", "ttl_expired"): "timed_out",  # claimed, never published, and now too late
}

DEFAULTS: dict[str, Any] = {
    "rate_per_s": 10.0,
    "max_failure_ratio": 0.1,
    "timeout_s": 60.0,
    "ttl_ms": 3_600_000,
}
MAX_RATE_PER_S = 1000.0
MAX_TIMEOUT_S = 86_400.0
MAX_IDS = 100_000
MIN_SAMPLE = 5
MIN_SAMPLE_FRACTION = 0.1
# A send's pace may catch up at most this much after a pause (an idle fleet, a restart),
# so a job never bursts beyond one second's worth of its rate.
BURST_MS = 1000


def step(state: str, event: str) -> str:
    """The state after `event`; unchanged when the event does not apply."""
    return TRANSITIONS.get((state, event), state)


def reply_event(reply: Mapping[str, Any]) -> str:
    return "reply_ok" if reply.get("ok") is True else "reply_error"


def min_sample(total: int) -> int:
    """Decided devices the gate waits for: 5, or a tenth of a large job, but never more
    than the job has (a 3-device job is judged on its 3)."""
    return min(total, max(MIN_SAMPLE, math.ceil(MIN_SAMPLE_FRACTION * total)))


def gate(counts: Mapping[str, int], total: int, max_failure_ratio: float) -> bool:
    """True: stop the job. Failures (failed + timed_out) over the decided devices (not
    counting cancelled) exceed `max_failure_ratio`, once at least min_sample are decided."""
    failures = counts.get("failed", 0) + counts.get("timed_out", 0)
    decided = failures + counts.get("succeeded", 0)
    return decided >= max(1, min_sample(total)) and failures / decided > max_failure_ratio


def job_outcome(counts: Mapping[str, int], total: int, max_failure_ratio: float) -> str:
    """A running job's state after its targets moved: `aborted` by the gate, `completed`
    when every device is decided, else still `running`."""
    if gate(counts, total, max_failure_ratio):
        return "aborted"
    if sum(counts.get(s, 0) for s in DECIDED) >= total:
        return "completed"
    return "running"


def pace(next_send_ms: int, now_ms: int, rate_per_s: float, wanted: int) -> tuple[int, int]:
    """How many sends are due now, and the job's next send time after them. One send every
    1/rate s across the whole fleet (the job's row holds `next_send_ms`, the earliest time
    of its next send, so replicas share one pace); after a pause at most BURST_MS worth of
    sends (at least one) catch up."""
    if wanted <= 0 or now_ms < next_send_ms:
        return 0, next_send_ms
    interval_ms = 1000.0 / rate_per_s
    burst = max(1, int(rate_per_s * BURST_MS / 1000))
    start = max(next_send_ms, now_ms - (burst - 1) * interval_ms)
    due = min(wanted, int((now_ms - start) // interval_ms) + 1)
    return due, math.ceil(start + due * interval_ms)


def remaining_ttl_ms(created_ms: int, ttl_ms: int, now_ms: int) -> int:
    """What is left of a job's TTL (counted from the job's creation) at `now_ms`."""
    return created_ms + ttl_ms - now_ms


# -- the request ----------------------------------------------------------------------------


class BadJob(BadCommand):
    """A job request refused: `field` names what is wrong (422)."""


@dataclass(frozen=True)
class Target:
    kind: str  # "all", "tags" or "ids"
    tags: Mapping[str, str] | None = None
    ids: tuple[str, ...] = ()

    def as_json(self) -> Any:
        if self.kind == "all":
            return "all"
        if self.kind == "tags":
            return {"tags": dict(self.tags or {})}
        return {"ids": list(self.ids)}


@dataclass(frozen=True)
class JobSpec:
    target: Target
    command: Mapping[str, Any]  # {"cmd", "args"}
    rate_per_s: float
    max_failure_ratio: float
    timeout_s: float
    ttl_ms: int


JOB_FIELDS = frozenset({"target", "command", *DEFAULTS})


def parse_job(body: Any) -> JobSpec:
    """A `POST /jobs` body (or the CLI's) to a JobSpec; BadJob naming the field."""
    if not isinstance(body, dict):
        raise BadJob("body", "must be a JSON object")
    unknown = unknown_field(body, JOB_FIELDS)
    if unknown is not None:
        raise BadJob(unknown, "unknown field")
    values = {**DEFAULTS, **body}
    ttl_ms = values["ttl_ms"]
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or not 1 <= ttl_ms <= MAX_TTL_MS:
        raise BadJob("ttl_ms", f"must be an integer from 1 to {MAX_TTL_MS}")
    return JobSpec(
        target=parse_target(body.get("target")),
        command=_command(body.get("command")),
        rate_per_s=_number(values, "rate_per_s", 0.0, MAX_RATE_PER_S, low_open=True),
        max_failure_ratio=_number(values, "max_failure_ratio", 0.0, 1.0),
        timeout_s=_number(values, "timeout_s", 0.0, MAX_TIMEOUT_S, low_open=True),
        ttl_ms=ttl_ms,
    )


def parse_target(target: Any) -> Target:
    if target == "all":
        return Target("all")
    if not isinstance(target, dict) or len(target) != 1 or not {"tags", "ids"} & set(target):
        raise BadJob("target", 'must be "all", {"tags": {...}} or {"ids": [...]}')
    if "tags" in target:
        try:
            tags = check_tags(target["tags"])
        except TagError as exc:
            raise BadJob("target.tags", exc.message if exc.field == "tags" else str(exc)) from None
        if not tags:
            raise BadJob("target.tags", 'give at least one tag (or target "all")')
        return Target("tags", tags=tags)
    ids = target["ids"]
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_IDS:
        raise BadJob("target.ids", f"must be a list of 1 to {MAX_IDS} device ids")
    for device_id in ids:
        if not isinstance(device_id, str) or not valid_device_id(device_id):
            raise BadJob("target.ids", f"{device_id!r} is not a device id")
    return Target("ids", ids=tuple(dict.fromkeys(ids)))


def _command(command: Any) -> dict[str, Any]:
    if not isinstance(command, dict):
        raise BadJob("command", 'must be an object {"cmd", "args"}')
    unknown = unknown_field(command, ("cmd", "args"))
    if unknown is not None:
        raise BadJob(f"command.{unknown}", "unknown field (the job's ttl_ms is top level)")
    try:
        body = check_command_request(command.get("cmd"), command.get("args"), 1)
    except BadCommand as exc:
        raise BadJob(f"command.{exc.field}", str(exc).split(": ", 1)[-1]) from None
    return {"cmd": body["cmd"], "args": body["args"]}


def _number(
    values: Mapping[str, Any], name: str, low: float, high: float, *, low_open: bool = False
) -> float:
    value = values[name]
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (low < value if low_open else low <= value) and value <= high:
        return float(value)
    bound = f"above {low:g}" if low_open else f"from {low:g}"
    raise BadJob(name, f"must be a number {bound} to {high:g}")
