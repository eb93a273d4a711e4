"""What the back-office tests share: the Stripe API (localstripe behind its front), paid orders, and
the API served on a real port of the test's loop."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from tests import builders as b
from tests import host_records as host
from tests.conftest import free_port
from tests.stripe_events import unique_id
from tests.stripe_front import API_KEY, StripeFront, captured_charge, localstripe_thread, stripe_front
from worker.backoffice import store
from worker.backoffice.api import create_api_app
from worker.backoffice.submit import AnsweredHook, SubmitTimings
from worker.settings import Settings

SHOP_TOKEN = "tok_shop_4f9c2a7d1e8b6035"
OPS_TOKEN = "tok_ops_0b7e5d3c9a1f2468"
TOKENS = (("shop", SHOP_TOKEN), ("ops", OPS_TOKEN))
SHOP = {"Authorization": f"Bearer {SHOP_TOKEN}"}
DEFAULT_SUBMIT = SubmitTimings()
NOWHERE = "http://127.0.0.1:9"  # a Stripe API nothing answers: for tests that never reach Stripe


@pytest.fixture(scope="module", name="localstripe_url")
def localstripe_url_fixture() -> Iterator[str]:
    """localstripe, in a thread of its own for this module's tests: its base URL."""
    with localstripe_thread() as url:
        yield url


@pytest.fixture(name="front")
async def front_fixture(localstripe_url: str) -> AsyncIterator[tuple[StripeFront, str]]:
    """The test Stripe front (localstripe plus what it lacks) and its base URL."""
    async with stripe_front(localstripe_url) as served:
        yield served


# A host URL nothing listens on: connections of a process with one queue host webhooks (schema
# 0007). Tests that read the queued rows run no sender, so nothing is ever posted to it.
QUEUE_HOST_WEBHOOKS: dict[str, Any] = {
    "host_webhook_url": "http://127.0.0.1:9/hooks",
    "host_webhook_secret": "whsec_host_queue_only",
}


def with_stripe(settings: Settings, api_base: str, **changes: Any) -> Settings:
    return dataclasses.replace(
        settings, stripe_api_key=API_KEY, stripe_api_base=api_base, api_tokens=TOKENS, **changes
    )


async def paid_payment(
    con: asyncpg.Connection,
    api_base: str | None,
    *,
    order_id: int | None = None,
    invoice_id: int | None = None,
    amount: int,
    currency: str,
) -> str:
    """A charge captured at Stripe, recorded by the host for the order or invoice, and applied by
    the rules (charge.succeeded): the payment is paid and refundable. Returns the charge id.
    ``api_base`` None: a charge id of our own, for tests that never call Stripe."""
    charge_id = await captured_charge(api_base, amount, currency) if api_base else unique_id("ch")
    await host.add_payment(
        con, order_id=order_id, invoice_id=invoice_id, charge_id=charge_id, amount=amount, currency=currency
    )
    charge = b.charge(charge_id=charge_id, amount=amount, currency=currency)
    await host.apply(con, b.incoming(b.charge_event("charge.succeeded", charge)))
    return charge_id


async def paid_order(
    con: asyncpg.Connection, api_base: str | None, number: str, amounts: list[int], currency: str = "usd"
) -> list[str]:
    """An order paid by one charge per amount (oldest first); returns their charge ids."""
    order_id = await host.add_order(con, number, currency=currency, amount_total=sum(amounts))
    return [
        await paid_payment(con, api_base, order_id=order_id, amount=amount, currency=currency)
        for amount in amounts
    ]


async def booked_app_refund(
    con: asyncpg.Connection, number: str, amount: int, currency: str, message: str
) -> str:
    """A back-office refund of ``amount`` on a new order, booked by its webhook: the e-mail is queued."""
    (charge_id,) = await paid_order(con, None, number, [amount], currency=currency)
    ask = store.RefundAsk("order", number, amount, "requested_by_customer", None, True, message)
    request_id = await store.create_request(
        con, ask, requested_by="desk", idempotency_key=None, fingerprint=None
    )
    refund = b.refund(charge_id=charge_id, amount=amount, currency=currency)
    refund["metadata"] = {"recon_refund_request_id": str(request_id)}
    await host.apply(con, b.incoming(b.refund_event("refund.created", refund)))
    return str(refund["id"])


@asynccontextmanager
async def api_served(
    settings: Settings,
    *,
    submit_timings: SubmitTimings = DEFAULT_SUBMIT,
    after_stripe_answered: AnsweredHook | None = None,
) -> AsyncIterator[str]:
    """The back-office API app on a free port; yields its base URL."""
    app = create_api_app(settings, submit_timings=submit_timings, after_stripe_answered=after_stripe_answered)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def post(
    http: aiohttp.ClientSession,
    url: str,
    body: Any,
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    sent = dict(SHOP if headers is None else headers)
    if key is not None:
        sent["Idempotency-Key"] = key
    async with http.post(url, json=body, headers=sent) as response:
        return response.status, await response.json()


async def get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with http.get(url, headers=SHOP if headers is None else headers) as response:
        return response.status, await response.json()
