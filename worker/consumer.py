"""The consumer runtime of ``recon worker``: resources, consumers, readiness, drain on shutdown.

    recon.events ──▶ lanes (by charge) ──▶ BatchRunner: one transaction, a savepoint per event,
                                           commit, then verdicts (retry copy / dead letter, ack)
    recon.dead-letters ──▶ one lane ──▶ DeadLetterRecorder: record, commit, ack

Everything is started and stopped in ``consumer_ctx``, an aiohttp cleanup context.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import asyncpg
import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustChannel, AbstractRobustConnection
from aiohttp import web
from aiormq.abc import DeliveredMessage

from worker import broker, metrics, topology
from worker.acks import Acks
from worker.batches import Lanes
from worker.broker import Publisher
from worker.dead_letter_recorder import DeadLetterRecorder
from worker.deliveries import Delivery, Inbound, charge_key, inbound
from worker.health import READINESS_CHECKS, ReadinessCheck
from worker.refund_fetch import RefundFetcher, StripeRefunds
from worker.runner import BatchRunner, Rules, handlers_rules
from worker.settings import Settings

log = structlog.get_logger("worker.consumer")

# Lanes = concurrent transactions: two, so one lane's statements run while the other waits on
# PostgreSQL. Four drained no faster on 2 cores (bench/reconcile.py) and halved the batches, and
# in `recon run`, where the one Python process is the bottleneck, every batch's fixed round trips
# count: two lanes cut the end-to-end lag at 1,000 webhooks/s from p99 1.2 s to 0.5 s.
LANE_COUNT = 2
MAX_BATCH = 50
DEAD_LETTER_PREFETCH = 16
DEPTH_EVERY_S = 5.0
DRAIN_TIMEOUT_S = 20.0
CHECK_TIMEOUT_S = 2.0


def prefetch_for(settings: Settings) -> int:
    """RECON_WORKER_CONCURRENCY is the contract's "messages in flight per worker process": the
    broker stops delivering at that many unacked. Throughput wants every lane to find a full
    batch waiting while its previous one commits, i.e. about 2 × lanes × MAX_BATCH (200): the
    default of 32 trades throughput for a small in-flight window (docs/performance.md)."""
    return settings.worker_concurrency


def lane_count(settings: Settings) -> int:
    return max(1, min(LANE_COUNT, settings.worker_concurrency))


@dataclass(slots=True)
class Subscription:
    """One consumer of a queue, taken from aiormq under aio-pika's robust channel.

    ``Queue.consume`` would wrap every delivery in an ``IncomingMessage`` and a second task
    (worker.deliveries.Delivery says what that costs); here the callback gets a ``Delivery`` from
    aiormq's own task. aio-pika restores the channel, its QoS and the passive queue declaration
    after a reconnect; ``reopen_callbacks`` then consumes again on the new channel. A consumer the
    broker cancels (its queue deleted) is not taken up again: /readyz says so until a restart.
    """

    channel: AbstractRobustChannel
    queue_name: str
    callback: Callable[[Delivery], Awaitable[None]]
    tag: str | None = None
    cancelled_by_broker: bool = False

    async def start(self) -> None:
        self.channel.reopen_callbacks.add(self._consume)
        await self._consume()

    async def _consume(self, *_reopened_channel: Any) -> None:
        underlay = await self.channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._on_cancel)
        consume_ok = await underlay.basic_consume(self.queue_name, self._deliver)
        self.tag = consume_ok.consumer_tag
        self.cancelled_by_broker = False

    async def _deliver(self, delivered: DeliveredMessage) -> None:
        await self.callback(Delivery(delivered))

    def _on_cancel(self, frame: aiormq.spec.Basic.Cancel) -> None:
        if frame.consumer_tag == self.tag:
            self.cancelled_by_broker = True
            log.error("consumer_cancelled_by_broker", queue=self.queue_name)

    async def cancel(self, timeout_s: float) -> None:
        """Stop deliveries (what was delivered stays ours to finish); after this no reopen consumes."""
        self.channel.reopen_callbacks.discard(self._consume)
        if self.tag is not None and not self.channel.is_closed:
            underlay = await asyncio.wait_for(self.channel.get_underlay_channel(), timeout_s)
            await underlay.basic_cancel(self.tag, timeout=timeout_s)


@dataclass(slots=True)
class Consumer:
    settings: Settings
    pool: asyncpg.Pool
    connection: AbstractRobustConnection
    lanes: Lanes[Inbound]
    dead_lanes: Lanes[Delivery]
    fetcher: StripeRefunds | None
    consuming: list[Subscription]
    acks: Acks
    monitor: asyncio.Task[None] | None = None

    async def on_event(self, message: Delivery) -> None:
        try:
            self.acks.delivered(message)
        except aio_pika.exceptions.ChannelInvalidStateError:
            return  # delivered on a channel that closed since: the broker redelivers it
        item = inbound(message)
        self.lanes.route(charge_key(item.event), item)

    async def on_dead_letter(self, message: Delivery) -> None:
        self.dead_lanes.route("", message)

    async def stop_consuming(self) -> None:
        for subscription in self.consuming:
            with contextlib.suppress(Exception):  # a dead channel has no consumer left to cancel
                await subscription.cancel(CHECK_TIMEOUT_S)
        self.consuming.clear()

    async def drain(self) -> None:
        """Finish (commit and ack) whatever was delivered; what is cut off stays unacked, not lost."""
        backlog = self.lanes.backlog
        drained = await self.lanes.drain(DRAIN_TIMEOUT_S) and await self.dead_lanes.drain(DRAIN_TIMEOUT_S)
        log.info("consumer_drained", complete=drained, backlog_at_stop=backlog)

    async def close(self) -> None:
        if self.monitor is not None:
            self.monitor.cancel()
            await asyncio.gather(self.monitor, return_exceptions=True)
        await self.lanes.stop()
        await self.dead_lanes.stop()
        with contextlib.suppress(Exception):  # a broker that stopped answering must not hang exit
            # unacked deliveries go back to their queues
            await asyncio.wait_for(self.connection.close(), DRAIN_TIMEOUT_S)
        if self.fetcher is not None:
            await self.fetcher.close()
        await asyncio.wait_for(self.pool.close(), DRAIN_TIMEOUT_S)

    async def broker_ready(self) -> str | None:
        if self.connection.is_closed or not self.connection.connected.is_set():
            return "broker unreachable"
        if any(subscription.cancelled_by_broker for subscription in self.consuming):
            return "a consumer was cancelled by the broker (its queue deleted?); restart the worker"
        return None

    async def database_ready(self) -> str | None:
        try:
            async with self.pool.acquire(timeout=CHECK_TIMEOUT_S) as con:
                await con.fetchval("select 1", timeout=CHECK_TIMEOUT_S)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            return "database unreachable"
        return None

    def readiness_checks(self) -> list[ReadinessCheck]:
        return [self.broker_ready, self.database_ready]


def refund_fetcher(settings: Settings) -> StripeRefunds | None:
    if settings.stripe_api_key is None:
        log.warning(
            "stripe_api_key_missing",
            detail="charge.refunded events without embedded refunds cannot be checked against the API; "
            "set STRIPE_API_KEY (needed for API versions 2022-11-15 to 2024-10-27)",
        )
        return None
    return StripeRefunds(settings.stripe_api_key, settings.stripe_api_base)


async def _keep_session(_con: asyncpg.Connection) -> None:
    """Nothing to reset on release: the worker keeps no session state (no SET, LISTEN, advisory
    lock or cursor) on pooled connections, and asyncpg still rolls back an open transaction. The
    default reset costs a round trip per batch."""


# Every statement of the worker finds a handful of rows by key. With the default
# random_page_cost (4, spinning disks) the planner prices index probes so high that it seq-scans
# tables of a few thousand rows (payments, orders, invoices) and hash-joins them on every batch:
# the batch's lock took 2.2 ms instead of 0.35-0.45 (EXPLAIN ANALYZE, 7,241 payments), and the
# drain ran 2,600-2,700 events/s against 2,200-2,300 with PostgreSQL's CPU per event 212 µs
# against 250-276 (bench/reconcile.py, alternating runs). 1.1 is the usual value for SSDs and
# for data in cache; it is set on our sessions only, not on a database the host app shares.
SESSION_SETTINGS = {"random_page_cost": "1.1"}


async def open_pool(settings: Settings) -> asyncpg.Pool:
    # One connection per lane, one for the dead-letter recorder, one for /readyz.
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=1,
        max_size=lane_count(settings) + 2,
        command_timeout=30,
        reset=_keep_session,
        server_settings=SESSION_SETTINGS,
    )
    assert pool is not None
    return pool


async def _consume(
    connection: AbstractRobustConnection,
    queue_name: str,
    prefetch: int,
    callback: Callable[[Delivery], Awaitable[None]],
) -> Subscription:
    channel = connection.channel()
    await channel.initialize()
    await channel.set_qos(prefetch_count=prefetch)
    await channel.get_queue(queue_name, ensure=True)  # restored (passively) after a reconnect
    subscription = Subscription(channel, queue_name, callback)
    await subscription.start()
    return subscription


async def start_consumer(settings: Settings, rules: Rules, fetcher: RefundFetcher | None = None) -> Consumer:
    async with contextlib.AsyncExitStack() as undo:  # on a failed start, close what was opened
        pool = await open_pool(settings)
        undo.push_async_callback(pool.close)
        connection = await broker.connect(settings.amqp_url)
        undo.push_async_callback(connection.close)
        consumer = await _wire(settings, rules, fetcher, pool, connection)
        undo.pop_all()
    return consumer


async def _wire(
    settings: Settings,
    rules: Rules,
    fetcher: RefundFetcher | None,
    pool: asyncpg.Pool,
    connection: AbstractRobustConnection,
) -> Consumer:
    await broker.declare_topology(connection, settings)
    publisher = Publisher(await broker.open_confirm_channel(connection))
    stripe_refunds = refund_fetcher(settings) if fetcher is None else None
    acks = Acks(max_held=max(1, prefetch_for(settings) // 4))
    runner = BatchRunner(pool, rules, settings, publisher, fetcher or stripe_refunds, acks)
    recorder = DeadLetterRecorder(pool, rules, settings.max_attempts)
    consumer = Consumer(
        settings=settings,
        pool=pool,
        connection=connection,
        lanes=Lanes("events", lane_count(settings), runner.run, MAX_BATCH),
        dead_lanes=Lanes("dead-letters", 1, recorder.run, DEAD_LETTER_PREFETCH),
        fetcher=stripe_refunds,
        consuming=[],
        acks=acks,
    )
    consumer.lanes.start()
    consumer.dead_lanes.start()
    prefetch = prefetch_for(settings)
    consumer.consuming.append(await _consume(connection, topology.WORK_QUEUE, prefetch, consumer.on_event))
    consumer.consuming.append(
        await _consume(connection, topology.DEAD_QUEUE, DEAD_LETTER_PREFETCH, consumer.on_dead_letter)
    )
    consumer.monitor = asyncio.create_task(watch_queue_depth(connection), name="queue-depth")
    log.info("consumer_started", prefetch=prefetch, lanes=lane_count(settings), max_batch=MAX_BATCH)
    return consumer


async def watch_queue_depth(connection: AbstractRobustConnection, queues: Sequence[str] = ()) -> None:
    """Every DEPTH_EVERY_S, the ready count of the work and dead-letter queues (passive declare)."""
    names = queues or (topology.WORK_QUEUE, topology.DEAD_QUEUE)
    channel: AbstractChannel = await connection.channel()
    while True:
        try:
            underlay = await asyncio.wait_for(channel.get_underlay_channel(), CHECK_TIMEOUT_S)
            for name in names:
                declared = await underlay.queue_declare(name, passive=True, timeout=CHECK_TIMEOUT_S)
                metrics.QUEUE_DEPTH.labels(name).set(declared.message_count or 0)
        except Exception as exc:  # a broker outage: the gauge keeps its last value until it is back
            log.debug("queue_depth_unavailable", error=type(exc).__name__)
        await asyncio.sleep(DEPTH_EVERY_S)


CONSUMER = web.AppKey("recon_consumer", Consumer)


def consumer_ctx(
    settings: Settings, rules: Rules | None = None, fetcher: RefundFetcher | None = None
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The aiohttp cleanup context of the consumer: start on startup; on shutdown (SIGTERM) stop
    consuming, drain what was delivered (commit and ack), then close.

    ``rules`` and ``fetcher`` default to the real handlers and the Stripe API; tests inject theirs.
    """

    async def consumer_context(app: web.Application) -> AsyncIterator[None]:
        consumer = await start_consumer(settings, rules or handlers_rules(), fetcher)
        app[CONSUMER] = consumer
        app[READINESS_CHECKS].extend(consumer.readiness_checks())
        try:
            yield
        finally:
            await consumer.stop_consuming()
            await consumer.drain()
            await consumer.close()

    return consumer_context
