"""One AMQP delivery, read straight off aiormq's frames, and the only way it is acked or nacked."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import structlog
from aiormq.abc import AbstractChannel, DeliveredMessage

log = structlog.get_logger(__name__)

# What acking on a channel that died under us raises (ChannelInvalidStateError is a RuntimeError).
_CHANNEL_GONE = (aio_pika.exceptions.ChannelInvalidStateError, aio_pika.exceptions.AMQPError, ConnectionError)


class DeliveryWithoutTag(RuntimeError):
    """A delivery without a delivery tag cannot be acked: aiormq handed over a frame it should not."""


class Delivery:
    """What the worker uses of one AMQP delivery.

    The consumers take deliveries from aiormq under aio-pika's robust channel
    (``worker.amqp.subscription``), not through ``Queue.consume``: its ``IncomingMessage`` copies
    some twenty properties through a locking ``__setattr__`` and its consumer adds a second task
    per message. The properties here are read when asked for, and only these few are.
    """

    __slots__ = ("_delivered", "body", "delivery_tag")

    def __init__(self, delivered: DeliveredMessage) -> None:
        if delivered.delivery_tag is None:
            raise DeliveryWithoutTag("a delivery without a delivery tag")
        self._delivered = delivered
        self.body: bytes = delivered.body
        self.delivery_tag: int = delivered.delivery_tag

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

    @property
    def on_open_channel(self) -> bool:
        """False once its channel died (broker restart, connection cut): it can no longer be acked,
        and the broker redelivers it on its own."""
        return not self._delivered.channel.is_closed

    async def ack(self, *, multiple: bool = False) -> bool:
        """Ack, shielded from cancellation: a commit is never left half-reported. True if sent."""
        return await self._finish(requeue=None, multiple=multiple)

    async def nack(self, *, requeue: bool = True) -> bool:
        """Nack (by default back to the queue), shielded. True only if the message was acked, so
        always False: the caller learns the message is not done."""
        await self._finish(requeue=requeue, multiple=False)
        return False

    async def _finish(self, *, requeue: bool | None, multiple: bool) -> bool:
        # A closed delivery channel cannot ack; the broker redelivers the message on its own, and
        # the inbox makes that delivery a duplicate.
        try:
            channel = self.channel
            if requeue is None:
                done = channel.basic_ack(self.delivery_tag, multiple=multiple)
            else:
                done = channel.basic_nack(self.delivery_tag, requeue=requeue)
            await asyncio.shield(done)
        except _CHANNEL_GONE as exc:
            log.info("ack_lost_channel_closed", message_id=self.message_id, error=type(exc).__name__)
            return False
        return requeue is None


def header_int(headers: dict[str, Any], name: str, default: int) -> int:
    """A numeric header; a missing or malformed one falls back to ``default`` (never raises)."""
    value = headers.get(name)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default
