"""``recon demo`` against ``recon run`` started in-process: the printed ledger is the right one."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.harness import fetch, running
from worker.ops.demo import command as demo
from worker.settings import Settings

# Per scenario (the owner number's last digit): the ledger rows (kind, amount, currency) in
# occurred order.
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
    "6": [("charge", "90.00", "usd"), ("charge", "60.00", "usd"), ("refund", "-60.00", "usd")],
    "7": [("charge", "100.00", "usd"), ("capture_adjustment", "-40.00", "usd")],
}
# Per scenario, its payments in the order they were made: (currency, amount captured, refunded,
# net, status, disputed, dispute status).
EXPECTED_PAYMENTS = {
    "1": [("usd", "120.00", "50.00", "70.00", "partially_refunded", "no", "")],
    "2": [("jpy", "110,000", "110,000", "0", "refunded", "no", "")],
    "3": [("eur", "80.00", "0.00", "80.00", "paid", "no", "")],
    "4": [("usd", "45.00", "0.00", "-15.00", "charged_back", "no", "lost")],
    "5": [("gbp", "200.00", "0.00", "200.00", "paid", "no", "won")],
    "6": [
        ("usd", "90.00", "0.00", "90.00", "paid", "no", ""),
        ("usd", "60.00", "60.00", "0.00", "refunded", "no", ""),
    ],
    "7": [("usd", "60.00", "0.00", "60.00", "paid", "no", "")],
}
# Per scenario, the order or invoice over all its payments: (currency, total, captured, refunded,
# refundable now, balance due, status, disputed).
EXPECTED_OWNERS = {
    "1": ("usd", "120.00", "120.00", "50.00", "70.00", "50.00", "partially_refunded", "no"),
    "2": ("jpy", "110,000", "110,000", "110,000", "0", "110,000", "refunded", "no"),
    "3": ("eur", "80.00", "80.00", "0.00", "80.00", "0.00", "paid", "no"),
    "4": ("usd", "45.00", "45.00", "0.00", "0.00", "0.00", "charged_back", "no"),
    "5": ("gbp", "200.00", "200.00", "0.00", "200.00", "0.00", "paid", "no"),
    "6": ("usd", "150.00", "150.00", "60.00", "90.00", "60.00", "partially_refunded", "no"),
    "7": ("usd", "60.00", "60.00", "0.00", "60.00", "0.00", "paid", "no"),
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


def _payments_by_scenario(output: str) -> dict[str, list[tuple[str, ...]]]:
    """Payment balance rows without the charge id; a missing last cell is an empty dispute status."""
    rows: dict[str, list[tuple[str, ...]]] = {}
    for owner, _charge, *cells in _section(output, "Payment balances"):
        rows.setdefault(owner[-1], []).append(tuple(cells + [""] * (7 - len(cells))))
    return rows


def _owners_by_scenario(output: str) -> dict[str, tuple[str, ...]]:
    return {owner[-1]: tuple(cells) for owner, *cells in _section(output, "Order and invoice balances")}


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
    """Refunds (partial, full JPY, failed), a chargeback and a won dispute, a split payment with one
    payment refunded, a partial capture, a duplicate and an out-of-order delivery end in exactly these
    ledger rows and payment, order and invoice balances; a second run is independent."""
    async with running("run", settings) as base_url:
        assert await demo.run_demo(settings, base_url=base_url) == 0
        first = capsys.readouterr().out
        assert await demo.run_demo(settings, base_url=base_url) == 0
        second = capsys.readouterr().out

    for output in (first, second):
        assert _ledger_by_scenario(output) == EXPECTED_LEDGER
        assert _payments_by_scenario(output) == EXPECTED_PAYMENTS
        assert _owners_by_scenario(output) == EXPECTED_OWNERS
    assert set(_owners(first)).isdisjoint(_owners(second))
    # After the worker drained (leaving `running`), the database holds what was printed: the
    # duplicate delivery added nothing, even if it was processed after the print.
    in_database = await _ledger_in_database(settings.database_url, _owners(first))
    assert len(in_database) == sum(len(rows) for rows in EXPECTED_LEDGER.values())
