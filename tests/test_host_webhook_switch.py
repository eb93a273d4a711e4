"""Host webhooks are queued only by sessions that may deliver them (schema 0007): the worker's and
the back office's connections say ``recon.host_webhooks = off`` when no host URL is set, and a
session that says nothing still queues, so no webhook is lost to a connection that was not told."""

from __future__ import annotations

import dataclasses

import asyncpg

from tests import builders as b
from tests import host_records as host
from tests.backoffice_setup import QUEUE_HOST_WEBHOOKS, paid_order
from worker.backoffice.api import open_backoffice_pool
from worker.consume.database import open_pool
from worker.settings import Settings


async def _refund_on(con: asyncpg.Connection, number: str) -> None:
    """A partial refund of a new order, applied on ``con``: the order moves to partially_refunded."""
    (charge_id,) = await paid_order(con, None, number, [3000])
    await host.apply(
        con, b.incoming(b.refund_event("refund.created", b.refund(charge_id=charge_id, amount=300)))
    )


async def _queued(con: asyncpg.Connection) -> list[tuple[str, str]]:
    """(order number, new status) of the queued order.status_changed webhooks, oldest first."""
    rows = await con.fetch(
        "select payload->'data'->>'order_number' as number, payload->'data'->>'status' as status "
        "from recon.outbox where channel = 'host_webhook' and topic = 'order.status_changed' order by id"
    )
    return [(r["number"], r["status"]) for r in rows]


async def test_only_sessions_of_a_process_with_a_host_url_queue_host_webhooks(
    con: asyncpg.Connection, settings: Settings
) -> None:
    """No host URL: neither the lanes' pool nor the back office's queues a row. With one, the lanes'
    pool does. A plain session (psql, migrations, the host's code) queues as before."""
    assert settings.host_webhook_url is None
    with_url = dataclasses.replace(settings, **QUEUE_HOST_WEBHOOKS)
    for number, pool_settings, opener in [
        ("ORD-LANES-OFF", settings, "lanes"),
        ("ORD-BACKOFFICE-OFF", settings, "backoffice"),
        ("ORD-LANES-ON", with_url, "lanes"),
    ]:
        if opener == "lanes":
            pool = await open_pool(pool_settings, max_size=1)
        else:
            pool = await open_backoffice_pool(pool_settings, max_size=1)
        try:
            async with pool.acquire() as pooled:
                await _refund_on(pooled, number)
        finally:
            await pool.close()
    await _refund_on(con, "ORD-PLAIN")

    assert await _queued(con) == [
        ("ORD-LANES-ON", "paid"),
        ("ORD-LANES-ON", "partially_refunded"),
        ("ORD-PLAIN", "paid"),
        ("ORD-PLAIN", "partially_refunded"),
    ]
    statuses = await con.fetch("select number, status from recon.orders order by number")
    assert {r["status"] for r in statuses} == {"partially_refunded"}
