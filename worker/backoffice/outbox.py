"""The outbox sender: rows the database queued with the change that caused them, delivered at least once.

One loop per channel (``email``, ``host_webhook``), each on the back office's own pool — never a
lane's — so a slow SMTP server or host only delays its own channel. A loop claims due rows with
``for update skip locked`` and pushes their ``due_at`` past a lease in the same short statement,
then delivers them with no transaction open; a process that dies mid-send leaves rows that are due
again when the lease ends (a repeat the receiver recognises: the message id never changes). A
failed delivery is tried again after a growing delay; a channel with a deadline gives up after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import asyncpg
import orjson
import structlog

from worker import metrics

log = structlog.get_logger(__name__)

Channel = Literal["email", "host_webhook"]
CHANNELS: tuple[Channel, ...] = ("email", "host_webhook")


@dataclass(frozen=True, slots=True)
class OutboxTimings:
    poll_every_s: float = 1.0
    batch: int = 20  # rows claimed and delivered together
    lease_s: float = 300.0  # a claimed row is due again after this if its sender vanished
    retry_delays_s: tuple[float, ...] = (10.0, 30.0, 120.0, 600.0, 1800.0, 3600.0)  # the last repeats
    give_up_after_s: float | None = None  # None: retry for as long as it takes
    metrics_every_s: float = 5.0
    keep_finished_s: float = 7 * 86400.0  # delivered rows are deleted after this

    def delay_after(self, attempts: int) -> float:
        return self.retry_delays_s[min(attempts, len(self.retry_delays_s)) - 1]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    topic: str
    message_id: str
    payload: dict[str, Any]
    created_at: datetime
    attempts: int


@dataclass(frozen=True, slots=True)
class Sent:
    pass


@dataclass(frozen=True, slots=True)
class Skipped:
    why: str  # nothing is configured to send it with, or it is not wanted


class DeliveryFailed(Exception):
    """One attempt failed; ``permanent``: the receiver refused it for good (no retry)."""

    def __init__(self, error: str, *, permanent: bool = False) -> None:
        super().__init__(error)
        self.error = error
        self.permanent = permanent


class Deliverer(Protocol):
    async def deliver(self, row: OutboxRow) -> Sent | Skipped: ...


_CLAIM = """
update recon.outbox o
set due_at = now() + make_interval(secs => $3), attempts = o.attempts + 1
where o.id in (select id from recon.outbox
               where channel = $1 and state = 'pending' and due_at <= now()
               order by due_at, id
               limit $2
               for update skip locked)
returning o.id, o.topic, o.message_id, o.payload, o.created_at, o.attempts
"""
_FINISH = """
update recon.outbox set state = $2, finished_at = now(), last_error = $3
where id = $1 and state = 'pending'
"""
# The delivered rows of one claim, marked in one statement: one row per statement cost a round trip
# per webhook-driven row in `recon run` (docs/performance.md, end-to-end capacity).
_FINISH_DELIVERED = """
update recon.outbox o set state = f.state, finished_at = now(), last_error = f.why
from unnest($1::bigint[], $2::text[], $3::text[]) as f(id, state, why)
where o.id = f.id and o.state = 'pending'
"""
_RETRY = """
update recon.outbox set due_at = now() + make_interval(secs => $2), last_error = $3
where id = $1 and state = 'pending'
"""
_BACKLOG = """
select count(*) as pending, coalesce(extract(epoch from now() - min(created_at)), 0)::float8 as oldest_s
from recon.outbox where channel = $1 and state = 'pending'
"""
_PRUNE = (
    "delete from recon.outbox where state <> 'pending' and finished_at < now() - make_interval(secs => $1)"
)


class OutboxSender:
    def __init__(
        self,
        pool: asyncpg.Pool,
        channel: Channel,
        deliverer: Deliverer,
        timings: OutboxTimings = OutboxTimings(),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._pool = pool
        self.channel = channel
        self._deliverer = deliverer
        self._timings = timings
        self._clock = clock

    async def run_once(self) -> int:
        """Claim the due rows and deliver them; how many were claimed."""
        async with self._pool.acquire() as con:
            rows = await con.fetch(_CLAIM, self.channel, self._timings.batch, self._timings.lease_s)
        claimed = [
            OutboxRow(
                r["id"],
                r["topic"],
                r["message_id"],
                orjson.loads(r["payload"]),
                r["created_at"],
                r["attempts"],
            )
            for r in rows
        ]
        outcomes = await asyncio.gather(*(self._deliver(row) for row in claimed))
        delivered = [(row, o) for row, o in zip(claimed, outcomes, strict=True) if o is not None]
        if delivered:
            async with self._pool.acquire() as con:
                await con.execute(
                    _FINISH_DELIVERED,
                    [row.id for row, _ in delivered],
                    ["sent" if isinstance(o, Sent) else "skipped" for _, o in delivered],
                    [None if isinstance(o, Sent) else o.why for _, o in delivered],
                )
        for row, outcome in delivered:
            if isinstance(outcome, Sent):
                metrics.OUTBOX_SENT.labels(self.channel).inc()
                log.info(
                    "outbox_sent",
                    channel=self.channel,
                    topic=row.topic,
                    outbox_id=row.id,
                    attempts=row.attempts,
                )
        return len(claimed)

    async def _deliver(self, row: OutboxRow) -> Sent | Skipped | None:
        """Deliver one row; its outcome to mark, or None when it failed (marked here for a retry)."""
        try:
            return await self._deliverer.deliver(row)
        except DeliveryFailed as failed:
            await self._failed(row, failed)
            return None
        except Exception as exc:  # a bug or a row it did not foresee: that row waits, the channel goes on
            # The type only: the message of an unforeseen error may quote the payload (addresses).
            log.error(
                "outbox_delivery_crashed", channel=self.channel, outbox_id=row.id, error=type(exc).__name__
            )
            await self._failed(row, DeliveryFailed(f"unexpected {type(exc).__name__}"))
            return None

    async def _failed(self, row: OutboxRow, failed: DeliveryFailed) -> None:
        metrics.OUTBOX_SEND_FAILURES.labels(self.channel).inc()
        limit = self._timings.give_up_after_s
        expired = limit is not None and (self._clock() - row.created_at).total_seconds() >= limit
        async with self._pool.acquire() as con:
            if failed.permanent or expired:
                await con.execute(_FINISH, row.id, "gave_up", failed.error)
            else:
                await con.execute(_RETRY, row.id, self._timings.delay_after(row.attempts), failed.error)
        log.warning(
            "outbox_send_failed",
            channel=self.channel,
            topic=row.topic,
            outbox_id=row.id,
            attempts=row.attempts,
            error=failed.error,
            gave_up=failed.permanent or expired,
        )

    async def observe_backlog(self) -> tuple[int, float]:
        """Pending rows and the age of the oldest, into the metrics; returned for callers."""
        async with self._pool.acquire() as con:
            row = await con.fetchrow(_BACKLOG, self.channel)
        pending, oldest_s = int(row["pending"]), float(row["oldest_s"])
        metrics.OUTBOX_PENDING.labels(self.channel).set(pending)
        metrics.OUTBOX_OLDEST_AGE_SECONDS.labels(self.channel).set(oldest_s)
        return pending, oldest_s

    async def prune(self) -> None:
        async with self._pool.acquire() as con:
            await con.execute(_PRUNE, self._timings.keep_finished_s)

    async def run_forever(self) -> None:
        """Deliver what is due, again as soon as a full batch was claimed, else after poll_every_s;
        the backlog metrics every metrics_every_s. Database trouble only pauses the loop."""
        loop = asyncio.get_running_loop()
        next_metrics = 0.0
        while True:
            claimed = 0
            try:
                if loop.time() >= next_metrics:
                    await self.observe_backlog()
                    await self.prune()
                    next_metrics = loop.time() + self._timings.metrics_every_s
                claimed = await self.run_once()
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                log.warning("outbox_unavailable", channel=self.channel, error=type(exc).__name__)
            if claimed < self._timings.batch:
                await asyncio.sleep(self._timings.poll_every_s)
