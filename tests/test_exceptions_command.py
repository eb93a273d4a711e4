"""``recon exceptions list|resolve|retry`` against the real database and broker.

The retry test runs the whole loop: an event that matched nothing becomes an unmatched_charge
exception, the host then writes the order, and a retry applies the event and closes the exception.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from tests import builders as b
from tests import host_records as host
from tests.harness import wait_until
from tests.test_rules_e2e import db, ledger, one, outcome, paid_charge, recon
from worker import cli
from worker.ops import exceptions
from worker.settings import Settings


async def _raise(settings: Settings, kind: str, event_id: str, object_id: str) -> int:
    """Insert one open exception as the rules would raise it; its id."""
    async with db(settings) as con:
        return int(
            await con.fetchval(
                "insert into recon.exceptions (kind, stripe_event_id, stripe_object_id, detail)"
                " values ($1, $2, $3, '{\"amount\": 100}'::jsonb) returning id",
                kind,
                event_id,
                object_id,
            )
        )


def _printed_json(capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(capsys.readouterr().out)


async def test_list_prints_an_empty_array_when_there_is_nothing(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--json`` with no exceptions prints ``[]``, and the table form says there are none."""
    assert await exceptions.list_exceptions(settings, open_only=True, kind=None, as_json=True) == 0
    assert _printed_json(capsys) == []
    assert await exceptions.list_exceptions(settings, open_only=True, kind=None, as_json=False) == 0
    assert capsys.readouterr().out.strip() == "no exceptions open"


async def test_list_filters_by_open_and_kind(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    """``--open`` drops resolved ones, ``--kind`` keeps one kind; JSON carries every column."""
    over = await _raise(settings, "over_refund", "evt_over", "re_over")
    failed = await _raise(settings, "refund_failed", "evt_failed", "re_failed")
    assert await exceptions.resolve(settings, [over], note="checked with Stripe", by="ana") == 0
    capsys.readouterr()

    assert await exceptions.list_exceptions(settings, open_only=True, kind=None, as_json=True) == 0
    assert [e["id"] for e in _printed_json(capsys)] == [failed]
    assert await exceptions.list_exceptions(settings, open_only=False, kind="over_refund", as_json=True) == 0
    [listed] = _printed_json(capsys)
    assert (listed["id"], listed["resolved_by"], listed["resolution_note"]) == (
        over,
        "ana",
        "checked with Stripe",
    )
    assert listed["detail"] == {"amount": 100} and listed["resolved_at"] is not None
    assert await exceptions.list_exceptions(settings, open_only=False, kind=None, as_json=False) == 0
    table = capsys.readouterr().out
    assert "refund_failed" in table and "over_refund" in table and "open" in table


def test_an_unknown_kind_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A ``--kind`` that is not an exception kind is a usage error: exit 2, one line, no traceback."""
    assert cli.main(["exceptions", "list", "--kind", "bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--kind must be one of" in err


async def test_resolve_keeps_who_when_and_the_note_and_audits_once(settings: Settings) -> None:
    """Resolving writes resolved_at/by/note (seen by finance) and one exception_resolved audit row;
    resolving again changes nothing; an unknown id exits 2 and resolves nothing."""
    exception_id = await _raise(settings, "over_refund", "evt_r1", "re_r1")
    other = await _raise(settings, "drift", "evt_r2", "ch_r2")
    assert await exceptions.resolve(settings, [exception_id], note="  refunded by hand  ", by="bo") == 0
    assert await exceptions.resolve(settings, [exception_id], note="again", by="someone else") == 0
    assert await exceptions.resolve(settings, [other, 999_999], note="x", by="bo") == 2
    row = await one(
        settings,
        "select resolved_by, resolution_note, resolved_at is not null from finance.exceptions where id = $1",
        exception_id,
    )
    assert tuple(row) == ("bo", "refunded by hand", True)
    assert await one(settings, "select resolved_at from finance.exceptions where id = $1", other) is None
    audits = await one(settings, "select count(*) from recon.audit_log where action = 'exception_resolved'")
    assert audits == 1


async def test_retry_refuses_kinds_it_cannot_retry(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only unmatched_charge and refund_mismatch can be retried: anything else exits 2 naming why."""
    exception_id = await _raise(settings, "over_refund", "evt_x", "re_x")
    assert await exceptions.retry(settings, [exception_id]) == 2
    assert "only unmatched_charge and refund_mismatch" in capsys.readouterr().err


async def test_retry_applies_an_unmatched_event_once_its_order_exists(settings: Settings) -> None:
    """A charge naming an order the host has not written yet ends unmatched with an exception; after
    the host writes the order, ``retry`` re-queues it with a fresh window: it applies, books its
    charge row, and the exception closes itself; the retry is audited."""
    s = replace(settings, unmatched_retry_s=2, retry_delays_s=(0.2, 0.5))
    charge = paid_charge("ch_late_order", 1500, metadata={"order_number": "ORD-LATE"})
    early = b.charge_event("charge.succeeded", charge, created=b.T0 + 1)
    async with recon(s) as stripe:
        await stripe.post(early)
        await stripe.settled(early, timeout_s=30)
        assert await outcome(s, early) == "unmatched"
        exception_id = await one(
            s, "select id from finance.exceptions where kind = 'unmatched_charge' and resolved_at is null"
        )
        async with db(s) as con:
            await host.add_order(con, "ORD-LATE", amount_total=1500)
        assert await exceptions.retry(s, [exception_id]) == 0

        async def resolved() -> bool:
            return (
                await one(s, "select resolved_at from finance.exceptions where id = $1", exception_id)
                is not None
            )

        await wait_until(resolved, timeout_s=20, what="the retried event to apply")
    assert await outcome(s, early) == "applied"
    assert await ledger(s, "ch_late_order") == Counter({("charge", 1500, "usd", "ch_late_order"): 1})
    assert (
        await one(s, "select resolved_by from finance.exceptions where id = $1", exception_id)
        == "recon worker"
    )
    assert await one(s, "select count(*) from recon.audit_log where action = 'exception_retried'") == 1
