"""Statuses (rule 5): payment, order and invoice, recomputed after every change.

The money statuses are a function of the ledger (charge booked, live refunds net of reversals)
and of the largest amount_captured shown — all of which end the same in any delivery order — so
they need no event-time guard of their own: the guarded object statuses (refund and dispute
status, by event created then lifecycle rank) feed them.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from handlers.event import AppliedEvent
from handlers.matching import Payment

_INVOICE_STATUS = {"paid": "paid", "partially_refunded": "partially_refunded", "refunded": "refunded"}

# One round trip writes the worker's payment fields, the order's or invoice's status and disputed
# flag (a rejected order keeps its status), and the status_changed audit rows.
_PERSIST = """
with payment as (
    update recon.payments
    set status = $2, amount_captured = $3, amount_refunded = $4, charge_booked = $5, disputed = $6,
        stripe_charge_id = coalesce(stripe_charge_id, $7), snapshot_created = $8,
        snapshot_rank = $9, snapshot_event_id = $10
    where id = $1
    returning id
), order_row as (
    update recon.orders
    set status = case when status = 'rejected' then status else coalesce($11, status) end,
        disputed = $12
    where id = $13
    returning id
), invoice_row as (
    update recon.invoices
    set payment_link_status = coalesce($14, payment_link_status), disputed = $12
    where id = $15
    returning id
), audited as (
    insert into recon.audit_log (action, stripe_event_id, stripe_object_id, payment_id, detail)
    select 'status_changed', $16, $17, $1, d from unnest($18::jsonb[]) as d
)
select count(*) from payment
"""


def money_status(payment: Payment) -> str:
    if not payment.charge_booked:
        return "pending"
    if payment.amount_refunded <= 0:
        return "paid"
    if payment.amount_refunded >= payment.captured_amount:
        return "refunded"
    return "partially_refunded"


def _change(record: str, field: str, before: Any, after: Any) -> str:
    return json.dumps({"object": record, "field": field, "from": before, "to": after})


def _owner_changes(before: Payment, after: Payment) -> tuple[str | None, str | None, list[str]]:
    """(new order status, new invoice status, audit details) — None where nothing moves."""
    changes: list[str] = []
    order_status = invoice_status = None
    if after.status != "pending":
        if after.order_id is not None and before.order_status not in ("rejected", after.status):
            order_status = after.status
            changes.append(_change("order", "status", before.order_status, after.status))
        invoice_target = _INVOICE_STATUS[after.status]
        if after.invoice_id is not None and before.invoice_status != invoice_target:
            invoice_status = invoice_target
            changes.append(
                _change("invoice", "payment_link_status", before.invoice_status, invoice_target)
            )
    if before.disputed != after.disputed:
        owner = "order" if after.order_id is not None else "invoice"
        changes.append(_change(owner, "disputed", before.disputed, after.disputed))
    return order_status, invoice_status, changes


def _audit_details(before: Payment, after: Payment) -> tuple[str | None, str | None, list[str]]:
    changes: list[str] = []
    if before.status != after.status:
        changes.append(_change("payment", "status", before.status, after.status))
    if before.disputed != after.disputed:
        changes.append(_change("payment", "disputed", before.disputed, after.disputed))
    order_status, invoice_status, owner_changes = _owner_changes(before, after)
    return order_status, invoice_status, changes + owner_changes


async def persist(
    con: asyncpg.Connection, applied: AppliedEvent, before: Payment, after: Payment
) -> None:
    """Recompute ``after``'s status and write whatever differs from ``before`` (the locked row)."""
    after.status = money_status(after)
    if after == before:
        return
    order_status, invoice_status, details = _audit_details(before, after)
    if details:
        applied.changed = True
    await con.execute(
        _PERSIST,
        after.id,
        after.status,
        after.amount_captured,
        after.amount_refunded,
        after.charge_booked,
        after.disputed,
        after.stripe_charge_id,
        after.snapshot_created,
        after.snapshot_rank,
        after.snapshot_event_id,
        order_status,
        after.disputed,
        after.order_id,
        invoice_status,
        after.invoice_id,
        applied.event_id,
        applied.object_id,
        details,
    )
