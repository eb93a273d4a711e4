"""Payouts (rule 13), the part that runs in the event's transaction: record the payout.

``payout.paid``, ``payout.failed`` and ``payout.reconciliation_completed`` save the payout's
snapshot; its status moves only forward by (event created, lifecycle rank), a full tie keeping the
stored value. Matching the payout's lines needs the Stripe API, which a handler never calls: a
paid payout that is not reconciled yet is left due (``next_attempt_at``) for the payout
reconciler, and a notification on ``PAYOUT_CHANNEL`` — delivered by PostgreSQL only when the
transaction commits — wakes it at once.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import asyncpg

from handlers.event import AppliedEvent
from handlers.interface import Outcome
from handlers.payloads import currency_of

PAYOUT_CHANNEL = "recon_payouts"
PAYOUT_STATUS_RANK = {"pending": 1, "in_transit": 2, "paid": 3, "failed": 4, "canceled": 4}

_RECORD_PAYOUT = """
insert into recon.payouts as p
    (id, amount, currency, arrival_date, automatic, status, status_created, status_rank,
     stripe_reconciliation_status, stripe_event_id, created)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
on conflict (id) do update
    set amount = excluded.amount, currency = excluded.currency,
        arrival_date = excluded.arrival_date, automatic = excluded.automatic,
        status = excluded.status, status_created = excluded.status_created,
        status_rank = excluded.status_rank,
        stripe_reconciliation_status = excluded.stripe_reconciliation_status,
        stripe_event_id = excluded.stripe_event_id
    where (excluded.status_created, excluded.status_rank) > (p.status_created, p.status_rank)
returning id
"""

# Whatever the snapshot's age, a paid payout still waiting for reconciliation is due now and the
# reconciler is told (its lines may be listable since this event). The notification is delivered
# when the transaction commits, and not at all if it rolls back.
_WAKE_RECONCILER = """
update recon.payouts set next_attempt_at = least(next_attempt_at, now())
where id = $1 and status = 'paid' and reconciliation = 'pending'
returning pg_notify($2, id)
"""


class NotAPayout(ValueError):
    """A payout.* event whose object is not a payout: a payload the rules cannot read."""


def _arrival(payout: dict[str, Any]) -> date | None:
    arrival = payout.get("arrival_date")
    return datetime.fromtimestamp(int(arrival), tz=UTC).date() if arrival is not None else None


async def on_payout_event(con: asyncpg.Connection, applied: AppliedEvent) -> Outcome:
    """payout.*: save the snapshot if it is newer; ``applied`` if it was, else ``stale``."""
    payout = applied.obj
    if payout.get("object") != "payout" or not str(payout.get("id", "")).startswith("po_"):
        raise NotAPayout(f"{applied.type} carries a {payout.get('object')!r}, not a payout")
    status = str(payout["status"])
    created = payout.get("created")
    row = await con.fetchrow(
        _RECORD_PAYOUT,
        payout["id"],
        int(payout["amount"]),
        currency_of(payout),
        _arrival(payout),
        payout.get("automatic"),
        status,
        applied.created,
        PAYOUT_STATUS_RANK.get(status, 0),
        payout.get("reconciliation_status"),
        applied.event_id,
        datetime.fromtimestamp(int(created), tz=UTC) if created is not None else None,
    )
    await con.execute(_WAKE_RECONCILER, payout["id"], PAYOUT_CHANNEL)
    return "applied" if row is not None else "stale"
