"""What the console's browser tests share: Debian's chromium driven by Playwright (never a browser
build of Playwright's own), and an order the way the seeds' screens show one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
from playwright.async_api import Page, async_playwright

from tests import builders as b
from tests import host_records as host
from tests.backoffice_setup import paid_order

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Screenshots go to docs/ (the README shows one) only when asked: RECON_SCREENSHOTS=docs. Otherwise
# a test run would rewrite tracked files; they go to a scratch folder instead.
DOCS = (
    Path(__file__).resolve().parent.parent / "docs"
    if os.environ.get("RECON_SCREENSHOTS") == "docs"
    else Path(tempfile.gettempdir()) / "recon-console-screenshots"
)
DOCS.mkdir(parents=True, exist_ok=True)


@asynccontextmanager
async def browser_page(width: int = 1280, height: int = 900) -> AsyncIterator[Page]:
    """A fresh browser context (no cookies) and one page in it."""
    if not CHROMIUM.exists():  # noqa: ASYNC240 - one stat before the browser starts
        pytest.fail(
            "Debian's chromium is missing: scripts/setup.sh venv installs it (apt-get install chromium)"
        )
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": width, "height": height})
            yield await context.new_page()
        finally:
            await browser.close()


async def partially_refunded_order(con: asyncpg.Connection, api_base: str, number: str) -> list[str]:
    """An order paid by two charges at localstripe ($30 then $20) with $10 of the first refunded
    from Stripe's dashboard (booked by its webhook): partially refunded, $40 refundable."""
    charges = await paid_order(con, api_base, number, [3000, 2000])
    refund = b.refund(charge_id=charges[0], amount=1000)
    await host.apply(con, b.incoming(b.refund_event("refund.created", refund)))
    return charges


async def open_dispute(con: asyncpg.Connection, charge_id: str, amount: int) -> str:
    """A dispute Stripe opened on the charge (charge.dispute.created applied); returns its id."""
    dispute = b.dispute(charge_id=charge_id, amount=amount)
    await host.apply(con, b.incoming(b.dispute_event("charge.dispute.created", dispute)))
    return str(dispute["id"])


async def raise_exception(con: asyncpg.Connection, kind: str, detail: str) -> int:
    exception_id: int = await con.fetchval(
        "insert into recon.exceptions (kind, stripe_object_id, detail) "
        "values ($1, 're_console_1', jsonb_build_object('detail', $2::text)) returning id",
        kind,
        detail,
    )
    return exception_id
