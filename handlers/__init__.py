"""Reconciliation rules (CONTRACT §7), one module per event family.

The seam with the consumer runtime (worker/consumer.py) is this module:

* ``refund_fetch_needed(event)`` — pure; the charge id whose refunds the runtime must fetch from
  the Stripe API *before* opening the transaction (a slow call must not hold a row lock), or None.
* ``apply_events(con, deliveries, policy)`` — runs inside a transaction or savepoint the runtime
  opened; does everything in the database for the events, in order (inbox, matching and locking
  payments, bookings, statuses, disputes, audit, exceptions) and returns a ``Result`` for each. If
  any event raises, nothing of the call may be kept: the runtime rolls back and runs the events
  again one per savepoint. It never publishes, sleeps or calls HTTP. Safe to run twice for the
  same event. ``apply_event(con, delivery, policy)`` is the same for one event.
* ``record_dead_letter(con, dead)`` — records a message that reached the dead-letter queue
  (by the worker giving up or by RabbitMQ's delivery limit): inbox outcome ``dead_lettered``,
  a ``dead_lettered`` exception, an ``event_dead_lettered`` audit row, and the raw body so
  ``recon dead-letters replay`` can re-queue it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

Outcome = Literal["applied", "retrying", "duplicate", "stale", "unmatched", "mismatch", "dead_lettered"]
RetryReason = Literal["unmatched_charge", "refunds_short"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery of one event, as the runtime hands it over."""

    event: dict[str, Any]
    attempt: int  # 1 on first delivery
    first_seen_at: datetime  # when the receiver first queued it (header), tz-aware UTC
    # Every refund of the charge, fetched from the API (all pages) for a charge.refunded whose
    # embedded list is missing or incomplete; None when not fetched (no API key, or not needed).
    fetched_refunds: list[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    unmatched_retry_s: int  # retry "not yet" outcomes until first_seen_at + this, then raise an exception


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    # Set only with outcome "retrying": the runtime re-publishes to a retry queue after commit.
    retry_reason: RetryReason | None = None
    # For the one log line per event (CONTRACT §7.10).
    stripe_object_id: str | None = None
    order_number: str | None = None
    invoice_number: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    event_id: str
    event_type: str
    body: bytes  # the exact raw event bytes
    error: str  # last error, one line, no secrets
    attempts: int
    first_seen_at: datetime


from handlers.dispatch import apply_event, apply_events, record_dead_letter, refund_fetch_needed  # noqa: E402

__all__ = [
    "DeadLetter",
    "Delivery",
    "Outcome",
    "Policy",
    "Result",
    "RetryReason",
    "apply_event",
    "apply_events",
    "record_dead_letter",
    "refund_fetch_needed",
]
