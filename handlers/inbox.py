"""The event inbox: one row per event id, claimed first thing in the event's transaction (rule 2)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from handlers import Outcome
from handlers.event import AppliedEvent

# Outcomes after which the event's effect is complete: a later delivery is a duplicate.
# `dead_lettered` is final for the broker but not for the effect: a replay applies the event.
EFFECT_FINAL = frozenset({"applied", "duplicate", "stale", "unmatched", "mismatch"})

# The insert takes the row lock on conflict too, so two deliveries of one event serialize here and
# the second sees the first one's outcome. The placeholder outcome 'retrying' is only ever seen by
# others if the transaction commits that way.
_CLAIM = """
insert into recon.event_inbox as i (event_id, type, created, first_seen_at, outcome, attempts)
values ($1, $2, $3, $4, 'retrying', 1)
on conflict (event_id) do update
    set attempts = i.attempts + case when i.outcome = any($5::text[]) then 0 else 1 end,
        first_seen_at = least(i.first_seen_at, excluded.first_seen_at)
returning outcome, first_seen_at, (xmax = 0) as inserted
"""

# Sets the outcome; a final one also resolves the event's open dead_lettered exception (a replay).
_SETTLE = """
with settled as (
    update recon.event_inbox
    set outcome = $2,
        processed_at = case when $2 = 'retrying' then null else now() end
    where event_id = $1
)
update recon.exceptions set resolved_at = now()
where $2 <> 'retrying' and kind = 'dead_lettered' and stripe_event_id = $1 and resolved_at is null
"""


@dataclass(frozen=True, slots=True)
class Claim:
    prior_outcome: str | None  # None when this delivery created the row
    first_seen_at: datetime

    @property
    def already_final(self) -> bool:
        return self.prior_outcome in EFFECT_FINAL


async def claim(con: asyncpg.Connection, applied: AppliedEvent) -> Claim:
    row = await con.fetchrow(
        _CLAIM,
        applied.event_id,
        applied.type,
        applied.created,
        applied.delivery.first_seen_at,
        list(EFFECT_FINAL),
    )
    assert row is not None
    return Claim(None if row["inserted"] else row["outcome"], row["first_seen_at"])


async def settle(con: asyncpg.Connection, event_id: str, outcome: Outcome) -> None:
    await con.execute(_SETTLE, event_id, outcome)
