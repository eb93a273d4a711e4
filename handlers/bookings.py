"""Ledger bookings: each (kind, source id) at most once, with its audit row in the same statement.

Refunds and their reversals are booked by refunds._APPLY_REFUND together with the refund's status;
a payment's `charge` and `capture_adjustment` rows with the batch's last statement (batch.py).

``insert … on conflict do nothing returning``: only when a row comes back was anything booked, and
only then is the audit row written. That makes every handler safe to run twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson

from handlers.audit import AuditAction
from handlers.pipeline import Pipeline, Ticket

LedgerKind = Literal[
    "charge",
    "capture_adjustment",
    "refund",
    "refund_reversal",
    "dispute_withdrawal",
    "dispute_fee",
    "dispute_reinstatement",
]

_BOOK = """
with booked as (
    insert into recon.ledger_entries
        (occurred_at, kind, source_id, amount, currency, payment_id, stripe_object_id, stripe_event_id)
    values ($1, $2, $3, $4, $5, $6, $7, $8)
    on conflict (kind, source_id) do nothing
    returning id, amount
), audited as (
    insert into recon.audit_log (action, stripe_event_id, stripe_object_id, payment_id, detail)
    select $9::text, $8, $7, $6,
           $10::jsonb || jsonb_build_object('entry_id', b.id, 'kind', $2::text, 'amount', b.amount,
                                            'currency', $5::text)
    from booked b
)
select (select id from booked) as id
"""


@dataclass(frozen=True, slots=True)
class Entry:
    kind: LedgerKind
    source_id: str
    amount: int  # signed minor units
    currency: str
    occurred_at: datetime
    stripe_object_id: str


def plan_booking(
    pipeline: Pipeline,
    entry: Entry,
    *,
    payment_id: int,
    event_id: str,
    action: AuditAction,
    detail: dict[str, Any],
) -> Ticket:
    """Book ``entry`` unless its (kind, source id) is booked already; see ``booked``."""
    args = (
        entry.occurred_at,
        entry.kind,
        entry.source_id,
        entry.amount,
        entry.currency,
        payment_id,
        entry.stripe_object_id,
        event_id,
        action,
        orjson.dumps(detail).decode(),
    )
    return pipeline.add(_BOOK, args)


def booked(pipeline: Pipeline, ticket: Ticket) -> bool:
    """True if the planned booking booked its row (False: it was booked before)."""
    return pipeline.row(ticket)["id"] is not None
