"""The reconciliation rules, one at a time, end to end: signed webhook → receiver → RabbitMQ → worker →
PostgreSQL → the finance views. Nothing is called directly: events are POSTed to the real
receiver (``recon run`` in this loop, or a real ``recon worker`` process for the log rule) and
the effects are read back from ``finance.*`` and the host app's tables.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import asyncpg
import pytest
from prometheus_client import REGISTRY

from tests import builders as b
from tests import host_records as host
from tests.harness import events_settled, fetch, post_event, running, via_port, wait_until
from tests.histories import render_all
from tests.model import Authorise, Capture, Charge, DisputeStep, RefundStep, Txn, expected, ledger_differences
from tests.tcp_proxy import TcpProxy
from tests.test_property import read_outcome, release_queues, seed_host_rows, worker_processes
from worker.amqp import topology
from worker.settings import Settings

T = b.T0


@pytest.fixture(autouse=True)
async def _free_the_broker(settings: Settings) -> AsyncIterator[None]:
    """This test's quorum queues go when it ends, not with the vhost at the end of the session."""
    yield
    await release_queues(settings)


OLD, NEW = b.OLD_API_VERSION, "2024-10-28.acacia"


class Stripe:
    """Stripe's side of the wire: POSTs signed events to the running receiver."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str, settings: Settings) -> None:
        self.http, self.base_url, self.settings = http, base_url, settings

    async def post(self, *events: dict[str, Any]) -> None:
        for event in events:
            status, body = await post_event(self.http, self.base_url, event)
            assert status == 200, (event["type"], status, body)

    async def settled(self, *events: dict[str, Any], timeout_s: float = 20.0) -> None:
        ids = [e["id"] for e in events]
        await wait_until(
            lambda: events_settled(self.settings.database_url, ids),
            timeout_s=timeout_s,
            what=f"{len(set(ids))} events to reach a final outcome",
        )

    async def deliver(self, *events: dict[str, Any], timeout_s: float = 20.0) -> None:
        """Each event in turn, waiting for its final outcome before the next (a strict order)."""
        for event in events:
            await self.post(event)
            await self.settled(event, timeout_s=timeout_s)


@contextlib.asynccontextmanager
async def recon(
    settings: Settings, mode: str = "run", observe: Settings | None = None
) -> AsyncIterator[Stripe]:
    """``recon <mode>`` in this loop; ``observe`` reads outcomes past a proxy the app goes through."""
    async with running(mode, settings) as base_url, aiohttp.ClientSession() as http:
        yield Stripe(http, base_url, observe or settings)


@contextlib.asynccontextmanager
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    con = await asyncpg.connect(settings.database_url)
    try:
        yield con
    finally:
        await con.close()


async def ledger(settings: Settings, charge_id: str | None = None) -> Counter[tuple[Any, ...]]:
    rows = await fetch(
        settings.database_url,
        "select kind, amount, currency, stripe_object_id from finance.ledger"
        " where $1::text is null or stripe_charge_id = $1",
        charge_id,
    )
    return Counter(tuple(r) for r in rows)


async def one(settings: Settings, sql: str, *args: Any) -> Any:
    rows = await fetch(settings.database_url, sql, *args)
    assert len(rows) == 1, (sql, rows)
    return rows[0] if len(rows[0]) > 1 else rows[0][0]


async def balance(settings: Settings, charge_id: str) -> dict[str, Any]:
    return dict(
        await one(settings, "select * from finance.payment_balances where stripe_charge_id = $1", charge_id)
    )


async def outcome(settings: Settings, event: dict[str, Any]) -> str:
    return str(
        await one(settings, "select outcome from finance.events where stripe_event_id = $1", event["id"])
    )


async def exceptions(settings: Settings) -> list[tuple[str, str | None, str | None]]:
    rows = await fetch(
        settings.database_url, "select kind, stripe_event_id, stripe_object_id from finance.exceptions"
    )
    return [tuple(r) for r in rows]


async def work_queue_depth(amqp_url: str) -> int:
    """Messages ready in the work queue, read straight from the broker."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.WORK_QUEUE, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await connection.close()


class Processed:
    """The in-process worker's recon_events_processed_total for one (type, outcome), from now on."""

    def __init__(self, event_type: str, outcome: str) -> None:
        self.labels = {"type": event_type, "outcome": outcome}
        self.start = self.now()

    def now(self) -> float:
        return REGISTRY.get_sample_value("recon_events_processed_total", self.labels) or 0.0

    def delta(self) -> int:
        return int(self.now() - self.start)

    def grew(self, by: int = 1) -> bool:
        return self.delta() >= by


def soon(condition: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """A wait_until probe for an in-process condition."""

    async def probe() -> bool:
        return condition()

    return probe


def paid_charge(charge_id: str, amount: int = 1000, currency: str = "usd", **kw: Any) -> dict[str, Any]:
    return b.charge(charge_id=charge_id, amount=amount, currency=currency, created=T, **kw)


# --- rule 1 -------------------------------------------------------------------------------------


async def test_rule1_broker_unreachable_answers_503_and_queues_and_books_nothing(settings: Settings) -> None:
    """Rule 1 "Nothing is answered 2xx that is not safely queued": with the broker cut off, the
    webhook gets 503, the work queue and the ledger stay empty; Stripe's retry after the broker is
    back gets 200 and books the refund once."""
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    via_proxy = replace(
        settings, amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}{urlsplit(settings.amqp_url).path}"
    )
    async with db(settings) as con:
        await host.add_order_with_payment(con, "ORD-1", "ch_rule1")
    event = b.refund_event("refund.created", b.refund(charge_id="ch_rule1", amount=300, refund_id="re_rule1"))
    try:
        async with recon(via_proxy, "receiver") as stripe:
            await proxy.cut()
            status, _ = await post_event(stripe.http, stripe.base_url, event)
            assert status == 503
            await proxy.restore()
            assert await work_queue_depth(settings.amqp_url) == 0

            async def stripe_retries() -> bool:
                return (await post_event(stripe.http, stripe.base_url, event))[0] == 200

            await wait_until(stripe_retries, timeout_s=30, interval_s=0.5, what="the receiver to queue again")
            assert await work_queue_depth(settings.amqp_url) == 1
    finally:
        await proxy.close()
    assert await ledger(settings) == Counter()  # nothing consumed it yet
    async with recon(settings, "worker") as stripe:
        await stripe.settled(event)
    assert await ledger(settings) == Counter(
        {("charge", 1000, "usd", "ch_rule1"): 1, ("refund", -300, "usd", "re_rule1"): 1}
    )


async def test_rule1_database_outage_does_not_lose_a_queued_event(settings: Settings) -> None:
    """Rule 1 "nothing is acked from the queue before its database transaction commits": an event
    the worker holds while PostgreSQL is unreachable is not acked away — its batch rides out the
    database retry window (a short one here, a constructor timing, instead of the 20 s default)
    and gives it back to a wait queue; once the database is back it is applied, exactly once."""
    from tests.consumer_harness import consumer_running
    from worker.consume.consumer import ConsumerTimings

    proxy = TcpProxy("127.0.0.1", 5432)
    await proxy.start()
    via_proxy = replace(settings, database_url=via_port(settings.database_url, proxy.port))
    async with db(settings) as con:
        await host.add_order_with_payment(con, "ORD-1", "ch_rule1db")
    first = b.charge_event("charge.succeeded", paid_charge("ch_rule1db"), created=T)
    refund = b.refund_event(
        "refund.created", b.refund(charge_id="ch_rule1db", amount=400, refund_id="re_rule1db"), created=T + 1
    )
    short_window = ConsumerTimings(db_retry_for_s=0.5)
    try:
        async with recon(settings, "receiver") as stripe, consumer_running(via_proxy, timings=short_window):
            await stripe.deliver(first)
            await proxy.cut()
            deferred = Processed("refund.created", "retrying")
            await stripe.post(refund)
            await wait_until(
                soon(deferred.grew),
                interval_s=0.1,
                what="the worker to give back the event it could not commit",
            )
            await proxy.restore()
            await stripe.settled(refund)
    finally:
        await proxy.close()
    assert await ledger(settings) == Counter(
        {("charge", 1000, "usd", "ch_rule1db"): 1, ("refund", -400, "usd", "re_rule1db"): 1}
    )
    assert await outcome(settings, refund) == "applied"


# --- rule 2 -------------------------------------------------------------------------------------


async def test_rule2_one_refund_row_whichever_events_report_it_and_redelivery_is_duplicate(
    settings: Settings,
) -> None:
    """Rule 2: a refund re_… seen through charge.refunded (embedded), charge.refund.updated and
    refund.created is ONE refund row and one audit row; the same event id delivered again is
    logged 'duplicate' and changes nothing."""
    async with db(settings) as con:
        await host.add_order_with_payment(con, "ORD-2", "ch_rule2")
    re = b.refund(charge_id="ch_rule2", amount=250, refund_id="re_rule2", created=T + 1)
    events = [
        b.charge_event(
            "charge.refunded", paid_charge("ch_rule2", refunds=[re]), created=T + 1, api_version=OLD
        ),
        b.refund_event("charge.refund.updated", re, created=T + 1, api_version=OLD),
        b.refund_event("refund.created", re, created=T + 1, api_version=NEW),
    ]
    async with recon(settings) as stripe:
        await stripe.post(*events)
        await stripe.settled(*events)
        first = await outcome(settings, events[2])
        duplicates = Processed("refund.created", "duplicate")
        await stripe.post(events[2])  # Stripe delivers it again
        await wait_until(soon(duplicates.grew), what="the redelivery to be handled as a duplicate")
    # The event's own outcome stays what its first delivery made it ('stale' here: the refund was
    # already booked through the charge.refunded that carried it).
    assert await outcome(settings, events[2]) == first
    assert await ledger(settings, "ch_rule2") == Counter(
        {("charge", 1000, "usd", "ch_rule2"): 1, ("refund", -250, "usd", "re_rule2"): 1}
    )
    audit = await fetch(
        settings.database_url, "select action from recon.audit_log where stripe_object_id = 're_rule2'"
    )
    assert [r["action"] for r in audit].count("stripe_refund_recorded") == 1
    assert (await balance(settings, "ch_rule2"))["amount_refunded"] == 250


async def test_rule2_an_event_waiting_for_a_retry_is_not_applied_yet(settings: Settings) -> None:
    """Rule 2 "an event waiting to be retried is not applied yet": Stripe re-sends a refund event
    while the worker is still waiting for its charge; the re-sent copy is not a 'duplicate' of an
    application that never happened, and once the charge shows up the refund is booked once."""
    async with db(settings) as con:
        await host.add_order(con, "ORD-2R")
    early = b.refund_event(
        "refund.created", b.refund(charge_id="ch_rule2r", amount=150, refund_id="re_rule2r")
    )
    charge = b.charge_event("charge.succeeded", paid_charge("ch_rule2r", metadata={"order_number": "ORD-2R"}))
    # The first copy's retry waits 3 s, so what is handled before that is the re-sent copy.
    s = replace(settings, retry_delays_s=(3.0,))
    retrying, applied, duplicate = (
        Processed("refund.created", o) for o in ("retrying", "applied", "duplicate")
    )
    async with recon(s) as stripe:
        await stripe.post(early)
        await wait_until(soon(retrying.grew), what="the refund to wait for its charge")
        await stripe.post(early)
        await wait_until(
            soon(lambda: retrying.grew(2) or duplicate.grew()), what="the re-sent copy to be handled"
        )
        # Nothing is a duplicate of an application that has not happened yet.
        assert duplicate.delta() == 0
        await stripe.post(charge)
        await stripe.settled(early, charge)
        await wait_until(soon(duplicate.grew), what="the other copy to be handled", timeout_s=30)
    assert (applied.delta(), duplicate.delta()) == (1, 1)
    assert await outcome(s, early) == "applied"
    assert await ledger(settings, "ch_rule2r") == Counter(
        {("charge", 1000, "usd", "ch_rule2r"): 1, ("refund", -150, "usd", "re_rule2r"): 1}
    )


# --- rule 3 -------------------------------------------------------------------------------------


def _rule3_history() -> list[Charge]:
    """Two charges created in the same second; refunds that tie with each other and with a
    dispute; a metadata-matched invoice whose refund events can arrive before its charge."""
    txn_w = Txn("txn_r3w", -1000, "usd", 1500)
    txn_r = Txn("txn_r3r", 1000, "usd", -1500)
    order = Charge(
        id="ch_rule3a",
        payment_intent="pi_rule3a",
        currency="usd",
        amount=1000,
        recorded="charge",
        owner="order",
        number="ORD-3",
        rejected=False,
        card_present=False,
        era="new",
        announce_succeeded=True,
        dispute_id="du_rule3",
        dispute_reason="fraudulent",
        dispute_amount=1000,
        steps=(
            Authorise(T, True),
            RefundStep(T + 1, "re_r3a", 300, "pending"),
            RefundStep(T + 1, "re_r3b", 200, "succeeded"),
            RefundStep(T + 2, "re_r3a", 300, "succeeded"),
            DisputeStep(T + 2, "created", "needs_response", (txn_w,)),
            DisputeStep(T + 3, "updated", "under_review"),
            DisputeStep(T + 4, "closed", "won", (txn_r,)),
        ),
    )
    invoice = Charge(
        id="ch_rule3b",
        payment_intent="pi_rule3b",
        currency="jpy",
        amount=12000,
        recorded="metadata",
        owner="invoice",
        number="INV-3",
        rejected=False,
        card_present=False,
        era="old",
        announce_succeeded=True,
        dispute_id="du_rule3b",
        dispute_reason="general",
        dispute_amount=0,
        steps=(
            Authorise(T, False),
            Capture(T + 1, 12000),
            RefundStep(T + 1, "re_r3c", 12000, "requires_action"),
            RefundStep(T + 2, "re_r3c", 12000, "succeeded"),
        ),
    )
    return [order, invoice]


async def test_rule3_reversed_delivery_ends_in_the_same_ledger_and_statuses(
    settings: Settings, pg_template: str
) -> None:
    """Rule 3 "Any delivery order, with any duplicates, ends in the same ledger and statuses": the
    same history delivered in Stripe's order and strictly reversed (each event waiting for the one
    before) ends in identical finance rows and statuses, and both match the model."""
    from tests import servers
    from tests.conftest import _vhosts

    history = _rule3_history()
    events = render_all(history, "r3f")
    reversed_copy = [json.loads(json.dumps(e)) for e in reversed(events)]
    for n, event in enumerate(reversed_copy):
        event["id"] = f"evt_r3rev{n:04d}"
    outcomes = []
    other_db = await servers.clone_database(pg_template)
    other = replace(
        settings, database_url=servers.database_url(other_db), amqp_url=servers.amqp_url(await _vhosts.take())
    )
    try:
        for s, delivered in ((settings, events), (other, reversed_copy)):
            await seed_host_rows(s.database_url, history)
            async with recon(s) as stripe:
                for event in delivered:
                    await stripe.post(event)
                    # Strict order: a retried (not yet matched) event is in flight, not reordered.
                    await wait_until(
                        lambda e=event, s=s: _recorded(s, e), what=f"{event['type']} to be recorded"
                    )
                await stripe.settled(*delivered, timeout_s=40)
            outcomes.append(await read_outcome(s.database_url))
    finally:
        await servers.drop_database(other_db)
        await release_queues(other)
    forward, backward = outcomes
    assert Counter(forward["ledger"]) == Counter(backward["ledger"])
    assert forward["balances"] == backward["balances"]
    assert forward["owners"] == backward["owners"]
    assert ledger_differences(expected(history), forward["ledger"]) == []
    assert forward["owners"] == {"ORD-3": ("partially_refunded", False), "INV-3": ("refunded", False)}


async def _recorded(s: Settings, event: dict[str, Any]) -> bool:
    rows = await fetch(s.database_url, "select 1 from finance.events where stripe_event_id = $1", event["id"])
    return bool(rows)


async def test_rule3_a_status_moves_only_to_a_newer_value(settings: Settings) -> None:
    """Rule 3 "A status field moves only to a value that is newer by (event.created, then lifecycle
    rank)": an older dispute event delivered last does not move the dispute back; in a same-second
    tie the status further along the lifecycle wins whatever the delivery order."""
    async with db(settings) as con:
        await host.add_order_with_payment(con, "ORD-3S", "ch_rule3s")
        await host.add_order_with_payment(con, "ORD-3T", "ch_rule3t")
    older = b.dispute(
        charge_id="ch_rule3s", amount=1000, dispute_id="du_rule3s", status="needs_response", created=T
    )
    newer = dict(older, status="under_review")
    tie_a = b.dispute(
        charge_id="ch_rule3t", amount=1000, dispute_id="du_rule3t", status="needs_response", created=T
    )
    tie_b = dict(tie_a, status="under_review")
    async with recon(settings) as stripe:
        await stripe.deliver(
            b.dispute_event("charge.dispute.updated", newer, created=T + 5),
            b.dispute_event("charge.dispute.created", older, created=T),
            b.dispute_event("charge.dispute.updated", tie_b, created=T + 1),
            b.dispute_event("charge.dispute.funds_withdrawn", tie_a, created=T + 1),
        )
    assert (await balance(settings, "ch_rule3s"))["dispute_status"] == "under_review"
    assert (await balance(settings, "ch_rule3t"))["dispute_status"] == "under_review"
    assert await one(
        settings, "select status from finance.open_disputes where stripe_dispute_id = 'du_rule3s'"
    ) == ("under_review")


# --- rule 4 -------------------------------------------------------------------------------------


async def test_rule4_a_refund_that_fails_later_is_reversed_once(settings: Settings) -> None:
    """Rule 4: a refund seen succeeded books −amount; when it later turns failed (reported by
    refund.failed AND charge.refund.updated) one refund_reversal of +amount is booked, and the
    order goes back to paid."""
    async with db(settings) as con:
        await host.add_order_with_payment(con, "ORD-4", "ch_rule4", amount=5000, currency="eur")
    ok = b.refund(charge_id="ch_rule4", amount=2000, refund_id="re_rule4", currency="eur", created=T + 1)
    failed = dict(ok, status="failed", failure_reason="lost_or_stolen_card")
    async with recon(settings) as stripe:
        await stripe.deliver(b.refund_event("refund.created", ok, created=T + 1))
        assert (
            await one(settings, "select status from recon.orders where number = 'ORD-4'")
            == "partially_refunded"
        )
        await stripe.deliver(
            b.refund_event("refund.failed", failed, created=T + 9),
            b.refund_event("charge.refund.updated", failed, created=T + 9),
        )
    assert await ledger(settings, "ch_rule4") == Counter(
        {
            ("charge", 5000, "eur", "ch_rule4"): 1,
            ("refund", -2000, "eur", "re_rule4"): 1,
            ("refund_reversal", 2000, "eur", "re_rule4"): 1,
        }
    )
    assert await one(settings, "select status from recon.orders where number = 'ORD-4'") == "paid"
    assert (await balance(settings, "ch_rule4"))["amount_refunded"] == 0


async def test_rule4_a_refund_known_failed_is_not_booked_by_an_older_event(settings: Settings) -> None:
    """Rule 4 "a refund already known failed or canceled is not booked by an older event": the
    failure arrives first, the older pending snapshot after it; nothing is booked for the refund."""
    async with db(settings) as con:
        await host.add_order_with_payment(con, "ORD-4F", "ch_rule4f")
    pending = b.refund(
        charge_id="ch_rule4f", amount=600, refund_id="re_rule4f", status="pending", created=T + 1
    )
    async with recon(settings) as stripe:
        await stripe.deliver(
            b.refund_event("refund.failed", dict(pending, status="failed"), created=T + 8),
            b.refund_event("refund.created", pending, created=T + 1),
        )
    assert await ledger(settings, "ch_rule4f") == Counter({("charge", 1000, "usd", "ch_rule4f"): 1})
    assert await one(settings, "select status from recon.orders where number = 'ORD-4F'") == "paid"


async def test_rule4_requires_action_moves_no_money_until_it_goes_through(settings: Settings) -> None:
    """Rule 4 "(requires_action has moved no money yet)": a refund waiting on the customer books
    nothing; when it goes through it is booked; one canceled while waiting never books anything."""
    async with db(settings) as con:
        await host.add_order_with_payment(con, "ORD-4RA", "ch_rule4ra", amount=3000)
    waiting = b.refund(
        charge_id="ch_rule4ra", amount=800, refund_id="re_rule4ra", status="requires_action", created=T + 1
    )
    dropped = b.refund(
        charge_id="ch_rule4ra", amount=500, refund_id="re_rule4rb", status="requires_action", created=T + 1
    )
    async with recon(settings) as stripe:
        await stripe.deliver(
            b.refund_event("refund.created", waiting, created=T + 1),
            b.refund_event("refund.created", dropped, created=T + 1),
        )
        assert await ledger(settings, "ch_rule4ra") == Counter({("charge", 3000, "usd", "ch_rule4ra"): 1})
        await stripe.deliver(
            b.refund_event("refund.updated", dict(waiting, status="succeeded"), created=T + 4),
            b.refund_event("refund.updated", dict(dropped, status="canceled"), created=T + 4),
        )
    assert await ledger(settings, "ch_rule4ra") == Counter(
        {("charge", 3000, "usd", "ch_rule4ra"): 1, ("refund", -800, "usd", "re_rule4ra"): 1}
    )
    assert (
        await one(settings, "select status from recon.orders where number = 'ORD-4RA'")
        == "partially_refunded"
    )


async def test_rule4_releases_book_nothing(settings: Settings) -> None:
    """Rule 4 "Releases of an authorisation are not money back and book nothing": an expired
    authorisation (refund reason expired_uncaptured_charge, in both eras) and the uncaptured
    remainder of a partial capture book no refund and raise no exception."""
    async with db(settings) as con:
        await host.add_order(con, "ORD-4X")
        await host.add_order(con, "ORD-4P")
    meta_x, meta_p = {"order_number": "ORD-4X"}, {"order_number": "ORD-4P"}
    auth = paid_charge("ch_rule4x", captured=False, metadata=meta_x)
    release = b.refund(
        charge_id="ch_rule4x",
        amount=1000,
        refund_id="re_rule4x",
        reason="expired_uncaptured_charge",
        created=T + 604800,
    )
    expired = b.charge(
        charge_id="ch_rule4x",
        amount=1000,
        captured=False,
        amount_refunded=1000,
        refunds=[release],
        metadata=meta_x,
        created=T,
    )
    partial = b.charge(
        charge_id="ch_rule4p", amount=1000, captured=True, amount_captured=600, metadata=meta_p, created=T
    )
    events = [
        b.charge_event("charge.succeeded", auth, created=T),
        b.charge_event("charge.refunded", expired, created=T + 604800, api_version=OLD),
        b.refund_event("refund.created", release, created=T + 604800, api_version=NEW),
        b.charge_event("charge.refunded", expired, created=T + 604800, api_version=NEW),
        b.charge_event("charge.captured", partial, created=T + 2),
        b.charge_event("charge.refunded", partial, created=T + 2, api_version=NEW),
    ]
    async with recon(settings) as stripe:
        await stripe.deliver(*events)
    assert await ledger(settings) == Counter({("charge", 600, "usd", "ch_rule4p"): 1})
    assert await exceptions(settings) == []
    assert {await outcome(settings, e) for e in events} <= {"applied", "stale"}
    assert (await balance(settings, "ch_rule4p"))["amount_refunded"] == 0


async def test_rule4_checkpoint_waits_for_its_refunds_then_raises_refund_mismatch(settings: Settings) -> None:
    """Rule 4 checkpoint: a new-era charge.refunded whose amount_refunded the booked refunds do
    not cover (no API key) is retried; when the refund.created arrives later it meets and is
    applied; a checkpoint that never meets ends 'mismatch' with a refund_mismatch exception."""
    s = replace(settings, unmatched_retry_s=3)
    async with db(s) as con:
        await host.add_order_with_payment(con, "ORD-4C", "ch_rule4c")
        await host.add_order_with_payment(con, "ORD-4M", "ch_rule4m")
    re = b.refund(charge_id="ch_rule4c", amount=300, refund_id="re_rule4c", created=T + 1)
    meets = b.charge_event("charge.refunded", paid_charge("ch_rule4c", refunds=[re]), created=T + 1)
    never = b.charge_event("charge.refunded", paid_charge("ch_rule4m", amount_refunded=700), created=T + 1)
    async with recon(s) as stripe:
        await stripe.post(meets, never)
        await wait_until(lambda: _retrying(s, meets), what="the short checkpoint to be retrying")
        later = b.refund_event("refund.created", re, created=T + 1)
        await stripe.post(later)
        await stripe.settled(meets, never, later, timeout_s=30)
    assert await outcome(s, meets) == "applied"
    assert await outcome(s, never) == "mismatch"
    assert await exceptions(s) == [("refund_mismatch", never["id"], "ch_rule4m")]
    assert await ledger(s, "ch_rule4m") == Counter({("charge", 1000, "usd", "ch_rule4m"): 1})
    assert await ledger(s, "ch_rule4c") == Counter(
        {("charge", 1000, "usd", "ch_rule4c"): 1, ("refund", -300, "usd", "re_rule4c"): 1}
    )


async def _retrying(s: Settings, event: dict[str, Any]) -> bool:
    rows = await fetch(
        s.database_url, "select outcome from finance.events where stripe_event_id = $1", event["id"]
    )
    return bool(rows) and rows[0]["outcome"] == "retrying"


async def test_rule4_refunds_beyond_the_captured_amount_raise_over_refund_and_are_booked(
    settings: Settings,
) -> None:
    """Rule 4 "Refunds beyond the captured amount raise over_refund and are still booked (Stripe's
    word is final)"."""
    async with db(settings) as con:
        await host.add_order_with_payment(con, "ORD-4O", "ch_rule4o", amount=1000)
    first = b.refund(charge_id="ch_rule4o", amount=700, refund_id="re_rule4o1", created=T + 1)
    second = b.refund(charge_id="ch_rule4o", amount=500, refund_id="re_rule4o2", created=T + 2)
    async with recon(settings) as stripe:
        await stripe.deliver(
            b.refund_event("refund.created", first, created=T + 1),
            b.refund_event("refund.created", second, created=T + 2),
        )
    assert await ledger(settings, "ch_rule4o") == Counter(
        {
            ("charge", 1000, "usd", "ch_rule4o"): 1,
            ("refund", -700, "usd", "re_rule4o1"): 1,
            ("refund", -500, "usd", "re_rule4o2"): 1,
        }
    )
    assert [k for k, *_ in await exceptions(settings)] == ["over_refund"]
    assert await one(settings, "select status from recon.orders where number = 'ORD-4O'") == "refunded"


# --- rule 5 -------------------------------------------------------------------------------------


async def test_rule5_statuses_follow_net_refunds_and_rejected_stays(settings: Settings) -> None:
    """Rule 5: after every change net refunded 0 → paid, between → partially_refunded, ≥ captured
    → refunded, for an order's status and an invoice's payment_link_status alike; the threshold is
    amount_captured once an event showed it; a rejected order stays rejected."""
    async with db(settings) as con:
        await host.add_order_with_payment(con, "ORD-5", "ch_rule5")
        invoice_id = await host.add_invoice(con, "INV-5", amount_total=2000)
        await host.add_payment(
            con, invoice_id=invoice_id, charge_id="ch_rule5i", amount=2000, method="stripe_link"
        )
        rejected_id = await host.add_order(con, "ORD-5R", status="rejected")
        await host.add_payment(con, order_id=rejected_id, charge_id="ch_rule5r")
    statuses = (
        "select number, status from recon.orders"
        " union all select number, payment_link_status from recon.invoices"
    )

    async def status_of(number: str) -> str:
        return {r["number"]: r["status"] for r in await fetch(settings.database_url, statuses)}[number]

    r1 = b.refund(charge_id="ch_rule5", amount=400, refund_id="re_rule5a", created=T + 1)
    r2 = b.refund(charge_id="ch_rule5", amount=600, refund_id="re_rule5b", created=T + 2)
    # The invoice's charge was captured only in part: 1500 of 2000 is everything there is to refund.
    partial = b.charge(charge_id="ch_rule5i", amount=2000, amount_captured=1500, created=T)
    async with recon(settings) as stripe:
        await stripe.deliver(b.charge_event("charge.succeeded", paid_charge("ch_rule5"), created=T))
        assert await status_of("ORD-5") == "paid"
        await stripe.deliver(b.refund_event("refund.created", r1, created=T + 1))
        assert await status_of("ORD-5") == "partially_refunded"
        await stripe.deliver(b.refund_event("refund.created", r2, created=T + 2))
        assert await status_of("ORD-5") == "refunded"
        await stripe.deliver(b.refund_event("refund.failed", dict(r2, status="failed"), created=T + 9))
        assert await status_of("ORD-5") == "partially_refunded"

        await stripe.deliver(b.charge_event("charge.captured", partial, created=T))
        assert await status_of("INV-5") == "paid"
        await stripe.deliver(
            b.refund_event(
                "refund.created",
                b.refund(charge_id="ch_rule5i", amount=1500, refund_id="re_rule5i", created=T + 1),
                created=T + 1,
            )
        )
        assert await status_of("INV-5") == "refunded"

        await stripe.deliver(
            b.refund_event(
                "refund.created",
                b.refund(charge_id="ch_rule5r", amount=1000, refund_id="re_rule5r", created=T + 1),
                created=T + 1,
            )
        )
        assert await status_of("ORD-5R") == "rejected"
    assert (await balance(settings, "ch_rule5r"))["amount_refunded"] == 1000


# --- rule 6 -------------------------------------------------------------------------------------


async def test_rule6_dispute_lifecycle_books_each_balance_transaction_once_and_flags(
    settings: Settings,
) -> None:
    """Rule 6: dispute.created sets disputed on payment and order; each balance transaction is
    booked once (withdrawal −amount in the dispute's currency, fee −fee in the settlement currency,
    reinstatement +amount, a returned fee positive); closed clears disputed and records the outcome;
    an appeal sets disputed again, on an invoice too."""
    async with db(settings) as con:
        await host.add_order_with_payment(con, "ORD-6", "ch_rule6", amount=8000, currency="eur")
        invoice_id = await host.add_invoice(con, "INV-6", amount_total=3000)
        await host.add_payment(
            con, invoice_id=invoice_id, charge_id="ch_rule6i", amount=3000, method="stripe_link"
        )
    withdraw = b.balance_transaction(
        amount=-8700, currency="usd", fee=1500, txn_id="txn_rule6w", created=T + 1
    )
    reinstate = b.balance_transaction(
        amount=8700, currency="usd", fee=-1500, txn_id="txn_rule6r", created=T + 9
    )
    dp = b.dispute(
        charge_id="ch_rule6",
        amount=8000,
        currency="eur",
        dispute_id="du_rule6",
        created=T + 1,
        balance_transactions=[withdraw],
    )

    async def flags(number: str, charge_id: str) -> tuple[bool, bool]:
        owner = await one(
            settings,
            "select disputed from recon.orders where number = $1 union all "
            "select disputed from recon.invoices where number = $1",
            number,
        )
        return owner, (await balance(settings, charge_id))["disputed"]

    async with recon(settings) as stripe:
        await stripe.deliver(b.dispute_event("charge.dispute.created", dp, created=T + 1))
        assert await flags("ORD-6", "ch_rule6") == (True, True)
        await stripe.deliver(
            b.dispute_event("charge.dispute.funds_withdrawn", dp, created=T + 1),
            b.dispute_event("charge.dispute.updated", dict(dp, status="under_review"), created=T + 5),
        )
        won = dict(dp, status="won", balance_transactions=[withdraw, reinstate])
        await stripe.deliver(
            b.dispute_event("charge.dispute.closed", won, created=T + 9),
            b.dispute_event("charge.dispute.funds_reinstated", won, created=T + 9),
        )
        assert await flags("ORD-6", "ch_rule6") == (False, False)

        lost = b.dispute(
            charge_id="ch_rule6i", amount=3000, dispute_id="du_rule6i", status="lost", created=T + 1
        )
        await stripe.deliver(
            b.dispute_event("charge.dispute.created", dict(lost, status="needs_response"), created=T + 1),
            b.dispute_event("charge.dispute.closed", lost, created=T + 4),
        )
        assert await flags("INV-6", "ch_rule6i") == (False, False)
        await stripe.deliver(
            b.dispute_event(
                "charge.dispute.updated", dict(lost, status="appeal_needs_response"), created=T + 6
            )
        )
        assert await flags("INV-6", "ch_rule6i") == (True, True)
        await stripe.deliver(
            b.dispute_event("charge.dispute.updated", dict(lost, status="appeal_under_review"), created=T + 7)
        )
    assert await ledger(settings, "ch_rule6") == Counter(
        {
            ("charge", 8000, "eur", "ch_rule6"): 1,
            ("dispute_withdrawal", -8000, "eur", "du_rule6"): 1,
            ("dispute_fee", -1500, "usd", "du_rule6"): 1,
            ("dispute_reinstatement", 8000, "eur", "du_rule6"): 1,
            ("dispute_fee", 1500, "usd", "du_rule6"): 1,
        }
    )
    assert (await balance(settings, "ch_rule6"))["dispute_status"] == "won"
    assert (await balance(settings, "ch_rule6i"))["dispute_status"] == "appeal_under_review"
    open_disputes = await fetch(
        settings.database_url, "select stripe_dispute_id, status from finance.open_disputes"
    )
    assert [tuple(r) for r in open_disputes] == [("du_rule6i", "appeal_under_review")]


# --- rule 7 -------------------------------------------------------------------------------------


async def test_rule7_each_payment_gets_exactly_one_charge_row(settings: Settings) -> None:
    """Rule 7: a metadata-matched charge books nothing while only authorised, then one `charge`
    row for amount_captured once captured, however many charge events follow; a host-recorded
    payment gets one row for its own amount from the first event that touches it (here a dispute)."""
    async with db(settings) as con:
        await host.add_order(con, "ORD-7", amount_total=5000)
        await host.add_order_with_payment(con, "ORD-7H", "ch_rule7h", amount=2500)
    meta = {"order_number": "ORD-7"}
    auth = b.charge(
        charge_id="ch_rule7", amount=5000, captured=False, metadata=meta, method_type="card_present"
    )
    captured = b.charge(
        charge_id="ch_rule7", amount=5000, amount_captured=4000, metadata=meta, method_type="card_present"
    )
    async with recon(settings) as stripe:
        await stripe.deliver(b.charge_event("charge.succeeded", auth, created=T))
        assert await ledger(settings, "ch_rule7") == Counter()
        await stripe.deliver(
            b.charge_event("charge.captured", captured, created=T + 3),
            b.charge_event("charge.refunded", captured, created=T + 3, api_version=OLD),
            b.charge_event("charge.succeeded", auth, created=T),
        )
        dp = b.dispute(
            charge_id="ch_rule7h", amount=2500, dispute_id="du_rule7h", status="warning_needs_response"
        )
        await stripe.deliver(
            b.dispute_event("charge.dispute.created", dp, created=T + 1),
            b.dispute_event("charge.dispute.updated", dict(dp, status="warning_under_review"), created=T + 2),
        )
    assert await ledger(settings) == Counter(
        {("charge", 4000, "usd", "ch_rule7"): 1, ("charge", 2500, "usd", "ch_rule7h"): 1}
    )
    assert (
        await one(settings, "select method from recon.payments where stripe_charge_id = 'ch_rule7'")
        == "stripe_terminal"
    )


# --- rule 8 -------------------------------------------------------------------------------------


async def test_rule8_unmatched_is_retried_then_becomes_an_unmatched_charge_exception(
    settings: Settings,
) -> None:
    """Rule 8: an event whose charge matches nothing is retried with backoff for
    RECON_UNMATCHED_RETRY_S, then acked as 'unmatched' with an unmatched_charge exception and an
    event_unmatched audit row; one whose charge shows up within the window is applied."""
    s = replace(settings, unmatched_retry_s=3)
    async with db(s) as con:
        await host.add_invoice(con, "INV-8", amount_total=1000)
    nowhere = b.refund_event(
        "refund.created", b.refund(charge_id="ch_nowhere", amount=100, refund_id="re_nowhere")
    )
    early = b.refund_event("refund.created", b.refund(charge_id="ch_rule8", amount=100, refund_id="re_rule8"))
    charge = b.charge_event("charge.succeeded", paid_charge("ch_rule8", metadata={"invoice_number": "INV-8"}))
    async with recon(s) as stripe:
        await stripe.post(nowhere, early)
        await wait_until(lambda: _retrying(s, early), what="the early refund to wait for its charge")
        await stripe.post(charge)
        await stripe.settled(nowhere, early, charge, timeout_s=30)
    attempts = await one(s, "select attempts from finance.events where stripe_event_id = $1", nowhere["id"])
    assert await outcome(s, nowhere) == "unmatched" and attempts > 1
    assert await outcome(s, early) == "applied"
    assert [k for k, *_ in await exceptions(s)] == ["unmatched_charge"]
    assert await one(s, "select count(*) from recon.audit_log where action = 'event_unmatched'") == 1
    assert await ledger(s, "ch_rule8") == Counter(
        {("charge", 1000, "usd", "ch_rule8"): 1, ("refund", -100, "usd", "re_rule8"): 1}
    )


async def test_rule8_poison_is_dead_lettered_with_its_error_and_raises_an_exception(
    settings: Settings,
) -> None:
    """Rule 8 "Poison messages go to the dead-letter queue after RECON_MAX_ATTEMPTS with the error
    kept, and raise a dead_lettered exception": a refund whose amount is not a number fails every
    attempt; after max_attempts it is dead-lettered, recorded with its error and audited."""
    async with db(settings) as con:
        await host.add_order_with_payment(con, "ORD-8P", "ch_rule8p")
    poison = b.refund_event("refund.created", dict(b.refund(charge_id="ch_rule8p", amount=1), amount="lots"))
    async with recon(settings) as stripe:
        await stripe.post(poison)
        await stripe.settled(poison, timeout_s=30)
    assert await outcome(settings, poison) == "dead_lettered"
    assert [k for k, *_ in await exceptions(settings)] == ["dead_lettered"]
    dead = await one(
        settings, "select attempts, last_error from recon.dead_letters where event_id = $1", poison["id"]
    )
    assert dead["attempts"] == settings.max_attempts and dead["last_error"]
    assert (
        await one(settings, "select count(*) from recon.audit_log where action = 'event_dead_lettered'") == 1
    )
    assert await ledger(settings, "ch_rule8p") == Counter()


# --- rule 9 -------------------------------------------------------------------------------------


async def test_rule9_every_change_writes_an_audit_row(settings: Settings) -> None:
    """Rule 9: refund recorded and reversed, dispute opened / funds withdrawn / reinstated /
    closed and each status change each leave an audit row naming the Stripe object."""
    async with db(settings) as con:
        await host.add_order_with_payment(con, "ORD-9", "ch_rule9")
    re = b.refund(charge_id="ch_rule9", amount=300, refund_id="re_rule9", created=T + 1)
    withdraw = b.balance_transaction(amount=-1000, fee=1500, txn_id="txn_rule9w", created=T + 2)
    reinstate = b.balance_transaction(amount=1000, txn_id="txn_rule9r", created=T + 5)
    dp = b.dispute(
        charge_id="ch_rule9",
        amount=1000,
        dispute_id="du_rule9",
        balance_transactions=[withdraw],
        created=T + 2,
    )
    async with recon(settings) as stripe:
        await stripe.deliver(
            b.refund_event("refund.created", re, created=T + 1),
            b.refund_event("refund.failed", dict(re, status="failed"), created=T + 3),
            b.dispute_event("charge.dispute.created", dp, created=T + 2),
            b.dispute_event(
                "charge.dispute.closed",
                dict(dp, status="won", balance_transactions=[withdraw, reinstate]),
                created=T + 5,
            ),
        )
    rows = await fetch(settings.database_url, "select action, stripe_object_id, detail from recon.audit_log")

    def what(detail: str) -> Any:
        moved = json.loads(detail)
        return (moved.get("object"), moved["to"]) if "to" in moved else moved["kind"]

    # Counted exactly: one row per change, none repeated.
    assert Counter((r["action"], r["stripe_object_id"], what(r["detail"])) for r in rows) == Counter(
        {
            ("status_changed", "re_rule9", ("refund", "succeeded")): 1,
            ("stripe_refund_recorded", "re_rule9", "refund"): 1,
            ("status_changed", "re_rule9", ("payment", "partially_refunded")): 1,
            ("status_changed", "re_rule9", ("order", "partially_refunded")): 1,
            ("status_changed", "re_rule9", ("refund", "failed")): 1,
            ("stripe_refund_reversed", "re_rule9", "refund_reversal"): 1,
            ("status_changed", "re_rule9", ("payment", "paid")): 1,
            ("status_changed", "re_rule9", ("order", "paid")): 1,
            ("dispute_opened", "du_rule9", (None, "needs_response")): 1,
            ("dispute_funds_withdrawn", "du_rule9", "dispute_withdrawal"): 1,
            ("dispute_funds_withdrawn", "du_rule9", "dispute_fee"): 1,
            ("status_changed", "du_rule9", ("payment", True)): 1,
            ("status_changed", "du_rule9", ("order", True)): 1,
            ("dispute_closed", "du_rule9", (None, "won")): 1,
            ("dispute_funds_reinstated", "du_rule9", "dispute_reinstatement"): 1,
            ("status_changed", "du_rule9", ("payment", False)): 1,
            ("status_changed", "du_rule9", ("order", False)): 1,
        }
    )


# --- rule 10 ------------------------------------------------------------------------------------

LOG_FIELDS = ("event_id", "event_type", "stripe_object_id", "outcome", "attempt", "duration_ms")


@pytest.mark.slow
async def test_rule10_one_json_log_line_per_event_without_email_addresses(settings: Settings) -> None:
    """Rule 10: a real `recon worker` process writes one JSON line per event handled with event_id,
    event_type, stripe_object_id, order_number/invoice_number, outcome, attempt and duration_ms —
    and no e-mail address, although the charges carry receipt and billing e-mails."""
    async with db(settings) as con:
        await host.add_order_with_payment(con, "ORD-10", "ch_rule10")
        await host.add_invoice(con, "INV-10")
    email = {"receipt_email": "jenny.rosen@example.com"}
    order_charge = dict(paid_charge("ch_rule10"), **email)
    invoice_charge = dict(paid_charge("ch_rule10i", metadata={"invoice_number": "INV-10"}), **email)
    order_charge["billing_details"]["email"] = invoice_charge["billing_details"]["email"] = (
        "jenny@example.org"
    )
    events: Sequence[dict[str, Any]] = [
        b.charge_event("charge.succeeded", order_charge, created=T),
        b.charge_event("charge.succeeded", invoice_charge, created=T),
        b.refund_event(
            "refund.created",
            b.refund(charge_id="ch_rule10", amount=100, refund_id="re_rule10"),
            created=T + 1,
        ),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        async with recon(settings, "receiver") as stripe:
            async with worker_processes(settings, 1, Path(tmp)) as workers:
                await stripe.deliver(*events)
        text = workers.logs[0].read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    handled = [
        line for line in lines if line.get("event_id") in {e["id"] for e in events} and "outcome" in line
    ]
    assert sorted(line["event_id"] for line in handled) == sorted(e["id"] for e in events)
    for line in handled:
        assert all(field in line for field in LOG_FIELDS), line
    by_id = {line["event_id"]: line for line in handled}
    assert by_id[events[0]["id"]]["order_number"] == "ORD-10"
    assert by_id[events[1]["id"]]["invoice_number"] == "INV-10"
    assert by_id[events[2]["id"]]["stripe_object_id"] == "re_rule10"
    for leak in ("jenny.rosen@example.com", "jenny@example.org", "example.com", "example.org", "whsec_"):
        assert leak not in text
