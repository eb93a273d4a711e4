"""A confirmed publisher for the one-shot operator commands (dead-letters replay, backfill).

They publish exactly as the receiver does: the same topology declared first (so a command run
before any receiver still has a queue to route to, and argument drift fails loudly), one
confirm channel, and ``broker.Publisher`` for every message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from worker import broker
from worker.settings import Settings


@asynccontextmanager
async def publisher_session(settings: Settings) -> AsyncIterator[broker.Publisher]:
    connection = await broker.connect(settings.amqp_url)
    try:
        await broker.declare_topology(connection, settings)
        channel = await broker.open_confirm_channel(connection)
        yield broker.Publisher(channel)
    finally:
        await connection.close()
