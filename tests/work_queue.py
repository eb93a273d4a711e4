"""Read what operator commands queued: every message waiting in the test vhost's work queue; and a
work queue the broker refuses to add to, for the commands' refusals."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from tests import servers
from tests.harness import wait_until
from worker.amqp import topology
from worker.amqp.publisher import PublishFailed, persistent_message, publisher_session
from worker.settings import Settings


async def drain_work_queue(amqp_url: str) -> list[AbstractIncomingMessage]:
    """Take (and ack) every message now in the work queue, oldest first.

    Publishes were confirmed before the command returned, so what is queued is all there is.
    """
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.WORK_QUEUE, passive=True)
        taken: list[AbstractIncomingMessage] = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
        return taken
    finally:
        await connection.close()


@asynccontextmanager
async def work_queue_capped(amqp_url: str) -> AsyncIterator[None]:
    """The vhost's work queue capped at one message by a policy of that vhost: its reject-publish
    overflow makes the broker nack every publish beyond that. The policy is cleared at the end."""
    vhost = servers.vhost_of(amqp_url)
    await asyncio.to_thread(
        servers.rabbitmqctl,
        "set_policy",
        "-p",
        vhost,
        "--apply-to",
        "queues",
        "full",
        r"^recon\.events$",
        '{"max-length": 1}',
    )
    try:
        yield
    finally:
        await asyncio.to_thread(servers.rabbitmqctl, "clear_policy", "-p", vhost, "full")


@asynccontextmanager
async def work_queue_full(settings: Settings) -> AsyncIterator[None]:
    """The test vhost's work queue capped at one message and holding one: the broker nacks every
    publish to it until the block ends. Entered once a probe publish was nacked: the policy is in
    force."""
    async with work_queue_capped(settings.amqp_url):
        async with publisher_session(settings) as publisher:

            async def nacked() -> bool:
                try:
                    probe = persistent_message(b"{}", "probe", "probe", {})
                    await publisher.publish_to_queue(probe, topology.WORK_QUEUE)
                except PublishFailed:
                    return True
                return False

            await wait_until(nacked, what="the broker to nack a publish to the full work queue")
        yield
