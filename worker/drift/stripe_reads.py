"""Reads from the Stripe API at a steady rate, every page, with 429 and transient errors retried.

Both checks against Stripe use it: the payout reconciler (a payout, its balance transactions) and
the drift check (a charge, its refunds and disputes). Stripe allows about 25 read requests a
second in test mode and 100 in live mode, shared with everything else on the account; a check
that walks thousands of charges must keep well under that, so every request waits for its slot
(``RequestPacer``). A 429 anyway — another process spent the budget — is waited out and retried,
as are network errors and Stripe's 5xx; anything else (a bad key, a missing object) is raised at
once. Never called inside a database transaction.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import stripe
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from worker.stripe_api import stripe_client

log = structlog.get_logger(__name__)

PAGE_SIZE = 100  # Stripe's largest page
T = TypeVar("T")

# Worth another try after a wait; an authentication error or a 404 will not get better.
_TRANSIENT = (stripe.RateLimitError, stripe.APIConnectionError, stripe.APIError, TimeoutError)


@dataclass(frozen=True, slots=True)
class ReadTimings:
    """``requests_per_s``: the steady rate held across all requests of this reader. A failed try is
    retried after ``retry_wait_min_s``, doubling up to ``retry_wait_max_s``, ``max_tries`` in all."""

    requests_per_s: float = 20.0
    try_timeout_s: float = 20.0
    max_tries: int = 6
    retry_wait_min_s: float = 1.0
    retry_wait_max_s: float = 16.0


class RequestPacer:
    """Hands out request slots ``1 / rate`` seconds apart, to any number of concurrent callers."""

    def __init__(self, requests_per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if requests_per_s <= 0:
            raise ValueError("requests_per_s must be positive")
        self._interval_s = 1.0 / requests_per_s
        self._clock = clock
        self._next_slot = 0.0
        self._lock = asyncio.Lock()

    async def slot(self) -> None:
        async with self._lock:
            now = self._clock()
            start = max(now, self._next_slot)
            self._next_slot = start + self._interval_s
        if start > now:
            await asyncio.sleep(start - now)  # pacing real requests, not waiting for work


@dataclass(slots=True)
class ReadCounts:
    """What a reader did, for progress lines and docs/performance.md."""

    requests: int = 0
    pages: int = 0
    rate_limited: int = 0
    retried: int = 0
    started: float = field(default_factory=time.monotonic)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.requests / elapsed if elapsed > 0 else 0.0


class StripeReadFailed(Exception):
    """A read that did not succeed (the message names the error type and HTTP status, never the key)."""


def describe(exc: BaseException) -> str:
    """One line about a Stripe error that never carries the key (Stripe echoes part of it)."""
    if isinstance(exc, stripe.StripeError):
        status = f" (HTTP {exc.http_status})" if exc.http_status else ""
        code = f" {exc.code}" if exc.code else ""
        return f"{type(exc).__name__}{status}{code}"
    return type(exc).__name__


class StripeReads:
    """The official client's async API over aiohttp, one request at a time through the pacer."""

    def __init__(
        self, api_key: str, api_base: str | None = None, timings: ReadTimings = ReadTimings()
    ) -> None:
        self.timings = timings
        self.counts = ReadCounts()
        self._pacer = RequestPacer(timings.requests_per_s)
        self._client, self._http = stripe_client(api_key, api_base, timings.try_timeout_s)

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def _request(self, call: Callable[[], Awaitable[T]]) -> T:
        timings = self.timings
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(_TRANSIENT),
                stop=stop_after_attempt(timings.max_tries),
                wait=wait_exponential(
                    multiplier=timings.retry_wait_min_s,
                    min=timings.retry_wait_min_s,
                    max=timings.retry_wait_max_s,
                ),
                before_sleep=self._note_retry,
                reraise=True,
            ):
                with attempt:
                    await self._pacer.slot()
                    self.counts.requests += 1
                    return await asyncio.wait_for(call(), timings.try_timeout_s)
        except (TimeoutError, stripe.StripeError) as exc:
            raise StripeReadFailed(describe(exc)) from exc
        raise StripeReadFailed("tenacity neither returned nor re-raised")

    def _note_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        self.counts.retried += 1
        if isinstance(error, stripe.RateLimitError):
            self.counts.rate_limited += 1
        wait_s = state.next_action.sleep if state.next_action is not None else 0.0
        log.info("stripe_read_retry", error=describe(error) if error else None, wait_s=round(wait_s, 2))

    async def _every_page(
        self, first: Callable[[], Awaitable[stripe.ListObject[Any]]]
    ) -> list[dict[str, Any]]:
        page = await self._request(first)
        items: list[dict[str, Any]] = []
        while True:
            self.counts.pages += 1
            items.extend(obj.to_dict() for obj in page.data)
            if not page.has_more:
                return items
            # next_page_async keeps the filters and expansions and adds starting_after.
            page = await self._request(page.next_page_async)

    # Payouts ------------------------------------------------------------------------------------

    async def payout(self, payout_id: str) -> dict[str, Any]:
        payout = await self._request(lambda: self._client.v1.payouts.retrieve_async(payout_id))
        return payout.to_dict()

    async def paid_payouts(self, arrived_since: int | None) -> list[dict[str, Any]]:
        """Every paid payout, newest first, arrived on or after ``arrived_since`` (Unix seconds)."""
        params: dict[str, Any] = {"status": "paid", "limit": PAGE_SIZE}
        if arrived_since is not None:
            params["arrival_date"] = {"gte": arrived_since}
        return await self._every_page(lambda: self._client.v1.payouts.list_async(params))  # type: ignore[arg-type]

    async def payout_lines(self, payout_id: str) -> list[dict[str, Any]]:
        """Every balance transaction paid out in the payout, each with its source expanded."""
        params: dict[str, Any] = {"payout": payout_id, "limit": PAGE_SIZE, "expand": ["data.source"]}
        return await self._every_page(
            lambda: self._client.v1.balance_transactions.list_async(params)  # type: ignore[arg-type]
        )

    # A charge's facts, for the drift check ------------------------------------------------------

    async def charge(self, charge_id: str) -> dict[str, Any]:
        charge = await self._request(lambda: self._client.v1.charges.retrieve_async(charge_id))
        return charge.to_dict()

    async def refunds(self, charge_id: str) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"charge": charge_id, "limit": PAGE_SIZE}
        return await self._every_page(lambda: self._client.v1.refunds.list_async(params))  # type: ignore[arg-type]

    async def disputes(self, charge_id: str) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"charge": charge_id, "limit": PAGE_SIZE}
        return await self._every_page(lambda: self._client.v1.disputes.list_async(params))  # type: ignore[arg-type]
