"""Recording a message that reached the dead-letter queue (rule 8)."""

from __future__ import annotations

import json
from datetime import datetime

import asyncpg

from handlers import DeadLetter
from handlers.audit import audit
from handlers.finance_exceptions import raise_exception
from handlers.inbox import EFFECT_FINAL
from handlers.payloads import stripe_id, timestamp

_KEEP_BODY = """
insert into recon.dead_letters
    (event_id, event_type, body, last_error, attempts, first_seen_at)
values ($1, $2, $3, $4, $5, $6)
on conflict (event_id) do update
    set event_type = excluded.event_type, body = excluded.body, last_error = excluded.last_error,
        attempts = greatest(recon.dead_letters.attempts, excluded.attempts),
        first_seen_at = least(recon.dead_letters.first_seen_at, excluded.first_seen_at),
        last_seen_at = now(), replayed_at = null
"""

# Returns the outcome the inbox had before (null for a new row). An event whose effect is already
# final keeps its outcome: a late dead-lettering of it (a crash loop after commit) lost nothing.
_MARK_INBOX = """
with old as (
    select outcome from recon.event_inbox where event_id = $1 for update
), marked as (
    insert into recon.event_inbox as i
        (event_id, type, created, first_seen_at, processed_at, outcome, attempts, last_error)
    values ($1, $2, $3, $4, now(), 'dead_lettered', $5, $6)
    on conflict (event_id) do update
        set outcome = 'dead_lettered', processed_at = now(), last_error = excluded.last_error,
            attempts = greatest(i.attempts, excluded.attempts),
            first_seen_at = least(i.first_seen_at, excluded.first_seen_at)
        where i.outcome <> all($7::text[])
)
select (select outcome from old) as prior_outcome
"""


def _body_facts(dead: DeadLetter) -> tuple[datetime, str | None]:
    """The event's created time and object id; for a body that is not even an event, when it was
    first seen and no object."""
    try:
        event = json.loads(dead.body)
        return timestamp(int(event["created"])), stripe_id(event["data"]["object"].get("id"))
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        return dead.first_seen_at, None


async def record_dead_letter(con: asyncpg.Connection, dead: DeadLetter) -> None:
    """Keep the raw body for replay; mark the inbox; raise a dead_lettered exception and audit it."""
    await con.execute(
        _KEEP_BODY, dead.event_id, dead.event_type, dead.body, dead.error, dead.attempts,
        dead.first_seen_at,
    )
    created, object_id = _body_facts(dead)
    prior = await con.fetchval(
        _MARK_INBOX, dead.event_id, dead.event_type, created, dead.first_seen_at,
        dead.attempts, dead.error, list(EFFECT_FINAL),
    )
    if prior in EFFECT_FINAL or prior == "dead_lettered":
        return  # already final, or already counted as dead-lettered: no second exception
    detail = {"event_type": dead.event_type, "error": dead.error, "attempts": dead.attempts}
    await raise_exception(
        con, "dead_lettered", event_id=dead.event_id, object_id=object_id, detail=detail
    )
    await audit(
        con, "event_dead_lettered", event_id=dead.event_id, object_id=object_id, detail=detail
    )
