"""The back office inside ``recon run``: the API on its own port (never the webhook port), a refund
through it to localstripe, the webhook Stripe would send through the receiver, the buyer's e-mail
over SMTP and the host webhook — and a dead SMTP server and host that hold up nothing."""

from __future__ import annotations

import dataclasses
import time

import aiohttp
import asyncpg
import pytest

from tests import builders as b
from tests.backoffice_setup import (
    front_fixture,  # noqa: F401 - the fixture `front`
    get,
    localstripe_url_fixture,  # noqa: F401 - the fixture `localstripe_url`
    paid_order,
    post,
    with_stripe,
)
from tests.conftest import free_port
from tests.harness import events_settled, fetch, post_event, running, wait_until
from tests.host_sink import host_sink, verify_recon_signature
from tests.smtp_sink import smtp_sink
from tests.stripe_front import StripeFront
from worker.serve import build_app
from worker.settings import Settings, SettingsError

pytestmark = pytest.mark.filterwarnings("ignore:Bare functions are deprecated:DeprecationWarning")
HOST_SECRET = "whsec_host_e2e_51c08f7a2d6b"


def run_settings(settings: Settings, api_base: str, smtp_port: int, host_port: int) -> Settings:
    return with_stripe(
        settings,
        api_base,
        api_port=free_port(),
        smtp_url=f"smtp://127.0.0.1:{smtp_port}",
        mail_from="refunds@shop.example",
        host_webhook_url=f"http://127.0.0.1:{host_port}/recon-webhooks",
        host_webhook_secret=HOST_SECRET,
    )


async def test_a_refund_through_the_api_is_booked_by_its_webhook_mailed_and_reported_to_the_host(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """POST /v1/refunds on RECON_API_PORT creates the refund at Stripe (localstripe); the
    refund.created Stripe sends goes through the receiver and books it, linked (source app); the
    worker's loops e-mail the buyer over SMTP and tell the host the order is partially refunded.
    The webhook port does not serve the API."""
    api, base = front
    (charge_id,) = await paid_order(con, base, "ORD-E1", [5000], currency="jpy")
    smtp_port, host_port = free_port(), free_port()
    s = run_settings(settings, base, smtp_port, host_port)
    with smtp_sink(smtp_port) as mail:
        async with (
            host_sink(host_port) as hooks,
            running("run", s) as webhook_url,
            aiohttp.ClientSession() as http,
        ):
            api_url = f"http://{s.api_host}:{s.api_port}"
            body = {"order_number": "ORD-E1", "amount": 2000, "reason": "requested_by_customer"}
            status, request = await post(http, f"{api_url}/v1/refunds", body, key="e2e-1")
            assert (status, request["state"]) == (201, "submitted"), request
            async with http.post(f"{webhook_url}/v1/refunds", json=body) as on_webhook_port:
                assert on_webhook_port.status == 404
            [refund] = api.refunds_for(request["id"])
            event = b.refund_event("refund.created", {**refund, "reason": "requested_by_customer"})
            queued = time.monotonic()
            assert (await post_event(http, webhook_url, event))[0] == 200
            await wait_until(lambda: events_settled(s.database_url, [event["id"]]), what="the refund booked")
            await wait_until(
                lambda: _true(len(mail.messages) == 1), what="the buyer's e-mail", interval_s=0.01
            )
            print(f"webhook accepted to e-mail delivered: {time.monotonic() - queued:.2f}s")
            await wait_until(lambda: _true(_topics(hooks, "order.status_changed") >= 2), what="host webhooks")
            after = await get(http, f"{api_url}/v1/refunds/{request['id']}")
    assert after[1]["state"] == "succeeded"
    row = await fetch(s.database_url, "select source, requested_by, amount from finance.refunds")
    assert tuple(row[0]) == ("app", "shop", 2000)
    assert mail.messages[0]["Subject"] == "Your refund of ¥2,000 for order ORD-E1"
    statuses = [a[0]["data"]["status"] for a in hooks.attempts if a[0]["type"] == "order.status_changed"]
    assert statuses == ["paid", "partially_refunded"]
    assert all(verify_recon_signature(raw, sig, HOST_SECRET) for _, raw, sig, _ in hooks.attempts)
    assert charge_id


def _topics(hooks: object, topic: str) -> int:
    return sum(1 for a in hooks.attempts if a[0]["type"] == topic)  # type: ignore[attr-defined]


async def _true(value: bool) -> bool:
    return value


async def test_a_dead_smtp_server_and_host_hold_up_no_reconciliation(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """SMTP and the host unreachable: refund webhooks still apply as fast as with no outbox at all,
    the e-mail and host webhooks wait in the outbox (recon_outbox_pending on /metrics), and are
    delivered once both come back."""
    _api, base = front
    charges = await paid_order(con, base, "ORD-E2", [1000, 1000, 1000, 1000, 1000])
    smtp_port, host_port = free_port(), free_port()
    s = run_settings(settings, base, smtp_port, host_port)
    # The loops run without the API too; these refunds are made outside the app, e-mailed by choice.
    s = dataclasses.replace(s, api_tokens=(), notify_dashboard_refunds=True)
    async with running("run", s) as webhook_url, aiohttp.ClientSession() as http:
        started = time.monotonic()
        events = []
        for n, charge_id in enumerate(charges):
            refund = b.refund(charge_id=charge_id, amount=100 + n)
            events.append(b.refund_event("refund.created", refund))
        for event in events:
            assert (await post_event(http, webhook_url, event))[0] == 200
        await wait_until(lambda: events_settled(s.database_url, [e["id"] for e in events]), what="applied")
        applied_s = time.monotonic() - started
        await wait_until(lambda: _pending_on_metrics(http, webhook_url), what="the backlog on /metrics")
        with smtp_sink(smtp_port):
            async with host_sink(host_port):
                await wait_until(lambda: _outbox_empty(con), timeout_s=30, what="the outbox delivered")
    assert applied_s < 5.0, applied_s
    print(f"5 refund webhooks applied in {applied_s:.2f}s with SMTP and the host down")
    assert await con.fetchval("select count(*) from recon.outbox where state <> 'sent'") == 0


async def _pending_on_metrics(http: aiohttp.ClientSession, url: str) -> bool:
    async with http.get(f"{url}/metrics") as response:
        text = await response.text()
    return 'recon_outbox_pending{channel="host_webhook"}' in text and any(
        line.startswith('recon_outbox_pending{channel="email"}') and not line.endswith(" 0.0")
        for line in text.splitlines()
    )


async def _outbox_empty(con: asyncpg.Connection) -> bool:
    # Time passing for the rows waiting out their backoff (10 s after a first failure).
    await con.execute(
        "update recon.outbox set due_at = now() where state = 'pending' and due_at > now() + interval '1 s'"
    )
    return bool(await con.fetchval("select count(*) = 0 from recon.outbox where state = 'pending'"))


def test_the_api_is_refused_on_the_webhook_port(settings: Settings) -> None:
    """RECON_API_PORT equal to the webhook port is a setting error, not a shared listener."""
    s = with_stripe(settings, "http://127.0.0.1:1", api_port=settings.http_port)
    with pytest.raises(SettingsError, match="RECON_API_PORT"):
        build_app("run", s)
