"""The AMQP connection: robust, bounded in time, with our topology declared on it."""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from worker.amqp import topology
from worker.settings import Settings

CONNECT_TIMEOUT_S = 10.0


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
