"""The work queue's subscription against the real broker: a prefetch change cut short by a stop
leaves the channel, and so the acks of what was delivered, intact."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from tests.harness import wait_until
from worker.amqp import topology
from worker.amqp.connection import connect, declare_topology
from worker.amqp.delivery import Delivery
from worker.amqp.publisher import event_message, open_publisher
from worker.amqp.subscription import subscribe
from worker.settings import Settings


async def test_a_prefetch_change_cancelled_midway_keeps_the_channel_and_its_acks(settings: Settings) -> None:
    """A stop cancels the queue-depth monitor while it changes the prefetch window: the change
    still ends (aiormq would close a channel whose request was cancelled), the stop's cancel
    waits for it, and every delivery made before is acked on the same open channel."""
    connection = await connect(settings.amqp_url)
    async with connection:
        await declare_topology(connection, settings)
        publisher = await open_publisher(connection)
        for n in range(3):
            await publisher.publish_event(event_message(b"{}", f"evt_{n}", "refund.created", 1))
        delivered: list[Delivery] = []

        async def on_delivery(delivery: Delivery) -> None:
            delivered.append(delivery)

        async def all_delivered() -> bool:
            return len(delivered) == 3

        subscription = await subscribe(connection, topology.WORK_QUEUE, 10, on_delivery)
        await wait_until(all_delivered, what="three deliveries")
        underlay = await subscription.channel.get_underlay_channel()
        awaiting_answer = asyncio.Event()
        answer = underlay.rpc_frames.get

        async def spied() -> Any:
            awaiting_answer.set()
            return await answer()

        underlay.rpc_frames.get = spied  # type: ignore[method-assign]
        change = asyncio.create_task(subscription.set_prefetch(20, 2.0))
        await awaiting_answer.wait()  # basic.qos is sent; the change waits for the broker's answer
        change.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await change
        await subscription.cancel(2.0)
        assert [await d.ack() for d in delivered] == [True, True, True]
        await asyncio.sleep(0.2)  # the acks reach the queue before the connection closes
    # Had the channel been closed under them, the acks would be void and the three back in the queue.
    assert len(delivered) == 3
    async with await connect(settings.amqp_url) as check:
        queue = await (await check.channel()).declare_queue(topology.WORK_QUEUE, passive=True)
        assert queue.declaration_result.message_count == 0


async def test_a_prefetch_change_meeting_a_reopen_leaves_one_consumer_and_the_stop_ends_it(
    settings: Settings,
) -> None:
    """The broker closes the consuming channel (here: an ack of a tag it never gave) and a prefetch
    change runs while aio-pika reopens it: the queue then has one consumer of ours, not two (a
    doubled window, and a stop that would cancel only one), and after the stop nothing published
    is delivered."""
    connection = await connect(settings.amqp_url)
    async with connection:
        await declare_topology(connection, settings)
        delivered: list[Delivery] = []

        async def on_delivery(delivery: Delivery) -> None:
            delivered.append(delivery)

        subscription = await subscribe(connection, topology.WORK_QUEUE, 10, on_delivery)
        side = await connection.channel()

        async def one_consumer() -> bool:
            queue = await side.declare_queue(topology.WORK_QUEUE, passive=True)
            return queue.declaration_result.consumer_count == 1

        underlay = await subscription.channel.get_underlay_channel()
        await underlay.basic_ack(999_999)  # unknown delivery tag: the broker closes the channel

        async def closed() -> bool:
            return underlay.is_closed

        await wait_until(closed, interval_s=0.005, what="the broker closing the channel")
        await subscription.set_prefetch(20, 5.0)  # waits for aio-pika's reopen, races its callback
        await asyncio.sleep(1.0)  # the reopen's callbacks have run
        assert await one_consumer()
        await subscription.cancel(5.0)
        publisher = await open_publisher(connection)
        for n in range(3):
            await publisher.publish_event(event_message(b"{}", f"evt_after_{n}", "refund.created", 1))
        await asyncio.sleep(0.5)
        assert delivered == []
