"""Consuming a queue from aiormq's channel under aio-pika's robust one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiormq
import structlog
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import DeliveredMessage

from worker.amqp.delivery import Delivery

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Subscription:
    """One consumer of a queue, taken from aiormq under aio-pika's robust channel.

    ``Queue.consume`` would wrap every delivery in an ``IncomingMessage`` and a second task
    (``Delivery`` says what that costs); here the callback gets a ``Delivery`` from
    aiormq's own task. aio-pika restores the channel, its QoS and the passive queue declaration
    after a reconnect; ``reopen_callbacks`` then consumes again on the new channel. A consumer the
    broker cancels (its queue deleted) is not taken up again: /readyz says so until a restart.
    """

    channel: AbstractRobustChannel
    queue_name: str
    callback: Callable[[Delivery], Awaitable[None]]
    tag: str | None = None
    cancelled_by_broker: bool = False
    stopped: bool = False  # cancelled by us: nothing may consume on it again
    # One change of consumer at a time: a prefetch change, a consume after a reopen, the stop.
    _changing: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The aiormq channel ``tag`` consumes on: a reopen and a prefetch change can both find a new
    # channel, and only one of them may consume on it (two consumers would double the window, and
    # the stop would cancel one of them).
    _tag_channel: Any = None

    async def start(self) -> None:
        self.channel.reopen_callbacks.add(self._reopened)
        await self._consume()

    async def _reopened(self, *_channel: Any) -> None:
        async with self._changing:
            if not self.stopped and not await self._consuming_on_current():
                await self._consume()

    async def _consuming_on_current(self) -> bool:
        underlay = await self.channel.get_underlay_channel()
        return self.tag is not None and self._tag_channel is underlay

    async def _consume(self) -> None:
        underlay = await self.channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._on_cancel)
        consume_ok = await underlay.basic_consume(self.queue_name, self._deliver)
        self.tag, self._tag_channel = consume_ok.consumer_tag, underlay
        self.cancelled_by_broker = False

    async def _deliver(self, delivered: DeliveredMessage) -> None:
        await self.callback(Delivery(delivered))

    def _on_cancel(self, frame: aiormq.spec.Basic.Cancel) -> None:
        if frame.consumer_tag == self.tag:
            self.cancelled_by_broker = True
            log.error("consumer_cancelled_by_broker", queue=self.queue_name)

    async def set_prefetch(self, prefetch: int, timeout_s: float) -> None:
        """Consume with a new window. RabbitMQ binds a per-consumer prefetch to the consumers made
        after the basic.qos (and quorum queues refuse the channel-wide kind), so the consumer is
        cancelled and made again; what was delivered stays unacked on the channel, ours to finish.
        Nothing once the subscription was stopped: a shutdown's drain must get no new deliveries.

        Shielded from the caller's cancellation: aiormq closes a channel whose request was cancelled
        mid-way, and with it the acks of every delivery still unacked on it (a stop that cancels
        the queue-depth monitor during a change would leave its drain unable to ack anything)."""
        await asyncio.shield(self._set_prefetch(prefetch, timeout_s))

    async def _set_prefetch(self, prefetch: int, timeout_s: float) -> None:
        async with self._changing:
            if self.stopped:
                return
            await self.channel.set_qos(prefetch_count=prefetch, timeout=timeout_s)  # kept for a reopen too
            if self.tag is not None and not self.channel.is_closed:
                if await asyncio.wait_for(self._consuming_on_current(), timeout_s):
                    await self._tag_channel.basic_cancel(self.tag, timeout=timeout_s)
                # else: the tag was a closed channel's; the reopen's consume is this one
                self.tag = None
                if not self.stopped:
                    await self._consume()

    async def cancel(self, timeout_s: float) -> None:
        """Stop deliveries (what was delivered stays ours to finish); after this no reopen consumes."""
        self.stopped = True
        self.channel.reopen_callbacks.discard(self._reopened)
        # After a prefetch change in progress; one stuck on a broker that went away does not hold
        # the stop past ``timeout_s`` (it sees ``stopped`` before it would consume again).
        try:
            async with asyncio.timeout(timeout_s):
                await self._changing.acquire()
        except TimeoutError:
            log.warning("consumer_cancel_not_waited", queue=self.queue_name, after_s=timeout_s)
            return
        try:
            if self.tag is not None and not self.channel.is_closed:
                if await asyncio.wait_for(self._consuming_on_current(), timeout_s):
                    await self._tag_channel.basic_cancel(self.tag, timeout=timeout_s)
        finally:
            self._changing.release()


async def subscribe(
    connection: AbstractRobustConnection,
    queue_name: str,
    prefetch: int,
    callback: Callable[[Delivery], Awaitable[None]],
) -> Subscription:
    channel = connection.channel()
    await channel.initialize()
    await channel.set_qos(prefetch_count=prefetch)
    await channel.get_queue(queue_name, ensure=True)  # restored (passively) after a reconnect
    subscription = Subscription(channel, queue_name, callback)
    await subscription.start()
    return subscription
