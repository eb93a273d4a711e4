"""Audit rows (rule 9): one per change, each action named for the change it records."""

from __future__ import annotations

from typing import Any, Literal

import asyncpg
import orjson

AuditAction = Literal[
    "stripe_refund_recorded",
    "stripe_refund_reversed",
    "dispute_opened",
    "dispute_funds_withdrawn",
    "dispute_funds_reinstated",
    "dispute_closed",
    "status_changed",
    "event_unmatched",
    "event_dead_lettered",
    "capture_adjusted",
    "refund_requested",
    "refund_submitted",
    "refund_request_failed",
    "order_rejected",
    "exception_resolved",
    "exception_retried",
]

_AUDIT = """
insert into recon.audit_log (action, stripe_event_id, stripe_object_id, payment_id, detail)
values ($1, $2, $3, $4, $5::jsonb)
"""


async def audit(
    con: asyncpg.Connection,
    action: AuditAction,
    *,
    event_id: str | None,
    object_id: str | None,
    payment_id: int | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    await con.execute(_AUDIT, action, event_id, object_id, payment_id, orjson.dumps(detail or {}).decode())
