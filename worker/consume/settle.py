"""Carrying out a fate (worker/consume/fate.py) after the commit, and reporting it.

Order matters and is the whole point: the database commit comes first (the runner), then the copy
for a wait queue or the dead-letter exchange is published and confirmed, and only then is the
original acked. A crash anywhere in between redelivers the original, which the inbox turns into a
duplicate.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from worker import metrics
from worker.amqp import topology
from worker.amqp.publisher import Outgoing, Publisher, PublishFailed, persistent_message
from worker.consume.acks import Acks
from worker.consume.fate import Fate
from worker.consume.inbound import Inbound

log = structlog.get_logger(__name__)


class FateWithoutDelay(ValueError):
    """A retry fate must say how long to wait: decide() always sets it."""


def _copy(item: Inbound, extra: dict[str, Any]) -> Outgoing:
    original = item.message
    headers = original.headers  # a copy of its own
    headers[topology.HEADER_FIRST_SEEN_MS] = item.first_seen_ms
    headers.update(extra)
    return persistent_message(original.body, original.message_id, original.type, headers)


async def _publish_copy(item: Inbound, fate: Fate, publisher: Publisher) -> None:
    if fate.action == "retry":
        if fate.delay_s is None:
            raise FateWithoutDelay(f"retry of {item.event_id} without a delay")
        copy = _copy(
            item, {topology.HEADER_ATTEMPT: item.attempt + 1, topology.HEADER_FAILURES: fate.failures}
        )
        await publisher.publish_to_queue(copy, topology.retry_queue_name(fate.delay_s))
    elif fate.action == "dead_letter":
        extra = {
            topology.HEADER_ATTEMPT: item.attempt,
            topology.HEADER_FAILURES: fate.failures,
            topology.HEADER_ERROR: fate.error or "unknown error",
        }
        await publisher.publish_dead_letter(_copy(item, extra))


async def settle(item: Inbound, fate: Fate, publisher: Publisher, acks: Acks) -> bool:
    """Publish the copy a retry or a dead letter needs, then ack the original. True if acked.

    A publish that is not confirmed leaves the original unacked and puts it back in the queue
    (nack, requeue): it is tried again, and the inbox keeps the effect single.
    """
    try:
        await _publish_copy(item, fate, publisher)
    except PublishFailed as exc:
        log.warning("requeued_publish_failed", event_id=item.event_id, action=fate.action, error=str(exc))
        return await acks.nack(item.message)
    return await acks.ack(item.message)


def record(item: Inbound, fate: Fate, committed_at: float | None) -> None:
    """Metrics and the one log line per event."""
    event_type = item.event_type
    metrics.EVENTS_PROCESSED.labels(event_type, fate.outcome).inc()
    if fate.action == "retry":
        metrics.EVENTS_RETRIED.labels(event_type, fate.reason or "unknown").inc()
    elif fate.action == "dead_letter":
        metrics.EVENTS_DEAD_LETTERED.labels(event_type).inc()
    if committed_at is not None:
        metrics.RECONCILE_SECONDS.observe(committed_at - item.received_at)
        metrics.CONSUMER_LAG_SECONDS.set(max(0.0, time.time() - item.first_seen_ms / 1000))
    fields: dict[str, Any] = {
        "event_id": item.event_id,
        "event_type": event_type,
        "stripe_object_id": fate.stripe_object_id,
        "outcome": fate.outcome,
        "attempt": item.attempt,
        "duration_ms": round((time.monotonic() - item.received_at) * 1000, 2),
    }
    optional = {
        "order_number": fate.order_number,
        "invoice_number": fate.invoice_number,
        "reason": fate.reason,
        "error": fate.error,
    }
    fields.update({key: value for key, value in optional.items() if value is not None})
    if fate.action == "ack":
        log.info("event_handled", **fields)
    else:
        log.warning("event_handled", **fields)
