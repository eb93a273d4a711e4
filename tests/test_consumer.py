"""Mechanics of the consumer runtime with injected rules: ack, retry, dead-letter, batches, drain."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import aio_pika
import asyncpg
import structlog

from tests.consumer_harness import (
    FakeRules,
    applied_attempts,
    applied_count_is,
    called,
    consumer_running,
    dead_letters,
    event,
    feeder,
)
from tests.harness import fetch, via_port, wait_until
from worker.amqp import topology
from worker.consume.consumer import ConsumerTimings
from worker.consume.dead_letter_drain import DELIVERY_LIMIT_ERROR
from worker.settings import Settings


async def applied(settings: Settings) -> dict[str, int]:
    """event id -> the attempt that committed it."""
    return await applied_attempts(settings.database_url)


async def dead(settings: Settings) -> list[asyncpg.Record]:
    """The dead letters the rules recorded."""
    return await dead_letters(settings.database_url)


async def test_event_applied_committed_and_acked(settings: Settings, amqp_url: str, fake: FakeRules) -> None:
    """An event is applied once, and after the drain nothing is left in the queue (it was acked)."""
    async with feeder(amqp_url, settings) as feed:
        async with consumer_running(settings, fake.rules()):
            await feed.event(event("evt_ok_1"))
            await wait_until(lambda: applied(settings), what="event applied")
        assert await feed.depth() == 0
    assert await applied(settings) == {"evt_ok_1": 1}
    assert fake.calls == [("evt_ok_1", 1)]


async def test_transient_database_error_retries_the_batch(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """A deadlock on the first try is retried in place (same delivery, attempt 1), then applied once."""
    raised: list[str] = []

    async def deadlock_once(_con: Any, delivery: Any) -> None:
        if not raised:
            raised.append(delivery.event["id"])
            raise asyncpg.DeadlockDetectedError("deadlock detected")

    fake.behaviour["evt_dl_1"] = deadlock_once
    async with feeder(amqp_url, settings) as feed, consumer_running(settings, fake.rules()):
        await feed.event(event("evt_dl_1"))
        await wait_until(lambda: applied(settings), what="event applied after deadlock")
    assert raised == ["evt_dl_1"]
    assert await applied(settings) == {"evt_dl_1": 1}
    assert fake.calls == [("evt_dl_1", 1), ("evt_dl_1", 1)]


async def test_retrying_outcome_goes_through_a_wait_queue(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """A 'retrying' Result is committed, re-published with attempt+1 and first-seen kept, then applied."""
    from handlers import Result

    async def not_yet_on_first(_con: Any, delivery: Any) -> Any:
        return Result("retrying", retry_reason="unmatched_charge") if delivery.attempt == 1 else None

    fake.behaviour["evt_wait_1"] = not_yet_on_first
    seen: list[Any] = []
    original = fake.apply_events

    async def spy(con: Any, deliveries: Any, policy: Any) -> Any:
        seen.extend(deliveries)
        return await original(con, deliveries, policy)

    rules = dataclasses.replace(fake.rules(), apply_events=spy)
    async with feeder(amqp_url, settings) as feed, consumer_running(settings, rules):
        await feed.event(event("evt_wait_1"), headers={topology.HEADER_FIRST_SEEN_MS: 1_700_000_000_000})
        await wait_until(lambda: applied(settings), what="event applied on its second attempt")
    assert await applied(settings) == {"evt_wait_1": 2}
    assert [d.attempt for d in seen] == [1, 2]
    assert {d.first_seen_at.timestamp() for d in seen} == {1_700_000_000.0}


async def test_poison_event_counts_failures_then_is_dead_lettered(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """An apply that always raises: its savepoint rolls back, each failure is counted in
    x-recon-failures, and after RECON_MAX_ATTEMPTS (3) the dead letter is recorded with the error;
    a good event of the same charge delivered alongside still commits."""

    async def poison(con: Any, delivery: Any) -> None:
        await con.execute("insert into public.applied (event_id, attempt) values ('evt_poison_effect', 0)")
        raise KeyError("amount_refunded")

    fake.behaviour["evt_poison"] = poison
    async with feeder(amqp_url, settings) as feed:
        await feed.event(event("evt_poison", charge_id="ch_same"))
        await feed.event(event("evt_good", charge_id="ch_same"))
        async with consumer_running(settings, fake.rules()):
            rows = await wait_until(lambda: dead(settings), what="dead letter recorded")
        assert await feed.depth(topology.DEAD_QUEUE) == 0
    assert [(r["event_id"], r["attempts"], r["error"]) for r in rows] == [
        ("evt_poison", 3, "KeyError: 'amount_refunded'")
    ]
    assert await applied(settings) == {"evt_good": 1}  # the poison's own insert never committed
    # An attempt may run twice: first in the savepoint-free batch, then alone in its savepoint.
    assert sorted({attempt for event_id, attempt in fake.calls if event_id == "evt_poison"}) == [1, 2, 3]


async def test_a_batch_that_crashes_is_requeued_and_applied_once(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """A fault outside the rules' settled errors (here the refund fetcher raises a bug, not a
    RefundFetchFailed) crashes the batch: every message of it is nacked back to the queue, none is
    acked or lost, and the redelivery applies each event exactly once."""
    crashes = {"left": 1}

    async def fetcher(_charge_id: str) -> list[dict[str, Any]]:
        if crashes["left"]:
            crashes["left"] -= 1
            raise RuntimeError("a bug in the fetch path")
        return []

    fake.fetch_for = lambda _event: "ch_crash"
    ids = [f"evt_crash_{i}" for i in range(3)]
    async with feeder(amqp_url, settings) as feed:
        for event_id in ids:
            await feed.event(event(event_id, charge_id="ch_crash"))
        with structlog.testing.capture_logs() as logs:
            async with consumer_running(settings, fake.rules(), fetcher=fetcher):
                await wait_until(lambda: _count(settings, len(ids)), what="all applied after the crash")
        assert await feed.depth() == 0
    crashed = [line for line in logs if line["event"] == "batch_crashed"]
    assert len(crashed) == 1 and 1 <= crashed[0]["size"] <= len(ids)
    assert sorted(await applied(settings)) == ids
    assert sorted(i for i, _ in fake.calls) == ids  # the crashed batch never reached the rules


async def test_body_that_is_not_json_goes_straight_to_dead_letters(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """A body no attempt can fix is dead-lettered at once, without calling the rules."""
    async with feeder(amqp_url, settings) as feed, consumer_running(settings, fake.rules()):
        await feed.raw(b"\x00not json", message_id="evt_garbled")
        rows = await wait_until(lambda: dead(settings), what="dead letter recorded")
    assert [(r["event_id"], r["error"], r["attempts"], bytes(r["body"])) for r in rows] == [
        ("evt_garbled", "body is not JSON", 1, b"\x00not json")
    ]
    assert fake.calls == []


async def test_commit_failure_keeps_nothing_and_the_event_comes_back(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """When COMMIT itself fails (a deferred constraint), the message is not acked as done and
    nothing of that attempt is kept: it comes back as a counted failure and commits on attempt 2,
    while an innocent event of the same batch commits on its first attempt."""
    con = await asyncpg.connect(settings.database_url)
    try:
        await con.execute(
            """
            create function public.refuse_first_attempt() returns trigger language plpgsql as $$
            begin
                if new.attempt = 1 then raise exception 'refused at commit'; end if;
                return new;
            end $$;
            create table public.gate (attempt int not null);
            create constraint trigger refuse_first_attempt after insert on public.gate
                deferrable initially deferred for each row execute function public.refuse_first_attempt();
            """
        )
    finally:
        await con.close()

    async def commits_only_on_retry(con: Any, delivery: Any) -> None:
        await con.execute("insert into public.gate (attempt) values ($1)", delivery.attempt)

    fake.behaviour["evt_commit_fails"] = commits_only_on_retry
    async with feeder(amqp_url, settings) as feed:
        # Queued before the consumer starts, so they usually share a batch: the batch's COMMIT
        # fails, the batch is split, and only the culprit counts a failure.
        await feed.event(event("evt_commit_fails", charge_id="ch_gate"))
        await feed.event(event("evt_innocent", charge_id="ch_gate"))
        async with consumer_running(settings, fake.rules()):
            await wait_until(lambda: _count(settings, 2), what="both committed")
    assert await applied(settings) == {"evt_commit_fails": 2, "evt_innocent": 1}
    assert [attempt for event_id, attempt in fake.calls if event_id == "evt_commit_fails"][-2:] == [1, 2]


async def test_crash_looping_message_is_recorded_as_delivery_limit(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """A message RabbitMQ dead-letters itself after x-delivery-limit redeliveries (a worker that
    died on it each time) is recorded with the delivery-limit error."""
    async with feeder(amqp_url, settings) as feed:
        await feed.event(event("evt_crash_loop"))
        channel = await feed.connection.channel()
        queue = await channel.get_queue(topology.WORK_QUEUE)

        async def returned_until_gone() -> bool:
            message = await queue.get(fail=False)
            if message is None:
                return await feed.depth(topology.DEAD_QUEUE) == 1
            await message.nack(requeue=True)  # as a crash would: back to the queue, counted
            return False

        await wait_until(returned_until_gone, what="RabbitMQ dead-lettering at the delivery limit")
        async with consumer_running(settings, fake.rules()):
            rows = await wait_until(lambda: dead(settings), what="dead letter recorded")
    assert [(r["event_id"], r["error"]) for r in rows] == [("evt_crash_loop", DELIVERY_LIMIT_ERROR)]
    assert rows[0]["attempts"] == settings.max_attempts + 1  # delivered once, redelivered up to the limit
    assert fake.calls == []


async def test_events_of_one_charge_apply_in_delivery_order(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """Events of one charge share a lane: they are applied in the order the queue delivered them."""
    ids = [f"evt_order_{i:03d}" for i in range(60)]
    async with feeder(amqp_url, settings) as feed:
        for event_id in ids:
            await feed.event(event(event_id, charge_id="ch_ordered"))
        async with consumer_running(settings, fake.rules()):
            await wait_until(lambda: _count(settings, len(ids)), what="all applied")
    rows = await fetch(settings.database_url, "select event_id from public.applied order by applied_seq")
    assert [row["event_id"] for row in rows] == ids


async def _count(settings: Settings, expected: int) -> bool:
    return await applied_count_is(settings.database_url, expected)


async def test_drain_on_shutdown_commits_and_acks_everything_delivered(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """Leaving the app (the SIGTERM path) while a batch is provably in flight (its rules wait on a
    gate that opens only after the stop began) stops consuming, then finishes what was delivered:
    the drain reports unsettled work at the stop, and every event is applied exactly once or still in the
    queue — none lost, none done twice."""
    ids = [f"evt_drain_{i:04d}" for i in range(400)]
    gate = asyncio.Event()

    async def held(_con: asyncpg.Connection, _delivery: Any) -> None:
        await gate.wait()  # inside the batch's transaction: delivered, not committed, not acked

    fake.behaviour[ids[0]] = held
    async with feeder(amqp_url, settings) as feed:
        for i, event_id in enumerate(ids):
            await feed.event(event(event_id, charge_id=f"ch_{i % 37}"))
        with structlog.testing.capture_logs() as logs:
            async with consumer_running(settings, fake.rules()):
                await wait_until(lambda: _taken_up(fake, ids[0]), what="the gated event in flight")
                asyncio.get_running_loop().call_later(0.5, gate.set)
        done = await applied(settings)
        queued = await _take_all(feed.connection, topology.WORK_QUEUE)
    drained = [line for line in logs if line["event"] == "consumer_drained"]
    assert drained and drained[-1]["unfinished_at_stop"] > 0 and drained[-1]["complete"] is True
    assert ids[0] in done
    assert set(done).isdisjoint(queued) and len(done) + len(queued) == len(ids)
    assert set(done) | set(queued) == set(ids)
    assert len([i for i, _ in fake.calls if i in done]) == len(done)  # each applied by one call


async def _taken_up(fake: FakeRules, event_id: str) -> bool:
    return any(called == event_id for called, _ in fake.calls)


async def _take_all(connection: aio_pika.abc.AbstractConnection, queue_name: str) -> list[str]:
    """Every message id left in a queue, taken off it."""
    channel = await connection.channel()
    try:
        queue = await channel.get_queue(queue_name, ensure=False)
        taken: list[str] = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            taken.append(str(message.message_id))
        return taken
    finally:
        await channel.close()


async def test_a_deferral_kept_nowhere_never_acks_the_original(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """If the deferred copy can be kept neither in PostgreSQL (here: its table is gone) nor in the
    wait queue (deleted), the original is requeued, not acked: redelivered until RabbitMQ's delivery
    limit dead-letters it, and recorded — never dropped."""
    from handlers import Result

    async def always_waiting(_con: Any, _delivery: Any) -> Any:
        return Result("retrying", retry_reason="unmatched_charge")

    fake.behaviour["evt_nowhere"] = always_waiting
    con = await asyncpg.connect(settings.database_url)
    try:
        await con.execute("alter table recon.deferred_events rename to deferred_events_away")
    finally:
        await con.close()
    async with feeder(amqp_url, settings) as feed:
        channel = await feed.connection.channel()
        async with consumer_running(settings, fake.rules()):
            await channel.queue_delete(topology.retry_queue_name(settings.retry_delays_s[0]))
            await feed.event(event("evt_nowhere"))
            rows = await wait_until(lambda: dead(settings), what="dead letter after the delivery limit")
    assert [(r["event_id"], r["error"]) for r in rows] == [("evt_nowhere", DELIVERY_LIMIT_ERROR)]
    assert await _called(fake, "evt_nowhere", settings.max_attempts)


async def _called(fake: FakeRules, event_id: str, times: int) -> bool:
    return called(fake, event_id) >= times


def test_message_headers_are_read_defensively() -> None:
    """Headers from RabbitMQ or an old publisher may be bytes or garbage: defaults, never a crash."""
    from worker.amqp.delivery import header_int

    assert header_int({"x": b"7"}, "x", 1) == 7
    assert header_int({"x": "seven"}, "x", 1) == 1
    assert header_int({}, "x", 3) == 3
    assert isinstance(aio_pika.Message(b"").headers, dict)


async def test_one_log_line_and_metrics_per_event(settings: Settings, amqp_url: str, fake: FakeRules) -> None:
    """Each handled event logs one event_handled line with the documented fields (docs/operations.md, Logs)
    and counts in recon_events_processed by type and outcome."""
    from prometheus_client import REGISTRY

    def processed() -> float:
        labels = {"type": "charge.refunded", "outcome": "applied"}
        return REGISTRY.get_sample_value("recon_events_processed_total", labels) or 0.0

    before = processed()
    with structlog.testing.capture_logs() as logs:
        async with feeder(amqp_url, settings) as feed, consumer_running(settings, fake.rules()):
            await feed.event(event("evt_logged", charge_id="ch_logged"))
            await wait_until(lambda: applied(settings), what="event applied")
    lines = [entry for entry in logs if entry["event"] == "event_handled"]
    assert len(lines) == 1
    line = lines[0]
    assert {k: line[k] for k in ("event_id", "event_type", "stripe_object_id", "outcome", "attempt")} == {
        "event_id": "evt_logged",
        "event_type": "charge.refunded",
        "stripe_object_id": "ch_logged",
        "outcome": "applied",
        "attempt": 1,
    }
    assert line["duration_ms"] >= 0
    assert processed() == before + 1


async def test_readiness_follows_database_and_broker_outages(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """/readyz's checks fail while the database or the broker is cut off, and recover with them
    (the AMQP connection is robust: it reconnects by itself)."""
    from tests.tcp_proxy import TcpProxy

    pg, mq = TcpProxy("127.0.0.1", 5432), TcpProxy("127.0.0.1", 5672)
    await pg.start()
    await mq.start()
    proxied = dataclasses.replace(
        settings, database_url=via_port(settings.database_url, pg.port), amqp_url=via_port(amqp_url, mq.port)
    )
    try:
        async with consumer_running(proxied, fake.rules()) as consumer:
            assert await consumer.database_ready() is None
            assert await consumer.broker_ready() is None
            await pg.cut()
            assert await consumer.database_ready() == "database unreachable"
            await pg.restore()
            await wait_until(lambda: _is_none(consumer.database_ready()), what="database ready again")
            await mq.cut()
            down = "broker unreachable"
            await wait_until(lambda: _equals(consumer.broker_ready(), down), what="broker down")
            await mq.restore()
            await wait_until(lambda: _is_none(consumer.broker_ready()), what="broker ready again")
    finally:
        await pg.close()
        await mq.close()


async def _is_none(check: Any) -> bool:
    return await check is None


async def _equals(check: Any, expected: str) -> bool:
    return bool(await check == expected)


async def test_database_outage_defers_events_without_counting_failures(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """While PostgreSQL is unreachable a batch retries for its database retry time, then its events go to a
    wait queue as 'database_unavailable' — not as failures: an outage longer than RECON_MAX_ATTEMPTS
    deferrals dead-letters nothing, and the event applies once the database is back."""
    from prometheus_client import REGISTRY

    from tests.tcp_proxy import TcpProxy

    labels = {"type": "charge.refunded", "reason": "database_unavailable"}

    async def deferrals() -> float:
        return REGISTRY.get_sample_value("recon_events_retried_total", labels) or 0.0

    before = await deferrals()
    proxy = TcpProxy("127.0.0.1", 5432)
    await proxy.start()
    proxied = dataclasses.replace(settings, database_url=via_port(settings.database_url, proxy.port))
    try:
        timings = ConsumerTimings(db_retry_for_s=0.3)
        async with (
            feeder(amqp_url, settings) as feed,
            consumer_running(proxied, fake.rules(), timings=timings),
        ):
            await proxy.cut()
            await feed.event(event("evt_outage"))
            outage_long = before + settings.max_attempts + 1

            async def deferred_enough() -> bool:
                return await deferrals() >= outage_long

            await wait_until(deferred_enough, what="repeated deferrals during the outage")
            await proxy.restore()
            await wait_until(lambda: applied(settings), what="applied after the outage")
    finally:
        await proxy.close()
    assert (await applied(settings))["evt_outage"] > settings.max_attempts
    assert await dead(settings) == []


async def test_consuming_resumes_on_the_new_channel_after_a_broker_cut(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """The consumers sit on aiormq's channel under the robust one: after the connection is cut and
    restored, they consume again on the new channel, and an event published then is applied."""
    from tests.tcp_proxy import TcpProxy

    mq = TcpProxy("127.0.0.1", 5672)
    await mq.start()
    proxied = dataclasses.replace(settings, amqp_url=via_port(amqp_url, mq.port))
    try:
        async with feeder(amqp_url, settings) as feed:
            async with consumer_running(proxied, fake.rules()) as consumer:
                await feed.event(event("evt_before_cut"))
                await wait_until(lambda: _has(settings, "evt_before_cut"), what="first event applied")
                await mq.cut()
                await wait_until(lambda: _equals(consumer.broker_ready(), "broker unreachable"), what="down")
                await mq.restore()
                await wait_until(lambda: _is_none(consumer.broker_ready()), what="broker ready again")
                await feed.event(event("evt_after_cut"))
                await wait_until(lambda: _has(settings, "evt_after_cut"), what="event after the cut applied")
            assert await feed.depth() == 0
    finally:
        await mq.close()
    assert set(await applied(settings)) == {"evt_before_cut", "evt_after_cut"}


async def test_deliveries_of_a_dead_channel_are_skipped_and_redelivered(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """A message delivered on a channel that died before its batch ran is not applied (it could not
    be acked, and the broker redelivers it): it is applied once, from the redelivery. The batch that
    was in flight at the cut committed; its redelivery is a duplicate."""
    from tests.tcp_proxy import TcpProxy

    gate = asyncio.Event()

    async def held_once(_con: asyncpg.Connection, _delivery: Any) -> None:
        if not gate.is_set():
            await gate.wait()

    fake.behaviour["evt_gate"] = held_once
    mq = TcpProxy("127.0.0.1", 5672)
    await mq.start()
    proxied = dataclasses.replace(settings, amqp_url=via_port(amqp_url, mq.port))
    try:
        async with feeder(amqp_url, settings) as feed:
            async with consumer_running(proxied, fake.rules()) as consumer:
                await feed.event(event("evt_gate", charge_id="ch_lane"))
                await wait_until(lambda: _taken_up(fake, "evt_gate"), what="the gated batch in flight")
                await feed.event(event("evt_behind", charge_id="ch_lane"))  # queued behind it, same lane
                await wait_until(lambda: _lane_holds(consumer, 1), what="the second delivery waiting")
                await mq.cut()
                await wait_until(lambda: _equals(consumer.broker_ready(), "broker unreachable"), what="down")
                gate.set()
                await wait_until(lambda: _lane_holds(consumer, 0), what="the lane ran past the dead delivery")
                await mq.restore()
                await wait_until(lambda: _has(settings, "evt_behind"), what="the redelivery applied")
                await wait_until(lambda: _called(fake, "evt_gate", 2), what="the gated event redelivered")
            assert await feed.depth() == 0
    finally:
        await mq.close()
    assert [i for i, _ in fake.calls].count("evt_behind") == 1
    assert set(await applied(settings)) == {"evt_gate", "evt_behind"}


async def _lane_holds(consumer: Any, n: int) -> bool:
    return bool(consumer.lanes.backlog == n)


async def test_a_consumer_the_broker_cancels_makes_the_worker_not_ready(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """Deleting the work queue under a running worker cancels its consumer: /readyz's broker check
    says so (nothing consumes any more) instead of reporting ready."""
    async with feeder(amqp_url, settings) as feed, consumer_running(settings, fake.rules()) as consumer:
        assert await consumer.broker_ready() is None
        channel = await feed.connection.channel()
        await channel.queue_delete(topology.WORK_QUEUE)
        await wait_until(
            lambda: _startswith(consumer.broker_ready(), "a consumer was cancelled by the broker"),
            what="readiness reports the cancelled consumer",
        )


async def _has(settings: Settings, event_id: str) -> bool:
    return event_id in await applied(settings)


async def _startswith(check: Any, prefix: str) -> bool:
    return str(await check).startswith(prefix)


async def test_a_dead_letter_the_database_refuses_is_parked_after_bounded_tries(
    settings: Settings, amqp_url: str, fake: FakeRules
) -> None:
    """Recording a dead letter that fails with an error that is not an outage is tried
    record_tries times, then the message moves to recon.dead-letters.parked with the error and
    leaves the dead-letter queue: not lost, not requeued forever."""
    from prometheus_client import REGISTRY

    from worker.amqp.publisher import event_message
    from worker.consume.dead_letter_drain import DrainTimings

    tries: list[str] = []

    async def refuse(_con: Any, dead_letter: Any) -> None:
        tries.append(dead_letter.event_id)
        raise ValueError("value too long for type character varying(8)")

    rules = dataclasses.replace(fake.rules(), record_dead_letter=refuse)
    timings = ConsumerTimings(drain=DrainTimings(record_tries=3, pause_s=0.0))
    parked_before = REGISTRY.get_sample_value("recon_dead_letters_parked_total") or 0.0
    async with feeder(amqp_url, settings) as feed:
        body = json.dumps(event("evt_unrecordable")).encode()
        message = event_message(body, "evt_unrecordable", "charge.refunded", 1)
        await feed.publisher.publish_dead_letter(message)
        async with consumer_running(settings, rules, timings=timings):

            async def parked() -> bool:
                return await feed.depth(topology.PARKED_QUEUE) == 1

            await wait_until(parked, what="the dead letter parked")
        assert await feed.depth(topology.DEAD_QUEUE) == 0
        channel = await feed.connection.channel()
        kept = await (await channel.get_queue(topology.PARKED_QUEUE)).get(no_ack=True)
    assert kept.body == body
    assert "value too long" in str(kept.headers[topology.HEADER_PARK_ERROR])
    assert tries == ["evt_unrecordable"] * 3
    assert REGISTRY.get_sample_value("recon_dead_letters_parked_total") == parked_before + 1
