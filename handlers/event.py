"""The event being applied: its envelope fields, its delivery and what applying it has changed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import asyncpg

from handlers import Delivery, Policy
from handlers.payloads import ChargeRef, charge_ref, stripe_id, timestamp

if TYPE_CHECKING:
    from handlers.batch import Batch

StepOutcome = Literal["applied", "retrying", "mismatch"]


@dataclass(slots=True)
class AppliedEvent:
    delivery: Delivery
    policy: Policy
    batch: Batch  # the transaction's locked payments and end-of-batch writes
    event_id: str
    type: str
    created: datetime
    obj: dict[str, Any]
    ref: ChargeRef
    now: datetime
    first_seen_at: datetime  # the inbox's earliest first_seen_at once claimed
    # Set by any write that changed state; an event that changed nothing is "stale".
    changed: bool = False

    @classmethod
    def from_delivery(cls, delivery: Delivery, policy: Policy, batch: Batch) -> AppliedEvent:
        event = delivery.event
        return cls(
            delivery=delivery,
            policy=policy,
            batch=batch,
            event_id=str(event["id"]),
            type=str(event["type"]),
            created=timestamp(int(event["created"])),
            obj=event["data"]["object"],
            ref=charge_ref(event),
            now=datetime.now(UTC),
            first_seen_at=delivery.first_seen_at,
        )

    @property
    def object_id(self) -> str | None:
        return stripe_id(self.obj.get("id"))

    @property
    def may_retry(self) -> bool:
        """True while "not yet" may still become "yes": first seen less than the policy ago."""
        return self.now < self.first_seen_at + timedelta(seconds=self.policy.unmatched_retry_s)


@dataclass(frozen=True, slots=True)
class Step:
    """What an event-family handler concluded."""

    outcome: StepOutcome = "applied"
    retry_reason: Literal["refunds_short"] | None = None
    detail: dict[str, Any] = field(default_factory=dict)


# What an event-family handler returns when it has planned its statements (pipeline.py): run, after
# the pipeline, in delivery order, to read the rows and conclude.
Then = Callable[[asyncpg.Connection], Awaitable[Step]]
