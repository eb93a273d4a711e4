"""The oracle: the reconciliation rules as plain Python over the TRUE history of some charges.

A history says what happened at Stripe, step by step (authorised, captured in full or in part,
expired, refund created or moved to a status, dispute opened/moved/closed with the balance
transactions it carried). The model replays those steps — never the events — and says what the
finance views must show at the end, whatever order and duplicates the events arrived in (rule 3).

Several charges may pay one order or invoice (the charges share its ``number``): the owner's
status and ``disputed`` come from all of them (rule 5), and finance.order_balances /
finance.invoice_balances sum them (section 6).

Where the contract lets the final rows depend on delivery order, the model says so instead of
guessing: a refund that ends failed or canceled nets to zero either as no rows at all (its failure
was known before any live snapshot was applied) or as a `refund` plus a `refund_reversal` (rule 4);
a `capture_adjustment` is dated by whichever event first showed the capture, so any second from
the capture to the charge's last step will do (rule 7). Where the contract is silent the model
takes what a payments engineer expects and says so: an authorisation the worker met only through
metadata and that was never captured took no money, so its payment stays `pending`, and its
refundable amount is 0. An expected value of None means "not compared".
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Literal

LIVE = frozenset({"pending", "succeeded"})  # a refund in these has moved money (rule 4)
ENDED = frozenset({"failed", "canceled"})
DISPUTE_CLOSED = frozenset({"won", "lost", "warning_closed", "prevented"})
RELEASE_REASON = "expired_uncaptured_charge"
UNMOVED = frozenset({"pending", "voided"})  # payment statuses of payments that moved no money


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
class Expire:
    """The authorisation expired uncaptured: Stripe releases it (a refund with reason
    ``expired_uncaptured_charge``, id ``release_id``) and sends ``charge.expired``."""

    at: int
    release_id: str
    announce_release: bool  # the release is also announced (refund.created / charge.refunded)


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


Step = Authorise | Capture | Expire | RefundStep | DisputeStep


@dataclass(frozen=True)
class Charge:
    id: str
    payment_intent: str
    currency: str  # also its owner's: every payment of an order or invoice is in its currency
    amount: int
    recorded: Literal["charge", "payment_intent", "metadata"]  # how the payment is matched (host tables)
    owner: Literal["order", "invoice"]
    number: str  # the order's or invoice's number; several charges may share it
    rejected: bool  # the host app rejected the order before any event (the same on each of its charges)
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
    refundable_amount: int
    net_amount: int  # every ledger row of the payment in its own currency (a fee settled elsewhere is not)
    status: str
    disputed: bool
    dispute_status: str | None


@dataclass(frozen=True)
class OwnerBalance:
    """Expected finance.order_balances / finance.invoice_balances columns (section 6)."""

    currency: str
    amount_total: int
    captured: int  # what all its payments' charge and capture_adjustment rows add up to
    refunded: int  # live refunds booked, net of reversals, over all its payments
    refundable_now: int
    net_amount: int
    balance_due: int
    status: str
    disputed: bool


@dataclass(frozen=True)
class Dated:
    """A row whose ``occurred_at`` the contract fixes: Unix seconds within [earliest, latest]."""

    kind: str
    stripe_object_id: str
    earliest: int
    latest: int
    why: str


@dataclass
class Expected:
    ledger: Counter[Row]  # rows that must be there, exactly this many times
    either: list[tuple[Row, Row]]  # refund + reversal pairs: both present or both absent
    balances: dict[str, Balance]  # by charge id
    owners: dict[str, OwnerBalance] = field(default_factory=dict)  # by order/invoice number
    dated: list[Dated] = field(default_factory=list)
    refund_failed: list[str] = field(default_factory=list)  # one refund_failed per refund that ends failed
    refund_statuses: dict[str, str] = field(default_factory=dict)  # non-release refund id -> final status

    @property
    def statuses(self) -> dict[str, str]:
        return {number: owner.status for number, owner in self.owners.items()}

    @property
    def disputed(self) -> dict[str, bool]:
        return {number: owner.disputed for number, owner in self.owners.items()}


@dataclass
class _Truth:
    amount_captured: int = 0
    captured_at: int | None = None  # when Stripe first showed the (final) captured amount
    expired_at: int | None = None
    last_at: int = 0
    refunds: dict[str, list[RefundStep]] = field(default_factory=dict)
    dispute_status: str | None = None
    txns: tuple[Txn, ...] = ()

    @property
    def captured_known(self) -> int | None:
        """Rule 7's captured amount: shown by a capture, 0 after an expiry, else unknown."""
        if self.captured_at is not None:
            return self.amount_captured
        return 0 if self.expired_at is not None else None


def replay(charge: Charge) -> _Truth:
    truth = _Truth()
    for step in charge.steps:
        truth.last_at = max(truth.last_at, step.at)
        if isinstance(step, Authorise) and step.captured:
            truth.amount_captured, truth.captured_at = charge.amount, step.at
        elif isinstance(step, Capture):
            truth.amount_captured, truth.captured_at = step.amount, step.at
        elif isinstance(step, Expire):
            truth.expired_at = step.at
        elif isinstance(step, RefundStep):
            truth.refunds.setdefault(step.refund_id, []).append(step)
        elif isinstance(step, DisputeStep):
            truth.dispute_status = step.status
            truth.txns += step.new_txns
    return truth


def money_status(net_refunded: int, captured: int) -> str:
    """Rule 5: 0 → paid, between → partially_refunded, ≥ captured → refunded."""
    if net_refunded <= 0:
        return "paid"
    return "refunded" if net_refunded >= captured else "partially_refunded"


@dataclass
class _Payment:
    """What the model knows of one payment, for its owner's sums."""

    status: str
    charge_total: int
    refunded: int
    refundable: int
    net_amount: int
    disputed: bool


def expected(charges: list[Charge]) -> Expected:
    out = Expected(Counter(), [], {})
    by_owner: dict[str, list[tuple[Charge, _Payment]]] = defaultdict(list)
    for charge in charges:
        by_owner[charge.number].append((charge, _expect_charge(charge, out)))
    for number, payments in by_owner.items():
        out.owners[number] = _expect_owner([c for c, _ in payments], [p for _, p in payments])
    return out


def _charge_rows(charge: Charge, truth: _Truth, out: Expected) -> int:
    """Rule 7: the charge row (and the adjustment to the captured amount); returns their total.

    The host's payment gets its amount from the first event; once Stripe shows what was captured
    (or that the authorisation expired), one capture_adjustment brings the rows to that. A metadata
    payment gets amount_captured once an event shows it captured (an authorisation alone books
    nothing)."""
    cur, ch = charge.currency, charge.id
    known = truth.captured_known
    charge_amount = charge.amount if charge.host_recorded else truth.amount_captured
    if not charge_amount:
        return 0
    out.ledger[("charge", charge_amount, cur, ch, ch)] += 1
    if known is None or known == charge_amount:
        return charge_amount
    out.ledger[("capture_adjustment", known - charge_amount, cur, ch, ch)] += 1
    shown_at = truth.captured_at if truth.captured_at is not None else truth.expired_at
    assert shown_at is not None
    why = "the created of an event that showed the capture or the expiry (rule 7)"
    out.dated.append(Dated("capture_adjustment", ch, shown_at, truth.last_at, why))
    return known


def _refund_rows(charge: Charge, truth: _Truth, out: Expected) -> int:
    """Rule 4: each refund that moved money booked once, a failed one netting to zero; returns
    the net refunded."""
    cur, ch = charge.currency, charge.id
    net_refunded = 0
    for refund_id, steps in truth.refunds.items():
        if steps[0].reason == RELEASE_REASON:
            continue  # a release is not money back (rule 4)
        amount, statuses = steps[0].amount, [s.status for s in steps]
        out.refund_statuses[refund_id] = statuses[-1]
        if statuses[-1] == "failed":
            out.refund_failed.append(refund_id)  # raised once, in any delivery order, booked or not
        if not LIVE & set(statuses):
            continue  # never moved money: nothing to book or reverse
        booked: Row = ("refund", -amount, cur, refund_id, ch)
        if statuses[-1] in ENDED:
            out.either.append((booked, ("refund_reversal", amount, cur, refund_id, ch)))
            ended_at = next(s.at for s in steps if s.status in ENDED)
            why = "the created of the event that first showed the refund failed (rule 4)"
            out.dated.append(Dated("refund_reversal", refund_id, ended_at, ended_at, why))
        else:
            out.ledger[booked] += 1
            net_refunded += amount
    return net_refunded


def _dispute_rows(charge: Charge, truth: _Truth, out: Expected) -> None:
    cur, ch = charge.currency, charge.id
    for txn in truth.txns:
        # Rule 6: the dispute's amount in the dispute's currency, whatever the settlement currency.
        if txn.amount < 0:
            out.ledger[("dispute_withdrawal", -charge.dispute_amount, cur, charge.dispute_id, ch)] += 1
        else:
            out.ledger[("dispute_reinstatement", charge.dispute_amount, cur, charge.dispute_id, ch)] += 1
        if txn.fee:
            out.ledger[("dispute_fee", -txn.fee, txn.currency, charge.dispute_id, ch)] += 1


def _expect_charge(charge: Charge, out: Expected) -> _Payment:
    truth = replay(charge)
    cur, ch = charge.currency, charge.id
    charge_total = _charge_rows(charge, truth, out)
    net_refunded = _refund_rows(charge, truth, out)
    _dispute_rows(charge, truth, out)
    known = truth.captured_known
    # What refunds are measured against: the captured amount once shown, else the host's amount.
    captured = known if known is not None else charge_total
    disputed = truth.dispute_status is not None and truth.dispute_status not in DISPUTE_CLOSED
    lost = truth.dispute_status == "lost"
    status = _payment_status(truth, charge_total, captured, net_refunded)
    # Section 6: what Stripe would refund now is nothing while a dispute is open, after one was
    # lost, or while no money was taken.
    refundable = 0 if disputed or lost or status in UNMOVED else max(captured - net_refunded, 0)
    net_amount = sum(n * row[1] for row, n in out.ledger.items() if row[4] == ch and row[2] == cur)
    out.balances[ch] = Balance(
        currency=cur,
        # An authorisation met only through metadata and never captured or expired: nothing known.
        amount=None if known is None and not charge.host_recorded else captured,
        amount_refunded=net_refunded,
        refundable_amount=refundable,
        net_amount=net_amount,
        status=status,
        disputed=disputed,
        dispute_status=truth.dispute_status,
    )
    return _Payment(status, charge_total, net_refunded, refundable, net_amount, disputed)


def _payment_status(truth: _Truth, charge_total: int, captured: int, net_refunded: int) -> str:
    """Rule 5 for one payment: charged back after a lost dispute; voided when the authorisation
    ended with nothing captured; pending while no charge row exists; else the money rule."""
    if truth.dispute_status == "lost":
        return "charged_back"
    if truth.captured_known == 0:
        return "voided"
    if not charge_total:
        return "pending"
    return money_status(net_refunded, captured)


def owner_status(statuses: list[str], captured: int, refunded: int) -> str:
    """Rule 5 for an order (an invoice says `unpaid` for `pending`): charged back if any payment
    is; voided when every payment is; pending while none moved money; else the money rule over
    the sums of the payments that moved money."""
    if "charged_back" in statuses:
        return "charged_back"
    if statuses and all(s == "voided" for s in statuses):
        return "voided"
    if all(s in UNMOVED for s in statuses):
        return "pending"
    return money_status(refunded, captured)


def _expect_owner(charges: list[Charge], payments: list[_Payment]) -> OwnerBalance:
    first = charges[0]
    moved = [p for p in payments if p.status not in UNMOVED]
    status = owner_status(
        [p.status for p in payments], sum(p.charge_total for p in moved), sum(p.refunded for p in moved)
    )
    if first.owner == "invoice" and status == "pending":
        status = "unpaid"
    if first.rejected:
        status = "rejected"  # rejected orders stay rejected
    amount_total = sum(c.amount for c in charges)
    captured = sum(p.charge_total for p in payments)
    refunded = sum(p.refunded for p in payments)
    return OwnerBalance(
        currency=first.currency,
        amount_total=amount_total,
        captured=captured,
        refunded=refunded,
        refundable_now=sum(p.refundable for p in payments),
        net_amount=sum(p.net_amount for p in payments),
        balance_due=amount_total - (captured - refunded),
        status=status,
        disputed=any(p.disputed for p in payments),
    )


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


def date_differences(exp: Expected, occurred: dict[tuple[str, str], list[int]]) -> list[str]:
    """Rows whose occurred_at (Unix seconds, by (kind, stripe_object_id)) the contract fixes and
    that have another date."""
    problems = []
    for d in exp.dated:
        for at in occurred.get((d.kind, d.stripe_object_id), []):
            if not d.earliest <= at <= d.latest:
                problems.append(
                    f"{d.kind} {d.stripe_object_id} occurred_at {at}, expected within"
                    f" [{d.earliest}, {d.latest}]: {d.why}"
                )
    return problems
