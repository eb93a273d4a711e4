"""One AMQP delivery as the consumer sees it: the parsed event and the retry headers it carries."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage

from worker import topology
from worker.events import NotAnEvent, check_envelope

UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message taken off ``recon.events``; ``event`` is None when the body is not a Stripe event."""

    message: AbstractIncomingMessage
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


def header_int(headers: dict[str, Any], name: str, default: int) -> int:
    """A numeric header; a missing or malformed one falls back to ``default`` (never raises)."""
    value = headers.get(name)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def parse_event(body: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(event, None) for a Stripe event envelope, else (None, why not) — one line, no body content."""
    try:
        return check_envelope(orjson.loads(body)), None
    except orjson.JSONDecodeError:
        return None, "body is not JSON"
    except NotAnEvent as exc:
        return None, f"body is not a Stripe event: {exc}"


def inbound(message: AbstractIncomingMessage) -> Inbound:
    headers = dict(message.headers or {})
    event, parse_error = parse_event(message.body)
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


def charge_key(event: dict[str, Any] | None) -> str:
    """The charge an event is about: events of one charge go to one lane, so they never contend.

    ``data.object.id`` for ``charge.*`` objects, ``.charge`` for refunds and disputes; the event id
    when neither is there (it then contends with nothing).
    """
    if event is None:
        return ""
    obj = event["data"]["object"]
    if obj.get("object") == "charge" and isinstance(obj.get("id"), str):
        return str(obj["id"])
    charge = obj.get("charge")
    if isinstance(charge, dict):
        charge = charge.get("id")
    return charge if isinstance(charge, str) else str(event["id"])
