"""What ``recon demo`` plays: five payments and the webhooks Stripe would send about them.

Each scenario is an order or invoice the host application records, how it records the payment
(by charge id, by payment intent id, or not at all so the worker matches the charge's metadata),
and the deliveries in the order they reach the receiver. Event ``created`` times follow the real
story; delivery order deliberately does not always (the lost dispute arrives closing-first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from worker.demo_events import (
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
    kind: OwnerKind
    number: str
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
    charge: DemoCharge
    sends: tuple[Send, ...]


class _Ids:
    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __call__(self, prefix: str) -> str:
        return new_id(prefix, self.tag)


def _charge(ids: _Ids, owner: Owner, amount: int, currency: str, created: int) -> DemoCharge:
    key = "order_number" if owner.kind == "order" else "invoice_number"
    return DemoCharge(ids("ch"), ids("pi"), amount, currency, created, {key: owner.number})


def _paid(ids: _Ids, charge: DemoCharge) -> Send:
    return Send(
        "customer pays",
        event("charge.succeeded", charge_object(charge), event_id=ids("evt"), created=charge.created),
    )


def partial_refunds(ids: _Ids, number: str, t: int) -> Scenario:
    owner = Owner("order", number, "charge_id")
    charge = _charge(ids, owner, 12_000, "usd", t)
    first = refund_object(charge, ids("re"), 2_000, created=t + 60)
    second = refund_object(charge, ids("re"), 3_000, created=t + 120)
    return Scenario(
        "Two partial refunds; the second webhook is delivered twice at once",
        owner,
        charge,
        (
            _paid(ids, charge),
            Send(
                "partial refund",
                event("charge.refunded", charge_object(charge, [first]), event_id=ids("evt"), created=t + 60),
            ),
            Send(
                "second partial refund (duplicate delivery)",
                event(
                    "charge.refunded",
                    charge_object(charge, [first, second]),
                    event_id=ids("evt"),
                    created=t + 120,
                ),
                copies=2,
            ),
        ),
    )


def dashboard_full_refund(ids: _Ids, number: str, t: int) -> Scenario:
    owner = Owner("order", number, "charge_id")
    charge = _charge(ids, owner, 110_000, "jpy", t)
    full = refund_object(charge, ids("re"), 110_000, created=t + 90)
    return Scenario(
        "A zero-decimal currency refunded in full from the Dashboard",
        owner,
        charge,
        (
            _paid(ids, charge),
            Send(
                "full refund",
                event("charge.refunded", charge_object(charge, [full]), event_id=ids("evt"), created=t + 90),
            ),
        ),
    )


def failed_refund(ids: _Ids, number: str, t: int) -> Scenario:
    owner = Owner("invoice", number, "metadata")
    charge = _charge(ids, owner, 8_000, "eur", t)
    pending = refund_object(charge, ids("re"), 2_500, status="pending", created=t + 60)
    failed = {**pending, "status": "failed", "failure_reason": "expired_or_canceled_card"}
    return Scenario(
        "A refund that fails after it was booked (payment matched by invoice number in metadata)",
        owner,
        charge,
        (
            _paid(ids, charge),
            Send(
                "refund pending",
                event(
                    "charge.refunded", charge_object(charge, [pending]), event_id=ids("evt"), created=t + 60
                ),
            ),
            Send(
                "refund failed", event("charge.refund.updated", failed, event_id=ids("evt"), created=t + 300)
            ),
        ),
    )


def _withdrawal(ids: _Ids, charge: DemoCharge, dispute_id: str, settled: int, created: int) -> dict[str, Any]:
    return balance_transaction(
        ids("txn"),
        amount=-settled,
        fee=DISPUTE_FEE,
        currency=SETTLEMENT_CURRENCY,
        created=created,
        source=dispute_id,
    )


def lost_dispute_out_of_order(ids: _Ids, number: str, t: int) -> Scenario:
    owner = Owner("order", number, "charge_id")
    charge = _charge(ids, owner, 4_500, "usd", t)
    dispute_id, due = ids("dp"), t + EVIDENCE_WINDOW_S
    withdrawn = [_withdrawal(ids, charge, dispute_id, 4_500, t + 3_600)]

    def snapshot(status: str) -> dict[str, Any]:
        return dispute_object(
            charge,
            dispute_id,
            status=status,
            balance_transactions=withdrawn,
            created=t + 3_600,
            evidence_due_by=due,
        )

    return Scenario(
        "A dispute that is lost, its webhooks arriving newest first",
        owner,
        charge,
        (
            _paid(ids, charge),
            Send(
                "dispute closed: lost (arrives first)",
                event("charge.dispute.closed", snapshot("lost"), event_id=ids("evt"), created=t + 7_200),
            ),
            Send(
                "funds withdrawn (arrives second)",
                event(
                    "charge.dispute.funds_withdrawn",
                    snapshot("needs_response"),
                    event_id=ids("evt"),
                    created=t + 3_601,
                ),
            ),
            Send(
                "dispute opened (arrives last)",
                event(
                    "charge.dispute.created",
                    snapshot("needs_response"),
                    event_id=ids("evt"),
                    created=t + 3_600,
                ),
            ),
        ),
    )


def won_dispute(ids: _Ids, number: str, t: int) -> Scenario:
    owner = Owner("invoice", number, "payment_intent")
    charge = _charge(ids, owner, 20_000, "gbp", t)
    dispute_id, due = ids("dp"), t + EVIDENCE_WINDOW_S
    # GBP 200.00 settles as USD 254.00 on the demo's USD account; the fee is charged in USD.
    withdrawal = _withdrawal(ids, charge, dispute_id, 25_400, t + 3_600)
    reinstatement = balance_transaction(
        ids("txn"),
        amount=25_400,
        fee=-DISPUTE_FEE,
        currency=SETTLEMENT_CURRENCY,
        created=t + 5_400,
        source=dispute_id,
    )

    def snapshot(status: str, txns: list[dict[str, Any]]) -> dict[str, Any]:
        return dispute_object(
            charge,
            dispute_id,
            status=status,
            balance_transactions=txns,
            created=t + 3_600,
            evidence_due_by=due,
        )

    return Scenario(
        "A dispute that is won: funds and fee come back (payment matched by payment intent)",
        owner,
        charge,
        (
            _paid(ids, charge),
            Send(
                "dispute opened, funds withdrawn",
                event(
                    "charge.dispute.created",
                    snapshot("needs_response", [withdrawal]),
                    event_id=ids("evt"),
                    created=t + 3_600,
                ),
            ),
            Send(
                "funds reinstated",
                event(
                    "charge.dispute.funds_reinstated",
                    snapshot("won", [withdrawal, reinstatement]),
                    event_id=ids("evt"),
                    created=t + 5_400,
                ),
            ),
            Send(
                "dispute closed: won",
                event(
                    "charge.dispute.closed",
                    snapshot("won", [withdrawal, reinstatement]),
                    event_id=ids("evt"),
                    created=t + 5_401,
                ),
            ),
        ),
    )


def build_story(tag: str, start: int) -> list[Scenario]:
    """The five scenarios of one demo run; ``tag`` makes every number and id unique to the run."""
    ids = _Ids(tag)
    return [
        partial_refunds(ids, f"DEMO-{tag}-1", start),
        dashboard_full_refund(ids, f"DEMO-{tag}-2", start + 10),
        failed_refund(ids, f"INV-DEMO-{tag}-3", start + 20),
        lost_dispute_out_of_order(ids, f"DEMO-{tag}-4", start + 30),
        won_dispute(ids, f"INV-DEMO-{tag}-5", start + 40),
    ]
