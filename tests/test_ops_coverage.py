"""`recon verify` and `recon payouts` as an operator reads them: the table and the --json forms,
the empty results, the refusals before any work, and a read that fails, against the local Stripe
API of tests/stripe_ledger_api.py and this test's own database."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tests import builders as b
from tests import host_records as host
from tests import stripe_ledger_api as api
from tests.test_payouts import _paid_charge
from tests.test_verify import settle_inbox
from worker.ops import verify as verify_mod
from worker.ops.payouts import reconcile_payouts
from worker.ops.verify import verify
from worker.settings import Settings, SettingsError

NOW = int(time.time())


@pytest.fixture(name="ledger")
async def ledger_fixture(settings: Settings) -> AsyncIterator[tuple[api.StripeLedgerApi, Settings]]:
    """The local Stripe API served, and settings that point at it with its key."""
    served = api.StripeLedgerApi()
    async with api.serving(served) as base:
        yield served, replace(settings, stripe_api_key=api.API_KEY, stripe_api_base=base)


async def test_verify_refuses_without_a_key_or_with_an_empty_window(settings: Settings) -> None:
    """No STRIPE_API_KEY, or --until not after --since: a SettingsError before any read."""
    with pytest.raises(SettingsError, match="STRIPE_API_KEY"):
        await verify(replace(settings, stripe_api_key=None), since=None, until=None, as_json=False)
    day = datetime(2024, 1, 2, tzinfo=UTC)
    keyed = replace(settings, stripe_api_key=api.API_KEY)
    with pytest.raises(SettingsError, match="--until must be after --since"):
        await verify(keyed, since=day, until=day, as_json=True)


async def test_verify_with_no_charges_says_no_drift_in_both_forms(
    ledger: tuple[api.StripeLedgerApi, Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty ledger: the table form prints one line saying nothing drifted, the JSON form an
    empty list of differences over the window asked for; both exit 0."""
    _, s = ledger
    assert await verify(s, since=None, until=None, as_json=False) == 0
    assert capsys.readouterr().out.strip() == "no drift: 0 charges agree with Stripe"
    until = datetime.now(UTC)
    since = until - timedelta(hours=1)
    assert await verify(s, since=since, until=until, as_json=True) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["since"], shown["until"]) == (since.isoformat(), until.isoformat())
    assert (shown["differences"], shown["failed"], shown["charges"]) == ([], [], 0)


async def test_verify_prints_the_differences_as_a_table_and_the_charges_it_could_not_check(
    con: asyncpg.Connection,
    ledger: tuple[api.StripeLedgerApi, Settings],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The table form: one row per difference (a captured amount Stripe says is 700 where the
    ledger booked 900, raised as an exception), and on stderr one line per charge Stripe would not
    give (404 at once, not retried); exit 1 for the drift."""
    served, s = ledger
    await _paid_charge(con, "ch_vt", 900)
    await _paid_charge(con, "ch_gone", 400)
    await settle_inbox(con)
    served.charges["ch_vt"] = dict(b.charge(charge_id="ch_vt", amount=900), amount_captured=700)
    assert await verify(s, since=None, until=None, as_json=False) == 1
    out, err = capsys.readouterr()
    header, _rule, row = out.splitlines()
    assert header.split() == ["CHARGE", "OBJECT", "FIELD", "OURS", "STRIPE", "EXCEPTION"]
    assert row.split() == ["ch_vt", "ch_vt", "captured", "900", "700", "raised"]
    assert "recon verify: could not check ch_gone: InvalidRequestError (HTTP 404)" in err
    assert [r.status for r in served.requests_to("/v1/charges/ch_gone")] == [404]
    [raised] = await host.exceptions(con, "drift")
    assert (raised["stripe_object_id"], raised["detail"]["ours"], raised["detail"]["stripe"]) == (
        "ch_vt",
        900,
        700,
    )


def test_the_verify_table_shows_each_difference_with_json_values() -> None:
    """Each difference is one row: ids, field, both values as JSON, and whether it was raised."""
    rows = [
        {
            "charge": "ch_1",
            "object": "re_1",
            "field": "amount",
            "ours": 100,
            "stripe": None,
            "exception": "raised",
        }
    ]
    header, *_rule, row = verify_mod._as_table(rows).splitlines()
    assert header.split() == ["CHARGE", "OBJECT", "FIELD", "OURS", "STRIPE", "EXCEPTION"]
    assert row.split() == ["ch_1", "re_1", "amount", "100", "null", "raised"]


async def test_payouts_refuses_without_a_key(settings: Settings) -> None:
    """No STRIPE_API_KEY: a SettingsError, nothing read."""
    with pytest.raises(SettingsError, match="STRIPE_API_KEY"):
        await reconcile_payouts(replace(settings, stripe_api_key=None), since=None, as_json=False)


async def test_payouts_table_lists_a_reconciled_payout_and_says_when_there_are_none(
    con: asyncpg.Connection,
    ledger: tuple[api.StripeLedgerApi, Settings],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Nothing in the window: the table form prints "no payouts". A payout the API lists: one row
    with its id, amount in major units, state and counts, and exit 0."""
    served, s = ledger
    assert await reconcile_payouts(s, since=None, as_json=False) == 0
    assert capsys.readouterr().out.strip() == "no payouts"
    await _paid_charge(con, "ch_tab", 123456)
    lines = [api.line(txn_type="charge", amount=123456, fee=100, source="ch_tab", created=NOW - 3 * 86400)]
    payout = api.payout(payout_id="po_tab", amount=123356, arrival_date=NOW - 86400, created=NOW - 2 * 86400)
    served.add_payout(payout, [*lines, api.payout_own_line(payout)])
    assert await reconcile_payouts(s, since=None, as_json=False) == 0
    header, *_rule, row = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["PAYOUT", "ARRIVAL", "AMOUNT"]
    cells = row.split()
    assert cells[0] == "po_tab" and cells[2:6] == ["1,233.56", "usd", "paid", "matched"]


async def test_a_payout_stripe_has_not_finished_is_noted_and_stays_pending(
    ledger: tuple[api.StripeLedgerApi, Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    """A paid payout whose Stripe reconciliation is in progress: stderr notes it is not reconciled
    yet, the JSON lists it as pending, exit 0."""
    served, s = ledger
    payout = api.payout(
        payout_id="po_busy",
        amount=500,
        arrival_date=NOW - 86400,
        created=NOW - 2 * 86400,
        reconciliation_status="in_progress",
    )
    served.add_payout(payout, [])
    assert await reconcile_payouts(s, since=None, as_json=True) == 0
    out, err = capsys.readouterr()
    assert "recon payouts: not reconciled yet: po_busy" in err
    [shown] = json.loads(out)
    assert (shown["stripe_payout_id"], shown["reconciliation"]) == ("po_busy", "pending")


async def test_a_payouts_read_stripe_refuses_exits_1_with_one_line(
    ledger: tuple[api.StripeLedgerApi, Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    """A key the API refuses: exit 1 and one error line naming the Stripe API on stderr, no stdout."""
    _, s = ledger
    assert await reconcile_payouts(replace(s, stripe_api_key="sk_test_wrong"), since=None, as_json=True) == 1
    out, err = capsys.readouterr()
    assert out == "" and "recon: error: Stripe API:" in err
