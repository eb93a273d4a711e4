"""The payout reconciler's statements: claim a due payout, read what the ledger knows of its
lines, and write a reconciliation (fees, lines, the payout's state, its exception) in one
transaction. Never called with a Stripe request in flight inside a transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from worker.payouts.lines import (
    EntryFacts,
    Judgement,
    LedgerFacts,
    Line,
    PaymentFacts,
    Verdict,
)

PAYOUT_STATUS_RANK = {"pending": 1, "in_transit": 2, "paid": 3, "failed": 4, "canceled": 4}
# stripe_event_id of the ledger rows and payouts the reconciler writes without an event behind them.
NO_EVENT = "recon payouts"

# One due payout, leased: the claim moves next_attempt_at past the lease, so another worker (or
# this one after a crash) takes it again only once the lease ran out.
_CLAIM_DUE = """
update recon.payouts p
set next_attempt_at = now() + make_interval(secs => $1), attempts = p.attempts + 1
where p.id = (select id from recon.payouts
              where status = 'paid' and reconciliation = 'pending' and next_attempt_at <= now()
              order by next_attempt_at, id
              limit 1
              for update skip locked)
returning p.id, p.attempts
"""

_RETRY_LATER = """
update recon.payouts set next_attempt_at = now() + make_interval(secs => $2), last_error = $3
where id = $1 and reconciliation = 'pending'
"""

# Stripe will never list this payout's lines (a manual payout): due no more, and why.
_SET_ASIDE = """
update recon.payouts set next_attempt_at = 'infinity', last_error = $2
where id = $1 and reconciliation = 'pending'
"""

# A snapshot read from the API (``recon payouts``, or the reconciler's own fetch): saved like an
# event's, dated now — it is newer than any event sent before it.
_SAVE_SNAPSHOT = """
insert into recon.payouts as p
    (id, amount, currency, arrival_date, automatic, status, status_created, status_rank,
     stripe_reconciliation_status, stripe_event_id, created)
values ($1, $2, $3, $4, $5, $6, now(), $7, $8, $9, $10)
on conflict (id) do update
    set amount = excluded.amount, currency = excluded.currency, arrival_date = excluded.arrival_date,
        automatic = excluded.automatic, status = excluded.status, status_created = excluded.status_created,
        status_rank = excluded.status_rank,
        stripe_reconciliation_status = excluded.stripe_reconciliation_status
    where (excluded.status_created, excluded.status_rank) > (p.status_created, p.status_rank)
"""

_PAYOUT_FOR_UPDATE = """
select id, amount, currency, reconciliation, coalesce(stripe_event_id, $2) as stripe_event_id
from recon.payouts where id = $1 for update
"""

_PAYMENTS = """
select p.id, p.currency, p.charge_booked, p.charge_total, p.stripe_charge_id, p.stripe_payment_intent_id,
       (select min(l.id) from recon.ledger_entries l where l.payment_id = p.id and l.kind = 'charge')
           as charge_entry_id
from recon.payments p
where p.stripe_charge_id = any($1::text[]) or p.stripe_payment_intent_id = any($2::text[])
"""

_ENTRIES = """
select id, kind, source_id, amount, currency, payment_id from recon.ledger_entries
where (kind in ('refund', 'refund_reversal') and source_id = any($1::text[]))
   or (kind in ('dispute_withdrawal', 'dispute_reinstatement', 'dispute_fee') and source_id = any($2::text[]))
"""

_REFUNDS = "select id, payment_id from recon.refunds where id = any($1::text[])"
_DISPUTES = "select id, payment_id from recon.disputes where id = any($1::text[])"

_BOOK_FEES = """
insert into recon.ledger_entries
    (occurred_at, kind, source_id, amount, currency, payment_id, stripe_object_id, stripe_event_id)
select f.occurred_at, 'processing_fee', f.txn_id, f.amount, f.currency, f.payment_id, f.object_id, $7
from unnest($1::timestamptz[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::text[])
     as f(occurred_at, txn_id, amount, currency, payment_id, object_id)
on conflict (kind, source_id) do nothing
returning id
"""

_SAVE_LINES = """
with gone as (
    delete from recon.payout_lines where payout_id = $1 and balance_transaction_id <> all($2::text[])
)
insert into recon.payout_lines as x
    (payout_id, balance_transaction_id, type, reporting_category, source_id, amount, fee, net,
     currency, exchange_rate, match, entry_id, ledger_amount, difference, created)
select $1, l.txn_id, l.type, l.category, l.source_id, l.amount, l.fee, l.net, l.currency, l.rate,
       l.match, l.entry_id, l.ledger_amount, l.difference, l.created
from unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[], $8::bigint[],
            $9::text[], $10::numeric[], $11::text[], $12::bigint[], $13::bigint[], $14::bigint[],
            $15::timestamptz[])
     as l(txn_id, type, category, source_id, amount, fee, net, currency, rate, match, entry_id,
          ledger_amount, difference, created)
on conflict (payout_id, balance_transaction_id) do update
    set type = excluded.type, reporting_category = excluded.reporting_category,
        source_id = excluded.source_id, amount = excluded.amount, fee = excluded.fee, net = excluded.net,
        currency = excluded.currency, exchange_rate = excluded.exchange_rate, match = excluded.match,
        entry_id = excluded.entry_id, ledger_amount = excluded.ledger_amount,
        difference = excluded.difference, created = excluded.created
"""

_SAVE_RESULT = """
update recon.payouts
set reconciliation = $2, lines_net = $3, difference_amount = $4, reconciled_at = now(),
    next_attempt_at = 'infinity', last_error = null
where id = $1
"""

_RAISE = """
insert into recon.exceptions (kind, stripe_event_id, stripe_object_id, detail)
values ('payout_difference', null, $1, $2::jsonb)
on conflict (kind, coalesce(stripe_event_id, ''), coalesce(stripe_object_id, ''))
    where resolved_at is null do nothing
"""

_RESOLVE = """
update recon.exceptions
set resolved_at = now(), resolved_by = 'recon payouts', resolution_note = 'the payout matched on a later run'
where kind = 'payout_difference' and stripe_object_id = $1 and resolved_at is null
"""


@dataclass(frozen=True, slots=True)
class Claimed:
    payout_id: str
    attempts: int


async def claim_due(con: asyncpg.Connection, lease_s: float) -> Claimed | None:
    row = await con.fetchrow(_CLAIM_DUE, lease_s)
    return Claimed(row["id"], row["attempts"]) if row is not None else None


async def retry_later(con: asyncpg.Connection, payout_id: str, delay_s: float, why: str) -> None:
    await con.execute(_RETRY_LATER, payout_id, delay_s, why[:500])


async def set_aside(con: asyncpg.Connection, payout_id: str, why: str) -> None:
    await con.execute(_SET_ASIDE, payout_id, why[:500])


def _utc(epoch: Any) -> datetime:
    return datetime.fromtimestamp(int(epoch), tz=UTC)


async def save_snapshot(con: asyncpg.Connection, payout: dict[str, Any]) -> None:
    """Save a payout as the API shows it now (its status only moves forward)."""
    status = str(payout["status"])
    created = payout.get("created")
    await con.execute(
        _SAVE_SNAPSHOT,
        payout["id"],
        int(payout["amount"]),
        str(payout["currency"]).lower(),
        _utc(payout["arrival_date"]).date() if payout.get("arrival_date") is not None else None,
        payout.get("automatic"),
        status,
        PAYOUT_STATUS_RANK.get(status, 0),
        payout.get("reconciliation_status"),
        NO_EVENT,
        _utc(created) if created is not None else None,
    )


async def ledger_facts(con: asyncpg.Connection, lines: list[Line]) -> LedgerFacts:
    """Everything the ledger says about the lines' sources, in four statements."""
    facts = LedgerFacts()
    charge_ids = sorted({x for line in lines for x in (line.source_id, line.source_charge_id) if x})
    intent_ids = sorted({line.source_payment_intent_id for line in lines if line.source_payment_intent_id})
    for row in await con.fetch(_PAYMENTS, charge_ids, intent_ids):
        payment = PaymentFacts(
            row["id"], row["currency"], row["charge_booked"], row["charge_total"], row["charge_entry_id"]
        )
        if row["stripe_charge_id"] is not None:
            facts.payments_by_charge[row["stripe_charge_id"]] = payment
        if row["stripe_payment_intent_id"] is not None:
            facts.payments_by_intent[row["stripe_payment_intent_id"]] = payment
    source_ids = sorted({line.source_id for line in lines if line.source_id})
    txn_ids = sorted({line.txn_id for line in lines})
    for row in await con.fetch(_ENTRIES, source_ids, txn_ids):
        facts.entries[(row["kind"], row["source_id"])] = EntryFacts(
            row["id"], row["amount"], row["currency"], row["payment_id"]
        )
    facts.refund_payments = {r["id"]: r["payment_id"] for r in await con.fetch(_REFUNDS, source_ids)}
    facts.dispute_payments = {r["id"]: r["payment_id"] for r in await con.fetch(_DISPUTES, source_ids)}
    return facts


async def lock_payout(con: asyncpg.Connection, payout_id: str) -> asyncpg.Record | None:
    return await con.fetchrow(_PAYOUT_FOR_UPDATE, payout_id, NO_EVENT)


async def book_fees(con: asyncpg.Connection, verdicts: list[Verdict], event_id: str) -> int:
    """One processing_fee (−fee, settlement currency) per charge or refund line of a known payment,
    keyed by the transaction id: booked once, whatever the number of runs. Returns how many now."""
    due = [v for v in verdicts if v.payment_id is not None and v.line.books_processing_fee]
    if not due:
        return 0
    rows = await con.fetch(
        _BOOK_FEES,
        [v.line.created for v in due],
        [v.line.txn_id for v in due],
        [-v.line.fee for v in due],
        [v.line.currency for v in due],
        [v.payment_id for v in due],
        [v.line.source_id or v.line.txn_id for v in due],
        event_id,
    )
    return len(rows)


async def save_lines(con: asyncpg.Connection, payout_id: str, verdicts: list[Verdict]) -> None:
    lines = [v.line for v in verdicts]
    await con.execute(
        _SAVE_LINES,
        payout_id,
        [x.txn_id for x in lines],
        [x.type for x in lines],
        [x.reporting_category for x in lines],
        [x.source_id for x in lines],
        [x.amount for x in lines],
        [x.fee for x in lines],
        [x.net for x in lines],
        [x.currency for x in lines],
        [x.exchange_rate for x in lines],
        [v.match for v in verdicts],
        [v.entry_id for v in verdicts],
        [v.ledger_amount for v in verdicts],
        [v.difference for v in verdicts],
        [x.created for x in lines],
    )


def difference_detail(judgement: Judgement, currency: str) -> dict[str, Any]:
    """The payout_difference exception's detail: enough to start from, never the whole payout."""
    differing = judgement.differences
    return {
        "currency": currency,
        "payout_amount": judgement.payout_amount,
        "lines_net": judgement.lines_net,
        "difference_amount": judgement.difference_amount,
        "missing_in_ledger": sum(1 for v in differing if v.match == "missing_in_ledger"),
        "amount_differs": sum(1 for v in differing if v.match == "amount_differs"),
        "lines": [
            {
                "balance_transaction": v.line.txn_id,
                "source": v.line.source_id,
                "match": v.match,
                "difference": v.difference,
            }
            for v in differing[:20]
        ],
    }


async def save_result(con: asyncpg.Connection, payout_id: str, currency: str, judgement: Judgement) -> None:
    await con.execute(
        _SAVE_RESULT, payout_id, judgement.reconciliation, judgement.lines_net, judgement.difference_amount
    )
    if judgement.reconciliation == "differences":
        await con.execute(_RAISE, payout_id, orjson.dumps(difference_detail(judgement, currency)).decode())
    else:
        await con.execute(_RESOLVE, payout_id)
