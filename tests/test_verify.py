"""Rule 14: `recon verify` compares the ledger with the Stripe API — charges and refunds from
localstripe (behind tests/stripe_ledger_api.py, which adds the disputes localstripe lacks) — exits
1 on drift, and raises each difference as one drift exception, not again while it is open."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from tests import builders as b
from tests import host_records as host
from tests import stripe_ledger_api as api
from tests.conftest import free_port
from tests.harness import wait_until
from tests.test_refund_fetch import charge_with_refunds
from worker.drift.check import DriftCheck, DriftTimings
from worker.drift.stripe_reads import ReadTimings, StripeReads
from worker.ops.verify import verify
from worker.payouts import payouts_ctx
from worker.settings import Settings

T = b.T0
pytestmark = pytest.mark.filterwarnings("ignore:Bare functions are deprecated:DeprecationWarning")


# localstripe's aiohttp app is a module global bound to the first event loop that runs it, and
# tests/test_refund_fetch.py runs it in this process: here it runs in a process of its own, on
# 127.0.0.1, without its pickle dump to /tmp (shared with every other run on the machine).
_LOCALSTRIPE = (
    "import sys; import localstripe.resources as r; from localstripe.server import app; "
    "from aiohttp import web; r.store.dump_to_disk = lambda: None; "
    "web.run_app(app, host='127.0.0.1', port=int(sys.argv[1]), print=None, access_log=None)"
)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def localstripe_url() -> Iterator[str]:
    """localstripe in a subprocess of this module's own, on a free port."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-W", "ignore", "-c", _LOCALSTRIPE, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not _listening(port):
            assert process.poll() is None and time.monotonic() < deadline, "localstripe did not start"
            time.sleep(0.05)  # polling a port with a deadline, not waiting for work
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)


async def settle_inbox(con: asyncpg.Connection) -> None:
    """The events were applied an hour ago: nothing is in flight (test data, not a clock change)."""
    await con.execute(
        "update recon.event_inbox set received_at = now() - interval '1 hour',"
        " processed_at = now() - interval '1 hour'"
    )


async def drift_exceptions(con: asyncpg.Connection) -> list[dict[str, Any]]:
    return await host.exceptions(con, "drift")


async def run_verify(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any], str]:
    code = await verify(settings, since=None, until=None, as_json=True)
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


async def test_a_refund_the_webhooks_missed_is_drift_raised_once(
    settings: Settings,
    con: asyncpg.Connection,
    localstripe_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Stripe has refunds of 400 and 600 on a charge; the ledger heard of the 400 only. verify
    exits 1 naming the 600 refund and raises one drift exception on it; run again it exits 1 and
    raises nothing new while that exception is open. Progress is printed on stderr."""
    charge_id, (seen_refund, missed_refund) = await charge_with_refunds(localstripe_url, 5000, [400, 600])
    await host.add_order_with_payment(con, "ORD-DRIFT", charge_id, amount=5000, currency="eur")
    charge = b.charge(charge_id=charge_id, amount=5000, currency="eur")
    refund = b.refund(charge_id=charge_id, amount=400, refund_id=seen_refund, currency="eur")
    await host.apply(con, b.incoming(b.charge_event("charge.succeeded", charge, created=T)))
    await host.apply(con, b.incoming(b.refund_event("refund.created", refund, created=T + 1)))
    await settle_inbox(con)
    async with api.serving(api.StripeLedgerApi(upstream=localstripe_url)) as base:
        s = replace(settings, stripe_api_key=api.API_KEY, stripe_api_base=base)
        code, shown, err = await run_verify(s, capsys)
        again_code, again, _ = await run_verify(s, capsys)
    assert code == 1 and again_code == 1
    assert shown["differences"] == [
        {
            "charge": charge_id,
            "object": missed_refund,
            "field": "refund",
            "ours": None,
            "stripe": {"amount": 600, "status": "succeeded"},
            "exception": "raised",
        }
    ]
    assert [d["exception"] for d in again["differences"]] == ["already_open"]
    [raised] = await drift_exceptions(con)
    assert (raised["stripe_object_id"], raised["detail"]["field"], raised["detail"]["charge"]) == (
        missed_refund,
        "refund",
        charge_id,
    )
    assert "verify: 1/1 charges checked, 1 differences" in err


async def test_a_clean_ledger_exits_0_and_json_says_so(
    settings: Settings,
    con: asyncpg.Connection,
    localstripe_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A charge whose refunds the ledger booked, both of them: no drift, exit 0, no exception."""
    charge_id, refund_ids = await charge_with_refunds(localstripe_url, 3000, [1000, 500])
    await host.add_order_with_payment(con, "ORD-CLEAN", charge_id, amount=3000, currency="eur")
    await host.apply(
        con,
        b.incoming(
            b.charge_event(
                "charge.succeeded", b.charge(charge_id=charge_id, amount=3000, currency="eur"), created=T
            )
        ),
    )
    for refund_id, amount in zip(refund_ids, (1000, 500), strict=True):
        refund = b.refund(charge_id=charge_id, amount=amount, refund_id=refund_id, currency="eur")
        await host.apply(con, b.incoming(b.refund_event("refund.created", refund, created=T + 1)))
    await settle_inbox(con)
    async with api.serving(api.StripeLedgerApi(upstream=localstripe_url)) as base:
        s = replace(settings, stripe_api_key=api.API_KEY, stripe_api_base=base)
        code, shown, _ = await run_verify(s, capsys)
    assert (code, shown["differences"], shown["checked"]) == (0, [], 1)
    assert await drift_exceptions(con) == []


def stripe_charge(charge_id: str, amount: int, *, disputed: bool = False) -> dict[str, Any]:
    return dict(b.charge(charge_id=charge_id, amount=amount), disputed=disputed)


async def test_a_dispute_lost_at_stripe_and_a_charge_in_flight(
    settings: Settings, con: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ledger has a dispute under review; Stripe says lost: one drift on the dispute. A second
    charge whose refund event is still retrying is skipped, not reported. A 429 on the way is
    waited out."""
    withdrawal = b.balance_transaction(amount=-3000, fee=1500, txn_id="txn_dv_w", created=T + 5)
    dispute = b.dispute(
        charge_id="ch_dv", amount=3000, dispute_id="du_dv", balance_transactions=[withdrawal], created=T + 5
    )
    await host.add_order_with_payment(con, "ORD-DV", "ch_dv", amount=3000)
    await host.apply(
        con, b.incoming(b.charge_event("charge.succeeded", stripe_charge("ch_dv", 3000), created=T))
    )
    await host.apply(
        con,
        b.incoming(
            b.dispute_event("charge.dispute.created", dict(dispute, status="under_review"), created=T + 5)
        ),
    )
    await host.add_order_with_payment(con, "ORD-FLIGHT", "ch_flight", amount=800)
    await host.apply(
        con, b.incoming(b.charge_event("charge.succeeded", stripe_charge("ch_flight", 800), created=T))
    )
    await settle_inbox(con)
    payment_id = await con.fetchval("select id from recon.payments where stripe_charge_id = 'ch_flight'")
    await con.execute(
        "insert into recon.event_inbox (event_id, type, created, outcome, payment_id)"
        " values ('evt_still_retrying', 'refund.created', now(), 'retrying', $1)",
        payment_id,
    )
    served = api.StripeLedgerApi()
    served.charges["ch_dv"] = stripe_charge("ch_dv", 3000, disputed=True)
    served.charges["ch_flight"] = stripe_charge("ch_flight", 800)
    served.refunds["re_flight"] = b.refund(charge_id="ch_flight", amount=800, refund_id="re_flight")
    served.disputes["du_dv"] = dict(dispute, status="lost")
    served.rate_limit_next = 1
    async with api.serving(served) as base:
        s = replace(settings, stripe_api_key=api.API_KEY, stripe_api_base=base)
        code, shown, _ = await run_verify(s, capsys)
    assert code == 1
    assert [
        (d["object"], d["field"], d["ours"]["status"], d["stripe"]["status"]) for d in shown["differences"]
    ] == [("du_dv", "dispute_status", "under_review", "lost")]
    assert (shown["charges"], shown["checked"], shown["skipped_in_flight"]) == (2, 1, 1)
    assert served.requests_to("/v1/charges/ch_flight") == []
    assert [x.status for x in served.seen[:2]] == [429, 200]


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A small pool on this test's own database."""
    connections = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield connections
    await connections.close()


async def test_a_long_check_holds_the_request_rate(con: asyncpg.Connection, pool: asyncpg.Pool) -> None:
    """40 charges at 20 requests/s with 4 charges at a time: 80 requests take at least 3.95 s, no
    two seconds of it see more than 45 requests, and nothing drifts."""
    served = api.StripeLedgerApi()
    for i in range(40):
        charge_id = f"ch_rate{i:02d}"
        await host.add_order_with_payment(con, f"ORD-RATE{i}", charge_id, amount=100 + i)
        await host.apply(
            con, b.incoming(b.charge_event("charge.succeeded", stripe_charge(charge_id, 100 + i)))
        )
        served.charges[charge_id] = stripe_charge(charge_id, 100 + i)
    await settle_inbox(con)
    progress: list[str] = []
    async with api.serving(served) as base:
        reads = StripeReads(api.API_KEY, base, ReadTimings(requests_per_s=20))
        check = DriftCheck(
            pool, reads, DriftTimings(progress_every_s=1.0), on_progress=lambda p: progress.append(p.line())
        )
        started = time.monotonic()
        try:
            report = await check.run(datetime.now(UTC) - timedelta(days=2), datetime.now(UTC))
        finally:
            await reads.close()
        elapsed = time.monotonic() - started
    assert (report.progress.checked, report.found, reads.counts.requests) == (40, [], 80)
    assert elapsed >= 79 / 20
    moments = [s.at for s in served.seen]
    # Counted where the server sees them: a stall of the shared loop delivers a few at once (23 in
    # one second once, beside a full suite), so the window is 2 s. An unlimited client sends all 80
    # within a fraction of a second.
    assert max(sum(1 for m in moments if start <= m < start + 2.0) for start in moments) <= 45
    assert len(progress) >= 3 and progress[-1].startswith("verify: 40/40 charges checked")


async def test_the_worker_runs_the_check_every_interval(settings: Settings, con: asyncpg.Connection) -> None:
    """With RECON_VERIFY_INTERVAL_S set, the worker's payout context runs the drift check of the last
    2 days on its own: a captured amount Stripe disagrees with becomes a drift exception."""
    await host.add_order_with_payment(con, "ORD-TICK", "ch_tick", amount=900)
    await host.apply(con, b.incoming(b.charge_event("charge.succeeded", stripe_charge("ch_tick", 900))))
    await settle_inbox(con)
    served = api.StripeLedgerApi()
    served.charges["ch_tick"] = dict(stripe_charge("ch_tick", 900), amount_captured=700)
    async with api.serving(served) as base:
        s = replace(settings, stripe_api_key=api.API_KEY, stripe_api_base=base, verify_interval_s=1)
        app = web.Application()
        app.cleanup_ctx.append(payouts_ctx(s))
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            [raised] = await wait_until(lambda: drift_exceptions(con), timeout_s=15, what="a drift exception")
        finally:
            await runner.cleanup()
    assert (raised["stripe_object_id"], raised["detail"]["field"]) == ("ch_tick", "captured")
    assert (raised["detail"]["ours"], raised["detail"]["stripe"]) == (900, 700)
