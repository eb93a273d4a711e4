"""The Stripe event envelope: which types we handle and what makes a body an event."""

from __future__ import annotations

from typing import Any

HANDLED_TYPES = frozenset(
    {
        "charge.succeeded",
        "charge.captured",
        "charge.refunded",
        "charge.refund.updated",
        "refund.created",
        "refund.updated",
        "refund.failed",
        "charge.dispute.created",
        "charge.dispute.updated",
        "charge.dispute.closed",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.funds_reinstated",
    }
)


class NotAnEvent(ValueError):
    """The body parsed as JSON but is not a Stripe event envelope."""


def check_envelope(event: Any) -> dict[str, Any]:
    """Return ``event`` if it has the fields every Stripe event carries, else raise NotAnEvent."""
    if not isinstance(event, dict):
        raise NotAnEvent("body is not a JSON object")
    event_id = event.get("id")
    if not isinstance(event_id, str) or not event_id.startswith("evt_"):
        raise NotAnEvent("id must be a string starting with evt_")
    if not isinstance(event.get("type"), str) or not event["type"]:
        raise NotAnEvent("type must be a non-empty string")
    created = event.get("created")
    if not isinstance(created, int) or isinstance(created, bool):
        raise NotAnEvent("created must be an integer timestamp")
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise NotAnEvent("data.object must be an object")
    return event
