"""Reconciliation rules, one module per event family, and the seam the consumer runtime calls.

* ``refund_fetch_needed(event)`` — pure; the charge id whose refunds the runtime must fetch from
  the Stripe API *before* opening the transaction (a slow call must not hold a row lock), or None.
* ``apply_events(con, events, policy)`` — runs inside a transaction or savepoint the runtime
  opened; does everything in the database for the events, in order (inbox, matching and locking
  payments, bookings, statuses, disputes, audit, exceptions) and returns a ``Result`` for each. If
  any event raises, nothing of the call may be kept: the runtime rolls back and runs the events
  again one per savepoint. It never publishes, sleeps or calls HTTP. Safe to run twice for the
  same event. ``apply_event`` is the same for one event.
* ``record_dead_letter(con, dead)`` — records a message that reached the dead-letter queue:
  inbox outcome ``dead_lettered``, a ``dead_lettered`` exception, an ``event_dead_lettered``
  audit row, and the raw body so ``recon dead-letters replay`` can re-queue it.
* ``charge_ref(event)`` — the charge an event is about; the runtime routes by it, so that events
  of the payment the rules lock go through one lane.
* ``HANDLERS`` — the event types the rules apply (the receiver's list must equal it).

The dataclasses exchanged live in ``handlers.interface``.
"""

from handlers.dead_letter_record import record_dead_letter
from handlers.dispatch import HANDLERS, apply_event, apply_events, refund_fetch_needed
from handlers.interface import DeadLetter, EventToApply, Outcome, Policy, Result, RetryReason
from handlers.payloads import charge_ref

__all__ = [
    "HANDLERS",
    "DeadLetter",
    "EventToApply",
    "Outcome",
    "Policy",
    "Result",
    "RetryReason",
    "apply_event",
    "apply_events",
    "charge_ref",
    "record_dead_letter",
    "refund_fetch_needed",
]
