"""The inbox (rule 2) and dead letters (rule 8): duplicates, retry bookkeeping, replays."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import asyncpg

from handlers import DeadLetter, Policy, apply_event, record_dead_letter
from tests import builders as b
from tests import host_records as h
from tests.stripe_events import encode


async def test_second_delivery_of_an_applied_event_is_a_duplicate(con: asyncpg.Connection) -> None:
    """An event already applied is answered `duplicate` and changes nothing, attempts included."""
    await h.add_order_with_payment(con, "O-1", "ch_1")
    refund = b.refund(charge_id="ch_1", amount=300)
    event = b.refund_event("refund.created", refund)
    first = await h.apply(con, b.incoming(event))
    second = await h.apply(con, b.incoming(event, attempt=2))
    assert (first.outcome, second.outcome) == ("applied", "duplicate")
    assert second.stripe_object_id == refund["id"]
    assert await h.ledger(con, "ch_1") == [
        ("charge", 1000, "usd", "ch_1"),
        ("refund", -300, "usd", refund["id"]),
    ]
    row = await h.inbox(con, event["id"])
    assert (row["outcome"], row["attempts"]) == ("applied", 1)
    assert row["processed_at"] is not None


async def test_same_event_applied_twice_in_one_transaction_books_once(con: asyncpg.Connection) -> None:
    """apply_event is safe to run twice: the second run inside the same transaction is a duplicate."""
    await h.add_order_with_payment(con, "O-1", "ch_1")
    event = b.refund_event("refund.created", b.refund(charge_id="ch_1", amount=300))
    async with con.transaction():
        first = await apply_event(con, b.incoming(event), Policy(3600))
        second = await apply_event(con, b.incoming(event), Policy(3600))
    assert (first.outcome, second.outcome) == ("applied", "duplicate")
    assert await con.fetchval("select count(*) from recon.ledger_entries where kind = 'refund'") == 1


async def test_retrying_event_counts_attempts_and_has_no_processed_at(con: asyncpg.Connection) -> None:
    """A retrying event is not applied: outcome retrying, attempts counted, processed_at null."""
    event = b.refund_event("refund.created", b.refund(charge_id="ch_unknown", amount=300))
    for attempt in (1, 2):
        result = await h.apply(con, b.incoming(event, attempt=attempt))
        assert (result.outcome, result.retry_reason) == ("retrying", "unmatched_charge")
    row = await h.inbox(con, event["id"])
    assert (row["outcome"], row["attempts"], row["processed_at"]) == ("retrying", 2, None)


async def test_inbox_keeps_the_earliest_first_seen_at(con: asyncpg.Connection) -> None:
    """A retry's delivery time does not restart the unmatched clock: the first one counts."""
    event = b.refund_event("refund.created", b.refund(charge_id="ch_unknown", amount=300))
    early = datetime.now(UTC) - timedelta(seconds=100)
    await h.apply(con, b.incoming(event, first_seen_at=early), retry_s=3600)
    await h.apply(con, b.incoming(event, first_seen_at=datetime.now(UTC)), retry_s=3600)
    first_seen = await con.fetchval(
        "select first_seen_at from recon.event_inbox where event_id = $1", event["id"]
    )
    assert first_seen == early
    result = await h.apply(con, b.incoming(event, first_seen_at=datetime.now(UTC)), retry_s=50)
    assert result.outcome == "unmatched"


def _dead(event: dict[str, object], error: str = "KeyError: 'amount'") -> DeadLetter:
    return DeadLetter(
        event_id=str(event["id"]),
        event_type=str(event["type"]),
        body=encode(event),
        error=error,
        attempts=8,
        first_seen_at=datetime.now(UTC) - timedelta(minutes=5),
        created=datetime.fromtimestamp(int(str(event["created"])), UTC),
        object_id=str(event["data"]["object"]["id"]),  # type: ignore[index]
    )


async def test_dead_letter_is_recorded_with_body_exception_and_audit(con: asyncpg.Connection) -> None:
    """record_dead_letter keeps the raw body, marks the inbox, raises and audits it once."""
    event = b.refund_event("refund.created", b.refund(charge_id="ch_1", amount=300))
    dead = _dead(event)
    for _ in range(2):  # the broker may hand the same dead letter over twice
        async with con.transaction():
            await record_dead_letter(con, dead)
    stored = await con.fetchrow("select * from recon.dead_letters where event_id = $1", event["id"])
    assert stored is not None
    assert json.loads(bytes(stored["body"])) == event
    assert (stored["last_error"], stored["attempts"]) == ("KeyError: 'amount'", 8)
    row = await h.inbox(con, event["id"])
    assert (row["outcome"], row["attempts"]) == ("dead_lettered", 8)
    assert row["processed_at"] is not None
    raised = await h.exceptions(con, "dead_lettered")
    assert [(e["stripe_event_id"], e["resolved_at"]) for e in raised] == [(event["id"], None)]
    assert await h.audit_actions(con, event["id"]) == ["event_dead_lettered"]


async def test_replayed_dead_letter_applies_and_resolves_its_exception(con: asyncpg.Connection) -> None:
    """A dead-lettered event that later applies (replay) sets resolved_at on its exception."""
    await h.add_order_with_payment(con, "O-1", "ch_1")
    event = b.refund_event("refund.created", b.refund(charge_id="ch_1", amount=300))
    async with con.transaction():
        await record_dead_letter(con, _dead(event))
    result = await h.apply(con, b.incoming(event))
    assert result.outcome == "applied"
    raised = await h.exceptions(con, "dead_lettered")
    assert raised[0]["resolved_at"] is not None
    assert (await h.inbox(con, event["id"]))["outcome"] == "applied"


async def test_dead_letter_of_an_applied_event_changes_nothing(con: asyncpg.Connection) -> None:
    """A late dead-lettering of an event already applied keeps `applied` and raises nothing."""
    await h.add_order_with_payment(con, "O-1", "ch_1")
    event = b.refund_event("refund.created", b.refund(charge_id="ch_1", amount=300))
    await h.apply(con, b.incoming(event))
    async with con.transaction():
        await record_dead_letter(con, _dead(event))
    assert (await h.inbox(con, event["id"]))["outcome"] == "applied"
    assert await h.exceptions(con, "dead_lettered") == []


async def test_dead_letter_with_an_unparsable_body_is_still_kept(con: asyncpg.Connection) -> None:
    """A body that is not JSON still gets its dead letter, inbox row and exception."""
    dead = DeadLetter(
        "evt_garbage",
        "charge.refunded",
        b"\xff not json",
        "JSONDecodeError",
        3,
        datetime.now(UTC),
        None,
        None,
    )
    async with con.transaction():
        await record_dead_letter(con, dead)
    assert (await h.inbox(con, "evt_garbage"))["outcome"] == "dead_lettered"
    assert len(await h.exceptions(con, "dead_lettered")) == 1


async def test_concurrent_deliveries_of_one_event_apply_once(database_url: str) -> None:
    """Two workers handed the same event at once: one applies it, the other sees a duplicate."""
    setup = await asyncpg.connect(database_url)
    await h.add_order_with_payment(setup, "O-1", "ch_1")
    event = b.refund_event("refund.created", b.refund(charge_id="ch_1", amount=300))
    workers = [await asyncpg.connect(database_url) for _ in range(2)]

    async def deliver(con: asyncpg.Connection) -> str:
        async with con.transaction():
            return (await apply_event(con, b.incoming(event), Policy(3600))).outcome

    try:
        outcomes = await asyncio.gather(*(deliver(w) for w in workers))
        assert sorted(outcomes) == ["applied", "duplicate"]
        assert await setup.fetchval("select count(*) from recon.ledger_entries where kind = 'refund'") == 1
        assert await setup.fetchval("select attempts from recon.event_inbox") == 1
    finally:
        for c in [*workers, setup]:
            await c.close()
