"""Statuses (rule 5): a payment's, recomputed after every change; the batch writes it, with the
event's inbox outcome, in its last statement (handlers/batch.py), and then recomputes the
statuses of the orders and invoices it touched from all their payments (``recon.refresh_owners``,
schema/0004): an event about one payment never moves its owner by that payment alone.

A payment's status is a function of the ledger (charge rows, live refunds net of reversals), of
the largest amount_captured shown (0 once the authorisation ended with nothing taken) and of
whether a dispute on it was lost — all of which end the same in any delivery order — so it needs
no event-time guard of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from handlers.matching import Payment


@dataclass(frozen=True, slots=True)
class StatusWrite:
    """What persisting a payment after an event writes; ``changed`` False writes only the inbox.

    ``audit_details`` are the moves an auditor sees (status, disputed); an event
    that moved none (and booked nothing) is stale even when it wrote a field such as its snapshot.
    """

    changed: bool
    audit_details: tuple[str, ...] = ()


NO_WRITE = StatusWrite(changed=False)


def money_status(payment: Payment) -> str:
    """charged_back after a lost dispute; voided when the authorisation ended with nothing taken;
    pending until money moved; then paid, partially_refunded or refunded by net refunds."""
    if payment.dispute_lost:
        return "charged_back"
    if payment.amount_captured == 0:
        return "voided"
    if not payment.charge_booked:
        return "pending"
    if payment.amount_refunded <= 0:
        return "paid"
    if payment.amount_refunded >= payment.captured_amount:
        return "refunded"
    return "partially_refunded"


def _change(field: str, before: Any, after: Any) -> str:
    return orjson.dumps({"object": "payment", "field": field, "from": before, "to": after}).decode()


def plan(before: Payment, after: Payment) -> StatusWrite:
    """Recompute ``after``'s status and say what differs from ``before`` (the locked row)."""
    after.status = money_status(after)
    if after == before:
        return NO_WRITE
    details = [
        _change(field, getattr(before, field), getattr(after, field))
        for field in ("status", "disputed")
        if getattr(before, field) != getattr(after, field)
    ]
    return StatusWrite(True, tuple(details))
