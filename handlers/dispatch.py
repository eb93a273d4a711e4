"""apply_events: a batch of events, inside the transaction or savepoint the runtime opened.

Inbox claims and payment locks for the whole batch (two round trips) → per event, in delivery
order: match the payment → currency check → the event family's handler plans its statements →
the planned statements of all events, pipelined (handlers/pipeline.py: one round trip per
statement text) → per event, in delivery order: the charge row if due → the handler reads its rows
and concludes → statuses → inbox outcome → the batch's writes in one statement (handlers/batch.py).
A batch holding one event id twice applies it in rounds, each id once per round, so the second
delivery sees the first one's outcome exactly as in a later transaction.
Never publishes, sleeps or calls HTTP; safe to run twice (the inbox and the bookings' unique keys).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import asyncpg
import orjson

from handlers.audit import audit
from handlers.batch import Batch
from handlers.charges import observe, on_charge_event
from handlers.disputes import on_dispute_event
from handlers.event import AppliedEvent, Step, Then
from handlers.finance_exceptions import raise_exception
from handlers.inbox import claim
from handlers.interface import EventToApply, Outcome, Policy, Result
from handlers.matching import (
    OwnerCurrencyMismatch,
    Payment,
    create_from_metadata,
    lock_payment,
    lock_payments,
)
from handlers.payloads import (
    currency_of,
    embedded_list_complete,
    embedded_refunds,
    expected_live_refunds,
    live_refund_total,
    stripe_id,
)
from handlers.payouts import on_payout_event
from handlers.pipeline import Pipeline
from handlers.refunds import on_charge_refunded, on_refund_event
from handlers.statuses import NO_WRITE, StatusWrite, plan

# Plans the event's statements into the pipeline; what it returns concludes once they have run.
FamilyHandler = Callable[[AppliedEvent, Payment, Pipeline], Then]
# An event about no payment (a payout): applied on its own, straight away, to its outcome.
PaymentlessHandler = Callable[[asyncpg.Connection, AppliedEvent], Awaitable[Outcome]]

# The types about a charge: matched to a payment, which is locked, first.
PAYMENT_HANDLERS: dict[str, FamilyHandler] = {
    "charge.succeeded": on_charge_event,
    "charge.captured": on_charge_event,
    "charge.expired": on_charge_event,
    "charge.refunded": on_charge_refunded,
    "charge.refund.updated": on_refund_event,
    "refund.created": on_refund_event,
    "refund.updated": on_refund_event,
    "refund.failed": on_refund_event,
    "charge.dispute.created": on_dispute_event,
    "charge.dispute.updated": on_dispute_event,
    "charge.dispute.closed": on_dispute_event,
    "charge.dispute.funds_withdrawn": on_dispute_event,
    "charge.dispute.funds_reinstated": on_dispute_event,
}

# Payouts are about no one payment: recorded here, reconciled outside any transaction.
PAYMENTLESS_HANDLERS: dict[str, PaymentlessHandler] = {
    "payout.paid": on_payout_event,
    "payout.failed": on_payout_event,
    "payout.reconciliation_completed": on_payout_event,
}

# The types the rules apply; the receiver queues only these (worker/events.py lists them, and
# tests/test_import_layout.py keeps the two lists equal).
HANDLERS: Mapping[str, FamilyHandler | PaymentlessHandler] = {**PAYMENT_HANDLERS, **PAYMENTLESS_HANDLERS}


class UnhandledEventType(ValueError):
    """The receiver queued a type the rules do not handle: a deployment mismatch, not data."""


def refund_fetch_needed(event: dict[str, Any]) -> str | None:
    """The charge id whose refunds must be fetched before applying this event, else None.

    Only a charge.refunded can need it: when its embedded refund list is absent (API versions
    since 2022-11-15), truncated (has_more), or its live refunds do not cover amount_refunded
    less the released authorisation.
    """
    if event.get("type") != "charge.refunded":
        return None
    data = event.get("data")
    charge = data.get("object") if isinstance(data, dict) else None
    if not isinstance(charge, dict):
        return None  # not an event apply_event can take either: it fails there, and is kept
    charge_id = stripe_id(charge.get("id"))
    refunds = embedded_refunds(charge)
    if refunds is None or not embedded_list_complete(charge):
        return charge_id
    if live_refund_total(refunds) < expected_live_refunds(charge):
        return charge_id
    return None


def _result(
    applied: AppliedEvent,
    outcome: Outcome,
    payment: Payment | None = None,
    step: Step | None = None,
) -> Result:
    return Result(
        outcome=outcome,
        retry_reason=step.retry_reason if step is not None else None,
        stripe_object_id=applied.object_id,
        order_number=payment.order_number if payment is not None else None,
        invoice_number=payment.invoice_number if payment is not None else None,
    )


def _record(
    applied: AppliedEvent, outcome: Outcome, payment: Payment | None = None, write: StatusWrite = NO_WRITE
) -> None:
    """The event's inbox outcome and the payment's changes (if any), written with the batch's end.
    An event that ends unmatched or mismatched keeps its body, so an operator can retry it."""
    if outcome in ("unmatched", "mismatch"):
        applied.batch.keep_body(applied.event_id, orjson.dumps(applied.incoming.event))
    ids = (applied.object_id, applied.ref.charge_id)
    applied.batch.record_outcome(applied.event_id, outcome, ids, payment, write)


async def _unmatched(con: asyncpg.Connection, applied: AppliedEvent) -> Result:
    """Nothing matches the charge: retry until the policy's deadline, then raise an exception."""
    if applied.may_retry:
        _record(applied, "retrying")
        return Result("retrying", retry_reason="unmatched_charge", stripe_object_id=applied.object_id)
    detail = {
        "event_type": applied.type,
        "charge_id": applied.ref.charge_id,
        "payment_intent_id": applied.ref.payment_intent_id,
    }
    await raise_exception(
        con, "unmatched_charge", event_id=applied.event_id, object_id=applied.object_id, detail=detail
    )
    await audit(con, "event_unmatched", event_id=applied.event_id, object_id=applied.object_id, detail=detail)
    _record(applied, "unmatched")
    return Result("unmatched", stripe_object_id=applied.object_id)


async def _currency_mismatch(
    con: asyncpg.Connection, applied: AppliedEvent, detail: dict[str, Any], payment: Payment | None
) -> Result:
    """A currency that is not the payment's (or its order's): book nothing, raise an exception."""
    await raise_exception(
        con, "currency_mismatch", event_id=applied.event_id, object_id=applied.object_id, detail=detail
    )
    _record(applied, "mismatch")
    return _result(applied, "mismatch", payment)


async def _conclude(con: asyncpg.Connection, applied: AppliedEvent, payment: Payment, then: Then) -> Result:
    before = payment.copy()
    observed = observe(applied, payment)
    step = await then(con)
    write = plan(before, payment)
    outcome: Outcome = step.outcome
    if outcome == "applied" and not (observed or step.changed or write.audit_details):
        outcome = "stale"  # an older or repeated snapshot: nothing newer than what is stored
    _record(applied, outcome, payment, write)
    return _result(applied, outcome, payment, step)


async def _apply_paymentless(
    con: asyncpg.Connection, applied: AppliedEvent, handler: PaymentlessHandler
) -> Result:
    outcome = await handler(con, applied)
    _record(applied, outcome)
    return _result(applied, outcome)


async def apply_events(
    con: asyncpg.Connection, incoming: Sequence[EventToApply], policy: Policy
) -> list[Result]:
    """Apply ``incoming`` in order inside the caller's transaction; one Result each."""
    results: dict[int, Result] = {}
    for round_ in _rounds(incoming):
        batch = Batch()
        events = [AppliedEvent.from_incoming(incoming[i], policy, batch) for i in round_]
        for applied in events:
            if applied.type not in HANDLERS:
                raise UnhandledEventType(f"event type {applied.type!r} is not handled")
        claims = await claim(con, events)
        due = [applied for applied in events if not claims[applied.event_id].already_final]
        await lock_payments(con, (applied.ref for applied in due), batch.payments)
        pipeline = Pipeline()
        planned: list[tuple[int, AppliedEvent, Payment, Then]] = []
        for i, applied in zip(round_, events, strict=True):
            inbox_claim = claims[applied.event_id]
            if inbox_claim.already_final:
                results[i] = _result(applied, "duplicate")
                continue
            applied.first_seen_at = inbox_claim.first_seen_at
            paymentless = PAYMENTLESS_HANDLERS.get(applied.type)
            if paymentless is not None:
                results[i] = await _apply_paymentless(con, applied, paymentless)
                continue
            match = await _match(con, applied)
            if isinstance(match, Payment):
                planned.append((i, applied, match, PAYMENT_HANDLERS[applied.type](applied, match, pipeline)))
            else:
                results[i] = match
        await pipeline.run(con)
        for i, applied, payment, then in planned:
            results[i] = await _conclude(con, applied, payment, then)
        await batch.flush(con)
    return [results[i] for i in range(len(incoming))]


async def apply_event(con: asyncpg.Connection, incoming: EventToApply, policy: Policy) -> Result:
    """One event: a batch of one."""
    return (await apply_events(con, [incoming], policy))[0]


def _rounds(incoming: Sequence[EventToApply]) -> list[list[int]]:
    """Indexes of ``incoming`` in rounds: the n-th delivery of an event id goes in round n."""
    rounds: list[list[int]] = []
    seen: dict[str, int] = {}
    for i, given in enumerate(incoming):
        event_id = str(given.event["id"])
        n = seen[event_id] = seen.get(event_id, -1) + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(i)
    return rounds


async def _match(con: asyncpg.Connection, applied: AppliedEvent) -> Payment | Result:
    """The event's payment, or the outcome of an event that has none to apply to.

    Nothing here reads what the planned statements of earlier events write: payments and owners
    are written with the batch's end, and an event's payment is found in the batch's memory first.
    """
    payment = await lock_payment(con, applied.ref, applied.batch.payments)
    match: Payment | OwnerCurrencyMismatch | None = payment
    if match is None and applied.ref.charge is not None:
        match = await create_from_metadata(con, applied.ref.charge, applied.batch.payments)
    if match is None:
        return await _unmatched(con, applied)
    if isinstance(match, OwnerCurrencyMismatch):
        detail = {
            "owner": match.owner_kind,
            "number": match.owner_number,
            "owner_currency": match.owner_currency,
            "event_currency": match.charge_currency,
        }
        return await _currency_mismatch(con, applied, detail, None)
    event_currency = currency_of(applied.obj)
    if event_currency != match.currency:
        detail = {"payment_currency": match.currency, "event_currency": event_currency}
        return await _currency_mismatch(con, applied, detail, match)
    return match
