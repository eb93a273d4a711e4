"""One operator action, from the ask to Stripe's answer: what the API and ``recon refund`` share.

The request is committed first (``store.create_request``: the cap under the payments' locks), then
submitted (``Submitter``: Stripe, outside any transaction), then read back as it stands. If Stripe
does not answer, the request stays ``requested`` and the worker's recovery finishes it; the caller
still gets the request, never a second one for the same Idempotency-Key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import structlog

from worker import metrics
from worker.backoffice import store
from worker.backoffice.submit import Submitter

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Answer:
    """``created`` False: the same key and body again, answered with the request as it is now."""

    created: bool
    request: dict[str, Any] | None


def fingerprint(body: Any) -> str:
    """What a request body asks for, independent of key order and whitespace."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


class BackOffice:
    def __init__(self, pool: asyncpg.Pool, submitter: Submitter) -> None:
        self._pool = pool
        self.submitter = submitter

    async def request_refund(
        self, ask: store.RefundAsk, *, requested_by: str, idempotency_key: str, body_fingerprint: str
    ) -> Answer:
        """Raises store.RefundRefused (nothing stored) or store.IdempotencyKeyReused."""
        return await self._start(ask, requested_by, idempotency_key, body_fingerprint, rejects_order=False)

    async def reject_order(
        self, number: str, note: str, *, requested_by: str, idempotency_key: str | None, body_fingerprint: str
    ) -> Answer:
        """The order becomes rejected and everything refundable on it is refunded in one request;
        ``request`` None when nothing was refundable."""
        ask = store.RefundAsk("order", number, None, "other", note)
        return await self._start(ask, requested_by, idempotency_key, body_fingerprint, rejects_order=True)

    async def _start(
        self,
        ask: store.RefundAsk,
        requested_by: str,
        idempotency_key: str | None,
        body_fingerprint: str,
        *,
        rejects_order: bool,
    ) -> Answer:
        async with self._pool.acquire() as con:
            if idempotency_key is not None:
                earlier = await store.find_by_key(con, requested_by, idempotency_key, body_fingerprint)
                if earlier is not None:
                    return Answer(False, await store.read_request(con, earlier))
            try:
                request_id = await store.create_request(
                    con,
                    ask,
                    requested_by=requested_by,
                    idempotency_key=idempotency_key,
                    fingerprint=body_fingerprint,
                    rejects_order=rejects_order,
                )
            except asyncpg.UniqueViolationError:
                if idempotency_key is None:
                    raise
                # The same key at the same moment from the same caller: the other one won.
                earlier = await store.find_by_key(con, requested_by, idempotency_key, body_fingerprint)
                return Answer(False, await store.read_request(con, earlier) if earlier else None)
        if request_id is None:
            return Answer(False, None)
        metrics.REFUND_REQUESTS.labels("requested").inc()
        log.info(
            "refund_requested",
            refund_request_id=request_id,
            owner_kind=ask.owner_kind,
            reason=ask.reason,
            requested_by=requested_by,
            rejects_order=rejects_order,
        )
        await self.submitter.submit(request_id, look_first=False)
        return Answer(True, await self.get_request(request_id))

    async def get_request(self, request_id: int) -> dict[str, Any] | None:
        async with self._pool.acquire() as con:
            return await store.read_request(con, request_id)
