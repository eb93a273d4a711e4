"""Every exchange, queue, routing key and header name, declared from this one module.

Path of a message:
  stripe.events (topic, key = event type) ──▶ recon.events (quorum work queue)
  worker defers  ──▶ recon.deferred_events (PostgreSQL) ──the worker publishes it when due──▶ recon.events
  worker defers while PostgreSQL is down ──▶ recon.wait.<delay> (quorum, TTL) ──dead-letters back──▶
  recon.events
  worker gives up ──▶ recon.dead (fanout) ──▶ recon.dead-letters
  a dead letter the database refuses to record ──▶ recon.dead-letters.parked (for an operator)
  a message redelivered x-delivery-limit times (a crash loop) is dead-lettered by RabbitMQ
  itself into recon.dead, at-least-once.
deploy/rabbitmq/definitions.json is generated from ``definitions()``; a test keeps them equal.

Every queue is a quorum queue, so a cluster that loses one node loses no message, waiting ones
included. The wait queues were classic ``recon.retry.<delay>`` queues before; a queue's type cannot
change in place, so the quorum ones carry a new name and ``declare`` deletes the classic ones once
they are empty (``retire_classic_wait_queues``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel

from worker.events import HANDLED_TYPES
from worker.settings import DEFAULT_RETRY_DELAYS_S

EVENTS_EXCHANGE = "stripe.events"
WORK_QUEUE = "recon.events"
DEAD_EXCHANGE = "recon.dead"
DEAD_QUEUE = "recon.dead-letters"
PARKED_QUEUE = "recon.dead-letters.parked"
RETRY_QUEUE_PREFIX = "recon.wait."
# Where the wait queues lived while they were classic queues (up to the quorum wait queues).
CLASSIC_RETRY_QUEUE_PREFIX = "recon.retry."

HEADER_CREATED = "stripe-created"
HEADER_ATTEMPT = "x-recon-attempt"  # 1 on first delivery, +1 per deferral or failure
HEADER_FAILURES = "x-recon-failures"  # failed attempts only: RECON_MAX_ATTEMPTS bounds these
HEADER_FIRST_SEEN_MS = "x-recon-first-seen-ms"
HEADER_ERROR = "x-recon-error"  # last error, on dead-lettered messages
HEADER_PARK_ERROR = "x-recon-park-error"  # why a dead letter could not be recorded, on parked ones


def _delay_suffix(delay_s: float) -> str:
    ms = round(delay_s * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def retry_queue_name(delay_s: float) -> str:
    return RETRY_QUEUE_PREFIX + _delay_suffix(delay_s)


def classic_retry_queue_name(delay_s: float) -> str:
    """The name this delay's wait queue had as a classic queue: retired by ``declare``."""
    return CLASSIC_RETRY_QUEUE_PREFIX + _delay_suffix(delay_s)


def retry_delay_for(attempt: int, delays_s: tuple[float, ...]) -> float:
    """Growing delays: the n-th deferral waits delays[n-1], the last one repeats."""
    return delays_s[min(max(attempt, 1), len(delays_s)) - 1]


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    arguments: dict[str, Any]


def work_queue(max_attempts: int) -> QueueSpec:
    return QueueSpec(
        WORK_QUEUE,
        {
            "x-queue-type": "quorum",
            # Catches crash loops (a message that kills the worker each time); ordinary failures
            # are counted by the worker in HEADER_FAILURES and dead-lettered with their error.
            "x-delivery-limit": max_attempts,
            "x-dead-letter-exchange": DEAD_EXCHANGE,
            # at-least-once dead-lettering requires reject-publish overflow.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )


def retry_queues(delays_s: tuple[float, ...]) -> list[QueueSpec]:
    return [
        QueueSpec(
            retry_queue_name(delay),
            {
                # Replicated like the work queue: a node lost with its disk loses no waiting event.
                # Message TTL on quorum queues needs RabbitMQ 3.10.
                "x-queue-type": "quorum",
                "x-message-ttl": round(delay * 1000),
                "x-dead-letter-exchange": "",
                # Without the routing key an expired message keeps the wait queue's name as key
                # and is silently dropped.
                "x-dead-letter-routing-key": WORK_QUEUE,
                # The expired message stays here until recon.events confirms it, even across a
                # leader change; at-most-once (the default) could drop it on the way back.
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        for delay in delays_s
    ]


def dead_queue() -> QueueSpec:
    return QueueSpec(DEAD_QUEUE, {"x-queue-type": "quorum"})


def parked_queue() -> QueueSpec:
    """Nothing consumes it: an operator reads it (its depth is a metric) and moves messages back."""
    return QueueSpec(PARKED_QUEUE, {"x-queue-type": "quorum"})


async def declare(channel: AbstractChannel, max_attempts: int, retry_delays_s: tuple[float, ...]) -> None:
    """Idempotent; called by receiver and worker start-up. Argument drift fails with PRECONDITION_FAILED."""
    events = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    dead = await channel.declare_exchange(DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    spec = work_queue(max_attempts)
    queue = await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
    for event_type in sorted(HANDLED_TYPES):
        await queue.bind(events, routing_key=event_type)
    for retry in retry_queues(retry_delays_s):
        await channel.declare_queue(retry.name, durable=True, arguments=retry.arguments)
    dlq = dead_queue()
    dead_letters = await channel.declare_queue(dlq.name, durable=True, arguments=dlq.arguments)
    await dead_letters.bind(dead, routing_key="")
    parked = parked_queue()
    await channel.declare_queue(parked.name, durable=True, arguments=parked.arguments)
    await retire_classic_wait_queues(channel, retry_delays_s)


async def retire_classic_wait_queues(channel: AbstractChannel, retry_delays_s: tuple[float, ...]) -> None:
    """Delete the classic ``recon.retry.<delay>`` queues of an older release, each only once empty.

    Nothing publishes to them any more, but one may still hold deferred events: its TTL and
    dead-letter arguments keep returning them to recon.events, and the broker refuses the
    ``if_empty`` delete until the last one left. So no event is lost, no operator step is
    needed, and the queue goes at the first start-up after it emptied. Each attempt runs on a
    raw channel of its own, because a refusal closes the channel and a robust one would reopen.
    """
    underlay = await channel.get_underlay_channel()
    for delay in retry_delays_s:
        scratch = await underlay.connection.channel(publisher_confirms=False)
        try:
            await scratch.queue_delete(classic_retry_queue_name(delay), if_empty=True)
        except aiormq.exceptions.ChannelPreconditionFailed:
            continue  # still holds deferred events: next start-up
        await scratch.close()


def definitions(
    max_attempts: int = 8, retry_delays_s: tuple[float, ...] = DEFAULT_RETRY_DELAYS_S
) -> dict[str, Any]:
    """RabbitMQ definitions (the management import format) for the default settings."""
    vhost = "/"
    queues = [work_queue(max_attempts), *retry_queues(retry_delays_s), dead_queue(), parked_queue()]
    return {
        "exchanges": [
            {
                "name": EVENTS_EXCHANGE,
                "vhost": vhost,
                "type": "topic",
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            },
            {
                "name": DEAD_EXCHANGE,
                "vhost": vhost,
                "type": "fanout",
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            },
        ],
        "queues": [
            {"name": q.name, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": q.arguments}
            for q in queues
        ],
        "bindings": [
            *(
                {
                    "source": EVENTS_EXCHANGE,
                    "vhost": vhost,
                    "destination": WORK_QUEUE,
                    "destination_type": "queue",
                    "routing_key": t,
                    "arguments": {},
                }
                for t in sorted(HANDLED_TYPES)
            ),
            {
                "source": DEAD_EXCHANGE,
                "vhost": vhost,
                "destination": DEAD_QUEUE,
                "destination_type": "queue",
                "routing_key": "",
                "arguments": {},
            },
        ],
    }
