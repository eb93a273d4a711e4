"""Issue 11, item 4: a database filled under schema 0001-0003 is brought forward by 0004's one-off pass.

The database is migrated to 0003 only (as ``recon migrate`` would have left it before 0004), then
filled with SQL in the shapes 0002/0003 define, as the old code would have written them: host
payments whose `charge` row is the host's amount, statuses computed from one payment at a time,
and no `capture_adjustment`, `voided` or `charged_back` anywhere. Then ``recon migrate`` applies
0004 and anything later, and the tests check what the contract asks of the migration: the old
ledger rows stay exactly as they were (append-only), the pass (``recon.bring_forward``) books the
adjustments and statuses the new rules imply (rules 5 and 7), and running it again changes nothing.

The cases, one order or invoice each:

* ``ORD-PARTIAL``: a host payment of 1000 captured for 600 (its charge row says 1000), refunded 100.
* ``ORD-EXPIRED``: a host payment of 2500 whose authorisation expired: a charge row of 2500 and
  the release refund (reason ``expired_uncaptured_charge``) the old code saved from a
  ``charge.refunded`` showing ``captured: false``; ``charge.expired`` was never queued then.
* ``INV-LOST``: a host payment of 2000 whose dispute closed lost (withdrawal and fee booked).
* ``ORD-SPLIT``: two payments, 600 fully refunded and 400 with an open dispute and a refund that
  failed (booked and reversed); the old code marked the order `refunded` and cleared its flag.
* ``INV-META``: a payment the worker created from metadata, booked at its amount_captured of 700
  of 1000: nothing to adjust.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest_asyncio

from tests import servers
from worker.ops import migrate

OLD_VERSIONS = ("0001_schemas", "0002_recon_tables", "0003_finance_views")
T = datetime(2025, 11, 3, 9, 0, tzinfo=UTC)
RELEASE_REASON = "expired_uncaptured_charge"


async def migrate_to_0003(database_url: str) -> None:
    """Apply 0001-0003 and record them as ``recon migrate`` does, so that it applies only the rest."""
    old = [m for m in migrate.load_migrations() if m.version in OLD_VERSIONS]
    assert [m.version for m in old] == list(OLD_VERSIONS)
    con = await asyncpg.connect(database_url)
    try:
        await con.execute(
            """
            create schema if not exists recon;
            create table if not exists recon.schema_migrations (
                version text primary key,
                checksum text not null,
                applied_at timestamptz not null default now()
            )
            """
        )
        for migration in old:
            async with con.transaction():
                await con.execute(migration.sql)
                await con.execute(
                    "insert into recon.schema_migrations (version, checksum) values ($1, $2)",
                    migration.version,
                    migration.checksum,
                )
    finally:
        await con.close()


@pytest_asyncio.fixture
async def old_database_url() -> AsyncIterator[str]:
    """A database of this test's own, migrated to 0003 only; dropped afterwards."""
    name = f"recon_mf_{uuid.uuid4().hex[:12]}"
    url = servers.database_url(name)
    try:
        await migrate.create_database(url)
        await migrate_to_0003(url)
        yield url
    finally:
        await servers.drop_database(name)


# --- the old code's rows -----------------------------------------------------------------------


@dataclass(frozen=True)
class OldPayment:
    """A payments row as the old worker left it."""

    charge_id: str
    amount: int
    currency: str
    status: str
    amount_captured: int | None
    amount_refunded: int
    disputed: bool = False
    created_by_worker: bool = False
    snapshot_at: datetime | None = None


async def _owner(con: asyncpg.Connection, number: str, amount_total: int, status: str, disputed: bool) -> int:
    if number.startswith("INV"):
        sql = (
            "insert into recon.invoices (number, currency, amount_total, bill_to, payment_link_status,"
            " disputed) values ($1, 'eur', $2, 'Example GmbH', $3, $4) returning id"
        )
    else:
        sql = (
            "insert into recon.orders (number, currency, amount_total, buyer_email, status, disputed)"
            " values ($1, 'eur', $2, 'buyer@example.com', $3, $4) returning id"
        )
    return int(await con.fetchval(sql, number, amount_total, status, disputed))


async def _payment(con: asyncpg.Connection, number: str, owner_id: int, p: OldPayment) -> int:
    is_invoice = number.startswith("INV")
    return int(
        await con.fetchval(
            """
            insert into recon.payments
                (stripe_charge_id, order_id, invoice_id, method, currency, amount, status, amount_captured,
                 amount_refunded, charge_booked, disputed, created_by_worker, recorded_at,
                 snapshot_created, snapshot_rank, snapshot_event_id)
            values ($1, $2, $3, $4, $5, $6, $7, $8, $9, true, $10, $11, $12, $13, $14, $15)
            returning id
            """,
            p.charge_id,
            None if is_invoice else owner_id,
            owner_id if is_invoice else None,
            "stripe_link" if is_invoice else "stripe_card",
            p.currency,
            p.amount,
            p.status,
            p.amount_captured,
            p.amount_refunded,
            p.disputed,
            p.created_by_worker,
            T - timedelta(days=1),
            p.snapshot_at,
            2 if p.snapshot_at is not None else None,
            f"evt_snap_{p.charge_id}" if p.snapshot_at is not None else None,
        )
    )


async def _row(
    con: asyncpg.Connection,
    payment_id: int,
    kind: str,
    source_id: str,
    amount: int,
    at: datetime,
    object_id: str,
    currency: str = "eur",
) -> None:
    """One ledger row in 0002's shape: (kind, source_id) once; the charge row keyed by the payment."""
    await con.execute(
        "insert into recon.ledger_entries (occurred_at, kind, source_id, amount, currency, payment_id,"
        " stripe_object_id, stripe_event_id) values ($1, $2, $3, $4, $5, $6, $7, $8)",
        at,
        kind,
        source_id,
        amount,
        currency,
        payment_id,
        object_id,
        f"evt_old_{kind}_{source_id}",
    )


async def _charge_row(con: asyncpg.Connection, payment_id: int, amount: int, charge_id: str) -> None:
    await _row(con, payment_id, "charge", f"payment:{payment_id}", amount, T, charge_id)


async def _refund(
    con: asyncpg.Connection, payment_id: int, refund_id: str, amount: int, status: str, reason: str | None
) -> None:
    """A recon.refunds row as the old worker kept it (status by created and rank)."""
    rank = {"pending": 2, "succeeded": 3, "failed": 4}[status]
    await con.execute(
        "insert into recon.refunds (id, payment_id, amount, currency, reason, is_release, status,"
        " status_created, status_rank, created) values ($1, $2, $3, 'eur', $4, $5, $6, $7, $8, $9)",
        refund_id,
        payment_id,
        amount,
        reason,
        reason == RELEASE_REASON,
        status,
        T + timedelta(days=2),
        rank,
        T + timedelta(hours=1),
    )


async def _dispute(
    con: asyncpg.Connection, payment_id: int, dispute_id: str, amount: int, status: str
) -> None:
    closed = status in ("won", "lost", "warning_closed", "prevented")
    await con.execute(
        "insert into recon.disputes (id, payment_id, amount, currency, reason, status, status_created,"
        " status_rank, outcome, evidence_due_by, created)"
        " values ($1, $2, $3, 'eur', 'fraudulent', $4, $5, $6, $7, $8, $9)",
        dispute_id,
        payment_id,
        amount,
        status,
        T + timedelta(days=20),
        5 if closed else 3,
        status if closed else None,
        T + timedelta(days=10),
        T + timedelta(days=3),
    )


async def _partial(con: asyncpg.Connection) -> None:
    """ORD-PARTIAL: authorised 1000, captured 600, 100 refunded; the old charge row says 1000."""
    order = await _owner(con, "ORD-PARTIAL", 1000, "partially_refunded", False)
    p = OldPayment(
        "ch_mf_partial", 1000, "eur", "partially_refunded", 600, 100, snapshot_at=T + timedelta(hours=5)
    )
    pid = await _payment(con, "ORD-PARTIAL", order, p)
    await _charge_row(con, pid, 1000, p.charge_id)
    await _refund(con, pid, "re_mf_partial", 100, "succeeded", "requested_by_customer")
    await _row(con, pid, "refund", "re_mf_partial", -100, T + timedelta(hours=1), "re_mf_partial")


async def _expired(con: asyncpg.Connection) -> None:
    """ORD-EXPIRED: authorised 2500, never captured, released after 7 days; old status paid."""
    order = await _owner(con, "ORD-EXPIRED", 2500, "paid", False)
    p = OldPayment("ch_mf_expired", 2500, "eur", "paid", None, 0, snapshot_at=T + timedelta(days=7))
    pid = await _payment(con, "ORD-EXPIRED", order, p)
    await _charge_row(con, pid, 2500, p.charge_id)
    await _refund(con, pid, "re_mf_expired", 2500, "succeeded", RELEASE_REASON)


async def _lost(con: asyncpg.Connection) -> None:
    """INV-LOST: a dispute on 2000 closed lost; the withdrawal and the fee were booked."""
    invoice = await _owner(con, "INV-LOST", 2000, "paid", False)
    p = OldPayment("ch_mf_lost", 2000, "eur", "paid", 2000, 0, snapshot_at=T)
    pid = await _payment(con, "INV-LOST", invoice, p)
    await _charge_row(con, pid, 2000, p.charge_id)
    await _dispute(con, pid, "du_mf_lost", 2000, "lost")
    await _row(con, pid, "dispute_withdrawal", "txn_mf_lost", -2000, T + timedelta(days=3), "du_mf_lost")
    await _row(con, pid, "dispute_fee", "txn_mf_lost", -1500, T + timedelta(days=3), "du_mf_lost")


async def _split(con: asyncpg.Connection) -> None:
    """ORD-SPLIT: 600 refunded in full, 400 disputed (open) with a refund booked and reversed;
    the old code set the order from payment A alone: refunded, not disputed."""
    order = await _owner(con, "ORD-SPLIT", 1000, "refunded", False)
    a = OldPayment("ch_mf_split_a", 600, "eur", "refunded", 600, 600, snapshot_at=T)
    b = OldPayment("ch_mf_split_b", 400, "eur", "paid", 400, 0, disputed=True, snapshot_at=T)
    pa = await _payment(con, "ORD-SPLIT", order, a)
    pb = await _payment(con, "ORD-SPLIT", order, b)
    await _charge_row(con, pa, 600, a.charge_id)
    await _charge_row(con, pb, 400, b.charge_id)
    await _refund(con, pa, "re_mf_split_a", 600, "succeeded", "requested_by_customer")
    await _row(con, pa, "refund", "re_mf_split_a", -600, T + timedelta(hours=1), "re_mf_split_a")
    await _refund(con, pb, "re_mf_split_f", 100, "failed", "requested_by_customer")
    await _row(con, pb, "refund", "re_mf_split_f", -100, T + timedelta(hours=1), "re_mf_split_f")
    # The old rule dated the reversal on the refund's own day: it stays so (append-only).
    await _row(con, pb, "refund_reversal", "re_mf_split_f", 100, T + timedelta(hours=1), "re_mf_split_f")
    await _dispute(con, pb, "du_mf_split", 400, "needs_response")
    await _row(con, pb, "dispute_withdrawal", "txn_mf_split", -400, T + timedelta(days=3), "du_mf_split")


async def _metadata(con: asyncpg.Connection) -> None:
    """INV-META: the worker created the payment from metadata and booked amount_captured (700)."""
    invoice = await _owner(con, "INV-META", 1000, "paid", False)
    p = OldPayment("ch_mf_meta", 1000, "eur", "paid", 700, 0, created_by_worker=True, snapshot_at=T)
    pid = await _payment(con, "INV-META", invoice, p)
    await _charge_row(con, pid, 700, p.charge_id)


async def fill_as_the_old_code_did(database_url: str) -> None:
    """The five cases above, written in one transaction."""
    con = await asyncpg.connect(database_url)
    try:
        async with con.transaction():
            for case in (_partial, _expired, _lost, _split, _metadata):
                await case(con)
    finally:
        await con.close()


# --- reading back ------------------------------------------------------------------------------

_LEDGER = """
select l.id, l.booked_at, l.occurred_at, l.kind, l.source_id, l.amount, l.currency, l.payment_id,
       l.stripe_object_id, l.stripe_event_id
from recon.ledger_entries l order by l.id
"""


async def fetch_all(database_url: str, sql: str) -> list[dict[str, Any]]:
    con = await asyncpg.connect(database_url)
    try:
        return [dict(r) for r in await con.fetch(sql)]
    finally:
        await con.close()


async def state(database_url: str) -> dict[str, Any]:
    """Everything the pass may write: the ledger, payments, owners, audit rows and exceptions."""
    return {
        "ledger": await fetch_all(database_url, _LEDGER),
        "payments": await fetch_all(database_url, "select * from recon.payments order by id"),
        "orders": await fetch_all(database_url, "select * from recon.orders order by id"),
        "invoices": await fetch_all(database_url, "select * from recon.invoices order by id"),
        "audit": await fetch_all(database_url, "select * from recon.audit_log order by id"),
        "exceptions": await fetch_all(database_url, "select * from recon.exceptions order by id"),
    }


async def brought_forward(database_url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fill as the old code did, then ``recon migrate``: (state before, state after)."""
    await fill_as_the_old_code_did(database_url)
    before = await state(database_url)
    applied = await migrate.apply_migrations(database_url)
    assert applied and applied[0] == "0004_money_truth", applied
    return before, await state(database_url)


def _new_rows(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    old_ids = {r["id"] for r in before["ledger"]}
    return [r for r in after["ledger"] if r["id"] not in old_ids]


def _payment_ids(after: dict[str, Any]) -> dict[str, int]:
    return {p["stripe_charge_id"]: p["id"] for p in after["payments"]}


# --- the tests ---------------------------------------------------------------------------------


async def test_old_ledger_rows_stay_exactly_as_they_were(old_database_url: str) -> None:
    """Append-only: every row booked under the old rules is still there, every column unchanged,
    the reversal dated on the refund's own day included."""
    before, after = await brought_forward(old_database_url)
    kept = {r["id"]: r for r in after["ledger"]}
    assert [kept.get(r["id"]) for r in before["ledger"]] == before["ledger"]


async def test_the_pass_books_the_capture_adjustments_the_captured_amounts_imply(
    old_database_url: str,
) -> None:
    """Rule 7: the partial capture gets -400 (charge rows 600) and the expired authorisation
    -2500 (charge rows 0), each keyed by the payment and the amount it settles on and dated when
    the charge last showed it; nothing else is booked (the metadata payment's row was right)."""
    before, after = await brought_forward(old_database_url)
    ids = _payment_ids(after)
    new = sorted(
        (r["kind"], r["source_id"], r["amount"], r["currency"], r["stripe_object_id"], r["occurred_at"])
        for r in _new_rows(before, after)
    )
    partial, expired = ids["ch_mf_partial"], ids["ch_mf_expired"]
    assert new == sorted(
        [
            (
                "capture_adjustment",
                f"payment:{partial}:captured:600",
                -400,
                "eur",
                "ch_mf_partial",
                T + timedelta(hours=5),
            ),
            (
                "capture_adjustment",
                f"payment:{expired}:captured:0",
                -2500,
                "eur",
                "ch_mf_expired",
                T + timedelta(days=7),
            ),
        ]
    )
    balances = {
        r["stripe_charge_id"]: (r["amount"], r["net_amount"])
        for r in await fetch_all(old_database_url, "select * from finance.payment_balances")
    }
    assert balances["ch_mf_partial"] == (600, 500)
    assert balances["ch_mf_expired"] == (0, 0)
    assert balances["ch_mf_meta"] == (700, 700)


async def test_the_pass_sets_the_statuses_the_new_rules_imply(old_database_url: str) -> None:
    """Rule 5: the expired payment and its order are voided; the lost dispute charges the payment
    and its invoice back (refundable 0); the split order takes its status from both payments
    (partially refunded, not refunded) and its flag from the open dispute on one of them."""
    _before, after = await brought_forward(old_database_url)
    payments = {p["stripe_charge_id"]: p["status"] for p in after["payments"]}
    assert payments == {
        "ch_mf_partial": "partially_refunded",
        "ch_mf_expired": "voided",
        "ch_mf_lost": "charged_back",
        "ch_mf_split_a": "refunded",
        "ch_mf_split_b": "paid",
        "ch_mf_meta": "paid",
    }
    owners = {
        r["number"]: (
            r["status"],
            r["disputed"],
            r["captured"],
            r["refunded"],
            r["refundable_now"],
            r["balance_due"],
        )
        for r in await fetch_all(
            old_database_url,
            "select order_number as number, status, disputed, captured, refunded, refundable_now, balance_due"
            " from finance.order_balances union all "
            "select invoice_number, status, disputed, captured, refunded, refundable_now, balance_due"
            " from finance.invoice_balances",
        )
    }
    assert owners == {
        "ORD-PARTIAL": ("partially_refunded", False, 600, 100, 500, 500),
        "ORD-EXPIRED": ("voided", False, 0, 0, 0, 2500),
        "INV-LOST": ("charged_back", False, 2000, 0, 0, 0),
        "ORD-SPLIT": ("partially_refunded", True, 1000, 600, 0, 600),
        "INV-META": ("paid", False, 700, 0, 700, 300),
    }
    closed = await fetch_all(old_database_url, "select stripe_dispute_id, closed_at from finance.disputes")
    assert {r["stripe_dispute_id"]: r["closed_at"] for r in closed} == {
        "du_mf_lost": T + timedelta(days=20),
        "du_mf_split": None,
    }


async def test_the_pass_audits_what_it_changes(old_database_url: str) -> None:
    """Rule 9: every change writes an audit row — a capture_adjusted row for each adjustment the
    pass books, and a status_changed row for each payment, order and invoice whose status or flag
    it moves."""
    before, after = await brought_forward(old_database_url)
    new_audit = after["audit"][len(before["audit"]) :]
    adjusted = sorted(a["payment_id"] for a in new_audit if a["action"] == "capture_adjusted")
    ids = _payment_ids(after)
    details = [json.loads(a["detail"]) for a in new_audit if a["action"] == "status_changed"]
    moved = {(d.get("object"), d.get("field"), d.get("to")) for d in details}
    due = {
        ("payment", "status", "voided"),
        ("payment", "status", "charged_back"),
        ("order", "status", "voided"),
        ("order", "status", "partially_refunded"),
        ("order", "disputed", True),
        ("invoice", "payment_link_status", "charged_back"),
    }
    assert (adjusted, due - moved) == (sorted([ids["ch_mf_partial"], ids["ch_mf_expired"]]), set())


async def test_running_the_pass_again_changes_nothing(old_database_url: str) -> None:
    """recon.bring_forward a second time (and recon migrate again) books nothing, moves no status
    and writes no audit row or exception."""
    _before, after = await brought_forward(old_database_url)
    assert await migrate.apply_migrations(old_database_url) == []
    con = await asyncpg.connect(old_database_url)
    try:
        await con.execute("select recon.bring_forward()")
    finally:
        await con.close()
    assert await state(old_database_url) == after
