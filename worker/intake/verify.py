"""Is this POST a genuine Stripe event for us? One function that raises one specific error.

It reads nothing but the body, the header and the clock (for the signature's age). Order matters:
nothing about the body is trusted (or parsed as JSON) before its signature verified, and a
rejection names one stable reason code that also labels the rejected metric.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import stripe

from worker.events import INVALID_JSON, NOT_AN_EVENT, WRONG_LIVEMODE, NotAnEvent, parse_event

MISSING_SIGNATURE = "missing_signature"
MALFORMED_SIGNATURE = "malformed_signature"
INVALID_SIGNATURE = "invalid_signature"
TIMESTAMP_OUT_OF_TOLERANCE = "timestamp_out_of_tolerance"
NOT_UTF8 = "not_utf8"
# Rejections that happen after the signature verified (the sender holds a secret).
AFTER_SIGNATURE = frozenset({INVALID_JSON, NOT_AN_EVENT, WRONG_LIVEMODE})


class WebhookRejected(Exception):
    """The request is not a valid event for this endpoint: answer 400 with ``reason``."""

    def __init__(
        self, reason: str, detail: str, event_id: str | None = None, event_type: str | None = None
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        # Set only once the signature verified: an unverified body's claims are not logged.
        self.event_id = event_id
        self.event_type = event_type


@dataclass(frozen=True, slots=True)
class VerifiedEvent:
    """A signed Stripe event envelope: the parsed fields we route on, plus the exact raw bytes."""

    body: bytes
    event_id: str
    event_type: str
    created: int


def signature_timestamp(header: str | None) -> int:
    """The ``t=`` of a Stripe-Signature header, parsed as stripe-python does (first ``t`` wins).

    Also insists on at least one ``v1=`` so that a malformed header gets its own reason code
    instead of the generic one verify_header would give.
    """
    if not header:
        raise WebhookRejected(MISSING_SIGNATURE, "no Stripe-Signature header")
    timestamp: int | None = None
    has_v1 = False
    for item in header.split(","):
        key, sep, value = item.partition("=")
        if sep and key == "t" and timestamp is None:
            try:
                timestamp = int(value)
            except ValueError:
                break
        has_v1 = has_v1 or (sep == "=" and key == "v1" and value != "")
    if timestamp is None or not has_v1:
        raise WebhookRejected(MALFORMED_SIGNATURE, "Stripe-Signature needs t=<unix time> and v1=<hex>")
    return timestamp


def check_signature(payload: str, header: str, secrets: tuple[str, ...], tolerance_s: int) -> None:
    """Passes if any configured secret (rotation) verifies the header within the tolerance.

    verify_header only rejects old timestamps, so the future side of the window is checked
    here; both sides are checked before the HMACs so a replay costs no hashing.
    """
    timestamp = signature_timestamp(header)
    if abs(time.time() - timestamp) > tolerance_s:
        detail = f"signature timestamp is more than {tolerance_s}s away"
        raise WebhookRejected(TIMESTAMP_OUT_OF_TOLERANCE, detail)
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(payload, header, secret, tolerance=tolerance_s)
            return
        except stripe.SignatureVerificationError:
            continue
    # Never echo the header or the secret: the detail is a fixed sentence.
    raise WebhookRejected(INVALID_SIGNATURE, "no configured secret verifies the signature")


def verify_webhook(
    body: bytes, header: str | None, secrets: tuple[str, ...], tolerance_s: int, livemode: bool | None
) -> VerifiedEvent:
    """Signature over the exact raw bytes, then a plain JSON parse of the same bytes."""
    if not header:
        raise WebhookRejected(MISSING_SIGNATURE, "no Stripe-Signature header")
    try:
        # Decoded once here rather than by verify_header once per secret; the HMAC is over
        # the UTF-8 text, so a body that is not UTF-8 can never verify.
        payload = body.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookRejected(NOT_UTF8, "body is not UTF-8") from None
    check_signature(payload, header, secrets, tolerance_s)
    try:
        event = parse_event(body, livemode)
    except NotAnEvent as exc:
        raise WebhookRejected(exc.reason, exc.detail, exc.event_id, exc.event_type) from None
    return VerifiedEvent(body=body, event_id=event["id"], event_type=event["type"], created=event["created"])
