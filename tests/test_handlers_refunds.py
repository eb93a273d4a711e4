"""Refunds (rule 4): booked once whatever reports them, reversals, releases, the charge.refunded
checkpoint in both API eras, over-refunds, and refund_fetch_needed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from handlers import refund_fetch_needed
from tests import builders as b
from tests import host_records as h


@pytest.fixture
async def con(con: asyncpg.Connection) -> asyncpg.Connection:
    """conftest's connection, with the order O-1 and its payment ch_1 every test here starts from."""
    await h.add_order_with_payment(con, "O-1", "ch_1")
    return con


async def _refund_rows(con: asyncpg.Connection) -> list[tuple[str, int]]:
    rows = await con.fetch(
        "select kind, amount from finance.ledger where kind in ('refund', 'refund_reversal') "
        "order by entry_id"
    )
    return [(r["kind"], r["amount"]) for r in rows]


async def test_one_refund_row_whichever_events_report_it(con: asyncpg.Connection) -> None:
    """re_… seen via refund.created, charge.refund.updated, refund.updated, an old-era
    charge.refunded and a fetch is one refund row, one stripe_refund_recorded audit."""
    refund = b.refund(charge_id="ch_1", amount=300, refund_id="re_1")
    charge = b.charge(charge_id="ch_1", refunds=[refund])
    events = [
        b.refund_event("refund.created", refund),
        b.refund_event("charge.refund.updated", refund),
        b.refund_event("refund.updated", refund, created=b.T0 + 1),
        b.charge_event("charge.refunded", charge, api_version=b.OLD_API_VERSION),
    ]
    for event in events:
        await h.apply(con, b.incoming(event))
    new_era = b.charge_event("charge.refunded", charge, created=b.T0 + 2)
    await h.apply(con, b.incoming(new_era, fetched_refunds=[refund]))
    assert await _refund_rows(con) == [("refund", -300)]
    assert (await h.audit_actions(con)).count("stripe_refund_recorded") == 1
    occurred = await con.fetchval("select occurred_at from finance.ledger where kind = 'refund'")
    assert occurred == datetime.fromtimestamp(refund["created"], UTC)


async def test_requires_action_books_nothing_until_pending(con: asyncpg.Connection) -> None:
    """requires_action has moved no money: nothing is booked until the refund turns pending."""
    waiting = b.refund(charge_id="ch_1", amount=300, refund_id="re_1", status="requires_action")
    await h.apply(con, b.incoming(b.refund_event("refund.created", waiting)))
    assert await _refund_rows(con) == []
    pending = {**waiting, "status": "pending"}
    await h.apply(con, b.incoming(b.refund_event("refund.updated", pending, created=b.T0 + 1)))
    assert await _refund_rows(con) == [("refund", -300)]


async def test_failed_after_booking_books_one_reversal(con: asyncpg.Connection) -> None:
    """A booked refund that fails gets exactly one refund_reversal (+amount); it nets to zero."""
    pending = b.refund(charge_id="ch_1", amount=300, refund_id="re_1", status="pending")
    failed = {**pending, "status": "failed"}
    await h.apply(con, b.incoming(b.refund_event("refund.created", pending)))
    await h.apply(con, b.incoming(b.refund_event("refund.failed", failed, created=b.T0 + 5)))
    await h.apply(con, b.incoming(b.refund_event("charge.refund.updated", failed, created=b.T0 + 5)))
    assert await _refund_rows(con) == [("refund", -300), ("refund_reversal", 300)]
    balance = await h.balance(con, "ch_1")
    assert (balance["amount_refunded"], balance["status"]) == (0, "paid")
    actions = await h.audit_actions(con)
    assert actions.count("stripe_refund_reversed") == 1
    occurred = dict(await con.fetch("select kind, occurred_at from finance.ledger where kind like 'refund%'"))
    # The reversal is dated when the refund failed, not on the refund's own day.
    assert occurred == {
        "refund": datetime.fromtimestamp(b.T0, UTC),
        "refund_reversal": datetime.fromtimestamp(b.T0 + 5, UTC),
    }
    [failed_exception] = await h.exceptions(con, "refund_failed")
    assert failed_exception["stripe_object_id"] == "re_1"


async def test_canceled_refund_is_reversed_too(con: asyncpg.Connection) -> None:
    """canceled after pending books a reversal just like failed."""
    pending = b.refund(charge_id="ch_1", amount=300, refund_id="re_1", status="pending")
    await h.apply(con, b.incoming(b.refund_event("refund.created", pending)))
    canceled = {**pending, "status": "canceled"}
    await h.apply(con, b.incoming(b.refund_event("refund.updated", canceled, created=b.T0 + 1)))
    assert await _refund_rows(con) == [("refund", -300), ("refund_reversal", 300)]


async def test_refund_known_failed_is_not_booked_by_an_older_event(con: asyncpg.Connection) -> None:
    """Failure delivered first, then the older pending snapshot: nothing is booked at all."""
    pending = b.refund(charge_id="ch_1", amount=300, refund_id="re_1", status="pending")
    failed = {**pending, "status": "failed"}
    await h.apply(con, b.incoming(b.refund_event("refund.failed", failed, created=b.T0 + 5)))
    late = await h.apply(con, b.incoming(b.refund_event("refund.created", pending)))
    assert late.outcome == "stale"
    assert await _refund_rows(con) == []
    assert await con.fetchval("select status from recon.refunds") == "failed"


@pytest.mark.parametrize("failed_first", [False, True])
async def test_same_second_tie_prefers_the_later_lifecycle_status(
    con: asyncpg.Connection, failed_first: bool
) -> None:
    """Same created second: failed outranks succeeded in either delivery order; it nets to zero."""
    succeeded = b.refund(charge_id="ch_1", amount=300, refund_id="re_1")
    failed = {**succeeded, "status": "failed"}
    events = [
        b.refund_event("refund.created", succeeded, created=b.T0 + 3),
        b.refund_event("refund.failed", failed, created=b.T0 + 3),
    ]
    for event in reversed(events) if failed_first else events:
        await h.apply(con, b.incoming(event))
    assert await con.fetchval("select status from recon.refunds") == "failed"
    assert sum(a for _, a in await _refund_rows(con)) == 0
    assert (await h.balance(con, "ch_1"))["status"] == "paid"


async def test_full_tie_keeps_the_stored_status(con: asyncpg.Connection) -> None:
    """Same second and same rank (failed vs canceled): the first stored status is kept."""
    failed = b.refund(charge_id="ch_1", amount=300, refund_id="re_1", status="failed")
    canceled = {**failed, "status": "canceled"}
    await h.apply(con, b.incoming(b.refund_event("refund.failed", failed, created=b.T0 + 3)))
    result = await h.apply(con, b.incoming(b.refund_event("refund.updated", canceled, created=b.T0 + 3)))
    assert result.outcome == "stale"
    assert await con.fetchval("select status from recon.refunds") == "failed"


async def test_expired_authorisation_release_books_nothing(con: asyncpg.Connection) -> None:
    """A refund with reason expired_uncaptured_charge is a release: no refund row, no mismatch."""
    release = b.refund(charge_id="ch_1", amount=1000, refund_id="re_rel", reason="expired_uncaptured_charge")
    charge = b.charge(charge_id="ch_1", captured=False, refunds=[release])
    assert charge["amount_refunded"] == 1000
    for era in (b.OLD_API_VERSION, b.NEW_API_VERSION):
        event = b.charge_event("charge.refunded", charge, created=b.T0 + 7, api_version=era)
        result = await h.apply(con, b.incoming(event))
        assert result.outcome in ("applied", "stale")
    result = await h.apply(con, b.incoming(b.refund_event("refund.created", release)))
    assert await _refund_rows(con) == []
    assert await h.exceptions(con) == []
    assert (await h.balance(con, "ch_1"))["amount_refunded"] == 0


async def test_uncaptured_remainder_of_a_partial_capture_is_not_a_refund(
    con: asyncpg.Connection,
) -> None:
    """Captured 800 of 1000: Stripe's amount_refunded 200 is a release, books nothing, not short."""
    charge = b.charge(charge_id="ch_1", amount=1000, amount_captured=800)
    assert charge["amount_refunded"] == 200
    event = b.charge_event("charge.refunded", charge, api_version=b.OLD_API_VERSION)
    assert refund_fetch_needed(event) is None
    result = await h.apply(con, b.incoming(event))
    assert result.outcome == "applied"
    assert await _refund_rows(con) == []


@pytest.mark.parametrize("era", [b.OLD_API_VERSION, b.NEW_API_VERSION])
async def test_charge_refunded_books_what_it_carries_in_both_eras(con: asyncpg.Connection, era: str) -> None:
    """Old era: the embedded list is booked. New era: the refunds the runtime fetched are booked."""
    refunds = [
        b.refund(charge_id="ch_1", amount=300, refund_id="re_1"),
        b.refund(charge_id="ch_1", amount=200, refund_id="re_2", status="pending"),
    ]
    charge = b.charge(charge_id="ch_1", refunds=refunds)
    event = b.charge_event("charge.refunded", charge, api_version=era)
    fetched = refunds if refund_fetch_needed(event) == "ch_1" else None
    assert (fetched is None) == (era == b.OLD_API_VERSION)
    result = await h.apply(con, b.incoming(event, fetched_refunds=fetched))
    assert result.outcome == "applied"
    assert sorted(await _refund_rows(con)) == [("refund", -300), ("refund", -200)]
    assert (await h.balance(con, "ch_1"))["status"] == "partially_refunded"


async def test_new_era_short_checkpoint_retries_until_refund_events_arrive(
    con: asyncpg.Connection,
) -> None:
    """No refunds carried or fetched, none booked: retrying (refunds_short), not applied; once the
    refund.created is booked the retry applies."""
    refund = b.refund(charge_id="ch_1", amount=400, refund_id="re_1")
    event = b.charge_event("charge.refunded", b.charge(charge_id="ch_1", refunds=[refund]))
    result = await h.apply(con, b.incoming(event))
    assert (result.outcome, result.retry_reason) == ("retrying", "refunds_short")
    row = await h.inbox(con, event["id"])
    assert (row["outcome"], row["processed_at"]) == ("retrying", None)
    await h.apply(con, b.incoming(b.refund_event("refund.created", refund)))
    assert (await h.apply(con, b.incoming(event, attempt=2))).outcome == "applied"
    assert await _refund_rows(con) == [("refund", -400)]


async def test_fetched_refunds_still_short_retry_then_raise_refund_mismatch(
    con: asyncpg.Connection,
) -> None:
    """Fetched refunds that do not cover amount_refunded: retry, and past the deadline a
    refund_mismatch exception with outcome mismatch (what was fetched stays booked)."""
    refund = b.refund(charge_id="ch_1", amount=100, refund_id="re_1")
    charge = b.charge(charge_id="ch_1", amount_refunded=600)
    event = b.charge_event("charge.refunded", charge)
    early = await h.apply(con, b.incoming(event, fetched_refunds=[refund]))
    assert (early.outcome, early.retry_reason) == ("retrying", "refunds_short")
    old = datetime.now(UTC) - timedelta(hours=2)
    late = await h.apply(con, b.incoming(event, first_seen_at=old, fetched_refunds=[refund]))
    assert late.outcome == "mismatch"
    raised = await h.exceptions(con, "refund_mismatch")
    assert [(e["stripe_event_id"], e["stripe_object_id"]) for e in raised] == [(event["id"], "ch_1")]
    assert raised[0]["detail"]["amount_refunded"] == 600
    assert await _refund_rows(con) == [("refund", -100)]
    assert (await h.inbox(con, event["id"]))["outcome"] == "mismatch"


async def test_older_charge_refunded_is_not_judged(con: asyncpg.Connection) -> None:
    """A charge.refunded older than the newest charge snapshot applied is not a checkpoint."""
    newest = b.charge(charge_id="ch_1")
    await h.apply(con, b.incoming(b.charge_event("charge.refunded", newest, created=b.T0 + 10)))
    short = b.charge(charge_id="ch_1", amount_refunded=500)
    result = await h.apply(con, b.incoming(b.charge_event("charge.refunded", short, created=b.T0 + 5)))
    assert result.outcome == "stale"
    assert await h.exceptions(con) == []


async def test_failure_known_before_the_checkpoint_does_not_make_it_short(
    con: asyncpg.Connection,
) -> None:
    """refund.failed (newer) applied before an old-era charge.refunded that still shows the refund
    succeeded: the checkpoint counts what was live at its time and applies without a retry."""
    refund = b.refund(charge_id="ch_1", amount=300, refund_id="re_1")
    failed = {**refund, "status": "failed"}
    await h.apply(con, b.incoming(b.refund_event("refund.failed", failed, created=b.T0 + 20)))
    charge = b.charge(charge_id="ch_1", refunds=[refund])
    event = b.charge_event("charge.refunded", charge, created=b.T0 + 10, api_version=b.OLD_API_VERSION)
    assert (await h.apply(con, b.incoming(event))).outcome in ("applied", "stale")
    assert await _refund_rows(con) == []
    # Never booked, but it failed: the customer was not paid back, and finance hears of it.
    assert [e["kind"] for e in await h.exceptions(con)] == ["refund_failed"]


async def test_over_refund_is_booked_and_raised(con: asyncpg.Connection) -> None:
    """Refunds beyond the captured amount raise over_refund and are still booked."""
    first = b.refund(charge_id="ch_1", amount=800, refund_id="re_1")
    second = b.refund(charge_id="ch_1", amount=500, refund_id="re_2", created=b.T0 + 1)
    await h.apply(con, b.incoming(b.refund_event("refund.created", first)))
    assert await h.exceptions(con, "over_refund") == []
    await h.apply(con, b.incoming(b.refund_event("refund.created", second, created=b.T0 + 1)))
    raised = await h.exceptions(con, "over_refund")
    assert [e["stripe_object_id"] for e in raised] == ["re_2"]
    assert raised[0]["detail"]["amount_refunded"] == 1300
    assert sorted(await _refund_rows(con)) == [("refund", -800), ("refund", -500)]
    assert (await h.balance(con, "ch_1"))["status"] == "refunded"


async def test_jpy_refund_amount_decimal_is_whole_yen(con: asyncpg.Connection) -> None:
    """A JPY refund of 5000 is -5000 yen in amount_decimal."""
    await h.add_order_with_payment(con, "O-JP", "ch_jp", amount=110000, currency="jpy")
    refund = b.refund(charge_id="ch_jp", amount=5000, currency="jpy")
    await h.apply(con, b.incoming(b.refund_event("refund.created", refund)))
    value = await con.fetchval(
        "select amount_decimal::text from finance.ledger where stripe_object_id = $1", refund["id"]
    )
    assert value == "-5000"


class TestRefundFetchNeeded:
    """refund_fetch_needed is pure and asks for a fetch only when the embedded list cannot judge."""

    def test_other_event_types_never_need_a_fetch(self) -> None:
        """Only charge.refunded can need a fetch."""
        charge = b.charge(charge_id="ch_1", amount_refunded=500)
        assert refund_fetch_needed(b.charge_event("charge.succeeded", charge)) is None
        refund = b.refund(charge_id="ch_1", amount=1)
        assert refund_fetch_needed(b.refund_event("refund.created", refund)) is None

    def test_new_era_without_embedded_refunds_needs_a_fetch(self) -> None:
        """No refunds list at all (API since 2022-11-15) → the charge id."""
        charge = b.charge(charge_id="ch_1", amount_refunded=500)
        assert refund_fetch_needed(b.charge_event("charge.refunded", charge)) == "ch_1"

    def test_truncated_list_needs_a_fetch(self) -> None:
        """has_more → the charge id, even if the first page covers the amount."""
        refund = b.refund(charge_id="ch_1", amount=500)
        charge = b.charge(charge_id="ch_1", refunds=[refund], has_more=True)
        event = b.charge_event("charge.refunded", charge, api_version=b.OLD_API_VERSION)
        assert refund_fetch_needed(event) == "ch_1"

    def test_complete_covering_list_needs_no_fetch(self) -> None:
        """Embedded live refunds covering amount_refunded → None."""
        refund = b.refund(charge_id="ch_1", amount=500)
        charge = b.charge(charge_id="ch_1", refunds=[refund])
        event = b.charge_event("charge.refunded", charge, api_version=b.OLD_API_VERSION)
        assert refund_fetch_needed(event) is None

    def test_short_list_needs_a_fetch(self) -> None:
        """Embedded live refunds short of amount_refunded (a failed one does not count) → fetch."""
        failed = b.refund(charge_id="ch_1", amount=500, status="failed")
        charge = b.charge(charge_id="ch_1", refunds=[failed], amount_refunded=500)
        event = b.charge_event("charge.refunded", charge, api_version=b.OLD_API_VERSION)
        assert refund_fetch_needed(event) == "ch_1"

    def test_releases_are_not_expected_as_refunds(self) -> None:
        """An expired authorisation's release needs no refund to cover it."""
        release = b.refund(charge_id="ch_1", amount=1000, reason="expired_uncaptured_charge")
        charge = b.charge(charge_id="ch_1", captured=False, refunds=[release])
        event = b.charge_event("charge.refunded", charge, api_version=b.OLD_API_VERSION)
        assert refund_fetch_needed(event) is None


async def test_every_change_writes_an_audit_row(con: asyncpg.Connection) -> None:
    """Rule 9: a first refund on a host payment audits the refund's status, the booking, and the
    payment's and order's status moves; its failure audits the status and the reversal."""
    refund = b.refund(charge_id="ch_1", amount=300, refund_id="re_1", status="pending")
    created = b.refund_event("refund.created", refund)
    await h.apply(con, b.incoming(created))
    rows = await con.fetch(
        "select action, detail->>'object' as obj from recon.audit_log where stripe_event_id = $1 order by id",
        created["id"],
    )
    assert [(r["action"], r["obj"]) for r in rows] == [
        ("status_changed", "refund"),
        ("stripe_refund_recorded", None),
        ("status_changed", "payment"),
        ("status_changed", "order"),
    ]
    failed = b.refund_event("refund.failed", {**refund, "status": "failed"}, created=b.T0 + 1)
    await h.apply(con, b.incoming(failed))
    assert await h.audit_actions(con, failed["id"]) == [
        "status_changed",
        "stripe_refund_reversed",
        "status_changed",
        "status_changed",
    ]


async def test_fetched_refund_is_still_moved_by_a_later_failure_event(con: asyncpg.Connection) -> None:
    """Fetched refunds count as a snapshot at the charge.refunded's created, not at our clock: a
    refund.failed Stripe created after that event still reverses the refund the fetch booked."""
    pending = b.refund(charge_id="ch_1", amount=300, refund_id="re_1", status="pending")
    event = b.charge_event(
        "charge.refunded", b.charge(charge_id="ch_1", refunds=[pending]), created=b.T0 + 10
    )
    await h.apply(con, b.incoming(event, fetched_refunds=[pending]))
    failed = b.refund_event("refund.failed", {**pending, "status": "failed"}, created=b.T0 + 20)
    await h.apply(con, b.incoming(failed))
    assert await _refund_rows(con) == [("refund", -300), ("refund_reversal", 300)]
