"""Matching a charge to a payment (by charge, intent, then metadata), unmatched waiting, and the
currency check."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from handlers import Policy, apply_event
from handlers.matching import _PAYMENTS_LOCK
from tests import builders as b
from tests import event_stream
from tests import host_records as h
from tests.event_stream import HostPayment
from tests.harness import wait_until
from worker.consume.database import SESSION_SETTINGS


async def test_matches_by_charge_id(con: asyncpg.Connection) -> None:
    """A payment the host recorded with stripe_charge_id is matched by it; log fields are filled."""
    await h.add_order_with_payment(con, "O-1", "ch_1")
    result = await h.apply(con, b.incoming(b.charge_event("charge.succeeded", b.charge(charge_id="ch_1"))))
    assert (result.outcome, result.stripe_object_id, result.order_number) == ("applied", "ch_1", "O-1")
    assert result.invoice_number is None


async def test_matches_by_payment_intent_and_learns_the_charge_id(con: asyncpg.Connection) -> None:
    """With no charge id on the payment, the payment intent matches; the charge id is then stored."""
    invoice_id = await h.add_invoice(con, "I-1")
    await h.add_payment(con, invoice_id=invoice_id, payment_intent="pi_1", method="stripe_link")
    refund = b.refund(charge_id="ch_9", amount=100, payment_intent="pi_1")
    result = await h.apply(con, b.incoming(b.refund_event("refund.created", refund)))
    assert (result.outcome, result.invoice_number) == ("applied", "I-1")
    assert await con.fetchval("select stripe_charge_id from recon.payments") == "ch_9"
    assert [k for k, *_ in await h.ledger(con, "ch_9")] == ["charge", "refund"]


async def test_charge_id_match_wins_over_payment_intent(con: asyncpg.Connection) -> None:
    """When the charge id and the payment intent point at different payments, the charge id wins."""
    await h.add_order_with_payment(con, "O-1", "ch_1")
    other = await h.add_order(con, "O-2")
    await h.add_payment(con, order_id=other, payment_intent="pi_1")
    charge = b.charge(charge_id="ch_1", payment_intent="pi_1")
    result = await h.apply(con, b.incoming(b.charge_event("charge.succeeded", charge)))
    assert result.order_number == "O-1"


@pytest.mark.parametrize(
    ("owner", "method_type", "method"),
    [
        ("order", "card", "stripe_card"),
        ("order", "card_present", "stripe_terminal"),
        ("invoice", "card", "stripe_link"),
        ("invoice", "card_present", "stripe_terminal"),
    ],
)
async def test_metadata_naming_an_owner_creates_the_payment(
    con: asyncpg.Connection, owner: str, method_type: str, method: str
) -> None:
    """order_number/invoice_number metadata creates a payment with the contract's method rule."""
    if owner == "order":
        await h.add_order(con, "N-1")
    else:
        await h.add_invoice(con, "N-1")
    charge = b.charge(
        charge_id="ch_1",
        payment_intent="pi_1",
        metadata={f"{owner}_number": "N-1"},
        method_type=method_type,
    )
    result = await h.apply(con, b.incoming(b.charge_event("charge.succeeded", charge)))
    assert result.outcome == "applied"
    row = await con.fetchrow("select * from recon.payments")
    assert row is not None
    assert (row["stripe_charge_id"], row["stripe_payment_intent_id"], row["method"]) == (
        "ch_1",
        "pi_1",
        method,
    )
    assert (row["currency"], row["amount"], row["created_by_worker"]) == ("usd", 1000, True)
    assert (row["order_id"] is not None, row["invoice_id"] is not None) == (
        owner == "order",
        owner == "invoice",
    )


async def test_metadata_naming_no_existing_owner_is_unmatched(con: asyncpg.Connection) -> None:
    """Metadata naming an order that does not exist creates nothing: the event retries."""
    charge = b.charge(charge_id="ch_1", metadata={"order_number": "NOPE"})
    result = await h.apply(con, b.incoming(b.charge_event("charge.succeeded", charge)))
    assert (result.outcome, result.retry_reason) == ("retrying", "unmatched_charge")
    assert await con.fetchval("select count(*) from recon.payments") == 0


async def test_unmatched_after_the_retry_window_raises_an_exception(con: asyncpg.Connection) -> None:
    """Past first_seen_at + unmatched_retry_s: unmatched_charge exception, audit, outcome unmatched."""
    refund = b.refund(charge_id="ch_lost", amount=300)
    event = b.refund_event("refund.created", refund)
    old = datetime.now(UTC) - timedelta(seconds=61)
    result = await h.apply(con, b.incoming(event, first_seen_at=old, attempt=5), retry_s=60)
    assert result.outcome == "unmatched"
    raised = await h.exceptions(con, "unmatched_charge")
    assert [(e["stripe_event_id"], e["stripe_object_id"]) for e in raised] == [(event["id"], refund["id"])]
    assert await h.audit_actions(con, event["id"]) == ["event_unmatched"]
    row = await h.inbox(con, event["id"])
    assert row["outcome"] == "unmatched" and row["processed_at"] is not None
    assert (await h.apply(con, b.incoming(event), retry_s=60)).outcome == "duplicate"


async def test_unmatched_retry_becomes_applied_once_the_host_records_the_payment(
    con: asyncpg.Connection,
) -> None:
    """An event retried for an unknown charge applies once the host has recorded the payment."""
    event = b.refund_event("refund.created", b.refund(charge_id="ch_late", amount=300))
    assert (await h.apply(con, b.incoming(event))).outcome == "retrying"
    await h.add_order_with_payment(con, "O-1", "ch_late")
    assert (await h.apply(con, b.incoming(event, attempt=2))).outcome == "applied"
    assert (await h.inbox(con, event["id"]))["attempts"] == 2


async def test_currency_differing_from_the_payment_books_nothing(con: asyncpg.Connection) -> None:
    """An event in another currency than the payment's: currency_mismatch, nothing booked."""
    await h.add_order_with_payment(con, "O-1", "ch_1", currency="eur")
    event = b.refund_event("refund.created", b.refund(charge_id="ch_1", amount=300, currency="usd"))
    result = await h.apply(con, b.incoming(event))
    assert (result.outcome, result.order_number) == ("mismatch", "O-1")
    assert await con.fetchval("select count(*) from recon.ledger_entries") == 0
    raised = await h.exceptions(con, "currency_mismatch")
    assert raised[0]["stripe_event_id"] == event["id"]
    assert (await h.inbox(con, event["id"]))["outcome"] == "mismatch"


async def test_metadata_owner_in_another_currency_creates_no_payment(con: asyncpg.Connection) -> None:
    """Metadata naming an order in another currency: currency_mismatch, no payment created."""
    await h.add_order(con, "O-1", currency="eur")
    charge = b.charge(charge_id="ch_1", metadata={"order_number": "O-1"}, currency="usd")
    result = await h.apply(con, b.incoming(b.charge_event("charge.succeeded", charge)))
    assert result.outcome == "mismatch"
    assert await con.fetchval("select count(*) from recon.payments") == 0
    assert len(await h.exceptions(con, "currency_mismatch")) == 1


async def test_concurrent_first_events_create_one_payment(database_url: str) -> None:
    """Two workers applying the first two events of a metadata charge at once create one payment."""
    setup = await asyncpg.connect(database_url)
    await h.add_order(setup, "O-1")
    charge = b.charge(charge_id="ch_1", payment_intent="pi_1", metadata={"order_number": "O-1"})
    events = [
        b.charge_event("charge.succeeded", charge),
        b.charge_event("charge.captured", charge, created=b.T0 + 1),
    ]
    connections = [await asyncpg.connect(database_url) for _ in events]

    async def one(con: asyncpg.Connection, event: dict[str, object]) -> str:
        async with con.transaction():
            return (await apply_event(con, b.incoming(event), Policy(3600))).outcome

    try:
        outcomes = await asyncio.gather(*(one(c, e) for c, e in zip(connections, events, strict=True)))
        assert sorted(outcomes) in (["applied", "applied"], ["applied", "stale"])
        assert await setup.fetchval("select count(*) from recon.payments") == 1
        assert await h.ledger(setup, "ch_1") == [("charge", 1000, "usd", "ch_1")]
    finally:
        for c in [*connections, setup]:
            await c.close()


async def test_payment_row_lock_serializes_events_of_one_charge(database_url: str) -> None:
    """While one transaction holds the payment, another event of that charge waits for it."""
    setup = await asyncpg.connect(database_url)
    await h.add_order_with_payment(setup, "O-1", "ch_1")
    first, second = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    r1 = b.refund(charge_id="ch_1", amount=300)
    r2 = b.refund(charge_id="ch_1", amount=700)
    try:
        tx = first.transaction()
        await tx.start()
        await apply_event(first, b.incoming(b.refund_event("refund.created", r1)), Policy(3600))

        async def later() -> str:
            async with second.transaction():
                event = b.refund_event("refund.created", r2)
                return (await apply_event(second, b.incoming(event), Policy(3600))).outcome

        waiting = asyncio.create_task(later())
        second_pid = second.get_server_pid()

        async def second_waits_on_a_lock() -> bool:
            return bool(
                await setup.fetchval(
                    "select wait_event_type = 'Lock' from pg_stat_activity where pid = $1", second_pid
                )
            )

        await wait_until(second_waits_on_a_lock, timeout_s=10, what="the second event to wait")
        assert not waiting.done()
        await tx.commit()
        assert await waiting == "applied"
        balance = await h.balance(setup, "ch_1")
        assert (balance["amount_refunded"], balance["status"]) == (1000, "refunded")
    finally:
        for c in (first, second, setup):
            await c.close()


async def test_the_batch_lock_finds_payments_by_index_on_the_workers_sessions(
    con: asyncpg.Connection, database_url: str
) -> None:
    """With a few thousand payments the default random_page_cost (4) makes the batch's lock read
    every order (a seq scan and a hash join) on every batch; the worker's sessions (database.SESSION_SETTINGS)
    price index probes as on SSD, so the plan the worker caches probes the unique indexes."""
    payments = [HostPayment(f"O-{n}", f"ch_{n:05}", 1000, "usd") for n in range(5000)]
    await event_stream.seed(con, payments)
    charge_ids = [f"ch_{n:05}" for n in range(0, 5000, 200)]

    async def generic_plan(connection: asyncpg.Connection) -> str:
        # The plan a long-lived connection keeps for its prepared statement (PG 15 has no
        # EXPLAIN (GENERIC_PLAN)): force it, then EXPLAIN EXECUTE.
        await connection.execute("set plan_cache_mode = force_generic_plan")
        await connection.execute(f"prepare batch_lock(text[], text[]) as {_PAYMENTS_LOCK}")
        # EXECUTE takes no bind parameters: PostgreSQL quotes the arrays into the statement.
        explain = await connection.fetchval(
            "select format('explain execute batch_lock(%L, %L)', $1::text[], $2::text[])",
            charge_ids,
            ["pi_none"],
        )
        rows = await connection.fetch(explain)
        return "\n".join(row[0] for row in rows)

    assert "Seq Scan on orders" in await generic_plan(con)  # the premise: PostgreSQL's default

    worker_session = await asyncpg.connect(database_url, server_settings=SESSION_SETTINGS)
    try:
        plan = await generic_plan(worker_session)
    finally:
        await worker_session.close()
    assert "Seq Scan on orders" not in plan, plan
    assert "Seq Scan on payments" not in plan, plan
    assert "Index Scan using orders_pkey" in plan, plan
