"""Rule 4's API path: a `charge.refunded` without embedded refunds (API 2022-11-15 … 2024-10-27)
is judged against the refunds fetched from the Stripe API — every page — and books them with
their real re_ ids; without STRIPE_API_KEY it is retried and ends as a refund_mismatch.

The Stripe API here is localstripe, run in-process on 127.0.0.1. Its aiohttp application is a
module global bound to the first event loop that runs it, while each test here has its own loop;
so it runs once, in a thread with a loop of its own, and the tests talk to it over HTTP as the
worker does. The one shim: localstripe pickles its whole store to /tmp/localstripe.pickle on every
write; that is switched off (a shared file, and quadratic in the number of refunds created).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import aiohttp
import asyncpg
import pytest
import stripe

from tests import builders as b
from tests import host_records as host
from tests.harness import events_settled, fetch, post_event, running, wait_until
from tests.stripe_front import localstripe_thread
from worker.consume.refund_fetch import PAGE_SIZE
from worker.settings import Settings

API_KEY = "sk_test_localstripe_recon"
# localstripe registers plain (non-async) handlers, which aiohttp 3.14 still serves but warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Bare functions are deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def localstripe_url() -> Iterator[str]:
    """localstripe's API on a free port, served from a thread with its own event loop."""
    with localstripe_thread() as url:
        yield url


async def charge_with_refunds(api_base: str, amount: int, refunds: list[int]) -> tuple[str, list[str]]:
    """A captured EUR charge and its partial refunds, created through localstripe's API."""
    http = stripe.AIOHTTPClient()
    client = stripe.StripeClient(API_KEY, base_addresses={"api": api_base}, http_client=http)
    try:
        card = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}
        method = await client.v1.payment_methods.create_async(params={"type": "card", "card": card})
        charge = await client.v1.charges.create_async(
            params={"amount": amount, "currency": "eur", "source": method.id}
        )
        refund_ids = []
        for part in refunds:
            refund = await client.v1.refunds.create_async(params={"charge": charge.id, "amount": part})
            refund_ids.append(refund.id)
        return charge.id, refund_ids
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]


def checkpoint(charge_id: str, amount: int, amount_refunded: int) -> dict[str, object]:
    """A charge.refunded as an endpoint on API 2024-06-20 gets it: no `refunds` list."""
    charge = b.charge(
        charge_id=charge_id, amount=amount, currency="eur", amount_refunded=amount_refunded, created=b.T0
    )
    event = b.charge_event("charge.refunded", charge, created=b.T0 + 60, api_version=b.NEW_API_VERSION)
    assert "refunds" not in event["data"]["object"]
    return event


async def deliver(s: Settings, event: dict[str, object], timeout_s: float = 30) -> None:
    async with running("run", s) as base_url, aiohttp.ClientSession() as http:
        status, body = await post_event(http, base_url, event)
        assert status == 200, body
        await wait_until(
            lambda: events_settled(s.database_url, [str(event["id"])]),
            timeout_s=timeout_s,
            what="the charge.refunded to reach a final outcome",
        )


async def test_refunds_are_fetched_page_by_page_and_booked_with_their_ids(
    settings: Settings, localstripe_url: str
) -> None:
    """Rule 4: a charge.refunded carrying no refunds, with STRIPE_API_KEY set, makes the worker
    list the charge's refunds from the API — more than one page of them — and book each one under
    its real re_ id; the checkpoint then meets and the event is applied with no exception."""
    parts = [10 + n for n in range(PAGE_SIZE + 3)]  # one more page than the client asks for
    amount = 100_000
    charge_id, refund_ids = await charge_with_refunds(localstripe_url, amount, parts)
    con = await asyncpg.connect(settings.database_url)
    try:
        await host.add_order_with_payment(con, "ORD-F1", charge_id, amount=amount, currency="eur")
    finally:
        await con.close()
    s = replace(settings, stripe_api_key=API_KEY, stripe_api_base=localstripe_url)
    event = checkpoint(charge_id, amount, sum(parts))

    await deliver(s, event)

    rows = await fetch(
        s.database_url,
        "select stripe_object_id, amount, currency from finance.ledger where kind = 'refund'",
    )
    assert sorted((r["stripe_object_id"], r["amount"], r["currency"]) for r in rows) == sorted(
        (refund_id, -part, "eur") for refund_id, part in zip(refund_ids, parts, strict=True)
    )
    outcome = await fetch(s.database_url, "select outcome from finance.events")
    assert [r["outcome"] for r in outcome] == ["applied"]
    assert await fetch(s.database_url, "select kind from finance.exceptions") == []
    balance = await fetch(
        s.database_url,
        "select amount_refunded, status from finance.payment_balances where stripe_charge_id = $1",
        charge_id,
    )
    assert tuple(balance[0]) == (sum(parts), "partially_refunded")


async def test_without_an_api_key_a_short_checkpoint_is_retried_then_is_a_refund_mismatch(
    settings: Settings, localstripe_url: str
) -> None:
    """Rule 4 "or retries the event later; if they never meet, a refund_mismatch exception is
    raised": the same kind of checkpoint with no STRIPE_API_KEY cannot see the refunds; it is
    retried (outcome 'retrying', several attempts) until RECON_UNMATCHED_RETRY_S, then ends
    'mismatch' with a refund_mismatch exception, and no refund row is invented."""
    charge_id, _ = await charge_with_refunds(localstripe_url, 5000, [400, 600, 800])
    con = await asyncpg.connect(settings.database_url)
    try:
        await host.add_order_with_payment(con, "ORD-F2", charge_id, amount=5000, currency="eur")
    finally:
        await con.close()
    s = replace(settings, stripe_api_key=None, unmatched_retry_s=2)
    event = checkpoint(charge_id, 5000, 1800)
    seen: list[str] = []

    async def outcome_now() -> str | None:
        rows = await fetch(
            s.database_url, "select outcome from finance.events where stripe_event_id = $1", event["id"]
        )
        if rows:
            seen.append(rows[0]["outcome"])
        return rows[0]["outcome"] if rows and rows[0]["outcome"] != "retrying" else None

    async with running("run", s) as base_url, aiohttp.ClientSession() as http:
        status, _ = await post_event(http, base_url, event)
        assert status == 200
        assert await wait_until(outcome_now, timeout_s=30, what="a final outcome") == "mismatch"
    assert "retrying" in seen
    attempts = await fetch(s.database_url, "select attempts from finance.events")
    assert attempts[0]["attempts"] > 1
    exceptions = await fetch(s.database_url, "select kind, stripe_event_id from finance.exceptions")
    assert [tuple(r) for r in exceptions] == [("refund_mismatch", event["id"])]
    assert await fetch(s.database_url, "select 1 from finance.ledger where kind = 'refund'") == []
