"""Host webhooks (RECON_HOST_WEBHOOK_URL): the ``host_webhook`` outbox, POSTed and signed like Stripe's.

Body ``{"id", "type", "created", "data"}``: the same bytes on every attempt (``id`` is the outbox
row's, so the host can dedupe). Header ``Recon-Signature: t=<unix>,v1=<hex>``, the HMAC-SHA256 with
RECON_HOST_WEBHOOK_SECRET of ``"<t>.<body>"``; ``t`` is the time of the attempt. A 2xx ends it;
anything else is tried again with backoff (the outbox's timings: 3 days by default).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from worker.backoffice.outbox import DeliveryFailed, OutboxRow, Sent, Skipped

SIGNATURE_HEADER = "Recon-Signature"
GIVE_UP_AFTER_S = 3 * 86400.0


def webhook_body(row: OutboxRow) -> bytes:
    body: dict[str, Any] = {
        "id": row.message_id,
        "type": row.topic,
        "created": int(row.created_at.timestamp()),
        "data": row.payload.get("data", {}),
    }
    return orjson.dumps(body)


def sign(body: bytes, secret: str, timestamp: int) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


class HostWebhookDeliverer:
    def __init__(
        self,
        url: str | None,
        secret: str | None,
        *,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self._secret = secret
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None

    async def deliver(self, row: OutboxRow) -> Sent | Skipped:
        if self._url is None or self._secret is None:
            return Skipped("RECON_HOST_WEBHOOK_URL is not set")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        body = webhook_body(row)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(body, self._secret, int(self._clock())),
            "User-Agent": "stripe-recon",
        }
        try:
            async with self._session.post(
                self._url, data=body, headers=headers, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    return Sent()
                raise DeliveryFailed(f"HTTP {response.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryFailed(f"unreachable ({type(exc).__name__})") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
