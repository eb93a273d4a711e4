"""What a Stripe payload says: ids, timestamps, refund lists and the refund arithmetic of a charge.

Pure functions only; every id, amount and currency the worker books is read here from the payload.
Amounts stay ``int`` (minor units) throughout.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

LIVE_REFUND_STATUSES = frozenset({"pending", "succeeded"})
# Lifecycle order used to break same-second ties between snapshots of one refund.
REFUND_STATUS_RANK = {"requires_action": 1, "pending": 2, "succeeded": 3, "failed": 4, "canceled": 4}
# An expired authorisation is released, not refunded: no money came back.
RELEASE_REASON = "expired_uncaptured_charge"
TERMINAL_METHOD_TYPES = frozenset({"card_present", "interac_present"})


def stripe_id(value: Any) -> str | None:
    """The id of a field that is either an id string or an expanded object."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict):
        inner = value.get("id")
        return inner if isinstance(inner, str) and inner else None
    return None


def timestamp(epoch: int) -> datetime:
    """Stripe's ``created`` (Unix seconds) as an aware UTC datetime."""
    return datetime.fromtimestamp(epoch, tz=UTC)


def currency_of(obj: dict[str, Any]) -> str | None:
    currency = obj.get("currency")
    return currency.lower() if isinstance(currency, str) else None


@dataclass(frozen=True, slots=True)
class ChargeRef:
    """How an event's object points at its charge (and so at a payment)."""

    charge_id: str | None
    payment_intent_id: str | None
    charge: dict[str, Any] | None  # the charge object itself, for charge.* events


def charge_ref(event: dict[str, Any]) -> ChargeRef:
    obj: dict[str, Any] = event["data"]["object"]
    if obj.get("object") == "charge":
        return ChargeRef(stripe_id(obj.get("id")), stripe_id(obj.get("payment_intent")), obj)
    return ChargeRef(stripe_id(obj.get("charge")), stripe_id(obj.get("payment_intent")), None)


def embedded_refunds(charge: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The charge's embedded refund list (API versions before 2022-11-15), or None when absent."""
    refunds = charge.get("refunds")
    if not isinstance(refunds, dict) or not isinstance(refunds.get("data"), list):
        return None
    return [r for r in refunds["data"] if isinstance(r, dict)]


def embedded_list_complete(charge: dict[str, Any]) -> bool:
    refunds = charge.get("refunds")
    return isinstance(refunds, dict) and not refunds.get("has_more", False)


def is_release(refund: dict[str, Any]) -> bool:
    return refund.get("reason") == RELEASE_REASON


def live_refund_total(refunds: list[dict[str, Any]]) -> int:
    """Money actually sent back by these refunds: live statuses, releases excluded."""
    return sum(
        int(r.get("amount") or 0)
        for r in refunds
        if r.get("status") in LIVE_REFUND_STATUSES and not is_release(r)
    )


def captured_amount(charge: dict[str, Any]) -> int | None:
    """``amount_captured`` when the charge shows it captured, else None (an authorisation only)."""
    if not charge.get("captured"):
        return None
    shown = charge.get("amount_captured")
    # Very old API versions have no amount_captured: a captured charge there is captured in full.
    return int(shown) if shown is not None else int(charge.get("amount") or 0)


def expected_live_refunds(charge: dict[str, Any]) -> int:
    """The part of ``amount_refunded`` that is money back rather than a released authorisation.

    Stripe counts the uncaptured remainder ``amount − amount_captured`` in ``amount_refunded``
    (all of ``amount`` for an authorisation that expired uncaptured, whose release refund has
    reason ``expired_uncaptured_charge``). Every release is inside that remainder, so subtracting
    the remainder once removes all releases without counting a release refund twice.
    """
    amount = int(charge.get("amount") or 0)
    captured = captured_amount(charge) or 0
    refunded = int(charge.get("amount_refunded") or 0)
    return max(refunded - (amount - captured), 0)
