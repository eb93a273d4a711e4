"""Drains ``recon.dead-letters`` into the database (``handlers.record_dead_letter``), one
transaction each, and parks what cannot be recorded.

Two kinds of message arrive: ones the worker gave up on (they carry ``x-recon-error``) and ones
RabbitMQ dead-lettered itself after ``x-delivery-limit`` redeliveries (an ``x-death`` header, no
error of ours): a message that kept killing the worker before it could say why.

A message the database refuses (not an outage: an error the same statement will raise again) is
tried ``record_tries`` times, then moved to ``recon.dead-letters.parked`` with the error, and an
error line and a metric say so: it is neither lost nor requeued forever. An outage is nobody's
fault: the message goes back to the queue after a pause and waits for the database.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from handlers import DeadLetter
from handlers.payloads import stripe_id, timestamp
from worker import metrics
from worker.amqp import topology
from worker.amqp.delivery import Delivery, header_int
from worker.amqp.publisher import Publisher, PublishFailed, persistent_message
from worker.consume.database import is_transient_db_error, retrying_transient_db_errors
from worker.consume.fate import one_line
from worker.consume.inbound import UNKNOWN
from worker.consume.runner import Rules
from worker.events import NotAnEvent, parse_event

log = structlog.get_logger(__name__)

DELIVERY_LIMIT_ERROR = "delivery limit reached (worker crashed while processing)"


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


def _death_reason(headers: dict[str, Any]) -> str | None:
    """Why RabbitMQ itself dead-lettered the message (x-death lists the most recent death first)."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return _text(deaths[0].get("reason"))
    return None


def _error_and_attempts(headers: dict[str, Any], delivery_limit: int) -> tuple[str, int]:
    error = _text(headers.get(topology.HEADER_ERROR))
    if error:  # the worker gave up: it counted the failures
        return one_line(error), header_int(headers, topology.HEADER_FAILURES, 1)
    reason = _death_reason(headers)
    if reason in (None, "delivery_limit"):
        # A quorum queue dead-letters on the delivery after `delivery_limit` redeliveries.
        return DELIVERY_LIMIT_ERROR, delivery_limit + 1
    return f"dead-lettered by RabbitMQ: {reason}", header_int(headers, topology.HEADER_ATTEMPT, 1)


def dead_letter_from(message: Delivery, delivery_limit: int) -> DeadLetter:
    """What the rules record of a dead-lettered message; its identity from the body when that is
    an event, else from the message properties."""
    headers = message.headers
    try:
        event: dict[str, Any] | None = parse_event(message.body)
    except NotAnEvent:
        event = None
    error, attempts = _error_and_attempts(headers, delivery_limit)
    first_seen_ms = header_int(headers, topology.HEADER_FIRST_SEEN_MS, int(time.time() * 1000))
    return DeadLetter(
        event_id=str(event["id"]) if event else message.message_id or UNKNOWN,
        event_type=str(event["type"]) if event else message.type or UNKNOWN,
        body=message.body,
        error=error,
        attempts=attempts,
        first_seen_at=datetime.fromtimestamp(first_seen_ms / 1000, tz=UTC),
        created=timestamp(int(event["created"])) if event else None,
        object_id=stripe_id(event["data"]["object"].get("id")) if event else None,
    )


@dataclass(frozen=True, slots=True)
class DrainTimings:
    """``retry_for_s``: how long one try rides out transient database errors; ``record_tries``:
    tries for an error that is not transient before the message is parked; ``pause_s``: the wait
    between tries (and before an outage requeues), so one bad message cannot spin a core."""

    retry_for_s: float = 20.0
    record_tries: int = 3
    pause_s: float = 1.0
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, compare=False)


class DeadLetterDrain:
    def __init__(
        self,
        pool: asyncpg.Pool,
        rules: Rules,
        delivery_limit: int,
        publisher: Publisher,
        timings: DrainTimings,
    ) -> None:
        self._pool = pool
        self._rules = rules
        self._delivery_limit = delivery_limit
        self._publisher = publisher
        self._timings = timings

    async def run(self, batch: Sequence[Delivery]) -> None:
        for message in batch:
            await self._take(message)

    async def _take(self, message: Delivery) -> None:
        dead = dead_letter_from(message, self._delivery_limit)
        error: Exception | None = None
        for _ in range(self._timings.record_tries):
            error = await self._record(dead)
            if error is None:
                await message.ack()
                log.warning(
                    "dead_letter_recorded",
                    event_id=dead.event_id,
                    event_type=dead.event_type,
                    error=dead.error,
                )
                return
            if is_transient_db_error(error):
                log.warning("dead_letter_not_recorded_database_unavailable", event_id=dead.event_id)
                await self._pause()
                await message.nack(requeue=True)
                return
            log.warning("dead_letter_not_recorded", event_id=dead.event_id, error=one_line(error))
            await self._pause()
        await self._park(message, dead, one_line(error or "unknown error"))

    async def _record(self, dead: DeadLetter) -> Exception | None:
        try:
            async for attempt in retrying_transient_db_errors(self._timings.retry_for_s):
                with attempt:
                    async with self._pool.acquire() as con, con.transaction():
                        await self._rules.record_dead_letter(con, dead)
        except Exception as exc:
            return exc
        return None

    async def _park(self, message: Delivery, dead: DeadLetter, error: str) -> None:
        headers = message.headers
        headers[topology.HEADER_PARK_ERROR] = error
        copy = persistent_message(message.body, message.message_id, message.type, headers)
        try:
            await self._publisher.publish_to_queue(copy, topology.PARKED_QUEUE)
        except PublishFailed as exc:
            log.error("dead_letter_park_failed", event_id=dead.event_id, error=str(exc))
            await message.nack(requeue=True)
            return
        await message.ack()
        metrics.DEAD_LETTERS_PARKED.inc()
        log.error(
            "dead_letter_parked",
            event_id=dead.event_id,
            event_type=dead.event_type,
            queue=topology.PARKED_QUEUE,
            error=error,
        )

    async def _pause(self) -> None:
        await self._timings.sleep(self._timings.pause_s)
