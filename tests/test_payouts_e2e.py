"""Rule 13 end to end: signed payout webhooks to the real receiver (``recon run`` in this loop with
the payout reconciler beside it), the Stripe API served locally (tests/stripe_ledger_api.py), the
ledger and finance.payouts / finance.payout_lines read back.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests import builders as b
from tests import host_records as host
from tests import stripe_ledger_api as api
from tests.harness import fetch, wait_until
from tests.stripe_events import make_event
from tests.test_rules_e2e import Stripe, db, exceptions, release_queues
from worker.drift.stripe_reads import ReadTimings
from worker.payouts.reconciler import PayoutTimings
from worker.payouts.service import ServiceTimings
from worker.serve import build_app
from worker.settings import Settings

T = b.T0
FAST = ServiceTimings(
    payouts=PayoutTimings(poll_s=0.2, lease_s=30, retry_delays_s=(0.3,)),
    reads=ReadTimings(requests_per_s=50, retry_wait_min_s=0.05, retry_wait_max_s=0.2),
)


@pytest.fixture(autouse=True)
async def _free_the_broker(settings: Settings) -> AsyncIterator[None]:
    """After the test, delete its vhost's queues (quorum queues keep Raft groups running)."""
    yield
    await release_queues(settings)


@contextlib.asynccontextmanager
async def recon_with_payouts(settings: Settings) -> AsyncIterator[Stripe]:
    """``recon run`` as worker/serve.py builds it, with the payout reconciler's waits shortened."""
    app, port = build_app("run", settings, payout_timings=FAST)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.http_host, port).start()
    try:
        async with aiohttp.ClientSession() as http:
            yield Stripe(http, f"http://{settings.http_host}:{port}", settings)
    finally:
        await runner.cleanup()


def payout_event(event_type: str, payout: dict[str, Any], created: int) -> dict[str, Any]:
    return make_event(event_type, dict(payout), created=created)


async def payout_row(settings: Settings, payout_id: str) -> dict[str, Any]:
    rows = await fetch(
        settings.database_url, "select * from finance.payouts where stripe_payout_id = $1", payout_id
    )
    return dict(rows[0]) if rows else {}


async def reconciled(settings: Settings, payout_id: str) -> bool:
    row = await payout_row(settings, payout_id)
    return bool(row) and row["reconciliation"] != "pending"


async def lines_by_source(settings: Settings, payout_id: str) -> dict[str | None, dict[str, Any]]:
    rows = await fetch(
        settings.database_url, "select * from finance.payout_lines where stripe_payout_id = $1", payout_id
    )
    return {r["source_id"]: dict(r) for r in rows}


async def fees(settings: Settings) -> dict[str, tuple[int, str]]:
    rows = await fetch(
        settings.database_url,
        "select stripe_charge_id, amount, currency from finance.ledger where kind = 'processing_fee'",
    )
    return {r["stripe_charge_id"]: (r["amount"], r["currency"]) for r in rows}


def busy_payout(payout_id: str, others: int) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """A payout of our charges, refunds and a dispute, and ``others`` charges of another integration.

    ch_pa (USD 1000, fee 59) refunded re_pa 300; ch_pb (USD 2000, fee 88) refunded re_pb 500, a
    refund no webhook told us of; ch_pc (EUR 1500) settled as USD 1650 at 1.1, fee 78; ch_pd
    (USD 3000) disputed: withdrawal txn_pd_w of 3000 and fee 1500; Stripe's own fee line.
    """
    t = T + 3 * 86400
    ours = [
        api.line(txn_type="charge", amount=1000, fee=59, source="ch_pa", created=t),
        api.line(txn_type="refund", amount=-300, source="re_pa", created=t + 1),
        api.line(txn_type="charge", amount=2000, fee=88, source="ch_pb", created=t + 2),
        api.line(txn_type="refund", amount=-500, source="re_pb", created=t + 3),
        api.line(txn_type="charge", amount=1650, fee=78, source="ch_pc", exchange_rate=1.1, created=t + 4),
        api.line(
            txn_type="adjustment",
            amount=-3000,
            fee=1500,
            source="du_pd",
            reporting_category="dispute",
            txn_id="txn_pd_w",
            created=t + 5,
        ),
        api.line(txn_type="stripe_fee", amount=-25, source=None, reporting_category="fee", created=t + 6),
    ]
    theirs = [
        api.line(txn_type="charge", amount=100 + i, fee=3, source=f"ch_other{i:03d}", created=t + 10 + i)
        for i in range(others)
    ]
    lines = ours + theirs
    amount = sum(x["net"] for x in lines)
    payout = api.payout(
        payout_id=payout_id,
        amount=amount,
        arrival_date=t + 2 * 86400,
        created=t + 86400,
        reconciliation_status="in_progress",
    )
    # Stripe lists newest first; the payout's own transaction is among them.
    listed = sorted([*lines, api.payout_own_line(payout)], key=lambda x: x["created"], reverse=True)
    refund_pb = b.refund(charge_id="ch_pb", amount=500, refund_id="re_pb", created=t + 3)
    return payout, listed, refund_pb


async def seed_ledger(stripe: Stripe, settings: Settings) -> None:
    """Our four payments and what the webhooks told us: charges, re_pa, the dispute of ch_pd."""
    async with db(settings) as con:
        for charge_id, amount, currency in (
            ("ch_pa", 1000, "usd"),
            ("ch_pb", 2000, "usd"),
            ("ch_pc", 1500, "eur"),
            ("ch_pd", 3000, "usd"),
        ):
            await host.add_order_with_payment(
                con, f"ORD-{charge_id}", charge_id, amount=amount, currency=currency
            )
    withdrawal = b.balance_transaction(amount=-3000, fee=1500, txn_id="txn_pd_w", created=T + 5)
    dispute = b.dispute(
        charge_id="ch_pd", amount=3000, dispute_id="du_pd", balance_transactions=[withdrawal], created=T + 5
    )
    await stripe.deliver(
        *(
            b.charge_event("charge.succeeded", b.charge(charge_id=c, amount=a, currency=cur), created=T)
            for c, a, cur in (
                ("ch_pa", 1000, "usd"),
                ("ch_pb", 2000, "usd"),
                ("ch_pc", 1500, "eur"),
                ("ch_pd", 3000, "usd"),
            )
        ),
        b.refund_event(
            "refund.created", b.refund(charge_id="ch_pa", amount=300, refund_id="re_pa"), created=T + 1
        ),
        b.dispute_event("charge.dispute.created", dispute, created=T + 5),
    )


async def test_a_payout_is_reconciled_line_by_line_once_stripe_has_completed_it(settings: Settings) -> None:
    """payout.paid while Stripe's reconciliation is in progress: the payout waits (retried, no lines
    listed). Once completed and payout.reconciliation_completed arrives, every page of its 150+
    lines is read: our charges, refund and dispute match, the EUR charge settled in USD matches by
    source and keeps its rate, the refund no webhook told us of is missing_in_ledger, the other
    integration's charges and Stripe's fee are not_ours; fees are booked once as processing_fee;
    one payout_difference exception; Σ net equals the payout. Replays and `recon payouts` change
    nothing."""
    ledger_api = api.StripeLedgerApi()
    payout, listed, refund_pb = busy_payout("po_busy", others=150)
    ledger_api.add_payout(payout, listed)
    ledger_api.refunds["re_pb"] = refund_pb  # expanded as the line's source: its charge is ch_pb
    async with api.serving(ledger_api) as base:
        s = replace(settings, stripe_api_key=api.API_KEY, stripe_api_base=base)
        async with recon_with_payouts(s) as stripe:
            await seed_ledger(stripe, s)
            paid = payout_event("payout.paid", dict(payout, reconciliation_status="in_progress"), T + 86400)
            await stripe.deliver(paid)
            await wait_until(
                lambda: _attempts_at_least(s, "po_busy", 2), what="the pending payout to be retried"
            )
            assert (await payout_row(s, "po_busy"))["reconciliation"] == "pending"
            assert ledger_api.requests_to("/v1/balance_transactions") == []
            payout["reconciliation_status"] = "completed"
            completed = payout_event("payout.reconciliation_completed", payout, T + 86400 + 60)
            await stripe.deliver(completed)
            await wait_until(lambda: reconciled(s, "po_busy"), what="the payout to be reconciled")
            first = await _snapshot(s)
            await stripe.post(completed, paid)  # Stripe retries both
            await stripe.settled(completed, paid)
    row = await payout_row(s, "po_busy")
    assert (row["status"], row["reconciliation"], row["lines"], row["difference_lines"]) == (
        "paid",
        "differences",
        157,
        1,
    )
    assert row["matched_lines"] == 5 and row["difference_amount"] == -500
    pages = [q.query.get("starting_after") for q in ledger_api.requests_to("/v1/balance_transactions")]
    assert len(pages) == 2 and pages[0] is None  # 158 transactions listed: two pages of 100
    lines = await lines_by_source(s, "po_busy")
    assert {k: lines[k]["match"] for k in ("ch_pa", "re_pa", "ch_pb", "re_pb", "ch_pc", "du_pd", None)} == {
        "ch_pa": "matched",
        "re_pa": "matched",
        "ch_pb": "matched",
        "re_pb": "missing_in_ledger",
        "ch_pc": "matched",
        "du_pd": "matched",
        None: "not_ours",
    }
    assert lines["ch_other007"]["match"] == "not_ours" and "po_busy" not in lines
    assert (lines["ch_pc"]["currency"], lines["ch_pc"]["amount"], lines["ch_pc"]["exchange_rate"]) == (
        "usd",
        1650,
        Decimal("1.1"),
    )
    assert await fees(s) == {"ch_pa": (-59, "usd"), "ch_pb": (-88, "usd"), "ch_pc": (-78, "usd")}
    assert [e for e in await exceptions(s) if e[0] == "payout_difference"] == [
        ("payout_difference", None, "po_busy")
    ]
    assert await _snapshot(s) == first


async def _attempts_at_least(settings: Settings, payout_id: str, n: int) -> bool:
    rows = await fetch(settings.database_url, "select attempts from recon.payouts where id = $1", payout_id)
    return bool(rows) and rows[0]["attempts"] >= n


async def _snapshot(settings: Settings) -> tuple[Any, ...]:
    ledger = await fetch(
        settings.database_url, "select entry_id, kind, amount from finance.ledger order by 1"
    )
    lines = await fetch(settings.database_url, "select * from finance.payout_lines order by 2")
    payouts = await fetch(settings.database_url, "select * from finance.payouts")
    raised = await fetch(settings.database_url, "select id, kind, detail from finance.exceptions order by id")
    return (
        [tuple(r) for r in ledger],
        [tuple(r) for r in lines],
        [tuple(r) for r in payouts],
        [(r["id"], r["kind"], json.loads(r["detail"])) for r in raised],
    )


async def test_payout_failed_marks_the_payout_failed_and_nothing_is_reconciled(settings: Settings) -> None:
    """payout.failed after payout.paid: the payout is failed, and a failed payout is not reconciled
    (nothing was paid out); an older payout.paid delivered after it does not make it paid again."""
    ledger_api = api.StripeLedgerApi()
    failed = api.payout(payout_id="po_failed", amount=500, arrival_date=T + 86400, created=T, status="failed")
    ledger_api.add_payout(failed, [])
    async with api.serving(ledger_api) as base:
        s = replace(settings, stripe_api_key=api.API_KEY, stripe_api_base=base)
        async with recon_with_payouts(s) as stripe:
            await stripe.deliver(payout_event("payout.failed", failed, T + 200))
            late_paid = payout_event("payout.paid", dict(failed, status="paid"), T + 100)
            await stripe.deliver(late_paid)
            assert await _outcome(s, late_paid["id"]) == "stale"
    row = await payout_row(s, "po_failed")
    assert (row["status"], row["reconciliation"], row["lines"]) == ("failed", "pending", 0)
    assert ledger_api.requests_to("/v1/balance_transactions") == []


async def _outcome(settings: Settings, event_id: str) -> str:
    rows = await fetch(
        settings.database_url, "select outcome from finance.events where stripe_event_id = $1", event_id
    )
    return str(rows[0]["outcome"])
