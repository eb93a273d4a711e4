"""The ops console (CONTRACT 4c) over plain HTTP: aiohttp's client against the back-office API app
(console included) and the real database, signed in the way a browser signs in — every page, the
search, the actions and the refusals a form can meet, without a browser."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import asyncpg
import pytest

from tests import host_records as host
from tests.backoffice_setup import OPS_TOKEN, TOKENS, api_served, paid_order, with_stripe
from tests.console_browser import raise_exception
from worker.backoffice.console import session
from worker.settings import Settings

NOWHERE = "http://127.0.0.1:9"  # a Stripe API nothing answers: these tests never reach Stripe
_CSRF = re.compile(r'name="csrf" value="([^"]*)"')


@dataclass
class Console:
    http: aiohttp.ClientSession
    url: str
    csrf: str

    async def get(self, path: str) -> tuple[int, str, str]:
        """Status, body and Location (redirects not followed)."""
        async with self.http.get(self.url + path, allow_redirects=False) as response:
            return response.status, await response.text(), response.headers.get("Location", "")

    async def post(self, path: str, fields: dict[str, str]) -> tuple[int, str, str]:
        """A form POST carrying the session's CSRF token unless ``fields`` names its own."""
        body = {"csrf": self.csrf, **fields}
        async with self.http.post(self.url + path, data=body, allow_redirects=False) as response:
            return response.status, await response.text(), response.headers.get("Location", "")


async def _sign_in(http: aiohttp.ClientSession, url: str, token: str = OPS_TOKEN) -> tuple[int, str]:
    async with http.get(f"{url}/console/login?next=/console/payouts") as response:
        page = await response.text()
    match = _CSRF.search(page)
    assert match, page
    form = {"csrf": match.group(1), "next": "/console/payouts", "token": token}
    async with http.post(f"{url}/console/login", data=form, allow_redirects=False) as response:
        return response.status, response.headers.get("Location", "")


@asynccontextmanager
async def console(settings: Settings, api_base: str = NOWHERE) -> AsyncIterator[Console]:
    """The API served, and a client signed in as ``ops`` that keeps its cookies."""
    async with (
        api_served(with_stripe(settings, api_base)) as url,
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
    ):
        status, location = await _sign_in(http, url)
        assert (status, location) == (303, "/console/payouts")
        cookie = next(c.value for c in http.cookie_jar if c.key == session.SESSION_COOKIE)
        active = session.read(TOKENS, cookie, time.time())
        assert active is not None and active.operator == "ops"
        yield Console(http, url, active.csrf)


async def test_pages_need_a_session_and_posts_need_the_csrf_token(settings: Settings) -> None:
    """Without a cookie a page redirects to the login with where it was going; a wrong token is
    refused with 401 in words; a POST without the CSRF field is refused 403 and does nothing; the
    stylesheet is served without a session; every answer carries the security headers."""
    async with (
        api_served(with_stripe(settings, NOWHERE)) as url,
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
    ):
        async with http.get(f"{url}/console/exceptions?resolved=1", allow_redirects=False) as response:
            assert response.status == 303
            assert response.headers["Location"] == "/console/login?next=/console/exceptions%3Fresolved%3D1"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        async with http.get(f"{url}/console/static/console.css") as response:
            assert response.status == 200 and response.content_type == "text/css"
        async with http.post(f"{url}/console/login", data={"token": OPS_TOKEN}) as response:
            assert response.status == 403
            assert "The sign-in form expired" in await response.text()
        assert (await _sign_in(http, url, token="tok_wrong"))[0] == 401
        status, location = await _sign_in(http, url)
        assert (status, location) == (303, "/console/payouts")
        async with http.post(f"{url}/console/exceptions/1/resolve", data={"note": "x"}) as response:
            assert response.status == 403
        async with http.post(f"{url}/console/logout", allow_redirects=False) as response:
            # Logging out is a POST too: without the CSRF field it is refused like any other.
            assert response.status == 403


async def test_overview_and_search_by_number_charge_email_and_no_hit(
    settings: Settings, con: asyncpg.Connection
) -> None:
    """The overview renders; a search for an order number or its charge id redirects to the order;
    an e-mail that names several orders lists them; a search that finds nothing says so; an
    unknown order or invoice is a 404 naming what was asked for; an unknown path is a 404."""
    (charge,) = await paid_order(con, None, "ORD-P1", [1200])
    await paid_order(con, None, "ORD-P2", [800])
    invoice_id = await host.add_invoice(con, "INV-P1", amount_total=900)
    await con.execute("update recon.orders set buyer_email = 'solo@example.com' where number = 'ORD-P1'")
    async with console(settings) as page:
        status, body, _ = await page.get("/console/")
        assert status == 200 and "Overview" in body
        assert await page.get("/console/search?q=ORD-P1") == (303, "", "/console/orders/ORD-P1")
        assert (await page.get(f"/console/search?q={charge}"))[2] == "/console/orders/ORD-P1"
        assert (await page.get("/console/search?q=SOLO@example.com"))[2] == "/console/orders/ORD-P1"
        assert (await page.get("/console/search?q=INV-P1"))[2] == "/console/invoices/INV-P1"
        assert (await page.get("/console/search?q=buyer@example.com"))[2] == "/console/orders/ORD-P2"
        await host.add_order(con, "ORD-P3")
        status, body, _ = await page.get("/console/search?q=buyer@example.com")
        assert status == 200 and "ORD-P2" in body and "ORD-P3" in body and "ORD-P1" not in body
        for query in ("ORD-NONE", "re_nothing", "dp_nothing", "", "ch_nothing"):
            status, body, _ = await page.get(f"/console/search?q={query}")
            assert status == 200, query
        status, body, _ = await page.get("/console/orders/ORD-P1")
        assert status == 200 and "ORD-P1" in body and "$12.00" in body
        status, body, _ = await page.get("/console/invoices/INV-P1")
        assert status == 200 and "INV-P1" in body, invoice_id
        status, body, _ = await page.get("/console/orders/ORD-NOPE")
        assert status == 404 and "order ORD-NOPE" in body
        assert (await page.get("/console/invoices/INV-NOPE"))[0] == 404
        assert (await page.get("/console/no/such/page"))[0] == 404


async def test_refund_form_refusals_are_said_in_words_and_nothing_is_requested(
    settings: Settings, con: asyncpg.Connection
) -> None:
    """Over the refundable cap, reason Other without a note, an amount that is not a number, a
    negative or over-precise amount, no reason, and an unknown order: each re-renders the page
    with 422 (or 404's words) and no refund request is recorded."""
    await paid_order(con, None, "ORD-R1", [3000])
    async with console(settings) as page:
        cases = [
            ({"amount": "45.00", "reason": "requested_by_customer"}, "at most $30.00 is refundable now"),
            ({"amount": "5", "reason": "other"}, "needs a note that says why"),
            ({"amount": "five", "reason": "duplicate"}, "is not a number"),
            ({"amount": "-1", "reason": "duplicate"}, "must be positive"),
            ({"amount": "1.001", "reason": "duplicate"}, "at most 2 decimals"),
            ({"amount": "1", "reason": "because"}, "Choose a reason."),
        ]
        for fields, words in cases:
            status, body, _ = await page.post("/console/orders/ORD-R1/refund", fields)
            assert status == 422, fields
            assert words in body, (fields, body)
        status, body, _ = await page.post(
            "/console/orders/ORD-NOPE/refund", {"amount": "1", "reason": "duplicate"}
        )
        assert status == 404 and "order ORD-NOPE" in body
        status, body, _ = await page.post(
            "/console/invoices/INV-NOPE/refund", {"amount": "1", "reason": "duplicate"}
        )
        assert status == 404 and "invoice INV-NOPE" in body
    assert await con.fetchval("select count(*) from recon.refund_requests") == 0


async def test_reject_order_needs_a_note(settings: Settings, con: asyncpg.Connection) -> None:
    """Reject order without a note is refused in words (422) and records nothing."""
    await paid_order(con, None, "ORD-J1", [1000])
    async with console(settings) as page:
        status, body, _ = await page.post("/console/orders/ORD-J1/reject", {"note": "  "})
        assert status == 422 and "needs a note that says why" in body
    assert await con.fetchval("select count(*) from recon.refund_requests") == 0


async def test_a_console_without_a_stripe_key_refuses_refunds_and_rejects(
    settings: Settings, con: asyncpg.Connection
) -> None:
    """With no STRIPE_API_KEY the order page still renders, but Refund and Reject answer 422 saying
    the key is not set."""
    await paid_order(con, None, "ORD-K1", [1000])
    keyless = dataclasses.replace(with_stripe(settings, NOWHERE), stripe_api_key=None)
    async with (
        api_served(keyless) as url,
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
    ):
        assert (await _sign_in(http, url))[0] == 303
        cookie = next(c.value for c in http.cookie_jar if c.key == session.SESSION_COOKIE)
        active = session.read(TOKENS, cookie, time.time())
        assert active is not None
        page = Console(http, url, active.csrf)
        assert (await page.get("/console/orders/ORD-K1"))[0] == 200
        status, body, _ = await page.post("/console/orders/ORD-K1/refund", {"reason": "duplicate"})
        assert status == 422 and "STRIPE_API_KEY is not set" in body
        status, body, _ = await page.post("/console/orders/ORD-K1/reject", {"note": "fraud"})
        assert status == 422 and "STRIPE_API_KEY is not set" in body


async def test_exceptions_resolve_and_retry_from_the_console(
    settings: Settings, con: asyncpg.Connection
) -> None:
    """The exceptions page lists open ones by kind; Resolve without a note is 422, with one it
    redirects and the resolved view shows it; resolving an unknown id is 404, a non-numeric id
    is 404; Retry of a kind that cannot be retried is 422 in words."""
    first = await raise_exception(con, "over_refund", "refund larger than charge")
    second = await raise_exception(con, "unmatched_charge", "no order for the charge")
    async with console(settings) as page:
        status, body, _ = await page.get("/console/exceptions")
        assert status == 200 and f"exception-{first}" in body and f"exception-{second}" in body
        status, body, _ = await page.post(f"/console/exceptions/{first}/resolve", {"note": ""})
        assert status == 422 and "a note must say why" in body
        status, _, location = await page.post(f"/console/exceptions/{first}/resolve", {"note": "checked"})
        assert (status, location) == (303, f"/console/exceptions?done=resolved&id={first}")
        status, body, _ = await page.get(location)
        assert status == 200 and f"Exception {first} resolved." in body
        status, body, _ = await page.get("/console/exceptions")
        assert f"exception-{first}" not in body
        status, body, _ = await page.get("/console/exceptions?resolved=1")
        assert f"exception-{first}" in body and "checked" in body
        status, _, _ = await page.post("/console/exceptions/999999/resolve", {"note": "x"})
        assert status == 404
        assert (await page.post("/console/exceptions/abc/resolve", {"note": "x"}))[0] == 404
        status, body, _ = await page.post(f"/console/exceptions/{first}/retry", {})
        assert status == 422 and "Not retried" in body
        status, body, _ = await page.post(f"/console/exceptions/{second}/retry", {})
        assert status == 422 and "no stored event body" in body
    row = await con.fetchrow("select resolved_by, resolution_note from recon.exceptions where id = $1", first)
    assert dict(row) == {"resolved_by": "ops", "resolution_note": "checked"}


async def _dead_letter(con: asyncpg.Connection, event_id: str) -> None:
    await con.execute(
        "insert into recon.dead_letters (event_id, event_type, body, last_error, attempts, first_seen_at)"
        " values ($1, 'refund.created', $2, 'KeyError: charge', 8, now())",
        event_id,
        b'{"id": "%s", "object": "event", "type": "refund.created", "created": 1, "data": {"object": {}}}'
        % event_id.encode(),
    )


async def test_dead_letters_are_listed_and_replayed(settings: Settings, con: asyncpg.Connection) -> None:
    """The dead-letters page lists a waiting event with its error; Replay of an unknown id is 404;
    Replay of the waiting one either redirects (the broker confirmed, the row is marked replayed)
    or answers 503 and leaves it waiting — never both."""
    await _dead_letter(con, "evt_console_dead")
    async with console(settings) as page:
        status, body, _ = await page.get("/console/dead-letters")
        assert status == 200 and "evt_console_dead" in body and "KeyError: charge" in body
        status, body, _ = await page.post("/console/dead-letters/evt_unknown/replay", {})
        assert status == 404 and "evt_unknown" in body
        status, body, location = await page.post("/console/dead-letters/evt_console_dead/replay", {})
        replayed = await con.fetchval(
            "select replayed_at is not null from recon.dead_letters where event_id = 'evt_console_dead'"
        )
        if status == 303:
            assert location == "/console/dead-letters?replayed=evt_console_dead" and replayed
            status, body, _ = await page.get(location)
            assert status == 200
        else:
            assert status == 503 and "it stays here" in body and not replayed


async def test_payouts_list_and_one_payout(settings: Settings, con: asyncpg.Connection) -> None:
    """The payouts page lists a payout; its own page shows it; an unknown payout is a 404."""
    await con.execute(
        """
        insert into recon.payouts (id, amount, currency, arrival_date, automatic, status,
                                   status_created, status_rank, reconciliation, difference_amount)
        values ('po_console_1', 4321, 'usd', '2024-05-01', true, 'paid', now(), 3, 'differences', 100)
        """
    )
    async with console(settings) as page:
        status, body, _ = await page.get("/console/payouts")
        assert status == 200 and "po_console_1" in body and "$43.21" in body
        status, body, _ = await page.get("/console/")
        assert status == 200 and "po_console_1" in body
        status, body, _ = await page.get("/console/payouts/po_console_1")
        assert status == 200 and "po_console_1" in body
        status, body, _ = await page.get("/console/payouts/po_nope")
        assert status == 404 and "payout po_nope" in body


@pytest.mark.parametrize("cookie", ["", "a.b.c", "bm90anNvbg.sig", "e30.sig"])
def test_a_forged_or_malformed_session_cookie_is_no_session(cookie: str) -> None:
    """A cookie that is empty, has the wrong shape, is not JSON or lacks the claims reads as None."""
    assert session.read(TOKENS, cookie, time.time()) is None


def test_a_session_ends_with_its_token_and_its_lifetime() -> None:
    """A session of a token no longer configured, or past its expiry, reads as None; issuing for
    an unknown name is a KeyError; the CSRF check never matches a missing side."""
    cookie = session.issue(TOKENS, "ops", int(time.time()) + 60)
    assert session.read(TOKENS, cookie, time.time()) is not None
    assert session.read((("shop", "tok_other"),), cookie, time.time()) is None
    assert session.read(TOKENS, cookie, time.time() + 120) is None
    with pytest.raises(KeyError):
        session.issue(TOKENS, "nobody", 1)
    assert not session.same_token(None, "x") and not session.same_token("x", "")


async def test_sign_out_with_the_csrf_token_ends_the_session(settings: Settings) -> None:
    """Sign out (POST with the CSRF field) redirects to the login and drops the cookie: the next
    page redirects to the login again."""
    async with console(settings) as page:
        assert await page.post("/console/logout", {}) == (303, "", "/console/login")
        status, _, location = await page.get("/console/payouts")
        assert (status, location) == (303, "/console/login?next=/console/payouts")


def test_a_cookie_whose_claims_have_the_wrong_types_is_no_session() -> None:
    """A well-formed cookie whose name is not a string reads as None (before any signature check)."""
    payload = session._b64(b'{"n": 1, "e": 1, "r": "x"}')
    assert session.read(TOKENS, f"{payload}.sig", time.time()) is None
