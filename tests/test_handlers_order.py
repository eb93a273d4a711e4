"""Rule 3: any delivery order, with any duplicates, ends in the same ledger and statuses — in
both API eras."""

from __future__ import annotations

import random
from typing import Any

import asyncpg
import pytest

from tests import builders as b
from tests import host_records as h

T = b.T0


def _history(
    charge_id: str, era: str, fetch: bool
) -> list[tuple[dict[str, Any], list[dict[str, Any]] | None]]:
    """One charge's life as (event, fetched refunds) pairs: captured, refund A 300 pending then
    succeeded, refund B 200 requires_action → pending → failed, a dispute opened and won."""
    a_pending = b.refund(
        charge_id=charge_id, amount=300, refund_id=f"re_a_{charge_id}", status="pending", created=T + 10
    )
    a_done = {**a_pending, "status": "succeeded"}
    b_action = b.refund(
        charge_id=charge_id,
        amount=200,
        refund_id=f"re_b_{charge_id}",
        status="requires_action",
        created=T + 30,
    )
    b_pending, b_failed = {**b_action, "status": "pending"}, {**b_action, "status": "failed"}
    withdrawal = b.balance_transaction(amount=-1000, fee=1500, txn_id=f"txn_w_{charge_id}", created=T + 60)
    reinstated = b.balance_transaction(amount=1000, fee=-1500, txn_id=f"txn_r_{charge_id}", created=T + 90)
    opened = b.dispute(
        charge_id=charge_id,
        amount=1000,
        dispute_id=f"du_{charge_id}",
        balance_transactions=[withdrawal],
        created=T + 60,
    )
    won = {**opened, "status": "won", "balance_transactions": [withdrawal, reinstated]}
    charged = b.charge(charge_id=charge_id)
    after_a = b.charge(charge_id=charge_id, refunds=[a_done])
    after_b = b.charge(charge_id=charge_id, refunds=[a_done, b_failed])
    events: list[tuple[dict[str, Any], list[dict[str, Any]] | None]] = [
        (b.charge_event("charge.succeeded", charged, created=T, api_version=era), None),
        (b.charge_event("charge.refunded", after_a, created=T + 20, api_version=era), [a_done]),
        (b.charge_event("charge.refunded", after_b, created=T + 50, api_version=era), [a_done, b_failed]),
        (b.dispute_event("charge.dispute.created", opened, created=T + 60), None),
        (b.dispute_event("charge.dispute.funds_withdrawn", opened, created=T + 60), None),
        (b.dispute_event("charge.dispute.funds_reinstated", won, created=T + 90), None),
        (b.dispute_event("charge.dispute.closed", won, created=T + 90), None),
    ]
    refund_events = [
        ("refund.created", a_pending, T + 10),
        ("refund.updated", a_done, T + 20),
        ("charge.refund.updated", a_done, T + 20),
        ("refund.created", b_action, T + 30),
        ("refund.updated", b_pending, T + 40),
        ("refund.failed", b_failed, T + 50),
        ("charge.refund.updated", b_failed, T + 50),
    ]
    events += [(b.refund_event(t, r, created=c), None) for t, r, c in refund_events]
    # Old-era charges embed refunds and need no fetch; the runtime fetches only for the new era,
    # and only with an API key (without one, the checkpoint waits for the refund.* events).
    return [(e, f if fetch and e["type"] == "charge.refunded" else None) for e, f in events]


async def _deliver_all(
    con: asyncpg.Connection, history: list[tuple[dict[str, Any], list[dict[str, Any]] | None]]
) -> None:
    """Apply events like the runtime would: retrying ones go to the back of the queue."""
    queue = list(history)
    for _ in range(len(queue) * 3):
        if not queue:
            return
        event, fetched = queue.pop(0)
        result = await h.apply(con, b.incoming(event, fetched_refunds=fetched))
        if result.outcome == "retrying":
            queue.append((event, fetched))
    raise AssertionError(f"events still retrying: {[e['id'] for e, _ in queue]}")


async def _final_state(con: asyncpg.Connection, charge_id: str) -> dict[str, Any]:
    rows = await h.ledger(con, charge_id)
    failed_refund = f"re_b_{charge_id}"
    return {
        # A refund that ends failed nets to zero, as no rows or as refund + reversal (rule 4).
        "ledger": sorted((k, a, c, o.replace(charge_id, "CH")) for k, a, c, o in rows if o != failed_refund),
        "failed_refund_net": sum(a for _, a, _, o in rows if o == failed_refund),
        "balance": {
            k: v
            for k, v in (await h.balance(con, charge_id)).items()
            if k not in ("stripe_charge_id", "order_number")
        },
        "refund_status": await con.fetchval(
            "select string_agg(r.status, ',' order by r.amount) from recon.refunds r "
            "join recon.payments p on p.id = r.payment_id where p.stripe_charge_id = $1",
            charge_id,
        ),
        "order_status": await con.fetchval(
            "select o.status || '/' || o.disputed from recon.orders o join recon.payments p "
            "on p.order_id = o.id where p.stripe_charge_id = $1",
            charge_id,
        ),
        "exceptions": (
            await con.fetchval(
                "select string_agg(kind || ':' || stripe_object_id, ',') from recon.exceptions"
                " where stripe_object_id like '%' || $1",
                charge_id,
            )
            or ""
        ).replace(charge_id, "CH"),
    }


@pytest.mark.parametrize(
    ("era", "fetch"),
    [(b.OLD_API_VERSION, False), (b.NEW_API_VERSION, True), (b.NEW_API_VERSION, False)],
    ids=["old-era-embedded", "new-era-fetched", "new-era-no-api-key"],
)
async def test_shuffled_and_duplicated_deliveries_end_the_same(
    con: asyncpg.Connection, era: str, fetch: bool
) -> None:
    """In order, reversed, and eight seeded shuffles with duplicates: one ledger, one set of statuses."""
    rng = random.Random(20241028)
    states = []
    for run in range(10):
        charge_id = f"ch_run{run}"
        await h.add_order_with_payment(con, f"O-{run}", charge_id)
        history = _history(charge_id, era, fetch)
        if run == 1:
            history.reverse()
        elif run > 1:
            history = history + rng.sample(history, k=5)
            rng.shuffle(history)
        await _deliver_all(con, history)
        states.append(await _final_state(con, charge_id))
    assert all(state == states[0] for state in states[1:]), states
    expected_ledger = [
        ("charge", 1000, "usd", "CH"),
        ("dispute_fee", -1500, "usd", "du_CH"),
        ("dispute_fee", 1500, "usd", "du_CH"),
        ("dispute_reinstatement", 1000, "usd", "du_CH"),
        ("dispute_withdrawal", -1000, "usd", "du_CH"),
        ("refund", -300, "usd", "re_a_CH"),
    ]
    assert states[0]["ledger"] == expected_ledger
    assert states[0]["failed_refund_net"] == 0
    assert states[0]["refund_status"] == "failed,succeeded"
    assert states[0]["order_status"] == "partially_refunded/false"
    assert states[0]["balance"]["status"] == "partially_refunded"
    # Refund B ended failed: one refund_failed in every order, booked first or not.
    assert states[0]["exceptions"] == "refund_failed:re_b_CH"


async def test_same_second_events_do_not_depend_on_order(con: asyncpg.Connection) -> None:
    """Every event of a refund in the same second: pending/succeeded/failed ties end failed, net 0."""
    for run, order in enumerate(([0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1])):
        charge_id = f"ch_tie{run}"
        await h.add_order_with_payment(con, f"O-{run}", charge_id)
        pending = b.refund(charge_id=charge_id, amount=300, status="pending", created=T)
        events = [
            b.refund_event("refund.created", pending, created=T),
            b.refund_event("refund.updated", {**pending, "status": "succeeded"}, created=T),
            b.refund_event("refund.failed", {**pending, "status": "failed"}, created=T),
        ]
        for index in order:
            await h.apply(con, b.incoming(events[index]))
        balance = await h.balance(con, charge_id)
        assert (balance["amount_refunded"], balance["status"]) == (0, "paid"), order
        assert sum(a for k, a, *_ in await h.ledger(con, charge_id) if k != "charge") == 0
