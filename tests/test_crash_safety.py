"""`recon worker` as a real process against the real rules: SIGTERM drains, SIGKILL and connection
cuts mid-stream lose nothing and book nothing twice (the ledger equals a serial, crash-free run)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from handlers import charge_ref
from tests import builders as b
from tests import event_stream, servers
from tests import host_records as h
from tests.consumer_harness import WorkerProcess, consumer_running, feeder
from tests.harness import events_settled, fetch, via_port, wait_until
from tests.tcp_proxy import TcpProxy
from worker.settings import Settings

pytestmark = pytest.mark.slow

CHARGES = 120  # about 450 events with duplicates


@pytest.fixture
async def stream(settings: Settings) -> event_stream.Stream:
    """The event stream over CHARGES payments (duplicates included), their host rows written."""
    built = event_stream.build(CHARGES, tag="crash")
    con = await asyncpg.connect(settings.database_url)
    try:
        await event_stream.seed(con, built.payments)
    finally:
        await con.close()
    return built


@pytest.fixture
async def reference(pg_template: str, stream: event_stream.Stream) -> AsyncIterator[Counter[tuple[Any, ...]]]:
    """The ledger of the same stream applied serially, in order, one transaction per event."""
    name = await servers.clone_database(pg_template)
    con = await asyncpg.connect(servers.database_url(name))
    try:
        await event_stream.seed(con, stream.payments)
        for event in stream.events:
            await h.apply(con, b.incoming(event))
        yield await event_stream.ledger_multiset(con)
    finally:
        await con.close()
        await servers.drop_database(name)


async def inbox_count(database_url: str) -> int:
    rows = await fetch(database_url, "select count(*) as n from recon.event_inbox")
    return int(rows[0]["n"])


async def at_least(database_url: str, n: int) -> bool:
    return await inbox_count(database_url) >= n


async def final_ledger(database_url: str) -> Counter[tuple[Any, ...]]:
    """The ledger as a multiset, compared by ``same_money``."""
    con = await asyncpg.connect(database_url)
    try:
        return await event_stream.ledger_multiset(con)
    finally:
        await con.close()


def same_money(ledger: Counter[tuple[Any, ...]]) -> Counter[tuple[Any, ...]]:
    """The ledger less each refund booked and reversed (a refund that ended failed). Rule 4 books
    such a refund and its reversal when its succeeded snapshot arrives first, and nothing when
    the failure is known first: both net to zero, and which happens depends on the order the
    redeliveries after a kill or a cut arrive in. Anything booked twice still shows."""
    kept = Counter(ledger)
    for (kind, amount, currency, charge_id, refund_id), count in ledger.items():
        if kind == "refund_reversal":
            booked = ("refund", -amount, currency, charge_id, refund_id)
            pairs = min(count, kept[booked])
            kept[booked] -= pairs
            kept[(kind, amount, currency, charge_id, refund_id)] -= pairs
    return +kept


@contextlib.asynccontextmanager
async def holding_payments(database_url: str, charge_ids: list[str]) -> AsyncIterator[None]:
    """Hold these payments' row locks, as a slow concurrent transaction would: a worker batch that
    touches one of them blocks inside its transaction, delivered and not yet committed or acked."""
    con = await asyncpg.connect(database_url)
    try:
        async with con.transaction():
            await con.execute(
                "select 1 from recon.payments where stripe_charge_id = any($1::text[]) for update", charge_ids
            )
            yield
    finally:
        await con.close()


async def worker_blocked_in_a_transaction(database_url: str) -> bool:
    """A backend of this database waits on a row lock inside an open transaction: work in flight."""
    rows = await fetch(
        database_url,
        "select count(*) as n from pg_stat_activity"
        " where datname = current_database() and wait_event_type = 'Lock' and xact_start is not null",
    )
    return bool(rows[0]["n"] > 0)


async def stop(worker: WorkerProcess) -> None:
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0, worker.log_tail()


async def test_sigterm_drains_in_flight_and_exits_zero(
    settings: Settings, amqp_url: str, tmp_path: Path
) -> None:
    """SIGTERM while a batch is provably in flight (blocked inside its transaction on a row lock
    the test holds): the worker stops consuming, finishes and acks what it holds once the lock
    goes, and exits 0, reporting unsettled work at the stop; every message is then either
    reconciled or still queued — none lost, none left retrying."""
    built = event_stream.build(CHARGES, tag="term", duplicate_share=0.0)
    con = await asyncpg.connect(settings.database_url)
    try:
        await event_stream.seed(con, built.payments)
    finally:
        await con.close()
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    held = [p.charge_id for p in built.payments[:10]]
    async with feeder(amqp_url, settings) as feed:
        for event in built.events:
            await feed.event(event)
        try:
            async with holding_payments(settings.database_url, held):
                worker.start()
                await wait_until(
                    lambda: worker_blocked_in_a_transaction(settings.database_url),
                    interval_s=0.01,
                    what="a batch blocked in flight",
                )
                worker.signal(signal.SIGTERM)
                await asyncio.sleep(0.5)  # the stop has begun with the batch still blocked
            assert await worker.wait() == 0, worker.log_tail()
        finally:
            worker.kill()
        queued = await feed.depth()
    rows = await fetch(settings.database_url, "select outcome from finance.events")
    assert "retrying" not in {row["outcome"] for row in rows}
    assert len(rows) + queued == len(built.events)
    drained = [json.loads(line) for line in worker.log_tail(200).splitlines() if "consumer_drained" in line]
    assert drained and drained[-1]["complete"] is True
    assert drained[-1]["unfinished_at_stop"] > 0


async def test_sigkill_mid_stream_then_restart_books_everything_once(
    settings: Settings,
    amqp_url: str,
    stream: event_stream.Stream,
    reference: Counter[tuple[Any, ...]],
    tmp_path: Path,
) -> None:
    """A worker killed with SIGKILL while a batch is provably in flight (blocked inside its
    transaction on a row lock the test holds) and a fresh one started: every event reaches a final
    outcome and the ledger equals the serial reference — each booking exactly once."""
    half = len(stream.events) // 2
    first = WorkerProcess(settings, tmp_path / "first.log")
    second = WorkerProcess(settings, tmp_path / "second.log")
    async with feeder(amqp_url, settings) as feed:
        for event in stream.events[:half]:
            await feed.event(event)
        held = [str(charge_ref(stream.events[0]).charge_id)]
        try:
            async with holding_payments(settings.database_url, held):
                first.start()
                await wait_until(
                    lambda: worker_blocked_in_a_transaction(settings.database_url),
                    interval_s=0.01,
                    what="a batch blocked in flight",
                )
                in_flight_at_kill = await worker_blocked_in_a_transaction(settings.database_url)
                first.kill()
        finally:
            first.kill()
        second.start()
        try:
            for event in stream.events[half:]:
                await feed.event(event)
            await wait_until(
                lambda: events_settled(settings.database_url, stream.event_ids),
                timeout_s=90,
                what="all settled",
            )
            await stop(second)
        finally:
            second.kill()
    assert in_flight_at_kill
    assert same_money(await final_ledger(settings.database_url)) == same_money(reference)


@pytest.mark.parametrize("server", ["broker", "database"])
async def test_connection_cut_mid_stream_loses_nothing_and_books_once(
    server: str,
    settings: Settings,
    amqp_url: str,
    stream: event_stream.Stream,
    reference: Counter[tuple[Any, ...]],
    tmp_path: Path,
) -> None:
    """The worker's connection to RabbitMQ (or PostgreSQL) is reset mid-stream and refused for a
    while: /readyz goes 503, the worker reconnects by itself once it is back, and the ledger ends
    equal to the serial reference (redeliveries become inbox duplicates, none double-books)."""
    target = urlsplit(amqp_url if server == "broker" else settings.database_url)
    proxy = TcpProxy("127.0.0.1", target.port or (5672 if server == "broker" else 5432))
    await proxy.start()
    if server == "broker":
        proxied = dataclasses.replace(settings, amqp_url=via_port(amqp_url, proxy.port))
    else:
        proxied = dataclasses.replace(settings, database_url=via_port(settings.database_url, proxy.port))
    worker = WorkerProcess(proxied, tmp_path / "worker.log")
    try:
        async with feeder(amqp_url, settings) as feed:
            for event in stream.events:
                await feed.event(event)
            worker.start()
            await wait_until(
                lambda: at_least(settings.database_url, 30), interval_s=0.01, what="some applied"
            )
            await proxy.cut()
            at_cut = await inbox_count(settings.database_url)
            await wait_until(lambda: _not_ready(proxied), what="/readyz 503 during the outage")
            await proxy.restore()
            await wait_until(
                lambda: events_settled(settings.database_url, stream.event_ids),
                timeout_s=90,
                what="all settled",
            )
            await stop(worker)
    finally:
        worker.kill()
        await proxy.close()
    assert at_cut < len(stream.event_ids)
    assert same_money(await final_ledger(settings.database_url)) == same_money(reference)


async def _not_ready(settings: Settings) -> bool:
    import aiohttp

    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{settings.worker_http_port}/readyz") as r,
    ):
        return r.status == 503


async def test_unmatched_event_is_retried_then_becomes_an_exception(
    settings: Settings, amqp_url: str
) -> None:
    """An event whose charge matches nothing is retried through the wait queues (attempts counted in
    the inbox) until RECON_UNMATCHED_RETRY_S runs out, then raises unmatched_charge and is acked."""
    short = dataclasses.replace(settings, unmatched_retry_s=2, retry_delays_s=(0.2, 0.5, 1.0))
    refund = b.refund(charge_id="ch_nobody_knows", amount=300)
    event = b.refund_event("refund.created", refund)
    async with feeder(amqp_url, short) as feed, consumer_running(short) as consumer:
        await feed.event(event)
        await wait_until(lambda: events_settled(short.database_url, [event["id"]]), what="unmatched outcome")
        assert await feed.depth() == 0
        assert consumer.lanes.backlog == 0
    rows = await fetch(
        short.database_url, "select outcome, attempts from recon.event_inbox where event_id = $1", event["id"]
    )
    assert rows[0]["outcome"] == "unmatched"
    assert rows[0]["attempts"] >= 3
    exceptions = await fetch(short.database_url, "select kind, stripe_event_id from finance.exceptions")
    assert [tuple(r) for r in exceptions] == [("unmatched_charge", event["id"])]


async def test_poison_event_with_real_rules_is_dead_lettered_and_recorded(
    settings: Settings, amqp_url: str
) -> None:
    """A handled type whose payload the rules cannot apply fails RECON_MAX_ATTEMPTS times, goes to
    the dead-letter queue with its error, and is recorded: inbox dead_lettered, a dead_lettered
    exception with the raw body kept for replay."""
    con = await asyncpg.connect(settings.database_url)
    try:
        await h.add_order_with_payment(con, "O-poison", "ch_poison")
    finally:
        await con.close()
    refund = b.refund(charge_id="ch_poison", amount=300)
    refund["amount"] = "three hundred"
    event = b.refund_event("refund.created", refund)
    async with feeder(amqp_url, settings) as feed, consumer_running(settings):
        await feed.event(event)
        await wait_until(lambda: events_settled(settings.database_url, [event["id"]]), what="dead-lettered")
        assert await feed.depth("recon.dead-letters") == 0
    inbox = await fetch(
        settings.database_url, "select outcome from finance.events where stripe_event_id = $1", event["id"]
    )
    assert [r["outcome"] for r in inbox] == ["dead_lettered"]
    kinds = await fetch(
        settings.database_url, "select kind from finance.exceptions where stripe_event_id = $1", event["id"]
    )
    assert [r["kind"] for r in kinds] == ["dead_lettered"]
