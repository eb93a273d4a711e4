"""Drains ``recon.dead-letters`` into the database (handlers.record_dead_letter), one transaction each.

Two kinds of message arrive: ones the worker gave up on (they carry ``x-recon-error``) and ones
RabbitMQ dead-lettered itself after ``x-delivery-limit`` redeliveries (an ``x-death`` header, no
error of ours): a message that kept killing the worker before it could say why.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
import structlog

from worker import topology
from worker.deliveries import UNKNOWN, Delivery, header_int
from worker.runner import Rules, retrying_transient_db_errors
from worker.verdicts import finish_message, one_line

if TYPE_CHECKING:
    from handlers import DeadLetter

log = structlog.get_logger("worker.consumer")

DELIVERY_LIMIT_ERROR = "delivery limit reached (worker crashed while processing)"
RECORD_RETRY_FOR_S = 20.0
# After a failure that is not transient the message goes back to the queue; pausing the lane first
# keeps one unrecordable message from spinning a core.
FAILED_PAUSE_S = 1.0


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


def _identity(message: Delivery) -> tuple[str, str]:
    """(event id, event type) from the body when it is an event, else from the message properties."""
    try:
        event = orjson.loads(message.body)
    except orjson.JSONDecodeError:
        event = None
    if isinstance(event, dict) and isinstance(event.get("id"), str):
        return event["id"], str(event.get("type") or message.type or UNKNOWN)
    return message.message_id or UNKNOWN, message.type or UNKNOWN


def dead_letter_from(message: Delivery, delivery_limit: int) -> DeadLetter:
    from handlers import DeadLetter

    headers = message.headers
    event_id, event_type = _identity(message)
    error, attempts = _error_and_attempts(headers, delivery_limit)
    first_seen_ms = header_int(headers, topology.HEADER_FIRST_SEEN_MS, int(time.time() * 1000))
    return DeadLetter(
        event_id=event_id,
        event_type=event_type,
        body=message.body,
        error=error,
        attempts=attempts,
        first_seen_at=datetime.fromtimestamp(first_seen_ms / 1000, tz=UTC),
    )


class DeadLetterRecorder:
    def __init__(self, pool: asyncpg.Pool, rules: Rules, delivery_limit: int) -> None:
        self._pool = pool
        self._rules = rules
        self._delivery_limit = delivery_limit

    async def run(self, batch: Sequence[Delivery]) -> None:
        for message in batch:
            await self._record(message)

    async def _record(self, message: Delivery) -> None:
        dead = dead_letter_from(message, self._delivery_limit)
        try:
            async for attempt in retrying_transient_db_errors(RECORD_RETRY_FOR_S):
                with attempt:
                    async with self._pool.acquire() as con, con.transaction():
                        await self._rules.record_dead_letter(con, dead)
        except Exception:
            log.exception("dead_letter_not_recorded", event_id=dead.event_id)
            await asyncio.sleep(FAILED_PAUSE_S)
            await finish_message(message, requeue=True)
            return
        await finish_message(message)
        log.warning(
            "dead_letter_recorded", event_id=dead.event_id, event_type=dead.event_type, error=dead.error
        )
