"""The consumer runtime's failure paths, each driven on purpose through constructor timings:
a transient database error while a batch reruns event by event in savepoints, and a drain on
shutdown that runs out of time. (A refund fetch that still fails after its waiting window is in
tests/test_consumer_refund_fetch.py, next to the fake Stripe API it needs.)"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import asyncpg
import structlog

from tests.consumer_harness import (
    FakeRules,
    applied_attempts,
    applied_count_is,
    consumer_running,
    dead_letters,
    event,
    feeder,
)
from tests.harness import wait_until
from worker.amqp import topology
from worker.consume.consumer import CLOSE_RESERVE_S, Consumer, ConsumerTimings
from worker.consume.lanes import Linger
from worker.settings import Settings
from worker.shutdown import Deadline


async def applied(settings: Settings) -> dict[str, int]:
    """event id -> the attempt that committed it."""
    return await applied_attempts(settings.database_url)


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
    return await applied_count_is(settings.database_url, expected)


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


async def dead(settings: Settings) -> list[asyncpg.Record]:
    """The dead letters FakeRules recorded."""
    return await dead_letters(settings.database_url)


async def test_a_payload_the_fetch_rule_cannot_read_fails_that_event_alone(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """With a refund fetcher configured, asking the rules whether an event needs a fetch can
    raise on a payload they cannot read: that is the event's own failure (counted, then
    dead-lettered with the error after RECON_MAX_ATTEMPTS), decided before any transaction; an
    event of the same batch that needs no fetch applies once, and the API is never called."""
    fetched: list[str] = []

    async def fetcher(charge_id: str) -> list[dict[str, Any]]:
        fetched.append(charge_id)
        return []

    def fetch_for(ev: dict[str, Any]) -> str | None:
        if ev["id"] == "evt_unreadable":
            raise KeyError("amount_refunded")
        return None

    fake.fetch_for = fetch_for
    batch = BatchOf(2)
    timings = ConsumerTimings(linger=Linger(sleep=batch.sleep))
    async with feeder(amqp_url, settings) as feed:
        async with consumer_running(settings, fake.rules(), fetcher=fetcher, timings=timings) as consumer:
            batch.consumer = consumer
            await feed.event(event("evt_unreadable", charge_id="ch_shared"))
            await feed.event(event("evt_readable", charge_id="ch_shared"))
            rows = await wait_until(lambda: dead(settings), what="the unreadable one dead-lettered")
        assert await feed.depth() == 0
    assert [(r["event_id"], r["error"], r["attempts"]) for r in rows] == [
        ("evt_unreadable", "KeyError: 'amount_refunded'", settings.max_attempts)
    ]
    assert await applied(settings) == {"evt_readable": 1}
    assert [event_id for event_id, _ in fake.calls] == ["evt_readable"]
    assert fetched == []


async def test_a_dead_letter_met_by_a_database_outage_is_requeued_then_recorded_once(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """Recording a dead letter that meets a transient database error past the drain's retry time
    is nobody's fault: the message is requeued after the pause (not parked, not counted), and
    recorded once when the database answers again."""
    from worker.amqp.publisher import event_message
    from worker.consume.dead_letter_drain import DrainTimings

    tries: list[str] = []

    async def outage_then_record(con: asyncpg.Connection, dead_letter: Any) -> None:
        tries.append(dead_letter.event_id)
        if len(tries) == 1:
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle")
        await fake.record_dead_letter(con, dead_letter)

    rules = dataclasses.replace(fake.rules(), record_dead_letter=outage_then_record)
    timings = ConsumerTimings(drain=DrainTimings(retry_for_s=0.0, pause_s=0.0))
    with structlog.testing.capture_logs() as logs:
        async with feeder(amqp_url, settings) as feed:
            body = json.dumps(event("evt_dead_outage")).encode()
            await feed.publisher.publish_dead_letter(
                event_message(body, "evt_dead_outage", "charge.refunded", 1)
            )
            async with consumer_running(settings, rules, timings=timings):
                rows = await wait_until(lambda: dead(settings), what="the dead letter recorded")
            assert await feed.depth(topology.DEAD_QUEUE) == 0
            assert await feed.depth(topology.PARKED_QUEUE) == 0
    assert [r["event_id"] for r in rows] == ["evt_dead_outage"]
    assert tries == ["evt_dead_outage", "evt_dead_outage"]
    events = [line["event"] for line in logs if line["event"].startswith("dead_letter")]
    assert events == ["dead_letter_not_recorded_database_unavailable", "dead_letter_recorded"]


async def test_a_dead_letter_that_cannot_be_parked_stays_queued_until_it_can(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """A dead letter the database refuses must be parked; if the parked queue does not take it
    (deleted here, so the publish is not confirmed), the message is requeued, not acked away:
    once the queue is back it is parked with its error."""
    from worker.amqp.connection import declare_topology
    from worker.amqp.publisher import event_message
    from worker.consume.dead_letter_drain import DrainTimings

    async def refuse(_con: Any, _dead_letter: Any) -> None:
        raise ValueError("value too long for type character varying(8)")

    rules = dataclasses.replace(fake.rules(), record_dead_letter=refuse)
    timings = ConsumerTimings(drain=DrainTimings(record_tries=1, pause_s=0.0))
    with structlog.testing.capture_logs() as logs:
        async with feeder(amqp_url, settings) as feed:
            channel = await feed.connection.channel()
            await channel.queue_delete(topology.PARKED_QUEUE)
            async with consumer_running(settings, rules, timings=timings):
                await channel.queue_delete(topology.PARKED_QUEUE)
                body = json.dumps(event("evt_unparkable")).encode()
                message = event_message(body, "evt_unparkable", "charge.refunded", 1)
                await feed.publisher.publish_dead_letter(message)

                async def park_failed() -> bool:
                    return any(line["event"] == "dead_letter_park_failed" for line in logs)

                await wait_until(park_failed, what="a park that was not confirmed")
                await declare_topology(feed.connection, settings)

                async def parked() -> bool:
                    return await feed.depth(topology.PARKED_QUEUE) == 1

                await wait_until(parked, what="parked once the queue is back")
            assert await feed.depth(topology.DEAD_QUEUE) == 0
    assert await dead(settings) == []
