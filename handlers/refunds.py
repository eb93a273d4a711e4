"""Refunds (rule 4): each re_… booked once whichever event reports it, reversed once if it fails.

A refund snapshot may come from refund.created|updated|failed, charge.refund.updated, the refund
list a charge.refunded embeds (API versions before 2022-11-15), or the refunds the runtime fetched
from the API for a charge.refunded. Its status is kept by (event created, lifecycle rank), so a
refund already known failed/canceled is never booked by an older snapshot, and whatever the
delivery order a refund that ends failed nets to zero.

A refund the back office asked for carries ``recon_refund_request_id`` in its metadata; every
snapshot of it is followed up (``recon.follow_refund``): the refund is linked to its request,
the request moves on (succeeded, or failed with Stripe's failure_reason), and the buyer's e-mail
is queued the first time the refund is booked — all in the event's transaction.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

import asyncpg

from handlers.charges import advance_snapshot, is_newest_snapshot
from handlers.event import AppliedEvent, Step, Then
from handlers.finance_exceptions import raise_exception
from handlers.matching import Payment
from handlers.payloads import (
    REFUND_STATUS_RANK,
    currency_of,
    embedded_refunds,
    expected_live_refunds,
    is_release,
    live_refund_total,
    stripe_id,
    timestamp,
)
from handlers.pipeline import Pipeline, Ticket

# One round trip per refund snapshot: save its status if this snapshot is newer by (created,
# rank) — a full tie keeps the stored one — then, by the status it has afterwards, book the refund
# (live) or its one reversal (failed/canceled, only if the refund was booked; it mirrors the refund
# row's amount and currency, and is dated when the refund failed, so days already reported keep
# their figures: booked by the refund's own event that shows the failure ($13), at the earlier of
# its created and the stored status's — or, once the waiting window is over ($14), by a carried
# snapshot, which cannot tell when the failure happened and so dates it at its own). The snapshot that first
# saves a refund as failed raises one refund_failed exception with Stripe's failure_reason: the
# customer was not paid back — in any delivery order, whether or not the refund had been booked.
# Releases ($6) book nothing. Audit rows for all of it.
_APPLY_REFUND = """
with old as (
    select status, status_created from recon.refunds where id = $1
), saved as (
    insert into recon.refunds as r
        (id, payment_id, amount, currency, reason, is_release, status, status_created, status_rank,
         created, failure_reason)
    values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $12)
    on conflict (id) do update
        set amount = excluded.amount, reason = excluded.reason, is_release = excluded.is_release,
            status = excluded.status, status_created = excluded.status_created,
            status_rank = excluded.status_rank,
            failure_reason = coalesce(excluded.failure_reason, r.failure_reason)
        where (excluded.status_created, excluded.status_rank) > (r.status_created, r.status_rank)
    returning status, status_created
), final as (
    select coalesce((select status from saved), (select status from old)) as status,
           coalesce((select status_created from saved), (select status_created from old)) as status_created
), booked as (
    insert into recon.ledger_entries
        (occurred_at, kind, source_id, amount, currency, payment_id, stripe_object_id, stripe_event_id)
    select $10, 'refund', $1, -$3::bigint, $4, $2, $1, $11
    from final
    where not $6 and final.status in ('pending', 'succeeded')
    on conflict (kind, source_id) do nothing
    returning id, amount
), reversed as (
    insert into recon.ledger_entries
        (occurred_at, kind, source_id, amount, currency, payment_id, stripe_object_id, stripe_event_id)
    select case when $7 in ('failed', 'canceled') then least($8::timestamptz, final.status_created)
                else final.status_created end,
           'refund_reversal', r.source_id, -r.amount, r.currency, r.payment_id, r.stripe_object_id, $11
    from recon.ledger_entries r, final
    where not $6 and final.status in ('failed', 'canceled') and r.kind = 'refund'
      and r.source_id = $1
      and (($13 and $7 in ('failed', 'canceled')) or $14)
    on conflict (kind, source_id) do nothing
    returning id, amount
), failed as (
    insert into recon.exceptions (kind, stripe_event_id, stripe_object_id, detail)
    select 'refund_failed', $11, $1,
           jsonb_build_object('refund_amount', $3::bigint, 'currency', $4::text,
                              'failure_reason',
                              coalesce($12::text, (select failure_reason from recon.refunds where id = $1)))
    from saved s
    where not $6 and s.status = 'failed' and (select status from old) is distinct from 'failed'
    on conflict (kind, coalesce(stripe_event_id, ''), coalesce(stripe_object_id, ''))
        where resolved_at is null do nothing
    returning id
), audited as (
    insert into recon.audit_log (action, stripe_event_id, stripe_object_id, payment_id, detail)
    select 'status_changed', $11, $1, $2,
           jsonb_build_object('object', 'refund', 'field', 'status',
                              'from', (select status from old), 'to', s.status)
    from saved s
    where s.status is distinct from (select status from old)
    union all
    select 'stripe_refund_recorded', $11, $1, $2,
           jsonb_build_object('entry_id', b.id, 'kind', 'refund', 'amount', b.amount,
                              'currency', $4::text, 'status', $7::text)
    from booked b
    union all
    select 'stripe_refund_reversed', $11, $1, $2,
           jsonb_build_object('entry_id', v.id, 'kind', 'refund_reversal', 'amount', v.amount)
    from reversed v
    returning id
)
select (select status from saved) as saved_status,
       (select amount from booked) as booked_amount,
       (select amount from reversed) as reversed_amount
"""

# After every refund snapshot (planned right after it, so it runs after every _APPLY_REFUND of the
# run: the pipeline sends texts in the order they were first added): link a refund the back office
# asked for to its request by the metadata it was created with — never by the re_ id, which the
# request may not have recorded yet when the webhook outruns Stripe's answer — move the request
# on, and queue the buyer's e-mail the first time the refund is booked (schema/0005).
_FOLLOW_REFUND = "select * from recon.follow_refund($1, $2, $3, $4)"
REQUEST_METADATA_KEY = "recon_refund_request_id"

# Refunds that were live when the charge snapshot was taken: live now, or failed/canceled only at
# or after the snapshot's time (same second counts: Stripe's clock cannot order them).
_LIVE_AT_SNAPSHOT = """
select coalesce(sum(amount), 0)::bigint from recon.refunds
where payment_id = $1 and not is_release
  and (status in ('pending', 'succeeded')
       or (status in ('failed', 'canceled') and status_created >= $2))
"""


async def _over_refund_check(
    con: asyncpg.Connection, applied: AppliedEvent, payment: Payment, refund: dict[str, Any]
) -> None:
    if payment.amount_refunded <= payment.captured_amount:
        return
    # Stripe's word is final: the refund stays booked, finance gets an exception to look at.
    await raise_exception(
        con,
        "over_refund",
        event_id=applied.event_id,
        object_id=str(refund["id"]),
        detail={
            "refund_amount": int(refund["amount"]),
            "amount_refunded": payment.amount_refunded,
            "captured_amount": payment.captured_amount,
            "currency": currency_of(refund) or payment.currency,
        },
    )


def plan_refund(
    pipeline: Pipeline,
    applied: AppliedEvent,
    payment: Payment,
    refund: dict[str, Any],
    seen_at: datetime,
    *,
    dates_failure: bool,
) -> Ticket | None:
    """Plan one refund snapshot seen at ``seen_at``: book it, reverse it, or just note its status.

    ``dates_failure``: the snapshot is the refund's own event, whose ``created`` is when a failure it
    shows happened. A refund carried in a charge.refunded (embedded or fetched) shows a failure that
    happened some time before: its reversal waits for the refund's own event, which dates it, and is
    booked from the carried snapshot only once the event's waiting window is over (rule 4)."""
    status = refund.get("status")
    rank = REFUND_STATUS_RANK.get(status) if isinstance(status, str) else None
    if stripe_id(refund.get("id")) is None or rank is None:
        return None  # never invent a refund row without an id; an unknown status moves nothing
    args = (
        refund["id"],
        payment.id,
        int(refund["amount"]),
        currency_of(refund) or payment.currency,
        refund.get("reason"),
        is_release(refund),
        status,
        seen_at,
        rank,
        timestamp(int(refund["created"])),
        applied.event_id,
        refund.get("failure_reason") if isinstance(refund.get("failure_reason"), str) else None,
        dates_failure,
        not applied.may_retry,
    )
    ticket = pipeline.add(_APPLY_REFUND, args)
    pipeline.add(_FOLLOW_REFUND, (refund["id"], request_id_of(refund), payment.id, applied.event_id))
    return ticket


def request_id_of(refund: dict[str, Any]) -> int | None:
    """The back-office request a refund was created for, from its metadata (None if not ours)."""
    metadata = refund.get("metadata")
    raw = metadata.get(REQUEST_METADATA_KEY) if isinstance(metadata, dict) else None
    if not isinstance(raw, str) or not raw.isdigit() or len(raw) > 18:
        return None
    return int(raw)


async def take_refund(
    con: asyncpg.Connection,
    applied: AppliedEvent,
    payment: Payment,
    refund: dict[str, Any],
    pipeline: Pipeline,
    ticket: Ticket | None,
) -> bool:
    """What the planned refund snapshot did (if one was planned): the payment's refunded amount,
    the over-refund check. True if it saved a status or booked a row."""
    if ticket is None:
        return False
    row = pipeline.row(ticket)
    changed = row["saved_status"] is not None or row["booked_amount"] is not None
    if row["reversed_amount"] is not None:
        changed = True
        payment.amount_refunded -= int(row["reversed_amount"])
    if row["booked_amount"] is not None:
        payment.amount_refunded -= int(row["booked_amount"])  # booked negative
        await _over_refund_check(con, applied, payment, refund)
    return changed


def on_refund_event(applied: AppliedEvent, payment: Payment, pipeline: Pipeline) -> Then:
    """refund.created|updated|failed and charge.refund.updated: the event's object is a refund."""
    ticket = plan_refund(pipeline, applied, payment, applied.obj, applied.created, dates_failure=True)

    async def then(con: asyncpg.Connection) -> Step:
        return Step(changed=await take_refund(con, applied, payment, applied.obj, pipeline, ticket))

    return then


def _carried_refunds(applied: AppliedEvent) -> list[dict[str, Any]]:
    # Fetched refunds are ordered as a snapshot taken at the charge.refunded's created, not at
    # our fetch time: our clock and Stripe's need not agree, and a failure Stripe reports later
    # must still be able to move a refund that a fetch saw live. They are at least that fresh.
    return [*(embedded_refunds(applied.obj) or []), *(applied.incoming.fetched_refunds or [])]


async def _judge_checkpoint(con: asyncpg.Connection, applied: AppliedEvent, payment: Payment) -> Step:
    """Do the live refunds cover this snapshot's amount_refunded less releases? Else retry/raise."""
    expected = expected_live_refunds(applied.obj)
    if payment.amount_refunded >= expected:
        return Step()
    # Refunds booked and later reversed by events newer than this snapshot still count: at the
    # snapshot's time they were money back, and amount_refunded then included them. In a batch
    # the refund snapshots that later events planned are saved already (pipeline.py): they count
    # as if they had been delivered first, which any delivery order may do anyway.
    live_then = int(await con.fetchval(_LIVE_AT_SNAPSHOT, payment.id, applied.created))
    fetched = applied.incoming.fetched_refunds
    fetched_live = live_refund_total(fetched) if fetched is not None else None
    if live_then >= expected or (fetched_live is not None and fetched_live >= expected):
        return Step()
    detail = {
        "amount_refunded": int(applied.obj.get("amount_refunded") or 0),
        "expected_live_refunds": expected,
        "live_refunds_booked": live_then,
        "fetched_live_refunds": fetched_live,
    }
    if applied.may_retry:
        return Step("retrying", retry_reason="refunds_short")
    await raise_exception(
        con, "refund_mismatch", event_id=applied.event_id, object_id=applied.object_id, detail=detail
    )
    return Step("mismatch")


_UNREVERSED = """
select count(*) from recon.ledger_entries r
where r.kind = 'refund' and r.source_id = any($1::text[])
  and not exists (select 1 from recon.ledger_entries v
                  where v.kind = 'refund_reversal' and v.source_id = r.source_id)
"""


async def _failures_undated(con: asyncpg.Connection, carried: list[dict[str, Any]]) -> bool:
    """Is a refund that a carried snapshot shows failed or canceled still booked and unreversed?"""
    ended = [
        str(r["id"])
        for r in carried
        if r.get("status") in ("failed", "canceled") and not is_release(r) and stripe_id(r.get("id"))
    ]
    return bool(ended) and int(await con.fetchval(_UNREVERSED, ended)) > 0


def on_charge_refunded(applied: AppliedEvent, payment: Payment, pipeline: Pipeline) -> Then:
    """charge.refunded: book the refunds it carries, then judge it as a checkpoint if newest."""
    carried = [
        (refund, plan_refund(pipeline, applied, payment, refund, applied.created, dates_failure=False))
        for refund in _carried_refunds(applied)
    ]

    async def then(con: asyncpg.Connection) -> Step:
        changed = False
        for refund, ticket in carried:
            changed = await take_refund(con, applied, payment, refund, pipeline, ticket) or changed
        if applied.may_retry and await _failures_undated(con, [r for r, _ in carried]):
            # A booked refund this snapshot shows failed is not reversed yet: its own event will
            # say when it failed. Until then, or until the window ends, this snapshot waits.
            return Step("retrying", retry_reason="refund_failure_undated", changed=changed)
        if not is_newest_snapshot(payment, applied):
            return Step(changed=changed)
        step = await _judge_checkpoint(con, applied, payment)
        if step.outcome != "retrying":
            changed = advance_snapshot(payment, applied) or changed
        return replace(step, changed=changed)

    return then
