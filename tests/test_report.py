"""``recon report`` prints exactly what the finance views hold, in table, CSV and JSON.

Ledger rows, disputes and exceptions are written straight into the worker's tables; the
expected numbers are then computed from the finance views, independently of the report's SQL,
and a few are pinned by hand (JPY has no minor unit, KWD has three decimals).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from tests.harness import fetch
from worker.ops import report
from worker.settings import Settings

SINCE = datetime(2026, 3, 1, tzinfo=UTC)
KINDS = {
    "refund": "refunds",
    "refund_reversal": "refund_reversals",
    "dispute_withdrawal": "dispute_withdrawals",
    "dispute_fee": "dispute_fees",
    "dispute_reinstatement": "dispute_reinstatements",
    "capture_adjustment": "capture_adjustments",
    "processing_fee": "processing_fees",
}
MONEY_KEYS = [*KINDS.values(), "net"]
Movements = dict[tuple[str, str], dict[str, Decimal]]


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# (charge, kind, signed minor units, currency, occurred_at)
LEDGER = [
    ("ch_usd", "charge", 10_000, "usd", "2026-03-01T09:00"),
    ("ch_usd", "processing_fee", -320, "usd", "2026-03-01T09:00"),
    ("ch_usd", "refund", -2_500, "usd", "2026-03-01T18:00"),
    ("ch_usd", "refund", -999, "usd", "2026-02-27T12:00"),  # before --since
    ("ch_usd", "refund", -1_234, "usd", "2026-03-02T10:00"),
    ("ch_usd", "refund", -1, "usd", "2026-03-02T23:59:59"),  # still the 2nd in UTC
    ("ch_usd", "refund_reversal", 1, "usd", "2026-03-03T00:00:01"),  # the 3rd in UTC
    ("ch_jpy", "charge", 110_000, "jpy", "2026-03-01T09:00"),
    ("ch_jpy", "refund", -110_000, "jpy", "2026-03-02T15:00"),
    ("ch_jpy", "dispute_withdrawal", -5_000, "jpy", "2026-03-03T08:00"),
    ("ch_jpy", "dispute_fee", -1_500, "usd", "2026-03-03T08:00"),  # settlement currency
    ("ch_jpy", "dispute_reinstatement", 5_000, "jpy", "2026-03-04T08:00"),
    ("ch_jpy", "dispute_fee", 1_500, "usd", "2026-03-04T08:00"),
    ("ch_kwd", "charge", 25_005, "kwd", "2026-03-01T09:00"),
    ("ch_kwd", "capture_adjustment", -5_000, "kwd", "2026-03-01T09:30"),
    ("ch_kwd", "refund", -1_005, "kwd", "2026-03-02T11:00"),
    ("ch_kwd", "refund", -20, "kwd", "2026-03-02T12:00"),
    ("ch_kwd", "dispute_withdrawal", -25_005, "kwd", "2026-03-05T08:00"),
    ("ch_kwd", "dispute_fee", -1_500, "usd", "2026-03-05T08:00"),
]
# (dispute, charge, amount, currency, status, evidence due)
DISPUTES = [
    ("dp_kwd", "ch_kwd", 25_005, "kwd", "needs_response", "2026-03-20T23:59:59"),
    ("dp_jpy", "ch_jpy", 5_000, "jpy", "under_review", "2026-03-10T23:59:59"),
    ("dp_won", "ch_jpy", 5_000, "jpy", "won", "2026-03-09T23:59:59"),
    ("dp_lost", "ch_kwd", 20_005, "kwd", "lost", "2026-03-04T23:59:59"),
    ("dp_nodue", "ch_usd", 10_000, "usd", "warning_needs_response", None),
]
# (payout, amount, currency, arrival, reconciliation, difference)
PAYOUTS = [
    ("po_old", 50_000, "usd", "2026-02-20T00:00", "matched", 0),
    ("po_jpy", 200_000, "jpy", "2026-03-03T00:00", "differences", -1_500),
    ("po_usd", 9_680, "usd", "2026-03-04T00:00", "matched", 0),
]
# (kind, resolved)
EXCEPTIONS = [
    ("unmatched_charge", False),
    ("unmatched_charge", False),
    ("over_refund", False),
    ("dead_lettered", True),
]


async def _seed_payments(con: asyncpg.Connection) -> dict[str, int]:
    payments: dict[str, int] = {}
    for charge, currency, amount in (("ch_usd", "usd", 10_000), ("ch_jpy", "jpy", 110_000)):
        order_id = await con.fetchval(
            "insert into recon.orders (number, currency, amount_total) values ($1, $2, $3) returning id",
            f"ORD-{currency}",
            currency,
            amount,
        )
        payments[charge] = await con.fetchval(
            "insert into recon.payments (stripe_charge_id, order_id, method, currency, amount)"
            " values ($1, $2, 'stripe_card', $3, $4) returning id",
            charge,
            order_id,
            currency,
            amount,
        )
    invoice_id = await con.fetchval(
        "insert into recon.invoices (number, currency, amount_total)"
        " values ('INV-kwd', 'kwd', 25005) returning id"
    )
    payments["ch_kwd"] = await con.fetchval(
        "insert into recon.payments (stripe_charge_id, invoice_id, method, currency, amount)"
        " values ('ch_kwd', $1, 'stripe_link', 'kwd', 25005) returning id",
        invoice_id,
    )
    return payments


async def _seed(database_url: str) -> None:
    con = await asyncpg.connect(database_url)
    try:
        payments = await _seed_payments(con)
        for n, (charge, kind, amount, currency, occurred) in enumerate(LEDGER):
            await con.execute(
                """
                insert into recon.ledger_entries (occurred_at, kind, source_id, amount, currency, payment_id,
                                                  stripe_object_id, stripe_event_id)
                values ($1, $2, $3, $4, $5, $6, $3, $7)
                """,
                _t(occurred),
                kind,
                f"src_{n}",
                amount,
                currency,
                payments[charge],
                f"evt_{n}",
            )
        for dispute, charge, amount, currency, status, due in DISPUTES:
            await con.execute(
                """
                insert into recon.disputes (id, payment_id, amount, currency, reason, status, status_created,
                                            status_rank, evidence_due_by, created, closed_at)
                values ($1, $2, $3, $4, 'fraudulent', $5, now(), 1, $6, now(),
                        case when $5::text = 'lost' then $6::timestamptz end)
                """,
                dispute,
                payments[charge],
                amount,
                currency,
                status,
                _t(due) if due else None,
            )
        for payout, amount, currency, arrival, reconciliation, difference in PAYOUTS:
            await con.execute(
                """
                insert into recon.payouts (id, amount, currency, arrival_date, automatic, status,
                                           status_created, status_rank, reconciliation, difference_amount)
                values ($1, $2, $3, $4, true, 'paid', now(), 3, $5, $6)
                """,
                payout,
                amount,
                currency,
                _t(arrival).date(),
                reconciliation,
                difference,
            )
        for n, (kind, resolved) in enumerate(EXCEPTIONS):
            # One cause each (an open exception is raised once per kind, event and object).
            await con.execute(
                "insert into recon.exceptions (kind, resolved_at, stripe_object_id)"
                " values ($1, case when $2 then now() end, $3)",
                kind,
                resolved,
                f"obj_{n}",
            )
    finally:
        await con.close()


async def _expected_movements(database_url: str, since: datetime | None, currency: str | None) -> Movements:
    """Sums straight from finance.ledger, grouped the way finance reads it."""
    rows = await fetch(
        database_url,
        """
        select to_char(occurred_at at time zone 'UTC', 'YYYY-MM-DD') as day, currency, kind,
               sum(amount_decimal) as total
        from finance.ledger
        where kind <> 'charge'
          and occurred_at >= coalesce($1::timestamptz, '-infinity')
          and currency = coalesce($2::text, currency)
        group by 1, 2, 3
        """,
        since,
        currency,
    )
    expected: Movements = defaultdict(lambda: dict.fromkeys(MONEY_KEYS, Decimal(0)))
    for r in rows:
        cell = expected[(r["day"], r["currency"])]
        cell[KINDS[r["kind"]]] += r["total"]
        cell["net"] += r["total"]
    return dict(expected)


def _from_table(output: str) -> Movements:
    block = output.split("\n\n")[2]
    assert block.startswith("Every movement but charges, by kind, day (UTC) and currency")
    found: Movements = {}
    for line in block.splitlines():
        if re.match(r"\d{4}-\d{2}-\d{2} ", line):
            day, currency, *amounts = line.split()
            found[(day, currency)] = {
                k: Decimal(a.replace(",", "")) for k, a in zip(MONEY_KEYS, amounts, strict=True)
            }
    return found


def _csv_blocks(output: str) -> dict[str, list[dict[str, str]]]:
    """The three blocks in their fixed order; every data row names its section."""
    names = ["summary", "movements", "payouts", "open_disputes", "open_exceptions"]
    blocks = [list(csv.DictReader(io.StringIO(block))) for block in output.split("\n\n")]
    assert len(blocks) == len(names)
    for name, rows in zip(names, blocks, strict=True):
        assert all(r["section"] == name for r in rows)
    return dict(zip(names, blocks, strict=True))


def _from_rows(rows: list[dict[str, Any]]) -> Movements:
    return {(r["day"], r["currency"]): {k: Decimal(r[k]) for k in MONEY_KEYS} for r in rows}


async def _report(settings: Settings, capsys: pytest.CaptureFixture[str], fmt: str, **filters: Any) -> str:
    assert await report.print_report(settings, fmt=fmt, **filters) == 0
    return capsys.readouterr().out


async def test_movements_equal_the_ledger_sums_in_every_format(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """By UTC day and currency, each kind's total is the finance.ledger sum to the unit, in all formats."""
    await _seed(settings.database_url)
    expected = await _expected_movements(settings.database_url, SINCE, None)
    # Pinned by hand, so a wrong exponent in the views cannot hide behind the comparison.
    assert expected[("2026-03-02", "usd")]["refunds"] == Decimal("-12.35")
    assert expected[("2026-03-02", "jpy")]["refunds"] == Decimal("-110000")
    assert expected[("2026-03-02", "kwd")]["refunds"] == Decimal("-1.025")
    assert expected[("2026-03-03", "usd")]["net"] == Decimal("-14.99")

    table = await _report(settings, capsys, "table", since=SINCE, currency=None)
    assert _from_table(table) == expected
    assert "-110,000" in table and "-1.025" in table and "-25.005" in table

    document = json.loads(await _report(settings, capsys, "json", since=SINCE, currency=None))
    assert _from_rows(document["movements"]) == expected
    kwd = next(r for r in document["movements"] if (r["day"], r["currency"]) == ("2026-03-02", "kwd"))
    assert (kwd["refunds"], kwd["dispute_fees"]) == ("-1.025", "0.000")

    blocks = _csv_blocks(await _report(settings, capsys, "csv", since=SINCE, currency=None))
    assert _from_rows(blocks["movements"]) == expected
    jpy = next(r for r in blocks["movements"] if (r["day"], r["currency"]) == ("2026-03-04", "jpy"))
    assert jpy["dispute_reinstatements"] == "5000"


async def test_since_and_currency_filter_the_movements(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --since the February refund is in; --currency keeps that currency's rows only."""
    await _seed(settings.database_url)

    everything = json.loads(await _report(settings, capsys, "json", since=None, currency=None))
    assert _from_rows(everything["movements"]) == await _expected_movements(settings.database_url, None, None)
    assert ("2026-02-27", "usd") in _from_rows(everything["movements"])

    jpy_only = json.loads(await _report(settings, capsys, "json", since=SINCE, currency="jpy"))
    assert _from_rows(jpy_only["movements"]) == await _expected_movements(settings.database_url, SINCE, "jpy")
    assert {r["currency"] for r in jpy_only["movements"]} == {"jpy"}
    assert [d["stripe_dispute_id"] for d in jpy_only["open_disputes"]] == ["dp_jpy"]


async def test_open_disputes_soonest_first_and_open_exceptions_by_kind(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Open disputes in evidence-due order (none due last), in major units; resolved exceptions are out."""
    await _seed(settings.database_url)

    document = json.loads(await _report(settings, capsys, "json", since=None, currency=None))
    disputes = document["open_disputes"]
    assert [d["stripe_dispute_id"] for d in disputes] == ["dp_jpy", "dp_kwd", "dp_nodue"]
    assert [d["amount"] for d in disputes] == ["5000", "25.005", "100.00"]
    assert disputes[0]["order_number"] == "ORD-jpy" and disputes[1]["invoice_number"] == "INV-kwd"
    assert datetime.fromisoformat(disputes[0]["evidence_due_by"]) == _t("2026-03-10T23:59:59")
    assert disputes[2]["evidence_due_by"] is None
    assert [(e["kind"], e["open"]) for e in document["open_exceptions"]] == [
        ("over_refund", 1),
        ("unmatched_charge", 2),
    ]

    table = await _report(settings, capsys, "table", since=None, currency=None)
    disputes_block = table.split("\n\n")[4]
    assert disputes_block.index("dp_jpy") < disputes_block.index("dp_kwd") < disputes_block.index("dp_nodue")
    assert "2026-03-10 23:59 " in disputes_block and "25.005" in disputes_block
    blocks = _csv_blocks(await _report(settings, capsys, "csv", since=None, currency=None))
    assert [(e["kind"], e["open"]) for e in blocks["open_exceptions"]] == [
        ("over_refund", "1"),
        ("unmatched_charge", "2"),
    ]


async def test_empty_ledger_prints_empty_sections(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fresh database reports no movements, disputes or exceptions rather than failing."""
    table = await _report(settings, capsys, "table", since=None, currency=None)
    assert table.count("(none)") == 5
    document = json.loads(await _report(settings, capsys, "json", since=None, currency=None))
    names = ("summary", "movements", "payouts", "open_disputes", "open_exceptions")
    assert [document[name] for name in names] == [[], [], [], [], []]


async def test_the_report_needs_only_the_recon_finance_grants(settings: Settings) -> None:
    """Finance can run it with their own login: every query works as the SELECT-only role."""
    await _seed(settings.database_url)
    con = await asyncpg.connect(settings.database_url)
    try:
        await con.execute("set role recon_finance")
        sections = await report.load_sections(con, since=SINCE, currency=None)
    finally:
        await con.close()
    assert [len(s.rows) for s in sections] == [13, 11, 2, 3, 2]


async def test_payouts_show_their_reconciliation_since_and_by_currency(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Payouts that arrived since --since, newest first, with their reconciliation state and the
    difference in the payout's currency (JPY without decimals); --currency keeps one currency."""
    await _seed(settings.database_url)
    document = json.loads(await _report(settings, capsys, "json", since=SINCE, currency=None))
    assert [
        (p["stripe_payout_id"], p["amount_decimal"], p["reconciliation"], p["difference_decimal"])
        for p in document["payouts"]
    ] == [("po_usd", "96.80", "matched", "0.00"), ("po_jpy", "200000", "differences", "-1500")]
    usd_only = json.loads(await _report(settings, capsys, "json", since=None, currency="usd"))
    assert [p["stripe_payout_id"] for p in usd_only["payouts"]] == ["po_usd", "po_old"]
    table = await _report(settings, capsys, "table", since=SINCE, currency=None)
    assert "Payouts and their reconciliation" in table and "differences" in table


async def test_summary_gives_gross_charges_refund_rate_chargebacks_and_fees(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Per UTC day and currency: gross charges net of capture adjustments, refunds net of reversals,
    the refund rate of that day, lost disputes counted on the day they closed, and all fees."""
    await _seed(settings.database_url)
    document = json.loads(await _report(settings, capsys, "json", since=SINCE, currency=None))
    rows = {(r["day"], r["currency"]): r for r in document["summary"]}
    usd = rows[("2026-03-01", "usd")]
    assert (usd["gross_charges"], usd["refunds"], usd["refund_rate"], usd["fees"]) == (
        "100.00",
        "-25.00",
        "25.00",
        "-3.20",
    )
    kwd = rows[("2026-03-01", "kwd")]
    assert (kwd["gross_charges"], kwd["refund_rate"], kwd["net"]) == ("20.005", "0.00", "20.005")
    assert rows[("2026-03-02", "jpy")]["refund_rate"] is None  # refunds, but no charges that day
    lost = rows[("2026-03-04", "kwd")]
    assert (lost["chargebacks"], lost["chargeback_amount"], lost["gross_charges"]) == (1, "20.005", "0.000")
    assert rows[("2026-03-03", "usd")]["fees"] == "-15.00"
    table = await _report(settings, capsys, "table", since=SINCE, currency="usd")
    assert "25.00%" in table and "GROSS CHARGES" in table
