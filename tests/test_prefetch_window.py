"""The work queue's prefetch window: small while the queue keeps up, wide under a backlog."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
import structlog

from tests.consumer_harness import FakeRules, consumer_running, event, feeder, prepare_fake_tables
from tests.harness import fetch, wait_until
from worker.consume.consumer import BURST_PREFETCH, ConsumerTimings
from worker.settings import Settings


@pytest.fixture
async def fake(settings: Settings) -> FakeRules:
    """Rules that record each applied event in public.applied."""
    await prepare_fake_tables(settings.database_url)
    return FakeRules()


async def _applied(database_url: str) -> int:
    rows = await fetch(database_url, "select count(*) as n from public.applied")
    return int(rows[0]["n"])


async def test_a_backlog_widens_the_window_and_an_empty_queue_narrows_it(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """With the default window (32) and 1,500 events waiting, the first depth reading widens the
    window to the burst size; once the queue has stayed empty for a few readings it is narrowed
    again. Every event is applied exactly once across both changes (the consumer is made again
    with what it holds still unacked on the channel)."""
    defaults = replace(settings, worker_concurrency=Settings().worker_concurrency)
    ids = [f"evt_window_{i:05d}" for i in range(1500)]
    timings = ConsumerTimings(depth_every_s=0.1)
    async with feeder(amqp_url, settings) as feed:
        await _queue_all(feed, ids)
        with structlog.testing.capture_logs() as logs:
            async with consumer_running(defaults, fake.rules(), timings=timings) as consumer:
                await wait_until(
                    lambda: _is_done(settings.database_url, len(ids)), timeout_s=60, what="all applied"
                )
                await wait_until(lambda: _narrowed(consumer), what="the window narrowed again")
        assert await feed.depth() == 0
    changes = [line["prefetch"] for line in logs if line["event"] == "prefetch_changed"]
    assert changes[:1] == [BURST_PREFETCH] and changes[-1] == defaults.worker_concurrency
    rows = await fetch(settings.database_url, "select event_id from public.applied")
    assert sorted(r["event_id"] for r in rows) == ids
    assert len(fake.calls) == len(ids)  # no event went through the rules twice


async def test_a_queue_that_keeps_up_keeps_the_small_window(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """A trickle of events never leaves more waiting than the small window: it is never widened."""
    timings = ConsumerTimings(depth_every_s=0.05)
    async with feeder(amqp_url, settings) as feed:
        with structlog.testing.capture_logs() as logs:
            async with consumer_running(settings, fake.rules(), timings=timings) as consumer:
                for i in range(20):
                    await feed.event(event(f"evt_trickle_{i}", charge_id=f"ch_{i}"))
                    await wait_until(lambda n=i + 1: _is_done(settings.database_url, n), what="applied")
                assert consumer.window is not None and consumer.window.current == settings.worker_concurrency
    assert [line for line in logs if line["event"] == "prefetch_changed"] == []


async def test_work_in_flight_keeps_the_window_wide_though_the_queue_reads_empty(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """300 events widen the window and are all taken in, so the queue reads empty; held in flight
    (the rules wait on a gate), more than the small window holds is unfinished, and the window stays
    wide through many empty readings. Released, every event is applied once and only then does the
    window narrow."""
    defaults = replace(settings, worker_concurrency=Settings().worker_concurrency)
    ids = [f"evt_held_{i:04d}" for i in range(300)]
    gate = asyncio.Event()

    async def held(_con: Any, _delivery: Any) -> None:
        await gate.wait()

    fake.behaviour.update(dict.fromkeys(ids, held))
    timings = ConsumerTimings(depth_every_s=0.05)
    async with feeder(amqp_url, settings) as feed:
        await _queue_all(feed, ids)
        with structlog.testing.capture_logs() as logs:
            async with consumer_running(defaults, fake.rules(), timings=timings) as consumer:
                window = consumer.window
                assert window is not None
                await wait_until(lambda: _current(window, BURST_PREFETCH), what="the window widened")
                await wait_until(lambda: _empty(feed), what="every event taken in")
                empty_from = window.readings
                # Twice the readings that would narrow an idle window, all with the queue empty.
                await wait_until(
                    lambda: _at_least(window.readings, empty_from + 2 * window.calm_reads),
                    what="empty readings",
                )
                assert window.current == BURST_PREFETCH
                gate.set()
                await wait_until(lambda: _is_done(settings.database_url, len(ids)), what="all applied")
                await wait_until(lambda: _narrowed(consumer), what="the window narrowed")
    changes = [line["prefetch"] for line in logs if line["event"] == "prefetch_changed"]
    assert changes == [BURST_PREFETCH, defaults.worker_concurrency]
    assert sorted(event_id for event_id, _ in fake.calls) == ids


async def _queue_all(feed: Any, ids: list[str]) -> None:
    """An event per id, spread over 97 charges (so over every lane), queued before the consumer starts."""
    for i, event_id in enumerate(ids):
        await feed.event(event(event_id, charge_id=f"ch_{i % 97}"))


async def _empty(feed: Any) -> bool:
    return bool(await feed.depth() == 0)


async def _current(window: Any, prefetch: int) -> bool:
    return bool(window.current == prefetch)


async def _at_least(value: int, floor: int) -> bool:
    return value >= floor


async def _is_done(database_url: str, n: int) -> bool:
    return await _applied(database_url) >= n


async def _narrowed(consumer: object) -> bool:
    window = getattr(consumer, "window", None)
    return window is not None and window.current == Settings().worker_concurrency
