"""Rows the host application writes (the host tables), and reads of what the worker made of them.

Only the host's own columns are written here: the worker's columns keep their defaults, as in
production.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from handlers import EventToApply, Policy, Result, apply_event


async def add_order(
    con: asyncpg.Connection,
    number: str,
    *,
    currency: str = "usd",
    amount_total: int = 1000,
    status: str = "pending",
) -> int:
    order_id: int = await con.fetchval(
        "insert into recon.orders (number, currency, amount_total, buyer_email, status) "
        "values ($1, $2, $3, 'buyer@example.com', $4) returning id",
        number,
        currency,
        amount_total,
        status,
    )
    return order_id


async def add_invoice(
    con: asyncpg.Connection, number: str, *, currency: str = "usd", amount_total: int = 1000
) -> int:
    invoice_id: int = await con.fetchval(
        "insert into recon.invoices (number, currency, amount_total, bill_to) "
        "values ($1, $2, $3, 'Example GmbH') returning id",
        number,
        currency,
        amount_total,
    )
    return invoice_id


async def add_payment(
    con: asyncpg.Connection,
    *,
    order_id: int | None = None,
    invoice_id: int | None = None,
    charge_id: str | None = None,
    payment_intent: str | None = None,
    amount: int = 1000,
    currency: str = "usd",
    method: str = "stripe_card",
) -> int:
    payment_id: int = await con.fetchval(
        "insert into recon.payments (stripe_charge_id, stripe_payment_intent_id, order_id, "
        "invoice_id, method, currency, amount) values ($1, $2, $3, $4, $5, $6, $7) returning id",
        charge_id,
        payment_intent,
        order_id,
        invoice_id,
        method,
        currency,
        amount,
    )
    return payment_id


async def add_order_with_payment(
    con: asyncpg.Connection,
    number: str,
    charge_id: str,
    *,
    amount: int = 1000,
    currency: str = "usd",
) -> int:
    """An order and the payment the host recorded for it by charge id; returns the payment id."""
    order_id = await add_order(con, number, currency=currency, amount_total=amount)
    return await add_payment(con, order_id=order_id, charge_id=charge_id, amount=amount, currency=currency)


async def apply(con: asyncpg.Connection, delivery: EventToApply, retry_s: int = 3600) -> Result:
    """apply_event inside its own transaction, as the runtime does."""
    async with con.transaction():
        return await apply_event(con, delivery, Policy(unmatched_retry_s=retry_s))


async def ledger(con: asyncpg.Connection, charge_id: str) -> list[tuple[str, int, str, str]]:
    """(kind, amount, currency, stripe_object_id) of the charge's ledger rows, in a stable order."""
    rows = await con.fetch(
        "select kind, amount, currency, stripe_object_id from finance.ledger "
        "where stripe_charge_id = $1 order by kind, stripe_object_id, amount",
        charge_id,
    )
    return [(r["kind"], r["amount"], r["currency"], r["stripe_object_id"]) for r in rows]


async def balance(con: asyncpg.Connection, charge_id: str) -> dict[str, Any]:
    row = await con.fetchrow("select * from finance.payment_balances where stripe_charge_id = $1", charge_id)
    assert row is not None, f"no payment for {charge_id}"
    return dict(row)


async def exceptions(con: asyncpg.Connection, kind: str | None = None) -> list[dict[str, Any]]:
    """Rows of finance.exceptions (of one kind), ``detail`` decoded from JSON."""
    rows = await con.fetch(
        "select * from finance.exceptions where $1::text is null or kind = $1 order by id", kind
    )
    return [{**dict(r), "detail": json.loads(r["detail"])} for r in rows]


async def audit_actions(con: asyncpg.Connection, event_id: str | None = None) -> list[str]:
    rows = await con.fetch(
        "select action from recon.audit_log where $1::text is null or stripe_event_id = $1 order by id",
        event_id,
    )
    return [r["action"] for r in rows]


async def inbox(con: asyncpg.Connection, event_id: str) -> dict[str, Any]:
    row = await con.fetchrow("select * from finance.events where stripe_event_id = $1", event_id)
    assert row is not None, f"{event_id} not in the inbox"
    return dict(row)
