"""A batch in one call (handlers.apply_events) ends exactly as the same deliveries one transaction
each: the same outcome for every delivery, the same ledger, statuses, audit rows and inbox.

The batch shares in-memory payments between its events and writes them once at its end, so the
worlds below put in one batch what that could get wrong: two payments of one order, a payment the
host knows only by payment intent, an invoice, a payment the worker creates from charge metadata
halfway through the batch, and the same event delivered twice inside the batch."""

from __future__ import annotations

import random
import re
from typing import Any

import asyncpg

from handlers import EventToApply, Result, apply_events
from tests import builders as b
from tests import host_records as h
from tests.test_handlers_order import _history

T = b.T0


def _simple_history(
    charge_id: str, *, intent: str | None = None, metadata: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Captured 1000, a refund of 400 pending then succeeded, a charge.refunded (old era)."""
    refund = b.refund(
        charge_id=charge_id,
        amount=400,
        refund_id=f"re_{charge_id}",
        status="pending",
        payment_intent=intent,
        created=T + 10,
    )
    done = {**refund, "status": "succeeded"}
    charged = b.charge(charge_id=charge_id, payment_intent=intent, metadata=metadata)
    refunded = b.charge(charge_id=charge_id, payment_intent=intent, metadata=metadata, refunds=[done])
    return [
        b.charge_event("charge.succeeded", charged, created=T),
        b.refund_event("refund.created", refund, created=T + 10),
        b.refund_event("refund.updated", done, created=T + 20),
        b.charge_event("charge.refunded", refunded, created=T + 20, api_version=b.OLD_API_VERSION),
    ]


async def _world(con: asyncpg.Connection, w: str) -> list[dict[str, Any]]:
    """Host records of world ``w`` and its events: shuffled, some delivered twice in a row."""
    order_id = await h.add_order(con, f"O-{w}", amount_total=2000)
    await h.add_payment(con, order_id=order_id, charge_id=f"ch_a{w}")
    await h.add_payment(con, order_id=order_id, payment_intent=f"pi_b{w}")
    invoice_id = await h.add_invoice(con, f"I-{w}")
    await h.add_payment(con, invoice_id=invoice_id, charge_id=f"ch_c{w}", method="stripe_link")
    await h.add_order(con, f"M-{w}")  # no payment: the worker creates it from metadata
    events = [e for e, _ in _history(f"ch_a{w}", b.OLD_API_VERSION, fetch=False)]
    events += _simple_history(f"ch_b{w}", intent=f"pi_b{w}")
    events += _simple_history(f"ch_c{w}")
    events += _simple_history(f"ch_d{w}", metadata={"order_number": f"M-{w}"})
    rng = random.Random(7)
    rng.shuffle(events)
    # A refund of the metadata charge first: no payment yet, it must wait (and match on retry).
    first = next(
        e for e in events if e["type"] == "refund.created" and e["data"]["object"]["charge"] == f"ch_d{w}"
    )
    events.remove(first)
    events.insert(0, first)
    for i in (3, 9, 15):
        events.insert(i + 1, events[i])  # the same event twice in one batch
    return events


def _deliveries(events: list[dict[str, Any]]) -> list[EventToApply]:
    return [b.incoming(event) for event in events]


async def _one_by_one(con: asyncpg.Connection, events: list[dict[str, Any]]) -> list[Result]:
    return [await h.apply(con, delivery) for delivery in _deliveries(events)]


async def _together(con: asyncpg.Connection, events: list[dict[str, Any]]) -> list[Result]:
    async with con.transaction():
        return await apply_events(con, _deliveries(events), b.policy())


async def _deliver(con: asyncpg.Connection, events: list[dict[str, Any]], apply: Any) -> list[list[str]]:
    """Deliver, then redeliver whatever is retrying until nothing is; the outcomes of each pass."""
    passes = []
    for _ in range(4):
        results = await apply(con, events)
        passes.append([r.outcome for r in results])
        events = [e for e, r in zip(events, results, strict=True) if r.outcome == "retrying"]
        if not events:
            return passes
    raise AssertionError(f"still retrying: {[e['id'] for e in events]}")


async def _state(con: asyncpg.Connection, w: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    def norm(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        return re.sub(r"payment:\d+", "payment:N", value.replace(w, "W"))

    async def rows(sql: str) -> list[tuple[Any, ...]]:
        return sorted(tuple(norm(v) for v in r.values()) for r in await con.fetch(sql, f"%{w}%"))

    return {
        "ledger": await rows(
            "select kind, amount, currency, source_id, stripe_object_id from recon.ledger_entries "
            "where stripe_object_id like $1 or source_id like $1 "
            "or payment_id in (select id from recon.payments where stripe_charge_id like $1)"
        ),
        "payments": await rows(
            "select stripe_charge_id, status, amount_captured, amount_refunded, charge_booked, "
            "disputed, snapshot_rank from recon.payments "
            "where stripe_charge_id like $1 or stripe_payment_intent_id like $1"
        ),
        "orders": await rows("select number, status, disputed from recon.orders where number like $1"),
        "invoices": await rows(
            "select number, payment_link_status, disputed from recon.invoices where number like $1"
        ),
        # Per event for payments; an order's or invoice's moves are recomputed once per transaction
        # from all its payments, so a batch records their net move (its final state is compared).
        "audit": await rows(
            "select action, stripe_object_id, detail - 'entry_id' from recon.audit_log "
            "where stripe_object_id like $1 and coalesce(detail->>'object', '') not in ('order', 'invoice')"
        ),
        "inbox": sorted(
            tuple(r.values())
            for r in await con.fetch(
                "select type, outcome, attempts, processed_at is not null from recon.event_inbox "
                "where event_id = any($1::text[])",
                [e["id"] for e in events],
            )
        ),
        "exceptions": await rows(
            "select kind, stripe_object_id from recon.exceptions where stripe_object_id like $1"
        ),
    }


async def test_a_batch_ends_as_one_transaction_per_delivery(con: asyncpg.Connection) -> None:
    """The same deliveries, applied one per transaction and as one batch, end in the same outcomes,
    ledger rows, statuses and exceptions (in-batch repeats see their first delivery)."""
    seq_events = await _world(con, "QQ")
    batch_events = await _world(con, "ZZ")
    seq_passes = await _deliver(con, seq_events, _one_by_one)
    batch_passes = await _deliver(con, batch_events, _together)
    assert batch_passes == seq_passes
    assert batch_passes[0].count("duplicate") >= 3  # the in-batch repeats saw their first delivery
    assert "retrying" in batch_passes[0]  # a refund of the metadata charge came before its charge
    seq, batch = await _state(con, "QQ", seq_events), await _state(con, "ZZ", batch_events)
    assert batch == seq
    assert ("O-W", "partially_refunded", False) in batch["orders"]
    assert ("I-W", "partially_refunded", False) in batch["invoices"]
    assert ("M-W", "partially_refunded", False) in batch["orders"]
    assert [p[0] for p in batch["payments"]] == ["ch_aW", "ch_bW", "ch_cW", "ch_dW"]
    assert {kind for kind, _ in batch["exceptions"]} <= {"refund_failed"}  # refunds that failed, only
