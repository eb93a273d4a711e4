"""Charges (rule 7): the payment's `charge` row, the captured amount, capture adjustments, and
charge snapshots.

Each payment gets one `charge` row: a payment the host application recorded gets it for the
host's ``amount`` from the first event that touches it (a refund or dispute event carries no
charge to look at); a payment the worker created from metadata has no host amount to trust, so
its row waits for an event that shows the charge captured and books that ``amount_captured``.

The captured amount is the largest ``amount_captured`` any event showed with ``captured: true``;
else 0 once an event showed the authorisation ended with nothing taken (``charge.expired``, or a
refunded charge still ``captured: false``); else unknown, and the host's amount stands. When it is
known and the payment's charge rows add up to something else, one `capture_adjustment` books the
difference, keyed by the payment and the captured amount it settles on: in any order of events,
with any replays, the rows end equal to the captured amount (the ledger stays append-only, so a
row is never rewritten).
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
CHARGE_EVENT_RANK = {"charge.succeeded": 1, "charge.captured": 2, "charge.expired": 2, "charge.refunded": 3}

SnapshotKey = tuple[datetime, int, str]


def snapshot_key(applied: AppliedEvent) -> SnapshotKey:
    return (applied.created, CHARGE_EVENT_RANK.get(applied.type, 0), applied.event_id)


def is_newest_snapshot(payment: Payment, applied: AppliedEvent) -> bool:
    """True when ``applied`` is newer than the stored snapshot by (created, rank), or is that very
    snapshot again (a retried checkpoint). On a full tie with another event the stored one stays
    (rule 3): the event id is not an order, only a name."""
    if payment.snapshot_created is None:
        return True
    created, rank, event_id = snapshot_key(applied)
    stored = (payment.snapshot_created, payment.snapshot_rank or 0)
    if (created, rank) != stored:
        return (created, rank) > stored
    return event_id == payment.snapshot_event_id


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


def captured_shown(applied: AppliedEvent) -> int | None:
    """What the event shows was captured: amount_captured of a captured charge, 0 for an
    authorisation that ended with nothing taken, None when it shows neither (or is no charge)."""
    charge = applied.ref.charge
    if charge is None:
        return None
    captured = captured_amount(charge)
    if captured is not None:
        return captured
    released = applied.type == "charge.refunded" and charge.get("captured") is False
    if applied.type == "charge.expired" or released:
        return 0
    return None


def _note_charge(applied: AppliedEvent, payment: Payment) -> bool:
    """Note the charge id and the largest captured amount shown; True if the latter moved."""
    if payment.stripe_charge_id is None and applied.ref.charge_id is not None:
        payment.stripe_charge_id = applied.ref.charge_id
    shown = captured_shown(applied)
    if shown is not None and (payment.amount_captured is None or shown > payment.amount_captured):
        payment.amount_captured = shown
        return True
    return False


def _object_id(applied: AppliedEvent, payment: Payment) -> str:
    return applied.ref.charge_id or payment.stripe_charge_id or f"payment:{payment.id}"


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
    object_id = _object_id(applied, payment)
    return Entry("charge", f"payment:{payment.id}", amount, payment.currency, occurred_at, object_id)


def _book_charge(applied: AppliedEvent, payment: Payment) -> bool:
    if payment.charge_booked:
        return False
    entry = _charge_entry(applied, payment)
    if entry is None:
        return False
    applied.batch.book_charge_row(entry, payment.id, applied.event_id)
    # The status_changed audit row (pending → paid) that follows records the booking.
    payment.charge_booked = True
    payment.charge_total = entry.amount
    return True


def _adjust_to_captured(applied: AppliedEvent, payment: Payment) -> bool:
    """Book the difference between the charge rows and the known captured amount, once per amount."""
    captured = payment.amount_captured
    if not payment.charge_booked or captured is None or captured == payment.charge_total:
        return False
    entry = Entry(
        "capture_adjustment",
        f"payment:{payment.id}:captured:{captured}",
        captured - payment.charge_total,
        payment.currency,
        applied.created,  # when the event showed the capture or the expiry
        _object_id(applied, payment),
    )
    applied.batch.book_charge_row(entry, payment.id, applied.event_id)
    payment.charge_total = captured
    return True


def observe(applied: AppliedEvent, payment: Payment) -> bool:
    """For every matched event: note what it shows of the charge; book the charge row if due and
    the adjustment the captured amount implies (with the batch's last statement: under the
    payment's lock, nothing else books them). True if it changed anything."""
    noted = _note_charge(applied, payment)
    booked = _book_charge(applied, payment)
    adjusted = _adjust_to_captured(applied, payment)
    return noted or booked or adjusted


def on_charge_event(applied: AppliedEvent, payment: Payment, _pipeline: Pipeline) -> Then:
    """charge.succeeded / charge.captured / charge.expired: everything is in observe(); record the
    snapshot."""

    async def then(_con: asyncpg.Connection) -> Step:
        return Step(changed=advance_snapshot(payment, applied))

    return then
