"""A batch: events applied one after another in one transaction, their common writes made once.

Every event of a batch reads and changes the same in-memory payment objects (``LockedPayments``:
the rows the batch holds locked), so it sees exactly what the events before it left. What each
event leaves for the end — its inbox outcome, the payment's worker fields, the order's or
invoice's status and disputed flag, the ``status_changed`` audit rows, the payment's one ``charge``
ledger row, the resolution of its ``dead_lettered`` exception — is written by ``flush`` in one
statement: one round trip for the batch instead of one or two per event. Only the final state of
a payment or an owner is written; nothing between two events of a batch can see the rows anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from handlers.bookings import Entry
from handlers.interface import Outcome
from handlers.matching import LockedPayments, Payment
from handlers.statuses import StatusWrite

# A rejected order keeps its status; an owner row is written only when its status or disputed
# flag moves, so an order shared by payments in different worker lanes is locked as rarely as
# possible. processed_at is set once an outcome is final and stays null while retrying; a final
# outcome also resolves the event's open dead_lettered exception (it was replayed and has applied).
_FLUSH = """
with payment as (
    update recon.payments p
    set status = u.status, amount_captured = u.amount_captured,
        amount_refunded = u.amount_refunded, charge_booked = u.charge_booked,
        disputed = u.disputed, stripe_charge_id = coalesce(p.stripe_charge_id, u.stripe_charge_id),
        snapshot_created = u.snapshot_created, snapshot_rank = u.snapshot_rank,
        snapshot_event_id = u.snapshot_event_id
    from unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::boolean[],
                $6::boolean[], $7::text[], $8::timestamptz[], $9::int[], $10::text[])
         as u(id, status, amount_captured, amount_refunded, charge_booked, disputed,
              stripe_charge_id, snapshot_created, snapshot_rank, snapshot_event_id)
    where p.id = u.id
    returning p.id
), charge_rows as (
    insert into recon.ledger_entries
        (occurred_at, kind, source_id, amount, currency, payment_id, stripe_object_id, stripe_event_id)
    select c.occurred_at, 'charge', c.source_id, c.amount, c.currency, c.payment_id,
           c.stripe_object_id, c.stripe_event_id
    from unnest($11::timestamptz[], $12::text[], $13::bigint[], $14::text[], $15::bigint[],
                $16::text[], $17::text[])
         as c(occurred_at, source_id, amount, currency, payment_id, stripe_object_id, stripe_event_id)
    on conflict (kind, source_id) do nothing
    returning id
), order_rows as (
    update recon.orders o
    set status = case when o.status = 'rejected' then o.status else coalesce(u.status, o.status) end,
        disputed = u.disputed
    from unnest($18::bigint[], $19::text[], $20::boolean[]) as u(id, status, disputed)
    where o.id = u.id
      and (coalesce(u.status, o.status) is distinct from o.status or o.disputed is distinct from u.disputed)
    returning o.id
), invoice_rows as (
    update recon.invoices i
    set payment_link_status = coalesce(u.status, i.payment_link_status), disputed = u.disputed
    from unnest($21::bigint[], $22::text[], $23::boolean[]) as u(id, status, disputed)
    where i.id = u.id
      and (coalesce(u.status, i.payment_link_status) is distinct from i.payment_link_status
           or i.disputed is distinct from u.disputed)
    returning i.id
), audited as (
    insert into recon.audit_log (action, stripe_event_id, stripe_object_id, payment_id, detail)
    select 'status_changed', a.event_id, a.object_id, a.payment_id, a.detail
    from unnest($24::text[], $25::text[], $26::bigint[], $27::jsonb[])
         with ordinality as a(event_id, object_id, payment_id, detail, n)
    order by a.n
    returning id
), settled as (
    update recon.event_inbox i
    set outcome = s.outcome, processed_at = case when s.outcome = 'retrying' then null else now() end
    from unnest($28::text[], $29::text[]) as s(event_id, outcome)
    where i.event_id = s.event_id
    returning i.event_id
), resolved as (
    update recon.exceptions e set resolved_at = now()
    from unnest($28::text[], $29::text[]) as s(event_id, outcome)
    where s.outcome <> 'retrying' and e.kind = 'dead_lettered' and e.stripe_event_id = s.event_id
      and e.resolved_at is null
    returning e.id
)
select count(*) from settled
"""


@dataclass(slots=True)
class OwnerWrite:
    status: str | None  # None: the status does not move
    disputed: bool


@dataclass(slots=True)
class Audit:
    event_id: str
    object_id: str | None
    payment_id: int
    detail: str  # json


@dataclass(slots=True)
class ChargeRow:
    entry: Entry
    payment_id: int
    event_id: str


@dataclass(slots=True)
class Batch:
    payments: LockedPayments = field(default_factory=LockedPayments)
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # event id -> inbox outcome
    _dirty: dict[int, Payment] = field(default_factory=dict)
    _orders: dict[int, OwnerWrite] = field(default_factory=dict)
    _invoices: dict[int, OwnerWrite] = field(default_factory=dict)
    _audits: list[Audit] = field(default_factory=list)
    _charges: list[ChargeRow] = field(default_factory=list)

    def book_charge(self, entry: Entry, payment_id: int, event_id: str) -> None:
        """The payment's one ``charge`` row (the caller holds its lock and saw it not booked)."""
        self._charges.append(ChargeRow(entry, payment_id, event_id))

    def record_outcome(
        self,
        event_id: str,
        object_id: str | None,
        outcome: Outcome,
        payment: Payment | None,
        write: StatusWrite,
    ) -> None:
        """The event's inbox outcome, and the payment's changes if ``write`` says it changed."""
        self.outcomes[event_id] = outcome
        if payment is None or not write.changed:
            return
        self._dirty[payment.id] = payment
        self._audits.extend(Audit(event_id, object_id, payment.id, d) for d in write.audit_details)
        if payment.order_id is not None:
            self._owner(self._orders, payment.order_id, write.order_status, payment.disputed)
        if payment.invoice_id is not None:
            self._owner(self._invoices, payment.invoice_id, write.invoice_status, payment.disputed)
        # Every payment of the same order or invoice sees the status it now has (statuses.py sets
        # a new order or invoice status only for a payment that has that owner).
        for other in self.payments:
            if write.order_status is not None and other.order_id == payment.order_id:
                other.order_status = write.order_status
            if write.invoice_status is not None and other.invoice_id == payment.invoice_id:
                other.invoice_status = write.invoice_status

    @staticmethod
    def _owner(writes: dict[int, OwnerWrite], owner_id: int, status: str | None, disputed: bool) -> None:
        earlier = writes.get(owner_id)
        if status is None and earlier is not None:
            status = earlier.status
        writes[owner_id] = OwnerWrite(status, disputed)

    async def flush(self, con: asyncpg.Connection) -> None:
        if not self.outcomes:
            return
        payments = list(self._dirty.values())
        charges = self._charges
        await con.execute(
            _FLUSH,
            [p.id for p in payments],
            [p.status for p in payments],
            [p.amount_captured for p in payments],
            [p.amount_refunded for p in payments],
            [p.charge_booked for p in payments],
            [p.disputed for p in payments],
            [p.stripe_charge_id for p in payments],
            [p.snapshot_created for p in payments],
            [p.snapshot_rank for p in payments],
            [p.snapshot_event_id for p in payments],
            [c.entry.occurred_at for c in charges],
            [c.entry.source_id for c in charges],
            [c.entry.amount for c in charges],
            [c.entry.currency for c in charges],
            [c.payment_id for c in charges],
            [c.entry.stripe_object_id for c in charges],
            [c.event_id for c in charges],
            *_owner_columns(self._orders),
            *_owner_columns(self._invoices),
            [a.event_id for a in self._audits],
            [a.object_id for a in self._audits],
            [a.payment_id for a in self._audits],
            [a.detail for a in self._audits],
            list(self.outcomes),
            list(self.outcomes.values()),
        )


def _owner_columns(writes: dict[int, OwnerWrite]) -> tuple[list[int], list[str | None], list[bool]]:
    return list(writes), [w.status for w in writes.values()], [w.disputed for w in writes.values()]
