"""The official Stripe client as every part that calls the API builds it.

One aiohttp transport with a per-try timeout, and no retries of the client's own: each caller retries
in its own way (the refund fetch within the event's window, the back office with the same idempotency
key, the drift check paced under Stripe's rate limit), so the client must not retry behind them.
"""

from __future__ import annotations

import aiohttp
import stripe


def stripe_client(
    api_key: str, api_base: str | None, try_timeout_s: float
) -> tuple[stripe.StripeClient, stripe.AIOHTTPClient]:
    """The client and its transport (close the transport with ``await http.close_async()``)."""
    http = stripe.AIOHTTPClient(timeout=aiohttp.ClientTimeout(total=try_timeout_s))
    client = stripe.StripeClient(
        api_key,
        base_addresses={"api": api_base} if api_base else None,
        http_client=http,
        max_network_retries=0,
    )
    return client, http
