"""Fetching a charge's refunds from the Stripe API (official client, async) before the transaction."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from tests.conftest import free_port
from tests.consumer_harness import (
    FakeRules,
    applied_count_is,
    consumer_running,
    event,
    feeder,
    prepare_fake_tables,
)
from tests.harness import fetch, wait_until
from worker.consume.refund_fetch import FetchTimings, RefundFetchFailed, StripeRefunds
from worker.settings import Settings

API_KEY = "sk_test_recon_fake_key"


@dataclasses.dataclass
class FakeStripe:
    """GET /v1/refunds?charge=… in pages of ``page_size``; the first ``failures`` requests get 500."""

    refunds: dict[str, list[dict[str, Any]]]
    page_size: int = 2
    failures: int = 0
    delay_s: float = 0.0
    requests: list[dict[str, str]] = dataclasses.field(default_factory=list)

    async def list_refunds(self, request: web.Request) -> web.Response:
        self.requests.append(dict(request.query))
        assert request.headers["Authorization"] == f"Bearer {API_KEY}"
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # a slow API, not a wait for work
        if self.failures > 0:
            self.failures -= 1
            return web.json_response({"error": {"type": "api_error", "message": "boom"}}, status=500)
        every = self.refunds.get(request.query["charge"], [])
        after = request.query.get("starting_after")
        start = next((i + 1 for i, r in enumerate(every) if r["id"] == after), 0)
        page = every[start : start + self.page_size]
        more = start + len(page) < len(every)
        return web.json_response({"object": "list", "url": "/v1/refunds", "data": page, "has_more": more})


@pytest.fixture
async def fake_stripe() -> AsyncIterator[tuple[FakeStripe, str]]:
    """A fake GET /v1/refunds on a local port: five refunds of ch_paged, two a page."""
    refunds = [
        {"id": f"re_{i}", "object": "refund", "amount": 100 + i, "charge": "ch_paged", "status": "succeeded"}
        for i in range(5)
    ]
    api = FakeStripe({"ch_paged": refunds})
    app = web.Application()
    app.router.add_get("/v1/refunds", api.list_refunds)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield api, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_every_page_of_refunds_is_fetched(fake_stripe: tuple[FakeStripe, str]) -> None:
    """All pages come back as plain dicts, in Stripe's order, through the official client."""
    api, base = fake_stripe
    fetcher = StripeRefunds(API_KEY, base)
    try:
        refunds = await fetcher("ch_paged")
    finally:
        await fetcher.close()
    assert [r["id"] for r in refunds] == [f"re_{i}" for i in range(5)]
    assert refunds[0]["amount"] == 100 and isinstance(refunds[0], dict)
    assert [q.get("starting_after") for q in api.requests] == [None, "re_1", "re_3"]


async def test_transient_api_errors_are_retried_a_bounded_number_of_times(
    fake_stripe: tuple[FakeStripe, str],
) -> None:
    """Two 500s are retried through; a third failure in a row gives up with RefundFetchFailed."""
    api, base = fake_stripe
    fetcher = StripeRefunds(API_KEY, base)
    try:
        api.failures = 2
        assert len(await fetcher("ch_paged")) == 5
        api.failures = FetchTimings().max_tries
        api.requests.clear()
        with pytest.raises(RefundFetchFailed) as failed:
            await fetcher("ch_paged")
    finally:
        await fetcher.close()
    assert len(api.requests) == FetchTimings().max_tries
    assert API_KEY not in str(failed.value)


async def test_a_slow_api_times_out_quickly(
    fake_stripe: tuple[FakeStripe, str],
) -> None:
    """A hanging API is cut off by the per-try timeout, a bounded number of times, never waited out
    with Stripe's 80 s default: the API would answer a good page after 5 s, so a fetch that fails
    proves each try was cut short, and the request count that the tries stopped."""
    api, base = fake_stripe
    api.delay_s = 5.0
    timings = FetchTimings(try_timeout_s=0.2, give_up_after_s=0.5)
    fetcher = StripeRefunds(API_KEY, base, timings)
    try:
        with pytest.raises(RefundFetchFailed):
            await fetcher("ch_paged")
    finally:
        await fetcher.close()
    assert 1 <= len(api.requests) <= timings.max_tries


async def test_worker_hands_fetched_refunds_to_the_rules_and_defers_on_failure(
    settings: Settings, amqp_url: str, fake_stripe: tuple[FakeStripe, str]
) -> None:
    """With STRIPE_API_KEY set, the refunds the rules ask for are fetched before the transaction;
    when the API fails, the event is deferred (no failure counted) and applied on a later attempt."""
    api, base = fake_stripe
    api.failures = FetchTimings().max_tries  # the first attempt's fetch fails outright
    await prepare_fake_tables(settings.database_url)
    fake = FakeRules(fetch_for=_charge_of_refunded)
    configured = dataclasses.replace(settings, stripe_api_key=API_KEY, stripe_api_base=base)
    async with feeder(amqp_url, configured) as feed, consumer_running(configured, fake.rules()):
        await feed.event(event("evt_needs_refunds", charge_id="ch_paged"))
        await feed.event(event("evt_no_fetch", charge_id="ch_other", event_type="charge.captured"))
        await wait_until(lambda: _both(configured), what="both applied")
    sql = "select event_id, attempt, fetched from public.applied order by 1"
    rows = await fetch(configured.database_url, sql)
    assert [tuple(r) for r in rows] == [("evt_needs_refunds", 2, 5), ("evt_no_fetch", 1, None)]
    assert fake.calls.count(("evt_needs_refunds", 1)) == 0  # deferred before any transaction


def _charge_of_refunded(ev: dict[str, Any]) -> str | None:
    return str(ev["data"]["object"]["id"]) if ev["type"] == "charge.refunded" else None


async def _both(settings: Settings) -> bool:
    return await applied_count_is(settings.database_url, 2)


async def test_without_api_key_rules_get_no_refunds_and_a_warning_is_logged(
    settings: Settings, amqp_url: str
) -> None:
    """No STRIPE_API_KEY: the worker starts, warns once, and hands fetched_refunds=None to the rules."""
    import structlog

    await prepare_fake_tables(settings.database_url)
    fake = FakeRules(fetch_for=lambda ev: "ch_paged")
    with structlog.testing.capture_logs() as logs:
        async with feeder(amqp_url, settings) as feed, consumer_running(settings, fake.rules()):
            await feed.event(event("evt_keyless", charge_id="ch_paged"))
            await wait_until(lambda: _applied_once(settings), what="applied without refunds")
    rows = await fetch(settings.database_url, "select attempt, fetched from public.applied")
    assert [tuple(r) for r in rows] == [(1, None)]
    assert [entry["event"] for entry in logs].count("stripe_api_key_missing") == 1


async def _applied_once(settings: Settings) -> bool:
    return await applied_count_is(settings.database_url, 1)


async def test_a_fetch_that_still_fails_after_the_waiting_window_lets_the_rules_judge_without_it(
    settings: Settings, amqp_url: str, fake_stripe: tuple[FakeStripe, str]
) -> None:
    """Rule 4 with a dead API: a checkpoint first seen longer ago than RECON_UNMATCHED_RETRY_S
    whose refund fetch fails (every try a 500) is not deferred again; the real rules judge it
    without the API, on this attempt: outcome 'mismatch', one refund_mismatch exception, no refund
    row invented — a dead API parks nothing forever. The fetch was tried (max_tries requests) and
    the failure logged without the key."""
    import time

    import structlog

    from tests import builders as b
    from tests import host_records as host
    from worker.amqp import topology
    from worker.consume.consumer import ConsumerTimings

    api, base = fake_stripe
    api.failures = 1_000
    con = await asyncpg.connect(settings.database_url)
    try:
        await host.add_order_with_payment(con, "ORD-DEAD-API", "ch_dead_api", amount=5000)
    finally:
        await con.close()
    charge = b.charge(charge_id="ch_dead_api", amount=5000, amount_refunded=1800)
    checkpoint = b.charge_event("charge.refunded", charge, created=b.T0 + 60)
    configured = dataclasses.replace(settings, stripe_api_key=API_KEY, stripe_api_base=base)
    timings = ConsumerTimings(fetch=FetchTimings(try_timeout_s=1.0, max_tries=2, give_up_after_s=2.0))
    long_ago_ms = int((time.time() - configured.unmatched_retry_s - 60) * 1000)
    with structlog.testing.capture_logs() as logs:
        async with feeder(amqp_url, configured) as feed, consumer_running(configured, timings=timings):
            await feed.event(checkpoint, headers={topology.HEADER_FIRST_SEEN_MS: long_ago_ms})
            await wait_until(lambda: _final(configured, checkpoint["id"]), what="a final outcome")
    events = await fetch(configured.database_url, "select outcome, attempts from finance.events")
    assert [tuple(r) for r in events] == [("mismatch", 1)]
    raised = await fetch(configured.database_url, "select kind, stripe_event_id from finance.exceptions")
    assert [tuple(r) for r in raised] == [("refund_mismatch", checkpoint["id"])]
    assert await fetch(configured.database_url, "select 1 from finance.ledger where kind = 'refund'") == []
    assert [q["charge"] for q in api.requests] == ["ch_dead_api"] * 2
    failed = [line for line in logs if line["event"] == "refund_fetch_failed"]
    assert len(failed) == 1 and API_KEY not in str(failed[0])


async def _final(settings: Settings, event_id: str) -> bool:
    rows = await fetch(
        settings.database_url,
        "select 1 from finance.events where stripe_event_id = $1 and outcome <> 'retrying'",
        event_id,
    )
    return bool(rows)
