"""Lanes: each takes messages in arrival order and runs them in batches, one batch at a time.

Events of one charge always go to the same lane (by a hash of the charge id), so two lanes never
wait on each other's payment row locks, and a charge's events apply in the order they arrived.
Batches form by themselves: whatever arrived while the previous batch ran, and while the lane
lingers after the first message, is the next batch (up to ``max_batch``). The lane lingers one
step, and again as long as each step brought more messages, up to a maximum (``Linger``): a lone
event waits one step, a stream from a busy receiver fills larger batches, a backlog never waits.
A batch's fixed round trips (begin, claims, locks, writes, commit) are then shared by more events.
docs/performance.md has what the steps were measured to do.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")
BatchRun = Callable[[Sequence[T]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Linger:
    """How long a lane waits for its batch to fill: ``step_s`` at a time while the stream keeps
    coming, ``max_s`` at most. ``sleep`` is how it waits; tests pass a deterministic one."""

    step_s: float = 0.010
    max_s: float = 0.050
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, compare=False)


class Lane(Generic[T]):
    def __init__(self, name: str, run_batch: BatchRun[T], max_batch: int, linger: Linger) -> None:
        self.name = name
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._linger_for = linger
        self._queue: asyncio.Queue[T] = asyncio.Queue()
        self._unfinished = 0  # handed to the lane and not yet run to the end: queued or in a batch
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"lane-{self.name}")

    def put(self, item: T) -> None:
        self._queue.put_nowait(item)
        self._unfinished += 1

    @property
    def backlog(self) -> int:
        """Items waiting for a batch."""
        return self._queue.qsize()

    @property
    def unfinished(self) -> int:
        """Items waiting or in the batch that runs now: delivered and not yet settled."""
        return self._unfinished

    async def _loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            await self._linger()
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._run_batch(batch)
            except Exception:  # the runner settles its own errors; this is a last guard for the lane
                log.exception("lane_batch_crashed", lane=self.name, size=len(batch))
            finally:
                self._unfinished -= len(batch)
                for _ in batch:
                    self._queue.task_done()

    async def _linger(self) -> None:
        """Let a stream fill the batch: a step at a time while it keeps growing, up to the maximum.

        A lone event waits one step; a backlog that already fills a batch waits none."""
        linger = self._linger_for
        waited_s, seen = 0.0, self._queue.qsize()
        while seen < self._max_batch - 1 and waited_s < linger.max_s:
            await linger.sleep(linger.step_s)
            waited_s += linger.step_s
            if self._queue.qsize() == seen:  # only this lane takes from its queue: it never shrinks here
                return
            seen = self._queue.qsize()

    async def drain(self) -> None:
        """Return once every message handed to this lane has been run (committed and acked)."""
        await self._queue.join()

    async def stop(self) -> None:
        """Cancel the lane; anything still queued stays unacked and the broker redelivers it."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class Lanes(Generic[T]):
    """K lanes; ``route(key, item)`` sends an item to the lane of its key."""

    def __init__(self, name: str, count: int, run_batch: BatchRun[T], max_batch: int, linger: Linger) -> None:
        self.lanes = [Lane(f"{name}-{i}", run_batch, max_batch, linger) for i in range(count)]

    def start(self) -> None:
        for lane in self.lanes:
            lane.start()

    def route(self, key: str, item: T) -> None:
        # crc32, not hash(): stable across processes, so logs from two runs read the same.
        self.lanes[zlib.crc32(key.encode()) % len(self.lanes)].put(item)

    @property
    def backlog(self) -> int:
        return sum(lane.backlog for lane in self.lanes)

    @property
    def unfinished(self) -> int:
        return sum(lane.unfinished for lane in self.lanes)

    async def drain(self) -> None:
        """Return once every lane has run everything handed to it (the caller bounds the wait)."""
        await asyncio.gather(*(lane.drain() for lane in self.lanes))

    async def stop(self) -> None:
        await asyncio.gather(*(lane.stop() for lane in self.lanes))
