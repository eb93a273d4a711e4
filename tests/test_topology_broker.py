"""What the receiver's 200 relies on in worker.broker and worker.topology, against the real broker."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from tests.harness import wait_until
from worker.amqp import topology
from worker.amqp.connection import connect, declare_topology, open_confirm_channel
from worker.amqp.publisher import Publisher, PublishFailed, event_message, open_publisher
from worker.events import HANDLED_TYPES
from worker.settings import Settings


@pytest_asyncio.fixture
async def connection(settings: Settings) -> AsyncIterator[AbstractRobustConnection]:
    """A connection to this test's vhost with the topology declared."""
    connection = await connect(settings.amqp_url)
    await declare_topology(connection, settings)
    async with connection:
        yield connection


async def _work_queue_ids(connection: AbstractRobustConnection) -> list[str | None]:
    channel = await connection.channel()
    queue = await channel.declare_queue(topology.WORK_QUEUE, passive=True)
    ids = []
    while (message := await queue.get(fail=False)) is not None:
        await message.ack()
        ids.append(message.message_id)
    await channel.close()
    return ids


async def test_every_handled_type_routes_to_the_durable_quorum_work_queue(
    connection: AbstractRobustConnection, settings: Settings
) -> None:
    """A confirmed publish of each handled type is in recon.events, a durable quorum queue."""
    publisher = Publisher(await open_confirm_channel(connection))
    for n, event_type in enumerate(sorted(HANDLED_TYPES)):
        await publisher.publish_event(event_message(b"{}", f"evt_route{n}", event_type, 1))
    assert await _work_queue_ids(connection) == [f"evt_route{n}" for n in range(len(HANDLED_TYPES))]
    # The broker itself says what the queue is: the same declaration as a classic queue is refused.
    classic = topology.work_queue(settings.max_attempts).arguments | {"x-queue-type": "classic"}
    channel = await connection.channel()
    with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed, match="x-queue-type"):
        await channel.declare_queue(topology.WORK_QUEUE, durable=True, arguments=classic)


async def test_unroutable_publish_fails_instead_of_being_confirmed_into_nowhere(
    connection: AbstractRobustConnection,
) -> None:
    """mandatory + on_return_raises: an unbound type raises PublishFailed (the receiver's 503)."""
    publisher = Publisher(await open_confirm_channel(connection))
    with pytest.raises(PublishFailed):
        await publisher.publish_event(event_message(b"{}", "evt_nowhere", "plan.created", 1))
    assert await _work_queue_ids(connection) == []


async def test_a_nacked_publish_is_followed_by_a_new_confirm_channel(
    connection: AbstractRobustConnection,
) -> None:
    """The broker nacks a publish (a queue that rejects what it cannot hold): the publisher fails it,
    closes the channel that was nacked and publishes on a new one, in the worker as in the receiver
    (RabbitMQ 3.10 can keep nacking on a channel restored during a failover). A publisher opened
    without a way to reopen keeps its channel."""
    side = await connection.channel()
    full = await side.declare_queue(
        "recon.test.full", auto_delete=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    renewing, plain = await open_publisher(connection), Publisher(await open_confirm_channel(connection))
    for publisher in (renewing, plain):
        before = publisher.channel
        with pytest.raises(PublishFailed):
            await publisher.publish_to_queue(event_message(b"{}", "evt_full", "refund.created", 1), full.name)
        assert (publisher.channel is before) is (publisher is plain)
        if publisher is renewing:  # closed in the background: its Close-Ok may take a while

            async def closed(channel: AbstractChannel = before) -> bool:
                return channel.is_closed

            await wait_until(closed, timeout_s=5.0, what="the nacked channel closed")
        else:
            assert not before.is_closed
        await publisher.publish_event(event_message(b"{}", f"evt_after_{id(publisher)}", "refund.created", 1))
    assert await _work_queue_ids(connection) == [f"evt_after_{id(renewing)}", f"evt_after_{id(plain)}"]
    await side.close()


async def test_declaring_the_topology_twice_is_harmless(
    connection: AbstractRobustConnection, settings: Settings
) -> None:
    """Receiver and worker both declare at start-up and after reconnects: the second declare is a no-op."""
    await declare_topology(connection, settings)
    publisher = Publisher(await open_confirm_channel(connection))
    await publisher.publish_event(event_message(b"{}", "evt_twice", "refund.created", 1))
    assert await _work_queue_ids(connection) == ["evt_twice"]


async def test_event_message_is_persistent_and_carries_routing_facts() -> None:
    """The queued message is persistent, keyed by event id and type, with created and first-seen headers."""
    message = event_message(b'{"id":"evt_1"}', "evt_1", "charge.refunded", 1_700_000_000)
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert (message.message_id, message.type) == ("evt_1", "charge.refunded")
    assert message.headers[topology.HEADER_CREATED] == 1_700_000_000
    assert isinstance(message.headers[topology.HEADER_FIRST_SEEN_MS], int)
