"""A batch: events applied one after another in one transaction, their common writes made once.

Every event of a batch reads and changes the same in-memory payment objects (``LockedPayments``:
the rows the batch holds locked), so it sees exactly what the events before it left. What each
event leaves for the end — its inbox outcome, the payment's worker fields, the ``status_changed``
audit rows, the payment's ``charge`` and ``capture_adjustment`` ledger rows, the resolution of the
exceptions its outcome settles, the body of an event that must wait for an operator — is written
by ``flush`` in one statement: one round trip for the batch instead of one or two per event. Only
the final state of a payment is written; nothing between two events of a batch can see the rows
anyway. A second statement then recomputes the orders and invoices the batch touched from all
their payments (``recon.refresh_owners``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from handlers.bookings import Entry
from handlers.interface import Outcome
from handlers.matching import LockedPayments, Payment
from handlers.statuses import StatusWrite

# processed_at is set once an outcome is final and stays null while retrying. A final outcome
# resolves the event's open dead_lettered exception (it was replayed and has applied); applying
# (applied or stale) resolves an unmatched_charge or refund_mismatch it raised before (an operator
# retried it). Charge-row bookings with a capture_adjustment get a capture_adjusted audit row.
_FLUSH = """
with payment as (
    update recon.payments p
    set status = u.status, amount_captured = u.amount_captured,
        amount_refunded = u.amount_refunded, charge_booked = u.charge_booked,
        charge_total = u.charge_total, disputed = u.disputed, dispute_lost = u.dispute_lost,
        stripe_charge_id = coalesce(p.stripe_charge_id, u.stripe_charge_id),
        snapshot_created = u.snapshot_created, snapshot_rank = u.snapshot_rank,
        snapshot_event_id = u.snapshot_event_id
    from unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::boolean[], $6::bigint[],
                $7::boolean[], $8::boolean[], $9::text[], $10::timestamptz[], $11::int[], $12::text[])
         as u(id, status, amount_captured, amount_refunded, charge_booked, charge_total, disputed,
              dispute_lost, stripe_charge_id, snapshot_created, snapshot_rank, snapshot_event_id)
    where p.id = u.id
    returning p.id
), charge_rows as (
    insert into recon.ledger_entries
        (occurred_at, kind, source_id, amount, currency, payment_id, stripe_object_id, stripe_event_id)
    select c.occurred_at, c.kind, c.source_id, c.amount, c.currency, c.payment_id,
           c.stripe_object_id, c.stripe_event_id
    from unnest($13::timestamptz[], $14::text[], $15::text[], $16::bigint[], $17::text[], $18::bigint[],
                $19::text[], $20::text[]) with ordinality
         as c(occurred_at, kind, source_id, amount, currency, payment_id, stripe_object_id,
              stripe_event_id, n)
    order by c.n
    on conflict (kind, source_id) do nothing
    returning id, kind, amount, currency, payment_id, stripe_object_id, stripe_event_id
), adjusted as (
    insert into recon.audit_log (action, stripe_event_id, stripe_object_id, payment_id, detail)
    select 'capture_adjusted', r.stripe_event_id, r.stripe_object_id, r.payment_id,
           jsonb_build_object('entry_id', r.id, 'kind', r.kind, 'amount', r.amount, 'currency', r.currency)
    from charge_rows r
    where r.kind = 'capture_adjustment'
    returning id
), audited as (
    insert into recon.audit_log (action, stripe_event_id, stripe_object_id, payment_id, detail)
    select 'status_changed', a.event_id, a.object_id, a.payment_id, a.detail
    from unnest($21::text[], $22::text[], $23::bigint[], $24::jsonb[])
         with ordinality as a(event_id, object_id, payment_id, detail, n)
    order by a.n
    returning id
), settled as (
    update recon.event_inbox i
    set outcome = s.outcome, processed_at = case when s.outcome = 'retrying' then null else now() end,
        stripe_object_id = coalesce(s.object_id, i.stripe_object_id),
        stripe_charge_id = coalesce(s.charge_id, i.stripe_charge_id),
        payment_id = coalesce(s.payment_id, i.payment_id)
    from unnest($25::text[], $26::text[], $27::text[], $28::text[], $29::bigint[])
         as s(event_id, outcome, object_id, charge_id, payment_id)
    where i.event_id = s.event_id
    returning i.event_id
), resolved as (
    update recon.exceptions e
    set resolved_at = now(), resolved_by = 'recon worker',
        resolution_note = 'the event reached outcome ' || s.outcome
    from unnest($25::text[], $26::text[]) as s(event_id, outcome)
    where e.stripe_event_id = s.event_id and e.resolved_at is null
      and ((s.outcome <> 'retrying' and e.kind = 'dead_lettered')
           or (s.outcome in ('applied', 'stale') and e.kind in ('unmatched_charge', 'refund_mismatch')))
    returning e.id
), kept as (
    insert into recon.event_bodies (event_id, body)
    select k.event_id, k.body from unnest($30::text[], $31::bytea[]) as k(event_id, body)
    on conflict (event_id) do update set body = excluded.body, kept_at = now()
    returning event_id
)
select count(*) from settled
"""

_REFRESH_OWNERS = "select count(*) from recon.refresh_owners($1, $2, $3, $4, $5, $6)"


@dataclass(slots=True)
class Audit:
    event_id: str
    object_id: str | None
    payment_id: int
    detail: str  # json


@dataclass(slots=True)
class LedgerRow:
    entry: Entry
    payment_id: int
    event_id: str


@dataclass(frozen=True, slots=True)
class InboxOutcome:
    outcome: Outcome
    object_id: str | None
    charge_id: str | None
    payment_id: int | None


@dataclass(slots=True)
class OwnerTouch:
    """The last event of the batch that touched one of the owner's payments (its audit rows)."""

    event_id: str
    object_id: str | None


@dataclass(slots=True)
class Batch:
    payments: LockedPayments = field(default_factory=LockedPayments)
    outcomes: dict[str, InboxOutcome] = field(default_factory=dict)  # event id -> inbox outcome
    _dirty: dict[int, Payment] = field(default_factory=dict)
    _orders: dict[int, OwnerTouch] = field(default_factory=dict)
    _invoices: dict[int, OwnerTouch] = field(default_factory=dict)
    _audits: list[Audit] = field(default_factory=list)
    _ledger_rows: list[LedgerRow] = field(default_factory=list)
    _bodies: dict[str, bytes] = field(default_factory=dict)

    def book_charge_row(self, entry: Entry, payment_id: int, event_id: str) -> None:
        """A ``charge`` or ``capture_adjustment`` row (the caller holds the payment's lock)."""
        self._ledger_rows.append(LedgerRow(entry, payment_id, event_id))

    def keep_body(self, event_id: str, body: bytes) -> None:
        """Keep the event so an operator can queue it again (``recon exceptions retry``)."""
        self._bodies[event_id] = body

    def record_outcome(
        self,
        event_id: str,
        outcome: Outcome,
        ids: tuple[str | None, str | None],
        payment: Payment | None,
        write: StatusWrite,
    ) -> None:
        """The event's inbox outcome (with its object and charge ids), and the payment's changes
        if ``write`` says it changed."""
        object_id, charge_id = ids
        self.outcomes[event_id] = InboxOutcome(outcome, object_id, charge_id, payment.id if payment else None)
        if payment is None or not write.changed:
            return
        self._dirty[payment.id] = payment
        self._audits.extend(Audit(event_id, object_id, payment.id, d) for d in write.audit_details)
        touch = OwnerTouch(event_id, object_id)
        if payment.order_id is not None:
            self._orders[payment.order_id] = touch
        if payment.invoice_id is not None:
            self._invoices[payment.invoice_id] = touch

    async def flush(self, con: asyncpg.Connection) -> None:
        if not self.outcomes:
            return
        payments = list(self._dirty.values())
        rows = self._ledger_rows
        outcomes = self.outcomes
        await con.execute(
            _FLUSH,
            [p.id for p in payments],
            [p.status for p in payments],
            [p.amount_captured for p in payments],
            [p.amount_refunded for p in payments],
            [p.charge_booked for p in payments],
            [p.charge_total for p in payments],
            [p.disputed for p in payments],
            [p.dispute_lost for p in payments],
            [p.stripe_charge_id for p in payments],
            [p.snapshot_created for p in payments],
            [p.snapshot_rank for p in payments],
            [p.snapshot_event_id for p in payments],
            [r.entry.occurred_at for r in rows],
            [r.entry.kind for r in rows],
            [r.entry.source_id for r in rows],
            [r.entry.amount for r in rows],
            [r.entry.currency for r in rows],
            [r.payment_id for r in rows],
            [r.entry.stripe_object_id for r in rows],
            [r.event_id for r in rows],
            [a.event_id for a in self._audits],
            [a.object_id for a in self._audits],
            [a.payment_id for a in self._audits],
            [a.detail for a in self._audits],
            list(outcomes),
            [o.outcome for o in outcomes.values()],
            [o.object_id for o in outcomes.values()],
            [o.charge_id for o in outcomes.values()],
            [o.payment_id for o in outcomes.values()],
            list(self._bodies),
            list(self._bodies.values()),
        )
        if self._orders or self._invoices:
            await con.fetchval(
                _REFRESH_OWNERS,
                list(self._orders),
                [t.event_id for t in self._orders.values()],
                [t.object_id for t in self._orders.values()],
                list(self._invoices),
                [t.event_id for t in self._invoices.values()],
                [t.object_id for t in self._invoices.values()],
            )
