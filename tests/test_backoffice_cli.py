"""``recon refund`` and ``recon reject-order``: rule 11 from the shell, exit codes and what they print."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.backoffice_setup import (
    front_fixture,  # noqa: F401 - the fixture `front`
    localstripe_url_fixture,  # noqa: F401 - the fixture `localstripe_url`
    paid_order,
)
from tests.stripe_front import API_KEY, StripeFront
from worker import cli
from worker.settings import Settings

pytestmark = pytest.mark.filterwarnings("ignore:Bare functions are deprecated:DeprecationWarning")


async def recon(monkeypatch: pytest.MonkeyPatch, settings: Settings, api_base: str, *argv: str) -> int:
    """The console script in a thread of its own (it runs its own event loop), configured by environment."""
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("STRIPE_API_KEY", API_KEY)
    monkeypatch.setenv("STRIPE_API_BASE", api_base)
    monkeypatch.setenv("LOG_LEVEL", "error")
    return await asyncio.to_thread(cli.main, list(argv))


async def test_recon_refund_prints_the_request_and_exits_1_over_the_cap(
    settings: Settings,
    con: asyncpg.Connection,
    front: tuple[StripeFront, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A refund by order prints the request, its Stripe refund id and state, and exits 0; asking for
    more than is left exits 1 naming what is refundable now, in the currency's format; `other`
    without --note exits 2. The OS user is who asked."""
    api, base = front
    await paid_order(con, base, "ORD-K1", [110_000], currency="jpy")
    code = await recon(
        monkeypatch,
        settings,
        base,
        "refund",
        "--order",
        "ORD-K1",
        "--amount",
        "10000",
        "--reason",
        "duplicate",
    )
    out = capsys.readouterr().out
    assert code == 0
    [refund] = api.created
    assert "submitted, ¥10,000 on order ORD-K1" in out and refund["id"] in out
    assert "refundable now: ¥100,000" in out
    over = await recon(
        monkeypatch,
        settings,
        base,
        "refund",
        "--order",
        "ORD-K1",
        "--amount",
        "100001",
        "--reason",
        "duplicate",
    )
    assert over == 1
    assert "¥100,000 (100000)" in capsys.readouterr().err
    assert await recon(monkeypatch, settings, base, "refund", "--order", "ORD-K1", "--reason", "other") == 2
    assert len(api.created) == 1
    assert await con.fetchval("select requested_by from recon.refund_requests") not in (None, "")


async def test_recon_reject_order_rejects_and_refunds_everything(
    settings: Settings,
    con: asyncpg.Connection,
    front: tuple[StripeFront, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """reject-order: the order is rejected and all that is refundable goes back in one request;
    a second time there is nothing left, and it says so (exit 0)."""
    api, base = front
    await paid_order(con, base, "ORD-K2", [1500, 500])
    assert (
        await recon(monkeypatch, settings, base, "reject-order", "ORD-K2", "--note", "fraud suspected") == 0
    )
    assert "submitted, $20.00 on order ORD-K2 (other)" in capsys.readouterr().out
    assert await recon(monkeypatch, settings, base, "reject-order", "ORD-K2", "--note", "again") == 0
    assert "nothing was refundable" in capsys.readouterr().out
    assert sorted(r["amount"] for r in api.created) == [500, 1500]
    assert await con.fetchval("select status from recon.orders where number = 'ORD-K2'") == "rejected"
