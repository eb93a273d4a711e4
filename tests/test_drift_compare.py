"""Rule 14's comparison of one charge (worker/drift/compare.py, pure): the ledger's side against the
API's objects as Stripe returns them, one case per way they can agree or differ — the captured
amount while an authorisation is open or released, refunds that are not settled or differ in
amount, disputes on one side only or with other balance transactions."""

from __future__ import annotations

from typing import Any

import pytest

from worker.drift.compare import Difference, OurCharge, OurDispute, OurRefund, StripeCharge, compare

CHARGE = "ch_cmp"


def _charge(**fields: Any) -> dict[str, Any]:
    return {"id": CHARGE, "object": "charge", "amount": 1000, "currency": "usd", **fields}


def _refund(refund_id: str, amount: int, status: str, reason: str | None = None) -> dict[str, Any]:
    return {"id": refund_id, "object": "refund", "amount": amount, "status": status, "reason": reason}


def _dispute(dispute_id: str, status: str, *txns: tuple[str, int]) -> dict[str, Any]:
    return {
        "id": dispute_id,
        "object": "dispute",
        "status": status,
        "balance_transactions": [{"id": txn, "amount": amount} for txn, amount in txns],
    }


@pytest.mark.parametrize(
    ("stripe_charge", "ours_captured", "expected"),
    [
        # Captured, without amount_captured (older API versions): the charge's amount is what was captured.
        (_charge(captured=True, amount=900), 1000, [Difference(CHARGE, CHARGE, "captured", 1000, 900)]),
        # Authorised, not captured, not released: nothing settled yet, whatever the ledger says.
        (_charge(captured=False, status="succeeded", refunded=False, amount_refunded=0), 1000, []),
        # Released without capture: nothing was captured, and the ledger booked the charge.
        (
            _charge(captured=False, status="succeeded", refunded=True, amount_refunded=1000),
            1000,
            [Difference(CHARGE, CHARGE, "captured", 1000, 0)],
        ),
        (_charge(captured=True, amount_captured=1000), 1000, []),
    ],
    ids=["captured-without-amount_captured", "authorised-only", "released", "agree"],
)
def test_the_captured_amount_is_compared_once_settled(
    stripe_charge: dict[str, Any], ours_captured: int, expected: list[Difference]
) -> None:
    """The captured amount differs only once Stripe settled it: captured (amount_captured, else the
    charge's amount) or released (0); an open authorisation is never drift."""
    assert compare(OurCharge(CHARGE, ours_captured), StripeCharge(stripe_charge, [], [])) == expected


def test_refunds_unsettled_or_released_are_skipped_and_live_amounts_are_compared() -> None:
    """A refund in requires_action and a release of the authorisation are not compared; a refund
    live on both sides with other amounts is refund_amount; one live at Stripe only, or booked by us
    but failed at Stripe, is refund (each with both views); a pending one against our booked one agrees."""
    ours = OurCharge(
        CHARGE,
        1000,
        refunds={
            "re_amount": OurRefund(300, "succeeded", live=True),
            "re_failed": OurRefund(100, "succeeded", live=True),
            "re_pending": OurRefund(50, "pending", live=True),
        },
    )
    stripe = StripeCharge(
        _charge(captured=True, amount_captured=1000),
        [
            _refund("re_action", 200, "requires_action"),
            _refund("re_release", 1000, "canceled", reason="expired_uncaptured_charge"),
            _refund("re_amount", 350, "succeeded"),
            _refund("re_failed", 100, "failed"),
            _refund("re_missed", 70, "succeeded"),
            _refund("re_pending", 50, "succeeded"),
        ],
        [],
    )
    assert compare(ours, stripe) == [
        Difference(CHARGE, "re_amount", "refund_amount", 300, 350),
        Difference(
            CHARGE,
            "re_failed",
            "refund",
            {"amount": 100, "status": "succeeded"},
            {"amount": 100, "status": "failed"},
        ),
        Difference(CHARGE, "re_missed", "refund", None, {"amount": 70, "status": "succeeded"}),
    ]


def test_disputes_on_one_side_only_or_with_other_transactions_differ() -> None:
    """A dispute only Stripe knows, and one only the ledger knows, are each a dispute difference
    (the side that lacks it None); the same status with another set of non-zero balance
    transactions is dispute_balance_transactions (a zero-amount transaction does not count); the
    same status and transactions agree; status and transactions both off name both."""
    ours = OurCharge(
        CHARGE,
        1000,
        disputes={
            "du_ours_only": OurDispute("won", frozenset()),
            "du_txns": OurDispute("lost", frozenset({"txn_w"})),
            "du_same": OurDispute("under_review", frozenset({"txn_s"})),
            "du_both": OurDispute("under_review", frozenset()),
        },
    )
    stripe = StripeCharge(
        _charge(captured=True, amount_captured=1000),
        [],
        [
            _dispute("du_stripe_only", "needs_response"),
            _dispute("du_txns", "lost", ("txn_w", -1000), ("txn_r", 1000)),
            _dispute("du_same", "under_review", ("txn_s", -1000), ("txn_zero", 0)),
            _dispute("du_both", "lost", ("txn_b", -1000)),
        ],
    )
    assert compare(ours, stripe) == [
        Difference(
            CHARGE,
            "du_both",
            "dispute_status+balance_transactions",
            {"status": "under_review", "balance_transactions": []},
            {"status": "lost", "balance_transactions": ["txn_b"]},
        ),
        Difference(CHARGE, "du_ours_only", "dispute", "won", None),
        Difference(CHARGE, "du_stripe_only", "dispute", None, "needs_response"),
        Difference(
            CHARGE,
            "du_txns",
            "dispute_balance_transactions",
            {"status": "lost", "balance_transactions": ["txn_w"]},
            {"status": "lost", "balance_transactions": ["txn_r", "txn_w"]},
        ),
    ]
