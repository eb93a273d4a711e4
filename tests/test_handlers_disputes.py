"""Disputes (rule 6): the record, balance transactions booked once, fees, disputed flags."""

from __future__ import annotations

import asyncpg
import pytest

from tests import builders as b
from tests import host_records as h


@pytest.fixture
async def con(con: asyncpg.Connection) -> asyncpg.Connection:
    """conftest's connection, with the order O-1 and its payment ch_1 every test here starts from."""
    await h.add_order_with_payment(con, "O-1", "ch_1")
    return con


async def _dispute_rows(con: asyncpg.Connection) -> list[tuple[str, int, str]]:
    rows = await con.fetch(
        "select kind, amount, currency from finance.ledger where kind like 'dispute%' order by entry_id"
    )
    return [(r["kind"], r["amount"], r["currency"]) for r in rows]


async def _flags(con: asyncpg.Connection) -> tuple[bool, bool]:
    row = await con.fetchrow(
        "select p.disputed as p, o.disputed as o from recon.payments p join recon.orders o "
        "on o.id = p.order_id"
    )
    assert row is not None
    return row["p"], row["o"]


WITHDRAWAL = b.balance_transaction(amount=-1000, fee=1500, txn_id="txn_w")
REINSTATEMENT = b.balance_transaction(amount=1000, fee=-1500, txn_id="txn_r", created=b.T0 + 50)


async def test_created_records_the_dispute_and_sets_disputed(con: asyncpg.Connection) -> None:
    """charge.dispute.created records it (finance.open_disputes) and sets disputed on payment and order."""
    dispute = b.dispute(charge_id="ch_1", amount=1000, dispute_id="du_1", reason="fraudulent")
    event = b.dispute_event("charge.dispute.created", dispute)
    result = await h.apply(con, b.incoming(event))
    assert (result.outcome, result.stripe_object_id, result.order_number) == ("applied", "du_1", "O-1")
    assert await _flags(con) == (True, True)
    row = await con.fetchrow("select * from finance.open_disputes")
    assert row is not None
    assert (row["stripe_dispute_id"], row["stripe_charge_id"], row["order_number"]) == ("du_1", "ch_1", "O-1")
    assert (row["amount"], row["currency"], row["reason"], row["status"]) == (
        1000,
        "usd",
        "fraudulent",
        "needs_response",
    )
    assert row["evidence_due_by"] is not None
    assert "dispute_opened" in await h.audit_actions(con, event["id"])
    assert (await h.balance(con, "ch_1"))["dispute_status"] == "needs_response"


async def test_invoice_gets_disputed_too(con: asyncpg.Connection) -> None:
    """The disputed flag is set on the payment's invoice when it belongs to one."""
    invoice_id = await h.add_invoice(con, "I-1")
    await h.add_payment(con, invoice_id=invoice_id, charge_id="ch_2", method="stripe_link")
    dispute = b.dispute(charge_id="ch_2", amount=1000)
    await h.apply(con, b.incoming(b.dispute_event("charge.dispute.created", dispute)))
    assert await con.fetchval("select disputed from recon.invoices") is True


async def test_withdrawal_and_fee_are_booked_once_by_txn_id(con: asyncpg.Connection) -> None:
    """A withdrawal txn books −dispute amount and −fee; every later event carrying it books nothing."""
    dispute = b.dispute(charge_id="ch_1", amount=1000, balance_transactions=[WITHDRAWAL])
    for event_type, created in (
        ("charge.dispute.created", b.T0),
        ("charge.dispute.funds_withdrawn", b.T0 + 1),
        ("charge.dispute.updated", b.T0 + 2),
    ):
        await h.apply(con, b.incoming(b.dispute_event(event_type, dispute, created=created)))
    assert await _dispute_rows(con) == [("dispute_withdrawal", -1000, "usd"), ("dispute_fee", -1500, "usd")]
    assert (await h.audit_actions(con)).count("dispute_funds_withdrawn") == 2


async def test_won_dispute_reinstates_and_returns_the_fee(con: asyncpg.Connection) -> None:
    """Won: reinstatement +amount, the returned (negative) fee books positive, disputed clears,
    outcome recorded, and the dispute leaves open_disputes."""
    opened = b.dispute(charge_id="ch_1", amount=1000, dispute_id="du_1", balance_transactions=[WITHDRAWAL])
    won = b.dispute(
        charge_id="ch_1",
        amount=1000,
        dispute_id="du_1",
        status="won",
        balance_transactions=[WITHDRAWAL, REINSTATEMENT],
    )
    await h.apply(con, b.incoming(b.dispute_event("charge.dispute.created", opened)))
    reinstated = b.dispute_event("charge.dispute.funds_reinstated", won, created=b.T0 + 50)
    closed = b.dispute_event("charge.dispute.closed", won, created=b.T0 + 50)
    await h.apply(con, b.incoming(reinstated))
    await h.apply(con, b.incoming(closed))
    assert await _dispute_rows(con) == [
        ("dispute_withdrawal", -1000, "usd"),
        ("dispute_fee", -1500, "usd"),
        ("dispute_reinstatement", 1000, "usd"),
        ("dispute_fee", 1500, "usd"),
    ]
    assert await _flags(con) == (False, False)
    assert await con.fetchval("select outcome from recon.disputes") == "won"
    assert await con.fetchval("select count(*) from finance.open_disputes") == 0
    assert "dispute_funds_reinstated" in await h.audit_actions(con, reinstated["id"])
    assert "dispute_closed" in await h.audit_actions(con)
    assert (await h.balance(con, "ch_1"))["net_amount"] == 1000


async def test_fee_books_in_the_settlement_currency(con: asyncpg.Connection) -> None:
    """A EUR dispute settled in USD: withdrawal in EUR for the dispute amount, fee in USD."""
    await h.add_order_with_payment(con, "O-EU", "ch_eu", currency="eur")
    txn = b.balance_transaction(amount=-1100, currency="usd", fee=1500)
    dispute = b.dispute(charge_id="ch_eu", amount=1000, currency="eur", balance_transactions=[txn])
    await h.apply(con, b.incoming(b.dispute_event("charge.dispute.created", dispute)))
    assert await _dispute_rows(con) == [("dispute_withdrawal", -1000, "eur"), ("dispute_fee", -1500, "usd")]
    occurred = await con.fetchval(
        "select extract(epoch from occurred_at)::bigint from finance.ledger where kind = 'dispute_fee'"
    )
    assert occurred == txn["created"]


@pytest.mark.parametrize("outcome", ["lost", "warning_closed", "prevented"])
async def test_closed_records_the_outcome_and_clears_disputed(con: asyncpg.Connection, outcome: str) -> None:
    """Every closing status is recorded as the outcome and clears disputed."""
    opened = b.dispute(charge_id="ch_1", amount=1000, dispute_id="du_1")
    closed = {**opened, "status": outcome}
    await h.apply(con, b.incoming(b.dispute_event("charge.dispute.created", opened)))
    await h.apply(con, b.incoming(b.dispute_event("charge.dispute.closed", closed, created=b.T0 + 9)))
    assert await con.fetchval("select outcome from recon.disputes") == outcome
    assert await _flags(con) == (False, False)


async def test_appeal_sets_disputed_again(con: asyncpg.Connection) -> None:
    """A lost dispute that is appealed (appeal_needs_response) is disputed again, its outcome open."""
    lost = b.dispute(charge_id="ch_1", amount=1000, dispute_id="du_1", status="lost")
    await h.apply(con, b.incoming(b.dispute_event("charge.dispute.closed", lost)))
    assert await _flags(con) == (False, False)
    appeal = {**lost, "status": "appeal_needs_response"}
    await h.apply(con, b.incoming(b.dispute_event("charge.dispute.updated", appeal, created=b.T0 + 9)))
    assert await _flags(con) == (True, True)
    assert await con.fetchval("select outcome, closed_at from recon.disputes") is None


async def test_closed_delivered_first_is_not_reopened_by_older_events(con: asyncpg.Connection) -> None:
    """Reverse order: closed (newer) first, then the older created: status stays closed, not disputed;
    the dispute is still audited as opened and closed."""
    opened = b.dispute(charge_id="ch_1", amount=1000, dispute_id="du_1")
    won = {**opened, "status": "won"}
    await h.apply(con, b.incoming(b.dispute_event("charge.dispute.closed", won, created=b.T0 + 9)))
    late = await h.apply(con, b.incoming(b.dispute_event("charge.dispute.created", opened)))
    assert late.outcome == "stale"
    assert await con.fetchval("select status from recon.disputes") == "won"
    assert await _flags(con) == (False, False)
    actions = await h.audit_actions(con)
    assert actions.count("dispute_opened") == 1 and actions.count("dispute_closed") == 1


async def test_same_second_dispute_tie_prefers_the_later_lifecycle_status(
    con: asyncpg.Connection,
) -> None:
    """Same created second: under_review outranks needs_response whatever the delivery order."""
    needs = b.dispute(charge_id="ch_1", amount=1000, dispute_id="du_1")
    review = {**needs, "status": "under_review"}
    await h.apply(con, b.incoming(b.dispute_event("charge.dispute.updated", review, created=b.T0 + 4)))
    await h.apply(con, b.incoming(b.dispute_event("charge.dispute.created", needs, created=b.T0 + 4)))
    assert await con.fetchval("select status from recon.disputes") == "under_review"


async def test_dispute_in_another_currency_books_nothing(con: asyncpg.Connection) -> None:
    """A dispute whose currency is not the payment's: currency_mismatch, nothing recorded."""
    dispute = b.dispute(charge_id="ch_1", amount=1000, currency="gbp", balance_transactions=[WITHDRAWAL])
    result = await h.apply(con, b.incoming(b.dispute_event("charge.dispute.created", dispute)))
    assert result.outcome == "mismatch"
    assert await _dispute_rows(con) == []
    assert await con.fetchval("select count(*) from recon.disputes") == 0


async def test_full_tie_keeps_the_stored_dispute_status(con: asyncpg.Connection) -> None:
    """Same second and same rank (won vs lost): the status stored first is kept; outcome too."""
    won = b.dispute(charge_id="ch_1", amount=1000, dispute_id="du_1", status="won")
    lost = {**won, "status": "lost"}
    await h.apply(con, b.incoming(b.dispute_event("charge.dispute.closed", won, created=b.T0 + 4)))
    result = await h.apply(con, b.incoming(b.dispute_event("charge.dispute.closed", lost, created=b.T0 + 4)))
    assert result.outcome == "stale"
    row = await con.fetchrow("select status, outcome from recon.disputes")
    assert row is not None and (row["status"], row["outcome"]) == ("won", "won")
