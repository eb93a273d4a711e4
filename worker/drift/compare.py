"""What the ledger says of one charge against what Stripe says of it now (rule 14). Pure.

Compared, settled facts only:

* the captured amount (the payment's ``charge`` + ``capture_adjustment`` rows) — not while the
  authorisation is still open (uncaptured, not released);
* each refund: whether it is live (booked and not reversed, against Stripe's ``pending`` /
  ``succeeded``) and, when both are live, its amount. ``pending`` against ``succeeded`` is not
  drift (both moved the money), and a refund in ``requires_action`` is not settled yet. Releases
  of an authorisation (``expired_uncaptured_charge``) are not refunds and are skipped;
* each dispute: its status, and the balance transactions booked for it (withdrawals and
  reinstatements, by transaction id).

One ``Difference`` per object (the charge, a refund, a dispute): that is one ``drift`` exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LIVE = frozenset({"pending", "succeeded"})
UNSETTLED = frozenset({"requires_action"})
RELEASE_REASON = "expired_uncaptured_charge"


@dataclass(frozen=True, slots=True)
class Difference:
    charge_id: str
    object_id: str  # the charge, refund or dispute the exception is raised on
    field: str  # captured, refund, refund_amount, dispute_status, dispute_balance_transactions, …
    ours: Any
    stripe: Any

    def detail(self) -> dict[str, Any]:
        return {"charge": self.charge_id, "field": self.field, "ours": self.ours, "stripe": self.stripe}


@dataclass(frozen=True, slots=True)
class OurRefund:
    amount: int
    status: str
    live: bool  # a refund row booked and no refund_reversal


@dataclass(frozen=True, slots=True)
class OurDispute:
    status: str
    balance_transactions: frozenset[str]  # txn ids of its withdrawals and reinstatements


@dataclass(slots=True)
class OurCharge:
    """The ledger's side of one charge."""

    charge_id: str
    captured: int  # what its charge and capture_adjustment rows add up to (0 before any)
    refunds: dict[str, OurRefund] = field(default_factory=dict)
    disputes: dict[str, OurDispute] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StripeCharge:
    """Stripe's side of one charge: the charge, every refund, every dispute, as the API returned them."""

    charge: dict[str, Any]
    refunds: list[dict[str, Any]]
    disputes: list[dict[str, Any]]


def _captured(charge: dict[str, Any]) -> int | None:
    """Stripe's captured amount, or None while the authorisation is open (nothing settled yet)."""
    if charge.get("captured"):
        shown = charge.get("amount_captured")
        return int(shown) if shown is not None else int(charge.get("amount") or 0)
    if (
        charge.get("status") == "succeeded"
        and not charge.get("refunded")
        and not charge.get("amount_refunded")
    ):
        return None  # authorised, not captured, not released: capture may still come
    return 0


def _refund_differences(ours: OurCharge, stripe: StripeCharge) -> list[Difference]:
    theirs = {str(r["id"]): r for r in stripe.refunds if r.get("reason") != RELEASE_REASON}
    found: list[Difference] = []
    for refund_id in sorted(set(theirs) | set(ours.refunds)):
        their = theirs.get(refund_id)
        our = ours.refunds.get(refund_id)
        if their is not None and their.get("status") in UNSETTLED:
            continue
        their_live = their is not None and their.get("status") in LIVE
        our_live = our is not None and our.live
        our_view = {"amount": our.amount, "status": our.status} if our is not None else None
        their_view = (
            {"amount": int(their["amount"]), "status": their.get("status")} if their is not None else None
        )
        if their_live != our_live:
            found.append(Difference(ours.charge_id, refund_id, "refund", our_view, their_view))
        elif their_live and our is not None and their is not None and our.amount != int(their["amount"]):
            found.append(
                Difference(ours.charge_id, refund_id, "refund_amount", our.amount, int(their["amount"]))
            )
    return found


def _dispute_transactions(dispute: dict[str, Any]) -> frozenset[str]:
    return frozenset(
        str(t["id"])
        for t in dispute.get("balance_transactions") or []
        if isinstance(t, dict) and int(t.get("amount") or 0) != 0
    )


def _dispute_differences(ours: OurCharge, stripe: StripeCharge) -> list[Difference]:
    theirs = {str(d["id"]): d for d in stripe.disputes}
    found: list[Difference] = []
    for dispute_id in sorted(set(theirs) | set(ours.disputes)):
        their = theirs.get(dispute_id)
        our = ours.disputes.get(dispute_id)
        if their is None or our is None:
            our_status = our.status if our is not None else None
            their_status = their.get("status") if their is not None else None
            found.append(Difference(ours.charge_id, dispute_id, "dispute", our_status, their_status))
            continue
        their_txns = _dispute_transactions(their)
        fields = []
        if our.status != their.get("status"):
            fields.append("status")
        if our.balance_transactions != their_txns:
            fields.append("balance_transactions")
        if fields:
            our_view = {"status": our.status, "balance_transactions": sorted(our.balance_transactions)}
            their_view = {"status": their.get("status"), "balance_transactions": sorted(their_txns)}
            found.append(
                Difference(ours.charge_id, dispute_id, "dispute_" + "+".join(fields), our_view, their_view)
            )
    return found


def compare(ours: OurCharge, stripe: StripeCharge) -> list[Difference]:
    found: list[Difference] = []
    captured = _captured(stripe.charge)
    if captured is not None and captured != ours.captured:
        found.append(Difference(ours.charge_id, ours.charge_id, "captured", ours.captured, captured))
    return found + _refund_differences(ours, stripe) + _dispute_differences(ours, stripe)
