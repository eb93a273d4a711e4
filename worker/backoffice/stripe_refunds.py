"""Creating and finding the Stripe refunds of a request, through the official client.

Every create carries the part's idempotency key and the metadata ``recon_refund_request_id``: the
key makes a retry after a network error return the refund the first call made, and the metadata
lets the rules link the webhook to its request and lets ``find`` see, after Stripe forgot the key
(24 hours), whether a refund for the part exists already. Transient errors are retried here, a
bounded number of times, with the same key; Stripe's refusal (``charge_already_refunded``,
``charge_disputed``, an amount too large, …) is final and raised as ``StripeRefused``.
"""

from __future__ import annotations

import asyncio
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

REQUEST_METADATA_KEY = "recon_refund_request_id"
# Stripe's own reasons; "other" sends none and keeps the operator's note in the metadata.
STRIPE_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})
_METADATA_VALUE_MAX = 500  # Stripe's limit for one metadata value


@dataclass(frozen=True, slots=True)
class CallTimings:
    try_timeout_s: float = 10.0
    max_tries: int = 3
    give_up_after_s: float = 30.0


@dataclass(frozen=True, slots=True)
class StripeRefund:
    id: str
    status: str
    amount: int


@dataclass(frozen=True, slots=True)
class RefundCreate:
    """One part's call: what to refund, and what makes the call safe to repeat."""

    charge_id: str
    amount: int
    reason: str
    note: str | None
    request_id: int
    requested_by: str
    idempotency_key: str

    def params(self) -> dict[str, Any]:
        metadata = {REQUEST_METADATA_KEY: str(self.request_id), "recon_requested_by": self.requested_by}
        if self.note:
            metadata["recon_note"] = self.note[:_METADATA_VALUE_MAX]
        params: dict[str, Any] = {"charge": self.charge_id, "amount": self.amount, "metadata": metadata}
        if self.reason in STRIPE_REASONS:
            params["reason"] = self.reason
        return params


class StripeRefused(Exception):
    """Stripe answered and said no; ``message`` is Stripe's, ``code`` its error code if any."""

    def __init__(self, message: str, code: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class StripeUnavailable(Exception):
    """No answer from Stripe (network, timeouts, 429, 5xx, or our key refused): try again later."""


_TRANSIENT = (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError, TimeoutError)
# Stripe judged the refund itself: asking again will not change its mind.
_REFUSALS = (stripe.InvalidRequestError, stripe.CardError)


class StripeRefundApi:
    def __init__(
        self, api_key: str, api_base: str | None = None, timings: CallTimings = CallTimings()
    ) -> None:
        self._timings = timings
        self._client, self._http = stripe_client(api_key, api_base, timings.try_timeout_s)

    def _retrying(self) -> AsyncRetrying:
        t = self._timings
        return AsyncRetrying(
            retry=retry_if_exception_type(_TRANSIENT),
            stop=stop_after_attempt(t.max_tries) | stop_after_delay(t.give_up_after_s),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            reraise=True,
        )

    async def create(self, call: RefundCreate) -> StripeRefund:
        try:
            async for attempt in self._retrying():
                with attempt:
                    refund = await asyncio.wait_for(
                        self._client.v1.refunds.create_async(
                            params=call.params(),  # type: ignore[arg-type]
                            options={"idempotency_key": call.idempotency_key},
                        ),
                        self._timings.try_timeout_s,
                    )
                    return StripeRefund(refund.id, str(refund.status), int(refund.amount))
        except _REFUSALS as exc:
            raise StripeRefused(_message(exc), exc.code) from exc
        except (TimeoutError, stripe.StripeError) as exc:
            raise StripeUnavailable(_message(exc)) from exc
        raise StripeUnavailable("tenacity neither returned nor re-raised")

    async def find(self, charge_id: str, request_id: int) -> StripeRefund | None:
        """The charge's refund made for this request, looked up by metadata (every page)."""
        try:
            async for attempt in self._retrying():
                with attempt:
                    return await asyncio.wait_for(
                        self._find(charge_id, str(request_id)), self._timings.try_timeout_s
                    )
        except (TimeoutError, stripe.StripeError) as exc:
            raise StripeUnavailable(_message(exc)) from exc
        raise StripeUnavailable("tenacity neither returned nor re-raised")

    async def _find(self, charge_id: str, request_id: str) -> StripeRefund | None:
        page = await self._client.v1.refunds.list_async(params={"charge": charge_id, "limit": 100})
        async for refund in page.auto_paging_iter():
            metadata = refund.to_dict().get("metadata") or {}
            if metadata.get(REQUEST_METADATA_KEY) == request_id:
                return StripeRefund(refund.id, str(refund.status), int(refund.amount))
        return None

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]


def _message(exc: BaseException) -> str:
    """Stripe's own message, one line (it never contains the key)."""
    if isinstance(exc, stripe.StripeError):
        text = exc.user_message or str(exc)
    else:
        text = type(exc).__name__
    return (text.splitlines() or [type(exc).__name__])[0][:300]
