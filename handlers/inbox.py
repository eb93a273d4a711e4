"""The event inbox: one row per event id, claimed first thing in the event's transaction (rule 2)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from handlers.event import AppliedEvent

# Outcomes after which the event's effect is complete: a later delivery is a duplicate.
# `dead_lettered` is final for the broker but not for the effect: a replay applies the event.
EFFECT_FINAL = frozenset({"applied", "duplicate", "stale", "unmatched", "mismatch"})

# One round trip claims the inbox rows of a batch's events (each event id at most once). The
# insert takes the row lock on conflict too, so two deliveries of one event serialize here and the
# second sees the first one's outcome; rows are claimed in event id order, so two batches sharing
# events wait for each other instead of deadlocking. The placeholder outcome 'retrying' is only
# ever seen by others if the transaction commits that way.
_CLAIM = """
insert into recon.event_inbox as i (event_id, type, created, first_seen_at, outcome, attempts)
select e.event_id, e.type, e.created, e.first_seen_at, 'retrying', 1
from unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[])
     as e(event_id, type, created, first_seen_at)
order by e.event_id
on conflict (event_id) do update
    set attempts = i.attempts + case when i.outcome = any($5::text[]) then 0 else 1 end,
        first_seen_at = least(i.first_seen_at, excluded.first_seen_at)
returning i.event_id, i.outcome, i.first_seen_at, (i.xmax = 0) as inserted
"""

_EFFECT_FINAL = sorted(EFFECT_FINAL)


@dataclass(frozen=True, slots=True)
class Claim:
    prior_outcome: str | None  # None when this delivery created the row
    first_seen_at: datetime

    @property
    def already_final(self) -> bool:
        return self.prior_outcome in EFFECT_FINAL


async def claim(con: asyncpg.Connection, events: Sequence[AppliedEvent]) -> dict[str, Claim]:
    """Upsert the inbox rows of ``events`` (distinct ids): event id -> what the inbox said."""
    rows = await con.fetch(
        _CLAIM,
        [e.event_id for e in events],
        [e.type for e in events],
        [e.created for e in events],
        [e.incoming.first_seen_at for e in events],
        _EFFECT_FINAL,
    )
    return {
        row["event_id"]: Claim(None if row["inserted"] else row["outcome"], row["first_seen_at"])
        for row in rows
    }
