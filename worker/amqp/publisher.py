"""The one way we publish: persistent, mandatory, confirmed by the broker before we go on."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from pamqp import commands as spec

from worker.amqp import connection, topology
from worker.settings import Settings

log = structlog.get_logger(__name__)

PUBLISH_TIMEOUT_S = 5.0
# What opening or closing a channel can raise on a connection that is failing over.
_CHANNEL_ERRORS = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    OSError,
    TimeoutError,
    RuntimeError,
)


class PublishFailed(Exception):
    """The broker did not confirm the message (down, nack, unroutable or timeout): not durable."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish: the raw body and its AMQP properties, built once.

    Not an ``aio_pika.Message``: building one and then converting its ``.properties`` costs
    several times what building the properties once does, on the receiver's path for every
    webhook (docs/performance.md has the figures).
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
    less CPU per webhook in ``recon run`` (docs/performance.md).

    With ``reopen``, a publish the broker nacks (or returns) is followed by a new confirm channel:
    RabbitMQ 3.10 can leave a channel that was restored while a quorum queue had no leader (its
    node had just died) nacking every later publish to that queue, while a new channel on the same
    connection publishes fine (docs/cluster.md).
    """

    def __init__(
        self, channel: AbstractChannel, reopen: Callable[[], Awaitable[AbstractChannel]] | None = None
    ) -> None:
        self._channel = channel
        self._reopen = reopen
        self._renewing = asyncio.Lock()

    @property
    def channel(self) -> AbstractChannel:
        """The confirm channel it publishes on."""
        return self._channel

    async def publish_event(self, message: Outgoing) -> None:
        """Route by event type into the work queue; returns only once the broker confirmed."""
        await self._confirm(topology.EVENTS_EXCHANGE, message, routing_key=message.type or "")

    async def publish_to_queue(self, message: Outgoing, queue_name: str) -> None:
        """Straight into a named queue (retry wait queues, the work queue on replay)."""
        await self._confirm("", message, routing_key=queue_name)

    async def publish_dead_letter(self, message: Outgoing) -> None:
        await self._confirm(topology.DEAD_EXCHANGE, message, routing_key="")

    async def _confirm(self, exchange: str, message: Outgoing, routing_key: str) -> None:
        used = self._channel
        try:
            if used.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError("channel closed")
            channel = await used.get_underlay_channel()
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
            if isinstance(exc, aiormq.exceptions.DeliveryError):
                await self._renew(used)
            raise PublishFailed(type(exc).__name__) from exc
        if not isinstance(confirmation, aiormq.spec.Basic.Ack):
            raise PublishFailed(f"broker answered {type(confirmation).__name__}")

    async def _renew(self, nacked: AbstractChannel) -> None:
        """A new confirm channel in place of ``nacked``, once however many publishes it failed.

        Bounded like a publish: the failing publish waits for the new channel at most
        PUBLISH_TIMEOUT_S, and the nacked one is closed in the background (its Close-Ok may take
        a heartbeat interval on a broker that is failing over)."""
        if self._reopen is None:
            return
        async with self._renewing:
            if self._channel is not nacked:
                return  # another publish renewed it already
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                    self._channel = await self._reopen()
            except _CHANNEL_ERRORS as exc:
                log.warning("broker_channel_renew_failed", error=type(exc).__name__)
                return
            log.warning("broker_channel_renewed")
        closing = asyncio.create_task(_close_quietly(nacked))
        _CLOSING.add(closing)
        closing.add_done_callback(_CLOSING.discard)


# Closes in progress, referenced until done (the event loop keeps only weak references to tasks).
_CLOSING: set[asyncio.Task[None]] = set()


async def _close_quietly(channel: AbstractChannel) -> None:
    with contextlib.suppress(*_CHANNEL_ERRORS):
        await channel.close()


@asynccontextmanager
async def publisher_session(settings: Settings) -> AsyncIterator[Publisher]:
    """A confirmed publisher for the one-shot operator commands (dead-letters replay, backfill).

    They publish exactly as the receiver does: the topology declared first (so a command run
    before any receiver still has a queue to route to, and argument drift fails loudly), one
    confirm channel, and ``Publisher`` for every message.
    """
    link = await connection.connect(settings.amqp_url)
    try:
        await connection.declare_topology(link, settings)
        yield await open_publisher(link)
    finally:
        await link.close()


async def open_publisher(link: AbstractRobustConnection) -> Publisher:
    """A Publisher on a new confirm channel of ``link``, renewed on the same link after a nack."""
    return Publisher(
        await connection.open_confirm_channel(link), lambda: connection.open_confirm_channel(link)
    )
