"""``recon backfill --since DATE [--until DATE]``: queue the events a webhook outage made us miss.

Pages through Stripe's event list (only the types we handle, every page) and queues each event
the inbox has not seen, exactly as the receiver would: raw event JSON, routed by type,
publisher-confirmed. Safe while webhooks keep arriving: an event queued twice (by a webhook in
flight and by us) is applied once, the inbox makes the second a duplicate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg
import stripe

from worker.amqp.publisher import Publisher, PublishFailed, event_message, publisher_session
from worker.events import HANDLED_TYPES, NotAnEvent, parse_event
from worker.settings import Settings, SettingsError

PAGE_LIMIT = 100  # Stripe's maximum page size
# The stripe package's default is 80 s a try; a backfill should fail fast and be re-run.
STRIPE_TIMEOUT_S = 20.0
STRIPE_NETWORK_RETRIES = 2

_KNOWN_SQL = "select event_id from recon.event_inbox where event_id = any($1::text[])"


@dataclass(slots=True)
class BackfillCounts:
    seen: int = 0
    queued: int = 0
    already_known: int = 0
    skipped: int = 0  # refused by the receiver's own checks (other mode, not an event, other type)

    def line(self) -> str:
        line = f"seen {self.seen}, queued {self.queued}, already known {self.already_known}"
        return f"{line}, skipped {self.skipped} the receiver would refuse" if self.skipped else line


def event_list_params(since: datetime, until: datetime | None) -> dict[str, Any]:
    """Filters for GET /v1/events: our types only, created within [since, until]."""
    created: dict[str, int] = {"gte": int(since.timestamp())}
    if until is not None:
        created["lte"] = int(until.timestamp())
    return {"types": sorted(HANDLED_TYPES), "created": created, "limit": PAGE_LIMIT}


def stripe_client(api_key: str, settings: Settings, session: aiohttp.ClientSession) -> stripe.StripeClient:
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": settings.stripe_api_base} if settings.stripe_api_base else None,
        http_client=stripe.AIOHTTPClient(session=session),
        max_network_retries=STRIPE_NETWORK_RETRIES,
    )


async def event_pages(
    client: stripe.StripeClient, params: dict[str, Any]
) -> AsyncIterator[list[dict[str, Any]]]:
    """Every page of the event list, newest first, each event as plain JSON-ready dicts."""
    page = await client.v1.events.list_async(params)  # type: ignore[arg-type]
    while True:
        yield [event.to_dict() for event in page.data]
        if not page.has_more:
            return
        # next_page_async keeps the filters and adds starting_after = the last id on this page.
        page = await page.next_page_async()


@dataclass(frozen=True, slots=True)
class ListedEvent:
    event: dict[str, Any]
    body: bytes  # what is queued: the event's JSON, as a webhook would carry it


def _queueable(events: list[dict[str, Any]], livemode: bool | None) -> list[ListedEvent]:
    """The events the receiver itself would queue: a valid envelope of a handled type, in the
    configured mode (a test-mode key must not feed test events into a live ledger)."""
    good: list[ListedEvent] = []
    for event in events:
        body = json.dumps(event, separators=(",", ":")).encode()
        try:
            parse_event(body, livemode)
        except NotAnEvent:
            continue
        if event["type"] in HANDLED_TYPES:
            good.append(ListedEvent(event, body))
    return good


async def _queue(publisher: Publisher, listed: ListedEvent) -> None:
    event = listed.event
    await publisher.publish_event(event_message(listed.body, event["id"], event["type"], event["created"]))


async def _queue_page(
    con: asyncpg.Connection,
    publisher: Publisher,
    page: list[dict[str, Any]],
    livemode: bool | None,
    counts: BackfillCounts,
) -> None:
    events = _queueable(page, livemode)
    known = {r["event_id"] for r in await con.fetch(_KNOWN_SQL, [e.event["id"] for e in events])}
    fresh = [e for e in events if e.event["id"] not in known]
    await asyncio.gather(*(_queue(publisher, listed) for listed in fresh))
    counts.seen += len(page)
    counts.skipped += len(page) - len(events)
    counts.already_known += len(events) - len(fresh)
    counts.queued += len(fresh)


async def _run(settings: Settings, api_key: str, params: dict[str, Any], counts: BackfillCounts) -> None:
    timeout = aiohttp.ClientTimeout(total=STRIPE_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        client = stripe_client(api_key, settings, session)
        con = await asyncpg.connect(settings.database_url)
        try:
            async with publisher_session(settings) as publisher:
                async for page in event_pages(client, params):
                    await _queue_page(con, publisher, page, settings.livemode, counts)
        finally:
            await con.close()


async def backfill(settings: Settings, *, since: datetime, until: datetime | None) -> int:
    """Queue every handled event created in [since, until] that the inbox has not seen."""
    if until is not None and until < since:
        raise SettingsError("--until is before --since")
    if not settings.stripe_api_key:
        raise SettingsError("STRIPE_API_KEY is not set: backfill lists events from the Stripe API")
    # The stripe package logs every request and retry at INFO as unstructured lines on stdout,
    # where they would bury the one summary line; its warnings still show.
    logging.getLogger("stripe").setLevel(max(logging.WARNING, logging.getLogger().level))
    counts = BackfillCounts()
    try:
        await _run(settings, settings.stripe_api_key, event_list_params(since, until), counts)
    except stripe.StripeError as exc:
        # Never the message: Stripe echoes part of the key in authentication errors.
        status = f" (HTTP {exc.http_status})" if exc.http_status else ""
        print(f"recon: error: Stripe API: {type(exc).__name__}{status}; {counts.line()}", file=sys.stderr)
        return 1
    except PublishFailed as exc:
        print(f"recon: error: broker did not confirm a publish ({exc}); {counts.line()}", file=sys.stderr)
        return 1
    print(counts.line())
    return 0
