"""What the consumer runtime and the rules hand each other: plain dataclasses, nothing else.

The runtime (worker/consume/) builds an ``EventToApply`` per message and a ``Policy`` once, calls
the functions ``handlers`` exports, and gets a ``Result`` per event back; a message that reached
the dead-letter queue arrives as a ``DeadLetter``. Modules of this package import these from here,
never from the package root.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

Outcome = Literal["applied", "retrying", "duplicate", "stale", "unmatched", "mismatch", "dead_lettered"]
RetryReason = Literal["unmatched_charge", "refunds_short", "refund_failure_undated"]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class EventToApply:
    """One delivery of one event, as the runtime hands it over."""

    event: dict[str, Any]
    attempt: int  # 1 on first delivery
    first_seen_at: datetime  # when the receiver first queued it (header), tz-aware UTC
    # Every refund of the charge, fetched from the API (all pages) for a charge.refunded whose
    # embedded list is missing or incomplete; None when not fetched (no API key, or not needed).
    fetched_refunds: list[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """How long an event that cannot apply yet may wait, and the one clock that measures it.

    The runtime (before the transaction: may a failed refund fetch defer the event?) and the rules
    (inside it: retry, or raise the exception?) both ask ``may_still_wait``; tests pass a clock.
    """

    unmatched_retry_s: int
    clock: Callable[[], datetime] = field(default=utc_now, compare=False)

    def may_still_wait(self, first_seen_at: datetime) -> bool:
        return self.clock() < first_seen_at + timedelta(seconds=self.unmatched_retry_s)


@dataclass(frozen=True, slots=True)
class Result:
    """What applying one event came to; the runtime decides from it what becomes of the message."""

    outcome: Outcome
    # Set only with outcome "retrying": why the event cannot apply yet.
    retry_reason: RetryReason | None = None
    # For the one log line per event.
    stripe_object_id: str | None = None
    order_number: str | None = None
    invoice_number: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message the dead-letter queue delivered, with what the runtime read of its body."""

    event_id: str
    event_type: str
    body: bytes  # the exact raw event bytes
    error: str  # last error, one line, no secrets
    attempts: int
    first_seen_at: datetime
    created: datetime | None  # the event's created; None when the body is not an event
    object_id: str | None  # the event's data.object id, when there is one
