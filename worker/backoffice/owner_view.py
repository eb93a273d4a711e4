"""What a back-office screen shows of one order or invoice, read from the finance views."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal

import asyncpg

OwnerKind = Literal["order", "invoice"]

_BALANCE = {
    "order": "select * from finance.order_balances where order_number = $1",
    "invoice": "select * from finance.invoice_balances where invoice_number = $1",
}
_PAYMENTS = {
    "order": "select p.stripe_charge_id, p.stripe_payment_intent_id, p.method, p.currency, p.amount, "
    "p.amount_captured, p.amount_refunded, p.status, p.disputed from recon.payments p "
    "join recon.orders o on o.id = p.order_id where o.number = $1 order by p.id",
    "invoice": "select p.stripe_charge_id, p.stripe_payment_intent_id, p.method, p.currency, p.amount, "
    "p.amount_captured, p.amount_refunded, p.status, p.disputed from recon.payments p "
    "join recon.invoices i on i.id = p.invoice_id where i.number = $1 order by p.id",
}
_LEDGER = (
    "select entry_id, occurred_at, booked_at, kind, amount, currency, "
    "amount_decimal::text as amount_decimal, stripe_charge_id, stripe_object_id, stripe_event_id "
    "from finance.ledger where {column} = $1 order by occurred_at, entry_id"
)
_REFUNDS = (
    "select stripe_refund_id, stripe_charge_id, amount, currency, reason, note, status as state, "
    "failure_reason, source, refund_request_id, requested_by, created_at from finance.refunds "
    "where {column} = $1 order by created_at, stripe_refund_id"
)
_REQUESTS = (
    "select id, requested_at, requested_by, amount, currency, reason, note, state, error "
    "from finance.refund_requests where {column} = $1 order by id"
)
_DISPUTES = (
    "select stripe_dispute_id, stripe_charge_id, amount, currency, reason, status, evidence_due_by, "
    "opened_at, closed_at from finance.disputes where {column} = $1 order by opened_at"
)
_TIMELINE = (
    "select stripe_event_id, type, created, received_at, processed_at, outcome, attempts, stripe_object_id, "
    "stripe_charge_id from finance.events where {column} = $1 order by created, stripe_event_id"
)


def _rows(records: list[asyncpg.Record]) -> list[dict[str, Any]]:
    return [dict(r) for r in records]


async def owner_view(con: asyncpg.Connection, kind: OwnerKind, number: str) -> dict[str, Any] | None:
    """The owner's status, amounts, payments with their ledger rows, refunds, requests, disputes and
    Stripe event timeline; None for an unknown number."""
    balance = await con.fetchrow(_BALANCE[kind], number)
    if balance is None:
        return None
    column = f"{kind}_number"  # one of two fixed names, never input
    ledger = await con.fetch(_LEDGER.format(column=column), number)
    by_charge: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for row in ledger:
        by_charge[row["stripe_charge_id"]].append(dict(row))
    payments = [
        {**dict(p), "ledger": by_charge.get(p["stripe_charge_id"], [])}
        for p in await con.fetch(_PAYMENTS[kind], number)
    ]
    return {
        "number": number,
        "currency": balance["currency"],
        "amount_total": balance["amount_total"],
        "status": balance["status"],
        "disputed": balance["disputed"],
        "amounts": {
            "captured": balance["captured"],
            "refunded": balance["refunded"],
            "refundable_now": balance["refundable_now"],
            "balance_due": balance["balance_due"],
            "net_amount": balance["net_amount"],
        },
        "payments": payments,
        "refunds": _rows(await con.fetch(_REFUNDS.format(column=column), number)),
        "refund_requests": _rows(await con.fetch(_REQUESTS.format(column=column), number)),
        "disputes": _rows(await con.fetch(_DISPUTES.format(column=column), number)),
        "timeline": _rows(await con.fetch(_TIMELINE.format(column=column), number)),
    }
