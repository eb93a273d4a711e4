"""Test events built from Stripe's own fixture objects (tests/fixtures/stripe), signed for real."""

from __future__ import annotations

import copy
import itertools
import json
import time
from pathlib import Path
from typing import Any

import stripe

FIXTURES = Path(__file__).parent / "fixtures" / "stripe"
TEST_SECRET = "whsec_test_6f1c0b2e8d7a4c3b9e5f1a2d"
OLD_API_VERSION = "2020-08-27"  # embeds charge.refunds
NEW_API_VERSION = "2024-06-20"  # no embedded refunds, no refund.* events for charge refunds
_ids = itertools.count(1)


def fixture(name: str) -> dict[str, Any]:
    return copy.deepcopy(json.loads((FIXTURES / f"{name}.json").read_text()))


def unique_id(prefix: str) -> str:
    return f"{prefix}_test{int(time.time() * 1000):x}{next(_ids):06d}"


def make_event(
    event_type: str,
    obj: dict[str, Any],
    *,
    created: int | None = None,
    event_id: str | None = None,
    api_version: str = NEW_API_VERSION,
    livemode: bool = False,
) -> dict[str, Any]:
    event = fixture("event")
    event.update(
        id=event_id or unique_id("evt"),
        type=event_type,
        created=created if created is not None else int(time.time()),
        api_version=api_version,
        livemode=livemode,
        data={"object": obj},
    )
    return event


def sign(body: bytes, secret: str = TEST_SECRET, timestamp: int | None = None) -> str:
    """A real Stripe-Signature header, from the official package."""
    ts = int(time.time()) if timestamp is None else timestamp
    return stripe.WebhookSignature.generate_signature_header(body.decode("utf-8"), secret, timestamp=ts)


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()
