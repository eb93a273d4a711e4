"""Payout reconciliation without webhooks: `recon payouts` for payouts no webhook announced, the
check of Σ net against the payout, refund failures, and the Stripe reads under a rate limit and
429s (tests/stripe_ledger_api.py serves the API)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime

import asyncpg
import pytest

from handlers.payouts import PAYOUT_CHANNEL as HANDLERS_CHANNEL
from tests import builders as b
from tests import host_records as host
from tests import stripe_ledger_api as api
from tests.harness import wait_until
from worker.drift.stripe_reads import ReadTimings, StripeReadFailed, StripeReads
from worker.ops.payouts import payout_rows, reconcile_payouts
from worker.payouts.reconciler import PAYOUT_CHANNEL, PayoutReconciler, PayoutTimings
from worker.settings import Settings

T = b.T0
NOW = int(time.time())


@pytest.fixture
async def ledger_api() -> AsyncIterator[tuple[api.StripeLedgerApi, str]]:
    """The local Stripe API for payouts and balance transactions, served; it and its base URL."""
    served = api.StripeLedgerApi()
    async with api.serving(served) as base:
        yield served, base


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A small pool on this test's own database."""
    connections = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    yield connections
    await connections.close()


def test_the_handlers_wake_the_reconciler_on_its_channel() -> None:
    """The handler notifies on the channel the reconciler listens on."""
    assert HANDLERS_CHANNEL == PAYOUT_CHANNEL


async def _paid_charge(con: asyncpg.Connection, charge_id: str, amount: int) -> None:
    await host.add_order_with_payment(con, f"ORD-{charge_id}", charge_id, amount=amount)
    charge = b.charge(charge_id=charge_id, amount=amount)
    await host.apply(con, b.incoming(b.charge_event("charge.succeeded", charge, created=T)))


async def test_recon_payouts_json_is_an_empty_list_when_there_are_no_payouts(
    settings: Settings, ledger_api: tuple[api.StripeLedgerApi, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """No payouts at Stripe nor in the database: `recon payouts --json` prints [] and exits 0."""
    _, base = ledger_api
    s = replace(settings, stripe_api_key=api.API_KEY, stripe_api_base=base)
    assert await reconcile_payouts(s, since=None, as_json=True) == 0
    assert json.loads(capsys.readouterr().out) == []


async def test_recon_payouts_reconciles_a_payout_no_webhook_announced(
    settings: Settings,
    con: asyncpg.Connection,
    ledger_api: tuple[api.StripeLedgerApi, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A paid payout only the API lists: `recon payouts` saves it, reconciles it (matched: its one
    charge is ours) and prints its state as JSON; a second run changes nothing and lists it again."""
    served, base = ledger_api
    await _paid_charge(con, "ch_cli", 5000)
    lines = [api.line(txn_type="charge", amount=5000, fee=175, source="ch_cli", created=NOW - 3 * 86400)]
    payout = api.payout(payout_id="po_cli", amount=4825, arrival_date=NOW - 86400, created=NOW - 2 * 86400)
    served.add_payout(payout, [*lines, api.payout_own_line(payout)])
    s = replace(settings, stripe_api_key=api.API_KEY, stripe_api_base=base)
    assert await reconcile_payouts(s, since=None, as_json=True) == 0
    [shown] = json.loads(capsys.readouterr().out)
    assert {
        k: shown[k] for k in ("stripe_payout_id", "amount", "amount_decimal", "status", "reconciliation")
    } == {
        "stripe_payout_id": "po_cli",
        "amount": 4825,
        "amount_decimal": "48.25",
        "status": "paid",
        "reconciliation": "matched",
    }
    assert shown["arrival_date"] == datetime.fromtimestamp(NOW - 86400, UTC).date().isoformat()
    listed = len(served.requests_to("/v1/balance_transactions"))
    assert await reconcile_payouts(s, since=None, as_json=True) == 0
    assert json.loads(capsys.readouterr().out) == [shown]
    assert len(served.requests_to("/v1/balance_transactions")) == listed  # matched: not listed again
    fee_rows = await con.fetch("select amount from finance.ledger where kind = 'processing_fee'")
    assert [r["amount"] for r in fee_rows] == [-175]
    assert [r["stripe_payout_id"] for r in await payout_rows(con, since=None, currency="usd")] == ["po_cli"]
    assert await payout_rows(con, since=None, currency="eur") == []


async def test_lines_that_do_not_add_up_to_the_payout_are_a_difference(
    con: asyncpg.Connection, pool: asyncpg.Pool, ledger_api: tuple[api.StripeLedgerApi, str]
) -> None:
    """Every line matches, but their net is 1 short of the payout (a line Stripe did not list, a
    paging bug): the payout has differences, the gap is its difference_amount, one exception."""
    served, base = ledger_api
    await _paid_charge(con, "ch_gap", 1000)
    lines = [api.line(txn_type="charge", amount=1000, fee=30, source="ch_gap", created=T + 10)]
    payout = api.payout(payout_id="po_gap", amount=971, arrival_date=T + 86400, created=T + 100)
    served.add_payout(payout, lines)
    reads = StripeReads(api.API_KEY, base)
    try:
        done = await PayoutReconciler(pool, reads).reconcile("po_gap")
    finally:
        await reads.close()
    assert (done.state, done.difference_amount) == ("differences", 1)
    row = await con.fetchrow("select * from finance.payouts where stripe_payout_id = 'po_gap'")
    assert (row["matched_lines"], row["difference_lines"], row["difference_amount"]) == (1, 0, 1)
    detail = json.loads(
        await con.fetchval("select detail from finance.exceptions where kind = 'payout_difference'")
    )
    assert (detail["payout_amount"], detail["lines_net"]) == (971, 970)


async def test_a_refund_failure_matches_its_reversal_and_an_unbooked_one_differs(
    con: asyncpg.Connection, pool: asyncpg.Pool, ledger_api: tuple[api.StripeLedgerApi, str]
) -> None:
    """A refund that failed comes back in a payout as a refund_failure line: matched to the
    refund_reversal the webhook booked. Its amount differing from the ledger's is amount_differs."""
    served, base = ledger_api
    await _paid_charge(con, "ch_rf", 2000)
    refund = b.refund(charge_id="ch_rf", amount=700, refund_id="re_rf", created=T + 5)
    await host.apply(con, b.incoming(b.refund_event("refund.created", refund, created=T + 5)))
    failed = dict(refund, status="failed", failure_reason="expired_or_canceled_card")
    await host.apply(con, b.incoming(b.refund_event("refund.failed", failed, created=T + 50)))
    lines = [
        api.line(txn_type="refund", amount=-700, source="re_rf", created=T + 5),
        api.line(txn_type="refund_failure", amount=700, source="re_rf", created=T + 50),
        api.line(txn_type="refund_failure", amount=650, source="re_rf", txn_id="txn_rf_odd", created=T + 60),
    ]
    payout = api.payout(payout_id="po_rf", amount=650, arrival_date=T + 86400, created=T + 100)
    served.add_payout(payout, lines)
    reads = StripeReads(api.API_KEY, base)
    try:
        await PayoutReconciler(pool, reads).reconcile("po_rf")
    finally:
        await reads.close()
    matches = {
        r["balance_transaction_id"]: (r["match"], r["entry_id"] is not None)
        for r in await con.fetch("select * from finance.payout_lines where stripe_payout_id = 'po_rf'")
    }
    assert matches[lines[0]["id"]] == ("matched", True)
    assert matches[lines[1]["id"]] == ("matched", True)
    assert matches["txn_rf_odd"] == ("amount_differs", True)


async def test_reads_keep_to_the_rate_and_wait_out_429s(ledger_api: tuple[api.StripeLedgerApi, str]) -> None:
    """At 20 requests/s, 30 payout reads take at least 1.45 s and no second sees more than 21; three
    429s in a row are waited out and retried, and a fourth try past max_tries gives up."""
    served, base = ledger_api
    served.add_payout(api.payout(payout_id="po_rate", amount=1, arrival_date=T, created=T), [])
    reads = StripeReads(
        api.API_KEY,
        base,
        ReadTimings(requests_per_s=20, max_tries=4, retry_wait_min_s=0.05, retry_wait_max_s=0.1),
    )
    try:
        started = time.monotonic()
        for _ in range(30):
            await reads.payout("po_rate")
        elapsed = time.monotonic() - started
        served.rate_limit_next = 3
        assert (await reads.payout("po_rate"))["id"] == "po_rate"
        assert reads.counts.rate_limited == 3
        served.rate_limit_next = 4
        with pytest.raises(StripeReadFailed, match="RateLimitError .HTTP 429"):
            await reads.payout("po_rate")
    finally:
        await reads.close()
    assert elapsed >= 29 / 20
    moments = [s.at for s in served.seen[:30]]
    assert max(sum(1 for m in moments if start <= m < start + 1.0) for start in moments) <= 21
    assert [s.status for s in served.seen[30:34]] == [429, 429, 429, 200]


async def test_a_payout_still_in_progress_at_stripe_waits_and_is_retried_later(
    con: asyncpg.Connection, pool: asyncpg.Pool, ledger_api: tuple[api.StripeLedgerApi, str]
) -> None:
    """A due payout whose reconciliation_status is in_progress: its lines are not listed, it stays
    pending and falls due again after the retry delay; once completed, the next due run matches it."""
    served, base = ledger_api
    payout = api.payout(
        payout_id="po_wait", amount=0, arrival_date=T + 86400, created=T, reconciliation_status="in_progress"
    )
    served.add_payout(payout, [])
    await con.execute(
        "insert into recon.payouts (id, amount, currency, status, status_created, status_rank)"
        " values ('po_wait', 0, 'usd', 'paid', now(), 3)"
    )
    reads = StripeReads(api.API_KEY, base)
    reconciler = PayoutReconciler(pool, reads, PayoutTimings(retry_delays_s=(0.5,)))
    try:
        [first] = await reconciler.run_due()
        assert first.state == "waiting" and await reconciler.run_due() == []  # not due yet
        payout["reconciliation_status"] = "completed"
        [second] = await wait_until(reconciler.run_due, timeout_s=5, what="the payout to fall due again")
    finally:
        await reads.close()
    assert second.state == "matched"
    assert len(served.requests_to("/v1/balance_transactions")) == 1
    assert await con.fetchval("select attempts from recon.payouts where id = 'po_wait'") == 2
