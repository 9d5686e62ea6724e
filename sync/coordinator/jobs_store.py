"""The jobs' SQL, shared by SqliteStore and PgStore: each function runs inside the
caller's transaction (`Tx`) and applies jobs.py's decisions.

Exactly one replica sends each device's command: `tick` takes each running job's row with
`FOR UPDATE SKIP LOCKED` on PostgreSQL (SQLite has one process and its write lock), and
claims a target by allocating its command seq, storing the command and recording the seq,
an owner and a lease on the target, all in that one transaction, before anything is
published. The owner publishes after the commit and then clears its claim
(`published`). A replica killed in between leaves claims whose lease runs out: the next
tick, on any replica, publishes the same seq again — never a second seq — and a device
executes a command seq at most once (SPEC §6), so no device runs a job's command twice.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from dgdm.sync.coordinator.jobs import (
    JOB_STATES,
    TARGET_STATES,
    BadJob,
    JobSpec,
    job_outcome,
    pace,
    remaining_ttl_ms,
    reply_event,
    step,
)


@dataclass(frozen=True)
class Dialect:
    placeholder: str
    lock_jobs: str  # appended to the SELECT of running jobs
    lock_targets: str  # appended to a SELECT of target rows (joined as `jt`)
    lock_job: str  # appended to the SELECT of one job an operator cancels


SQLITE = Dialect("?", "", "", "")
POSTGRES = Dialect("%s", " FOR UPDATE SKIP LOCKED", " FOR UPDATE OF jt SKIP LOCKED", " FOR UPDATE")


class Tx:
    """A connection inside a transaction; SQL is written with `?` placeholders."""

    def __init__(self, conn: Any, dialect: Dialect) -> None:
        self.conn = conn
        self.dialect = dialect

    def _sql(self, sql: str) -> str:
        return sql if self.dialect.placeholder == "?" else sql.replace("?", "%s")

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self.conn.execute(self._sql(sql), tuple(params)).fetchall())

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        rows = self.all(sql, params)
        return rows[0] if rows else None

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return int(self.conn.execute(self._sql(sql), tuple(params)).rowcount)

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        if self.dialect is SQLITE:
            self.conn.executemany(sql, rows)
        else:
            with self.conn.cursor() as cur:
                cur.executemany(self._sql(sql), rows)


class Send(NamedTuple):
    """A claimed command to publish: the stored command exactly (same seq, created_ms and
    body when it is published again after a lost claim)."""

    job_id: int
    device_id: str
    seq: int
    created_ms: int
    body: dict[str, Any]


@dataclass
class Tick:
    sends: list[Send] = field(default_factory=list)
    aborted: list[int] = field(default_factory=list)  # jobs this tick's gate stopped
    active_jobs: int = 0
    active_targets: dict[str, int] = field(default_factory=dict)  # state -> count


_JOB_COLUMNS = (
    "id, created_ms, target, command, rate_per_s, max_failure_ratio, timeout_s, ttl_ms,"
    " state, next_send_ms, finished_ms, reason"
)
_JOB_NAMES = [c.strip() for c in _JOB_COLUMNS.split(",")]
_DUMPS = json.JSONEncoder(separators=(",", ":")).encode


# -- creating, reading, cancelling ----------------------------------------------------------


def create_job(tx: Tx, spec: JobSpec, now_ms: int) -> dict[str, Any]:
    devices = _resolve(tx, spec)
    if not devices:
        raise BadJob("target", "matches no enrolled device")
    row = tx.one(
        "INSERT INTO jobs (created_ms, target, command, rate_per_s, max_failure_ratio,"
        " timeout_s, ttl_ms, state) VALUES (?, ?, ?, ?, ?, ?, ?, 'running') RETURNING id",
        (
            now_ms,
            _DUMPS(spec.target.as_json()),
            _DUMPS(dict(spec.command)),
            spec.rate_per_s,
            spec.max_failure_ratio,
            spec.timeout_s,
            spec.ttl_ms,
        ),
    )
    assert row is not None
    job_id = int(row[0])
    tx.many(
        "INSERT INTO job_targets (job_id, device_id, state) VALUES (?, ?, 'queued')",
        [(job_id, d) for d in devices],
    )
    found = get_job(tx, job_id)
    assert found is not None
    return found


def _resolve(tx: Tx, spec: JobSpec) -> list[str]:
    """The target's enrolled devices, resolved once at creation (a device tagged later
    is not added to a running job)."""
    target = spec.target
    if target.kind == "all":
        sql = "SELECT device_id FROM devices WHERE public_key <> '' ORDER BY device_id"
        return [r[0] for r in tx.all(sql)]
    if target.kind == "tags":
        tags = dict(target.tags or {})
        pairs = " OR ".join(["(t.key = ? AND t.value = ?)"] * len(tags))
        sql = (
            "SELECT t.device_id FROM device_tags t JOIN devices d ON d.device_id = t.device_id"  # noqa: S608
            f" WHERE d.public_key <> '' AND ({pairs}) GROUP BY t.device_id"
            " HAVING count(*) = ? ORDER BY t.device_id"
        )
        return [r[0] for r in tx.all(sql, [*(x for kv in tags.items() for x in kv), len(tags)])]
    enrolled = {r[0] for r in tx.all("SELECT device_id FROM devices WHERE public_key <> ''")}
    unknown = [d for d in target.ids if d not in enrolled]
    if unknown:
        raise BadJob("target.ids", f"{unknown[0]!r} is not enrolled")
    return list(target.ids)


def list_jobs(tx: Tx, limit: int) -> list[dict[str, Any]]:
    rows = tx.all(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY id DESC LIMIT ?", (limit,))  # noqa: S608
    jobs = [_job_view(r) for r in rows]
    if jobs:
        ids = [j["id"] for j in jobs]
        marks = ",".join("?" * len(ids))
        counts = tx.all(
            f"SELECT job_id, state, count(*) FROM job_targets WHERE job_id IN ({marks})"  # noqa: S608
            " GROUP BY job_id, state",
            ids,
        )
        by_job: dict[int, dict[str, int]] = {i: {} for i in ids}
        for job_id, state, n in counts:
            by_job[int(job_id)][state] = int(n)
        for job in jobs:
            _with_counts(job, by_job[job["id"]])
    return jobs


def get_job(tx: Tx, job_id: int) -> dict[str, Any] | None:
    row = tx.one(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))  # noqa: S608
    if row is None:
        return None
    return _with_counts(_job_view(row), _counts(tx, job_id))


def job_targets(tx: Tx, job_id: int, after: str, limit: int) -> list[dict[str, Any]]:
    """A page of the job's devices in device-id order after `after` (the cursor)."""
    rows = tx.all(
        "SELECT device_id, state, seq, sent_ms, decided_ms, error FROM job_targets"
        " WHERE job_id = ? AND device_id > ? ORDER BY device_id LIMIT ?",
        (job_id, after, limit),
    )
    names = ("device_id", "state", "seq", "sent_ms", "decided_ms", "error")
    return [dict(zip(names, r, strict=True)) for r in rows]


def cancel_job(tx: Tx, job_id: int, now_ms: int) -> dict[str, Any] | None:
    """A running job's queued devices are cancelled and the job with them; the devices it
    already sent to keep their outcome. A finished job is left as it is."""
    row = tx.one("SELECT state FROM jobs WHERE id = ?" + tx.dialect.lock_job, (job_id,))  # noqa: S608
    if row is None:
        return None
    if row[0] == "running":
        _stop(tx, job_id, "cancelled", "cancelled by an operator", now_ms)
    return get_job(tx, job_id)


def _job_view(row: tuple[Any, ...]) -> dict[str, Any]:
    job = dict(zip(_JOB_NAMES, row, strict=True))
    job["target"] = json.loads(job["target"])
    job["command"] = json.loads(job["command"])
    del job["next_send_ms"]
    return job


def _counts(tx: Tx, job_id: int) -> dict[str, int]:
    rows = tx.all(
        "SELECT state, count(*) FROM job_targets WHERE job_id = ? GROUP BY state", (job_id,)
    )
    return {str(s): int(n) for s, n in rows}


def _with_counts(job: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    job["counts"] = {s: counts.get(s, 0) for s in TARGET_STATES}
    job["total"] = sum(counts.values())
    return job


def _stop(tx: Tx, job_id: int, state: str, reason: str, now_ms: int) -> None:
    assert state in JOB_STATES
    tx.run(
        "UPDATE job_targets SET state = 'cancelled', decided_ms = ?"
        " WHERE job_id = ? AND state = 'queued'",
        (now_ms, job_id),
    )
    tx.run(
        "UPDATE jobs SET state = ?, finished_ms = ?, reason = ? WHERE id = ?",
        (state, now_ms, reason, job_id),
    )


# -- the runner's tick ----------------------------------------------------------------------


def tick(tx: Tx, now_ms: int, owner: str, lease_ms: int, max_sends: int) -> Tick:
    """One turn of a replica's job runner: replies and timeouts decide sent devices (of
    any job), then each running job this replica can lock expires, gates, finishes or
    claims its next paced sends."""
    result = Tick()
    _apply_replies(tx, now_ms)
    _apply_timeouts(tx, now_ms)
    jobs = tx.all(
        "SELECT id, created_ms, ttl_ms, rate_per_s, max_failure_ratio, next_send_ms, command"  # noqa: S608
        " FROM jobs WHERE state = 'running' ORDER BY id" + tx.dialect.lock_jobs
    )
    for job in jobs:
        budget = max_sends - len(result.sends)
        sends, aborted = _run_job(
            tx, job, now_ms=now_ms, owner=owner, lease_ms=lease_ms, budget=budget
        )
        result.sends += sends
        if aborted:
            result.aborted.append(int(job[0]))
    _active(tx, result)
    return result


def _apply_replies(tx: Tx, now_ms: int) -> None:
    rows = tx.all(
        "SELECT jt.job_id, jt.device_id, c.reply FROM job_targets jt JOIN commands c"  # noqa: S608
        " ON c.device_id = jt.device_id AND c.seq = jt.seq"
        " WHERE jt.state = 'sent' AND c.reply IS NOT NULL" + tx.dialect.lock_targets
    )
    updates = []
    for job_id, device_id, text in rows:
        reply = json.loads(text)
        reply = reply if isinstance(reply, dict) else {}
        error = reply.get("error")
        error = str(error)[:500] if error is not None else None
        updates.append((step("sent", reply_event(reply)), now_ms, error, job_id, device_id))
    tx.many(
        "UPDATE job_targets SET state = ?, decided_ms = ?, error = ?, owner = NULL,"
        " lease_ms = NULL WHERE job_id = ? AND device_id = ? AND state = 'sent'",
        updates,
    )


def _apply_timeouts(tx: Tx, now_ms: int) -> None:
    """Published and unanswered for the job's timeout_s: timed_out. Rows another
    replica holds are skipped (it decides them), so two ticks never wait on each other."""
    rows = tx.all(
        "SELECT jt.job_id, jt.device_id FROM job_targets jt JOIN jobs j ON j.id = jt.job_id"  # noqa: S608
        " WHERE jt.state = 'sent' AND jt.sent_ms IS NOT NULL"
        " AND jt.sent_ms + 1000 * j.timeout_s < ?" + tx.dialect.lock_targets,
        (now_ms,),
    )
    tx.many(
        "UPDATE job_targets SET state = ?, decided_ms = ?, error = 'no reply within timeout_s'"
        " WHERE job_id = ? AND device_id = ? AND state = 'sent'",
        [(step("sent", "reply_timeout"), now_ms, j, d) for j, d in rows],
    )


def _run_job(
    tx: Tx, job: tuple[Any, ...], *, now_ms: int, owner: str, lease_ms: int, budget: int
) -> tuple[list[Send], bool]:
    job_id, created_ms, ttl_ms, rate, ratio, next_send_ms, command = job
    left_ms = remaining_ttl_ms(int(created_ms), int(ttl_ms), now_ms)
    if left_ms <= 0:
        _expire(tx, int(job_id), now_ms)
    counts = _counts(tx, int(job_id))
    outcome = job_outcome(counts, sum(counts.values()), float(ratio))
    if outcome == "aborted":
        failures = counts.get("failed", 0) + counts.get("timed_out", 0)
        reason = f"failure gate: {failures} failed or timed out, over max_failure_ratio {ratio:g}"
        _stop(tx, int(job_id), "aborted", reason, now_ms)
        return [], True
    if outcome == "completed":
        tx.run(
            "UPDATE jobs SET state = 'completed', finished_ms = ? WHERE id = ?", (now_ms, job_id)
        )
        return [], False
    if left_ms <= 0:
        return [], False
    sends = _reclaim(tx, int(job_id), now_ms, owner, lease_ms)
    due, next_ms = pace(int(next_send_ms), now_ms, float(rate), budget)
    if due:
        body = {**json.loads(command), "ttl_ms": left_ms}
        claimed = _claim(
            tx, int(job_id), due=due, body=body, now_ms=now_ms, owner=owner, lease_ms=lease_ms
        )
        if claimed:
            _, next_ms = pace(int(next_send_ms), now_ms, float(rate), len(claimed))
            tx.run("UPDATE jobs SET next_send_ms = ? WHERE id = ?", (next_ms, job_id))
        sends += claimed
    return sends, False


def _expire(tx: Tx, job_id: int, now_ms: int) -> None:
    """The job's TTL is over: devices still queued, and claims never published, time out."""
    tx.run(
        "UPDATE job_targets SET state = ?, decided_ms = ?,"
        " error = 'the job ttl_ms ran out before the device was reached', owner = NULL,"
        " lease_ms = NULL WHERE job_id = ? AND (state = 'queued'"
        " OR (state = 'sent' AND sent_ms IS NULL))",
        (step("queued", "ttl_expired"), now_ms, job_id),
    )


def _reclaim(tx: Tx, job_id: int, now_ms: int, owner: str, lease_ms: int) -> list[Send]:
    """Claims whose owner never said it published (killed, or its publish failed) and
    whose lease ran out: published again with the same seq and command."""
    rows = tx.all(
        "SELECT jt.device_id, c.seq, c.created_ms, c.body FROM job_targets jt JOIN commands c"  # noqa: S608
        " ON c.device_id = jt.device_id AND c.seq = jt.seq WHERE jt.job_id = ?"
        " AND jt.state = 'sent' AND jt.sent_ms IS NULL AND jt.lease_ms < ?"
        + tx.dialect.lock_targets,
        (job_id, now_ms),
    )
    tx.many(
        "UPDATE job_targets SET owner = ?, lease_ms = ? WHERE job_id = ? AND device_id = ?",
        [(owner, now_ms + lease_ms, job_id, r[0]) for r in rows],
    )
    return [Send(job_id, r[0], int(r[1]), int(r[2]), json.loads(r[3])) for r in rows]


def _claim(
    tx: Tx,
    job_id: int,
    *,
    due: int,
    body: dict[str, Any],
    now_ms: int,
    owner: str,
    lease_ms: int,
) -> list[Send]:
    """Up to `due` queued devices that are online: each gets its command seq from its
    down-seq counter, the command is stored, and the seq and claim recorded."""
    rows = tx.all(
        "SELECT jt.device_id FROM job_targets jt JOIN devices d ON d.device_id = jt.device_id"  # noqa: S608
        " WHERE jt.job_id = ? AND jt.state = 'queued' AND d.online = 1 AND d.public_key <> ''"
        " ORDER BY jt.device_id LIMIT ?" + tx.dialect.lock_targets,
        (job_id, due),
    )
    text = _DUMPS(body)
    sends = []
    for (device_id,) in rows:
        seq_row = tx.one(
            "UPDATE devices SET down_seq = down_seq + 1 WHERE device_id = ? RETURNING down_seq",
            (device_id,),
        )
        assert seq_row is not None
        seq = int(seq_row[0])
        tx.run(
            "INSERT INTO commands (device_id, seq, body, created_ms) VALUES (?, ?, ?, ?)",
            (device_id, seq, text, now_ms),
        )
        sends.append(Send(job_id, device_id, seq, now_ms, body))
    tx.many(
        "UPDATE job_targets SET state = ?, seq = ?, owner = ?, lease_ms = ?"
        " WHERE job_id = ? AND device_id = ?",
        [
            (step("queued", "claim"), s.seq, owner, now_ms + lease_ms, job_id, s.device_id)
            for s in sends
        ],
    )
    return sends


def published(tx: Tx, owner: str, sent: list[Send], now_ms: int) -> None:
    """The owner published these: their reply timeout starts now, the claim is done."""
    tx.many(
        "UPDATE job_targets SET sent_ms = ?, owner = NULL, lease_ms = NULL"
        " WHERE job_id = ? AND device_id = ? AND owner = ? AND state = 'sent'",
        [(now_ms, s.job_id, s.device_id, owner) for s in sent],
    )


def _active(tx: Tx, result: Tick) -> None:
    """For the metrics: running jobs and their devices by state."""
    rows = tx.all(
        "SELECT jt.state, count(*) FROM job_targets jt JOIN jobs j ON j.id = jt.job_id"
        " WHERE j.state = 'running' GROUP BY jt.state"
    )
    result.active_targets = Counter({str(s): int(n) for s, n in rows})
    row = tx.one("SELECT count(*) FROM jobs WHERE state = 'running'")
    result.active_jobs = int(row[0]) if row else 0
