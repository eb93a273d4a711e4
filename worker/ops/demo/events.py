"""Stripe objects and events for ``recon demo``, in the shapes of Stripe's own API objects.

The shapes follow the fixtures Stripe publishes for its API reference (charge, refund, dispute,
balance_transaction, event), trimmed to the fields a webhook consumer reads. The demo speaks the
API version ``2020-08-27``, which embeds ``charge.refunds``: every ``charge.refunded`` carries its
complete refund list, so the worker never needs a Stripe API key to judge it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DEMO_API_VERSION = "2020-08-27"


def new_id(prefix: str, tag: str) -> str:
    """An id in Stripe's style, unique per demo run (``tag``) and per call."""
    return f"{prefix}_demo{tag}{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class DemoCharge:
    charge_id: str
    payment_intent_id: str
    amount: int  # minor units
    currency: str
    created: int
    metadata: dict[str, str] = field(default_factory=dict)


def refund_object(
    charge: DemoCharge,
    refund_id: str,
    amount: int,
    *,
    status: str = "succeeded",
    created: int,
    failure_reason: str | None = None,
) -> dict[str, Any]:
    refund: dict[str, Any] = {
        "id": refund_id,
        "object": "refund",
        "amount": amount,
        "balance_transaction": None,
        "charge": charge.charge_id,
        "created": created,
        "currency": charge.currency,
        "destination_details": {"card": {"type": "refund"}, "type": "card"},
        "metadata": {},
        "payment_intent": charge.payment_intent_id,
        "reason": "requested_by_customer",
        "receipt_number": None,
        "source_transfer_reversal": None,
        "status": status,
        "transfer_reversal": None,
    }
    if failure_reason is not None:
        refund["failure_reason"] = failure_reason
    return refund


def charge_object(
    charge: DemoCharge, refunds: Sequence[dict[str, Any]] = (), *, amount_captured: int | None = None
) -> dict[str, Any]:
    """The charge with ``refunds`` embedded newest first as Stripe lists them.

    Captured in full unless ``amount_captured`` says otherwise; 0 is an authorisation not captured
    yet. Like Stripe, ``amount_refunded`` counts the uncaptured remainder a partial capture released.
    """
    captured = charge.amount if amount_captured is None else amount_captured
    released = charge.amount - captured if captured else 0
    live_refunds = sum(r["amount"] for r in refunds if r["status"] in ("pending", "succeeded"))
    amount_refunded = released + live_refunds
    return {
        "id": charge.charge_id,
        "object": "charge",
        "amount": charge.amount,
        "amount_captured": captured,
        "amount_refunded": amount_refunded,
        "balance_transaction": f"txn_for_{charge.charge_id}",
        "billing_details": {"email": None, "name": "Demo Customer", "phone": None},
        "captured": captured > 0,
        "created": charge.created,
        "currency": charge.currency,
        "description": "stripe-recon demo",
        "disputed": False,
        "livemode": False,
        "metadata": dict(charge.metadata),
        "paid": True,
        "payment_intent": charge.payment_intent_id,
        "payment_method_details": {
            "card": {"brand": "visa", "last4": "4242", "network": "visa"},
            "type": "card",
        },
        "refunded": amount_refunded >= charge.amount,
        "refunds": {
            "object": "list",
            "data": sorted(refunds, key=lambda r: -int(r["created"])),
            "has_more": False,
            "total_count": len(refunds),
            "url": f"/v1/charges/{charge.charge_id}/refunds",
        },
        "status": "succeeded",
    }


def balance_transaction(
    txn_id: str, *, amount: int, fee: int, currency: str, created: int, source: str
) -> dict[str, Any]:
    """A dispute's balance transaction in the settlement ``currency``: amount < 0 withdraws."""
    return {
        "id": txn_id,
        "object": "balance_transaction",
        "amount": amount,
        "available_on": created,
        "created": created,
        "currency": currency,
        "description": "Chargeback withdrawal" if amount < 0 else "Chargeback reversal",
        "exchange_rate": None,
        "fee": fee,
        "fee_details": [{"amount": fee, "currency": currency, "type": "stripe_fee"}] if fee else [],
        "net": amount - fee,
        "reporting_category": "dispute" if amount < 0 else "dispute_reversal",
        "source": source,
        "status": "available",
        "type": "adjustment",
    }


def dispute_object(
    charge: DemoCharge,
    dispute_id: str,
    *,
    status: str,
    balance_transactions: Sequence[dict[str, Any]],
    created: int,
    evidence_due_by: int,
) -> dict[str, Any]:
    return {
        "id": dispute_id,
        "object": "dispute",
        "amount": charge.amount,
        "balance_transactions": list(balance_transactions),
        "charge": charge.charge_id,
        "created": created,
        "currency": charge.currency,
        "evidence_details": {
            "due_by": evidence_due_by,
            "has_evidence": False,
            "past_due": False,
            "submission_count": 0,
        },
        "is_charge_refundable": False,
        "livemode": False,
        "metadata": {},
        "payment_intent": charge.payment_intent_id,
        "reason": "fraudulent",
        "status": status,
    }


def event(event_type: str, obj: dict[str, Any], *, event_id: str, created: int) -> dict[str, Any]:
    """The event envelope around ``obj``, as Stripe delivers it to a webhook endpoint."""
    return {
        "id": event_id,
        "object": "event",
        "api_version": DEMO_API_VERSION,
        "created": created,
        "data": {"object": obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }
