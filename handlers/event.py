"""The event being applied: its envelope fields, what the runtime handed over, and its batch."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from handlers.batch import Batch
from handlers.interface import EventToApply, Policy
from handlers.payloads import ChargeRef, charge_ref, stripe_id, timestamp

StepOutcome = Literal["applied", "retrying", "mismatch"]


@dataclass(slots=True)
class AppliedEvent:
    incoming: EventToApply
    policy: Policy
    batch: Batch  # the transaction's locked payments and end-of-batch writes
    event_id: str
    type: str
    created: datetime
    obj: dict[str, Any]
    ref: ChargeRef
    first_seen_at: datetime  # the inbox's earliest first_seen_at once claimed

    @classmethod
    def from_incoming(cls, incoming: EventToApply, policy: Policy, batch: Batch) -> AppliedEvent:
        event = incoming.event
        return cls(
            incoming=incoming,
            policy=policy,
            batch=batch,
            event_id=str(event["id"]),
            type=str(event["type"]),
            created=timestamp(int(event["created"])),
            obj=event["data"]["object"],
            ref=charge_ref(event),
            first_seen_at=incoming.first_seen_at,
        )

    @property
    def object_id(self) -> str | None:
        return stripe_id(self.obj.get("id"))

    @property
    def may_retry(self) -> bool:
        """True while "not yet" may still become "yes": first seen less than the policy's window ago."""
        return self.policy.may_still_wait(self.first_seen_at)


@dataclass(frozen=True, slots=True)
class Step:
    """What an event-family handler concluded, and whether it changed anything it wrote.

    ``changed`` is returned, never set on a shared object: an event whose steps all say False
    (and that moved no status) is ``stale``.
    """

    outcome: StepOutcome = "applied"
    changed: bool = False
    retry_reason: Literal["refunds_short", "refund_failure_undated"] | None = None


# What an event-family handler returns when it has planned its statements (pipeline.py): run, after
# the pipeline, in delivery order, to read the rows and conclude.
Then = Callable[[asyncpg.Connection], Awaitable[Step]]
