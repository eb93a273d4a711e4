"""Deferred events wait in PostgreSQL until due; a loop of the worker's publishes them back.

A retry fate (worker/consume/fate.py) keeps the event's exact bytes, its type and our headers
(``own_headers``) in ``recon.deferred_events`` with the time it is due, and only then is the
original acked. ``DeferredMover`` claims due rows under a lease, publishes each to the work queue
with a confirm (outside any transaction), and deletes the rows the broker confirmed. A worker that
dies between the confirm and the delete leaves its rows to be claimed again when the lease ends:
the event is queued twice, and the inbox makes the second a duplicate.

The broker's dead-lettering is not on this path: on RabbitMQ 3.10.8 its helper did not survive a
wait queue leader's death, and deferred events stayed parked (docs/cluster.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import structlog

from worker import metrics
from worker.amqp import topology
from worker.amqp.publisher import Publisher, PublishFailed, persistent_message
from worker.consume.database import DATABASE_ERRORS
from worker.shutdown import Deadline

log = structlog.get_logger(__name__)

OWN_HEADER_PREFIX = "x-recon-"
# A database that does not answer must not hold a settled batch's ack for long: past this, the
# deferral goes to the broker's wait queue instead (worker/consume/settle.py).
DEFER_TIMEOUT_S = 5.0

_DEFER_SQL = """
insert into recon.deferred_events (due_at, event_id, message_type, body, headers)
values (now() + make_interval(secs => $1), $2, $3, $4, $5::jsonb)
"""

# The oldest due rows nobody holds; a claim lasts ``lease_s``.
_CLAIM_SQL = """
update recon.deferred_events d set claimed_until = now() + make_interval(secs => $2)
from (
    select id from recon.deferred_events
    where due_at <= now() and (claimed_until is null or claimed_until < now())
    order by due_at
    limit $1
    for update skip locked
) due
where d.id = due.id
returning d.id, d.event_id, d.message_type, d.body, d.headers
"""

_DELETE_SQL = "delete from recon.deferred_events where id = any($1::bigint[])"
_RELEASE_SQL = "update recon.deferred_events set claimed_until = null where id = any($1::bigint[])"

# How many wait, and how long the oldest due one has been due: a few tenths of a second while the
# mover keeps up, growing while nothing takes them back (no worker, or none able to publish).
_BACKLOG_SQL = """
select count(*) as waiting,
       coalesce(extract(epoch from now() - min(due_at) filter (where due_at <= now())), 0)::float8
           as overdue_s
from recon.deferred_events
"""


def own_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The headers a deferred copy keeps: ours (``x-recon-*`` and the event's created time). The
    broker's (x-death, x-delivery-count) describe the delivery that is being retired, and may hold
    values JSON cannot carry (timestamps)."""
    return {
        key: value
        for key, value in headers.items()
        if key.startswith(OWN_HEADER_PREFIX) or key == topology.HEADER_CREATED
    }


async def defer(
    pool: asyncpg.Pool,
    *,
    delay_s: float,
    event_id: str,
    message_type: str | None,
    body: bytes,
    headers: Mapping[str, Any],
) -> None:
    """Keep one event until ``delay_s`` from now; committed when this returns. Raises one of
    DATABASE_ERRORS within DEFER_TIMEOUT_S when the database cannot take it."""
    row = (delay_s, event_id, message_type, body, orjson.dumps(own_headers(headers)).decode())
    async with pool.acquire(timeout=DEFER_TIMEOUT_S) as con:
        await con.execute(_DEFER_SQL, *row, timeout=DEFER_TIMEOUT_S)


@dataclass(frozen=True, slots=True)
class MoverTimings:
    poll_s: float = 0.25  # a deferral comes back at most this late
    lease_s: float = 60.0  # how long a claimed row is another worker's (publishes take milliseconds)
    batch: int = 100
    observe_every_s: float = 5.0  # the backlog gauges' refresh (a count over the table)


class DeferredMover:
    """Publishes due deferred events back to the work queue, for as long as it runs."""

    def __init__(
        self, pool: asyncpg.Pool, publisher: Publisher, timings: MoverTimings = MoverTimings()
    ) -> None:
        self._pool = pool
        self._publisher = publisher
        self._timings = timings
        self._task: asyncio.Task[None] | None = None
        self._refused = False  # the last pass met a refused publish: warn once per streak

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="deferred-events")

    async def stop(self, deadline: Deadline) -> None:
        """Cancel the loop; a publish it was in keeps its row (claimed, taken again later)."""
        if self._task is None:
            return
        self._task.cancel()
        done, _ = await asyncio.wait({self._task}, timeout=deadline.remaining())
        if not done:
            log.warning("deferred_mover_not_stopped")
        self._task = None

    async def _run(self) -> None:
        failing = False
        observed_at = float("-inf")
        while True:
            try:
                if time.monotonic() - observed_at >= self._timings.observe_every_s:
                    observed_at = time.monotonic()
                    await self.observe_backlog()
                moved = await self.move_due()
                failing = False
            except DATABASE_ERRORS as exc:  # the database away: the rows wait, nothing is lost
                if not failing:
                    log.warning("deferred_events_unavailable", error=type(exc).__name__)
                failing, moved = True, 0
            except Exception:  # a bug must not end the loop: deferred events would never come back
                if not failing:
                    log.exception("deferred_events_pass_failed")
                failing, moved = True, 0
            # Straight on only after a full batch went out: a pass whose publishes were refused
            # claimed and released a full batch too, and must not loop on the database unpaused.
            if moved < self._timings.batch:
                await asyncio.sleep(self._timings.poll_s)

    async def observe_backlog(self) -> tuple[int, float]:
        """Deferred events waiting and how many seconds the oldest due one is overdue, into the
        gauges; returned for callers. Every worker reports the same table-wide figures."""
        async with self._pool.acquire() as con:
            row = await con.fetchrow(_BACKLOG_SQL)
        waiting, overdue_s = int(row["waiting"]), float(row["overdue_s"])
        metrics.DEFERRED_EVENTS.set(waiting)
        metrics.DEFERRED_OVERDUE_SECONDS.set(overdue_s)
        return waiting, overdue_s

    async def move_due(self) -> int:
        """One pass: claim what is due, publish it, delete what the broker confirmed and release
        the rest for the next pass. Returns the number of events the broker confirmed."""
        async with self._pool.acquire() as con:
            rows = await con.fetch(_CLAIM_SQL, self._timings.batch, self._timings.lease_s)
        confirmed: list[int] = []
        unsent: list[int] = []
        for index, row in enumerate(rows):
            refusal = await self._publish(row)
            if refusal is not None:
                # The rest would be refused too (the channel closed with its broker node).
                unsent = [int(r["id"]) for r in rows[index:]]
                if not self._refused:
                    log.warning("deferred_events_not_requeued", released=len(unsent), error=refusal)
                break
            confirmed.append(int(row["id"]))
        self._refused = bool(unsent)
        if confirmed or unsent:
            async with self._pool.acquire() as con:
                if confirmed:
                    await con.execute(_DELETE_SQL, confirmed)
                if unsent:  # released, not left to the lease: after a failover, out at the next pass
                    await con.execute(_RELEASE_SQL, unsent)
        return len(confirmed)

    async def _publish(self, row: Mapping[str, Any]) -> str | None:
        """None once the broker confirmed, else why not (the row is kept: released for the next pass)."""
        headers = orjson.loads(row["headers"])
        message = persistent_message(bytes(row["body"]), row["event_id"], row["message_type"], headers)
        try:
            await self._publisher.publish_to_queue(message, topology.WORK_QUEUE)
        except PublishFailed as exc:
            return str(exc)
        return None
