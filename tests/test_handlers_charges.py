"""Charges (rule 7) and the statuses they drive (rule 5)."""

from __future__ import annotations

import asyncpg
import pytest

from tests import builders as b
from tests import host_records as h


async def _metadata_order(con: asyncpg.Connection, number: str = "O-1") -> None:
    await h.add_order(con, number)


async def test_authorisation_alone_books_nothing(con: asyncpg.Connection) -> None:
    """A metadata-created payment whose charge is only authorised gets no charge row; stays pending."""
    await _metadata_order(con)
    auth = b.charge(charge_id="ch_1", captured=False, metadata={"order_number": "O-1"})
    result = await h.apply(con, b.incoming(b.charge_event("charge.succeeded", auth)))
    assert result.outcome == "applied"
    assert await h.ledger(con, "ch_1") == []
    assert (await h.balance(con, "ch_1"))["status"] == "pending"
    assert await con.fetchval("select status from recon.orders") == "pending"


async def test_capture_books_amount_captured_once(con: asyncpg.Connection) -> None:
    """The charge row is booked for amount_captured by the first captured snapshot, once."""
    await _metadata_order(con)
    meta = {"order_number": "O-1"}
    auth = b.charge(charge_id="ch_1", captured=False, metadata=meta)
    captured = b.charge(charge_id="ch_1", amount_captured=800, metadata=meta)
    await h.apply(con, b.incoming(b.charge_event("charge.succeeded", auth)))
    await h.apply(con, b.incoming(b.charge_event("charge.captured", captured, created=b.T0 + 5)))
    refunded = b.charge(charge_id="ch_1", amount_captured=800, metadata=meta)
    await h.apply(con, b.incoming(b.charge_event("charge.refunded", refunded, created=b.T0 + 9)))
    assert await h.ledger(con, "ch_1") == [("charge", 800, "usd", "ch_1")]
    balance = await h.balance(con, "ch_1")
    assert (balance["status"], balance["amount"], balance["net_amount"]) == ("paid", 800, 800)
    assert await con.fetchval("select status from recon.orders") == "paid"


async def test_charge_row_occurs_at_the_charge_created(con: asyncpg.Connection) -> None:
    """A charge row's occurred_at is the charge's created, not the event's."""
    await h.add_order_with_payment(con, "O-1", "ch_1")
    charge = b.charge(charge_id="ch_1", created=b.T0 - 3600)
    await h.apply(con, b.incoming(b.charge_event("charge.succeeded", charge, created=b.T0)))
    occurred = await con.fetchval("select extract(epoch from occurred_at)::bigint from finance.ledger")
    assert occurred == b.T0 - 3600


async def test_host_recorded_payment_is_charged_by_the_first_event_of_any_kind(
    con: asyncpg.Connection,
) -> None:
    """A payment the host recorded gets its charge row for its amount even from a refund event."""
    await h.add_order_with_payment(con, "O-1", "ch_1", amount=2500)
    refund = b.refund(charge_id="ch_1", amount=500)
    await h.apply(con, b.incoming(b.refund_event("refund.created", refund)))
    assert await h.ledger(con, "ch_1") == [
        ("charge", 2500, "usd", "ch_1"),
        ("refund", -500, "usd", refund["id"]),
    ]
    assert (await h.balance(con, "ch_1"))["status"] == "partially_refunded"


async def test_host_recorded_payment_is_charged_by_an_authorisation_too(
    con: asyncpg.Connection,
) -> None:
    """The host's record is the payment: even an authorisation-only event books its amount."""
    await h.add_order_with_payment(con, "O-1", "ch_1", amount=1000)
    auth = b.charge(charge_id="ch_1", captured=False)
    await h.apply(con, b.incoming(b.charge_event("charge.succeeded", auth)))
    assert await h.ledger(con, "ch_1") == [("charge", 1000, "usd", "ch_1")]


async def test_host_recorded_partial_capture_is_adjusted_to_what_was_captured(
    con: asyncpg.Connection,
) -> None:
    """Host amount 1000, later capture shows 800: the charge row stays 1000 (append-only) and one
    capture_adjustment of -200 brings the charge rows to 800; statuses and over-refund measure
    against 800, and the ledger's net agrees with payment_balances."""
    await h.add_order_with_payment(con, "O-1", "ch_1", amount=1000)
    first = b.refund(charge_id="ch_1", amount=300)
    await h.apply(con, b.incoming(b.refund_event("refund.created", first)))
    captured = b.charge(charge_id="ch_1", amount_captured=800)
    await h.apply(con, b.incoming(b.charge_event("charge.captured", captured, created=b.T0 + 1)))
    second = b.refund(charge_id="ch_1", amount=500, created=b.T0 + 2)
    await h.apply(con, b.incoming(b.refund_event("refund.created", second, created=b.T0 + 2)))
    kinds = sorted((k, a) for k, a, *_ in await h.ledger(con, "ch_1"))
    assert kinds == [("capture_adjustment", -200), ("charge", 1000), ("refund", -500), ("refund", -300)]
    balance = await h.balance(con, "ch_1")
    assert (balance["amount"], balance["amount_refunded"], balance["status"]) == (800, 800, "refunded")
    assert balance["refundable_amount"] == 0
    assert balance["net_amount"] == sum(a for _, a in kinds) == 0
    assert await h.exceptions(con, "over_refund") == []


async def test_order_goes_paid_then_refunded(con: asyncpg.Connection) -> None:
    """Order status: pending → paid as the charge is booked → partially_refunded → refunded."""
    await h.add_order_with_payment(con, "O-1", "ch_1")
    statuses = []
    await h.apply(con, b.incoming(b.charge_event("charge.succeeded", b.charge(charge_id="ch_1"))))
    statuses.append(await con.fetchval("select status from recon.orders"))
    for i, amount in enumerate((400, 600), start=1):
        refund = b.refund(charge_id="ch_1", amount=amount, created=b.T0 + i)
        await h.apply(con, b.incoming(b.refund_event("refund.created", refund, created=b.T0 + i)))
        statuses.append(await con.fetchval("select status from recon.orders"))
    assert statuses == ["paid", "partially_refunded", "refunded"]
    audit = await con.fetch(
        "select detail->>'object' as obj, detail->>'to' as to from recon.audit_log "
        "where action = 'status_changed' and detail->>'field' = 'status' order by id"
    )
    assert [(r["obj"], r["to"]) for r in audit if r["obj"] == "order"] == [
        ("order", "paid"),
        ("order", "partially_refunded"),
        ("order", "refunded"),
    ]


async def test_rejected_order_stays_rejected(con: asyncpg.Connection) -> None:
    """A rejected order keeps its status while its payment is charged and refunded."""
    order_id = await h.add_order(con, "O-1", status="rejected")
    await h.add_payment(con, order_id=order_id, charge_id="ch_1")
    await h.apply(con, b.incoming(b.charge_event("charge.succeeded", b.charge(charge_id="ch_1"))))
    refund = b.refund(charge_id="ch_1", amount=1000, created=b.T0 + 1)
    await h.apply(con, b.incoming(b.refund_event("refund.created", refund, created=b.T0 + 1)))
    assert await con.fetchval("select status from recon.orders") == "rejected"
    assert (await h.balance(con, "ch_1"))["status"] == "refunded"


async def test_invoice_payment_link_status_follows_the_payment(con: asyncpg.Connection) -> None:
    """For an invoice, the same money status drives payment_link_status (unpaid → paid → …)."""
    await h.add_invoice(con, "I-1")
    meta = {"invoice_number": "I-1"}
    assert await con.fetchval("select payment_link_status from recon.invoices") == "unpaid"
    charge = b.charge(charge_id="ch_1", metadata=meta)
    await h.apply(con, b.incoming(b.charge_event("charge.succeeded", charge)))
    assert await con.fetchval("select payment_link_status from recon.invoices") == "paid"
    refund = b.refund(charge_id="ch_1", amount=250, created=b.T0 + 1)
    await h.apply(con, b.incoming(b.refund_event("refund.created", refund, created=b.T0 + 1)))
    assert await con.fetchval("select payment_link_status from recon.invoices") == "partially_refunded"
    assert (await h.balance(con, "ch_1"))["invoice_number"] == "I-1"


async def test_older_charge_snapshot_after_a_newer_one_is_stale(con: asyncpg.Connection) -> None:
    """A charge.succeeded delivered after a newer charge.captured changes nothing: outcome stale."""
    await h.add_order_with_payment(con, "O-1", "ch_1")
    charge = b.charge(charge_id="ch_1")
    await h.apply(con, b.incoming(b.charge_event("charge.captured", charge, created=b.T0 + 5)))
    late_event = b.charge_event("charge.succeeded", charge, created=b.T0)
    late = await h.apply(con, b.incoming(late_event))
    assert late.outcome == "stale"
    row = await h.inbox(con, late_event["id"])
    assert (row["outcome"], row["processed_at"] is not None) == ("stale", True)


@pytest.mark.parametrize("later_id", ["evt_tie_0", "evt_tie_9"])
async def test_full_tie_of_charge_snapshots_keeps_the_stored_one(
    con: asyncpg.Connection, later_id: str
) -> None:
    """Rule 3 "on a full tie it keeps its value", for the charge snapshot rule 4 judges checkpoints
    by: a second charge.refunded of the same second (same created, same rank) does not replace the
    snapshot stored first, whatever its event id: it is not judged (its larger amount_refunded
    raises no retry), its outcome is 'stale', and the payment's snapshot still names the first."""
    await h.add_order_with_payment(con, "O-1", "ch_1", amount=1000)
    first_refund = b.refund(charge_id="ch_1", amount=300, refund_id="re_1")
    first = b.charge_event(
        "charge.refunded",
        b.charge(charge_id="ch_1", refunds=[first_refund]),
        created=b.T0 + 5,
        event_id="evt_tie_5",
        api_version=b.OLD_API_VERSION,
    )
    tie = b.charge_event(
        "charge.refunded",
        b.charge(charge_id="ch_1", amount_refunded=500),
        created=b.T0 + 5,
        event_id=later_id,
    )
    assert (await h.apply(con, b.incoming(first))).outcome == "applied"
    result = await h.apply(con, b.incoming(tie))
    assert result.outcome == "stale"
    assert await con.fetchval("select snapshot_event_id from recon.payments") == "evt_tie_5"
    assert await h.ledger(con, "ch_1") == [("charge", 1000, "usd", "ch_1"), ("refund", -300, "usd", "re_1")]
