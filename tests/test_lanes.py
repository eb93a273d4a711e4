"""How a lane forms its batches: how long it lingers for a stream, and that a backlog never waits."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from worker.consume.lanes import Lane, Linger

STEP_S, MAX_S = 0.010, 0.050


class Stream:
    """The lane's sleep, passed in through its Linger: records each pause and, while it has
    messages left to send, puts ``per_step`` of them into the lane during the pause."""

    def __init__(self, per_step: int, steps: int) -> None:
        self.lane: Lane[int] | None = None
        self.per_step, self.steps_left = per_step, steps
        self.pauses: list[float] = []
        self.next_item = 100

    async def sleep(self, delay_s: float) -> None:
        self.pauses.append(delay_s)
        if self.steps_left > 0 and self.lane is not None:
            self.steps_left -= 1
            for _ in range(self.per_step):
                self.lane.put(self.next_item)
                self.next_item += 1
        await asyncio.sleep(0)


async def first_batch(backlog: int, per_step: int, steps: int) -> tuple[list[int], list[float]]:
    ran: list[tuple[list[int], list[float]]] = []  # each batch with the pauses before it
    done = asyncio.Event()
    stream = Stream(per_step, steps)

    async def run_batch(batch: Sequence[int]) -> None:
        ran.append((list(batch), list(stream.pauses)))
        done.set()

    lane: Lane[int] = Lane("test", run_batch, max_batch=50, linger=Linger(STEP_S, MAX_S, stream.sleep))
    stream.lane = lane
    for item in range(backlog):
        lane.put(item)
    lane.start()
    try:
        await asyncio.wait_for(done.wait(), 5)
    finally:
        await lane.stop()
    return ran[0]


async def test_a_lone_event_waits_one_step() -> None:
    """Nothing more arrives: the batch of one runs after a single step."""
    batch, pauses = await first_batch(backlog=1, per_step=0, steps=0)
    assert batch == [0]
    assert pauses == [STEP_S]


async def test_a_stream_keeps_the_lane_lingering_up_to_the_maximum() -> None:
    """Three messages per step, without end: the lane lingers the maximum in all, then runs
    everything that came."""
    batch, pauses = await first_batch(backlog=1, per_step=3, steps=100)
    steps = round(MAX_S / STEP_S)
    assert pauses == [STEP_S] * steps
    assert len(batch) == 1 + 3 * steps


async def test_the_lane_stops_lingering_when_the_stream_stops() -> None:
    """Two steps bring messages, the third brings none: three pauses, and the batch runs."""
    batch, pauses = await first_batch(backlog=1, per_step=2, steps=2)
    assert pauses == [STEP_S] * 3
    assert len(batch) == 5


async def test_a_backlog_that_fills_a_batch_never_waits() -> None:
    """A full batch already queued runs at once, in arrival order, up to max_batch."""
    batch, pauses = await first_batch(backlog=80, per_step=0, steps=0)
    assert pauses == []
    assert batch == list(range(50))


async def test_a_stream_that_fills_the_batch_ends_the_linger() -> None:
    """Twenty per step: the batch is full before the maximum, and the lane runs it then."""
    batch, pauses = await first_batch(backlog=1, per_step=20, steps=100)
    assert pauses == [STEP_S] * 3
    assert len(batch) == 50


def test_the_default_linger_is_one_short_step_up_to_a_small_maximum() -> None:
    """Production lanes linger 10 ms a step and 50 ms at most (docs/performance.md says why)."""
    assert (Linger().step_s, Linger().max_s) == (0.010, 0.050)
