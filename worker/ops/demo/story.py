"""What ``recon demo`` plays: seven orders and invoices and the webhooks Stripe would send about them.

Each scenario is an order or invoice the host application records, its payments (one or more) and
how it records each (by charge id, by payment intent id, or not at all so the worker matches the
charge's metadata), and the deliveries in the order they reach the receiver. Event ``created``
times follow the real story; delivery order deliberately does not always (the lost dispute arrives
closing-first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from worker.ops.demo.events import (
    DemoCharge,
    balance_transaction,
    charge_object,
    dispute_object,
    event,
    new_id,
    refund_object,
)

OwnerKind = Literal["order", "invoice"]
# How the host app recorded the payment: its charge id, its payment intent id, or no payment row
# (the charge's metadata names the order/invoice and the worker creates the payment).
RecordedBy = Literal["charge_id", "payment_intent", "metadata"]
SETTLEMENT_CURRENCY = "usd"  # the demo account settles in USD: dispute fees are in USD
DISPUTE_FEE = 1500
EVIDENCE_WINDOW_S = 7 * 86_400


@dataclass(frozen=True, slots=True)
class Owner:
    """The order or invoice as the host application records it (minor units)."""

    kind: OwnerKind
    number: str
    currency: str
    amount_total: int


@dataclass(frozen=True, slots=True)
class Payment:
    """One Stripe charge paying the owner, and how the host application recorded it."""

    charge: DemoCharge
    recorded_by: RecordedBy


@dataclass(frozen=True, slots=True)
class Send:
    label: str
    event: dict[str, Any]
    copies: int = 1  # >1: the same event delivered that many times at once


@dataclass(frozen=True, slots=True)
class Scenario:
    title: str
    owner: Owner
    payments: tuple[Payment, ...]  # in the order they were made
    sends: tuple[Send, ...]


class _Ids:
    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __call__(self, prefix: str) -> str:
        return new_id(prefix, self.tag)

    def send(self, label: str, event_type: str, obj: dict[str, Any], created: int, copies: int = 1) -> Send:
        """A delivery of a new event (fresh id) of ``event_type`` about ``obj``."""
        return Send(label, event(event_type, obj, event_id=self("evt"), created=created), copies)


def _charge(ids: _Ids, owner: Owner, amount: int, created: int) -> DemoCharge:
    """A charge of ``amount`` (authorised) in the owner's currency, its metadata naming the owner."""
    key = "order_number" if owner.kind == "order" else "invoice_number"
    return DemoCharge(ids("ch"), ids("pi"), amount, owner.currency, created, {key: owner.number})


def _paid_in_full(ids: _Ids, owner: Owner, recorded_by: RecordedBy, created: int) -> Payment:
    """The one payment of an owner that was paid at once, in full."""
    return Payment(_charge(ids, owner, owner.amount_total, created), recorded_by)


def _paid(ids: _Ids, charge: DemoCharge) -> Send:
    return ids.send("customer pays", "charge.succeeded", charge_object(charge), charge.created)


def partial_refunds(ids: _Ids, number: str, t: int) -> Scenario:
    owner = Owner("order", number, "usd", 12_000)
    payment = _paid_in_full(ids, owner, "charge_id", t)
    charge = payment.charge
    first = refund_object(charge, ids("re"), 2_000, created=t + 60)
    second = refund_object(charge, ids("re"), 3_000, created=t + 120)
    both = charge_object(charge, [first, second])
    return Scenario(
        "Two partial refunds; the second webhook is delivered twice at once",
        owner,
        (payment,),
        (
            _paid(ids, charge),
            ids.send("partial refund", "charge.refunded", charge_object(charge, [first]), t + 60),
            ids.send(
                "second partial refund (duplicate delivery)", "charge.refunded", both, t + 120, copies=2
            ),
        ),
    )


def dashboard_full_refund(ids: _Ids, number: str, t: int) -> Scenario:
    owner = Owner("order", number, "jpy", 110_000)
    payment = _paid_in_full(ids, owner, "charge_id", t)
    charge = payment.charge
    full = refund_object(charge, ids("re"), 110_000, created=t + 90)
    return Scenario(
        "A zero-decimal currency refunded in full from the Dashboard",
        owner,
        (payment,),
        (
            _paid(ids, charge),
            ids.send("full refund", "charge.refunded", charge_object(charge, [full]), t + 90),
        ),
    )


def failed_refund(ids: _Ids, number: str, t: int) -> Scenario:
    owner = Owner("invoice", number, "eur", 8_000)
    payment = _paid_in_full(ids, owner, "metadata", t)
    charge = payment.charge
    pending = refund_object(charge, ids("re"), 2_500, status="pending", created=t + 60)
    failed = {**pending, "status": "failed", "failure_reason": "expired_or_canceled_card"}
    return Scenario(
        "A refund that fails after it was booked (payment matched by invoice number in metadata)",
        owner,
        (payment,),
        (
            _paid(ids, charge),
            ids.send("refund pending", "charge.refunded", charge_object(charge, [pending]), t + 60),
            ids.send("refund failed", "charge.refund.updated", failed, t + 300),
        ),
    )


def _dispute_txn(ids: _Ids, dispute_id: str, *, settled: int, fee: int, created: int) -> dict[str, Any]:
    """A balance transaction of the dispute in the settlement currency (settled < 0 withdraws)."""
    return balance_transaction(
        ids("txn"), amount=settled, fee=fee, currency=SETTLEMENT_CURRENCY, created=created, source=dispute_id
    )


def chargeback_out_of_order(ids: _Ids, number: str, t: int) -> Scenario:
    owner = Owner("order", number, "usd", 4_500)
    payment = _paid_in_full(ids, owner, "charge_id", t)
    charge = payment.charge
    dispute_id, opened = ids("dp"), t + 3_600
    withdrawn = [_dispute_txn(ids, dispute_id, settled=-4_500, fee=DISPUTE_FEE, created=opened)]

    def snapshot(status: str) -> dict[str, Any]:
        return dispute_object(
            charge,
            dispute_id,
            status=status,
            balance_transactions=withdrawn,
            created=opened,
            evidence_due_by=t + EVIDENCE_WINDOW_S,
        )

    return Scenario(
        "A chargeback: the dispute is lost (webhooks arrive newest first);"
        " the payment and the order end charged_back",
        owner,
        (payment,),
        (
            _paid(ids, charge),
            ids.send(
                "dispute closed: lost (arrives first)", "charge.dispute.closed", snapshot("lost"), t + 7_200
            ),
            ids.send(
                "funds withdrawn (arrives second)",
                "charge.dispute.funds_withdrawn",
                snapshot("needs_response"),
                opened + 1,
            ),
            ids.send(
                "dispute opened (arrives last)", "charge.dispute.created", snapshot("needs_response"), opened
            ),
        ),
    )


def won_dispute(ids: _Ids, number: str, t: int) -> Scenario:
    owner = Owner("invoice", number, "gbp", 20_000)
    payment = _paid_in_full(ids, owner, "payment_intent", t)
    charge = payment.charge
    dispute_id, opened, reinstated = ids("dp"), t + 3_600, t + 5_400
    # GBP 200.00 settles as USD 254.00 on the demo's USD account; the fee is charged in USD.
    withdrawal = _dispute_txn(ids, dispute_id, settled=-25_400, fee=DISPUTE_FEE, created=opened)
    reinstatement = _dispute_txn(ids, dispute_id, settled=25_400, fee=-DISPUTE_FEE, created=reinstated)

    def snapshot(status: str, txns: list[dict[str, Any]]) -> dict[str, Any]:
        return dispute_object(
            charge,
            dispute_id,
            status=status,
            balance_transactions=txns,
            created=opened,
            evidence_due_by=t + EVIDENCE_WINDOW_S,
        )

    both = [withdrawal, reinstatement]
    return Scenario(
        "A dispute that is won: funds and fee come back (payment matched by payment intent)",
        owner,
        (payment,),
        (
            _paid(ids, charge),
            ids.send(
                "dispute opened, funds withdrawn",
                "charge.dispute.created",
                snapshot("needs_response", [withdrawal]),
                opened,
            ),
            ids.send(
                "funds reinstated", "charge.dispute.funds_reinstated", snapshot("won", both), reinstated
            ),
            ids.send("dispute closed: won", "charge.dispute.closed", snapshot("won", both), reinstated + 1),
        ),
    )


def split_payment(ids: _Ids, number: str, t: int) -> Scenario:
    owner = Owner("order", number, "usd", 15_000)
    first = Payment(_charge(ids, owner, 9_000, t), "charge_id")
    second = Payment(_charge(ids, owner, 6_000, t + 5), "payment_intent")
    refund = refund_object(second.charge, ids("re"), 6_000, created=t + 120)
    return Scenario(
        "A split payment: one order paid by two cards, one payment refunded in full;"
        " the order ends partially_refunded",
        owner,
        (first, second),
        (
            _paid(ids, first.charge),
            _paid(ids, second.charge),
            ids.send(
                "second card refunded in full",
                "charge.refunded",
                charge_object(second.charge, [refund]),
                t + 120,
            ),
        ),
    )


def partial_capture(ids: _Ids, number: str, t: int) -> Scenario:
    # One item was out of stock: the shop lowered the order to 60.00 and captured only that much of
    # the 100.00 authorised; the host app recorded the payment for the authorised amount.
    owner = Owner("order", number, "usd", 6_000)
    authorised = Payment(_charge(ids, owner, 10_000, t), "charge_id")
    charge = authorised.charge
    return Scenario(
        "A partial capture: 100.00 authorised, 60.00 captured; a capture_adjustment brings"
        " the charge rows to the captured amount",
        owner,
        (authorised,),
        (
            ids.send("card authorised", "charge.succeeded", charge_object(charge, amount_captured=0), t),
            ids.send(
                "60.00 captured, 40.00 released",
                "charge.captured",
                charge_object(charge, amount_captured=6_000),
                t + 1_800,
            ),
        ),
    )


def build_story(tag: str, start: int) -> list[Scenario]:
    """The seven scenarios of one demo run; ``tag`` makes every number and id unique to the run."""
    ids = _Ids(tag)
    return [
        partial_refunds(ids, f"DEMO-{tag}-1", start),
        dashboard_full_refund(ids, f"DEMO-{tag}-2", start + 10),
        failed_refund(ids, f"INV-DEMO-{tag}-3", start + 20),
        chargeback_out_of_order(ids, f"DEMO-{tag}-4", start + 30),
        won_dispute(ids, f"INV-DEMO-{tag}-5", start + 40),
        split_payment(ids, f"DEMO-{tag}-6", start + 50),
        partial_capture(ids, f"DEMO-{tag}-7", start + 60),
    ]
