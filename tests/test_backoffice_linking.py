"""The rules and the back office's requests (rules 11 and 12, database side): a refund's webhook
links it to the request its metadata names, moves the request on, and queues the buyer e-mail and
the host webhooks in the same transaction."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from tests import builders as b
from tests import host_records as host
from tests.backoffice_setup import paid_order, paid_payment
from worker.backoffice import store


async def request(
    con: asyncpg.Connection, owner: str, amount: int | None, *, kind: str = "order", notify: bool = True
) -> int:
    ask = store.RefundAsk(kind, owner, amount, "other", "customer called", notify, "Sorry for the wait")  # type: ignore[arg-type]
    request_id = await store.create_request(
        con, ask, requested_by="desk", idempotency_key=None, fingerprint=None
    )
    assert request_id is not None
    return request_id


def app_refund(charge_id: str, amount: int, request_id: int, **fields: Any) -> dict[str, Any]:
    refund = b.refund(charge_id=charge_id, amount=amount, **fields)
    refund["metadata"] = {"recon_refund_request_id": str(request_id)}
    return refund


async def outbox(con: asyncpg.Connection, channel: str) -> list[tuple[str, dict[str, Any]]]:
    rows = await con.fetch("select topic, payload from recon.outbox where channel = $1 order by id", channel)
    return [(r["topic"], json.loads(r["payload"])) for r in rows]


async def test_an_app_refund_is_booked_once_linked_and_shown_as_app(con: asyncpg.Connection) -> None:
    """refund.created, charge.refund.updated and charge.refunded for the refund the back office made:
    one `refund` row; finance.refunds shows source app with the note and requested_by; the request
    succeeded; one buyer e-mail queued, to the order's buyer, with the operator's message."""
    (charge_id,) = await paid_order(con, None, "ORD-L1", [3000])
    request_id = await request(con, "ORD-L1", 1200)
    refund = app_refund(charge_id, 1200, request_id)
    charge = b.charge(charge_id=charge_id, amount=3000, refunds=[refund])
    for event in (
        b.refund_event("refund.created", refund),
        b.refund_event("charge.refund.updated", refund),
        b.charge_event("charge.refunded", charge, created=b.T0 + 5, api_version=b.OLD_API_VERSION),
    ):
        await host.apply(con, b.incoming(event))
    assert [row for row in await host.ledger(con, charge_id) if row[0] == "refund"] == [
        ("refund", -1200, "usd", refund["id"])
    ]
    row = await con.fetchrow("select source, refund_request_id, note, requested_by from finance.refunds")
    assert tuple(row) == ("app", request_id, "customer called", "desk")
    assert await con.fetchval("select state from finance.refund_requests") == "succeeded"
    [(topic, mail)] = await outbox(con, "email")
    assert topic == "refund.booked"
    assert (mail["to"], mail["amount"], mail["amount_decimal"], mail["message"], mail["source"]) == (
        "buyer@example.com",
        1200,
        "12.00",
        "Sorry for the wait",
        "app",
    )
    balance = await con.fetchrow("select refunded, refundable_now from finance.order_balances")
    assert tuple(balance) == (1200, 1800)


async def test_a_request_holds_back_its_amount_until_booked_and_not_twice(con: asyncpg.Connection) -> None:
    """refundable_now subtracts a request not booked yet; once its refund is booked it counts as
    refunded instead, never both."""
    (charge_id,) = await paid_order(con, None, "ORD-L2", [1000])
    request_id = await request(con, "ORD-L2", 400)
    sql = "select refunded, refundable_now from finance.order_balances"
    assert tuple(await con.fetchrow(sql)) == (0, 600)
    await host.apply(
        con, b.incoming(b.refund_event("refund.created", app_refund(charge_id, 400, request_id)))
    )
    assert tuple(await con.fetchrow(sql)) == (400, 600)


async def test_refundable_now_is_what_each_payment_can_still_give_as_the_cap_counts_it(
    con: asyncpg.Connection,
) -> None:
    """A request's part held on payment B, then a dispute opens on B: B gives nothing now and its
    part holds nothing back from A, so the order's refundable_now is A's whole 1000, the cap the
    back office applies (not 1000 less the part, which the order-level sum used to show)."""
    _older, newer = await paid_order(con, None, "ORD-L6", [1000, 600])
    await request(con, "ORD-L6", 600)  # newest first: all of it on the newer payment
    dispute = b.dispute(charge_id=newer, amount=600, status="needs_response")
    await host.apply(con, b.incoming(b.dispute_event("charge.dispute.created", dispute)))
    cap = await con.fetchval("select sum(refundable) from recon.payment_refundable")  # this order's only
    now = await con.fetchval(
        "select refundable_now from finance.order_balances where order_number = 'ORD-L6'"
    )
    assert (now, cap) == (1000, 1000)


async def test_an_owners_balances_count_only_payments_in_its_own_currency(con: asyncpg.Connection) -> None:
    """A yen order for which the host also recorded a dollar payment: the order's captured,
    refundable and balance are in yen only; the dollar payment shows in payment_balances, in dollars."""
    await paid_order(con, None, "ORD-L7", [100_000], currency="jpy")
    order_id = await con.fetchval("select id from recon.orders where number = 'ORD-L7'")
    dollars = await paid_payment(con, None, order_id=order_id, amount=5000, currency="usd")
    row = await con.fetchrow(
        "select currency, captured, refundable_now, balance_due from finance.order_balances"
        " where order_number = 'ORD-L7'"
    )
    assert tuple(row) == ("jpy", 100_000, 100_000, 0)
    shown = await con.fetchrow(
        "select currency, amount from finance.payment_balances where stripe_charge_id = $1", dollars
    )
    assert tuple(shown) == ("usd", 5000)


async def test_a_refund_that_fails_ends_its_request_failed_and_tells_the_host(
    con: asyncpg.Connection,
) -> None:
    """A booked app refund that later fails: reversed once, the request `failed` with Stripe's
    failure_reason (audited), and host webhooks refund.failed and refund_request.failed queued."""
    (charge_id,) = await paid_order(con, None, "ORD-L3", [2000])
    request_id = await request(con, "ORD-L3", 2000)
    refund = app_refund(charge_id, 2000, request_id, status="pending")
    await host.apply(con, b.incoming(b.refund_event("refund.created", refund)))
    failed = {**refund, "status": "failed", "failure_reason": "expired_or_canceled_card"}
    await host.apply(con, b.incoming(b.refund_event("refund.failed", failed, created=b.T0 + 60)))
    state, error = await con.fetchrow("select state, error from finance.refund_requests")
    assert (state, error) == ("failed", "expired_or_canceled_card")
    assert "refund_request_failed" in await host.audit_actions(con)
    kinds = [k for k, *_ in await host.ledger(con, charge_id)]
    assert kinds.count("refund") == 1 and kinds.count("refund_reversal") == 1
    hooks = {topic: payload["data"] for topic, payload in await outbox(con, "host_webhook")}
    assert hooks["refund.failed"]["refund_id"] == refund["id"]
    assert hooks["refund.failed"]["failure_reason"] == "expired_or_canceled_card"
    assert hooks["refund_request.failed"]["refund_request_id"] == request_id
    assert hooks["refund_request.failed"]["error"] == "expired_or_canceled_card"


async def test_metadata_naming_another_payments_request_links_nothing(con: asyncpg.Connection) -> None:
    """Metadata is anyone's to write: a refund on charge B naming a request made for charge A is not
    linked (source stripe), and A's request is untouched."""
    (charge_a,) = await paid_order(con, None, "ORD-L4A", [1000])
    (charge_b,) = await paid_order(con, None, "ORD-L4B", [1000])
    request_id = await request(con, charge_a, 500, kind="charge")
    await host.apply(con, b.incoming(b.refund_event("refund.created", app_refund(charge_b, 500, request_id))))
    assert await con.fetchval("select source from finance.refunds") == "stripe"
    assert await con.fetchval("select state from finance.refund_requests") == "requested"


async def test_buyer_emails_follow_notify_buyer_and_refunds_made_elsewhere_are_marked(
    con: asyncpg.Connection,
) -> None:
    """notify_buyer false: no e-mail. A refund made in Stripe's dashboard is queued marked `stripe`
    (the sender sends it only with RECON_NOTIFY_DASHBOARD_REFUNDS). An invoice's bill_to that is not an
    address gets nothing; one that is gets the e-mail."""
    (charge_id,) = await paid_order(con, None, "ORD-L5", [5000])
    quiet = await request(con, "ORD-L5", 1000, notify=False)
    await host.apply(con, b.incoming(b.refund_event("refund.created", app_refund(charge_id, 1000, quiet))))
    dashboard = b.refund(charge_id=charge_id, amount=700)
    await host.apply(con, b.incoming(b.refund_event("refund.created", dashboard)))
    no_address = await host.add_invoice(con, "INV-L5A", amount_total=800)
    charge_a = await paid_payment(con, None, invoice_id=no_address, amount=800, currency="usd")
    await host.apply(
        con, b.incoming(b.refund_event("refund.created", b.refund(charge_id=charge_a, amount=800)))
    )
    with_address = await host.add_invoice(con, "INV-L5B", amount_total=900)
    await con.execute("update recon.invoices set bill_to = 'ap@example.org' where id = $1", with_address)
    charge_b = await paid_payment(con, None, invoice_id=with_address, amount=900, currency="usd")
    await host.apply(
        con, b.incoming(b.refund_event("refund.created", b.refund(charge_id=charge_b, amount=900)))
    )
    mails = [(p["refund_id"], p["source"], p["to"]) for _, p in await outbox(con, "email")]
    assert mails == [
        (dashboard["id"], "stripe", "buyer@example.com"),
        (mails[1][0], "stripe", "ap@example.org"),
    ]


async def test_status_and_dispute_changes_queue_host_webhooks(con: asyncpg.Connection) -> None:
    """Rule 12's host webhooks come from the changes themselves: order.status_changed when a refund
    moves the order, dispute.opened and dispute.closed; each with a stable id of its own."""
    (charge_id,) = await paid_order(con, None, "ORD-L6", [1500])
    dispute = b.dispute(charge_id=charge_id, amount=1500, status="needs_response")
    await host.apply(con, b.incoming(b.dispute_event("charge.dispute.created", dispute)))
    closed = {**dispute, "status": "lost"}
    await host.apply(con, b.incoming(b.dispute_event("charge.dispute.closed", closed, created=b.T0 + 60)))
    hooks = await outbox(con, "host_webhook")
    topics = [topic for topic, _ in hooks]
    assert topics.count("dispute.opened") == 1 and topics.count("dispute.closed") == 1
    opened = next(p["data"] for t, p in hooks if t == "dispute.opened")
    assert (opened["dispute_id"], opened["stripe_charge_id"], opened["order_number"]) == (
        dispute["id"],
        charge_id,
        "ORD-L6",
    )
    moves = [p["data"]["status"] for t, p in hooks if t == "order.status_changed"]
    assert moves == ["paid", "charged_back"]
    ids = await con.fetch("select message_id from recon.outbox")
    assert len({r["message_id"] for r in ids}) == len(ids)
