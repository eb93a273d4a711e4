"""Exceptions worked through: listed, resolved with a note, or retried.

Exceptions are raised by the rules (unmatched charges, refund mismatches, over-refunds, failed
refunds, dead letters, drift, payout differences) and stay open until someone resolves them with a
note, or, for an ``unmatched_charge`` or ``refund_mismatch``, until a retried event applies.

A retry re-publishes the event's stored raw body as a fresh delivery. The inbox row is reset to
``retrying`` with a new first-seen time *and committed* before the publish: a worker that picks
the message up at once must find the event not yet final, and must count the waiting window from
now. If the broker then refuses the message, the inbox row is put back as it was.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from worker.amqp import topology
from worker.amqp.publisher import PublishFailed, event_message, publisher_session
from worker.settings import Settings

KINDS = (
    "unmatched_charge",
    "refund_mismatch",
    "over_refund",
    "currency_mismatch",
    "dead_lettered",
    "refund_failed",
    "drift",
    "payout_difference",
)
RETRYABLE = ("unmatched_charge", "refund_mismatch")

_LIST_SQL = """
select id, raised_at, kind, stripe_event_id, stripe_object_id, detail, resolved_at, resolved_by,
       resolution_note
from recon.exceptions
where ($1::boolean is false or resolved_at is null) and ($2::text is null or kind = $2)
order by raised_at desc, id desc
limit $3
"""

# Resolving writes one audit row per exception it closed; ids already resolved are left as they are.
_RESOLVE_SQL = """
with closed as (
    update recon.exceptions
    set resolved_at = now(), resolved_by = $2, resolution_note = $3
    where id = any($1::bigint[]) and resolved_at is null
    returning id, kind, stripe_event_id, stripe_object_id
), audited as (
    insert into recon.audit_log (action, stripe_event_id, stripe_object_id, detail)
    select 'exception_resolved', c.stripe_event_id, c.stripe_object_id,
           jsonb_build_object('exception_id', c.id, 'kind', c.kind, 'by', $2::text)
    from closed c
)
select id from closed
"""

_LOCK_FOR_RETRY_SQL = """
select e.id, e.kind, e.stripe_event_id, e.resolved_at, i.type, i.created, i.outcome,
       i.first_seen_at, i.processed_at, b.body
from recon.exceptions e
left join recon.event_inbox i on i.event_id = e.stripe_event_id
left join recon.event_bodies b on b.event_id = e.stripe_event_id
where e.id = any($1::bigint[])
order by e.id
for update of e
"""

# A fresh waiting window: the claim keeps the earliest first_seen_at it has seen, so it is reset here.
_RESET_INBOX_SQL = """
update recon.event_inbox
set outcome = 'retrying', processed_at = null, first_seen_at = now(), attempts = 0
where event_id = $1
"""
_AUDIT_RETRY_SQL = """
insert into recon.audit_log (action, stripe_event_id, detail)
values ('exception_retried', $1, jsonb_build_object('exception_id', $2::bigint, 'kind', $3::text))
"""
_RESTORE_INBOX_SQL = """
update recon.event_inbox
set outcome = $2, first_seen_at = $3, processed_at = $4
where event_id = $1 and outcome = 'retrying'
"""


class UnknownKind(ValueError):
    """A kind that is not one of KINDS."""


class NoteRequired(ValueError):
    """Resolving needs a note that says why."""


class UnknownExceptions(LookupError):
    def __init__(self, ids: Sequence[int]) -> None:
        super().__init__(f"no such exception: {', '.join(map(str, ids))}")
        self.ids = list(ids)


class RetryRefused(ValueError):
    """Nothing was retried: an id is unknown or its exception cannot be retried (the reason says which)."""


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment else None


def _detail(raw: Any) -> dict[str, Any]:
    # asyncpg returns jsonb as text unless a codec is set; these functions use plain connections.
    return json.loads(raw) if isinstance(raw, str) else dict(raw or {})


def as_dict(row: asyncpg.Record) -> dict[str, Any]:
    """One exception as the commands print it: times as ISO text, detail as a dict."""
    return {
        "id": row["id"],
        "raised_at": _iso(row["raised_at"]),
        "kind": row["kind"],
        "stripe_event_id": row["stripe_event_id"],
        "stripe_object_id": row["stripe_object_id"],
        "detail": _detail(row["detail"]),
        "resolved_at": _iso(row["resolved_at"]),
        "resolved_by": row["resolved_by"],
        "resolution_note": row["resolution_note"],
    }


async def list_exceptions(
    con: asyncpg.Connection, *, open_only: bool, kind: str | None, limit: int | None = None
) -> list[asyncpg.Record]:
    """Exceptions, newest first; raises UnknownKind."""
    if kind is not None and kind not in KINDS:
        raise UnknownKind(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return list(await con.fetch(_LIST_SQL, open_only, kind, limit))


async def resolve(con: asyncpg.Connection, ids: Sequence[int], *, note: str, by: str) -> set[int]:
    """Resolve the named exceptions with a note, all or none; returns the ids this call closed (the
    others were resolved before). Raises NoteRequired or UnknownExceptions (nothing done)."""
    if not note.strip():
        raise NoteRequired("a note must say why the exceptions are resolved")
    async with con.transaction():
        known = {r["id"] for r in await con.fetch("select id from recon.exceptions where id = any($1)", ids)}
        unknown = sorted(set(ids) - known)
        if unknown:
            raise UnknownExceptions(unknown)
        return {r["id"] for r in await con.fetch(_RESOLVE_SQL, list(ids), by, note.strip())}


@dataclass(frozen=True, slots=True)
class Retried:
    exception_id: int
    kind: str
    event_id: str
    event_type: str
    created: int
    body: bytes
    # The inbox row as it was, to put back if the broker refuses the message.
    outcome: str
    first_seen_at: datetime | None
    processed_at: datetime | None


@dataclass(frozen=True, slots=True)
class RetryOutcome:
    queued: list[Retried]
    refused: list[Retried]  # the broker did not take these; their inbox rows are restored


def _why_not_retryable(row: asyncpg.Record) -> str | None:
    if row["kind"] not in RETRYABLE:
        return f"is {row['kind']}: only {' and '.join(RETRYABLE)} can be retried"
    if row["resolved_at"] is not None:
        return "is already resolved"
    if row["body"] is None or row["type"] is None:
        return "has no stored event body (raised before bodies were kept): use recon backfill"
    return None


async def _reset_for_retry(con: asyncpg.Connection, ids: Sequence[int]) -> list[Retried]:
    """Lock the exceptions, reset their events' inbox rows and audit; raises RetryRefused."""
    rows = await con.fetch(_LOCK_FOR_RETRY_SQL, list(ids))
    unknown = sorted(set(ids) - {r["id"] for r in rows})
    if unknown:
        raise RetryRefused(f"no such exception: {', '.join(map(str, unknown))}")
    refusals = [f"exception {r['id']} {why}" for r in rows if (why := _why_not_retryable(r))]
    if refusals:
        raise RetryRefused("; ".join(refusals))
    retries = [
        Retried(
            r["id"],
            r["kind"],
            r["stripe_event_id"],
            r["type"],
            int(r["created"].timestamp()),
            bytes(r["body"]),
            r["outcome"],
            r["first_seen_at"],
            r["processed_at"],
        )
        for r in rows
    ]
    for item in retries:
        await con.execute(_RESET_INBOX_SQL, item.event_id)
        await con.execute(_AUDIT_RETRY_SQL, item.event_id, item.exception_id, item.kind)
    return retries


async def retry(con: asyncpg.Connection, settings: Settings, ids: Sequence[int]) -> RetryOutcome:
    """Re-queue the events behind the named exceptions with a fresh waiting window.

    Raises RetryRefused (nothing done) when an id is unknown or not retryable. Messages the broker
    refused come back in ``refused``, their inbox rows restored and their exceptions open as they were.
    """
    async with con.transaction():
        reset = await _reset_for_retry(con, ids)
    try:
        refused = await _publish(settings, reset)
    except BaseException:
        # Broker unreachable: nothing was queued, so no event may be left looking in flight.
        await _restore(con, reset)
        raise
    await _restore(con, refused)
    return RetryOutcome([item for item in reset if item not in refused], refused)


async def _restore(con: asyncpg.Connection, items: list[Retried]) -> None:
    for item in items:
        await con.execute(
            _RESTORE_INBOX_SQL, item.event_id, item.outcome, item.first_seen_at, item.processed_at
        )


async def _publish(settings: Settings, retries: list[Retried]) -> list[Retried]:
    """Publish each event as a fresh delivery (attempt 1, first seen now); returns those refused."""
    refused: list[Retried] = []
    async with publisher_session(settings) as publisher:
        for item in retries:
            message = event_message(
                item.body,
                item.event_id,
                item.event_type,
                item.created,
                headers={topology.HEADER_ATTEMPT: 1, topology.HEADER_FAILURES: 0},
            )
            try:
                await publisher.publish_to_queue(message, topology.WORK_QUEUE)
            except PublishFailed:
                refused.append(item)
    return refused
