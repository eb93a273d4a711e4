"""The consumer runtime of ``recon worker``: resources, consumers, readiness, drain on shutdown.

    recon.events ──▶ lanes (by charge) ──▶ BatchRunner: one transaction (a savepoint per event
                                           once one fails), commit, then each message's fate
                                           (retry copy / dead letter, ack)
    recon.dead-letters ──▶ one lane ──▶ DeadLetterDrain: record, commit, ack (or park)

Everything is started and stopped in ``consumer_ctx``, an aiohttp cleanup context.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aio_pika
import asyncpg
import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiohttp import web

from handlers import Policy
from worker import metrics
from worker.amqp import topology
from worker.amqp.connection import connect, declare_topology
from worker.amqp.delivery import Delivery
from worker.amqp.publisher import open_publisher
from worker.amqp.subscription import Subscription, subscribe
from worker.consume.acks import Acks
from worker.consume.database import DATABASE_ERRORS, open_pool
from worker.consume.dead_letter_drain import DeadLetterDrain, DrainTimings
from worker.consume.deferrals import DeferredMover, MoverTimings
from worker.consume.inbound import Inbound, inbound, lane_key
from worker.consume.lanes import Lanes, Linger
from worker.consume.refund_fetch import FetchTimings, RefundFetcher, StripeRefunds
from worker.consume.runner import BatchRunner, Rules, handlers_rules
from worker.health import READINESS_CHECKS, ReadinessCheck
from worker.settings import Settings
from worker.shutdown import SHUTDOWN, Deadline

log = structlog.get_logger(__name__)

# Lanes = concurrent transactions: two, so one lane's statements run while the other waits on
# PostgreSQL; more halved the batches and drained no faster on 2 cores (docs/performance.md).
LANE_COUNT = 2
# Only a backlog fills a batch (a lane takes what waits, and lingers at most Linger.max_s). Near
# capacity, 100 rather than 50 cut PostgreSQL's CPU per event by a sixth and the lag's tail with
# it; 200 gained nothing more (docs/performance.md, the sixth session).
MAX_BATCH = 100
DEAD_LETTER_PREFETCH = 16
# Held back from the drain for the closing steps that follow it (consumers, connection, pool).
CLOSE_RESERVE_S = 5.0


@dataclass(frozen=True, slots=True)
class ConsumerTimings:
    """Every timing knob of the runtime, in one place; tests pass short ones."""

    linger: Linger = Linger()
    db_retry_for_s: float = 20.0  # a batch rides out database trouble this long, then defers
    fetch: FetchTimings = FetchTimings()
    drain: DrainTimings = DrainTimings()
    deferrals: MoverTimings = MoverTimings()
    # How often the queues' depth is read: the gauge, and the prefetch window's cue (PrefetchWindow).
    depth_every_s: float = 1.0
    check_timeout_s: float = 2.0
    shutdown: Callable[[], Deadline] = field(default=Deadline, compare=False)


def prefetch_for(settings: Settings) -> int:
    """RECON_WORKER_CONCURRENCY: the messages in flight per worker process while the queue keeps
    up (the broker stops delivering at that many unacked). A small window keeps one event's wait
    short; under a backlog PrefetchWindow widens it to ``burst_prefetch_for``."""
    return settings.worker_concurrency


# Throughput wants every lane to find a full batch waiting while its previous one commits: about
# 2 × lanes × MAX_BATCH, doubled for the acks held back (docs/performance.md has the runs).
BURST_PREFETCH = 4 * LANE_COUNT * MAX_BATCH


def burst_prefetch_for(settings: Settings) -> int:
    return max(settings.worker_concurrency, BURST_PREFETCH)


@dataclass(slots=True)
class PrefetchWindow:
    """Small while the work queue is empty, wide under a backlog: the default settings drain a
    backlog fast and still hand a lone event to a lane at once.

    Widened when more messages wait in the queue than the small window holds; narrowed once, for
    ``calm_reads`` depth reads in a row, the queue was empty and no more than the small window was
    in flight. An empty queue alone is no lull: under a steady load the wide window takes in every
    message as it arrives, and narrowing then left a backlog that widened it again a second later,
    a see-saw that cost the lag's tail near capacity (docs/performance.md).
    """

    subscription: Subscription
    acks: Acks
    small: int
    wide: int
    timeout_s: float
    calm_reads: int = 3
    current: int = 0
    readings: int = 0  # depth reads observed so far
    _calm_in_a_row: int = 0

    def __post_init__(self) -> None:
        self.current = self.small

    async def observe(self, ready: int) -> None:
        """One depth reading of the work queue (messages ready, not yet delivered)."""
        self.readings += 1
        calm = ready == 0 and self.acks.outstanding <= self.small
        self._calm_in_a_row = self._calm_in_a_row + 1 if calm else 0
        if self.current == self.small and ready > self.small and self.wide > self.small:
            await self._set(self.wide, ready)
        elif self.current == self.wide and self._calm_in_a_row >= self.calm_reads:
            await self._set(self.small, ready)

    async def _set(self, prefetch: int, ready: int) -> None:
        await self.subscription.set_prefetch(prefetch, self.timeout_s)
        self.acks.hold_at_most(max(1, prefetch // 4))
        self.current = prefetch
        log.info("prefetch_changed", prefetch=prefetch, ready=ready)


def lane_count(settings: Settings) -> int:
    return max(1, min(LANE_COUNT, settings.worker_concurrency))


@dataclass(slots=True)
class Consumer:
    settings: Settings
    timings: ConsumerTimings
    pool: asyncpg.Pool
    connection: AbstractRobustConnection
    lanes: Lanes[Inbound]
    dead_lanes: Lanes[Delivery]
    fetcher: StripeRefunds | None
    consuming: list[Subscription]
    acks: Acks
    window: PrefetchWindow | None = None
    monitor: asyncio.Task[None] | None = None
    mover: DeferredMover | None = None

    async def on_event(self, message: Delivery) -> None:
        try:
            self.acks.delivered(message)
        except aio_pika.exceptions.ChannelInvalidStateError:
            return  # delivered on a channel that closed since: the broker redelivers it
        item = inbound(message)
        self.lanes.route(lane_key(item.event), item)

    async def on_dead_letter(self, message: Delivery) -> None:
        self.dead_lanes.route("", message)

    async def stop_consuming(self, deadline: Deadline) -> None:
        if self.monitor is not None:  # it may change the prefetch window, i.e. consume again
            self.monitor.cancel()
            # Bounded: cancelled inside an aiormq call, the task may not end promptly, and a stop
            # must not wait on a gauge. Its channel goes with the connection.
            wait_s = min(self.timings.check_timeout_s, deadline.remaining())
            done, _ = await asyncio.wait({self.monitor}, timeout=wait_s)
            if not done:
                log.warning("queue_depth_monitor_not_stopped", after_s=wait_s)
            self.monitor = None
        for subscription in self.consuming:
            timeout_s = min(self.timings.check_timeout_s, deadline.remaining())
            try:
                await subscription.cancel(timeout_s)
            except Exception as exc:  # a dead channel has no consumer left to cancel
                log.warning("consumer_cancel_failed", queue=subscription.queue_name, error=type(exc).__name__)
        self.consuming.clear()

    async def drain(self, deadline: Deadline) -> None:
        """Finish (commit and ack) whatever was delivered, both lane sets together, within what the
        deadline leaves; what is cut off stays unacked, not lost."""
        # What the stop found delivered and not settled: waiting in the lanes, or in a running batch.
        backlog, unfinished = self.lanes.backlog, self.lanes.unfinished + self.dead_lanes.unfinished
        both = asyncio.gather(self.lanes.drain(), self.dead_lanes.drain())
        try:
            await asyncio.wait_for(both, deadline.remaining(keep_s=CLOSE_RESERVE_S))
            drained = True
        except TimeoutError:
            drained = False
        log.info("consumer_drained", complete=drained, backlog_at_stop=backlog, unfinished_at_stop=unfinished)

    async def close(self, deadline: Deadline) -> None:
        # Here, not when consuming stops: the drain does not wait on it, and it needs the pool and
        # the channel until now. What it has not published stays in the table for the next worker.
        if self.mover is not None:
            await self.mover.stop(deadline)
        if self.monitor is not None:
            self.monitor.cancel()
            await asyncio.gather(self.monitor, return_exceptions=True)
        await self.lanes.stop()
        await self.dead_lanes.stop()
        try:  # unacked deliveries go back to their queues
            await asyncio.wait_for(self.connection.close(), deadline.remaining())
        except Exception as exc:  # a broker that stopped answering must not hang exit
            log.warning("broker_close_failed", error=type(exc).__name__)
        if self.fetcher is not None:
            await self.fetcher.close()
        try:
            await asyncio.wait_for(self.pool.close(), deadline.remaining())
        except TimeoutError:
            log.warning("pool_close_timed_out")
            self.pool.terminate()

    async def broker_ready(self) -> str | None:
        if self.connection.is_closed or not self.connection.connected.is_set():
            return "broker unreachable"
        if any(subscription.cancelled_by_broker for subscription in self.consuming):
            return "a consumer was cancelled by the broker (its queue deleted?); restart the worker"
        return None

    async def database_ready(self) -> str | None:
        timeout_s = self.timings.check_timeout_s
        try:
            async with self.pool.acquire(timeout=timeout_s) as con:
                await con.fetchval("select 1", timeout=timeout_s)
        except DATABASE_ERRORS:
            return "database unreachable"
        return None

    def readiness_checks(self) -> list[ReadinessCheck]:
        return [self.broker_ready, self.database_ready]


def refund_fetcher(settings: Settings, timings: FetchTimings) -> StripeRefunds | None:
    if settings.stripe_api_key is None:
        log.warning(
            "stripe_api_key_missing",
            detail="charge.refunded events without embedded refunds cannot be checked against the API; "
            "set STRIPE_API_KEY (needed for API versions 2022-11-15 to 2024-10-27)",
        )
        return None
    return StripeRefunds(settings.stripe_api_key, settings.stripe_api_base, timings)


async def start_consumer(
    settings: Settings, rules: Rules, fetcher: RefundFetcher | None, timings: ConsumerTimings
) -> Consumer:
    # One connection per lane, one for the dead-letter drain, one for /readyz, one for the
    # deferred events' mover.
    pool = await open_pool(settings, max_size=lane_count(settings) + 3)
    try:
        connection = await connect(settings.amqp_url)
    except BaseException:
        await pool.close()
        raise
    try:
        return await _wire(settings, rules, fetcher, timings, pool, connection)
    except BaseException:  # on a failed start, close what was opened
        await connection.close()
        await pool.close()
        raise


async def _wire(
    settings: Settings,
    rules: Rules,
    fetcher: RefundFetcher | None,
    timings: ConsumerTimings,
    pool: asyncpg.Pool,
    connection: AbstractRobustConnection,
) -> Consumer:
    await declare_topology(connection, settings)
    publisher = await open_publisher(connection)
    stripe_refunds = refund_fetcher(settings, timings.fetch) if fetcher is None else None
    acks = Acks(max_held=max(1, prefetch_for(settings) // 4))
    policy = Policy(unmatched_retry_s=settings.unmatched_retry_s)
    runner = BatchRunner(
        pool, rules, settings, publisher, fetcher or stripe_refunds, acks, policy, timings.db_retry_for_s
    )
    drain = DeadLetterDrain(pool, rules, settings.max_attempts, publisher, timings.drain)
    consumer = Consumer(
        settings=settings,
        timings=timings,
        pool=pool,
        connection=connection,
        lanes=Lanes("events", lane_count(settings), runner.run, MAX_BATCH, timings.linger),
        dead_lanes=Lanes("dead-letters", 1, drain.run, DEAD_LETTER_PREFETCH, timings.linger),
        fetcher=stripe_refunds,
        consuming=[],
        acks=acks,
    )
    consumer.lanes.start()
    consumer.dead_lanes.start()
    prefetch = prefetch_for(settings)
    work = await subscribe(connection, topology.WORK_QUEUE, prefetch, consumer.on_event)
    consumer.consuming.append(work)
    consumer.window = PrefetchWindow(
        work, acks, prefetch, burst_prefetch_for(settings), timings.check_timeout_s
    )
    consumer.consuming.append(
        await subscribe(connection, topology.DEAD_QUEUE, DEAD_LETTER_PREFETCH, consumer.on_dead_letter)
    )
    monitor = watch_queue_depth(
        connection, timings.depth_every_s, timings.check_timeout_s, on_work_depth=consumer.window.observe
    )
    consumer.monitor = asyncio.create_task(monitor, name="queue-depth")
    # Last, after every await of the start: a start that fails leaves no loop behind.
    consumer.mover = DeferredMover(pool, publisher, timings.deferrals)
    consumer.mover.start()
    log.info("consumer_started", prefetch=prefetch, lanes=lane_count(settings), max_batch=MAX_BATCH)
    return consumer


WATCHED_QUEUES = (topology.WORK_QUEUE, topology.DEAD_QUEUE, topology.PARKED_QUEUE)


async def watch_queue_depth(
    connection: AbstractRobustConnection,
    every_s: float,
    timeout_s: float,
    queues: Sequence[str] = WATCHED_QUEUES,
    on_work_depth: Callable[[int], Awaitable[None]] | None = None,
) -> None:
    """Every ``every_s``, the ready count of the work, dead-letter and parked queues (passive
    declare), into the gauge and, for the work queue, to ``on_work_depth``."""
    channel: AbstractChannel = await connection.channel()
    unavailable = False
    while True:
        try:
            underlay = await asyncio.wait_for(channel.get_underlay_channel(), timeout_s)
            for name in queues:
                declared = await underlay.queue_declare(name, passive=True, timeout=timeout_s)
                metrics.QUEUE_DEPTH.labels(name).set(declared.message_count or 0)
                if name == topology.WORK_QUEUE and on_work_depth is not None:
                    await on_work_depth(declared.message_count or 0)
            unavailable = False
        except Exception as exc:  # a broker outage: the gauge keeps its last value until it is back
            if not unavailable:  # once per outage, not every few seconds
                log.warning("queue_depth_unavailable", error=type(exc).__name__)
            unavailable = True
        await asyncio.sleep(every_s)


CONSUMER = web.AppKey("recon_consumer", Consumer)


def consumer_ctx(
    settings: Settings,
    rules: Rules | None = None,
    fetcher: RefundFetcher | None = None,
    timings: ConsumerTimings = ConsumerTimings(),
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The aiohttp cleanup context of the consumer: start on startup; on shutdown (SIGTERM) stop
    consuming, drain what was delivered (commit and ack), then close — all within the app's one
    shutdown deadline (worker/shutdown.py).

    ``rules`` and ``fetcher`` default to the real handlers and the Stripe API; tests inject theirs.
    """

    async def consumer_context(app: web.Application) -> AsyncIterator[None]:
        consumer = await start_consumer(settings, rules or handlers_rules(), fetcher, timings)
        app[CONSUMER] = consumer
        app[READINESS_CHECKS].extend(consumer.readiness_checks())
        try:
            yield
        finally:
            deadline = app[SHUTDOWN] if SHUTDOWN in app else timings.shutdown()
            deadline.start()
            await consumer.stop_consuming(deadline)
            await consumer.drain(deadline)
            await consumer.close(deadline)

    return consumer_context
