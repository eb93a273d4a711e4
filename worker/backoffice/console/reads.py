"""What the console's pages read: the finance views (schema 0004..0006), the dead letters, and the
queue depths RabbitMQ tells a passive declare. SQL with parameters only; no write here."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import aio_pika
import asyncpg
from aio_pika.exceptions import AMQPError

from worker.amqp import topology
from worker.settings import Settings

QUEUE_DEPTH_TIMEOUT_S = 3.0
LIST_LIMIT = 500

_EVENTS_LAST_HOUR = """
select outcome, count(*) as events from finance.events
where received_at > now() - interval '1 hour' group by outcome order by outcome
"""
_OPEN_BY_KIND = """
select kind, count(*) as open from finance.exceptions where resolved_at is null group by kind order by kind
"""
_OLDEST_RETRYING = """
select stripe_event_id, type, received_at, attempts, order_number, invoice_number from finance.events
where outcome = 'retrying' order by received_at, stripe_event_id limit 1
"""
_OUTBOX_BACKLOG = """
select channel, count(*) as pending, min(created_at) as oldest from recon.outbox
where state = 'pending' group by channel order by channel
"""
_PAYOUTS_WITH_DIFFERENCES = """
select stripe_payout_id, arrival_date, amount, currency, difference_lines, difference_amount
from finance.payouts where reconciliation = 'differences' order by arrival_date desc nulls last limit 20
"""
_PAYOUTS = """
select stripe_payout_id, arrival_date, amount, currency, status, reconciliation, lines, matched_lines,
       difference_lines, difference_amount
from finance.payouts order by arrival_date desc nulls last, stripe_payout_id limit $1
"""
_PAYOUT = """
select stripe_payout_id, arrival_date, amount, currency, status, reconciliation, lines, matched_lines,
       difference_lines, difference_amount
from finance.payouts where stripe_payout_id = $1
"""
_PAYOUT_LINES = """
select balance_transaction_id, type, reporting_category, source_id, amount, fee, net, currency,
       exchange_rate, match, entry_id
from finance.payout_lines where stripe_payout_id = $1 order by match, balance_transaction_id
"""
_DEAD_LETTERS = """
select event_id, event_type, attempts, last_error, first_seen_at, last_seen_at from recon.dead_letters
where replayed_at is null order by first_seen_at, event_id limit $1
"""
_EXPONENTS = "select c, finance.currency_exponent(c) as exponent from unnest($1::text[]) as c"

# Search: an id's prefix says where to look; each query answers (kind, number).
_BY_CHARGE = """
select case when o.number is not null then 'order' else 'invoice' end as kind,
       coalesce(o.number, i.number) as number
from recon.payments p left join recon.orders o on o.id = p.order_id
left join recon.invoices i on i.id = p.invoice_id
where p.stripe_charge_id = $1 or p.stripe_payment_intent_id = $1
"""
_BY_REFUND = """
select case when order_number is not null then 'order' else 'invoice' end as kind,
       coalesce(order_number, invoice_number) as number from finance.refunds where stripe_refund_id = $1
"""
_BY_DISPUTE = """
select case when order_number is not null then 'order' else 'invoice' end as kind,
       coalesce(order_number, invoice_number) as number from finance.disputes where stripe_dispute_id = $1
"""
_BY_NUMBER = """
select 'order' as kind, number from recon.orders where number = $1
union all select 'invoice', number from recon.invoices where number = $1
"""
_BY_EMAIL = """
(select 'order' as kind, number from recon.orders where lower(buyer_email) = lower($1) order by id desc
 limit 50)
union all
(select 'invoice', number from recon.invoices where lower(bill_to) = lower($1) order by id desc limit 50)
"""


@dataclass(frozen=True, slots=True)
class QueueDepth:
    name: str
    role: str
    messages: int | None  # None: the queue is not there (or the broker did not answer)


async def exponents(con: asyncpg.Connection, currencies: set[str]) -> dict[str, int]:
    """Each currency's exponent, from the database's one list (finance.currency_exponent)."""
    if not currencies:
        return {}
    return {r["c"]: r["exponent"] for r in await con.fetch(_EXPONENTS, sorted(currencies))}


def _records(rows: list[asyncpg.Record]) -> list[dict[str, Any]]:
    return [dict(r) for r in rows]


async def overview(con: asyncpg.Connection) -> dict[str, Any]:
    return {
        "events_last_hour": _records(await con.fetch(_EVENTS_LAST_HOUR)),
        "open_by_kind": _records(await con.fetch(_OPEN_BY_KIND)),
        "oldest_retrying": await con.fetchrow(_OLDEST_RETRYING),
        "outbox": _records(await con.fetch(_OUTBOX_BACKLOG)),
        "payout_differences": _records(await con.fetch(_PAYOUTS_WITH_DIFFERENCES)),
    }


async def payouts(con: asyncpg.Connection) -> list[dict[str, Any]]:
    return _records(await con.fetch(_PAYOUTS, LIST_LIMIT))


async def payout(con: asyncpg.Connection, payout_id: str) -> dict[str, Any] | None:
    row = await con.fetchrow(_PAYOUT, payout_id)
    if row is None:
        return None
    return {**dict(row), "lines_detail": _records(await con.fetch(_PAYOUT_LINES, payout_id))}


async def dead_letters(con: asyncpg.Connection) -> list[dict[str, Any]]:
    return _records(await con.fetch(_DEAD_LETTERS, LIST_LIMIT))


async def search(con: asyncpg.Connection, query: str) -> list[tuple[str, str]]:
    """Orders and invoices a search names: a number, a ch_/pi_/re_/du_/dp_ id, or the buyer's e-mail."""
    text = query.strip()
    if not text:
        return []
    if text.startswith(("ch_", "py_", "pi_")):
        rows = await con.fetch(_BY_CHARGE, text)
    elif text.startswith("re_"):
        rows = await con.fetch(_BY_REFUND, text)
    elif text.startswith(("du_", "dp_")):
        rows = await con.fetch(_BY_DISPUTE, text)
    elif "@" in text:
        rows = await con.fetch(_BY_EMAIL, text)
    else:
        rows = await con.fetch(_BY_NUMBER, text)
    return list(dict.fromkeys((r["kind"], r["number"]) for r in rows if r["number"] is not None))


async def _depth(connection: aio_pika.abc.AbstractConnection, name: str) -> int | None:
    # A passive declare that finds no queue closes its channel: one channel per queue.
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        count = queue.declaration_result.message_count
        return int(count) if count is not None else None
    except AMQPError:
        return None
    finally:
        with contextlib.suppress(AMQPError, RuntimeError):
            await channel.close()


def _queues(settings: Settings) -> list[tuple[str, str]]:
    return [
        (topology.WORK_QUEUE, "work"),
        *((spec.name, "retry") for spec in topology.retry_queues(settings.retry_delays_s)),
        (topology.DEAD_QUEUE, "dead letters"),
        (topology.PARKED_QUEUE, "parked dead letters"),
    ]


async def queue_depths(settings: Settings) -> list[QueueDepth] | None:
    """Messages ready in the work, retry and dead-letter queues; None when RabbitMQ does not answer."""
    try:
        async with asyncio.timeout(QUEUE_DEPTH_TIMEOUT_S):
            connection = await aio_pika.connect(settings.amqp_url)
            try:
                return [
                    QueueDepth(name, role, await _depth(connection, name)) for name, role in _queues(settings)
                ]
            finally:
                await connection.close()
    except (TimeoutError, OSError, AMQPError):
        return None
