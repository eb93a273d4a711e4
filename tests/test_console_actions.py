"""The ops console's actions that reach Stripe (CONTRACT 4c), over plain HTTP: Refund and Reject
order posted as a signed-in operator's browser posts them, against localstripe behind the test
Stripe front and the real database — what each one books, where it redirects, and what a form sent
twice or with other values does."""

from __future__ import annotations

import asyncpg
import pytest

from tests import host_records as host
from tests.backoffice_setup import (
    front_fixture,  # noqa: F401 - the fixture `front`
    localstripe_url_fixture,  # noqa: F401 - the fixture `localstripe_url`
    paid_order,
)
from tests.console_http import console
from tests.stripe_front import StripeFront
from worker.settings import Settings

pytestmark = pytest.mark.filterwarnings("ignore:Bare functions are deprecated:DeprecationWarning")
SENT_TWICE = "This form was already sent with other values."


async def test_reject_order_refunds_everything_once_and_shows_the_request(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """Reject order with a note redirects to the order showing the one request it made ($10.00
    over both charges, sent to Stripe as two refunds); the same form again answers with that same
    request, the same key with another note is 409, a fresh form finds nothing left (a redirect
    with no request), and an unknown order is a 404. The order ends rejected and audited once;
    another order's page does not show the request."""
    stripe, base = front
    await paid_order(con, base, "ORD-J2", [700, 300])
    await paid_order(con, base, "ORD-J3", [500])
    async with console(settings, base) as page:
        form = {"note": "out of stock", "key": "k-reject-1"}
        status, _, location = await page.post("/console/orders/ORD-J2/reject", form)
        request_id = await con.fetchval("select id from recon.refund_requests")
        assert (status, location) == (303, f"/console/orders/ORD-J2?request={request_id}#refunds")
        status, body, _ = await page.get(location.removesuffix("#refunds"))
        assert status == 200
        assert f"Refund request {request_id} for $10.00: submitted" in body
        status, body, _ = await page.get(f"/console/orders/ORD-J3?request={request_id}")
        assert status == 200 and 'id="request-made"' not in body
        assert await page.post("/console/orders/ORD-J2/reject", form) == (303, "", location)
        status, body, _ = await page.post("/console/orders/ORD-J2/reject", form | {"note": "fraud"})
        assert status == 409 and SENT_TWICE in body
        fresh = {"note": "out of stock", "key": "k-reject-2"}
        status, _, location = await page.post("/console/orders/ORD-J2/reject", fresh)
        assert (status, location) == (303, "/console/orders/ORD-J2?request=#refunds")
        status, body, _ = await page.post("/console/orders/ORD-NOPE/reject", {"note": "fraud"})
        assert status == 404 and "order ORD-NOPE" in body
    rows = await con.fetch(
        "select amount, reason, note, requested_by, rejects_order, state from recon.refund_requests"
    )
    assert [dict(r) for r in rows] == [
        {
            "amount": 1000,
            "reason": "other",
            "note": "out of stock",
            "requested_by": "ops",
            "rejects_order": True,
            "state": "submitted",
        }
    ]
    assert sorted(r["amount"] for r in stripe.created) == [300, 700]
    assert await con.fetchval("select status from recon.orders where number = 'ORD-J2'") == "rejected"
    assert await con.fetchval("select status from recon.orders where number = 'ORD-J3'") == "paid"
    assert (await host.audit_actions(con)).count("order_rejected") == 1


async def test_a_refund_with_no_amount_refunds_everything_and_a_form_reused_is_409(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """Refund with the Amount left empty asks for everything refundable now ($12.00) and redirects
    to the request; the same form's key sent again with an amount is 409 in words and sends
    nothing more to Stripe."""
    stripe, base = front
    await paid_order(con, base, "ORD-F1", [1200])
    async with console(settings, base) as page:
        form = {"amount": "", "reason": "duplicate", "key": "k-refund-1", "notify_buyer": "on"}
        status, _, location = await page.post("/console/orders/ORD-F1/refund", form)
        request_id = await con.fetchval("select id from recon.refund_requests")
        assert (status, location) == (303, f"/console/orders/ORD-F1?request={request_id}#refunds")
        status, body, _ = await page.post("/console/orders/ORD-F1/refund", form | {"amount": "5"})
        assert status == 409 and SENT_TWICE in body
    rows = await con.fetch("select amount, reason, notify_buyer, state from recon.refund_requests")
    assert [dict(r) for r in rows] == [
        {"amount": 1200, "reason": "duplicate", "notify_buyer": True, "state": "submitted"}
    ]
    assert [r["amount"] for r in stripe.created] == [1200]
