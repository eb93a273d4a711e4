"""A message taken off the work queue: the event it carries and the retry headers, read once."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from handlers import charge_ref
from worker.amqp import topology
from worker.amqp.delivery import Delivery, header_int
from worker.events import NotAnEvent, parse_event, why_not_an_event

UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message taken off ``recon.events``; ``event`` is None when the body is not a Stripe event."""

    message: Delivery
    received_at: float  # time.monotonic() when it was delivered, for the reconcile latency
    event: dict[str, Any] | None
    parse_error: str | None
    attempt: int  # 1 on first delivery
    failures: int  # failed attempts so far (RECON_MAX_ATTEMPTS bounds these)
    first_seen_ms: int  # epoch ms when the receiver first queued it

    @property
    def event_id(self) -> str:
        if self.event is not None:
            return str(self.event["id"])
        return self.message.message_id or UNKNOWN

    @property
    def event_type(self) -> str:
        if self.event is not None:
            return str(self.event["type"])
        return self.message.type or UNKNOWN

    @property
    def first_seen_at(self) -> datetime:
        return datetime.fromtimestamp(self.first_seen_ms / 1000, tz=UTC)


def inbound(message: Delivery) -> Inbound:
    headers = message.headers
    event: dict[str, Any] | None = None
    parse_error: str | None = None
    try:
        event = parse_event(message.body)
    except NotAnEvent as exc:
        parse_error = why_not_an_event(exc)
    now_ms = int(time.time() * 1000)
    return Inbound(
        message=message,
        received_at=time.monotonic(),
        event=event,
        parse_error=parse_error,
        attempt=max(1, header_int(headers, topology.HEADER_ATTEMPT, 1)),
        failures=max(0, header_int(headers, topology.HEADER_FAILURES, 0)),
        first_seen_ms=header_int(headers, topology.HEADER_FIRST_SEEN_MS, now_ms),
    )


def lane_key(event: dict[str, Any] | None) -> str:
    """The charge an event is about, as the handlers match it: events of one charge go to one lane,
    so two lanes never wait on each other's payment row locks. The event id when there is none (it
    then contends with nothing)."""
    if event is None:
        return ""
    return charge_ref(event).charge_id or str(event["id"])
