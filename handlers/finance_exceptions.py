"""Exceptions finance must look at (finance.exceptions): raised, never silently dropped."""

from __future__ import annotations

from typing import Any, Literal

import asyncpg
import orjson

ExceptionKind = Literal[
    "unmatched_charge",
    "refund_mismatch",
    "over_refund",
    "currency_mismatch",
    "dead_lettered",
    "refund_failed",
    "drift",
    "payout_difference",
]

# An open exception is raised once per cause (kind, event, object): the partial unique index
# exceptions_open_once (schema/0004) makes a second raise of the same cause a no-op.
_RAISE = """
insert into recon.exceptions (kind, stripe_event_id, stripe_object_id, detail)
values ($1, $2, $3, $4::jsonb)
on conflict (kind, coalesce(stripe_event_id, ''), coalesce(stripe_object_id, ''))
    where resolved_at is null do nothing
"""


async def raise_exception(
    con: asyncpg.Connection,
    kind: ExceptionKind,
    *,
    event_id: str | None,
    object_id: str | None,
    detail: dict[str, Any],
) -> None:
    await con.execute(_RAISE, kind, event_id, object_id, orjson.dumps(detail).decode())
