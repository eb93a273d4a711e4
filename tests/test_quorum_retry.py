"""The wait queues are quorum queues, and an older broker's classic wait queues are retired safely.

Against the real broker, in a vhost of each test's own: what a replicated broker keeps (a deferred
event waits in a replicated queue and comes back to recon.events), and the upgrade from a release
whose wait queues were classic ``recon.retry.<delay>`` queues (no PRECONDITION_FAILED, nothing
lost, the old queues gone once empty).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import aio_pika
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from worker.amqp import topology
from worker.amqp.connection import connect, declare_topology, open_confirm_channel
from worker.amqp.publisher import Publisher, event_message
from worker.settings import Settings

ARRIVAL_TIMEOUT_S = 30.0


@pytest_asyncio.fixture
async def connection(amqp_url: str) -> AsyncIterator[AbstractRobustConnection]:
    """A robust connection to this test's own vhost, closed after the test."""
    connection = await connect(amqp_url)
    async with connection:
        yield connection


async def _exists(connection: AbstractRobustConnection, queue_name: str) -> bool:
    """A passive declare on a channel of its own (a missing queue closes the channel)."""
    channel = await connection.channel()
    try:
        await channel.declare_queue(queue_name, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return False
    await channel.close()
    return True


async def _next_from_work_queue(connection: AbstractRobustConnection) -> AbstractIncomingMessage:
    """The first message recon.events delivers, waited for on an event, not by polling."""
    channel = await connection.channel()
    queue = await channel.declare_queue(topology.WORK_QUEUE, passive=True)
    arrived: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()

    async def on_message(message: AbstractIncomingMessage) -> None:
        await message.ack()
        if not arrived.done():
            arrived.set_result(message)

    tag = await queue.consume(on_message)
    try:
        return await asyncio.wait_for(arrived, ARRIVAL_TIMEOUT_S)
    finally:
        await queue.cancel(tag)
        await channel.close()


async def _declare_classic_wait_queues(connection: AbstractRobustConnection, settings: Settings) -> None:
    """The wait queues exactly as the release before the quorum ones declared them."""
    channel = await connection.channel()
    for delay in settings.retry_delays_s:
        await channel.declare_queue(
            topology.classic_retry_queue_name(delay),
            durable=True,
            arguments={
                "x-message-ttl": round(delay * 1000),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": topology.WORK_QUEUE,
            },
        )
    await channel.close()


async def test_every_wait_queue_is_a_quorum_queue_with_the_delay_as_ttl(
    connection: AbstractRobustConnection, settings: Settings
) -> None:
    """Each wait queue is declared quorum with TTL, dead-lettering at-least-once back to recon.events:
    the broker refuses the same declaration as a classic queue or with another TTL."""
    await declare_topology(connection, settings)
    for spec in topology.retry_queues(settings.retry_delays_s):
        assert spec.arguments["x-queue-type"] == "quorum"
        assert spec.arguments["x-dead-letter-routing-key"] == topology.WORK_QUEUE
        for drift in ({"x-queue-type": "classic"}, {"x-message-ttl": spec.arguments["x-message-ttl"] + 1}):
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
                await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments | drift)


async def test_a_deferred_event_waits_its_delay_and_returns_to_the_work_queue(
    connection: AbstractRobustConnection, settings: Settings
) -> None:
    """A copy published to the first wait queue comes back to recon.events after the TTL, with its
    id, type, body and retry headers intact."""
    await declare_topology(connection, settings)
    publisher = Publisher(await open_confirm_channel(connection))
    copy = event_message(b'{"id":"evt_wait"}', "evt_wait", "refund.created", 7, {topology.HEADER_ATTEMPT: 2})
    await publisher.publish_to_queue(copy, topology.retry_queue_name(settings.retry_delays_s[0]))
    back = await _next_from_work_queue(connection)
    assert (back.message_id, back.type, back.body) == ("evt_wait", "refund.created", b'{"id":"evt_wait"}')
    assert back.headers[topology.HEADER_ATTEMPT] == 2
    assert back.headers[topology.HEADER_CREATED] == 7


async def test_upgrade_from_classic_wait_queues_loses_nothing_and_retires_them_once_empty(
    connection: AbstractRobustConnection, settings: Settings
) -> None:
    """On a vhost the classic-wait-queue release declared, the new declaration succeeds; the empty
    classic queues go at once, one still holding a deferred event stays until that event is back
    in recon.events, and the next declaration removes it."""
    settings = dataclasses.replace(settings, retry_delays_s=(0.2, 4.0))
    old_channel = await connection.channel()
    old_work = topology.work_queue(settings.max_attempts)
    await old_channel.declare_queue(old_work.name, durable=True, arguments=old_work.arguments)
    await _declare_classic_wait_queues(connection, settings)
    holding = topology.classic_retry_queue_name(4.0)
    deferred = aio_pika.Message(
        b"{}", message_id="evt_deferred", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
    )
    await old_channel.default_exchange.publish(deferred, routing_key=holding)

    await declare_topology(connection, settings)
    assert not await _exists(connection, topology.classic_retry_queue_name(0.2))
    assert await _exists(connection, holding)
    assert all([await _exists(connection, q.name) for q in topology.retry_queues(settings.retry_delays_s)])

    back = await _next_from_work_queue(connection)
    assert back.message_id == "evt_deferred"
    await declare_topology(connection, settings)
    assert not await _exists(connection, holding)


async def test_retiring_is_harmless_when_there_is_nothing_to_retire(
    connection: AbstractRobustConnection, settings: Settings
) -> None:
    """A fresh vhost (no classic wait queues ever) declares cleanly, twice, and creates none."""
    await declare_topology(connection, settings)
    await declare_topology(connection, settings)
    for delay in settings.retry_delays_s:
        assert not await _exists(connection, topology.classic_retry_queue_name(delay))
