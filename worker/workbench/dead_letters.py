"""Dead-lettered events: the ones waiting, and their replay.

The consumer drains RabbitMQ's dead-letter queue into ``recon.dead_letters`` (raw body, last
error, attempts) and raises a ``dead_lettered`` exception. Replay re-publishes the stored raw
body to the work queue as a brand-new delivery (attempt 1, first seen now) and marks the row
replayed; the handlers resolve the exception once the event applies. An event that already
applied is a harmless duplicate: the inbox skips it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from worker.amqp import topology
from worker.amqp.publisher import Outgoing, PublishFailed, event_message, publisher_session
from worker.settings import Settings

_PENDING_SQL = """
select event_id, event_type, attempts, last_error, first_seen_at, last_seen_at
from recon.dead_letters
where replayed_at is null
order by first_seen_at, event_id
limit $1
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


class NotDeadLettered(LookupError):
    def __init__(self, event_ids: list[str]) -> None:
        super().__init__(f"not a dead-lettered event: {', '.join(event_ids)}")
        self.event_ids = event_ids


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    letters: list[StoredDeadLetter]
    confirmed: list[str]  # event ids the broker confirmed, now marked replayed
    unconfirmed: dict[str, str] = field(default_factory=dict)  # event id -> the broker's answer


async def pending(con: asyncpg.Connection, limit: int | None = None) -> list[asyncpg.Record]:
    """The dead letters not yet replayed, oldest first."""
    return list(await con.fetch(_PENDING_SQL, limit))


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


async def _publish_all(
    settings: Settings, letters: list[StoredDeadLetter]
) -> tuple[list[str], dict[str, str]]:
    """Publish every letter (confirmed); the ids the broker confirmed, and why the others were not."""
    async with publisher_session(settings) as publisher:

        async def one(letter: StoredDeadLetter) -> str:
            await publisher.publish_to_queue(replay_message(letter), topology.WORK_QUEUE)
            return letter.event_id

        results = await asyncio.gather(*(one(letter) for letter in letters), return_exceptions=True)
    confirmed: list[str] = []
    unconfirmed: dict[str, str] = {}
    for letter, result in zip(letters, results, strict=True):
        if isinstance(result, PublishFailed):
            unconfirmed[letter.event_id] = str(result)
        elif isinstance(result, BaseException):
            raise result
        else:
            confirmed.append(result)
    return confirmed, unconfirmed


async def _lock_letters(
    con: asyncpg.Connection, event_ids: list[str], replay_all: bool
) -> list[StoredDeadLetter]:
    rows = await (con.fetch(_LOCK_PENDING_SQL) if replay_all else con.fetch(_LOCK_BY_ID_SQL, event_ids))
    return [StoredDeadLetter(r["event_id"], r["event_type"], bytes(r["body"])) for r in rows]


async def replay(
    con: asyncpg.Connection, settings: Settings, event_ids: list[str], *, replay_all: bool
) -> ReplayOutcome:
    """Re-queue the named dead letters (or every one not yet replayed); raises NotDeadLettered
    (nothing done) for an unknown id."""
    async with con.transaction():
        letters = await _lock_letters(con, event_ids, replay_all)
        unknown = sorted(set(event_ids) - {letter.event_id for letter in letters})
        if unknown:
            raise NotDeadLettered(unknown)
        confirmed, unconfirmed = await _publish_all(settings, letters) if letters else ([], {})
        await con.execute(_MARK_REPLAYED_SQL, confirmed)
    return ReplayOutcome(letters, confirmed, unconfirmed)
