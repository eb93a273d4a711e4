"""The ops console's actions that reach Stripe (CONTRACT 4c), over plain HTTP: Refund and Reject
order posted as a signed-in operator's browser posts them, against localstripe behind the test
Stripe front and the real database — what each one books, where it redirects, and what a form sent
twice or with other values does."""

from __future__ import annotations

import html
import re

import asyncpg
import pytest

from tests import host_records as host
from tests.backoffice_setup import (
    front_fixture,  # noqa: F401 - the fixture `front`
    localstripe_url_fixture,  # noqa: F401 - the fixture `localstripe_url`
    paid_order,
    paid_payment,
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


def _form_action(page: str, label: str) -> str:
    """The action of the page's form labelled ``label``, as a browser reads the attribute."""
    match = re.search(rf'<form method="post" action="([^"]*)"[^>]* aria-label="{re.escape(label)}">', page)
    assert match, (label, page)
    return html.unescape(match.group(1))


async def _paid_owner(con: asyncpg.Connection, base: str, kind: str, number: str, amount: int) -> None:
    """An order or invoice (``kind``) numbered ``number``, paid by one charge at Stripe."""
    if kind == "order":
        await paid_order(con, base, number, [amount])
    else:
        invoice_id = await host.add_invoice(con, number, amount_total=amount)
        await paid_payment(con, base, invoice_id=invoice_id, amount=amount, currency="usd")


async def _requested(con: asyncpg.Connection) -> list[tuple[str | None, str | None, int]]:
    """Every refund request stored, oldest first: its order's number, its invoice's, its amount."""
    rows = await con.fetch(
        """
        select o.number as order_number, i.number as invoice_number, r.amount
        from recon.refund_requests r
        left join recon.orders o on o.id = r.order_id
        left join recon.invoices i on i.id = r.invoice_id
        order by r.id
        """
    )
    return [(r["order_number"], r["invoice_number"], r["amount"]) for r in rows]


async def test_an_invoice_numbered_with_slashes_is_opened_and_refunded_from_its_own_page(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """An invoice numbered INV/2024/1 (a common format): the search redirects to its URL with the
    number as one encoded segment, the page opens, its Refund form posts to that same URL, and the
    refund request stored is the invoice's, shown on its page after the redirect. (Its slashes once
    went into the form's action as they are: a URL no route matched.)"""
    stripe, base = front
    await _paid_owner(con, base, "invoice", "INV/2024/1", 900)
    own = "/console/invoices/INV%2F2024%2F1"
    async with console(settings, base) as page:
        status, _, location = await page.get("/console/search?q=INV/2024/1")
        assert (status, location) == (303, own)
        status, body, _ = await page.get(own)
        assert status == 200 and "Invoice INV/2024/1" in body
        action = _form_action(body, "Refund")
        assert action == f"{own}/refund"
        form = {"amount": "4.00", "reason": "duplicate", "key": "k-slashes"}
        status, _, location = await page.post(action, form)
        request_id = await con.fetchval("select id from recon.refund_requests")
        assert (status, location) == (303, f"{own}?request={request_id}#refunds")
        status, body, _ = await page.get(location.removesuffix("#refunds"))
        assert status == 200 and f"Refund request {request_id} for $4.00: submitted" in body
    assert await _requested(con) == [(None, "INV/2024/1", 400)]
    assert [r["amount"] for r in stripe.created] == [400]


@pytest.mark.parametrize("kind", ["order", "invoice"])
async def test_an_owner_numbered_like_a_path_posts_to_its_own_url_never_another_owners(
    kind: str, settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """An order or invoice numbered ../orders/A1 next to an order A1: its Refund form (and an
    order's Reject order form) posts to its own URL, not to order A1's; the refund request stored
    is its own and order A1 has none. (With the number's slashes left as they are, the action
    resolved to /console/orders/A1/refund: the operator would have refunded order A1.)"""
    stripe, base = front
    await paid_order(con, base, "A1", [1000])
    await _paid_owner(con, base, kind, "../orders/A1", 800)
    own = f"/console/{kind}s/..%2Forders%2FA1"
    async with console(settings, base) as page:
        status, body, _ = await page.get(own)
        assert status == 200
        action = _form_action(body, "Refund")
        assert action == f"{own}/refund"
        if kind == "order":
            assert _form_action(body, "Reject order") == f"{own}/reject"
        form = {"amount": "3.00", "reason": "duplicate", "key": f"k-dots-{kind}"}
        status, _, location = await page.post(action, form)
        assert status == 303 and location.startswith(f"{own}?request="), location
    mine = ("../orders/A1", None, 300) if kind == "order" else (None, "../orders/A1", 300)
    assert await _requested(con) == [mine]
    assert [r["amount"] for r in stripe.created] == [300]


async def test_a_refund_is_for_the_kind_of_its_url_whatever_the_number_says(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """An order and an invoice both numbered A3/invoices/A3: the refund posted to the order's URL
    is the order's and the one posted to the invoice's URL the invoice's. (The kind was once read
    from the decoded path, where "/invoices/" made the order's refund the invoice's.)"""
    stripe, base = front
    await _paid_owner(con, base, "order", "A3/invoices/A3", 1000)
    await _paid_owner(con, base, "invoice", "A3/invoices/A3", 900)
    async with console(settings, base) as page:
        for kind, amount in (("order", "2.00"), ("invoice", "1.00")):
            own = f"/console/{kind}s/A3%2Finvoices%2FA3"
            form = {"amount": amount, "reason": "duplicate", "key": f"k-kind-{kind}"}
            status, _, location = await page.post(f"{own}/refund", form)
            assert status == 303 and location.startswith(f"{own}?request="), (kind, location)
    assert await _requested(con) == [("A3/invoices/A3", None, 200), (None, "A3/invoices/A3", 100)]
    assert sorted(r["amount"] for r in stripe.created) == [100, 200]
