"""The oracle: the reconciliation rules as plain Python over the TRUE history of some charges.

A history says what happened at Stripe, step by step (authorised, captured, refund created or
moved to a status, dispute opened/moved/closed with the balance transactions it carried). The
model replays those steps — never the events — and says what the finance views must show at
the end, whatever order and duplicates the events arrived in (rule 3).

Where the contract lets the final rows depend on delivery order, the model says so instead of
guessing: a refund that ends failed or canceled nets to zero either as no rows at all (its failure
was known before any live snapshot was applied) or as a `refund` plus a `refund_reversal` (rule 4).
Where the contract is silent the model takes what a payments engineer expects and says so: an
authorisation that was never captured (still open, or expired and released) took no money, so its
payment stays `pending` and its order `pending` / invoice `unpaid` (rule 5 only speaks of money
that was taken). An expected value of None means "not compared".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

LIVE = frozenset({"pending", "succeeded"})  # a refund in these has moved money (rule 4)
ENDED = frozenset({"failed", "canceled"})
DISPUTE_CLOSED = frozenset({"won", "lost", "warning_closed", "prevented"})
RELEASE_REASON = "expired_uncaptured_charge"


@dataclass(frozen=True)
class Txn:
    """A dispute's balance transaction, in the settlement currency."""

    id: str
    amount: int
    currency: str
    fee: int


@dataclass(frozen=True)
class Authorise:
    at: int
    captured: bool  # automatic capture: the authorisation is captured at once


@dataclass(frozen=True)
class Capture:
    at: int
    amount: int  # amount_captured; less than the charge amount for a partial capture


@dataclass(frozen=True)
class RefundStep:
    """The refund exists from its first step; each later step moves it to ``status``."""

    at: int
    refund_id: str
    amount: int
    status: str
    reason: str | None = None


@dataclass(frozen=True)
class DisputeStep:
    at: int
    action: Literal["created", "updated", "closed"]
    status: str
    new_txns: tuple[Txn, ...] = ()


Step = Authorise | Capture | RefundStep | DisputeStep


@dataclass(frozen=True)
class Charge:
    id: str
    payment_intent: str
    currency: str
    amount: int
    recorded: Literal["charge", "payment_intent", "metadata"]  # how the payment is matched (host tables)
    owner: Literal["order", "invoice"]
    number: str
    rejected: bool  # the host app rejected the order before any event
    card_present: bool
    era: Literal["old", "new"]  # payload style of the endpoint that delivers its events
    announce_succeeded: bool  # whether charge.succeeded is delivered at all
    dispute_id: str
    dispute_reason: str
    dispute_amount: int  # in the charge's currency; used only if the steps open a dispute
    steps: tuple[Step, ...]

    @property
    def host_recorded(self) -> bool:
        return self.recorded != "metadata"


Row = tuple[str, int, str, str, str]  # (kind, amount, currency, stripe_object_id, stripe_charge_id)


@dataclass(frozen=True)
class Balance:
    """Expected finance.payment_balances columns; None means "not compared", except for
    dispute_status, where None is the null of a charge never disputed."""

    currency: str
    amount: int | None  # the captured amount once Stripe showed it, else the host's amount
    amount_refunded: int
    refundable_amount: int | None
    net_amount: int  # every ledger row of the payment in its own currency (a fee settled elsewhere is not)
    status: str | None
    disputed: bool
    dispute_status: str | None


@dataclass
class Expected:
    ledger: Counter[Row]  # rows that must be there, exactly this many times
    either: list[tuple[Row, Row]]  # refund + reversal pairs: both present or both absent
    balances: dict[str, Balance]  # by charge id
    statuses: dict[str, str | None]  # order/invoice number -> status / payment_link_status
    disputed: dict[str, bool]  # order/invoice number -> disputed
    refund_failed: set[str] = field(default_factory=set)  # refund ids that end failed (rule 4's exception)


@dataclass
class _Truth:
    amount_captured: int = 0
    refunds: dict[str, list[RefundStep]] | None = None
    dispute_status: str | None = None
    txns: tuple[Txn, ...] = ()


def replay(charge: Charge) -> _Truth:
    truth = _Truth(refunds={})
    assert truth.refunds is not None
    for step in charge.steps:
        if isinstance(step, Authorise) and step.captured:
            truth.amount_captured = charge.amount
        elif isinstance(step, Capture):
            truth.amount_captured = step.amount
        elif isinstance(step, RefundStep):
            truth.refunds.setdefault(step.refund_id, []).append(step)
        elif isinstance(step, DisputeStep):
            truth.dispute_status = step.status
            truth.txns += step.new_txns
    return truth


def money_status(net_refunded: int, captured: int) -> str:
    """Rule 5: 0 → paid, between → partially_refunded, ≥ captured → refunded."""
    if net_refunded == 0:
        return "paid"
    return "refunded" if net_refunded >= captured else "partially_refunded"


def expected(charges: list[Charge]) -> Expected:
    out = Expected(Counter(), [], {}, {}, {})
    for charge in charges:
        _expect_charge(charge, out)
    return out


def _expect_charge(charge: Charge, out: Expected) -> None:
    truth = replay(charge)
    cur, ch = charge.currency, charge.id
    # Rule 7: the host's payment gets its amount from the first event; a metadata payment gets
    # amount_captured once an event shows it captured (an authorisation alone books nothing).
    charge_amount = charge.amount if charge.host_recorded else truth.amount_captured
    if charge_amount:
        out.ledger[("charge", charge_amount, cur, ch, ch)] += 1
    net_refunded = 0
    assert truth.refunds is not None
    for refund_id, steps in truth.refunds.items():
        if steps[0].reason == RELEASE_REASON:
            continue  # a release is not money back (rule 4)
        amount, statuses = steps[0].amount, [s.status for s in steps]
        if statuses[-1] == "failed":
            out.refund_failed.add(refund_id)  # raised in any delivery order, booked or not
        if not LIVE & set(statuses):
            continue  # never moved money: nothing to book or reverse
        booked: Row = ("refund", -amount, cur, refund_id, ch)
        if statuses[-1] in ENDED:
            out.either.append((booked, ("refund_reversal", amount, cur, refund_id, ch)))
        else:
            out.ledger[booked] += 1
            net_refunded += amount
    for txn in truth.txns:
        # Rule 6: the dispute's amount in the dispute's currency, whatever the settlement currency.
        if txn.amount < 0:
            out.ledger[("dispute_withdrawal", -charge.dispute_amount, cur, charge.dispute_id, ch)] += 1
        else:
            out.ledger[("dispute_reinstatement", charge.dispute_amount, cur, charge.dispute_id, ch)] += 1
        if txn.fee:
            out.ledger[("dispute_fee", -txn.fee, txn.currency, charge.dispute_id, ch)] += 1
    captured = truth.amount_captured or (charge.amount if charge.host_recorded else 0)
    disputed = truth.dispute_status is not None and truth.dispute_status not in DISPUTE_CLOSED
    lost = truth.dispute_status == "lost"
    # Rule 5: a lost dispute makes the payment charged back, whatever was refunded.
    status = _payment_status(truth, captured, net_refunded)
    # Section 6: what Stripe would refund now is nothing while a dispute is open or after one was lost.
    refundable = 0 if disputed or lost else max(captured - net_refunded, 0)
    out.balances[ch] = Balance(
        currency=cur,
        amount=captured or None,
        amount_refunded=net_refunded,
        refundable_amount=refundable if captured else None,
        net_amount=sum(n * row[1] for row, n in out.ledger.items() if row[4] == ch and row[2] == cur),
        status=status,
        disputed=disputed,
        dispute_status=truth.dispute_status,
    )
    unpaid = "pending" if charge.owner == "order" else "unpaid"
    owner_status = unpaid if status == "pending" else status
    out.statuses[charge.number] = "rejected" if charge.rejected else owner_status
    out.disputed[charge.number] = disputed


def _payment_status(truth: _Truth, captured: int, net_refunded: int) -> str:
    """Rule 5 for one payment: charged back after a lost dispute; voided when the authorisation was
    released with nothing captured; else the money rule; pending while nothing moved."""
    if truth.dispute_status == "lost" and captured:
        return "charged_back"
    if captured:
        return money_status(net_refunded, captured)
    assert truth.refunds is not None
    released = any(steps[0].reason == RELEASE_REASON for steps in truth.refunds.values())
    return "voided" if released else "pending"


def ledger_differences(exp: Expected, rows: list[Row]) -> list[str]:
    """What is wrong with the actual ledger rows, in words; empty when they fit the model."""
    extra = Counter(rows)
    problems = []
    for row, n in exp.ledger.items():
        if extra[row] != n:
            problems.append(f"expected {n}x {row}, found {extra[row]}x")
        extra[row] -= min(n, extra[row])
    for booked, reversal in exp.either:
        b, r = extra[booked], extra[reversal]
        if (b, r) not in ((0, 0), (1, 1)):
            problems.append(f"refund that ends failed must net to zero once: {b}x {booked}, {r}x {reversal}")
        extra[booked] -= min(b, 1)
        extra[reversal] -= min(r, 1)
    problems += [f"unexpected {n}x {row}" for row, n in extra.items() if n > 0]
    return problems
