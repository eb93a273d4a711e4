"""The ops console (CONTRACT 4c) over plain HTTP: aiohttp's client against the back-office API app
(console included) and the real database, signed in the way a browser signs in — every page, the
search, the actions and the refusals a form can meet, without a browser."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests import builders as b
from tests import host_records as host
from tests.backoffice_setup import NOWHERE, OPS_TOKEN, TOKENS, api_served, paid_order, with_stripe
from tests.console_browser import raise_exception
from tests.console_http import console, sign_in, signed_in
from tests.work_queue import drain_work_queue, work_queue_full
from worker.backoffice.console import session
from worker.settings import Settings


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
        assert (await sign_in(http, url, token="tok_wrong"))[0] == 401
        status, location = await sign_in(http, url)
        assert (status, location) == (303, "/console/payouts")
        async with http.post(f"{url}/console/exceptions/1/resolve", data={"note": "x"}) as response:
            assert response.status == 403
        async with http.post(f"{url}/console/logout", allow_redirects=False) as response:
            # Logging out is a POST too: without the CSRF field it is refused like any other.
            assert response.status == 403


async def test_an_open_route_is_known_by_its_route_not_its_decoded_path(settings: Settings) -> None:
    """Without a session, a path that only decodes to the stylesheet's (an encoded "/") is no open
    route: it redirects to the login like any page; the stylesheet itself is served."""
    async with (
        api_served(with_stripe(settings, NOWHERE)) as url,
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
    ):
        async with http.get(f"{url}/console/static%2Fconsole.css", allow_redirects=False) as response:
            assert response.status == 303
            assert response.headers["Location"].startswith("/console/login?next=")
        async with http.get(f"{url}/console/static/console.css", allow_redirects=False) as response:
            assert response.status == 200


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
        assert (await sign_in(http, url))[0] == 303
        page = signed_in(http, url)
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
    is 404; Retry of a kind that cannot be retried, of one with no stored event, or of one already
    resolved is 422 in words."""
    first = await raise_exception(con, "over_refund", "refund larger than charge")
    second = await raise_exception(con, "unmatched_charge", "no order for the charge")
    closed, _ = await _unmatched_charge(con)
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
        status, _, _ = await page.post(f"/console/exceptions/{closed}/resolve", {"note": "paid by hand"})
        assert status == 303
        status, body, _ = await page.post(f"/console/exceptions/{closed}/retry", {})
        assert status == 422 and f"Not retried: exception {closed} is already resolved." in body
    row = await con.fetchrow("select resolved_by, resolution_note from recon.exceptions where id = $1", first)
    assert dict(row) == {"resolved_by": "ops", "resolution_note": "checked"}


async def _dead_letter(con: asyncpg.Connection, event_id: str) -> bytes:
    """A dead letter waiting for replay, as the consumer records one; returns its stored body."""
    body = (
        b'{"id": "%s", "object": "event", "type": "refund.created", "created": 1, "data": {"object": {}}}'
        % event_id.encode()
    )
    await con.execute(
        "insert into recon.dead_letters (event_id, event_type, body, last_error, attempts, first_seen_at)"
        " values ($1, 'refund.created', $2, 'KeyError: charge', 8, now())",
        event_id,
        body,
    )
    return body


async def test_dead_letters_are_listed_and_replayed(
    settings: Settings, con: asyncpg.Connection, amqp_url: str
) -> None:
    """The dead-letters page lists a waiting event with its error; Replay of an unknown id is 404;
    Replay of the waiting one redirects to the page saying it is queued again: its stored body is
    the one message in the work queue, the row is marked replayed and no longer listed."""
    body = await _dead_letter(con, "evt_console_dead")
    async with console(settings) as page:
        status, body_shown, _ = await page.get("/console/dead-letters")
        assert status == 200 and "evt_console_dead" in body_shown and "KeyError: charge" in body_shown
        status, body_shown, _ = await page.post("/console/dead-letters/evt_unknown/replay", {})
        assert status == 404 and "evt_unknown" in body_shown
        status, _, location = await page.post("/console/dead-letters/evt_console_dead/replay", {})
        assert (status, location) == (303, "/console/dead-letters?replayed=evt_console_dead")
        status, body_shown, _ = await page.get(location)
        assert status == 200 and "evt_console_dead is queued again." in body_shown
        assert "No dead-lettered events waiting for replay." in body_shown
    [queued] = await drain_work_queue(amqp_url)
    assert (queued.message_id, queued.body) == ("evt_console_dead", body)
    assert await con.fetchval(
        "select replayed_at is not null from recon.dead_letters where event_id = 'evt_console_dead'"
    )


async def _unmatched_charge(con: asyncpg.Connection) -> tuple[int, str]:
    """A charge.succeeded no order matches, past its waiting window: unmatched, one exception, its
    body kept for a retry. Returns the exception's id and the event's id."""
    charge = b.charge(amount=1500, metadata={"order_number": "ORD-LATER"})
    event = b.charge_event("charge.succeeded", charge)
    assert (await host.apply(con, b.incoming(event), retry_s=0)).outcome == "unmatched"
    exception_id = await con.fetchval(
        "select id from recon.exceptions where kind = 'unmatched_charge' and stripe_event_id = $1",
        event["id"],
    )
    return int(exception_id), str(event["id"])


async def test_retry_from_the_console_queues_the_event_again(
    settings: Settings, con: asyncpg.Connection, amqp_url: str
) -> None:
    """Retry of an unmatched charge redirects to the exceptions page saying its event is queued
    again: the event is the one message in the work queue, its inbox row is retrying again, the
    retry is audited once, and the exception stays open until the event applies."""
    exception_id, event_id = await _unmatched_charge(con)
    async with console(settings) as page:
        status, _, location = await page.post(f"/console/exceptions/{exception_id}/retry", {})
        assert (status, location) == (303, f"/console/exceptions?done=retried&id={exception_id}")
        status, body, _ = await page.get(location)
        assert status == 200 and f"Exception {exception_id}: its event is queued again." in body
    assert [m.message_id for m in await drain_work_queue(amqp_url)] == [event_id]
    assert await con.fetchval("select outcome from recon.event_inbox where event_id = $1", event_id) == (
        "retrying"
    )
    assert await host.audit_actions(con, event_id) == ["event_unmatched", "exception_retried"]
    assert await con.fetchval("select resolved_at from recon.exceptions where id = $1", exception_id) is None


async def test_a_broker_that_refuses_the_message_is_a_503_and_nothing_changes(
    settings: Settings, con: asyncpg.Connection
) -> None:
    """With the work queue full (the broker nacks every publish), Replay answers 503 saying the
    event stays here and Retry 503 saying the broker did not take it: the dead letter is still
    waiting and listed, and the unmatched event's inbox row is put back as it was."""
    await _dead_letter(con, "evt_console_refused")
    exception_id, event_id = await _unmatched_charge(con)
    async with console(settings) as page, work_queue_full(settings):
        status, body, _ = await page.post("/console/dead-letters/evt_console_refused/replay", {})
        assert status == 503
        assert "Not replayed: the broker did not confirm evt_console_refused; it stays here." in body
        status, body, _ = await page.post(f"/console/exceptions/{exception_id}/retry", {})
        assert status == 503
        assert f"Not retried: the broker did not take the event of exception {exception_id}." in body
    assert (
        await con.fetchval(
            "select replayed_at from recon.dead_letters where event_id = 'evt_console_refused'"
        )
        is None
    )
    assert await con.fetchval("select outcome from recon.event_inbox where event_id = $1", event_id) == (
        "unmatched"
    )


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


async def _raise_with_detail(
    con: asyncpg.Connection, kind: str, object_id: str, detail: dict[str, Any]
) -> None:
    """An open exception of ``kind`` on ``object_id`` whose detail is ``detail``, as a handler raises one."""
    await con.execute(
        "insert into recon.exceptions (kind, stripe_object_id, detail) values ($1, $2, $3::jsonb)",
        kind,
        object_id,
        json.dumps(detail),
    )


async def test_exception_details_show_money_in_the_currency_they_name(
    settings: Settings, con: asyncpg.Connection
) -> None:
    """An exception's amounts show in the format of the currency its detail names: three-decimal
    KWD, zero-decimal JPY, a negative USD payout difference and its lines' differences. Its other
    values stay as raised (the currency itself, a reason, counts such as amount_differs), and the
    amounts of a detail that names no currency stay in minor units."""
    await _raise_with_detail(
        con,
        "over_refund",
        "re_kwd",
        {"refund_amount": 1005, "amount_refunded": 0, "captured_amount": 1000, "currency": "kwd"},
    )
    await _raise_with_detail(
        con, "refund_failed", "re_jpy", {"refund_amount": 110000, "currency": "jpy", "failure_reason": "lost"}
    )
    line = {"balance_transaction": "txn_1", "source": "ch_1", "match": "amount_differs", "difference": -1500}
    await _raise_with_detail(
        con,
        "payout_difference",
        "po_usd",
        {
            "currency": "usd",
            "payout_amount": 4321,
            "lines_net": 5821,
            "difference_amount": -1500,
            "missing_in_ledger": 0,
            "amount_differs": 1,
            "lines": [line],
        },
    )
    await _raise_with_detail(
        con, "refund_mismatch", "ch_none", {"expected_live_refunds": 700, "live_refunds_booked": 200}
    )
    async with console(settings) as page:
        status, body, _ = await page.get("/console/exceptions")
    assert status == 200
    shown = [
        "refund_amount=1.005 KWD",
        "amount_refunded=0.000 KWD",
        "captured_amount=1.000 KWD",
        "currency=kwd",
        "refund_amount=¥110,000",
        "failure_reason=lost",
        "payout_amount=$43.21",
        "lines_net=$58.21",
        "difference_amount=-$15.00",
        "missing_in_ledger=0",
        "amount_differs=1",
        "expected_live_refunds=700",
        "live_refunds_booked=200",
    ]
    for text in shown:
        assert f"<span>{text}</span>" in body, text
    assert "-1500" not in body  # nor in the payout's lines


async def test_a_payout_whose_lines_do_not_add_up_shows_its_difference(
    settings: Settings, con: asyncpg.Connection
) -> None:
    """A payout marked differences with no differing line (its lines' net is not its amount) shows
    the difference on its own page, as the payouts list does; a payout with a differing line whose
    differences cancel out still says how many lines differ."""
    await con.execute(
        """
        insert into recon.payouts (id, amount, currency, arrival_date, automatic, status,
                                   status_created, status_rank, reconciliation, difference_amount)
        values ('po_console_net', 4321, 'usd', '2024-05-01', true, 'paid', now(), 3, 'differences', -1500),
               ('po_console_line', 4321, 'usd', '2024-05-01', true, 'paid', now(), 3, 'differences', 0)
        """
    )
    await con.execute(
        """
        insert into recon.payout_lines (payout_id, balance_transaction_id, type, amount, fee, net,
                                        currency, match, difference, created)
        values ('po_console_line', 'txn_console_1', 'charge', 4321, 0, 4321, 'usd', 'amount_differs', 0,
                now())
        """
    )
    async with console(settings) as page:
        status, body, _ = await page.get("/console/payouts/po_console_net")
        assert status == 200 and "-$15.00" in body
        status, body, _ = await page.get("/console/payouts/po_console_line")
        assert status == 200 and "0 of 1 lines matched, 1 differ" in body


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
    page redirects to the login again. A copy of the cookie taken before is refused too: the
    sign-out is recorded, not only deleted from this browser."""
    async with console(settings) as page:
        copied = next(c.value for c in page.http.cookie_jar if c.key == session.SESSION_COOKIE)
        assert await page.post("/console/logout", {}) == (303, "", "/console/login")
        status, _, location = await page.get("/console/payouts")
        assert (status, location) == (303, "/console/login?next=/console/payouts")
        async with aiohttp.ClientSession() as other:
            headers = {"Cookie": f"{session.SESSION_COOKIE}={copied}"}
            async with other.get(
                page.url + "/console/payouts", headers=headers, allow_redirects=False
            ) as replay:
                assert (replay.status, replay.headers["Location"]) == (
                    303,
                    "/console/login?next=/console/payouts",
                )


def test_a_cookie_whose_claims_have_the_wrong_types_is_no_session() -> None:
    """A well-formed cookie whose name is not a string reads as None (before any signature check)."""
    payload = session._b64(b'{"n": 1, "e": 1, "r": "x"}')
    assert session.read(TOKENS, f"{payload}.sig", time.time()) is None
