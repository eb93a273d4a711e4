"""Sending a committed request's parts to Stripe, and settling those a crash left behind.

Never inside a database transaction: a part is leased (a short statement), Stripe is called with
no connection held, and the answer is recorded in a second short transaction. A process that
dies between Stripe's answer and that record leaves the part ``requested`` with an expired lease;
the worker's recovery then *looks first* — lists the charge's refunds for one whose metadata
names the request — and only creates one if none exists. That holds after Stripe's idempotency
keys expired (24 hours), when the key alone would no longer protect the buyer from a second refund.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import asyncpg
import structlog

from worker import metrics
from worker.backoffice import store
from worker.backoffice.stripe_refunds import RefundCreate, StripeRefund, StripeRefused, StripeUnavailable

log = structlog.get_logger(__name__)


class RefundApi(Protocol):
    async def create(self, call: RefundCreate) -> StripeRefund: ...

    async def find(self, charge_id: str, request_id: int) -> StripeRefund | None: ...


# Called after Stripe answered for a part and before the answer is recorded: the place a test
# stops the process, as a crash there would.
AnsweredHook = Callable[[store.PartToSubmit, StripeRefund], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class SubmitTimings:
    lease_s: float = 120.0  # longer than the Stripe client's worst case (CallTimings)
    recover_after_s: float = 60.0  # a request this old with unanswered parts is the worker's
    recover_every_s: float = 30.0


class Submitter:
    def __init__(
        self,
        pool: asyncpg.Pool,
        stripe_api: RefundApi,
        timings: SubmitTimings = SubmitTimings(),
        after_stripe_answered: AnsweredHook | None = None,
    ) -> None:
        self._pool = pool
        self._stripe = stripe_api
        self._timings = timings
        self._after_answered = after_stripe_answered

    async def submit(self, request_id: int, *, look_first: bool) -> None:
        """Send every unanswered part of the request (``look_first``: find it at Stripe before creating)."""
        async with self._pool.acquire() as con:
            parts = await store.claim_parts(con, request_id, self._timings.lease_s)
        for part in parts:
            await self._submit_part(part, look_first)

    async def _submit_part(self, part: store.PartToSubmit, look_first: bool) -> None:
        try:
            found = await self._stripe.find(part.charge_id, part.request_id) if look_first else None
            refund = found or await self._stripe.create(_call(part))
        except StripeRefused as refused:
            async with self._pool.acquire() as con:
                before, after = await store.record_refusal(con, part, refused.message, refused.code)
            log.warning(
                "refund_refused_by_stripe",
                refund_request_id=part.request_id,
                code=refused.code,
                error=refused.message,
            )
            _count(before, after)
            return
        except StripeUnavailable as unavailable:
            async with self._pool.acquire() as con:
                await store.release_part(con, part)
            log.warning("refund_submit_deferred", refund_request_id=part.request_id, error=str(unavailable))
            return
        if self._after_answered is not None:
            await self._after_answered(part, refund)
        async with self._pool.acquire() as con:
            before, after = await store.record_answer(con, part, refund.id)
        log.info(
            "refund_submitted",
            refund_request_id=part.request_id,
            stripe_refund_id=refund.id,
            found_existing=found is not None,
        )
        _count(before, after)

    async def recover_once(self, limit: int = 50) -> int:
        """Submit the parts of requests older than ``recover_after_s`` that Stripe never answered
        (as far as we recorded); returns how many requests were looked at."""
        async with self._pool.acquire() as con:
            due = await store.due_for_recovery(con, self._timings.recover_after_s, limit)
        for request_id in due:
            await self.submit(request_id, look_first=True)
        return len(due)

    async def recover_forever(self) -> None:
        while True:
            try:
                await self.recover_once()
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                log.warning("refund_recovery_failed", error=type(exc).__name__)
            await asyncio.sleep(self._timings.recover_every_s)


def _call(part: store.PartToSubmit) -> RefundCreate:
    return RefundCreate(
        charge_id=part.charge_id,
        amount=part.amount,
        reason=part.reason,
        note=part.note,
        request_id=part.request_id,
        requested_by=part.requested_by,
        idempotency_key=part.idempotency_key,
    )


def _count(before: str, after: str) -> None:
    if after != before:
        metrics.REFUND_REQUESTS.labels(after).inc()
