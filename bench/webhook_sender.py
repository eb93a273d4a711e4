"""The end-to-end benchmark's load generator: signed webhooks at a fixed rate (open loop).

It runs in its own process and shares the two cores with what it measures (the receiver, RabbitMQ,
PostgreSQL), so it is kept lean; in production Stripe's sender is not on the machine at all.
Every request is signed (stripe.WebhookSignature, as Stripe would) and encoded before the clock
starts, sent as raw HTTP/1.1 over keep-alive connections, and its answer is read by a small
asyncio protocol on uvloop (aiohttp's client cost ~300 µs a request, asyncio streams ~150).
The CPU it reports is the sending's only, not the signing beforehand.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, cast

import uvloop

from tests.stripe_events import sign

CONNECTIONS = 200
RETRIES = 5  # a 503 means "retry later", as Stripe would
RETRY_PAUSE_S = 0.5


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request outstanding."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._answer: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def post(self, request: bytes) -> asyncio.Future[int]:
        """Send one request; the future gets the answer's status once its body has arrived."""
        assert self._transport is not None
        self._answer = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        return self._answer

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self._buffer[:end]).lower()
        length = _content_length(head)
        if len(self._buffer) < end + 4 + length:
            return
        del self._buffer[: end + 4 + length]
        answer, self._answer = self._answer, None
        if answer is not None and not answer.done():
            answer.set_result(int(head[9:12]))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(ConnectionError("the receiver closed the connection"))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _content_length(head: bytes) -> int:
    at = head.find(b"content-length:")
    if at < 0:
        return 0
    end = head.find(b"\r\n", at)
    return int(head[at + 15 : end if end >= 0 else len(head)])


def http_request(body: bytes, signature: str) -> bytes:
    head = (
        "POST /webhooks/stripe HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Stripe-Signature: {signature}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _post(
    pool: asyncio.Queue[_Connection],
    event_id: str,
    request: bytes,
    sent: dict[str, float],
    statuses: dict[int, int],
) -> None:
    sent.setdefault(event_id, time.time())  # a duplicate delivery keeps the first POST's time
    for _ in range(RETRIES):
        connection = await pool.get()
        try:
            status = await connection.post(request)
        finally:
            pool.put_nowait(connection)
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            return
        await asyncio.sleep(RETRY_PAUSE_S)


async def _send(host: str, port: int, requests: list[tuple[str, bytes]], rate: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    sent: dict[str, float] = {}
    statuses: dict[int, int] = {}
    pool: asyncio.Queue[_Connection] = asyncio.Queue()
    for _ in range(CONNECTIONS):
        _, connection = await loop.create_connection(_Connection, host, port)
        pool.put_nowait(connection)
    cpu_before = time.process_time()
    start = time.time() + 0.5
    tasks = []
    for i, (event_id, request) in enumerate(requests):
        delay = start + i / rate - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_post(pool, event_id, request, sent, statuses)))
    await asyncio.gather(*tasks)
    while not pool.empty():
        pool.get_nowait().close()
    return {
        "sent": sent,
        "statuses": statuses,
        "late_s": time.time() - start,
        "cpu_s": time.process_time() - cpu_before,
    }


def send_open_loop(
    base_url: str, bodies: list[tuple[str, bytes]], secret: str, rate: float, out: Path
) -> None:
    """POST each body at its scheduled time; write sent times, statuses and CPU to ``out``.

    A request waits for a free connection from the moment it is due; its lag counts from then.
    """
    host, port = base_url.removeprefix("http://").split(":")
    requests = [(event_id, http_request(body, sign(body, secret))) for event_id, body in bodies]
    out.write_text(json.dumps(uvloop.run(_send(host, int(port), requests, rate))))
