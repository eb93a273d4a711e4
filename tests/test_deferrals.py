"""Deferred events wait in PostgreSQL and come back to the work queue when due, exactly as kept;
a row claimed by a worker that died is taken again once its lease ends; a publish the broker
does not confirm keeps the row for the next pass; two gauges say how many wait and how late."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg
import orjson
from prometheus_client import REGISTRY

from tests.harness import wait_until
from tests.work_queue import drain_work_queue
from worker import metrics
from worker.amqp import topology
from worker.amqp.publisher import Publisher, publisher_session
from worker.consume import deferrals
from worker.consume.database import open_pool
from worker.consume.deferrals import DeferredMover, MoverTimings
from worker.settings import Settings
from worker.shutdown import Deadline

BODY = b'{"id":"evt_1","type":"charge.refunded","created":1700000000}'
OURS = {
    topology.HEADER_ATTEMPT: 2,
    topology.HEADER_FAILURES: 0,
    topology.HEADER_FIRST_SEEN_MS: 1_700_000_000_000,
    topology.HEADER_CREATED: 1_700_000_000,
}
HEADERS = {**OURS, "x-delivery-count": 1}  # the broker's, about the delivery being retired


@asynccontextmanager
async def mover(settings: Settings) -> AsyncIterator[tuple[asyncpg.Pool, DeferredMover, Publisher]]:
    pool = await open_pool(settings, max_size=2)
    try:
        async with publisher_session(settings) as publisher:
            yield pool, DeferredMover(pool, publisher, MoverTimings(lease_s=60.0)), publisher
    finally:
        await pool.close()


async def _rows(con: asyncpg.Connection) -> list[asyncpg.Record]:
    return await con.fetch("select event_id, claimed_until is not null as claimed from recon.deferred_events")


async def test_a_due_event_goes_back_exactly_as_kept_and_leaves_the_table(
    settings: Settings, con: asyncpg.Connection
) -> None:
    """Not yet due: it stays. Due: it is in the work queue with its bytes, id, type and our own
    headers (not the broker's), and its row is gone."""
    async with mover(settings) as (pool, moving, _):
        await deferrals.defer(
            pool, delay_s=0.0, event_id="evt_1", message_type="charge.refunded", body=BODY, headers=HEADERS
        )
        await deferrals.defer(
            pool, delay_s=3600.0, event_id="evt_later", message_type="charge.refunded", body=b"{}", headers={}
        )
        assert await moving.move_due() == 1
    [message] = await drain_work_queue(settings.amqp_url)
    assert (message.body, message.message_id, message.type) == (BODY, "evt_1", "charge.refunded")
    # Ours as kept; the broker counts this delivery afresh (a quorum queue adds its own count).
    assert {k: v for k, v in message.headers.items() if k != "x-delivery-count"} == OURS
    assert message.headers.get("x-delivery-count", 0) == 0
    assert [tuple(r) for r in await _rows(con)] == [("evt_later", False)]


async def test_a_claim_of_a_worker_that_died_is_taken_again_when_its_lease_ends(
    settings: Settings, con: asyncpg.Connection
) -> None:
    """A row claimed by another worker is left alone while its lease runs, then published."""
    async with mover(settings) as (pool, moving, _):
        await deferrals.defer(
            pool, delay_s=0.0, event_id="evt_1", message_type="charge.refunded", body=BODY, headers=HEADERS
        )
        await con.execute("update recon.deferred_events set claimed_until = now() + interval '1 hour'")
        assert await moving.move_due() == 0
        await con.execute("update recon.deferred_events set claimed_until = now() - interval '1 second'")
        assert await moving.move_due() == 1
    assert [m.message_id for m in await drain_work_queue(settings.amqp_url)] == ["evt_1"]
    assert await _rows(con) == []


async def test_a_publish_not_confirmed_keeps_the_row(settings: Settings, con: asyncpg.Connection) -> None:
    """The publisher's channel is closed: nothing is queued, and the rows stay, released at once for
    the next pass rather than held for the lease (after a failover they go out in 0.25 s, not 60)."""
    async with mover(settings) as (pool, moving, publisher):
        await deferrals.defer(
            pool, delay_s=0.0, event_id="evt_1", message_type="charge.refunded", body=BODY, headers=HEADERS
        )
        await deferrals.defer(
            pool, delay_s=0.0, event_id="evt_2", message_type="charge.refunded", body=BODY, headers=HEADERS
        )
        await publisher.channel.close()
        assert await moving.move_due() == 0
    assert await drain_work_queue(settings.amqp_url) == []
    assert sorted(tuple(r) for r in await _rows(con)) == [("evt_1", False), ("evt_2", False)]


def test_only_our_own_headers_are_kept() -> None:
    """The broker's headers may hold timestamps JSON cannot carry; ours are ints and text."""
    kept = deferrals.own_headers({**HEADERS, "x-death": [{"time": object()}]})
    assert orjson.loads(orjson.dumps(kept)) == OURS


async def test_the_backlog_gauges_count_what_waits_and_how_late_the_oldest_due_one_is(
    settings: Settings, con: asyncpg.Connection
) -> None:
    """Nothing due: overdue is 0. A row due 30 s ago that nobody took back: ~30 s overdue. Once the
    mover has published it, only the later one waits and nothing is overdue."""
    async with mover(settings) as (pool, moving, _):
        assert await moving.observe_backlog() == (0, 0.0)
        await deferrals.defer(
            pool, delay_s=3600.0, event_id="evt_later", message_type="charge.refunded", body=b"{}", headers={}
        )
        assert await moving.observe_backlog() == (1, 0.0)
        await deferrals.defer(
            pool, delay_s=-30.0, event_id="evt_1", message_type="charge.refunded", body=BODY, headers=HEADERS
        )
        waiting, overdue_s = await moving.observe_backlog()
        assert waiting == 2 and 30.0 <= overdue_s < 40.0
        assert REGISTRY.get_sample_value("recon_deferred_events") == 2
        assert REGISTRY.get_sample_value("recon_deferred_overdue_seconds") == overdue_s
        assert await moving.move_due() == 1
        assert await moving.observe_backlog() == (1, 0.0)
    await drain_work_queue(settings.amqp_url)


async def test_the_running_mover_refreshes_the_gauges(settings: Settings, con: asyncpg.Connection) -> None:
    """Started as the worker starts it, the mover publishes the due row and the gauges follow on
    their own: one row waiting, then none."""
    async with mover(settings) as (pool, _, publisher):
        await deferrals.defer(
            pool, delay_s=0.5, event_id="evt_1", message_type="charge.refunded", body=BODY, headers=HEADERS
        )
        metrics.DEFERRED_EVENTS.set(-1)  # no earlier test's reading can pass for this one's
        running = DeferredMover(pool, publisher, MoverTimings(poll_s=0.05, observe_every_s=0.05))

        def gauge_at(value: float) -> Callable[[], Awaitable[bool]]:
            async def probe() -> bool:
                return REGISTRY.get_sample_value("recon_deferred_events") == value

            return probe

        running.start()
        try:
            await wait_until(gauge_at(1), what="the gauge at one deferred event")
            await wait_until(gauge_at(0), what="the gauge back at 0")
        finally:
            await running.stop(Deadline(5.0))
    assert [m.message_id for m in await drain_work_queue(settings.amqp_url)] == ["evt_1"]


async def test_refused_publishes_do_not_make_the_mover_spin(
    settings: Settings, con: asyncpg.Connection
) -> None:
    """More rows due than a batch and a channel that refuses every publish (the broker away): the
    loop waits its poll interval between passes instead of claiming and releasing without pause."""
    passes = 0

    class Counting(DeferredMover):
        async def move_due(self) -> int:
            nonlocal passes
            passes += 1
            return await super().move_due()

    async with mover(settings) as (pool, _, publisher):
        for n in range(3):
            await deferrals.defer(
                pool, delay_s=0.0, event_id=f"evt_{n}", message_type="charge.refunded", body=BODY, headers={}
            )
        await publisher.channel.close()
        running = Counting(pool, publisher, MoverTimings(poll_s=0.1, batch=2))
        running.start()
        await asyncio.sleep(0.5)
        await running.stop(Deadline(5.0))
    assert 1 <= passes <= 8
    assert len(await _rows(con)) == 3
