"""Disputes (rule 6): the dispute record, its balance transactions, and the disputed flags.

The dispute's status moves only forward by (event created, lifecycle rank); a full tie keeps the
stored status. Each balance transaction the dispute carries is booked once, keyed by its txn id:
the withdrawal or reinstatement in the dispute's currency for the dispute's amount, the fee in the
transaction's (settlement) currency.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from handlers.audit import AuditAction
from handlers.bookings import Entry, booked, plan_booking
from handlers.event import AppliedEvent, Step, Then
from handlers.matching import Payment
from handlers.payloads import currency_of, stripe_id, timestamp
from handlers.pipeline import Pipeline, Ticket

CLOSED_STATUSES = ("won", "lost", "warning_closed", "prevented")
DISPUTE_STATUS_RANK = {
    "warning_needs_response": 1,
    "warning_under_review": 2,
    "needs_response": 3,
    "under_review": 4,
    "warning_closed": 5,
    "won": 5,
    "lost": 5,
    "prevented": 5,
    "appeal_needs_response": 6,
    "appeal_under_review": 7,
}

# Saves the dispute when this snapshot is newer (outcome and closed_at: how and when it closed,
# both cleared by an appeal that reopens it, so a lost dispute won on appeal ends won); audits
# dispute_opened / dispute_closed / status_changed, and says whether another dispute of the
# payment is still open and whether any dispute of it is lost now.
_RECORD_DISPUTE = """
with old as (
    select status, outcome from recon.disputes where id = $1
), saved as (
    insert into recon.disputes as d
        (id, payment_id, amount, currency, reason, status, status_created, status_rank, outcome,
         evidence_due_by, created, closed_at)
    values ($1, $2, $3, $4, $5, $6, $7, $8,
            case when $6 = any($12::text[]) then $6 end, $9, $10,
            case when $6 = any($12::text[]) then $7::timestamptz end)
    on conflict (id) do update
        set amount = excluded.amount, reason = excluded.reason, status = excluded.status,
            status_created = excluded.status_created, status_rank = excluded.status_rank,
            outcome = excluded.outcome,
            evidence_due_by = excluded.evidence_due_by,
            closed_at = case when excluded.status = any($12::text[])
                             then coalesce(case when d.status = any($12::text[]) then d.closed_at end,
                                           excluded.status_created)
                        end
        where (excluded.status_created, excluded.status_rank) > (d.status_created, d.status_rank)
    returning status, outcome
), audited as (
    insert into recon.audit_log (action, stripe_event_id, stripe_object_id, payment_id, detail)
    select a.action, $11, $1, $2,
           jsonb_build_object('from', (select status from old), 'to', s.status)
    from saved s
    cross join lateral (
        select 'dispute_opened' as action where not exists (select 1 from old)
        union all
        select case when s.status = any($12::text[]) then 'dispute_closed' else 'status_changed' end
        where s.status is distinct from (select status from old)
          and (exists (select 1 from old) or s.status = any($12::text[]))
    ) a
)
select (select status from saved) as saved_status, (select status from old) as old_status,
       exists (select 1 from recon.disputes x
               where x.payment_id = $2 and x.id <> $1 and x.status <> all($12::text[])) as others_open,
       coalesce(case when exists (select 1 from saved) then (select outcome from saved)
                     else (select outcome from old) end, '') = 'lost'
       or exists (select 1 from recon.disputes x
                  where x.payment_id = $2 and x.id <> $1 and x.outcome = 'lost') as any_lost
"""


def _plan_record(
    pipeline: Pipeline, applied: AppliedEvent, payment: Payment, dispute: dict[str, Any]
) -> Ticket:
    """Save the dispute snapshot; its row says whether the payment has an open dispute (``_open``)."""
    status = str(dispute["status"])
    evidence = dispute.get("evidence_details")
    due_by = evidence.get("due_by") if isinstance(evidence, dict) else None
    args = (
        dispute["id"],
        payment.id,
        int(dispute["amount"]),
        currency_of(dispute) or payment.currency,
        dispute.get("reason"),
        status,
        applied.created,
        DISPUTE_STATUS_RANK.get(status, 0),
        timestamp(int(due_by)) if due_by is not None else None,
        timestamp(int(dispute["created"])),
        applied.event_id,
        list(CLOSED_STATUSES),
    )
    return pipeline.add(_RECORD_DISPUTE, args)


def _open(row: asyncpg.Record) -> bool:
    """Does the payment have a dispute that is not closed, after this snapshot was saved?"""
    current = row["saved_status"] or row["old_status"]
    return bool(row["others_open"]) or current not in CLOSED_STATUSES


def _movements(dispute: dict[str, Any], txn: dict[str, Any]) -> list[tuple[Entry, AuditAction]]:
    txn_id, occurred_at = str(txn["id"]), timestamp(int(txn["created"]))
    dispute_id, txn_amount, fee = str(dispute["id"]), int(txn["amount"]), int(txn.get("fee") or 0)
    amount, currency = int(dispute["amount"]), str(currency_of(dispute))
    movements: list[tuple[Entry, AuditAction]] = []
    if txn_amount < 0:
        entry = Entry("dispute_withdrawal", txn_id, -amount, currency, occurred_at, dispute_id)
        movements.append((entry, "dispute_funds_withdrawn"))
    elif txn_amount > 0:
        entry = Entry("dispute_reinstatement", txn_id, amount, currency, occurred_at, dispute_id)
        movements.append((entry, "dispute_funds_reinstated"))
    if fee != 0:
        fee_entry = Entry("dispute_fee", txn_id, -fee, str(currency_of(txn)), occurred_at, dispute_id)
        movements.append((fee_entry, "dispute_funds_withdrawn" if fee > 0 else "dispute_funds_reinstated"))
    return movements


def _plan_balance_transactions(
    pipeline: Pipeline, applied: AppliedEvent, payment: Payment, dispute: dict[str, Any]
) -> list[Ticket]:
    tickets = []
    for txn in dispute.get("balance_transactions") or []:
        if not isinstance(txn, dict) or stripe_id(txn.get("id")) is None:
            continue  # an unexpanded id carries no amounts; a later event with the object books it
        for entry, action in _movements(dispute, txn):
            detail = {"balance_transaction": entry.source_id, "dispute_status": dispute.get("status")}
            tickets.append(
                plan_booking(
                    pipeline,
                    entry,
                    payment_id=payment.id,
                    event_id=applied.event_id,
                    action=action,
                    detail=detail,
                )
            )
    return tickets


def on_dispute_event(applied: AppliedEvent, payment: Payment, pipeline: Pipeline) -> Then:
    """charge.dispute.*: record the dispute, book its balance transactions, set disputed flags."""
    dispute = applied.obj
    record = _plan_record(pipeline, applied, payment, dispute)
    bookings = _plan_balance_transactions(pipeline, applied, payment, dispute)

    async def then(_con: asyncpg.Connection) -> Step:
        row = pipeline.row(record)
        payment.disputed = _open(row)
        payment.dispute_lost = bool(row["any_lost"])
        any_booked = any([booked(pipeline, ticket) for ticket in bookings])
        return Step(changed=row["saved_status"] is not None or any_booked)

    return then
