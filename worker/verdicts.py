"""What happens to a message after its transaction: ack, retry later, or dead-letter — decided here only.

Order matters and is the whole point: the database commit comes first (the caller), then the copy
for a retry or the dead-letter exchange is published and confirmed, and only then is the original
acked. A crash anywhere in between redelivers the original, which the inbox turns into a duplicate.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import aio_pika
import structlog

from worker import metrics, topology
from worker.broker import Outgoing, Publisher, PublishFailed, persistent_message
from worker.deliveries import Delivery, Inbound
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.acks import Acks

log = structlog.get_logger("worker.consumer")

Action = Literal["ack", "retry", "dead_letter"]
LAST_ERROR_CHARS = 300
# What acking on a channel that died under us raises (ChannelInvalidStateError is a RuntimeError).
_CHANNEL_GONE = (aio_pika.exceptions.ChannelInvalidStateError, aio_pika.exceptions.AMQPError, ConnectionError)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The runner's decision for one message; ``outcome`` is what the logs and metrics say."""

    action: Action
    outcome: str
    reason: str | None = None  # why a retry (unmatched_charge, refunds_short, failed, ...)
    error: str | None = None  # the last error, one line
    stripe_object_id: str | None = None
    order_number: str | None = None
    invoice_number: str | None = None


def one_line(error: BaseException | str) -> str:
    """An error as one short line for a header or a log: type and first line, never a traceback."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    first = text.strip().splitlines()[0] if text.strip() else text
    return first[:LAST_ERROR_CHARS]


def failed(item: Inbound, error: BaseException | str, settings: Settings) -> Verdict:
    """A failed attempt: retry with a growing delay, or dead-letter once RECON_MAX_ATTEMPTS is reached."""
    if item.failures + 1 >= settings.max_attempts:
        return Verdict("dead_letter", "dead_lettered", reason="failed", error=one_line(error))
    return Verdict("retry", "retrying", reason="failed", error=one_line(error))


def poison(error: str) -> Verdict:
    """A body no attempt can fix (not JSON, not an event): straight to the dead-letter queue."""
    return Verdict("dead_letter", "dead_lettered", reason="unparseable", error=one_line(error))


def deferred(reason: str) -> Verdict:
    """Not yet: retry later without counting a failure (the handlers bound waiting by time)."""
    return Verdict("retry", "retrying", reason=reason)


def _copy(item: Inbound, extra: dict[str, Any]) -> Outgoing:
    original = item.message
    headers = original.headers  # a copy of its own
    headers[topology.HEADER_FIRST_SEEN_MS] = item.first_seen_ms
    headers.update(extra)
    return persistent_message(original.body, original.message_id, original.type, headers)


def retry_message(item: Inbound, verdict: Verdict, settings: Settings) -> tuple[Outgoing, str]:
    """The copy for the wait queue and the queue's name. Failures wait longer the more they fail."""
    failures = item.failures + (1 if verdict.reason == "failed" else 0)
    step = failures if verdict.reason == "failed" else item.attempt
    delay_s = topology.retry_delay_for(step, settings.retry_delays_s)
    message = _copy(item, {topology.HEADER_ATTEMPT: item.attempt + 1, topology.HEADER_FAILURES: failures})
    return message, topology.retry_queue_name(delay_s)


def dead_letter_message(item: Inbound, verdict: Verdict) -> Outgoing:
    failures = item.failures + 1  # this attempt failed too, whether by error or by an unreadable body
    return _copy(
        item,
        {
            topology.HEADER_ATTEMPT: item.attempt,
            topology.HEADER_FAILURES: failures,
            topology.HEADER_ERROR: verdict.error or "unknown error",
        },
    )


async def _publish(item: Inbound, verdict: Verdict, publisher: Publisher, settings: Settings) -> None:
    if verdict.action == "retry":
        message, queue_name = retry_message(item, verdict, settings)
        await publisher.publish_to_queue(message, queue_name)
    elif verdict.action == "dead_letter":
        await publisher.publish_dead_letter(dead_letter_message(item, verdict))


async def settle(
    item: Inbound, verdict: Verdict, publisher: Publisher, settings: Settings, acks: Acks
) -> bool:
    """Carry out a verdict after the commit. True if the original was acked.

    A publish that is not confirmed leaves the original unacked and puts it back in the queue
    (nack, requeue): it is tried again, and the inbox keeps the effect single.
    """
    try:
        await _publish(item, verdict, publisher, settings)
    except PublishFailed as exc:
        log.warning("requeued_publish_failed", event_id=item.event_id, action=verdict.action, error=str(exc))
        await acks.nack(item.message)
        return False
    return await acks.ack(item.message)


async def finish_message(
    message: Delivery, *, requeue: bool | None = None, multiple: bool = False
) -> bool:
    """Ack (or nack with requeue), shielded from cancellation: a commit is never left half-reported.

    A closed delivery channel cannot ack; the broker redelivers the message on its own, and the
    inbox makes that delivery a duplicate. Returns True when the ack was sent.
    """
    try:
        done = message.ack(multiple=multiple) if requeue is None else message.nack(requeue=requeue)
        await asyncio.shield(done)
    except _CHANNEL_GONE as exc:
        log.info("ack_lost_channel_closed", message_id=message.message_id, error=type(exc).__name__)
        return False
    return requeue is None


def record(item: Inbound, verdict: Verdict, committed_at: float | None) -> None:
    """Metrics and the one log line per event (CONTRACT §7.10)."""
    event_type = item.event_type
    metrics.EVENTS_PROCESSED.labels(event_type, verdict.outcome).inc()
    if verdict.action == "retry":
        metrics.EVENTS_RETRIED.labels(event_type, verdict.reason or "unknown").inc()
    elif verdict.action == "dead_letter":
        metrics.EVENTS_DEAD_LETTERED.labels(event_type).inc()
    if committed_at is not None:
        metrics.RECONCILE_SECONDS.observe(committed_at - item.received_at)
        metrics.CONSUMER_LAG_SECONDS.set(max(0.0, time.time() - item.first_seen_ms / 1000))
    fields: dict[str, Any] = {
        "event_id": item.event_id,
        "event_type": event_type,
        "stripe_object_id": verdict.stripe_object_id,
        "outcome": verdict.outcome,
        "attempt": item.attempt,
        "duration_ms": round((time.monotonic() - item.received_at) * 1000, 2),
    }
    fields.update(_optional_fields(verdict))
    if verdict.action == "ack":
        log.info("event_handled", **fields)
    else:
        log.warning("event_handled", **fields)


def _optional_fields(verdict: Verdict) -> dict[str, Any]:
    optional = {
        "order_number": verdict.order_number,
        "invoice_number": verdict.invoice_number,
        "reason": verdict.reason,
        "error": verdict.error,
    }
    return {key: value for key, value in optional.items() if value is not None}
