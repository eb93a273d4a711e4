"""The Stripe event envelope: the types we handle, and the one parse of a body into an event.

The receiver, the consumer, the dead-letter drain and ``recon backfill`` all read a body through
``parse_event``; the handlers get the parsed event and never see bytes.
"""

from __future__ import annotations

from typing import Any

import orjson

# The rules in handlers/ have one handler per type here; tests/test_import_layout.py keeps the two
# lists equal, so the receiver never queues a type the worker cannot apply.
HANDLED_TYPES = frozenset(
    {
        "charge.succeeded",
        "charge.captured",
        "charge.expired",
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
        "payout.paid",
        "payout.failed",
        "payout.reconciliation_completed",
    }
)

# Reason codes of a rejected body; the receiver answers 400 with them and labels a metric.
INVALID_JSON = "invalid_json"
NOT_AN_EVENT = "not_an_event"
WRONG_LIVEMODE = "wrong_livemode"


class NotAnEvent(ValueError):
    """The body is not a Stripe event for us: ``reason`` is one of the codes above."""

    def __init__(
        self, reason: str, detail: str, event_id: str | None = None, event_type: str | None = None
    ) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        # Set only for an event that is well formed but refused (the other livemode).
        self.event_id = event_id
        self.event_type = event_type


def _check_envelope(event: Any) -> dict[str, Any]:
    """``event`` if it has the fields every Stripe event carries, else raise NotAnEvent."""
    if not isinstance(event, dict):
        raise NotAnEvent(NOT_AN_EVENT, "body is not a JSON object")
    event_id = event.get("id")
    if not isinstance(event_id, str) or not event_id.startswith("evt_"):
        raise NotAnEvent(NOT_AN_EVENT, "id must be a string starting with evt_")
    if not isinstance(event.get("type"), str) or not event["type"]:
        raise NotAnEvent(NOT_AN_EVENT, "type must be a non-empty string")
    created = event.get("created")
    if not isinstance(created, int) or isinstance(created, bool):
        raise NotAnEvent(NOT_AN_EVENT, "created must be an integer timestamp")
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise NotAnEvent(NOT_AN_EVENT, "data.object must be an object")
    return event


def parse_event(body: bytes, livemode: bool | None = None) -> dict[str, Any]:
    """The Stripe event in ``body``; raises NotAnEvent for anything else, or for an event of the
    other mode when ``livemode`` is set."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise NotAnEvent(INVALID_JSON, "body is not JSON") from None
    event = _check_envelope(parsed)
    if livemode is not None and event.get("livemode") is not livemode:
        expected = "live" if livemode else "test"
        detail = f"this endpoint accepts {expected}-mode events only"
        raise NotAnEvent(WRONG_LIVEMODE, detail, event["id"], event["type"])
    return event


def why_not_an_event(error: NotAnEvent) -> str:
    """One line for a message that is not an event (a dead letter's error, a log line)."""
    if error.reason == INVALID_JSON:
        return "body is not JSON"
    return f"body is not a Stripe event: {error.detail}"
