"""Outbox rows are queued only by sessions whose process would send them: host webhooks (schema
0007) only with a host URL, e-mails about refunds made outside the app (0008) only with
RECON_NOTIFY_DASHBOARD_REFUNDS. The worker's and the back office's connections say so in their
session settings; a session that says nothing still queues, so nothing is lost to a connection that
was not told."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

import asyncpg

from tests import builders as b
from tests import host_records as host
from tests.backoffice_setup import QUEUE_HOST_WEBHOOKS, booked_app_refund, paid_order
from worker.backoffice.api import open_backoffice_pool
from worker.consume.database import open_pool
from worker.settings import Settings


async def _refund_on(con: asyncpg.Connection, number: str) -> None:
    """A partial refund of a new order, applied on ``con``: the order moves to partially_refunded."""
    (charge_id,) = await paid_order(con, None, number, [3000])
    await host.apply(
        con, b.incoming(b.refund_event("refund.created", b.refund(charge_id=charge_id, amount=300)))
    )


@asynccontextmanager
async def _pooled(opening: Awaitable[asyncpg.Pool]) -> AsyncIterator[asyncpg.Connection]:
    """A connection of a pool as the worker opens it (its session settings), the pool closed after."""
    pool = await opening
    try:
        async with pool.acquire() as con:
            yield con
    finally:
        await pool.close()


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
    for number, opening in [
        ("ORD-LANES-OFF", open_pool(settings, max_size=1)),
        ("ORD-BACKOFFICE-OFF", open_backoffice_pool(settings, max_size=1)),
        ("ORD-LANES-ON", open_pool(with_url, max_size=1)),
    ]:
        async with _pooled(opening) as pooled:
            await _refund_on(pooled, number)
    await _refund_on(con, "ORD-PLAIN")

    assert await _queued(con) == [
        ("ORD-LANES-ON", "paid"),
        ("ORD-LANES-ON", "partially_refunded"),
        ("ORD-PLAIN", "paid"),
        ("ORD-PLAIN", "partially_refunded"),
    ]
    statuses = await con.fetch("select number, status from recon.orders order by number")
    assert {r["status"] for r in statuses} == {"partially_refunded"}


async def _mails(con: asyncpg.Connection) -> list[tuple[str, str]]:
    """(order number, source) of the queued buyer e-mails, oldest first."""
    rows = await con.fetch(
        "select payload->>'order_number' as number, payload->>'source' as source "
        "from recon.outbox where channel = 'email' order by id"
    )
    return [(r["number"], r["source"]) for r in rows]


async def test_only_sessions_that_send_dashboard_refund_mail_queue_it(
    con: asyncpg.Connection, settings: Settings
) -> None:
    """RECON_NOTIFY_DASHBOARD_REFUNDS off: the lanes' pool queues no e-mail about a refund made
    outside the app, but still the one about a refund asked for in the app; on, it queues both. A
    plain session queues as before (its sender then marks the row skipped)."""
    assert not settings.notify_dashboard_refunds
    notify = dataclasses.replace(settings, notify_dashboard_refunds=True)
    for suffix, pool_settings in [("OFF", settings), ("ON", notify)]:
        async with _pooled(open_pool(pool_settings, max_size=1)) as pooled:
            await _refund_on(pooled, f"ORD-DASH-{suffix}")
            await booked_app_refund(pooled, f"ORD-APP-{suffix}", 2000, "usd", "")
    await _refund_on(con, "ORD-DASH-PLAIN")

    assert await _mails(con) == [
        ("ORD-APP-OFF", "app"),
        ("ORD-DASH-ON", "stripe"),
        ("ORD-APP-ON", "app"),
        ("ORD-DASH-PLAIN", "stripe"),
    ]
