"""The back-office API (CONTRACT 4b) against the real database and localstripe: answers, tokens,
idempotency keys, the split over payments, Stripe's refusal, rejecting an order, the screens."""

from __future__ import annotations

import dataclasses
import json

import aiohttp
import asyncpg
import pytest
import structlog

from tests import builders as b
from tests import host_records as host
from tests.backoffice_setup import (
    NOWHERE,
    OPS_TOKEN,
    QUEUE_HOST_WEBHOOKS,
    SHOP_TOKEN,
    api_served,
    front_fixture,  # noqa: F401 - the fixture `front`
    get,
    localstripe_url_fixture,  # noqa: F401 - the fixture `localstripe_url`
    paid_order,
    paid_payment,
    post,
    with_stripe,
)
from tests.stripe_front import StripeFront
from worker.settings import Settings

# localstripe registers plain (non-async) handlers, which aiohttp 3.14 still serves but warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Bare functions are deprecated:DeprecationWarning")


async def test_every_route_needs_a_valid_bearer_token_and_the_token_is_never_logged(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """No header, another scheme or a wrong token: 401 JSON and nothing done; a valid token works
    and its name, not its value, is who asked. No token reaches the logs."""
    _api, base = front
    await paid_order(con, base, "ORD-A1", [2000])
    s = with_stripe(settings, base)
    body = {"order_number": "ORD-A1", "amount": 500, "reason": "duplicate"}
    with structlog.testing.capture_logs() as logs:
        async with api_served(s) as url, aiohttp.ClientSession() as http:
            for headers in ({}, {"Authorization": f"Basic {SHOP_TOKEN}"}, {"Authorization": "Bearer nope"}):
                status, answer = await post(http, f"{url}/v1/refunds", body, key="k1", headers=headers)
                assert (status, answer["error"]) == (401, "unauthorized")
            assert (await get(http, f"{url}/v1/orders/ORD-A1", headers={}))[0] == 401
            ops = {"Authorization": f"Bearer {OPS_TOKEN}"}
            status, answer = await post(http, f"{url}/v1/refunds", body, key="k1", headers=ops)
    assert status == 201 and answer["requested_by"] == "ops"
    assert await con.fetchval("select count(*) from recon.refund_requests") == 1
    assert SHOP_TOKEN not in repr(logs) and OPS_TOKEN not in repr(logs)


async def test_a_refund_is_created_once_per_key_and_a_key_reused_for_another_body_is_409(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """201 with the request (parts with Stripe's refund id, refundable_after); the same key and body
    again is the same request with 200 and no second Stripe refund; the key with another body is 409."""
    api, base = front
    (charge_id,) = await paid_order(con, base, "ORD-A2", [5000])
    s = with_stripe(settings, base)
    body = {"order_number": "ORD-A2", "amount": 2000, "reason": "requested_by_customer", "message": "Sorry!"}
    async with api_served(s) as url, aiohttp.ClientSession() as http:
        status, first = await post(http, f"{url}/v1/refunds", body, key="key-A2")
        again_status, again = await post(
            http, f"{url}/v1/refunds", dict(reversed(body.items())), key="key-A2"
        )
        other_status, other = await post(http, f"{url}/v1/refunds", {**body, "amount": 2001}, key="key-A2")
        got_status, got = await get(http, f"{url}/v1/refunds/{first['id']}")
    assert status == 201
    assert (first["state"], first["amount"], first["currency"], first["refundable_after"]) == (
        "submitted",
        2000,
        "usd",
        3000,
    )
    [part] = first["parts"]
    assert (part["stripe_charge_id"], part["amount"], part["state"]) == (charge_id, 2000, "submitted")
    assert part["stripe_refund_id"] == api.created[0]["id"]
    assert (again_status, again["id"]) == (200, first["id"])
    assert (other_status, other["error"]) == (409, "idempotency_key_reused")
    assert (got_status, got["id"], got["parts"]) == (200, first["id"], first["parts"])
    assert len(api.created) == 1
    assert api.reasons == {part["stripe_refund_id"]: "requested_by_customer"}
    assert api.created[0]["metadata"]["recon_refund_request_id"] == str(first["id"])


async def test_refusals_are_422_with_a_reason_and_store_nothing(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """Over the cap: 422 exceeds_refundable naming the cap; a bad reason, `other` without a note, an
    unknown order, a bad amount: 422 naming the field; no Idempotency-Key: 400. Nothing is stored
    and Stripe is not called."""
    api, base = front
    await paid_order(con, base, "ORD-A3", [1000, 500])
    s = with_stripe(settings, base)
    cases = [
        ({"order_number": "ORD-A3", "amount": 1501, "reason": "duplicate"}, "exceeds_refundable"),
        ({"order_number": "ORD-A3", "amount": 100, "reason": "because"}, "invalid_reason"),
        ({"order_number": "ORD-A3", "amount": 100, "reason": "other"}, "note_required"),
        ({"order_number": "ORD-A3", "amount": 100, "reason": "other", "note": "  "}, "note_required"),
        ({"order_number": "ORD-NOPE", "reason": "duplicate"}, "unknown_order"),
        ({"order_number": "ORD-A3", "amount": 10.5, "reason": "duplicate"}, "invalid_amount"),
        ({"order_number": "ORD-A3", "amount": 0, "reason": "duplicate"}, "invalid_amount"),
        ({"order_number": "ORD-A3", "charge": "ch_x", "reason": "duplicate"}, "invalid_owner"),
        ({"order_number": "ORD-A3", "reason": "duplicate", "amonut": 5}, "unknown_field"),
    ]
    async with api_served(s) as url, aiohttp.ClientSession() as http:
        answers = [
            await post(http, f"{url}/v1/refunds", body, key=f"k{i}") for i, (body, _) in enumerate(cases)
        ]
        no_key = await post(http, f"{url}/v1/refunds", cases[0][0])
    for (status, answer), (_, error) in zip(answers, cases, strict=True):
        assert (status, answer["error"]) == (422, error), answer
    assert answers[0][1]["refundable"] == 1500
    assert (no_key[0], no_key[1]["error"]) == (400, "idempotency_key_required")
    assert await con.fetchval("select count(*) from recon.refund_requests") == 0
    assert api.create_calls == 0


async def test_malformed_bodies_and_ids_are_refused_before_anything_is_read_or_sent(
    settings: Settings, con: asyncpg.Connection
) -> None:
    """A body that is JSON but not an object is 400 invalid_json; a note that is not a string, a
    notify_buyer that is not a boolean, and a reject naming a field it does not take are 422 naming
    the field; a refund id that is not a number is 404. Without STRIPE_API_KEY a valid refund is
    503 stripe_not_configured. Nothing is stored."""
    await paid_order(con, None, "ORD-M1", [1000])
    refund = {"order_number": "ORD-M1", "amount": 100, "reason": "duplicate"}
    async with api_served(with_stripe(settings, NOWHERE)) as url, aiohttp.ClientSession() as http:
        answers = [
            await post(http, f"{url}/v1/refunds", [refund], key="m1"),
            await post(http, f"{url}/v1/refunds", refund | {"reason": "other", "note": 5}, key="m2"),
            await post(http, f"{url}/v1/refunds", refund | {"notify_buyer": "yes"}, key="m3"),
            await post(http, f"{url}/v1/orders/ORD-M1/reject", {"note": "fraud", "amount": 5}),
            await get(http, f"{url}/v1/refunds/abc"),
        ]
    async with (
        api_served(dataclasses.replace(with_stripe(settings, NOWHERE), stripe_api_key=None)) as url,
        aiohttp.ClientSession() as http,
    ):
        keyless = await post(http, f"{url}/v1/refunds", refund, key="m4")
    assert [(status, answer["error"]) for status, answer in answers] == [
        (400, "invalid_json"),
        (422, "invalid_note"),
        (422, "invalid_notify_buyer"),
        (422, "unknown_field"),
        (404, "not_found"),
    ]
    assert answers[3][1]["detail"] == "unknown field(s): amount"
    assert (keyless[0], keyless[1]["error"]) == (503, "stripe_not_configured")
    assert await con.fetchval("select count(*) from recon.refund_requests") == 0


async def test_an_order_refund_is_split_over_its_payments_newest_first(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """Rule 11: 2500 of an order paid 2000 + 1000 takes 1000 from the newer payment and 1500 from
    the older, one Stripe refund each; `other` sends no reason to Stripe and keeps the note in
    the metadata."""
    api, base = front
    older, newer = await paid_order(con, base, "ORD-A4", [2000, 1000])
    s = with_stripe(settings, base)
    body = {"order_number": "ORD-A4", "amount": 2500, "reason": "other", "note": "two items broken"}
    async with api_served(s) as url, aiohttp.ClientSession() as http:
        status, request = await post(http, f"{url}/v1/refunds", body, key="split")
    assert status == 201
    assert [(p["stripe_charge_id"], p["amount"]) for p in request["parts"]] == [(newer, 1000), (older, 1500)]
    assert sorted((r["charge"], r["amount"]) for r in api.created) == sorted([(newer, 1000), (older, 1500)])
    assert api.reasons == {}
    assert {r["metadata"]["recon_note"] for r in api.created} == {"two items broken"}
    assert request["refundable_after"] == 500


async def test_stripe_refusing_ends_the_request_failed_with_its_message_and_a_host_webhook(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """A charge refunded in Stripe's dashboard before its webhook came: our cap still allows it,
    Stripe refuses (charge_already_refunded). The request ends `failed` with Stripe's message, audited,
    and a refund_request.failed host webhook is queued in the same transaction."""
    from tests.stripe_front import refund_directly

    _api, base = front
    (charge_id,) = await paid_order(con, base, "ORD-A5", [3000])
    await refund_directly(base, charge_id, 3000)
    s = with_stripe(settings, base, **QUEUE_HOST_WEBHOOKS)
    async with api_served(s) as url, aiohttp.ClientSession() as http:
        status, request = await post(
            http, f"{url}/v1/refunds", {"charge": charge_id, "reason": "fraudulent"}, key="r"
        )
    assert status == 201
    assert request["state"] == "failed"
    assert request["error"] == f"Charge {charge_id} has already been refunded."
    assert request["parts"][0]["state"] == "failed" and request["parts"][0]["stripe_refund_id"] is None
    assert request["refundable_after"] == 3000  # nothing is held back by a failed request
    assert "refund_request_failed" in await host.audit_actions(con)
    rows = await con.fetch("select topic, payload from recon.outbox where channel = 'host_webhook'")
    failed = [json.loads(r["payload"])["data"] for r in rows if r["topic"] == "refund_request.failed"]
    assert len(failed) == 1
    assert (failed[0]["refund_request_id"], failed[0]["stripe_charge_id"], failed[0]["order_number"]) == (
        request["id"],
        charge_id,
        "ORD-A5",
    )
    assert failed[0]["error"] == request["error"]


async def test_a_network_error_is_retried_with_the_same_key(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """Stripe answering 500 once: the call is repeated with the same Idempotency-Key and the
    request is submitted with one refund."""
    api, base = front
    await paid_order(con, base, "ORD-A6", [1200])
    api.fail_next = 1
    s = with_stripe(settings, base)
    async with api_served(s) as url, aiohttp.ClientSession() as http:
        status, request = await post(
            http, f"{url}/v1/refunds", {"order_number": "ORD-A6", "reason": "duplicate"}, key="n"
        )
    assert (status, request["state"], request["amount"]) == (201, "submitted", 1200)
    assert api.create_calls == 1 and len(api.created) == 1  # the 500 came before the create reached it


async def test_reject_order_refunds_everything_refundable_and_rejects_once(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """POST /v1/orders/{n}/reject: the order becomes `rejected` (audited, with a host webhook) and all
    that is refundable is refunded in one request: 201. Again: nothing left, 200 with null. A reject
    without a note is 422."""
    api, base = front
    await paid_order(con, base, "ORD-A7", [700, 300])
    s = with_stripe(settings, base, **QUEUE_HOST_WEBHOOKS)
    async with api_served(s) as url, aiohttp.ClientSession() as http:
        missing = await post(http, f"{url}/v1/orders/ORD-A7/reject", {})
        status, request = await post(http, f"{url}/v1/orders/ORD-A7/reject", {"note": "out of stock"})
        again = await post(http, f"{url}/v1/orders/ORD-A7/reject", {"note": "out of stock"})
    assert (missing[0], missing[1]["error"]) == (422, "note_required")
    assert status == 201
    assert (request["amount"], request["reason"], request["note"], request["rejects_order"]) == (
        1000,
        "other",
        "out of stock",
        True,
    )
    assert again == (200, None)
    assert len(api.created) == 2
    assert await con.fetchval("select status from recon.orders where number = 'ORD-A7'") == "rejected"
    assert (await host.audit_actions(con)).count("order_rejected") == 1
    topics = await con.fetch("select payload from recon.outbox where topic = 'order.status_changed'")
    assert [json.loads(r["payload"])["data"]["status"] for r in topics][-1] == "rejected"


async def test_order_and_invoice_screens_show_amounts_payments_refunds_and_timeline(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """GET /v1/orders/{n} and /v1/invoices/{n}: status, disputed, captured/refunded/refundable_now/
    balance_due, each payment with its ledger rows, the refund requests, and the Stripe events; an
    unknown number is 404."""
    _api, base = front
    (charge_id,) = await paid_order(con, base, "ORD-A8", [4000], currency="jpy")
    invoice_id = await host.add_invoice(con, "INV-A8", currency="eur", amount_total=900)
    await paid_payment(con, base, invoice_id=invoice_id, amount=900, currency="eur")
    s = with_stripe(settings, base)
    async with api_served(s) as url, aiohttp.ClientSession() as http:
        await post(
            http,
            f"{url}/v1/refunds",
            {"order_number": "ORD-A8", "amount": 1000, "reason": "duplicate"},
            key="v",
        )
        order = await get(http, f"{url}/v1/orders/ORD-A8")
        invoice = await get(http, f"{url}/v1/invoices/INV-A8")
        unknown = await get(http, f"{url}/v1/orders/ORD-NONE")
    status, view = order
    assert status == 200
    assert (view["status"], view["disputed"], view["currency"]) == ("paid", False, "jpy")
    assert view["amounts"] == {
        "captured": 4000,
        "refunded": 0,
        "refundable_now": 3000,  # the request not booked yet holds 1000 back
        "balance_due": 0,
        "net_amount": 4000,
    }
    assert [p["stripe_charge_id"] for p in view["payments"]] == [charge_id]
    assert [(e["kind"], e["amount"]) for e in view["payments"][0]["ledger"]] == [("charge", 4000)]
    assert [(r["amount"], r["state"], r["requested_by"]) for r in view["refund_requests"]] == [
        (1000, "submitted", "shop")
    ]
    assert [e["type"] for e in view["timeline"]] == ["charge.succeeded"]
    assert invoice[0] == 200 and invoice[1]["amounts"]["captured"] == 900
    assert (unknown[0], unknown[1]["error"]) == (404, "not_found")


async def test_a_disputed_payment_refunds_nothing(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """While a dispute is open the payment's refundable is 0: a request for it is 422
    exceeds_refundable with refundable 0, and Stripe is never called."""
    api, base = front
    (charge_id,) = await paid_order(con, base, "ORD-A9", [2500])
    dispute = b.dispute(charge_id=charge_id, amount=2500, status="needs_response")
    await host.apply(con, b.incoming(b.dispute_event("charge.dispute.created", dispute)))
    s = with_stripe(settings, base)
    async with api_served(s) as url, aiohttp.ClientSession() as http:
        by_order = await post(
            http, f"{url}/v1/refunds", {"order_number": "ORD-A9", "reason": "fraudulent"}, key="d1"
        )
        by_charge = await post(
            http, f"{url}/v1/refunds", {"charge": charge_id, "amount": 1, "reason": "fraudulent"}, key="d2"
        )
    for status, answer in (by_order, by_charge):
        assert (status, answer["error"], answer["refundable"]) == (422, "exceeds_refundable", 0)
    assert api.create_calls == 0


async def test_an_order_with_a_payment_in_another_currency_is_refunded_by_charge_only(
    settings: Settings, con: asyncpg.Connection, front: tuple[StripeFront, str]
) -> None:
    """A yen order for which the host also recorded a dollar charge: a refund or reject by order is
    422 currency_mismatch naming that charge (one amount cannot be split over two currencies, and
    dollars would go back for yen), nothing is stored, the order is not rejected and Stripe is not
    called. Each charge can still be refunded on its own, in its own currency, and once the dollar
    payment has nothing left to give the order can be rejected."""
    api, base = front
    (yen,) = await paid_order(con, base, "ORD-A10", [100_000], currency="jpy")
    order_id = await con.fetchval("select id from recon.orders where number = 'ORD-A10'")
    dollars = await paid_payment(con, None, order_id=order_id, amount=5000, currency="usd")
    s = with_stripe(settings, base)
    async with api_served(s) as url, aiohttp.ClientSession() as http:
        by_order = await post(
            http, f"{url}/v1/refunds", {"order_number": "ORD-A10", "reason": "duplicate"}, key="m1"
        )
        reject = await post(http, f"{url}/v1/orders/ORD-A10/reject", {"note": "out of stock"})
        requests_before = await con.fetchval("select count(*) from recon.refund_requests")
        calls_before = api.create_calls
        status_before = await con.fetchval("select status from recon.orders where number = 'ORD-A10'")
        by_charge = await post(
            http, f"{url}/v1/refunds", {"charge": yen, "amount": 30_000, "reason": "duplicate"}, key="m2"
        )
        # Once the dollar payment can give nothing (here: voided), it no longer stands in the way.
        await con.execute("update recon.payments set status = 'voided' where stripe_charge_id = $1", dollars)
        rejected = await post(http, f"{url}/v1/orders/ORD-A10/reject", {"note": "out of stock"})
    for status, answer in (by_order, reject):
        assert (status, answer["error"], answer["charges"], answer["currency"]) == (
            422,
            "currency_mismatch",
            [dollars],
            "jpy",
        ), answer
    assert (requests_before, calls_before) == (0, 0)
    assert status_before != "rejected"
    assert by_charge[0] == 201
    assert (by_charge[1]["amount"], by_charge[1]["currency"]) == (30_000, "jpy")
    assert (rejected[0], rejected[1]["amount"], rejected[1]["currency"]) == (201, 70_000, "jpy")
