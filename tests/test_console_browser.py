"""The ops console (CONTRACT 4c) in a real browser: Debian's chromium driven by Playwright against
the back-office API app (console included), the real database and localstripe."""

from __future__ import annotations

import re
import time

import asyncpg
import pytest
from playwright.async_api import Page, expect

from tests.backoffice_setup import (
    OPS_TOKEN,
    TOKENS,
    api_served,
    front_fixture,  # noqa: F401 - the fixture `front`
    localstripe_url_fixture,  # noqa: F401 - the fixture `localstripe_url`
    paid_order,
    with_stripe,
)
from tests.console_browser import (
    DOCS,
    browser_page,
    open_dispute,
    partially_refunded_order,
    raise_exception,
)
from tests.stripe_front import StripeFront
from worker.backoffice.console import session
from worker.settings import Settings

pytestmark = pytest.mark.filterwarnings("ignore:Bare functions are deprecated:DeprecationWarning")
HTML_NOTE = '<b>bold</b><script>alert("x")</script>'


async def sign_in(page: Page, url: str, token: str = OPS_TOKEN) -> None:
    await page.goto(f"{url}/console/")
    await page.get_by_label("Token").fill(token)
    await page.get_by_role("button", name="Sign in").click()


async def test_sign_in_read_a_partially_refunded_order_and_refund_over_then_within_the_cap(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """Signing in with a token lands on the overview; the order shows its badge, the refund as a
    negative ledger row and Refundable now; a refund over the cap is refused on the page in words
    with the refundable amount and nothing reaches Stripe; one within it is sent through rule 11
    and shown as a request by the signed-in operator, its HTML note as text. Screenshots of the
    overview and the order go to docs/."""
    stripe, base = front
    await partially_refunded_order(con, base, "ORD-C1")
    (disputed,) = await paid_order(con, base, "ORD-C2", [1500])
    dispute_id = await open_dispute(con, disputed, 1500)
    async with api_served(with_stripe(settings, base)) as url, browser_page() as page:
        await sign_in(page, url)
        await expect(page.get_by_role("heading", name="Overview")).to_be_visible()
        await expect(page.get_by_label("Search")).to_be_visible()
        await page.screenshot(path=str(DOCS / "console-overview.png"), full_page=True)

        await page.get_by_label("Search").fill("ORD-C1")
        await page.get_by_label("Search").press("Enter")
        await expect(page).to_have_url(re.compile(r"/console/orders/ORD-C1$"))
        await expect(page.locator("h1 .badge")).to_have_text("Partially refunded")
        await expect(page.locator("#refundable-now")).to_have_text("$40.00")
        await expect(page.locator("tr.neg").first).to_contain_text("-$10.00")

        refund_form = page.get_by_role("form", name="Refund")
        await refund_form.get_by_label("Amount").fill("45.00")
        await refund_form.get_by_label("Reason").select_option("requested_by_customer")
        await refund_form.get_by_role("button", name="Refund").click()
        await expect(page.get_by_role("alert")).to_contain_text("at most $40.00 is refundable now")
        assert stripe.create_calls == 0

        refund_form = page.get_by_role("form", name="Refund")
        await refund_form.get_by_label("Amount").fill("25.00")
        await refund_form.get_by_label("Reason").select_option("other")
        await refund_form.get_by_label("Note").fill(HTML_NOTE)
        await refund_form.get_by_label("Message").fill("Sorry for the trouble")
        await refund_form.get_by_role("button", name="Refund").click()
        await expect(page.locator("#request-made")).to_contain_text("$25.00: submitted")
        request_row = page.locator("tr.request").last
        await expect(request_row).to_contain_text("ops")
        await expect(request_row.locator("td.note")).to_have_text(HTML_NOTE)
        assert await request_row.locator("td.note b").count() == 0
        await page.screenshot(path=str(DOCS / "console-order.png"), full_page=True)

        await page.goto(f"{url}/console/orders/ORD-C2")
        banner = page.get_by_role("alert", name="Dispute")
        await expect(banner).to_contain_text("$15.00")
        link = banner.get_by_role("link", name="Submit evidence in Stripe →")
        await expect(link).to_have_attribute(
            "href", f"https://dashboard.stripe.com/test/disputes/{dispute_id}"
        )
    row = await con.fetchrow("select requested_by, amount, note, state from recon.refund_requests")
    assert dict(row) == {"requested_by": "ops", "amount": 2500, "note": HTML_NOTE, "state": "submitted"}


async def test_resolve_an_exception_with_a_note_that_shows_as_text(
    settings: Settings, con: asyncpg.Connection
) -> None:
    """Resolve with a Note closes the exception as the signed-in operator (what recon exceptions
    resolve does); the resolved list on request shows the note, HTML and all, as text."""
    exception_id = await raise_exception(con, "over_refund", "<i>refund larger than charge</i>")
    async with api_served(with_stripe(settings, "http://127.0.0.1:9")) as url, browser_page(390, 844) as page:
        await sign_in(page, url)
        await page.get_by_role("link", name="Exceptions").click()
        form = page.get_by_role("form", name=f"Resolve exception {exception_id}")
        await expect(page.locator(f"#exception-{exception_id} td.detail")).to_contain_text("<i>refund")
        await form.get_by_label("Note").fill(HTML_NOTE)
        await form.get_by_role("button", name="Resolve").click()
        await expect(page.get_by_role("status")).to_have_text(f"Exception {exception_id} resolved.")
        await page.get_by_role("link", name="show resolved too").click()
        note = page.locator(f"#exception-{exception_id} .note")
        await expect(note).to_have_text(HTML_NOTE)
        assert await note.locator("b").count() == 0
    row = await con.fetchrow(
        "select resolved_by, resolution_note from recon.exceptions where id = $1", exception_id
    )
    assert dict(row) == {"resolved_by": "ops", "resolution_note": HTML_NOTE}


async def test_a_form_posted_without_its_csrf_token_is_refused_and_does_nothing(
    settings: Settings, con: asyncpg.Connection
) -> None:
    """With a valid session cookie, a Resolve POST without the form's CSRF token, or with another
    one, is answered 403 and the exception stays open; the same form with it works."""
    exception_id = await raise_exception(con, "over_refund", "checked")
    async with api_served(with_stripe(settings, "http://127.0.0.1:9")) as url, browser_page() as page:
        await sign_in(page, url)
        action = f"{url}/console/exceptions/{exception_id}/resolve"
        missing = await page.request.post(action, form={"note": "no token"}, max_redirects=0)
        forged = await page.request.post(action, form={"note": "forged", "csrf": "0" * 64}, max_redirects=0)
        assert (missing.status, forged.status) == (403, 403)
        assert "no valid CSRF token" in await missing.text()
        assert (
            await con.fetchval("select resolved_at from recon.exceptions where id = $1", exception_id) is None
        )
        await page.goto(f"{url}/console/exceptions")
        await page.get_by_label("Note").fill("with the token")
        await page.get_by_role("button", name="Resolve").click()
        await expect(page.get_by_role("status")).to_contain_text("resolved")
    assert await con.fetchval("select resolution_note from recon.exceptions") == "with the token"


async def test_a_wrong_token_and_an_expired_session_lead_back_to_the_login(settings: Settings) -> None:
    """No session: every console page redirects to the login. A wrong token stays there with an
    error. The session cookie is HttpOnly, SameSite=Strict and expires after
    RECON_CONSOLE_SESSION_S; a cookie past its time leads back to the login."""
    s = with_stripe(settings, "http://127.0.0.1:9", console_session_s=600)
    async with api_served(s) as url, browser_page() as page:
        await page.goto(f"{url}/console/payouts")
        await expect(page).to_have_url(re.compile(r"/console/login\?next=/console/payouts$"))
        await page.get_by_label("Token").fill("tok_wrong")
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_role("alert")).to_have_text("That token is not valid.")
        await expect(page.get_by_label("Token")).to_be_visible()

        await page.get_by_label("Token").fill(OPS_TOKEN)
        await page.get_by_role("button", name="Sign in").click()
        await expect(page).to_have_url(re.compile(r"/console/payouts$"))
        [cookie] = [c for c in await page.context.cookies() if c["name"] == session.SESSION_COOKIE]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert time.time() + 590 < cookie["expires"] <= time.time() + 601

        expired = session.issue(TOKENS, "ops", int(time.time()) - 1)
        await page.context.add_cookies([{**cookie, "value": expired}])  # the same cookie, past its time
        await page.goto(f"{url}/console/exceptions")
        await expect(page).to_have_url(re.compile(r"/console/login"))
        await expect(page.get_by_role("button", name="Sign in")).to_be_visible()
