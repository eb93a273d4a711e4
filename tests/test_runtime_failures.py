"""The consumer runtime's failure paths, each driven on purpose through constructor timings:
a transient database error while a batch reruns event by event in savepoints, and a drain on
shutdown that runs out of time. (A refund fetch that still fails after its waiting window is in
tests/test_consumer_refund_fetch.py, next to the fake Stripe API it needs.)"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
import structlog

from tests.consumer_harness import FakeRules, consumer_running, event, feeder, prepare_fake_tables
from tests.harness import fetch, wait_until
from worker.consume.consumer import CLOSE_RESERVE_S, Consumer, ConsumerTimings
from worker.consume.lanes import Linger
from worker.settings import Settings
from worker.shutdown import Deadline


@pytest.fixture
async def fake(settings: Settings) -> FakeRules:
    """FakeRules over public.applied / public.dead in this test's own database."""
    await prepare_fake_tables(settings.database_url)
    return FakeRules()


async def applied(settings: Settings) -> dict[str, int]:
    """event id -> the attempt that committed it."""
    rows = await fetch(settings.database_url, "select event_id, attempt from public.applied")
    return {row["event_id"]: row["attempt"] for row in rows}


class BatchOf:
    """A Linger ``sleep`` that holds the first batch of a lane set until ``size`` deliveries are
    in it, so that the deliveries provably share one batch (then it sleeps for real)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.consumer: Consumer | None = None
        self.formed = False

    async def sleep(self, seconds: float) -> None:
        consumer = self.consumer
        if self.formed or consumer is None:
            await asyncio.sleep(seconds)
            return

        async def all_delivered() -> bool:
            return consumer.lanes.unfinished >= self.size

        await wait_until(all_delivered, what=f"{self.size} deliveries in one lane")
        self.formed = True


async def test_transient_database_error_in_the_savepoint_rerun_retries_the_whole_batch(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """A batch of two events of one charge: the first raises (a bug of its payload), so the batch
    rolls back and reruns with a savepoint per event; in that rerun the second meets a deadlock.
    A transient error is no event's fault: the savepoint does not swallow it as the event's
    failure, the whole batch transaction is retried, and then the innocent event commits on its
    first attempt, once, while only the culprit counts a failure (it commits on attempt 2)."""
    calls = {"evt_innocent": 0}

    async def fails_on_first_attempt(_con: Any, delivery: Any) -> None:
        if delivery.attempt == 1:
            raise ValueError("amount is not an integer")

    async def deadlocks_in_the_rerun(_con: Any, _delivery: Any) -> None:
        calls["evt_innocent"] += 1
        if calls["evt_innocent"] == 1:  # the batch-as-one call stopped at the culprit before it
            raise asyncpg.DeadlockDetectedError("deadlock detected")

    fake.behaviour["evt_culprit"] = fails_on_first_attempt
    fake.behaviour["evt_innocent"] = deadlocks_in_the_rerun
    batch = BatchOf(2)
    timings = ConsumerTimings(linger=Linger(sleep=batch.sleep), db_retry_for_s=5.0)
    with structlog.testing.capture_logs() as logs:
        async with feeder(amqp_url, settings) as feed:
            async with consumer_running(settings, fake.rules(), timings=timings) as consumer:
                batch.consumer = consumer
                await feed.event(event("evt_culprit", charge_id="ch_shared"))
                await feed.event(event("evt_innocent", charge_id="ch_shared"))
                await wait_until(lambda: _count_is(settings, 2), what="both committed")
            assert await feed.depth() == 0
    assert await applied(settings) == {"evt_culprit": 2, "evt_innocent": 1}
    assert fake.calls == [
        ("evt_culprit", 1),  # the batch as one call to the rules: raises, all rolls back
        ("evt_culprit", 1),  # the rerun, one savepoint each: the culprit fails alone
        ("evt_innocent", 1),  # ...and the innocent meets a deadlock: the whole rerun is retried
        ("evt_culprit", 1),
        ("evt_innocent", 1),  # commits
        ("evt_culprit", 2),  # the culprit's retry copy
    ]
    isolating = [line for line in logs if line["event"] == "batch_event_failed_isolating"]
    assert [line["size"] for line in isolating] == [2]
    handled = {(line["event_id"], line["attempt"]): line for line in logs if line["event"] == "event_handled"}
    assert handled[("evt_innocent", 1)]["outcome"] == "applied"
    assert (handled[("evt_culprit", 1)]["outcome"], handled[("evt_culprit", 1)]["reason"]) == (
        "retrying",
        "failed",
    )
    assert not [line for line in logs if line["event"] == "database_unavailable"]


async def _count_is(settings: Settings, expected: int) -> bool:
    rows = await fetch(settings.database_url, "select count(*) as n from public.applied")
    return bool(rows[0]["n"] == expected)


async def test_a_drain_that_runs_out_of_time_leaves_the_rest_unacked_and_it_comes_back(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """On a stop whose budget leaves the drain almost nothing (the shutdown Deadline is a
    constructor timing), a batch held inside its transaction cannot finish: consumer_drained says
    complete=false with the work it found unsettled, nothing of the cut-off batch commits, and
    every delivered message goes back to the queue unacked; a worker started afterwards applies
    each of them exactly once."""
    ids = [f"evt_cut_{i}" for i in range(5)]
    gate = asyncio.Event()

    async def held(_con: asyncpg.Connection, _delivery: Any) -> None:
        await gate.wait()  # opened only after the stop is over

    fake.behaviour[ids[0]] = held
    tight = ConsumerTimings(shutdown=lambda: Deadline(budget_s=CLOSE_RESERVE_S + 0.2))
    async with feeder(amqp_url, settings) as feed:
        with structlog.testing.capture_logs() as logs:
            async with consumer_running(settings, fake.rules(), timings=tight) as consumer:
                for event_id in ids:
                    await feed.event(event(event_id, charge_id="ch_one_lane"))

                async def in_flight() -> bool:
                    held_now = any(called == ids[0] for called, _ in fake.calls)
                    return held_now and consumer.lanes.unfinished == len(ids)

                await wait_until(in_flight, what="the held batch and the rest delivered")
        gate.set()
        assert await applied(settings) == {}

        async def all_back() -> bool:
            return await feed.depth() == len(ids)

        await wait_until(all_back, what="every delivered message back in the work queue")
    drained = [line for line in logs if line["event"] == "consumer_drained"]
    assert [(line["complete"], line["unfinished_at_stop"]) for line in drained] == [(False, len(ids))]

    fake.behaviour.clear()
    fake.calls.clear()
    async with consumer_running(settings, fake.rules()):
        await wait_until(lambda: _count_is(settings, len(ids)), what="the cut-off events applied")
    assert sorted(await applied(settings)) == ids
    assert sorted(event_id for event_id, _ in fake.calls) == ids
