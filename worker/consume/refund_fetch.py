"""Every refund of a charge, from the Stripe API, fetched before the transaction that locks the payment.

The stripe package's default is 80 s a try with its own retries; a slow call must not hold a lane,
so each try has a short timeout and tenacity retries only Stripe's transient errors, a bounded
number of times.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import stripe
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from worker.stripe_api import stripe_client

PAGE_SIZE = 100


@dataclass(frozen=True, slots=True)
class FetchTimings:
    """Each try gives up after ``try_timeout_s``; at most ``max_tries`` tries and ``give_up_after_s``
    in all (the design's bound is 5 s a try: a lane waits for it)."""

    try_timeout_s: float = 4.0
    max_tries: int = 3
    give_up_after_s: float = 8.0


RefundFetcher = Callable[[str], Awaitable[list[dict[str, Any]]]]
"""charge id -> every refund of that charge as plain dicts (Stripe's JSON shape); raises RefundFetchFailed."""


class RefundFetchFailed(Exception):
    """The API did not give the charge's refunds in time (the message says why, without secrets)."""


# Errors worth another try: network trouble, 429, Stripe's 5xx. Authentication or a bad request
# will not get better by asking again.
_TRANSIENT = (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError, TimeoutError)


class StripeRefunds:
    """A ``RefundFetcher`` over the official client's async API (aiohttp transport)."""

    def __init__(
        self, api_key: str, api_base: str | None = None, timings: FetchTimings = FetchTimings()
    ) -> None:
        self._timings = timings
        self._client, self._http = stripe_client(api_key, api_base, timings.try_timeout_s)

    async def __call__(self, charge_id: str) -> list[dict[str, Any]]:
        timings = self._timings
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(_TRANSIENT),
                stop=stop_after_attempt(timings.max_tries) | stop_after_delay(timings.give_up_after_s),
                wait=wait_exponential(multiplier=0.2, max=1.0),
                reraise=True,
            ):
                with attempt:
                    return await asyncio.wait_for(self._all_pages(charge_id), timings.try_timeout_s)
        except (TimeoutError, stripe.StripeError) as exc:
            # str(StripeError) is Stripe's message; it never contains the key.
            raise RefundFetchFailed(f"{type(exc).__name__}: {exc}".splitlines()[0][:200]) from exc
        raise RefundFetchFailed("tenacity neither returned nor re-raised")

    async def _all_pages(self, charge_id: str) -> list[dict[str, Any]]:
        first = await self._client.v1.refunds.list_async(params={"charge": charge_id, "limit": PAGE_SIZE})
        return [refund.to_dict() async for refund in first.auto_paging_iter()]

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]
