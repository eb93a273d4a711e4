"""``recon backfill`` against a local fake of Stripe's event list, the real database and vhost.

localstripe serves /v1/events but none of the types we handle, so the fake here serves pages
of events built from tests/fixtures/stripe, the way Stripe does: newest first, ``limit`` per
page, ``starting_after`` for the next page, filtered by ``types[]`` and ``created[gte|lte]``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from aiohttp import web

from tests.builders import refund, refund_event
from tests.harness import events_settled, fetch, post_event, running, wait_until
from tests.host_records import add_order_with_payment
from tests.stripe_events import fixture, make_event, unique_id
from tests.work_queue import drain_work_queue
from worker import cli
from worker.events import HANDLED_TYPES
from worker.ops import backfill as backfill_command
from worker.settings import Settings

SINCE = datetime(2026, 3, 1, tzinfo=UTC)
UNTIL = datetime(2026, 3, 31, tzinfo=UTC)
FAKE_PAGE_SIZE = 2  # small pages, so a handful of events needs several requests
API_KEY = "sk_test_backfill_fake"


@dataclass
class FakeStripeEvents:
    events: list[dict[str, Any]]
    requests: list[dict[str, Any]] = field(default_factory=list)

    def _matches(self, event: dict[str, Any], query: Any) -> bool:
        types = [v for k, v in query.items() if k.startswith("types[")]
        gte, lte = query.get("created[gte]"), query.get("created[lte]")
        return (
            (not types or event["type"] in types)
            and (gte is None or event["created"] >= int(gte))
            and (lte is None or event["created"] <= int(lte))
        )

    async def list_events(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return web.json_response({"error": {"type": "invalid_request_error"}}, status=401)
        query = request.query
        self.requests.append(dict(query))
        listed = sorted(
            (e for e in self.events if self._matches(e, query)), key=lambda e: (-e["created"], e["id"])
        )
        after = query.get("starting_after")
        if after is not None:
            listed = listed[[e["id"] for e in listed].index(after) + 1 :]
        limit = min(int(query.get("limit", "10")), FAKE_PAGE_SIZE)
        page = listed[:limit]
        return web.json_response(
            {"object": "list", "url": "/v1/events", "has_more": len(listed) > limit, "data": page}
        )


@pytest_asyncio.fixture
async def fake_stripe() -> AsyncIterator[tuple[FakeStripeEvents, str]]:
    """The fake on a free port of 127.0.0.1; yields it and its base URL."""
    fake = FakeStripeEvents(events=[])
    app = web.Application()
    app.router.add_get("/v1/events", fake.list_events)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _at(day: int, hour: int = 12) -> int:
    return int(datetime(2026, 3, day, hour, tzinfo=UTC).timestamp())


def _refund_event(created: int, event_type: str = "refund.created") -> dict[str, Any]:
    refund = fixture("refund")
    refund.update(id=unique_id("re"), created=created)
    return make_event(event_type, refund, created=created)


def _dispute_event(created: int) -> dict[str, Any]:
    dispute = fixture("dispute")
    dispute.update(id=unique_id("dp"), created=created)
    return make_event("charge.dispute.created", dispute, created=created)


async def _mark_seen(database_url: str, event: dict[str, Any]) -> None:
    """As the consumer would have left it: the event is in the inbox."""
    con = await asyncpg.connect(database_url)
    try:
        await con.execute(
            """
            insert into recon.event_inbox (event_id, type, created, received_at, first_seen_at,
                                           processed_at, outcome, attempts)
            values ($1, $2, to_timestamp($3), now(), now(), now(), 'applied', 1)
            """,
            event["id"],
            event["type"],
            event["created"],
        )
    finally:
        await con.close()


async def test_backfill_follows_every_page_and_queues_only_unseen_events(
    settings: Settings, fake_stripe: tuple[FakeStripeEvents, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Five events in range over three pages; two already in the inbox; three are queued, raw and routed."""
    fake, base_url = fake_stripe
    in_range = [_refund_event(_at(d)) for d in (2, 5, 9)] + [_dispute_event(_at(12)), _dispute_event(_at(20))]
    before, after = _refund_event(_at(1, 0) - 1), _refund_event(_at(31, 0) + 1)
    ignored_type = make_event("plan.created", fixture("event")["data"]["object"], created=_at(3))
    fake.events = [*in_range, before, after, ignored_type]
    seen_already = [in_range[1], in_range[3]]
    for event in seen_already:
        await _mark_seen(settings.database_url, event)

    configured = replace(settings, stripe_api_key=API_KEY, stripe_api_base=base_url)
    code = await backfill_command.backfill(configured, since=SINCE, until=UNTIL)

    assert code == 0
    assert capsys.readouterr().out.strip() == "seen 5, queued 3, already known 2"
    queued = await drain_work_queue(settings.amqp_url)
    expected = {e["id"]: e for e in in_range if e not in seen_already}
    assert sorted(m.message_id or "" for m in queued) == sorted(expected)
    for message in queued:
        assert json.loads(message.body) == expected[message.message_id or ""]
        assert message.type == expected[message.message_id or ""]["type"]
    # Three requests: the first without a cursor, then each one after the last id of the page before.
    newest_first = sorted(in_range, key=lambda e: (-e["created"], e["id"]))
    cursors = [r.get("starting_after") for r in fake.requests]
    assert cursors == [None, newest_first[1]["id"], newest_first[3]["id"]]
    first = fake.requests[0]
    assert sorted(v for k, v in first.items() if k.startswith("types[")) == sorted(HANDLED_TYPES)
    assert (int(first["created[gte]"]), int(first["created[lte]"])) == (_at(1, 0), _at(31, 0))


async def test_backfill_run_again_after_processing_queues_nothing(
    settings: Settings, fake_stripe: tuple[FakeStripeEvents, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Once everything listed is in the inbox, a second backfill reports it all as already known."""
    fake, base_url = fake_stripe
    fake.events = [_refund_event(_at(d)) for d in (3, 4, 5)]
    for event in fake.events:
        await _mark_seen(settings.database_url, event)

    configured = replace(settings, stripe_api_key=API_KEY, stripe_api_base=base_url)
    assert await backfill_command.backfill(configured, since=SINCE, until=None) == 0

    assert capsys.readouterr().out.strip() == "seen 3, queued 0, already known 3"
    assert await drain_work_queue(settings.amqp_url) == []
    assert "created[lte]" not in fake.requests[0]


async def test_backfill_with_a_rejected_key_fails_with_one_line(
    settings: Settings, fake_stripe: tuple[FakeStripeEvents, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Stripe answering 401 is one error line without the key, and exit 1."""
    _, base_url = fake_stripe
    configured = replace(settings, stripe_api_key="sk_test_wrong_key", stripe_api_base=base_url)

    assert await backfill_command.backfill(configured, since=SINCE, until=None) == 1

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "AuthenticationError" in err and "sk_test" not in err


def test_backfill_without_api_key_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The missing STRIPE_API_KEY is named on one line; nothing is contacted."""
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.delenv("STRIPE_API_KEY", raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/unreachable")

    assert cli.main(["backfill", "--since", "2026-03-01"]) == 2

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "STRIPE_API_KEY" in err


async def test_backfill_during_live_webhooks_books_each_refund_once(
    settings: Settings, fake_stripe: tuple[FakeStripeEvents, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """With `recon run` consuming: a webhook already applied is skipped, a missed one is queued and
    applied, and one arriving by webhook and backfill at the same time still books one refund."""
    fake, base_url = fake_stripe
    charge_id = unique_id("ch")
    con = await asyncpg.connect(settings.database_url)
    try:
        await add_order_with_payment(con, unique_id("ORD"), charge_id, amount=10_000)
    finally:
        await con.close()
    delivered, missed, racing = (
        refund_event(
            "refund.created", refund(charge_id=charge_id, amount=amount, created=_at(day)), created=_at(day)
        )
        for day, amount in ((2, 100), (3, 200), (4, 400))
    )
    fake.events = [delivered, missed, racing]
    configured = replace(settings, stripe_api_key=API_KEY, stripe_api_base=base_url)

    async with running("run", settings) as app_url, aiohttp.ClientSession() as http:
        assert (await post_event(http, app_url, delivered))[0] == 200
        await wait_until(lambda: events_settled(settings.database_url, [delivered["id"]]), what="webhook")
        assert (await post_event(http, app_url, racing))[0] == 200  # may or may not be in the inbox yet
        assert await backfill_command.backfill(configured, since=SINCE, until=UNTIL) == 0
        all_ids = [e["id"] for e in fake.events]
        await wait_until(lambda: events_settled(settings.database_url, all_ids), what="backfilled events")

    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("seen ")]
    # The applied webhook is known; the racing one may or may not have reached the inbox yet.
    assert summary[0] in ("seen 3, queued 1, already known 2", "seen 3, queued 2, already known 1")
    rows = await fetch(
        settings.database_url,
        "select amount from finance.ledger where stripe_charge_id = $1 and kind = 'refund' order by amount",
        charge_id,
    )
    assert [r["amount"] for r in rows] == [-400, -200, -100]


async def test_backfill_applies_the_receivers_livemode_rule(
    settings: Settings, fake_stripe: tuple[FakeStripeEvents, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """With STRIPE_LIVEMODE=false a live-mode event is not queued, as the receiver would refuse it."""
    fake, base_url = fake_stripe
    test_mode = [_refund_event(_at(d)) for d in (2, 3)]
    live = _refund_event(_at(4))
    live["livemode"] = True
    fake.events = [*test_mode, live]

    configured = replace(settings, stripe_api_key=API_KEY, stripe_api_base=base_url, livemode=False)
    assert await backfill_command.backfill(configured, since=SINCE, until=UNTIL) == 0

    assert capsys.readouterr().out.strip() == (
        "seen 3, queued 2, already known 0, skipped 1 the receiver would refuse"
    )
    queued = await drain_work_queue(settings.amqp_url)
    assert sorted(m.message_id or "" for m in queued) == sorted(e["id"] for e in test_mode)
