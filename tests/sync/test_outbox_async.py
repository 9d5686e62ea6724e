"""`Outbox.enqueue_async`: coroutine producers, sealing in the writer, one wake-up per batch."""

from __future__ import annotations

import asyncio

import pytest

from dgdm.sync import envelope as env
from dgdm.sync.envelope import Kind
from dgdm.sync.errors import EnvelopeError, OutboxError
from dgdm.sync.outbox import Outbox

# The tests open and close outboxes (the blocking API: SQLite, fsync) from the coroutine.
pytestmark = pytest.mark.blocks_loop("the tests open and close outboxes on the loop")

KEY = bytes(range(32))


def _sealer(kind, seq, created_ms, body):
    if body.get("bad"):
        raise EnvelopeError("bad_body", "refused")
    return env.seal(kind, seq, created_ms, "dev-1", body, key=KEY, key_id=b"kid!")


def _open(path) -> Outbox:
    return Outbox(path, device_id="dev-1", sealer=_sealer, max_bytes=1 << 24)


async def test_many_coroutines_get_unique_durable_seqs_sealed_in_order(tmp_path) -> None:
    box = _open(tmp_path / "o.db")
    seqs = await asyncio.gather(*(box.enqueue_async(Kind.RESULT, {"i": i}) for i in range(600)))
    assert sorted(seqs) == list(range(1, 601))
    box.close()
    reopened = _open(tmp_path / "o.db")  # durable: there after a reopen
    stored = reopened.pending(1000)
    assert [m.seq for m in stored] == list(range(1, 601))
    for msg, i in zip(stored, range(600), strict=True):
        opened = env.open_envelope(msg.payload, key=KEY, key_id=b"kid!", expected_device="dev-1")
        assert opened.header.seq == msg.seq
        assert opened.body == {"i": i}
    reopened.close()


async def test_batches_wake_the_loop_once_not_once_per_message(tmp_path, monkeypatch) -> None:
    box = _open(tmp_path / "o.db")
    loop = asyncio.get_running_loop()
    calls = []
    original = loop.call_soon_threadsafe

    def counting(callback, *args):
        calls.append(callback)
        return original(callback, *args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    await asyncio.gather(*(box.enqueue_async(Kind.TELEMETRY, {"i": i}) for i in range(1000)))
    monkeypatch.undo()
    assert 1 <= len(calls) < 100  # batches of up to 512, not 1000 hand-offs
    box.close()


async def test_a_failing_body_fails_only_its_producer(tmp_path) -> None:
    box = _open(tmp_path / "o.db")
    results = await asyncio.gather(
        box.enqueue_async(Kind.RESULT, {}),
        box.enqueue_async(Kind.RESULT, {"bad": True}),
        box.enqueue_async(Kind.RESULT, {}),
        return_exceptions=True,
    )
    assert isinstance(results[1], EnvelopeError)
    assert [m.seq for m in box.pending(10)] == [results[0], results[2]]
    with pytest.raises(OutboxError, match="not sent from a device outbox"):
        await box.enqueue_async(Kind.COMMAND, {})
    box.close()
    with pytest.raises(OutboxError, match="closed"):
        await box.enqueue_async(Kind.RESULT, {})


async def test_close_while_coroutines_wait_fails_or_stores_each(tmp_path) -> None:
    box = _open(tmp_path / "o.db")
    tasks = [asyncio.ensure_future(box.enqueue_async(Kind.RESULT, {"i": i})) for i in range(300)]
    await asyncio.sleep(0)  # all handed over
    await asyncio.to_thread(box.close)
    done, pending = await asyncio.wait(tasks, timeout=10)
    assert not pending  # nobody is left waiting
    stored = [t.result() for t in done if t.exception() is None]
    failed = [t.exception() for t in done if t.exception() is not None]
    assert all(isinstance(e, OutboxError) for e in failed)
    reopened = _open(tmp_path / "o.db")
    assert {m.seq for m in reopened.pending(1000)} == set(stored)
    reopened.close()
