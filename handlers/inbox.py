"""The event inbox: one row per event id, claimed first thing in the event's transaction (rule 2)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from handlers.event import AppliedEvent
from handlers.matching import PAYMENT_LOCK, Payment

# Outcomes after which the event's effect is complete: a later delivery is a duplicate.
# `dead_lettered` is final for the broker but not for the effect: a replay applies the event.
EFFECT_FINAL = frozenset({"applied", "duplicate", "stale", "unmatched", "mismatch"})

# The insert takes the row lock on conflict too, so two deliveries of one event serialize here and
# the second sees the first one's outcome. The placeholder outcome 'retrying' is only ever seen by
# others if the transaction commits that way.
#
# One round trip claims the inbox row and locks the matching payment (a duplicate locks it too,
# harmlessly: the lock is released with the transaction and a duplicate does nothing else).
# Composed from constants only (no input reaches the text): the lock is matching.PAYMENT_LOCK.
_CLAIM_AND_LOCK = f"""
with claimed as (
    insert into recon.event_inbox as i (event_id, type, created, first_seen_at, outcome, attempts)
    values ($3, $4, $5, $6, 'retrying', 1)
    on conflict (event_id) do update
        set attempts = i.attempts + case when i.outcome = any($7::text[]) then 0 else 1 end,
            first_seen_at = least(i.first_seen_at, excluded.first_seen_at)
    returning outcome, first_seen_at, (xmax = 0) as inserted
), payment as (
{PAYMENT_LOCK})
select c.outcome as inbox_outcome, c.first_seen_at as inbox_first_seen_at,
       c.inserted as inbox_inserted, payment.*
from claimed c left join payment on true
"""  # noqa: S608




@dataclass(frozen=True, slots=True)
class Claim:
    prior_outcome: str | None  # None when this delivery created the row
    first_seen_at: datetime

    @property
    def already_final(self) -> bool:
        return self.prior_outcome in EFFECT_FINAL


async def claim_and_lock(
    con: asyncpg.Connection, applied: AppliedEvent
) -> tuple[Claim, Payment | None]:
    """Upsert the inbox row and lock the payment the event's charge matches (if any)."""
    row = await con.fetchrow(
        _CLAIM_AND_LOCK,
        applied.ref.charge_id,
        applied.ref.payment_intent_id,
        applied.event_id,
        applied.type,
        applied.created,
        applied.delivery.first_seen_at,
        list(EFFECT_FINAL),
    )
    assert row is not None
    claim = Claim(
        None if row["inbox_inserted"] else row["inbox_outcome"], row["inbox_first_seen_at"]
    )
    return claim, Payment.from_record(row) if row["id"] is not None else None


