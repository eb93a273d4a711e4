"""Payout reconciliation without webhooks: `recon payouts` for payouts no webhook announced, the
check of Σ net against the payout, refund failures, the Stripe reads under a rate limit and 429s
(tests/stripe_ledger_api.py serves the API); and what the reconciler does with payouts it cannot
match line by line — unknown, failed or manual ones, a listing that fails, lines whose source the
ledger knows in part or not at all — and its loop without the LISTEN connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import structlog

from handlers.payouts import PAYOUT_CHANNEL as HANDLERS_CHANNEL
from tests import builders as b
from tests import host_records as host
from tests import stripe_ledger_api as api
from tests.harness import wait_until
from worker.drift.stripe_reads import ReadTimings, StripeReadFailed, StripeReads
from worker.ops.payouts import payout_rows, reconcile_payouts
from worker.payouts.reconciler import PAYOUT_CHANNEL, PayoutReconciler, PayoutTimings, Reconciled
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


NO_RETRY = ReadTimings(max_tries=1)


async def _pending_payout(con: asyncpg.Connection, payout_id: str, amount: int = 0) -> None:
    """A paid payout as its webhook saved it: pending reconciliation, due now."""
    await con.execute(
        "insert into recon.payouts (id, amount, currency, status, status_created, status_rank)"
        " values ($1, $2, 'usd', 'paid', now(), 3)",
        payout_id,
        amount,
    )


async def test_payouts_stripe_will_not_reconcile_are_deferred_or_set_aside(
    con: asyncpg.Connection, pool: asyncpg.Pool, ledger_api: tuple[api.StripeLedgerApi, str]
) -> None:
    """A payout the API does not know (404) waits for a retry with the error as its note; one the
    API now says failed is not_paid and saved failed; a manual one is not_reconcilable, set aside
    for good with why. None of them lists balance transactions."""
    served, base = ledger_api
    for payout_id in ("po_unknown", "po_failed", "po_manual"):
        await _pending_payout(con, payout_id)
    served.add_payout(
        api.payout(payout_id="po_failed", amount=0, arrival_date=T, created=T, status="failed"), []
    )
    served.add_payout(
        api.payout(payout_id="po_manual", amount=0, arrival_date=T, created=T, automatic=False), []
    )
    reads = StripeReads(api.API_KEY, base, NO_RETRY)
    reconciler = PayoutReconciler(pool, reads, PayoutTimings(retry_delays_s=(3600.0,)))
    try:
        done = [await reconciler.reconcile(p) for p in ("po_unknown", "po_failed", "po_manual")]
    finally:
        await reads.close()
    unknown_note = "fetching the payout: InvalidRequestError (HTTP 404) resource_missing"
    assert done == [
        Reconciled("po_unknown", "waiting", note=unknown_note),
        Reconciled("po_failed", "not_paid", note="failed"),
        Reconciled("po_manual", "not_reconcilable", note="manual payout"),
    ]
    rows = await con.fetch(
        "select id, status, reconciliation, last_error, next_attempt_at = 'infinity' as set_aside,"
        " next_attempt_at > now() + interval '59 minutes' as deferred from recon.payouts order by id"
    )
    assert [dict(r) for r in rows] == [
        {
            "id": "po_failed",
            "status": "failed",
            "reconciliation": "pending",
            "last_error": None,
            "set_aside": False,
            "deferred": False,
        },
        {
            "id": "po_manual",
            "status": "paid",
            "reconciliation": "pending",
            "last_error": "a manual payout: Stripe lists no lines for it",
            "set_aside": True,
            "deferred": True,
        },
        {
            "id": "po_unknown",
            "status": "paid",
            "reconciliation": "pending",
            "last_error": unknown_note,
            "set_aside": False,
            "deferred": True,
        },
    ]
    assert served.requests_to("/v1/balance_transactions") == []


async def test_a_listing_that_fails_defers_the_payout_and_the_next_run_matches_it(
    con: asyncpg.Connection, pool: asyncpg.Pool, ledger_api: tuple[api.StripeLedgerApi, str]
) -> None:
    """Stripe answers the payout but its balance transactions with a 500: the payout waits, noting
    the listing failed, and nothing is recorded of its lines; the next run lists them and matches."""
    served, base = ledger_api
    await _paid_charge(con, "ch_list", 2000)
    payout = api.payout(payout_id="po_list", amount=1940, arrival_date=T + 86400, created=T + 100)
    served.add_payout(payout, [api.line(txn_type="charge", amount=2000, fee=60, source="ch_list", created=T)])
    served.fail_next["/v1/balance_transactions"] = 1
    reads = StripeReads(api.API_KEY, base, NO_RETRY)
    try:
        first = await PayoutReconciler(pool, reads).reconcile("po_list")
        assert await con.fetchval("select count(*) from recon.payout_lines") == 0
        second = await PayoutReconciler(pool, reads).reconcile("po_list")
    finally:
        await reads.close()
    assert first == Reconciled(
        "po_list", "waiting", note="listing its balance transactions: APIError (HTTP 500)"
    )
    assert second == Reconciled("po_list", "matched", lines=1)
    assert [s.status for s in served.requests_to("/v1/balance_transactions")] == [500, 200]


async def _converted_dispute_withdrawal(con: asyncpg.Connection) -> dict[str, Any]:
    """A EUR charge of ours disputed, its withdrawal (txn_du_eur, 20.00 EUR, no fee) booked by
    rule 6; returns the payout line Stripe lists for it in USD, converted, with a 15.00 fee the
    dispute's event did not carry."""
    await host.add_order_with_payment(con, "ORD-EUR", "ch_eur", amount=2000, currency="eur")
    charge = b.charge(charge_id="ch_eur", amount=2000, currency="eur")
    await host.apply(con, b.incoming(b.charge_event("charge.succeeded", charge)))
    withdrawal = b.balance_transaction(amount=-2000, currency="eur", txn_id="txn_du_eur", created=T + 7)
    dispute = b.dispute(
        charge_id="ch_eur",
        amount=2000,
        currency="eur",
        dispute_id="du_eur",
        balance_transactions=[withdrawal],
        created=T + 7,
    )
    await host.apply(con, b.incoming(b.dispute_event("charge.dispute.created", dispute, created=T + 7)))
    return _dispute_line("txn_du_eur", "du_eur", -2200, fee=1500, exchange_rate=1.1)


def _dispute_line(txn_id: str, source: str, amount: int, fee: int = 0, **more: Any) -> dict[str, Any]:
    return api.line(
        txn_type="adjustment",
        reporting_category="dispute",
        amount=amount,
        fee=fee,
        source=source,
        txn_id=txn_id,
        created=T + 10,
        **more,
    )


async def _reconcile_lines(
    pool: asyncpg.Pool, served: api.StripeLedgerApi, base: str, payout_id: str, lines: list[dict[str, Any]]
) -> tuple[Reconciled, dict[str, tuple[str, bool, int]]]:
    """A paid payout of exactly the lines' net, reconciled: the result and, per balance
    transaction, its match, whether it names a ledger row, and its difference."""
    net = sum(int(line["net"]) for line in lines)
    served.add_payout(
        api.payout(payout_id=payout_id, amount=net, arrival_date=T + 86400, created=T + 100), lines
    )
    reads = StripeReads(api.API_KEY, base, NO_RETRY)
    try:
        done = await PayoutReconciler(pool, reads).reconcile(payout_id)
    finally:
        await reads.close()
    async with pool.acquire() as con:
        rows = await con.fetch(
            "select balance_transaction_id, match, entry_id is not null as has_entry, difference"
            " from recon.payout_lines where payout_id = $1",
            payout_id,
        )
    return done, {r["balance_transaction_id"]: (r["match"], r["has_entry"], r["difference"]) for r in rows}


async def test_lines_the_ledger_knows_in_part_or_not_at_all(
    con: asyncpg.Connection, pool: asyncpg.Pool, ledger_api: tuple[api.StripeLedgerApi, str]
) -> None:
    """Each line is judged by its source: a charge of ours never booked and a refund or dispute we
    know of but never booked are missing_in_ledger, each short by what it moved (the charge before
    its fee, which we would book); a converted dispute withdrawal matches by its source, but a fee
    the ledger never booked for it makes it amount_differs; a refund or dispute of a charge that
    is not ours is not_ours. The payout's difference is the sum of its lines'."""
    served, base = ledger_api
    await host.add_order_with_payment(con, "ORD-UNBOOKED", "ch_unbooked", amount=800)
    await _paid_charge(con, "ch_mix", 3000)
    failed = b.refund(charge_id="ch_mix", amount=500, refund_id="re_known", status="failed", created=T + 5)
    await host.apply(con, b.incoming(b.refund_event("refund.failed", failed, created=T + 5)))
    quiet = b.dispute(charge_id="ch_mix", amount=3000, dispute_id="du_known", created=T + 6)
    await host.apply(con, b.incoming(b.dispute_event("charge.dispute.created", quiet, created=T + 6)))
    converted = await _converted_dispute_withdrawal(con)
    served.refunds["re_foreign"] = b.refund(charge_id="ch_foreign", amount=100, refund_id="re_foreign")
    served.disputes["du_foreign"] = b.dispute(charge_id="ch_foreign", amount=100, dispute_id="du_foreign")
    lines = [
        api.line(
            txn_type="charge", amount=800, fee=30, source="ch_unbooked", txn_id="txn_unbooked", created=T
        ),
        api.line(txn_type="refund", amount=-500, source="re_known", txn_id="txn_re_known", created=T + 5),
        api.line(txn_type="refund", amount=-100, source="re_foreign", txn_id="txn_re_foreign", created=T + 5),
        converted,
        _dispute_line("txn_du_known", "du_known", -3000),
        _dispute_line("txn_du_foreign", "du_foreign", -100),
    ]
    done, judged = await _reconcile_lines(pool, served, base, "po_mix", lines)
    assert {txn: (match, has_entry) for txn, (match, has_entry, _) in judged.items()} == {
        "txn_unbooked": ("missing_in_ledger", False),
        "txn_re_known": ("missing_in_ledger", False),
        "txn_re_foreign": ("not_ours", False),
        "txn_du_eur": ("amount_differs", True),
        "txn_du_known": ("missing_in_ledger", False),
        "txn_du_foreign": ("not_ours", False),
    }
    differences = {txn: difference for txn, (_, _, difference) in judged.items()}
    assert {txn: differences[txn] for txn in ("txn_unbooked", "txn_re_known", "txn_du_known")} == {
        "txn_unbooked": 800,
        "txn_re_known": -500,
        "txn_du_known": -3000,
    }
    assert differences["txn_re_foreign"] == differences["txn_du_foreign"] == 0
    assert done == Reconciled("po_mix", "differences", lines=6, difference_amount=sum(differences.values()))


async def test_a_converted_dispute_fee_the_ledger_never_booked_is_short_by_that_fee(
    con: asyncpg.Connection, pool: asyncpg.Pool, ledger_api: tuple[api.StripeLedgerApi, str]
) -> None:
    """The converted withdrawal whose 15.00 fee the ledger never booked: amount_differs by -1500 (the
    fee Stripe took that the ledger does not explain), and so does the payout."""
    served, base = ledger_api
    converted = await _converted_dispute_withdrawal(con)
    done, judged = await _reconcile_lines(pool, served, base, "po_fee", [converted])
    assert judged == {"txn_du_eur": ("amount_differs", True, -1500)}
    assert done == Reconciled("po_fee", "differences", lines=1, difference_amount=-1500)


async def test_without_its_listen_connection_the_loop_still_polls(
    con: asyncpg.Connection, pool: asyncpg.Pool, ledger_api: tuple[api.StripeLedgerApi, str]
) -> None:
    """When the LISTEN connection cannot be made, run_forever says so and carries on: a payout that
    falls due afterwards, with no notification, is reconciled on the next poll, and the connection
    is tried again after each poll."""
    served, base = ledger_api
    served.add_payout(api.payout(payout_id="po_poll", amount=0, arrival_date=T, created=T), [])
    reads = StripeReads(api.API_KEY, base)
    reconciler = PayoutReconciler(pool, reads, PayoutTimings(poll_s=0.05))
    unreachable = "postgresql://postgres@127.0.0.1:9/nowhere"

    with structlog.testing.capture_logs() as logs:

        def listen_tries() -> int:
            return sum(1 for entry in logs if entry["event"] == "payout_listener_unavailable")

        async def tried(times: int) -> bool:
            return listen_tries() >= times

        async def matched() -> bool:
            state = await con.fetchval("select reconciliation from recon.payouts where id = 'po_poll'")
            return bool(state == "matched")

        loop = asyncio.create_task(reconciler.run_forever(unreachable))
        try:
            await wait_until(lambda: tried(1), what="the first LISTEN attempt")
            await _pending_payout(con, "po_poll")
            await wait_until(matched, what="a poll to reconcile the payout that fell due")
            after_match = listen_tries()
            await wait_until(lambda: tried(after_match + 1), what="another LISTEN attempt after a poll")
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
            await reads.close()
    assert {entry["error"] for entry in logs if entry["event"] == "payout_listener_unavailable"} == {
        "ConnectionRefusedError"
    }
