"""Hypothesis strategies for TRUE charge histories (tests.model) and the events Stripe sends for them.

A history is a few orders and invoices, each paid by one to three charges (in the owner's
currency), some created in the same second. Each charge is authorised and maybe captured (in
full or in part), left authorised, or expired; refunded in parts (refunds that stay pending,
succeed, fail later — sometimes days later — or wait on the customer and get canceled) and
disputed (inquiries, won, lost, appealed). The host app records some payments (by charge or
payment intent) and leaves others to be met through metadata; partial captures, authorisations
and expiries occur for both. ``render`` turns one charge's steps into the webhook events Stripe
would send, in the payload style of the endpoint's API version:

* ``old`` (before 2022-11-15): ``charge.refunded`` embeds ``charge.refunds`` with every refund
  so far; a later status change comes as ``charge.refund.updated``.
* ``new`` (2024-10-28 and later): no embedded refunds; ``refund.created`` / ``refund.updated`` /
  ``refund.failed`` for every refund, ``charge.refund.updated`` too, and ``charge.refunded`` as a
  checkpoint carrying only ``amount_refunded``.

An expiry is ``charge.expired`` (the charge uncaptured, its authorisation released as a refund
with reason ``expired_uncaptured_charge``), sometimes followed by the release's own events.
Each event's ``created`` is the second its step happened: steps of one charge, and of different
charges, often share a second, as on Stripe.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Literal

from hypothesis import strategies as st

from tests.model import (
    LIVE,
    RELEASE_REASON,
    Authorise,
    Capture,
    Charge,
    DisputeStep,
    Expire,
    RefundStep,
    Step,
    Txn,
)
from tests.stripe_events import fixture, make_event

T0 = 1_763_800_000  # a fixed second; only the differences between steps matter
EXPIRY_S = 7 * 86_400  # an uncaptured authorisation expires after 7 days
CURRENCIES = ("usd", "eur", "jpy", "kwd")  # two-, zero- and three-decimal
API_VERSIONS = {"old": "2020-08-27", "new": "2024-10-28.acacia"}
DISPUTE_FEE = 1500
LATE_FAILURE_S = 3 * 86_400  # a refund the bank turns down days after it was sent
# How an authorisation ends: captured at once, captured later in full or in part, still open, expired.
CAPTURES = ("auto", "manual", "partial", "auth_only", "expired")
REFUND_PATHS = (
    ("succeeded",),
    ("pending", "succeeded"),
    ("pending",),
    ("pending", "failed"),
    ("succeeded", "failed"),
    ("requires_action", "succeeded"),
    ("requires_action", "canceled"),
)
# Dispute paths; a history takes a prefix of one. Status changes of one dispute are at least a
# second apart: an appeal re-opens a closed dispute, so no lifecycle rank can order a tie there.
DISPUTE_PATHS = (
    ("warning_needs_response", "warning_under_review", "warning_closed"),
    ("needs_response", "under_review", "won"),
    ("needs_response", "under_review", "lost"),
    ("needs_response", "under_review", "lost", "appeal_needs_response", "appeal_under_review", "won"),
    ("needs_response", "under_review", "lost", "appeal_needs_response", "appeal_under_review", "lost"),
)
CLOSING = frozenset({"won", "lost", "warning_closed"})


def _merge(threads: list[list[Step]], draw: Any) -> list[Step]:
    """Interleave independent step threads by time; same-second steps in a drawn thread order."""
    priority = draw(st.permutations(range(len(threads)))) if threads else []
    keyed = [
        (step.at, priority[t], i, step) for t, thread in enumerate(threads) for i, step in enumerate(thread)
    ]
    return [step for *_, step in sorted(keyed, key=lambda k: k[:3])]


@st.composite
def _refund_threads(draw: Any, n: int, captured: int, start: int) -> list[list[Step]]:
    threads: list[list[Step]] = []
    budget = captured
    for i in range(draw(st.integers(0, 3))):
        if budget == 0:
            break
        amount = budget if draw(st.booleans()) else draw(st.integers(1, budget))
        budget -= amount
        at = start + draw(st.integers(0, 3))
        thread: list[Step] = []
        for status in draw(st.sampled_from(REFUND_PATHS)):
            if status == "failed" and draw(st.booleans()):
                at += LATE_FAILURE_S  # the bank turns it down days later: another reporting day
            thread.append(RefundStep(at, f"re_{n}r{i}", amount, status, "requested_by_customer"))
            at += draw(st.integers(0, 2))
        threads.append(thread)
    return threads


@st.composite
def _dispute_thread(draw: Any, n: int, currency: str, amount: int, start: int) -> list[Step]:
    path = draw(st.sampled_from(DISPUTE_PATHS))
    path = path[: draw(st.integers(1, len(path)))]
    settlement = draw(st.sampled_from(sorted({"usd", currency})))
    fee_returned = draw(st.booleans())
    at = start + draw(st.integers(0, 3))
    thread: list[Step] = []
    for i, status in enumerate(path):
        txns: tuple[Txn, ...] = ()
        action: Literal["created", "updated", "closed"]
        if i == 0:
            action = "created"
            if status == "needs_response":
                txns = (Txn(f"txn_{n}dw", -amount, settlement, DISPUTE_FEE),)
        elif status in CLOSING:
            action = "closed"
            if status == "won":
                txns = (Txn(f"txn_{n}dr", amount, settlement, -DISPUTE_FEE if fee_returned else 0),)
        else:
            action = "updated"
        thread.append(DisputeStep(at, action, status, txns))
        at += draw(st.integers(1, 2))
    return thread


@dataclass(frozen=True)
class Owner:
    """What the charges of one order or invoice share."""

    kind: Literal["order", "invoice"]
    number: str
    currency: str
    rejected: bool


def _capture_steps(draw: Any, n: int, amount: int, at: int, capture: str) -> tuple[list[Step], int, int]:
    """The authorisation and what became of it: (steps, amount captured, second of the last step)."""
    steps: list[Step] = [Authorise(at, captured=capture == "auto")]
    captured = amount if capture == "auto" else 0
    if capture in ("manual", "partial"):
        at += draw(st.integers(0, 2))
        captured = amount if capture == "manual" else draw(st.integers(1, amount - 1))
        steps.append(Capture(at, captured))
    elif capture == "expired":
        steps.append(Expire(at + EXPIRY_S, f"re_{n}x", announce_release=draw(st.booleans())))
    return steps, captured, at


@st.composite
def charges(draw: Any, n: int, base: int, owner: Owner) -> Charge:
    """One charge's true history; ``n`` makes its ids unique within a scenario."""
    amount = draw(st.integers(10, 400)) * 100
    recorded = draw(st.sampled_from(("charge", "payment_intent", "metadata")))
    capture = draw(st.sampled_from(CAPTURES))
    steps, captured, at = _capture_steps(draw, n, amount, base + draw(st.integers(0, 2)), capture)
    threads = draw(_refund_threads(n, captured, at)) if captured else []
    if captured and draw(st.integers(0, 2)) == 0:
        threads.append(draw(_dispute_thread(n, owner.currency, captured, at)))
    steps += _merge(threads, draw)
    return Charge(
        id=f"ch_3Test{n:04d}",
        payment_intent=f"pi_3Test{n:04d}",
        currency=owner.currency,
        amount=amount,
        recorded=recorded,
        owner=owner.kind,
        number=owner.number,
        rejected=owner.rejected,
        card_present=draw(st.booleans()),
        era=draw(st.sampled_from(("old", "new"))),
        # Endpoints may not subscribe to charge.succeeded; a host payment then meets its first
        # event later (every later step emits one).
        announce_succeeded=recorded == "metadata" or len(steps) == 1 or draw(st.integers(0, 3)) > 0,
        dispute_id=f"dp_3Test{n:04d}",
        dispute_reason=draw(st.sampled_from(("fraudulent", "product_not_received", "general"))),
        dispute_amount=captured,
        steps=tuple(steps),
    )


@st.composite
def owners(draw: Any, k: int, base: int) -> list[Charge]:
    """Order or invoice ``k`` and the one to three charges that pay it."""
    kind = draw(st.sampled_from(("order", "invoice")))
    owner = Owner(
        kind=kind,
        number=f"{'ORD' if kind == 'order' else 'INV'}-{k:04d}",
        currency=draw(st.sampled_from(CURRENCIES)),
        rejected=kind == "order" and draw(st.integers(0, 4)) == 0,
    )
    count = draw(st.sampled_from((1, 1, 2, 2, 3)))
    return [draw(charges(k * 10 + j, base + draw(st.integers(0, 2)), owner)) for j in range(count)]


@st.composite
def histories(draw: Any, max_owners: int = 3) -> list[Charge]:
    """Several orders and invoices; their first seconds overlap so that events of different
    charges (of one owner and of different owners) tie."""
    count = draw(st.integers(1, max_owners))
    return [charge for k in range(count) for charge in draw(owners(k, T0))]


@st.composite
def deliveries(draw: Any, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events in a drawn order, some of them delivered twice (Stripe is at least once)."""
    order = list(draw(st.permutations(events)))
    for again in draw(st.lists(st.sampled_from(events), max_size=max(1, len(events) // 3))) if events else []:
        order.insert(draw(st.integers(0, len(order))), again)
    return order


# --- rendering -----------------------------------------------------------------------------------

_event_numbers = itertools.count(1)


class _Render:
    """Replays one charge's steps, keeping Stripe's view of its objects, and emits events."""

    def __init__(self, charge: Charge, run_tag: str) -> None:
        self.charge = charge
        self.run_tag = run_tag
        self.captured = False
        self.amount_captured = 0
        self.created = 0
        self.refunds: dict[str, dict[str, Any]] = {}
        self.dispute: dict[str, Any] | None = None
        self.events: list[dict[str, Any]] = []

    def emit(self, event_type: str, obj: dict[str, Any], at: int) -> None:
        event_id = f"evt_{self.run_tag}{next(_event_numbers):07d}"
        version = API_VERSIONS[self.charge.era]
        self.events.append(make_event(event_type, obj, created=at, event_id=event_id, api_version=version))

    # Stripe objects as they stand after the steps replayed so far.

    def charge_object(self) -> dict[str, Any]:
        c = self.charge
        obj = fixture("charge")
        live = sum(r["amount"] for r in self.refunds.values() if r["status"] in LIVE)
        # Stripe counts the uncaptured remainder of a partial capture in amount_refunded.
        amount_refunded = live + (c.amount - self.amount_captured if self.captured else 0)
        email = f"buyer{c.number.lower()}@example.com"
        obj.update(
            id=c.id,
            amount=c.amount,
            amount_captured=self.amount_captured,
            amount_refunded=amount_refunded,
            captured=self.captured,
            refunded=amount_refunded >= c.amount,
            currency=c.currency,
            created=self.created,
            disputed=self.dispute is not None,
            payment_intent=c.payment_intent,
            balance_transaction=f"txn_{c.id}",
            receipt_email=email,
            metadata={f"{c.owner}_number": c.number} if c.recorded == "metadata" else {},
        )
        obj["billing_details"]["email"] = email
        if c.card_present:
            card = obj["payment_method_details"].pop("card")
            obj["payment_method_details"] = {"type": "card_present", "card_present": card}
        if c.era == "old":
            refunds = [self.refund_object(r) for r in reversed(self.refunds.values())]
            obj["refunds"] = {
                "object": "list",
                "data": refunds,
                "has_more": False,
                "total_count": len(refunds),
                "url": f"/v1/charges/{c.id}/refunds",
            }
        else:
            del obj["refunds"]
        return obj

    def refund_object(self, refund: dict[str, Any]) -> dict[str, Any]:
        obj = fixture("refund")
        obj.update(
            refund,
            charge=self.charge.id,
            payment_intent=self.charge.payment_intent,
            currency=self.charge.currency,
            balance_transaction=f"txn_{refund['id']}",
        )
        if refund["status"] == "failed":
            obj["failure_reason"] = "lost_or_stolen_card"
        return obj

    def dispute_object(self) -> dict[str, Any]:
        assert self.dispute is not None
        obj = fixture("dispute")
        obj.update(self.dispute)
        obj["balance_transactions"] = [dict(t) for t in self.dispute["balance_transactions"]]
        obj["evidence_details"]["due_by"] = self.dispute["created"] + 7 * 86_400
        return obj

    # One method per kind of step.

    def authorise(self, step: Authorise) -> None:
        self.created = step.at
        self.captured = step.captured
        self.amount_captured = self.charge.amount if step.captured else 0
        if self.charge.announce_succeeded:
            self.emit("charge.succeeded", self.charge_object(), step.at)

    def capture(self, step: Capture) -> None:
        self.captured, self.amount_captured = True, step.amount
        self.emit("charge.captured", self.charge_object(), step.at)

    def expire(self, step: Expire) -> None:
        """Stripe releases the authorisation (a refund of the whole amount with reason
        expired_uncaptured_charge, counted in amount_refunded) and sends charge.expired."""
        release = {
            "id": step.release_id,
            "amount": self.charge.amount,
            "status": "succeeded",
            "reason": RELEASE_REASON,
            "created": step.at,
        }
        self.refunds[step.release_id] = release
        self.emit("charge.expired", self.charge_object(), step.at)
        if step.announce_release:
            if self.charge.era == "new":
                self.emit("refund.created", self.refund_object(release), step.at)
            self.emit("charge.refunded", self.charge_object(), step.at)

    def refund(self, step: RefundStep) -> None:
        before = self.refunds.get(step.refund_id)
        refund = {
            "id": step.refund_id,
            "amount": step.amount,
            "status": step.status,
            "reason": step.reason,
            "created": before["created"] if before else step.at,
        }
        self.refunds[step.refund_id] = refund
        new_era = self.charge.era == "new"
        if before is None:
            if new_era:
                self.emit("refund.created", self.refund_object(refund), step.at)
        else:
            if new_era:
                self.emit("refund.updated", self.refund_object(refund), step.at)
                if step.status == "failed":
                    self.emit("refund.failed", self.refund_object(refund), step.at)
            self.emit("charge.refund.updated", self.refund_object(refund), step.at)
        # amount_refunded moved up: Stripe announces the charge as refunded (again).
        if step.status in LIVE and (before is None or before["status"] not in LIVE):
            self.emit("charge.refunded", self.charge_object(), step.at)

    def dispute_step(self, step: DisputeStep) -> None:
        c = self.charge
        if self.dispute is None:
            self.dispute = {
                "id": c.dispute_id,
                "amount": c.dispute_amount,
                "currency": c.currency,
                "charge": c.id,
                "payment_intent": c.payment_intent,
                "created": step.at,
                "reason": c.dispute_reason,
                "balance_transactions": [],
                "is_charge_refundable": False,
            }
        self.dispute["status"] = step.status
        for txn in step.new_txns:
            self.dispute["balance_transactions"].append(_txn_object(txn, c.dispute_id, step.at))
        self.emit(f"charge.dispute.{step.action}", self.dispute_object(), step.at)
        if step.new_txns:
            follow = "funds_withdrawn" if step.new_txns[0].amount < 0 else "funds_reinstated"
            self.emit(f"charge.dispute.{follow}", self.dispute_object(), step.at)


def _txn_object(txn: Txn, dispute_id: str, at: int) -> dict[str, Any]:
    obj = fixture("balance_transaction")
    obj.update(
        id=txn.id,
        amount=txn.amount,
        currency=txn.currency,
        fee=txn.fee,
        net=txn.amount - txn.fee,
        created=at,
        available_on=at,
        source=dispute_id,
        type="adjustment",
        reporting_category="dispute" if txn.amount < 0 else "dispute_reversal",
        description="Chargeback withdrawal" if txn.amount < 0 else "Chargeback reversal",
        fee_details=[
            {
                "amount": txn.fee,
                "currency": txn.currency,
                "type": "stripe_fee",
                "description": "Dispute fee",
                "application": None,
            }
        ]
        if txn.fee
        else [],
    )
    return obj


def render(charge: Charge, run_tag: str = "t") -> list[dict[str, Any]]:
    """The webhook events Stripe sends for one charge's history, in the charge's API era."""
    r = _Render(charge, run_tag)
    for step in charge.steps:
        if isinstance(step, Authorise):
            r.authorise(step)
        elif isinstance(step, Capture):
            r.capture(step)
        elif isinstance(step, Expire):
            r.expire(step)
        elif isinstance(step, RefundStep):
            r.refund(step)
        else:
            r.dispute_step(step)
    return r.events


def render_all(history: list[Charge], run_tag: str = "t") -> list[dict[str, Any]]:
    return [event for charge in history for event in render(charge, run_tag)]
