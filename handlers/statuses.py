"""Statuses (rule 5): payment, order and invoice, recomputed after every change — and the last
statement of every event (``finish``), which writes them together with the inbox outcome.

The money statuses are a function of the ledger (charge booked, live refunds net of reversals)
and of the largest amount_captured shown — all of which end the same in any delivery order — so
they need no event-time guard of their own: the guarded object statuses (refund and dispute
status, by event created then lifecycle rank) feed them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg

from handlers import Outcome
from handlers.event import AppliedEvent
from handlers.matching import Payment

_INVOICE_STATUS = {"paid": "paid", "partially_refunded": "partially_refunded", "refunded": "refunded"}

# The last statement of every event, in one round trip: the worker's payment fields (when $19 says
# they changed), the order's or invoice's status and disputed flag (a rejected order keeps its
# status; the row is written only when one of them moves, so an order shared by payments in
# different worker lanes is locked as rarely as possible), the status_changed audit rows, and the
# event's inbox outcome — processed_at set when it is final, null while retrying. A final outcome
# also resolves the event's open dead_lettered exception: the event was replayed and has now applied.
_FINISH = """
with payment as (
    update recon.payments
    set status = $2, amount_captured = $3, amount_refunded = $4, charge_booked = $5, disputed = $6,
        stripe_charge_id = coalesce(stripe_charge_id, $7), snapshot_created = $8,
        snapshot_rank = $9, snapshot_event_id = $10
    where id = $1 and $19::boolean
    returning id
), order_row as (
    update recon.orders
    set status = case when status = 'rejected' then status else coalesce($11, status) end,
        disputed = $12
    where id = $13 and $19::boolean
      and (coalesce($11, status) is distinct from status or disputed is distinct from $12)
    returning id
), invoice_row as (
    update recon.invoices
    set payment_link_status = coalesce($14, payment_link_status), disputed = $12
    where id = $15 and $19::boolean
      and (coalesce($14, payment_link_status) is distinct from payment_link_status
           or disputed is distinct from $12)
    returning id
), audited as (
    insert into recon.audit_log (action, stripe_event_id, stripe_object_id, payment_id, detail)
    select 'status_changed', $16, $17, $1, d from unnest($18::jsonb[]) as d
    returning id
), settled as (
    update recon.event_inbox
    set outcome = $20, processed_at = case when $20 = 'retrying' then null else now() end
    where event_id = $16
    returning event_id
), resolved as (
    update recon.exceptions set resolved_at = now()
    where $20 <> 'retrying' and kind = 'dead_lettered' and stripe_event_id = $16
      and resolved_at is null
    returning id
)
select count(*) from settled
"""


@dataclass(frozen=True, slots=True)
class StatusWrite:
    """What persisting a payment after an event writes; ``changed`` False writes only the inbox."""

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


def plan(applied: AppliedEvent, before: Payment, after: Payment) -> StatusWrite:
    """Recompute ``after``'s status and say what differs from ``before`` (the locked row)."""
    after.status = money_status(after)
    if after == before:
        return StatusWrite(changed=False)
    order_status, invoice_status, details = _audit_details(before, after)
    if details:
        applied.changed = True
    return StatusWrite(True, order_status, invoice_status, tuple(details))


def _payment_params(p: Payment | None) -> tuple[Any, ...]:
    """$1-$10 of _FINISH: the payment's worker fields (all null when no payment matched)."""
    if p is None:
        return (None,) * 10
    return (
        p.id, p.status, p.amount_captured, p.amount_refunded, p.charge_booked, p.disputed,
        p.stripe_charge_id, p.snapshot_created, p.snapshot_rank, p.snapshot_event_id,
    )


async def finish(
    con: asyncpg.Connection,
    applied: AppliedEvent,
    outcome: Outcome,
    payment: Payment | None = None,
    write: StatusWrite = NO_WRITE,
) -> None:
    """Write the payment's changes (if any) and the event's inbox outcome."""
    await con.execute(
        _FINISH,
        *_payment_params(payment),
        write.order_status,
        payment.disputed if payment is not None else None,
        payment.order_id if payment is not None else None,
        write.invoice_status,
        payment.invoice_id if payment is not None else None,
        applied.event_id,
        applied.object_id,
        list(write.audit_details),
        write.changed and payment is not None,
        outcome,
    )
