"""Read what operator commands queued: every message waiting in the test vhost's work queue."""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from worker.amqp import topology


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
