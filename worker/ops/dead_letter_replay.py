"""``recon dead-letters list|replay``: inspect dead-lettered events and re-queue them.

The consumer drains RabbitMQ's dead-letter queue into ``recon.dead_letters`` (raw body, last
error, attempts) and raises a ``dead_lettered`` exception. Replay re-publishes the stored raw
body to the work queue as a brand-new delivery (attempt 1, first seen now) and marks the row
replayed; the handlers resolve the exception once the event applies. An event that already
applied is a harmless duplicate: the inbox skips it.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from worker.amqp import topology
from worker.amqp.publisher import Outgoing, PublishFailed, event_message, publisher_session
from worker.ops.text_table import render_table
from worker.settings import Settings

EXIT_USAGE = 2
ERROR_CELL_CHARS = 60

_PENDING_SQL = """
select event_id, event_type, attempts, last_error, first_seen_at, last_seen_at
from recon.dead_letters
where replayed_at is null
order by first_seen_at, event_id
"""

# Rows stay locked until replayed_at is committed: a second replay run waits instead of
# publishing the same bodies again, and a fresh dead-lettering of a replayed event (which
# updates the row) lands after our update, not under it.
_LOCK_BY_ID_SQL = """
select event_id, event_type, body from recon.dead_letters
where event_id = any($1::text[]) order by event_id for update
"""
_LOCK_PENDING_SQL = """
select event_id, event_type, body from recon.dead_letters
where replayed_at is null order by first_seen_at, event_id for update
"""
_MARK_REPLAYED_SQL = "update recon.dead_letters set replayed_at = now() where event_id = any($1::text[])"


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    event_id: str
    event_type: str
    body: bytes


def _iso(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment else ""


def _one_line(error: str | None) -> str:
    text = " ".join((error or "").split())
    return text if len(text) <= ERROR_CELL_CHARS else text[: ERROR_CELL_CHARS - 1] + "…"


def _as_dict(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "event_id": row["event_id"],
        "event_type": row["event_type"],
        "attempts": row["attempts"],
        "last_error": row["last_error"],
        "first_seen_at": _iso(row["first_seen_at"]),
        "last_seen_at": _iso(row["last_seen_at"]),
    }


def _as_table(rows: list[asyncpg.Record]) -> str:
    headers = ("EVENT ID", "TYPE", "ATTEMPTS", "LAST ERROR", "FIRST SEEN", "LAST SEEN")
    cells = [
        (
            r["event_id"],
            r["event_type"],
            str(r["attempts"]),
            _one_line(r["last_error"]),
            _iso(r["first_seen_at"]),
            _iso(r["last_seen_at"]),
        )
        for r in rows
    ]
    return render_table(headers, cells, right_aligned=(False, False, True))


async def list_dead_letters(settings: Settings, *, as_json: bool) -> int:
    """Print the dead letters not yet replayed: a table, or one JSON array (``[]`` when none)."""
    con = await asyncpg.connect(settings.database_url)
    try:
        rows = await con.fetch(_PENDING_SQL)
    finally:
        await con.close()
    if as_json:
        print(json.dumps([_as_dict(row) for row in rows]))
    elif rows:
        print(_as_table(rows))
    else:
        print("no dead-lettered events waiting for replay")
    return 0


def _created_of(body: bytes) -> int:
    """The event's ``created`` for the message header; the receiver only queues valid envelopes."""
    try:
        created: Any = json.loads(body).get("created")
    except (ValueError, AttributeError):
        return 0
    return created if isinstance(created, int) else 0


def replay_message(letter: StoredDeadLetter) -> Outgoing:
    """The stored raw body as a fresh delivery: attempt 1, no failures, first seen now."""
    return event_message(
        letter.body,
        letter.event_id,
        letter.event_type,
        _created_of(letter.body),
        headers={topology.HEADER_ATTEMPT: 1, topology.HEADER_FAILURES: 0},
    )


async def _publish_all(settings: Settings, letters: list[StoredDeadLetter]) -> list[str]:
    """Publish every letter (confirmed); returns the ids the broker confirmed."""
    async with publisher_session(settings) as publisher:

        async def one(letter: StoredDeadLetter) -> str:
            await publisher.publish_to_queue(replay_message(letter), topology.WORK_QUEUE)
            return letter.event_id

        results = await asyncio.gather(*(one(letter) for letter in letters), return_exceptions=True)
    confirmed: list[str] = []
    failed: dict[str, PublishFailed] = {}
    for letter, result in zip(letters, results, strict=True):
        if isinstance(result, PublishFailed):
            failed[letter.event_id] = result
        elif isinstance(result, BaseException):
            raise result
        else:
            confirmed.append(result)
    if failed:
        reason = next(iter(failed.values()))
        ids = ", ".join(failed)
        print(
            f"recon: error: broker did not confirm {len(failed)} ({reason}), not re-queued: {ids}",
            file=sys.stderr,
        )
    return confirmed


async def _lock_letters(
    con: asyncpg.Connection, event_ids: list[str], replay_all: bool
) -> list[StoredDeadLetter]:
    rows = await (con.fetch(_LOCK_PENDING_SQL) if replay_all else con.fetch(_LOCK_BY_ID_SQL, event_ids))
    return [StoredDeadLetter(r["event_id"], r["event_type"], bytes(r["body"])) for r in rows]


async def replay(settings: Settings, event_ids: list[str], *, replay_all: bool) -> int:
    """Re-queue the named dead letters (or every one not yet replayed); exit 2 on an unknown id."""
    con = await asyncpg.connect(settings.database_url)
    try:
        async with con.transaction():
            letters = await _lock_letters(con, event_ids, replay_all)
            unknown = sorted(set(event_ids) - {letter.event_id for letter in letters})
            if unknown:
                print(f"recon: error: not a dead-lettered event: {', '.join(unknown)}", file=sys.stderr)
                return EXIT_USAGE
            confirmed = await _publish_all(settings, letters) if letters else []
            await con.execute(_MARK_REPLAYED_SQL, confirmed)
    finally:
        await con.close()
    for letter in letters:
        if letter.event_id in confirmed:
            print(f"replayed {letter.event_id} ({letter.event_type})")
    print(f"{len(confirmed)} of {len(letters)} dead-lettered events re-queued")
    return 0 if len(confirmed) == len(letters) else 1
