"""The one decision about a message after its transaction: ack, retry (after which delay), or
dead-letter — from the fact the runner reports, and nothing else."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from handlers import Policy, Result
from worker.consume.fate import Applied, NotYet, Raised, Unreadable, decide
from worker.consume.inbound import Inbound
from worker.settings import Settings

SETTINGS = Settings(max_attempts=4, retry_delays_s=(5.0, 30.0, 120.0))


def item(attempt: int = 1, failures: int = 0) -> Inbound:
    message: Any = None  # decide never touches the AMQP delivery
    return Inbound(message, 0.0, {"id": "evt_1", "type": "refund.created"}, None, attempt, failures, 0)


def test_a_final_outcome_is_acked_with_what_the_rules_said() -> None:
    """Applied with a final outcome: ack, and the log line's fields come from the Result."""
    result = Result("applied", stripe_object_id="re_1", order_number="A-1")
    fate = decide(item(), Applied(result), SETTINGS)
    assert (fate.action, fate.outcome, fate.stripe_object_id) == ("ack", "applied", "re_1")
    assert fate.order_number == "A-1"
    for outcome in ("duplicate", "stale", "unmatched", "mismatch"):
        assert decide(item(), Applied(Result(outcome)), SETTINGS).action == "ack"  # type: ignore[arg-type]


def test_not_yet_waits_longer_each_time_and_never_counts_a_failure() -> None:
    """A deferral (by the rules or the runtime) retries with the delay of its attempt number; the
    last delay repeats, and failures stay as they were: waiting is bounded by time, not count."""
    outage = NotYet("database_unavailable")
    waits = [decide(item(attempt=n, failures=1), outage, SETTINGS) for n in (1, 2, 3, 9)]
    assert [f.delay_s for f in waits] == [5.0, 30.0, 120.0, 120.0]
    assert {(f.action, f.failures, f.reason) for f in waits} == {("retry", 1, "database_unavailable")}
    not_matched = Applied(Result("retrying", retry_reason="unmatched_charge"))
    unmatched = decide(item(attempt=2), not_matched, SETTINGS)
    assert (unmatched.action, unmatched.reason, unmatched.delay_s) == ("retry", "unmatched_charge", 30.0)


def test_failures_back_off_by_their_count_until_the_last_attempt_dead_letters() -> None:
    """The n-th failure waits the n-th delay; the failure that reaches RECON_MAX_ATTEMPTS goes to
    the dead-letter exchange with the error and the count."""
    fates = [decide(item(attempt=9, failures=n), Raised("KeyError: 'amount'"), SETTINGS) for n in range(4)]
    assert [(f.action, f.failures, f.delay_s) for f in fates] == [
        ("retry", 1, 5.0),
        ("retry", 2, 30.0),
        ("retry", 3, 120.0),
        ("dead_letter", 4, None),
    ]
    assert fates[-1].error == "KeyError: 'amount'"


def test_an_unreadable_body_is_dead_lettered_at_once() -> None:
    """No attempt can fix a body that is not an event: dead-letter on the first attempt."""
    fate = decide(item(), Unreadable("body is not JSON"), SETTINGS)
    assert (fate.action, fate.reason, fate.error, fate.failures) == (
        "dead_letter",
        "unparseable",
        "body is not JSON",
        1,
    )


def test_the_waiting_window_is_one_computation_on_the_clock_it_is_given() -> None:
    """Policy.may_still_wait answers for the runtime and the rules alike, on the clock passed in."""
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    policy = Policy(unmatched_retry_s=60, clock=lambda: now)
    assert policy.may_still_wait(now - timedelta(seconds=59))
    assert not policy.may_still_wait(now - timedelta(seconds=60))
