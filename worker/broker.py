"""The AMQP connection and the one way we publish: persistent, mandatory, confirmed."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from pamqp import commands as spec

from worker import topology
from worker.settings import Settings

PUBLISH_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0


class PublishFailed(Exception):
    """The broker did not confirm the message (down, nack, unroutable or timeout): not durable."""


async def connect(amqp_url: str) -> AbstractRobustConnection:
    """A robust connection: it reconnects by itself and restores channels after a broker restart."""
    # The timeout bounds the TCP connect and the AMQP handshake of this attempt and of every later
    # reconnect: a broker that accepts TCP but never answers would otherwise hang them for good.
    return await aio_pika.connect_robust(
        amqp_url, timeout=CONNECT_TIMEOUT_S, client_properties={"connection_name": "stripe-recon"}
    )


async def open_confirm_channel(connection: AbstractRobustConnection) -> AbstractChannel:
    # on_return_raises: an unroutable mandatory publish must fail, not be confirmed into nowhere.
    return await connection.channel(publisher_confirms=True, on_return_raises=True)


async def declare_topology(connection: AbstractRobustConnection, settings: Settings) -> None:
    channel = await connection.channel()
    try:
        await topology.declare(channel, settings.max_attempts, settings.retry_delays_s)
    finally:
        await channel.close()


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish: the raw body and its AMQP properties, built once.

    Not an ``aio_pika.Message``: building one and then its ``.properties`` cost ~26 µs a publish
    against ~2 µs for the properties alone, on the receiver's path for every webhook.
    """

    body: bytes
    properties: spec.Basic.Properties

    @property
    def message_id(self) -> str | None:
        return self.properties.message_id

    @property
    def type(self) -> str | None:
        return self.properties.message_type

    @property
    def headers(self) -> dict[str, Any]:
        return self.properties.headers or {}

    @property
    def delivery_mode(self) -> int | None:
        return self.properties.delivery_mode


def persistent_message(
    body: bytes, message_id: str | None, message_type: str | None, headers: dict[str, Any]
) -> Outgoing:
    properties = spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,  # the broker writes it to disk
        message_id=message_id,
        message_type=message_type,
        headers=headers,
    )
    return Outgoing(body, properties)


def event_message(
    body: bytes,
    event_id: str,
    event_type: str,
    created: int,
    headers: Mapping[str, Any] | None = None,
) -> Outgoing:
    all_headers: dict[str, Any] = {topology.HEADER_CREATED: created}
    all_headers.setdefault(topology.HEADER_FIRST_SEEN_MS, int(time.time() * 1000))
    if headers:
        all_headers.update(headers)
    return persistent_message(body, event_id, event_type, all_headers)


class Publisher:
    """Publishes on one confirm channel; many publishes may be in flight at once.

    Each publish goes to the aiormq channel under aio-pika's robust one (which swaps it after a
    reconnect), not through ``Exchange.publish``: same confirm, mandatory and on-return semantics,
    ~6% less CPU per webhook in ``recon run``.
    """

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel

    async def publish_event(self, message: Outgoing) -> None:
        """Route by event type into the work queue; returns only once the broker confirmed."""
        await self._confirm(topology.EVENTS_EXCHANGE, message, routing_key=message.type or "")

    async def publish_to_queue(self, message: Outgoing, queue_name: str) -> None:
        """Straight into a named queue (retry wait queues, the work queue on replay)."""
        await self._confirm("", message, routing_key=queue_name)

    async def publish_dead_letter(self, message: Outgoing) -> None:
        await self._confirm(topology.DEAD_EXCHANGE, message, routing_key="")

    async def _confirm(self, exchange: str, message: Outgoing, routing_key: str) -> None:
        try:
            if self._channel.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError("channel closed")
            channel = await self._channel.get_underlay_channel()
            confirmation = await channel.basic_publish(
                message.body,
                exchange=exchange,
                routing_key=routing_key,
                properties=message.properties,
                mandatory=True,  # unroutable: the channel's on_return_raises makes it PublishError
                timeout=PUBLISH_TIMEOUT_S,
            )
        except (
            aio_pika.exceptions.AMQPError,
            aiormq.exceptions.AMQPError,
            ConnectionError,
            TimeoutError,
            RuntimeError,  # ChannelInvalidStateError: a channel that is closed or reconnecting
        ) as exc:
            raise PublishFailed(type(exc).__name__) from exc
        if not isinstance(confirmation, aiormq.spec.Basic.Ack):
            raise PublishFailed(f"broker answered {type(confirmation).__name__}")
