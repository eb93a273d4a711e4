"""Carrying out a fate (worker/consume/fate.py) after the commit, and reporting it.

Order matters and is the whole point: the database commit comes first (the runner), then the
deferred copy is committed (worker/consume/deferrals.py; in a database outage, published to a wait
queue instead) or the dead letter is published and confirmed, and only then is the original
acked. A crash anywhere in between redelivers the original, which the inbox turns into a duplicate.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import structlog

from worker import metrics
from worker.amqp import topology
from worker.amqp.publisher import Outgoing, Publisher, PublishFailed, persistent_message
from worker.consume import deferrals
from worker.consume.acks import Acks
from worker.consume.database import DATABASE_ERRORS
from worker.consume.fate import Fate
from worker.consume.inbound import Inbound

log = structlog.get_logger(__name__)


class FateWithoutDelay(ValueError):
    """A retry fate must say how long to wait: decide() always sets it."""


def _headers(item: Inbound, extra: dict[str, Any]) -> dict[str, Any]:
    headers = item.message.headers  # a copy of its own
    headers[topology.HEADER_FIRST_SEEN_MS] = item.first_seen_ms
    headers.update(extra)
    return headers


def _copy(item: Inbound, headers: dict[str, Any]) -> Outgoing:
    original = item.message
    return persistent_message(original.body, original.message_id, original.type, headers)


async def _keep_copy(item: Inbound, fate: Fate, publisher: Publisher, pool: asyncpg.Pool) -> None:
    if fate.action == "retry":
        if fate.delay_s is None:
            raise FateWithoutDelay(f"retry of {item.event_id} without a delay")
        # Built once: the row keeps them (defer copies what it keeps), and so does the fallback.
        headers = _headers(
            item, {topology.HEADER_ATTEMPT: item.attempt + 1, topology.HEADER_FAILURES: fate.failures}
        )
        try:
            await deferrals.defer(
                pool,
                delay_s=fate.delay_s,
                event_id=item.event_id,
                message_type=item.message.type,
                body=item.message.body,
                headers=headers,
            )
        except DATABASE_ERRORS as exc:
            # PostgreSQL cannot keep it (an outage: such batches defer as database_unavailable),
            # so the broker's wait queue does, whose TTL returns it to the work queue.
            log.info("deferred_to_wait_queue", event_id=item.event_id, error=type(exc).__name__)
            await publisher.publish_to_queue(_copy(item, headers), topology.retry_queue_name(fate.delay_s))
    elif fate.action == "dead_letter":
        extra = {
            topology.HEADER_ATTEMPT: item.attempt,
            topology.HEADER_FAILURES: fate.failures,
            topology.HEADER_ERROR: fate.error or "unknown error",
        }
        await publisher.publish_dead_letter(_copy(item, _headers(item, extra)))


async def settle(item: Inbound, fate: Fate, publisher: Publisher, acks: Acks, pool: asyncpg.Pool) -> bool:
    """Keep the copy a retry or a dead letter needs, then ack the original. True if acked.

    A copy that is not kept (neither committed nor confirmed) leaves the original unacked and puts
    it back in the queue (nack, requeue): it is tried again, and the inbox keeps the effect single.
    """
    try:
        await _keep_copy(item, fate, publisher, pool)
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
