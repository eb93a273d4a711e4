"""Refund requests in the database: the cap under the payments' locks, and each part's progress.

A request is committed (``requested``) before Stripe hears of it, in one transaction that locks
the owner's payments in id order — the order the rules lock them in, so a request and a webhook
of the same payments wait for each other instead of deadlocking — and reads what each can still
refund (``recon.payment_refundable``: Stripe's refundable less the parts not booked yet). Two
operators at once therefore serialize on the locks, and the second sees the first's request.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

OwnerKind = Literal["order", "invoice", "charge"]
REASONS = ("duplicate", "fraudulent", "requested_by_customer", "other")


@dataclass(frozen=True, slots=True)
class RefundAsk:
    """What an operator asks for; ``amount`` None is everything refundable now."""

    owner_kind: OwnerKind
    owner: str  # an order or invoice number, or a ch_ id
    amount: int | None
    reason: str
    note: str | None
    notify_buyer: bool = True
    message: str | None = None


class RefundRefused(Exception):
    """The ask cannot be taken; nothing was stored. ``error`` is the API's machine-readable word."""

    def __init__(self, error: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail
        self.extra = extra


class ExceedsRefundable(RefundRefused):
    def __init__(self, refundable: int, currency: str) -> None:
        super().__init__(
            "exceeds_refundable",
            f"at most {refundable} ({currency}) is refundable now",
            refundable=refundable,
            currency=currency,
        )
        self.refundable = refundable


class CurrencyMismatch(RefundRefused):
    """The owner has payments in another currency than its own (the host recorded them so): one
    amount cannot be split across currencies, and the wrong one would go back to the buyer."""

    def __init__(self, owner: str, currency: str, charges: list[str]) -> None:
        super().__init__(
            "currency_mismatch",
            f"{owner} is in {currency} but {', '.join(charges)} "
            f"{'is' if len(charges) == 1 else 'are'} not; refund by charge",
            currency=currency,
            charges=charges,
        )


class IdempotencyKeyReused(Exception):
    """The Idempotency-Key was used before by the same caller for a different request body."""


@dataclass(frozen=True, slots=True)
class Owner:
    order_id: int | None
    invoice_id: int | None
    payment_id: int | None  # set for a charge's request
    currency: str


@dataclass(frozen=True, slots=True)
class PartToSubmit:
    request_id: int
    payment_id: int
    charge_id: str
    amount: int
    idempotency_key: str
    reason: str
    note: str | None
    requested_by: str
    requested_at: datetime


_OWNER_SQL = {
    "order": "select id as order_id, null::bigint as invoice_id, null::bigint as payment_id, currency "
    "from recon.orders where number = $1",
    "invoice": "select null::bigint as order_id, id as invoice_id, null::bigint as payment_id, currency "
    "from recon.invoices where number = $1",
    "charge": "select order_id, invoice_id, id as payment_id, currency from recon.payments "
    "where stripe_charge_id = $1",
}

# The payments a request may refund, locked in id order (as the rules lock them).
_LOCK_PAYMENTS = """
select p.id from recon.payments p
where ($1::bigint is not null and p.id = $1)
   or ($1::bigint is null and ($2::bigint is not null and p.order_id = $2
                               or $3::bigint is not null and p.invoice_id = $3))
order by p.id
for update
"""

# Read after the locks were granted: in READ COMMITTED this statement sees every request and
# booking committed by whoever held them before. Newest payment first: the order of the split.
_REFUNDABLE = """
select p.id, p.stripe_charge_id, p.currency, r.refundable
from recon.payments p join recon.payment_refundable r on r.payment_id = p.id
where p.id = any($1::bigint[])
order by p.id desc
"""

_INSERT_REQUEST = """
insert into recon.refund_requests
    (requested_by, order_id, invoice_id, payment_id, amount, currency, reason, note, notify_buyer,
     message, idempotency_key, fingerprint, rejects_order)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
returning id
"""

# The Stripe idempotency key of a part: derived from the request's uid and the payment, so every
# call for that part, from any process, carries the same one.
_INSERT_PARTS = """
with parts as (
    insert into recon.refund_request_parts (request_id, payment_id, amount, idempotency_key)
    select r.id, u.payment_id, u.amount, 'recon-refund-' || r.uid || '-' || u.payment_id
    from recon.refund_requests r, unnest($2::bigint[], $3::bigint[]) as u(payment_id, amount)
    where r.id = $1
    returning payment_id, amount
)
insert into recon.audit_log (action, payment_id, detail)
select 'refund_requested', p.payment_id,
       jsonb_build_object('refund_request_id', $1::bigint, 'amount', p.amount, 'currency', $4::text,
                          'reason', $5::text, 'requested_by', $6::text)
from parts p
"""

_REJECT_ORDER = """
with moved as (
    update recon.orders set status = 'rejected' where id = $1 and status <> 'rejected'
    returning id
)
insert into recon.audit_log (action, detail)
select 'order_rejected', jsonb_build_object('order_id', $1::bigint, 'note', $2::text,
                                            'requested_by', $3::text, 'refund_request_id', $4::bigint)
from moved
"""

_BY_KEY = "select id, fingerprint from recon.refund_requests where requested_by = $1 and idempotency_key = $2"


async def find_by_key(con: asyncpg.Connection, requested_by: str, key: str, fingerprint: str) -> int | None:
    """The request made earlier with this key, if any; raises IdempotencyKeyReused for another body."""
    row = await con.fetchrow(_BY_KEY, requested_by, key)
    if row is None:
        return None
    if row["fingerprint"] != fingerprint:
        raise IdempotencyKeyReused(key)
    return int(row["id"])


async def _owner(con: asyncpg.Connection, ask: RefundAsk) -> Owner:
    row = await con.fetchrow(_OWNER_SQL[ask.owner_kind], ask.owner)
    if row is None:
        raise RefundRefused(f"unknown_{ask.owner_kind}", f"no {ask.owner_kind} {ask.owner!r}")
    return Owner(row["order_id"], row["invoice_id"], row["payment_id"], row["currency"])


def split_newest_first(amount: int, refundable: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(payment id, amount) parts: each payment, newest first, gives what it can until ``amount``."""
    parts = []
    left = amount
    for payment_id, can in refundable:
        if left == 0:
            break
        take = min(left, can)
        if take > 0:
            parts.append((payment_id, take))
            left -= take
    return parts


async def create_request(
    con: asyncpg.Connection,
    ask: RefundAsk,
    *,
    requested_by: str,
    idempotency_key: str | None,
    fingerprint: str | None,
    rejects_order: bool = False,
) -> int | None:
    """Commit the request with the cap checked under the payments' locks; its id, or None when a
    reject found nothing refundable (the order is rejected all the same). Raises RefundRefused."""
    async with con.transaction():
        owner = await _owner(con, ask)
        locked = [
            r["id"]
            for r in await con.fetch(_LOCK_PAYMENTS, owner.payment_id, owner.order_id, owner.invoice_id)
        ]
        rows = await con.fetch(_REFUNDABLE, locked)
        # Only payments that could still give something: one refunded, voided or without a charge
        # must not keep its order from being rejected.
        foreign = [
            str(r["stripe_charge_id"])
            for r in rows
            if r["currency"] != owner.currency and r["refundable"] > 0
        ]
        if foreign:
            raise CurrencyMismatch(f"{ask.owner_kind} {ask.owner}", owner.currency, sorted(foreign))
        refundable = [(int(r["id"]), int(r["refundable"])) for r in rows]
        cap = sum(can for _, can in refundable)
        amount = cap if ask.amount is None else ask.amount
        request_id: int | None = None
        if amount > cap or (amount == 0 and not rejects_order):
            raise ExceedsRefundable(cap, owner.currency)
        if amount > 0:
            request_id = await con.fetchval(
                _INSERT_REQUEST,
                requested_by,
                owner.order_id,
                owner.invoice_id,
                owner.payment_id,
                amount,
                owner.currency,
                ask.reason,
                ask.note,
                ask.notify_buyer,
                ask.message,
                idempotency_key,
                fingerprint,
                rejects_order,
            )
            parts = split_newest_first(amount, refundable)
            await con.execute(
                _INSERT_PARTS,
                request_id,
                [p for p, _ in parts],
                [a for _, a in parts],
                owner.currency,
                ask.reason,
                requested_by,
            )
        if rejects_order:
            # After the payments: the rules lock payments before owners too (recon.refresh_owners).
            await con.execute(_REJECT_ORDER, owner.order_id, ask.note, requested_by, request_id)
        return request_id


# ---- submitting the parts --------------------------------------------------------------------

# Parts not yet answered by Stripe, leased to one submitter for ``lease_s``: the API call that
# made them, or the worker's recovery once the lease (or the process holding it) is gone.
_CLAIM_PARTS = """
update recon.refund_request_parts q
set lease_until = now() + make_interval(secs => $2), attempts = q.attempts + 1
from recon.refund_requests r, recon.payments p
where q.request_id = $1 and r.id = q.request_id and p.id = q.payment_id
  and q.state = 'requested' and q.stripe_refund_id is null
  and (q.lease_until is null or q.lease_until < now())
returning q.request_id, q.payment_id, p.stripe_charge_id, q.amount, q.idempotency_key, r.reason, r.note,
          r.requested_by, r.requested_at
"""

_RELEASE_PART = """
update recon.refund_request_parts set lease_until = null
where request_id = $1 and payment_id = $2 and state = 'requested'
"""

# Stripe's answer: the part is submitted (unless the webhook, faster than the answer, already
# moved it further), then the request follows its parts.
_RECORD_ANSWER = """
update recon.refund_request_parts
set stripe_refund_id = coalesce(stripe_refund_id, $3),
    state = case when state = 'requested' then 'submitted' else state end,
    lease_until = null
where request_id = $1 and payment_id = $2
"""

_RECORD_REFUSAL = """
update recon.refund_request_parts
set state = 'failed', error = $3, error_code = $4, lease_until = null
where request_id = $1 and payment_id = $2 and state = 'requested' and stripe_refund_id is null
"""

_SETTLE = "select old_state, new_state from recon.settle_refund_request($1, null)"

_DUE_FOR_RECOVERY = """
select distinct q.request_id
from recon.refund_request_parts q join recon.refund_requests r on r.id = q.request_id
where q.state = 'requested' and q.stripe_refund_id is null
  and (q.lease_until is null or q.lease_until < now())
  and r.requested_at < now() - make_interval(secs => $1)
order by q.request_id
limit $2
"""


async def claim_parts(con: asyncpg.Connection, request_id: int, lease_s: float) -> list[PartToSubmit]:
    rows = await con.fetch(_CLAIM_PARTS, request_id, lease_s)
    return [
        PartToSubmit(
            request_id=r["request_id"],
            payment_id=r["payment_id"],
            charge_id=r["stripe_charge_id"],
            amount=r["amount"],
            idempotency_key=r["idempotency_key"],
            reason=r["reason"],
            note=r["note"],
            requested_by=r["requested_by"],
            requested_at=r["requested_at"],
        )
        for r in sorted(rows, key=lambda r: -int(r["payment_id"]))
    ]


async def release_part(con: asyncpg.Connection, part: PartToSubmit) -> None:
    await con.execute(_RELEASE_PART, part.request_id, part.payment_id)


async def record_answer(
    con: asyncpg.Connection, part: PartToSubmit, stripe_refund_id: str
) -> tuple[str, str]:
    """(state before, state after) of the request."""
    async with con.transaction():
        await con.execute(_RECORD_ANSWER, part.request_id, part.payment_id, stripe_refund_id)
        row = await con.fetchrow(_SETTLE, part.request_id)
    return row["old_state"], row["new_state"]


async def record_refusal(
    con: asyncpg.Connection, part: PartToSubmit, message: str, code: str | None
) -> tuple[str, str]:
    async with con.transaction():
        await con.execute(_RECORD_REFUSAL, part.request_id, part.payment_id, message, code)
        row = await con.fetchrow(_SETTLE, part.request_id)
    return row["old_state"], row["new_state"]


async def due_for_recovery(con: asyncpg.Connection, older_than_s: float, limit: int) -> list[int]:
    return [int(r["request_id"]) for r in await con.fetch(_DUE_FOR_RECOVERY, older_than_s, limit)]


# ---- reading a request back ------------------------------------------------------------------

_REQUEST = """
select r.id, r.state, r.amount, r.currency, r.reason, r.note, r.requested_by, r.requested_at,
       r.notify_buyer, r.message, r.error, r.rejects_order, r.order_id, r.invoice_id, r.payment_id,
       o.number as order_number, i.number as invoice_number, p.stripe_charge_id
from recon.refund_requests r
left join recon.orders o on o.id = r.order_id
left join recon.invoices i on i.id = r.invoice_id
left join recon.payments p on p.id = r.payment_id
where r.id = $1
"""

_PARTS = """
select p.stripe_charge_id, q.stripe_refund_id, q.amount, q.state, q.error
from recon.refund_request_parts q join recon.payments p on p.id = q.payment_id
where q.request_id = $1
order by q.payment_id desc
"""

# What is still refundable on the request's owner (the payment, for a charge's request).
_REFUNDABLE_AFTER = """
select case
    when $3::bigint is not null then (select refundable from recon.payment_refundable where payment_id = $3)
    when $1::bigint is not null then (select b.refundable_now from finance.order_balances b
                                      join recon.orders o on o.number = b.order_number where o.id = $1)
    else (select b.refundable_now from finance.invoice_balances b
          join recon.invoices i on i.number = b.invoice_number where i.id = $2)
end
"""


async def read_request(con: asyncpg.Connection, request_id: int) -> dict[str, Any] | None:
    """The request as the API shows it."""
    row = await con.fetchrow(_REQUEST, request_id)
    if row is None:
        return None
    parts = await con.fetch(_PARTS, request_id)
    refundable = await con.fetchval(_REFUNDABLE_AFTER, row["order_id"], row["invoice_id"], row["payment_id"])
    return {
        "id": row["id"],
        "state": row["state"],
        "amount": row["amount"],
        "currency": row["currency"],
        "reason": row["reason"],
        "note": row["note"],
        "requested_by": row["requested_by"],
        "requested_at": row["requested_at"].isoformat(),
        "order_number": row["order_number"],
        "invoice_number": row["invoice_number"],
        "charge": row["stripe_charge_id"],
        "notify_buyer": row["notify_buyer"],
        "message": row["message"],
        "rejects_order": row["rejects_order"],
        "error": row["error"],
        "parts": [
            {
                "stripe_charge_id": p["stripe_charge_id"],
                "stripe_refund_id": p["stripe_refund_id"],
                "amount": p["amount"],
                "state": p["state"],
                "error": p["error"],
            }
            for p in parts
        ],
        "refundable_after": int(refundable or 0),
    }
