"""Stripe objects and events for tests, built from Stripe's own fixtures (tests/fixtures/stripe).

Every builder starts from the real fixture object and overrides only what a test names, so the
payloads keep Stripe's full shape. Amounts are integers in minor units.

Two API eras:

* ``OLD_API_VERSION`` (before 2022-11-15): a charge embeds ``refunds`` (a list object).
* ``NEW_API_VERSION``: a charge has no ``refunds`` key at all.

``charge_event`` renders a charge for the era of the event, so the same history can be delivered
both ways::

    ch = charge(amount=1000, captured=True, refunds=[refund(charge_id=..., amount=300)])
    old = charge_event("charge.refunded", ch, api_version=OLD_API_VERSION)   # embeds the refund
    new = charge_event("charge.refunded", ch, api_version=NEW_API_VERSION)   # does not

``delivery`` wraps an event the way the consumer runtime hands it to ``handlers.apply_event``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from handlers import EventToApply, Policy
from tests.stripe_events import NEW_API_VERSION, OLD_API_VERSION, fixture, make_event, unique_id

__all__ = [
    "NEW_API_VERSION",
    "OLD_API_VERSION",
    "T0",
    "balance_transaction",
    "charge",
    "charge_event",
    "incoming",
    "dispute",
    "dispute_event",
    "policy",
    "refund",
    "refund_event",
]

# A fixed "Stripe time" for histories: 2024-07-01T00:00:00Z. Tests add seconds to it.
T0 = 1_719_792_000


def charge(
    *,
    charge_id: str | None = None,
    amount: int = 1000,
    currency: str = "usd",
    captured: bool = True,
    amount_captured: int | None = None,
    amount_refunded: int | None = None,
    refunds: Sequence[dict[str, Any]] = (),
    has_more: bool = False,
    payment_intent: str | None = None,
    metadata: dict[str, str] | None = None,
    method_type: str = "card",
    created: int = T0,
) -> dict[str, Any]:
    """A charge object. ``refunds`` is the full refund history Stripe would embed (old era).

    ``amount_captured`` defaults to ``amount`` when captured, 0 when not. ``amount_refunded``
    defaults to what Stripe would report: the live refunds (pending/succeeded, any reason) plus
    the uncaptured remainder of a captured charge.
    """
    obj = fixture("charge")
    captured_amount = (amount if captured else 0) if amount_captured is None else amount_captured
    if amount_refunded is None:
        live = sum(int(r["amount"]) for r in refunds if r["status"] in ("pending", "succeeded"))
        remainder = amount - captured_amount if captured else 0
        amount_refunded = live + remainder
    obj.update(
        id=charge_id or unique_id("ch"),
        amount=amount,
        currency=currency,
        captured=captured,
        amount_captured=captured_amount,
        amount_refunded=amount_refunded,
        refunded=captured and amount_refunded >= amount,
        payment_intent=payment_intent,
        metadata=dict(metadata or {}),
        created=created,
    )
    if method_type != "card":
        obj["payment_method_details"] = {"type": method_type, method_type: {}}
    obj["refunds"] = {
        "object": "list",
        "data": [copy.deepcopy(r) for r in refunds],
        "has_more": has_more,
        "total_count": len(refunds),
        "url": f"/v1/charges/{obj['id']}/refunds",
    }
    return obj


def refund(
    *,
    charge_id: str,
    amount: int,
    status: str = "succeeded",
    refund_id: str | None = None,
    currency: str = "usd",
    reason: str | None = None,
    payment_intent: str | None = None,
    created: int = T0,
) -> dict[str, Any]:
    """A refund object of ``charge_id`` (``reason="expired_uncaptured_charge"`` for a release)."""
    obj = fixture("refund")
    obj.update(
        id=refund_id or unique_id("re"),
        charge=charge_id,
        amount=amount,
        status=status,
        currency=currency,
        reason=reason,
        payment_intent=payment_intent,
        created=created,
    )
    return obj


def balance_transaction(
    *,
    amount: int,
    currency: str = "usd",
    fee: int = 0,
    txn_id: str | None = None,
    source: str | None = None,
    created: int = T0,
) -> dict[str, Any]:
    """A dispute's balance transaction: amount < 0 withdraws, > 0 reinstates; ``fee`` settles."""
    obj = fixture("balance_transaction")
    obj.update(
        id=txn_id or unique_id("txn"),
        amount=amount,
        currency=currency,
        fee=fee,
        net=amount - fee,
        fee_details=[{"amount": fee, "currency": currency, "type": "stripe_fee"}] if fee else [],
        type="adjustment",
        reporting_category="dispute" if amount <= 0 else "dispute_reversal",
        source=source,
        created=created,
    )
    return obj


def dispute(
    *,
    charge_id: str,
    amount: int,
    status: str = "needs_response",
    dispute_id: str | None = None,
    currency: str = "usd",
    reason: str = "fraudulent",
    balance_transactions: Sequence[dict[str, Any]] = (),
    payment_intent: str | None = None,
    evidence_due_by: int | None = T0 + 7 * 86400,
    created: int = T0,
) -> dict[str, Any]:
    """A dispute object carrying the (expanded) balance transactions Stripe puts in its events."""
    obj = fixture("dispute")
    obj.update(
        id=dispute_id or unique_id("du"),
        charge=charge_id,
        amount=amount,
        status=status,
        currency=currency,
        reason=reason,
        balance_transactions=[copy.deepcopy(t) for t in balance_transactions],
        payment_intent=payment_intent,
        created=created,
    )
    obj["evidence_details"]["due_by"] = evidence_due_by
    return obj


def charge_event(
    event_type: str,
    charge_obj: dict[str, Any],
    *,
    created: int = T0,
    event_id: str | None = None,
    api_version: str = NEW_API_VERSION,
) -> dict[str, Any]:
    """A charge.* event; for API versions since 2022-11-15 the charge carries no ``refunds``."""
    obj = copy.deepcopy(charge_obj)
    if api_version != OLD_API_VERSION:
        obj.pop("refunds", None)
    return make_event(event_type, obj, created=created, event_id=event_id, api_version=api_version)


def refund_event(
    event_type: str,
    refund_obj: dict[str, Any],
    *,
    created: int = T0,
    event_id: str | None = None,
    api_version: str = NEW_API_VERSION,
) -> dict[str, Any]:
    """refund.created|updated|failed or charge.refund.updated carrying ``refund_obj``."""
    return make_event(
        event_type,
        copy.deepcopy(refund_obj),
        created=created,
        event_id=event_id,
        api_version=api_version,
    )


def dispute_event(
    event_type: str,
    dispute_obj: dict[str, Any],
    *,
    created: int = T0,
    event_id: str | None = None,
    api_version: str = NEW_API_VERSION,
) -> dict[str, Any]:
    """A charge.dispute.* event carrying ``dispute_obj``."""
    return make_event(
        event_type,
        copy.deepcopy(dispute_obj),
        created=created,
        event_id=event_id,
        api_version=api_version,
    )


def incoming(
    event: dict[str, Any],
    *,
    attempt: int = 1,
    first_seen_at: datetime | None = None,
    fetched_refunds: Sequence[dict[str, Any]] | None = None,
) -> EventToApply:
    """An EventToApply as the runtime builds it; first seen now unless told otherwise."""
    return EventToApply(
        event=event,
        attempt=attempt,
        first_seen_at=first_seen_at or datetime.now(UTC),
        fetched_refunds=[copy.deepcopy(r) for r in fetched_refunds] if fetched_refunds is not None else None,
    )


def policy(unmatched_retry_s: int = 3600) -> Policy:
    return Policy(unmatched_retry_s=unmatched_retry_s)
