"""Money truth end to end: split payments, partial captures, expired authorisations, lost disputes
and late refund failures, each POSTed as signed webhooks to the real receiver and read back from
the finance views (recon run in this loop, the real RabbitMQ and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tests import builders as b
from tests import host_records as host
from tests.harness import fetch
from tests.test_rules_e2e import balance, db, exceptions, ledger, one, paid_charge, recon
from worker.settings import Settings

T = b.T0


async def order_row(settings: Settings, number: str) -> dict[str, Any]:
    return dict(await one(settings, "select * from finance.order_balances where order_number = $1", number))


async def test_an_order_paid_by_two_payments_takes_its_status_and_flag_from_both(settings: Settings) -> None:
    """Two payments of 600 and 400 on one order: refunding all of one leaves the order partially
    refunded (not refunded); a dispute on one flags the order, and an event about the other
    payment does not clear the flag; once both are fully refunded the order is refunded."""
    async with db(settings) as con:
        order_id = await host.add_order(con, "ORD-SPLIT", amount_total=1000)
        await host.add_payment(con, order_id=order_id, charge_id="ch_split_a", amount=600)
        await host.add_payment(con, order_id=order_id, charge_id="ch_split_b", amount=400)
    refund_b = b.refund(charge_id="ch_split_b", amount=400, refund_id="re_split_b", created=T + 1)
    refund_a = b.refund(charge_id="ch_split_a", amount=600, refund_id="re_split_a", created=T + 9)
    opened = b.dispute(charge_id="ch_split_a", amount=600, dispute_id="du_split", created=T + 5)
    async with recon(settings) as stripe:
        await stripe.deliver(
            b.charge_event("charge.succeeded", paid_charge("ch_split_a", 600), created=T),
            b.charge_event("charge.succeeded", paid_charge("ch_split_b", 400), created=T),
            b.refund_event("refund.created", refund_b, created=T + 1),
        )
        split = await order_row(settings, "ORD-SPLIT")
        assert (split["status"], split["captured"], split["refunded"]) == ("partially_refunded", 1000, 400)
        assert split["balance_due"] == 400
        await stripe.deliver(b.dispute_event("charge.dispute.created", opened, created=T + 5))
        assert (await order_row(settings, "ORD-SPLIT"))["disputed"] is True
        # An event about payment B only: the order keeps the flag payment A's dispute set.
        await stripe.deliver(
            b.refund_event("refund.updated", dict(refund_b, metadata={"note": "x"}), created=T + 6)
        )
        flagged = await order_row(settings, "ORD-SPLIT")
        assert (flagged["disputed"], flagged["refundable_now"]) == (True, 0)  # A is disputed, B refunded
        won = dict(opened, status="won")
        await stripe.deliver(
            b.dispute_event("charge.dispute.closed", won, created=T + 8),
            b.refund_event("refund.created", refund_a, created=T + 9),
        )
    done = await order_row(settings, "ORD-SPLIT")
    assert (done["status"], done["disputed"], done["refunded"], done["net_amount"]) == (
        "refunded",
        False,
        1000,
        0,
    )


async def test_a_partial_capture_books_one_adjustment_and_ledger_agrees_with_balances(
    settings: Settings,
) -> None:
    """A host-recorded payment of 1000 captured for 600: the charge row stays and one
    capture_adjustment of -400 brings the charge rows to 600, in either order of the capture and
    a refund; finance.ledger's sum equals payment_balances.net_amount."""
    async with db(settings) as con:
        await host.add_order_with_payment(con, "ORD-CAP1", "ch_cap1", amount=1000)
        await host.add_order_with_payment(con, "ORD-CAP2", "ch_cap2", amount=1000)
    events = {}
    for charge_id in ("ch_cap1", "ch_cap2"):
        partial = b.charge(charge_id=charge_id, amount=1000, amount_captured=600, created=T)
        refund = b.refund(charge_id=charge_id, amount=100, refund_id=f"re_{charge_id}", created=T + 2)
        events[charge_id] = [
            b.charge_event("charge.captured", partial, created=T + 1),
            b.refund_event("refund.created", refund, created=T + 2),
        ]
    async with recon(settings) as stripe:
        await stripe.deliver(*events["ch_cap1"])
        await stripe.deliver(*reversed(events["ch_cap2"]))
    for charge_id in ("ch_cap1", "ch_cap2"):
        rows = await ledger(settings, charge_id)
        assert rows == {
            ("charge", 1000, "usd", charge_id): 1,
            ("capture_adjustment", -400, "usd", charge_id): 1,
            ("refund", -100, "usd", f"re_{charge_id}"): 1,
        }
        paid = await balance(settings, charge_id)
        assert (paid["amount"], paid["net_amount"], paid["status"]) == (600, 500, "partially_refunded")
        assert paid["net_amount"] == sum(amount * n for (_, amount, _, _), n in rows.items())
    assert (await order_row(settings, "ORD-CAP1"))["captured"] == 600


async def test_an_expired_authorisation_nets_to_zero_and_voids_the_payment_and_order(
    settings: Settings,
) -> None:
    """charge.expired on a host-recorded payment: its charge row is offset by a capture_adjustment
    (money never moved), and the payment and its order are voided; a replay changes nothing."""
    async with db(settings) as con:
        await host.add_order_with_payment(con, "ORD-EXP", "ch_exp", amount=2500)
    expired = b.charge(charge_id="ch_exp", amount=2500, captured=False, created=T)
    event = b.charge_event("charge.expired", expired, created=T + 7 * 86400)
    async with recon(settings) as stripe:
        await stripe.deliver(event)
        await stripe.post(event)  # Stripe retries: a duplicate
        await stripe.settled(event)
    assert await ledger(settings, "ch_exp") == {
        ("charge", 2500, "usd", "ch_exp"): 1,
        ("capture_adjustment", -2500, "usd", "ch_exp"): 1,
    }
    voided = await balance(settings, "ch_exp")
    assert (voided["amount"], voided["net_amount"], voided["status"], voided["refundable_amount"]) == (
        0,
        0,
        "voided",
        0,
    )
    order = await order_row(settings, "ORD-EXP")
    assert (order["status"], order["captured"], order["balance_due"]) == ("voided", 0, 2500)
    adjusted_at = await one(
        settings,
        "select occurred_at from finance.ledger where kind = 'capture_adjustment' and stripe_charge_id = $1",
        "ch_exp",
    )
    assert adjusted_at == datetime.fromtimestamp(T + 7 * 86400, UTC)  # when the expiry was shown


async def test_a_lost_dispute_charges_back_the_payment_and_its_order(settings: Settings) -> None:
    """A dispute that closes lost: the payment and its order are charged_back, no longer disputed,
    nothing is refundable, and finance.disputes keeps the closed dispute with when it closed."""
    async with db(settings) as con:
        await host.add_order_with_payment(con, "ORD-CB", "ch_cb", amount=3000)
    withdrawal = b.balance_transaction(amount=-3000, fee=1500, txn_id="txn_cb_w", created=T + 3)
    opened = b.dispute(
        charge_id="ch_cb", amount=3000, dispute_id="du_cb", balance_transactions=[withdrawal], created=T + 3
    )
    lost = dict(opened, status="lost")
    async with recon(settings) as stripe:
        await stripe.deliver(
            b.charge_event("charge.succeeded", paid_charge("ch_cb", 3000), created=T),
            b.dispute_event("charge.dispute.created", opened, created=T + 3),
            b.dispute_event("charge.dispute.closed", lost, created=T + 40),
        )
    charged_back = await balance(settings, "ch_cb")
    assert (charged_back["status"], charged_back["disputed"], charged_back["refundable_amount"]) == (
        "charged_back",
        False,
        0,
    )
    order = await order_row(settings, "ORD-CB")
    assert (order["status"], order["disputed"], order["refundable_now"]) == ("charged_back", False, 0)
    dispute = await one(settings, "select * from finance.disputes where stripe_dispute_id = 'du_cb'")
    assert (dispute["status"], dispute["order_number"]) == ("lost", "ORD-CB")
    assert dispute["opened_at"] == datetime.fromtimestamp(T + 3, UTC)
    assert dispute["closed_at"] == datetime.fromtimestamp(T + 40, UTC)
    assert await fetch(settings.database_url, "select * from finance.open_disputes") == []


async def test_a_refund_that_fails_days_later_is_reversed_that_day_and_raised(settings: Settings) -> None:
    """A refund booked on day 1 fails on day 5: the reversal is dated day 5 (day 1's figures stay
    as reported), one refund_failed exception carries Stripe's failure_reason, and finance.refunds
    shows the refund failed with its reason and where it came from."""
    async with db(settings) as con:
        await host.add_order_with_payment(con, "ORD-LATE", "ch_late", amount=5000)
    day1, day5 = T + 86400, T + 5 * 86400
    refund = b.refund(
        charge_id="ch_late",
        amount=2000,
        refund_id="re_late",
        status="pending",
        reason="requested_by_customer",
        created=day1,
    )
    failed = dict(refund, status="failed", failure_reason="expired_or_canceled_card")
    async with recon(settings) as stripe:
        await stripe.deliver(
            b.charge_event("charge.succeeded", paid_charge("ch_late", 5000), created=T),
            b.refund_event("refund.created", refund, created=day1),
            b.refund_event("refund.failed", failed, created=day5),
            b.refund_event("charge.refund.updated", failed, created=day5),
        )
    rows = await fetch(
        settings.database_url,
        "select kind, amount, occurred_at from finance.ledger"
        " where stripe_object_id = 're_late' order by kind",
    )
    assert [tuple(r) for r in rows] == [
        ("refund", -2000, datetime.fromtimestamp(day1, UTC)),
        ("refund_reversal", 2000, datetime.fromtimestamp(day5, UTC)),
    ]
    raised = [e for e in await exceptions(settings) if e[0] == "refund_failed"]
    assert [(kind, object_id) for kind, _, object_id in raised] == [("refund_failed", "re_late")]
    detail = await one(settings, "select detail from finance.exceptions where kind = 'refund_failed'")
    assert "expired_or_canceled_card" in detail
    seen = await one(settings, "select * from finance.refunds where stripe_refund_id = 're_late'")
    assert (seen["status"], seen["reason"], seen["failure_reason"], seen["source"]) == (
        "failed",
        "requested_by_customer",
        "expired_or_canceled_card",
        "stripe",
    )
    assert (seen["order_number"], seen["amount_decimal"]) == ("ORD-LATE", 20)
    assert (await order_row(settings, "ORD-LATE"))["status"] == "paid"


async def test_finance_reads_one_orders_stripe_timeline(settings: Settings) -> None:
    """finance.events carries each event's object, charge and order: one order's timeline is a where."""
    async with db(settings) as con:
        await host.add_order_with_payment(con, "ORD-TL", "ch_tl", amount=1000)
    refund = b.refund(charge_id="ch_tl", amount=300, refund_id="re_tl", created=T + 1)
    charged = b.charge_event("charge.succeeded", paid_charge("ch_tl"), created=T)
    refunded = b.refund_event("refund.created", refund, created=T + 1)
    async with recon(settings) as stripe:
        await stripe.deliver(charged, refunded)
    timeline = await fetch(
        settings.database_url,
        "select stripe_event_id, type, stripe_object_id, stripe_charge_id, outcome from finance.events"
        " where order_number = 'ORD-TL' order by created",
    )
    assert [tuple(r) for r in timeline] == [
        (charged["id"], "charge.succeeded", "ch_tl", "ch_tl", "applied"),
        (refunded["id"], "refund.created", "re_tl", "ch_tl", "applied"),
    ]
