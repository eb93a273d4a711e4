"""The schema's own guarantees: append-only ledger, uniqueness, constraints, finance views and role."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import get_args

import asyncpg
import pytest

from handlers.finance_exceptions import ExceptionKind
from tests import builders as b
from tests import host_records as h
from worker.workbench.exceptions import KINDS, RETRYABLE

FINANCE_COLUMNS = {
    "ledger": [
        "entry_id",
        "booked_at",
        "occurred_at",
        "kind",
        "amount",
        "currency",
        "amount_decimal",
        "order_number",
        "invoice_number",
        "stripe_charge_id",
        "stripe_object_id",
        "stripe_event_id",
    ],
    "payment_balances": [
        "stripe_charge_id",
        "order_number",
        "invoice_number",
        "currency",
        "amount",
        "amount_refunded",
        "refundable_amount",
        "net_amount",
        "status",
        "disputed",
        "dispute_status",
    ],
    "open_disputes": [
        "stripe_dispute_id",
        "stripe_charge_id",
        "order_number",
        "invoice_number",
        "amount",
        "currency",
        "reason",
        "status",
        "evidence_due_by",
    ],
    "exceptions": [
        "id",
        "raised_at",
        "kind",
        "stripe_event_id",
        "stripe_object_id",
        "detail",
        "resolved_at",
        "resolved_by",
        "resolution_note",
    ],
    "events": [
        "stripe_event_id",
        "type",
        "created",
        "received_at",
        "processed_at",
        "outcome",
        "attempts",
        "stripe_object_id",
        "stripe_charge_id",
        "order_number",
        "invoice_number",
    ],
    **{
        f"{owner}_balances": [
            f"{owner}_number",
            "currency",
            "amount_total",
            "captured",
            "refunded",
            "refundable_now",
            "net_amount",
            "balance_due",
            "status",
            "disputed",
        ]
        for owner in ("order", "invoice")
    },
    "refunds": [
        "stripe_refund_id",
        "stripe_charge_id",
        "order_number",
        "invoice_number",
        "amount",
        "currency",
        "amount_decimal",
        "status",
        "reason",
        "failure_reason",
        "source",
        "refund_request_id",
        "note",
        "requested_by",
        "created_at",
    ],
    "refund_requests": [
        "id",
        "requested_at",
        "requested_by",
        "order_number",
        "invoice_number",
        "amount",
        "currency",
        "reason",
        "note",
        "state",
        "error",
    ],
    "disputes": [
        "stripe_dispute_id",
        "stripe_charge_id",
        "order_number",
        "invoice_number",
        "amount",
        "currency",
        "reason",
        "status",
        "evidence_due_by",
        "opened_at",
        "closed_at",
    ],
}


async def _booked_charge(con: asyncpg.Connection) -> str:
    await h.add_order_with_payment(con, "O-1", "ch_schema")
    await h.apply(con, b.incoming(b.charge_event("charge.succeeded", b.charge(charge_id="ch_schema"))))
    return "ch_schema"


async def test_ledger_refuses_update_delete_and_truncate(con: asyncpg.Connection) -> None:
    """The database itself keeps the ledger append-only: UPDATE, DELETE and TRUNCATE all fail."""
    await _booked_charge(con)
    for statement in (
        "update recon.ledger_entries set amount = 1",
        "delete from recon.ledger_entries",
        "truncate recon.ledger_entries",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await con.execute(statement)
    assert await con.fetchval("select count(*) from recon.ledger_entries") == 1


async def test_ledger_books_each_kind_and_source_once(con: asyncpg.Connection) -> None:
    """A second row with the same (kind, source id) is refused by a unique key."""
    await _booked_charge(con)
    with pytest.raises(asyncpg.UniqueViolationError):
        await con.execute(
            "insert into recon.ledger_entries (occurred_at, kind, source_id, amount, currency, "
            "payment_id, stripe_object_id, stripe_event_id) select occurred_at, kind, source_id, "
            "amount, currency, payment_id, stripe_object_id, 'evt_x' from recon.ledger_entries"
        )


async def test_inbox_has_one_row_per_event_id(con: asyncpg.Connection) -> None:
    """The event id is the inbox's primary key."""
    insert = (
        "insert into recon.event_inbox (event_id, type, created, outcome) "
        "values ('evt_1', 'charge.succeeded', now(), 'applied')"
    )
    await con.execute(insert)
    with pytest.raises(asyncpg.UniqueViolationError):
        await con.execute(insert)


async def test_payment_belongs_to_exactly_one_of_order_or_invoice(con: asyncpg.Connection) -> None:
    """payments needs exactly one of order_id / invoice_id."""
    order_id = await h.add_order(con, "O-1")
    invoice_id = await h.add_invoice(con, "I-1")
    with pytest.raises(asyncpg.CheckViolationError):
        await h.add_payment(con, order_id=order_id, invoice_id=invoice_id, charge_id="ch_a")
    with pytest.raises(asyncpg.CheckViolationError):
        await h.add_payment(con, charge_id="ch_b")


async def test_host_status_values_are_checked(con: asyncpg.Connection) -> None:
    """Order status, invoice payment_link_status and payment method accept only the documented values."""
    with pytest.raises(asyncpg.CheckViolationError):
        await h.add_order(con, "O-1", status="shipped")
    invoice_id = await h.add_invoice(con, "I-1")
    with pytest.raises(asyncpg.CheckViolationError):
        await con.execute(
            "update recon.invoices set payment_link_status = 'overdue' where id = $1", invoice_id
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await h.add_payment(con, invoice_id=invoice_id, charge_id="ch_a", method="paypal")


async def test_exception_kinds_agree_in_schema_rules_and_commands(con: asyncpg.Connection) -> None:
    """The kinds are written three times, because the import contracts keep the rules (handlers) and
    the operator's actions (workbench) apart: the schema's check, the rules' type and the list that
    `recon exceptions list --kind` and the console accept must name the same kinds."""
    definition = await con.fetchval(
        "select pg_get_constraintdef(oid) from pg_constraint where conname = 'exceptions_kind_check'"
    )
    in_schema = set(re.findall(r"'([a-z_]+)'::text", definition))
    assert in_schema == set(get_args(ExceptionKind)) == set(KINDS)
    assert len(KINDS) == len(in_schema)
    assert set(RETRYABLE) <= in_schema


async def test_host_can_insert_with_only_its_own_columns(con: asyncpg.Connection) -> None:
    """Every worker-maintained column has a default: the host writes only its own columns."""
    payment_id = await h.add_order_with_payment(con, "O-1", "ch_a")
    row = await con.fetchrow("select * from recon.payments where id = $1", payment_id)
    assert row is not None
    assert (row["status"], row["amount_refunded"], row["disputed"]) == ("pending", 0, False)


async def test_finance_views_have_exactly_the_contract_columns(con: asyncpg.Connection) -> None:
    """Each finance view has the documented columns (docs/finance.md), in that order."""
    for view, columns in FINANCE_COLUMNS.items():
        rows = await con.fetch(
            "select column_name from information_schema.columns "
            "where table_schema = 'finance' and table_name = $1 order by ordinal_position",
            view,
        )
        assert [r["column_name"] for r in rows] == columns, view


@pytest.mark.parametrize(
    ("currency", "amount", "expected"),
    [
        ("jpy", 110000, Decimal("110000")),
        ("krw", -5000, Decimal("-5000")),
        ("usd", 1050, Decimal("10.50")),
        ("eur", -1, Decimal("-0.01")),
        ("kwd", 1005, Decimal("1.005")),
        ("bhd", -250, Decimal("-0.250")),
    ],
)
async def test_amount_decimal_uses_the_currency_exponent(
    con: asyncpg.Connection, currency: str, amount: int, expected: Decimal
) -> None:
    """amount_decimal is major units: zero-decimal (JPY) and three-decimal (KWD) are right."""
    value = await con.fetchval("select finance.major_units($1, $2)::text", amount, currency)
    assert Decimal(value) == expected
    assert value == str(expected)


async def test_jpy_charge_shows_whole_yen_in_the_ledger(con: asyncpg.Connection) -> None:
    """A JPY 110000 charge is ¥110,000 in finance.ledger.amount_decimal, not ¥1,100."""
    await h.add_order_with_payment(con, "O-JP", "ch_jpy", amount=110000, currency="jpy")
    charge = b.charge(charge_id="ch_jpy", amount=110000, currency="jpy")
    await h.apply(con, b.incoming(b.charge_event("charge.succeeded", charge)))
    row = await con.fetchrow("select amount, amount_decimal::text as d from finance.ledger")
    assert row is not None
    assert (row["amount"], row["d"]) == (110000, "110000")


async def test_recon_finance_reads_finance_only(con: asyncpg.Connection) -> None:
    """recon_finance can SELECT every finance view, but cannot read recon.* or write anything."""
    await _booked_charge(con)
    async with con.transaction():
        await con.execute("set local role recon_finance")
        for view in FINANCE_COLUMNS:
            await con.fetch(f"select * from finance.{view}")  # noqa: S608 - fixed names
        assert await con.fetchval("select count(*) from finance.ledger") == 1
        sp = con.transaction()
        for statement in (
            "select * from recon.ledger_entries",
            "select * from recon.payments",
            "insert into finance.exceptions (kind) values ('over_refund')",
            "update finance.exceptions set kind = 'drift'",
        ):
            await sp.start()
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await con.execute(statement)
            await sp.rollback()
            sp = con.transaction()


async def test_recon_finance_is_a_nologin_role(con: asyncpg.Connection) -> None:
    """recon_finance is a group role: it cannot log in itself."""
    assert await con.fetchval("select rolcanlogin from pg_roles where rolname = 'recon_finance'") is False
