"""Drive the real thing in-process: an aiohttp app on a real port, signed POSTs, condition waits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
import asyncpg
from aiohttp import web

from tests.stripe_events import TEST_SECRET, encode, sign
from worker.serve import build_app
from worker.settings import Settings

T = TypeVar("T")


@asynccontextmanager
async def running(mode: str, settings: Settings) -> AsyncIterator[str]:
    """Run ``recon receiver|worker|run`` in this event loop on its real port; yields its base URL.

    Leaving the block runs the same cleanup as SIGTERM (drain, close), so tests see shutdown too.
    """
    app, port = build_app(mode, settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, port)
    await site.start()
    try:
        yield f"http://{settings.http_host}:{port}"
    finally:
        await runner.cleanup()


async def post_event(
    http: aiohttp.ClientSession,
    base_url: str,
    event: dict[str, Any] | bytes,
    *,
    secret: str = TEST_SECRET,
    timestamp: int | None = None,
    signature: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST one event, signed for real unless ``signature`` is given; returns (status, JSON body)."""
    body = event if isinstance(event, bytes) else encode(event)
    header = signature if signature is not None else sign(body, secret, timestamp)
    async with http.post(
        f"{base_url}/webhooks/stripe",
        data=body,
        headers={"Stripe-Signature": header, "Content-Type": "application/json"},
    ) as response:
        return response.status, await response.json(content_type=None)


async def wait_until(
    probe: Callable[[], Awaitable[T]],
    *,
    timeout_s: float = 20.0,
    interval_s: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)  # polling interval of a deadline wait, not a wait for work


async def fetch(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """The rows of one query, on a connection of its own."""
    con = await asyncpg.connect(database_url)
    try:
        rows: list[asyncpg.Record] = await con.fetch(sql, *args)
        return rows
    finally:
        await con.close()


async def events_settled(database_url: str, event_ids: list[str]) -> bool:
    """True once every event has a final outcome in finance.events (not retrying)."""
    rows = await fetch(
        database_url,
        "select count(*) as n from finance.events"
        " where stripe_event_id = any($1::text[]) and outcome <> 'retrying'",
        list(set(event_ids)),
    )
    return bool(rows[0]["n"] == len(set(event_ids)))


def via_port(url: str, port: int) -> str:
    """``url`` (postgresql:// or amqp://) sent to 127.0.0.1:``port`` instead, credentials and path
    kept: the address of a test's own TCP proxy in front of the server, or of a closed port."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{credentials}127.0.0.1:{port}"))
