"""``recon demo`` against ``recon run`` started in-process: the printed ledger is the right one."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.harness import fetch, running
from worker.ops.demo import command as demo
from worker.settings import Settings

# Per scenario (the owner number's last digit): the ledger rows (kind, amount, currency) in
# occurred order, and the payment's final status and dispute status.
EXPECTED_LEDGER = {
    "1": [("charge", "120.00", "usd"), ("refund", "-20.00", "usd"), ("refund", "-30.00", "usd")],
    "2": [("charge", "110,000", "jpy"), ("refund", "-110,000", "jpy")],
    "3": [("charge", "80.00", "eur"), ("refund", "-25.00", "eur"), ("refund_reversal", "25.00", "eur")],
    "4": [
        ("charge", "45.00", "usd"),
        ("dispute_withdrawal", "-45.00", "usd"),
        ("dispute_fee", "-15.00", "usd"),
    ],
    "5": [
        ("charge", "200.00", "gbp"),
        ("dispute_withdrawal", "-200.00", "gbp"),
        ("dispute_fee", "-15.00", "usd"),
        ("dispute_reinstatement", "200.00", "gbp"),
        ("dispute_fee", "15.00", "usd"),
    ],
}
EXPECTED_BALANCES = {
    "1": ("partially_refunded", "no", ""),
    "2": ("refunded", "no", ""),
    "3": ("paid", "no", ""),
    "4": ("charged_back", "no", "lost"),
    "5": ("paid", "no", "won"),
}


def _section(output: str, title: str) -> list[list[str]]:
    """The data rows of one printed table, cells split on the two-space column gap."""
    block = output.split(title, 1)[1].split("\n\n", 1)[0]
    lines = block.strip("\n").splitlines()[3:]  # title rest, header, rule
    return [re.split(r"\s{2,}", line.strip()) for line in lines]


def _ledger_by_scenario(output: str) -> dict[str, list[tuple[str, str, str]]]:
    rows: dict[str, list[tuple[str, str, str]]] = {}
    for owner, _occurred, kind, amount, currency, _object in _section(output, "Ledger rows"):
        rows.setdefault(owner[-1], []).append((kind, amount, currency))
    return rows


def _owners(output: str) -> list[str]:
    return sorted({row[0] for row in _section(output, "Ledger rows")})


async def _ledger_in_database(database_url: str, owners: list[str]) -> list[tuple[Any, ...]]:
    rows = await fetch(
        database_url,
        "select coalesce(order_number, invoice_number) as owner, kind, amount, currency from finance.ledger"
        " where order_number = any($1::text[]) or invoice_number = any($1::text[]) order by 1, 2, 3",
        owners,
    )
    return [tuple(r) for r in rows]


async def test_demo_prints_the_ledger_its_webhooks_produce(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refunds (partial, full JPY, failed), a lost and a won dispute, a duplicate and an
    out-of-order delivery end in exactly these ledger rows and statuses; a second run is independent."""
    async with running("run", settings) as base_url:
        assert await demo.run_demo(settings, base_url=base_url) == 0
        first = capsys.readouterr().out
        assert await demo.run_demo(settings, base_url=base_url) == 0
        second = capsys.readouterr().out

    for output in (first, second):
        assert _ledger_by_scenario(output) == EXPECTED_LEDGER
        balances = {
            row[0][-1]: (row[6], row[7], row[8] if len(row) > 8 else "")
            for row in _section(output, "Payment balances")
        }
        assert balances == EXPECTED_BALANCES
    assert set(_owners(first)).isdisjoint(_owners(second))
    # After the worker drained (leaving `running`), the database holds what was printed: the
    # duplicate delivery added nothing, even if it was processed after the print.
    in_database = await _ledger_in_database(settings.database_url, _owners(first))
    assert len(in_database) == sum(len(rows) for rows in EXPECTED_LEDGER.values())
