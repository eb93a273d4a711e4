"""What becomes of a message after its transaction: ack, retry later (after which delay), or
dead-letter. ``decide`` is the one place that answers, from a fact the runner reports.

The facts: the rules applied the event and said what came of it (``Applied``, carrying the
handlers' ``Result``); the event cannot be tried yet for a reason outside it (``NotYet``: a failed
refund fetch within the waiting window, the database unavailable); applying it raised
(``Raised``); the body is not an event at all (``Unreadable``). Carrying a fate out — the copy for
a wait queue or the dead-letter exchange, then the ack — is worker/consume/settle.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from handlers import Result
from worker.amqp import topology
from worker.consume.inbound import Inbound
from worker.settings import Settings

Action = Literal["ack", "retry", "dead_letter"]
LAST_ERROR_CHARS = 300


@dataclass(frozen=True, slots=True)
class Applied:
    result: Result


@dataclass(frozen=True, slots=True)
class NotYet:
    reason: str  # refund_fetch_failed | database_unavailable


@dataclass(frozen=True, slots=True)
class Raised:
    error: str  # one line


@dataclass(frozen=True, slots=True)
class Unreadable:
    error: str  # one line: why the body is not a Stripe event


Fact = Applied | NotYet | Raised | Unreadable


@dataclass(frozen=True, slots=True)
class Fate:
    """The decision for one message; ``outcome`` is what the logs and metrics say."""

    action: Action
    outcome: str
    reason: str | None = None  # why a retry or a dead letter (unmatched_charge, failed, ...)
    error: str | None = None  # the last error, one line
    failures: int = 0  # failed attempts including this one: the header the copy carries
    delay_s: float | None = None  # for a retry: the wait queue's delay
    stripe_object_id: str | None = None
    order_number: str | None = None
    invoice_number: str | None = None


def one_line(error: BaseException | str) -> str:
    """An error as one short line for a header or a log: type and first line, never a traceback."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    first = text.strip().splitlines()[0] if text.strip() else text
    return first[:LAST_ERROR_CHARS]


def decide(item: Inbound, fact: Fact, settings: Settings) -> Fate:
    """Ack a final outcome; retry "not yet" later without counting a failure (waiting is bounded
    by time, in the rules); retry a failure with a delay that grows with the failures, until the
    attempt that reaches RECON_MAX_ATTEMPTS, which dead-letters; dead-letter an unreadable body at
    once (no attempt can fix it)."""
    match fact:
        case Applied(result) if result.outcome != "retrying":
            return Fate(
                "ack",
                result.outcome,
                failures=item.failures,
                stripe_object_id=result.stripe_object_id,
                order_number=result.order_number,
                invoice_number=result.invoice_number,
            )
        case Applied(result):
            return _not_yet(item, result.retry_reason or "not_yet", settings, result)
        case NotYet(reason):
            return _not_yet(item, reason, settings)
        case Raised(error):
            failures = item.failures + 1
            if failures >= settings.max_attempts:
                return Fate("dead_letter", "dead_lettered", "failed", error, failures)
            delay_s = topology.retry_delay_for(failures, settings.retry_delays_s)
            return Fate("retry", "retrying", "failed", error, failures, delay_s)
        case Unreadable(error):
            return Fate("dead_letter", "dead_lettered", "unparseable", error, item.failures + 1)


def _not_yet(item: Inbound, reason: str, settings: Settings, result: Result | None = None) -> Fate:
    """Deferrals wait longer the more often the event was deferred (by its attempt number)."""
    return Fate(
        "retry",
        "retrying",
        reason,
        failures=item.failures,
        delay_s=topology.retry_delay_for(item.attempt, settings.retry_delays_s),
        stripe_object_id=result.stripe_object_id if result is not None else None,
        order_number=result.order_number if result is not None else None,
        invoice_number=result.invoice_number if result is not None else None,
    )
