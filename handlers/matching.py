"""Matching an event's charge to a payment, and locking that payment row.

Order: ``stripe_charge_id``, then ``stripe_payment_intent_id``; failing both, a charge whose
metadata names an existing order (``order_number``) or invoice (``invoice_number``) gets a payment
row created for it. The payment row is locked (``for update``) before anything else is read, so the
events of one charge serialize across worker processes while other charges run in parallel.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any

import asyncpg

from handlers.payloads import TERMINAL_METHOD_TYPES, ChargeRef, currency_of, stripe_id

_PAYMENT_SELECT = """
select p.id, p.order_id, p.invoice_id, p.currency, p.amount, p.amount_captured, p.amount_refunded,
       p.charge_booked, p.charge_total, p.disputed, p.dispute_lost, p.status, p.created_by_worker,
       p.stripe_charge_id, p.stripe_payment_intent_id, p.recorded_at, p.snapshot_created,
       p.snapshot_rank, p.snapshot_event_id,
       o.number as order_number, i.number as invoice_number
from recon.payments p
left join recon.orders o on o.id = p.order_id
left join recon.invoices i on i.id = p.invoice_id
"""

# Charge id first, then payment intent. ``for update of p``: the payment row is the lock that
# serializes the events of one charge.
PAYMENT_LOCK = (
    _PAYMENT_SELECT
    + """where p.stripe_charge_id = $1 or p.stripe_payment_intent_id = $2
order by (p.stripe_charge_id is not distinct from $1) desc
limit 1
for update of p
"""
)

# Every payment any event of a batch may match, locked in id order (two batches that share
# payments then wait for each other instead of deadlocking).
_PAYMENTS_LOCK = (
    _PAYMENT_SELECT
    + """where p.stripe_charge_id = any($1::text[]) or p.stripe_payment_intent_id = any($2::text[])
order by p.id
for update of p
"""
)

_OWNER = """
select 'order' as kind, id, currency from recon.orders where number = $1
union all
select 'invoice' as kind, id, currency from recon.invoices where number = $2
"""

# `on conflict do nothing` (every unique key): a concurrent creator of the same payment wins and
# this transaction then locks the row it created.
_CREATE = """
insert into recon.payments
    (stripe_charge_id, stripe_payment_intent_id, order_id, invoice_id, method, currency, amount,
     created_by_worker)
values ($1, $2, $3, $4, $5, $6, $7, true)
on conflict do nothing
"""


@dataclass(slots=True)
class Payment:
    """The locked payment row. Handlers change the worker fields; the batch writes them (batch.py)."""

    id: int
    order_id: int | None
    invoice_id: int | None
    currency: str
    amount: int
    amount_captured: int | None
    amount_refunded: int
    charge_booked: bool
    charge_total: int  # what its charge and capture_adjustment rows add up to
    disputed: bool
    dispute_lost: bool
    status: str
    created_by_worker: bool
    stripe_charge_id: str | None
    stripe_payment_intent_id: str | None
    recorded_at: datetime
    snapshot_created: datetime | None
    snapshot_rank: int | None
    snapshot_event_id: str | None
    order_number: str | None
    invoice_number: str | None

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> Payment:
        return cls(**{f.name: record[f.name] for f in fields(cls)})

    def copy(self) -> Payment:
        return replace(self)

    @property
    def captured_amount(self) -> int:
        """What refunds are measured against: Stripe's amount_captured once shown, else amount."""
        return self.amount_captured if self.amount_captured is not None else self.amount


@dataclass(frozen=True, slots=True)
class OwnerCurrencyMismatch:
    """The charge's metadata names an order/invoice in another currency: no payment is created."""

    owner_kind: str
    owner_number: str
    owner_currency: str
    charge_currency: str | None


class LockedPayments:
    """The payments this transaction holds locked, one object per row, so that every event of a
    batch sees (and changes) what the events before it left; the batch writes them at its end."""

    def __init__(self) -> None:
        self._by_id: dict[int, Payment] = {}
        self._by_intent: dict[str, Payment] = {}
        # By charge id as of when the row was locked; a charge id an event fills in later
        # (the host recorded only the intent) is found through the intent or by the scan below.
        self._by_charge: dict[str, Payment] = {}
        self._no_charge_id: list[Payment] = []

    def add(self, payment: Payment) -> Payment:
        """The batch's object for this row: ``payment`` unless the row is held already."""
        held = self._by_id.get(payment.id)
        if held is not None:
            return held
        self._by_id[payment.id] = payment
        if payment.stripe_payment_intent_id is not None:
            self._by_intent[payment.stripe_payment_intent_id] = payment
        if payment.stripe_charge_id is not None:
            self._by_charge[payment.stripe_charge_id] = payment
        else:
            self._no_charge_id.append(payment)
        return payment

    def __iter__(self) -> Iterator[Payment]:
        return iter(self._by_id.values())

    def match(self, ref: ChargeRef) -> Payment | None:
        """As PAYMENT_LOCK matches: by charge id, else by payment intent."""
        charge_id, intent_id = ref.charge_id, ref.payment_intent_id
        if charge_id is not None:
            found = self._by_charge.get(charge_id)
            if found is not None:
                return found
            for payment in self._no_charge_id:
                if payment.stripe_charge_id == charge_id:
                    return payment
        return self._by_intent.get(intent_id) if intent_id is not None else None


async def lock_payments(con: asyncpg.Connection, refs: Iterable[ChargeRef], locked: LockedPayments) -> None:
    """Lock every payment the refs may match, all in one round trip, into ``locked``."""
    refs = list(refs)
    charge_ids = sorted({ref.charge_id for ref in refs if ref.charge_id is not None})
    intent_ids = sorted({ref.payment_intent_id for ref in refs if ref.payment_intent_id is not None})
    if not charge_ids and not intent_ids:
        return
    for row in await con.fetch(_PAYMENTS_LOCK, charge_ids, intent_ids):
        locked.add(Payment.from_record(row))


async def lock_payment(con: asyncpg.Connection, ref: ChargeRef, locked: LockedPayments) -> Payment | None:
    """The payment ``ref`` matches: one the batch holds, else one locked now (created since)."""
    found = locked.match(ref)
    if found is not None or (ref.charge_id is None and ref.payment_intent_id is None):
        return found
    row = await con.fetchrow(PAYMENT_LOCK, ref.charge_id, ref.payment_intent_id)
    return locked.add(Payment.from_record(row)) if row is not None else None


def _method(charge: dict[str, Any], owner_kind: str) -> str:
    details = charge.get("payment_method_details")
    method_type = details.get("type") if isinstance(details, dict) else None
    if method_type in TERMINAL_METHOD_TYPES:
        return "stripe_terminal"
    return "stripe_link" if owner_kind == "invoice" else "stripe_card"


async def _owner(con: asyncpg.Connection, charge: dict[str, Any]) -> asyncpg.Record | None:
    metadata = charge.get("metadata")
    if not isinstance(metadata, dict):
        return None
    order_number, invoice_number = metadata.get("order_number"), metadata.get("invoice_number")
    if not isinstance(order_number, str) and not isinstance(invoice_number, str):
        return None
    rows = await con.fetch(_OWNER, order_number, invoice_number)
    # An order named by order_number wins over an invoice named by invoice_number.
    return rows[0] if rows else None


async def create_from_metadata(
    con: asyncpg.Connection, charge: dict[str, Any], locked: LockedPayments
) -> Payment | OwnerCurrencyMismatch | None:
    """Create (race-safely) and lock a payment for a charge whose metadata names an order/invoice."""
    owner = await _owner(con, charge)
    if owner is None:
        return None
    currency = currency_of(charge)
    if currency != owner["currency"]:
        metadata = charge["metadata"]
        number = metadata.get("order_number" if owner["kind"] == "order" else "invoice_number")
        return OwnerCurrencyMismatch(owner["kind"], str(number), owner["currency"], currency)
    is_order = owner["kind"] == "order"
    charge_id = stripe_id(charge.get("id"))
    intent_id = stripe_id(charge.get("payment_intent"))
    await con.execute(
        _CREATE,
        charge_id,
        intent_id,
        owner["id"] if is_order else None,
        None if is_order else owner["id"],
        _method(charge, owner["kind"]),
        currency,
        int(charge["amount"]),
    )
    return await lock_payment(con, ChargeRef(charge_id, intent_id, charge), locked)
