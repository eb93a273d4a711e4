"""One AMQP delivery as the consumer sees it: the parsed event and the retry headers it carries."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
from aiormq.abc import AbstractChannel, DeliveredMessage

from worker import topology
from worker.events import NotAnEvent, check_envelope

UNKNOWN = "unknown"


class Delivery:
    """What the worker uses of one AMQP delivery, read straight off aiormq's frames.

    The consumers take deliveries from aiormq under aio-pika's robust channel (worker.consumer),
    not through ``Queue.consume``: its ``IncomingMessage`` copies some twenty properties through a
    locking ``__setattr__`` (about 21 µs a message) and its consumer adds a second task per
    message. The properties here are read when asked for, and only these few are.
    """

    __slots__ = ("_delivered", "body", "delivery_tag")

    def __init__(self, delivered: DeliveredMessage) -> None:
        self._delivered = delivered
        self.body: bytes = delivered.body
        self.delivery_tag: int | None = delivered.delivery_tag

    @property
    def headers(self) -> dict[str, Any]:
        """A copy of the message's headers: callers add their own (retry copies) to it."""
        return dict(self._delivered.header.properties.headers or {})

    @property
    def message_id(self) -> str | None:
        return self._delivered.header.properties.message_id

    @property
    def type(self) -> str | None:
        return self._delivered.header.properties.message_type

    @property
    def channel(self) -> AbstractChannel:
        """The channel it came on; raises once that channel is closed (its acks are void then)."""
        channel = self._delivered.channel
        if channel.is_closed:
            raise aio_pika.exceptions.ChannelInvalidStateError("the delivery's channel is closed")
        return channel

    async def ack(self, multiple: bool = False) -> None:
        assert self.delivery_tag is not None
        await self.channel.basic_ack(self.delivery_tag, multiple=multiple)

    async def nack(self, requeue: bool = True) -> None:
        assert self.delivery_tag is not None
        await self.channel.basic_nack(self.delivery_tag, requeue=requeue)


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


def inbound(message: Delivery) -> Inbound:
    headers = message.headers
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
