"""``recon dead-letters list|replay`` against the real database and the test's own vhost."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import pytest

from handlers import DeadLetter, EventToApply, record_dead_letter
from tests.builders import incoming, refund, refund_event
from tests.harness import fetch, post_event, running, wait_until
from tests.host_records import add_order_with_payment, apply, exceptions, inbox, ledger
from tests.stripe_events import encode, fixture, make_event, unique_id
from tests.work_queue import drain_work_queue
from worker.amqp import topology
from worker.amqp.publisher import Publisher, PublishFailed
from worker.ops import dead_letter_replay as deadletters
from worker.settings import Settings
from worker.workbench import dead_letters as replay_work


async def _store_dead_letter(
    database_url: str, event: dict[str, object], *, error: str, replayed: bool = False
) -> bytes:
    body = encode(event)
    seen = datetime.now(UTC) - timedelta(hours=2)
    con = await asyncpg.connect(database_url)
    try:
        await con.execute(
            """
            insert into recon.dead_letters
                (event_id, event_type, body, last_error, attempts, first_seen_at, last_seen_at, replayed_at)
            values ($1, $2, $3, $4, 8, $5, $6, $7)
            """,
            event["id"],
            event["type"],
            body,
            error,
            seen,
            seen + timedelta(minutes=30),
            seen + timedelta(hours=1) if replayed else None,
        )
    finally:
        await con.close()
    return body


def _refund_event(charge_id: str, amount: int, *, created: int | None = None) -> dict[str, object]:
    refund = fixture("refund")
    refund.update(id=unique_id("re"), charge=charge_id, amount=amount, status="succeeded")
    if created is not None:
        refund["created"] = created
    return make_event("refund.created", refund, created=created)


async def test_list_shows_only_dead_letters_not_yet_replayed(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table and the JSON array name each waiting event with its error; replayed ones are gone."""
    waiting = _refund_event("ch_waiting", 500)
    done = _refund_event("ch_done", 700)
    await _store_dead_letter(settings.database_url, waiting, error="KeyError: 'charge'\n  at line 3")
    await _store_dead_letter(settings.database_url, done, error="boom", replayed=True)

    assert await deadletters.list_dead_letters(settings, as_json=False) == 0
    table = capsys.readouterr().out
    assert str(waiting["id"]) in table and "refund.created" in table
    assert "KeyError: 'charge' at line 3" in table  # one line per event, even for multi-line errors
    assert str(done["id"]) not in table

    assert await deadletters.list_dead_letters(settings, as_json=True) == 0
    lines = json.loads(capsys.readouterr().out)
    assert [line["event_id"] for line in lines] == [waiting["id"]]
    assert lines[0]["attempts"] == 8
    assert lines[0]["last_error"] == "KeyError: 'charge'\n  at line 3"
    first_seen, last_seen = (datetime.fromisoformat(lines[0][k]) for k in ("first_seen_at", "last_seen_at"))
    assert first_seen < last_seen


async def test_empty_list_says_so(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    """With nothing dead-lettered the table form prints one reassuring line, JSON an empty array."""
    assert await deadletters.list_dead_letters(settings, as_json=False) == 0
    assert capsys.readouterr().out.strip() == "no dead-lettered events waiting for replay"
    assert await deadletters.list_dead_letters(settings, as_json=True) == 0
    assert json.loads(capsys.readouterr().out) == []


async def test_replay_requeues_the_raw_body_as_a_fresh_delivery(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """The exact stored bytes go to the work queue with attempt 1 and first-seen now; the row is marked."""
    event = _refund_event("ch_replay", 900, created=1_700_000_000)
    body = await _store_dead_letter(settings.database_url, event, error="poison")
    before_ms = int(time.time() * 1000)

    assert await deadletters.replay(settings, [str(event["id"])], replay_all=False) == 0

    [message] = await drain_work_queue(settings.amqp_url)
    assert message.body == body
    assert (message.message_id, message.type) == (event["id"], "refund.created")
    assert message.headers[topology.HEADER_ATTEMPT] == 1
    assert message.headers[topology.HEADER_FAILURES] == 0
    assert message.headers[topology.HEADER_CREATED] == 1_700_000_000
    first_seen_ms = message.headers[topology.HEADER_FIRST_SEEN_MS]
    assert isinstance(first_seen_ms, int) and first_seen_ms >= before_ms
    rows = await fetch(settings.database_url, "select replayed_at from recon.dead_letters")
    assert rows[0]["replayed_at"] is not None
    assert f"replayed {event['id']}" in capsys.readouterr().out


async def test_replay_of_an_unknown_id_exits_2_and_queues_nothing(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """One unknown id fails the whole command with one line, before anything is published or marked."""
    event = _refund_event("ch_known", 100)
    await _store_dead_letter(settings.database_url, event, error="poison")

    code = await deadletters.replay(settings, [str(event["id"]), "evt_nope"], replay_all=False)

    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evt_nope" in err
    rows = await fetch(settings.database_url, "select replayed_at from recon.dead_letters")
    assert rows[0]["replayed_at"] is None
    # Nothing was published: the command never even declared the topology in this vhost.
    with pytest.raises(Exception, match="NOT_FOUND"):
        await drain_work_queue(settings.amqp_url)


async def test_replay_all_takes_every_waiting_letter_and_only_those(settings: Settings) -> None:
    """--all re-queues each not-yet-replayed letter once; a second --all finds nothing to do."""
    waiting = [_refund_event(f"ch_all_{n}", 100 + n) for n in range(3)]
    for event in waiting:
        await _store_dead_letter(settings.database_url, event, error="poison")
    await _store_dead_letter(settings.database_url, _refund_event("ch_old", 5), error="x", replayed=True)

    assert await deadletters.replay(settings, [], replay_all=True) == 0
    assert await deadletters.replay(settings, [], replay_all=True) == 0

    queued = await drain_work_queue(settings.amqp_url)
    assert sorted(m.message_id or "" for m in queued) == sorted(str(e["id"]) for e in waiting)
    waiting_sql = "select count(*) as n from recon.dead_letters where replayed_at is null"
    rows = await fetch(settings.database_url, waiting_sql)
    assert rows[0]["n"] == 0


async def _replayed_incoming(amqp_url: str) -> EventToApply:
    """The one replayed message, handed over the way the consumer runtime would."""
    [message] = await drain_work_queue(amqp_url)
    first_seen_ms = message.headers[topology.HEADER_FIRST_SEEN_MS]
    attempt = message.headers[topology.HEADER_ATTEMPT]
    assert isinstance(first_seen_ms, int) and isinstance(attempt, int)
    return incoming(
        json.loads(message.body),
        attempt=attempt,
        first_seen_at=datetime.fromtimestamp(first_seen_ms / 1000, UTC),
    )


async def _dead_letter_through_handlers(con: asyncpg.Connection, event: dict[str, object]) -> None:
    async with con.transaction():
        await record_dead_letter(
            con,
            DeadLetter(
                event_id=str(event["id"]),
                event_type=str(event["type"]),
                body=encode(event),
                error="RuntimeError: worker crashed",
                attempts=3,
                first_seen_at=datetime.now(UTC) - timedelta(minutes=5),
                created=datetime.fromtimestamp(int(str(event["created"])), UTC),
                object_id=str(event["data"]["object"]["id"]),  # type: ignore[index]
            ),
        )


async def test_a_replayed_dead_letter_applies_and_resolves_its_exception(settings: Settings) -> None:
    """Replay → the handlers apply the event once, and its dead_lettered exception is resolved."""
    charge_id = unique_id("ch")
    event = refund_event("refund.created", refund(charge_id=charge_id, amount=300))
    con = await asyncpg.connect(settings.database_url)
    try:
        await add_order_with_payment(con, unique_id("ORD"), charge_id, amount=1000)
        await _dead_letter_through_handlers(con, event)
        assert [e["resolved_at"] for e in await exceptions(con, "dead_lettered")] == [None]

        assert await deadletters.replay(settings, [str(event["id"])], replay_all=False) == 0
        result = await apply(con, await _replayed_incoming(settings.amqp_url))

        assert result.outcome == "applied"
        assert [(kind, amount) for kind, amount, *_ in await ledger(con, charge_id)] == [
            ("charge", 1000),
            ("refund", -300),
        ]
        assert [e["resolved_at"] is not None for e in await exceptions(con, "dead_lettered")] == [True]
        assert (await inbox(con, str(event["id"])))["outcome"] == "applied"
    finally:
        await con.close()


async def test_replaying_an_event_that_already_applied_changes_nothing(settings: Settings) -> None:
    """A late dead-lettering of an applied event, replayed, is a duplicate: the ledger stays as it was."""
    charge_id = unique_id("ch")
    event = refund_event("refund.created", refund(charge_id=charge_id, amount=400))
    con = await asyncpg.connect(settings.database_url)
    try:
        await add_order_with_payment(con, unique_id("ORD"), charge_id, amount=1000)
        assert (await apply(con, incoming(event))).outcome == "applied"
        before = await ledger(con, charge_id)
        await _dead_letter_through_handlers(con, event)  # e.g. a crash loop after the commit

        assert await deadletters.replay(settings, [str(event["id"])], replay_all=False) == 0
        result = await apply(con, await _replayed_incoming(settings.amqp_url))

        assert result.outcome == "duplicate"
        assert await ledger(con, charge_id) == before
        assert (await inbox(con, str(event["id"])))["outcome"] == "applied"
    finally:
        await con.close()


def _json_lines(output: str) -> list[dict[str, Any]]:
    """The objects printed among the server's own log lines, a listing's array flattened."""
    rows: list[Any] = []
    for line in output.splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        rows.extend(parsed if isinstance(parsed, list) else [parsed])
    return [row for row in rows if isinstance(row, dict)]


async def _dead_letter_seen(database_url: str, event_id: str, after: datetime) -> bool:
    rows = await fetch(
        database_url,
        "select 1 from recon.dead_letters where event_id = $1 and replayed_at is null and last_seen_at > $2",
        event_id,
        after,
    )
    return bool(rows)


async def test_a_poison_event_is_listed_and_a_failing_replay_comes_back(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end with `recon run`: a webhook the rules cannot apply is dead-lettered and listed;
    replayed, it gets fresh attempts, fails again and is listed again, never lost."""
    charge_id = unique_id("ch")
    event = refund_event("refund.created", refund(charge_id=charge_id, amount=300))
    event["data"]["object"]["amount"] = "three hundred"  # the rules cannot book this
    con = await asyncpg.connect(settings.database_url)
    try:
        await add_order_with_payment(con, unique_id("ORD"), charge_id, amount=1000)
    finally:
        await con.close()
    started = datetime.now(UTC)
    async with running("run", settings) as base_url, aiohttp.ClientSession() as http:
        assert (await post_event(http, base_url, event))[0] == 200
        await wait_until(
            lambda: _dead_letter_seen(settings.database_url, str(event["id"]), started), what="dead letter"
        )
        assert await deadletters.list_dead_letters(settings, as_json=True) == 0
        # The in-process server logs to the same stdout: keep only the listing's lines.
        [listed] = [row for row in _json_lines(capsys.readouterr().out) if "last_seen_at" in row]
        assert listed["event_id"] == event["id"] and listed["last_error"]

        replayed_at = datetime.now(UTC)
        assert await deadletters.replay(settings, [], replay_all=True) == 0
        await wait_until(
            lambda: _dead_letter_seen(settings.database_url, str(event["id"]), replayed_at),
            what="the replayed event dead-lettered again",
        )
    rows = await fetch(
        settings.database_url, "select count(*) as n from finance.ledger where kind = 'refund'"
    )
    assert rows[0]["n"] == 0


async def test_a_replay_the_broker_does_not_confirm_stays_waiting(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 1 with one line; confirmed letters are marked replayed, the unconfirmed one stays listed."""
    good, refused = _refund_event("ch_ok", 100), _refund_event("ch_nack", 200)
    for event in (good, refused):
        await _store_dead_letter(settings.database_url, event, error="poison")
    real_session = replay_work.publisher_session

    class NackingPublisher:
        def __init__(self, real: Publisher) -> None:
            self._real = real

        async def publish_to_queue(self, message: aio_pika.Message, queue_name: str) -> None:
            if message.message_id == refused["id"]:
                raise PublishFailed("broker answered Nack")
            await self._real.publish_to_queue(message, queue_name)

    @asynccontextmanager
    async def nacking_session(s: Settings) -> AsyncIterator[NackingPublisher]:
        async with real_session(s) as publisher:
            yield NackingPublisher(publisher)

    monkeypatch.setattr(replay_work, "publisher_session", nacking_session)

    assert await deadletters.replay(settings, [], replay_all=True) == 1

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(refused["id"]) in err and str(good["id"]) not in err
    assert [m.message_id for m in await drain_work_queue(settings.amqp_url)] == [good["id"]]
    waiting = await fetch(
        settings.database_url, "select event_id from recon.dead_letters where replayed_at is null"
    )
    assert [r["event_id"] for r in waiting] == [refused["id"]]


class _DeadDelivery:
    """Just what dead_letter_from reads of a delivery from recon.dead-letters."""

    def __init__(self, body: bytes, headers: dict[str, Any]) -> None:
        self.body, self.headers = body, headers
        self.message_id, self.type = "evt_from_props", "refund.created"


@pytest.mark.parametrize(
    ("headers", "error", "attempts"),
    [
        (
            {topology.HEADER_ERROR: b"KeyError: 'amount'", topology.HEADER_FAILURES: 3},
            "KeyError: 'amount'",
            3,
        ),
        ({"x-death": [{"reason": b"delivery_limit"}]}, "delivery limit reached", 9),
        ({"x-death": [{"reason": 7}]}, "delivery limit reached", 9),  # unreadable: as a crash loop
        ({}, "delivery limit reached", 9),
        (
            {"x-death": [{"reason": "expired"}], topology.HEADER_ATTEMPT: 2},
            "dead-lettered by RabbitMQ: expired",
            2,
        ),
        ({"x-death": [{"reason": b"rejected"}]}, "dead-lettered by RabbitMQ: rejected", 1),
    ],
)
def test_a_dead_letter_says_who_gave_up_and_why(headers: dict[str, Any], error: str, attempts: int) -> None:
    """The worker's own error header wins (bytes or text); else RabbitMQ's x-death reason: a
    delivery limit (or none readable) is a crash loop counted at the limit + 1, any other reason is
    named as RabbitMQ's; a body that is not an event takes its identity from the properties."""
    from worker.consume.dead_letter_drain import dead_letter_from

    dead = dead_letter_from(_DeadDelivery(b"not json", headers), 8)  # type: ignore[arg-type]
    assert dead.error.startswith(error) and dead.attempts == attempts
    assert (dead.event_id, dead.event_type, dead.created, dead.object_id) == (
        "evt_from_props",
        "refund.created",
        None,
        None,
    )
