"""Charges (rule 7): the one `charge` row per payment, amount_captured, and charge snapshots.

What "captured" means for a payment the host application recorded: the host's record is the
payment, so its `charge` row is booked for the payment's ``amount`` by the first event that touches
it, whatever that event is (a refund or dispute event carries no charge to look at). A later event
showing a different ``amount_captured`` (a partial capture) does not rebook or adjust that row —
the ledger is append-only and the row must not depend on which event came first (rule 3). Stripe's
``amount_captured`` is still recorded on the payment (the largest one shown, so it is
order-independent too) and from then on is the captured amount that statuses and over-refund
checks measure refunds against (rule 5). A payment the worker created from metadata has no host
amount to trust: its row waits for an event that shows the charge captured and books
``amount_captured``; an authorisation alone books nothing.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from handlers.bookings import Entry
from handlers.event import AppliedEvent, Step, Then
from handlers.matching import Payment
from handlers.payloads import captured_amount, timestamp
from handlers.pipeline import Pipeline

# Lifecycle order of the charge events, to break same-second ties between charge snapshots.
CHARGE_EVENT_RANK = {"charge.succeeded": 1, "charge.captured": 2, "charge.refunded": 3}

SnapshotKey = tuple[datetime, int, str]


def snapshot_key(applied: AppliedEvent) -> SnapshotKey:
    return (applied.created, CHARGE_EVENT_RANK.get(applied.type, 0), applied.event_id)


def is_newest_snapshot(payment: Payment, applied: AppliedEvent) -> bool:
    """True unless a newer snapshot of this charge (by created, rank, event id) was applied."""
    if payment.snapshot_created is None:
        return True
    stored = (payment.snapshot_created, payment.snapshot_rank or 0, payment.snapshot_event_id or "")
    return snapshot_key(applied) >= stored


def advance_snapshot(payment: Payment, applied: AppliedEvent) -> bool:
    """Make ``applied`` the payment's newest charge snapshot if it is; True if that changed it."""
    if not is_newest_snapshot(payment, applied):
        return False
    created, rank, event_id = snapshot_key(applied)
    if (payment.snapshot_created, payment.snapshot_rank, payment.snapshot_event_id) == (
        created,
        rank,
        event_id,
    ):
        return False
    payment.snapshot_created, payment.snapshot_rank = created, rank
    payment.snapshot_event_id = event_id
    return True


def _note_charge(applied: AppliedEvent, payment: Payment) -> bool:
    """Note the charge id and the largest amount_captured shown; True if the latter grew."""
    charge = applied.ref.charge
    if payment.stripe_charge_id is None and applied.ref.charge_id is not None:
        payment.stripe_charge_id = applied.ref.charge_id
    if charge is None:
        return False
    captured = captured_amount(charge)
    if captured is not None and (payment.amount_captured is None or captured > payment.amount_captured):
        payment.amount_captured = captured
        return True
    return False


def _charge_entry(applied: AppliedEvent, payment: Payment) -> Entry | None:
    charge = applied.ref.charge
    if payment.created_by_worker:
        captured = captured_amount(charge) if charge is not None else None
        if captured is None:
            return None
        amount = captured
    else:
        amount = payment.amount
    occurred_at = timestamp(int(charge["created"])) if charge is not None else payment.recorded_at
    object_id = applied.ref.charge_id or payment.stripe_charge_id or f"payment:{payment.id}"
    return Entry("charge", f"payment:{payment.id}", amount, payment.currency, occurred_at, object_id)


def observe(applied: AppliedEvent, payment: Payment) -> bool:
    """For every matched event: note what it shows of the charge; book the charge row if due
    (with the batch's last statement: under the payment's lock, nothing else books it).
    True if it changed anything."""
    noted = _note_charge(applied, payment)
    if payment.charge_booked:
        return noted
    entry = _charge_entry(applied, payment)
    if entry is None:
        return noted
    applied.batch.book_charge(entry, payment.id, applied.event_id)
    # The status_changed audit row (pending → paid) that follows records the booking.
    payment.charge_booked = True
    return True


def on_charge_event(applied: AppliedEvent, payment: Payment, _pipeline: Pipeline) -> Then:
    """charge.succeeded / charge.captured: everything is in observe(); record the snapshot."""

    async def then(_con: asyncpg.Connection) -> Step:
        return Step(changed=advance_snapshot(payment, applied))

    return then
