"""Ledger bookings: each (kind, source id) at most once, with its audit row in the same statement.

``insert … on conflict do nothing returning``: only when a row comes back was anything booked, and
only then is the audit row written. That makes every handler safe to run twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from handlers.audit import AuditAction

LedgerKind = Literal[
    "charge",
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
    where $9::text is not null
)
select id from booked
"""

# The reversal mirrors the booked refund row (its amount, currency and occurred_at, the refund's
# created): it exists only if the refund was booked, and whatever event reports the failure, the
# ledger ends the same.
_REVERSE_REFUND = """
with booked as (
    insert into recon.ledger_entries
        (occurred_at, kind, source_id, amount, currency, payment_id, stripe_object_id, stripe_event_id)
    select r.occurred_at, 'refund_reversal', r.source_id, -r.amount, r.currency, r.payment_id,
           r.stripe_object_id, $2
    from recon.ledger_entries r
    where r.kind = 'refund' and r.source_id = $1
    on conflict (kind, source_id) do nothing
    returning id, amount, currency, payment_id
), audited as (
    insert into recon.audit_log (action, stripe_event_id, stripe_object_id, payment_id, detail)
    select 'stripe_refund_reversed', $2, $1, b.payment_id,
           jsonb_build_object('entry_id', b.id, 'kind', 'refund_reversal', 'amount', b.amount,
                              'currency', b.currency)
    from booked b
)
select amount from booked
"""


@dataclass(frozen=True, slots=True)
class Entry:
    kind: LedgerKind
    source_id: str
    amount: int  # signed minor units
    currency: str
    occurred_at: datetime
    stripe_object_id: str


async def book(
    con: asyncpg.Connection,
    entry: Entry,
    *,
    payment_id: int,
    event_id: str,
    action: AuditAction | None,
    detail: dict[str, Any] | None = None,
) -> bool:
    """Book ``entry`` unless its (kind, source id) is booked already; True if this call booked it."""
    entry_id = await con.fetchval(
        _BOOK,
        entry.occurred_at,
        entry.kind,
        entry.source_id,
        entry.amount,
        entry.currency,
        payment_id,
        entry.stripe_object_id,
        event_id,
        action,
        json.dumps(detail or {}),
    )
    return entry_id is not None


async def reverse_refund(con: asyncpg.Connection, refund_id: str, *, event_id: str) -> int | None:
    """Book the one refund_reversal of a booked refund; its (+) amount, or None if not booked now."""
    amount: int | None = await con.fetchval(_REVERSE_REFUND, refund_id, event_id)
    return amount
