"""Recording, in the database, a message that reached the dead-letter queue.

The runtime's drain (worker/consume/dead_letter_drain.py) takes it off the queue and hands it over
as a ``DeadLetter``; ``recon dead-letters replay`` (worker/ops/dead_letter_replay.py) re-queues
what is kept here.
"""

from __future__ import annotations

import asyncpg

from handlers.audit import audit
from handlers.finance_exceptions import raise_exception
from handlers.inbox import EFFECT_FINAL
from handlers.interface import DeadLetter

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


async def record_dead_letter(con: asyncpg.Connection, dead: DeadLetter) -> None:
    """Keep the raw body for replay; mark the inbox; raise a dead_lettered exception and audit it."""
    await con.execute(
        _KEEP_BODY,
        dead.event_id,
        dead.event_type,
        dead.body,
        dead.error,
        dead.attempts,
        dead.first_seen_at,
    )
    # A body that is not even an event is dated when it was first seen, and has no object.
    created, object_id = dead.created or dead.first_seen_at, dead.object_id
    prior = await con.fetchval(
        _MARK_INBOX,
        dead.event_id,
        dead.event_type,
        created,
        dead.first_seen_at,
        dead.attempts,
        dead.error,
        list(EFFECT_FINAL),
    )
    if prior in EFFECT_FINAL or prior == "dead_lettered":
        return  # already final, or already counted as dead-lettered: no second exception
    detail = {"event_type": dead.event_type, "error": dead.error, "attempts": dead.attempts}
    await raise_exception(con, "dead_lettered", event_id=dead.event_id, object_id=object_id, detail=detail)
    await audit(con, "event_dead_lettered", event_id=dead.event_id, object_id=object_id, detail=detail)
