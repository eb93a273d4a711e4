"""Statuses (rule 5): payment, order and invoice, recomputed after every change; the batch writes
them, with the event's inbox outcome, in its last statement (handlers/batch.py).

The money statuses are a function of the ledger (charge booked, live refunds net of reversals)
and of the largest amount_captured shown — all of which end the same in any delivery order — so
they need no event-time guard of their own: the guarded object statuses (refund and dispute
status, by event created then lifecycle rank) feed them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from handlers.matching import Payment

_INVOICE_STATUS = {"paid": "paid", "partially_refunded": "partially_refunded", "refunded": "refunded"}


@dataclass(frozen=True, slots=True)
class StatusWrite:
    """What persisting a payment after an event writes; ``changed`` False writes only the inbox.

    ``audit_details`` are the status moves an auditor sees; an event that moved none (and booked
    nothing) is stale even when it wrote a payment field such as its snapshot.
    """

    changed: bool
    order_status: str | None = None
    invoice_status: str | None = None
    audit_details: tuple[str, ...] = ()


NO_WRITE = StatusWrite(changed=False)


def money_status(payment: Payment) -> str:
    if not payment.charge_booked:
        return "pending"
    if payment.amount_refunded <= 0:
        return "paid"
    if payment.amount_refunded >= payment.captured_amount:
        return "refunded"
    return "partially_refunded"


def _change(record: str, field: str, before: Any, after: Any) -> str:
    return orjson.dumps({"object": record, "field": field, "from": before, "to": after}).decode()


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
            changes.append(_change("invoice", "payment_link_status", before.invoice_status, invoice_target))
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


def plan(before: Payment, after: Payment) -> StatusWrite:
    """Recompute ``after``'s status and say what differs from ``before`` (the locked row)."""
    after.status = money_status(after)
    if after == before:
        return NO_WRITE
    order_status, invoice_status, details = _audit_details(before, after)
    return StatusWrite(True, order_status, invoice_status, tuple(details))
