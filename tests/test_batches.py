"""How a lane forms its batches: how long it lingers for a stream, and that a backlog never waits."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from worker import batches
from worker.batches import Lane

_real_sleep = asyncio.sleep  # the stand-in below replaces asyncio.sleep while a test runs


class Stream:
    """Stands in for asyncio.sleep inside worker.batches: records each pause and, while it has
    messages left to send, puts ``per_step`` of them into the lane during the pause."""

    def __init__(self, lane: Lane[int], per_step: int, steps: int) -> None:
        self.lane, self.per_step, self.steps_left = lane, per_step, steps
        self.pauses: list[float] = []
        self.next_item = 100

    async def sleep(self, delay_s: float) -> None:
        self.pauses.append(delay_s)
        if self.steps_left > 0:
            self.steps_left -= 1
            for _ in range(self.per_step):
                self.lane.put(self.next_item)
                self.next_item += 1
        await _real_sleep(0)


async def first_batch(monkeypatch: pytest.MonkeyPatch, backlog: int, per_step: int, steps: int) -> tuple[
    list[int], list[float]
]:
    ran: list[tuple[list[int], list[float]]] = []  # each batch with the pauses before it
    done = asyncio.Event()

    async def run_batch(batch: Sequence[int]) -> None:
        ran.append((list(batch), list(stream.pauses)))
        done.set()

    lane: Lane[int] = Lane("test", run_batch, max_batch=50)
    stream = Stream(lane, per_step, steps)
    monkeypatch.setattr(batches.asyncio, "sleep", stream.sleep)
    for item in range(backlog):
        lane.put(item)
    lane.start()
    try:
        await asyncio.wait_for(done.wait(), 5)
    finally:
        await lane.stop()
    return ran[0]


async def test_a_lone_event_waits_one_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing more arrives: the batch of one runs after a single LINGER_S."""
    batch, pauses = await first_batch(monkeypatch, backlog=1, per_step=0, steps=0)
    assert batch == [0]
    assert pauses == [batches.LINGER_S]


async def test_a_stream_keeps_the_lane_lingering_up_to_the_maximum(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three messages per step, without end: the lane lingers LINGER_MAX_S in all, then runs
    everything that came."""
    batch, pauses = await first_batch(monkeypatch, backlog=1, per_step=3, steps=100)
    steps = round(batches.LINGER_MAX_S / batches.LINGER_S)
    assert pauses == [batches.LINGER_S] * steps
    assert len(batch) == 1 + 3 * steps


async def test_the_lane_stops_lingering_when_the_stream_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two steps bring messages, the third brings none: three pauses, and the batch runs."""
    batch, pauses = await first_batch(monkeypatch, backlog=1, per_step=2, steps=2)
    assert pauses == [batches.LINGER_S] * 3
    assert len(batch) == 5


async def test_a_backlog_that_fills_a_batch_never_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full batch already queued runs at once, in arrival order, up to max_batch."""
    batch, pauses = await first_batch(monkeypatch, backlog=80, per_step=0, steps=0)
    assert pauses == []
    assert batch == list(range(50))


async def test_a_stream_that_fills_the_batch_ends_the_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    """Twenty per step: the batch is full before LINGER_MAX_S, and the lane runs it then."""
    batch, pauses = await first_batch(monkeypatch, backlog=1, per_step=20, steps=100)
    assert pauses == [batches.LINGER_S] * 3
    assert len(batch) == 50
