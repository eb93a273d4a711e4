"""``recon payouts [--since DATE] [--json]``: reconcile paid payouts that are not matched yet, for
accounts whose payout webhooks were missed, and print each payout's state.

Lists the paid payouts that arrived since DATE (default: the last 30 days) from the Stripe API,
saves them, and runs the payout reconciler (rule 13) on every paid payout of that window not yet
``matched`` — those the API listed and those webhooks recorded. A payout whose Stripe
reconciliation is not complete yet stays ``pending``; the worker retries it, or run this again.
``payout_rows`` is what ``recon report`` shows of payouts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from worker.drift.stripe_reads import StripeReadFailed, StripeReads
from worker.ops.text_table import render_table
from worker.payouts import store
from worker.payouts.reconciler import PayoutReconciler
from worker.settings import Settings, SettingsError

DEFAULT_WINDOW = timedelta(days=30)

_PAYOUT_ROWS = """
select p.stripe_payout_id, p.arrival_date, p.amount,
       finance.major_units(p.amount, p.currency) as amount_decimal, p.currency, p.status,
       p.reconciliation, p.lines, p.matched_lines, p.difference_lines,
       p.difference_amount, finance.major_units(p.difference_amount, p.currency) as difference_decimal
from finance.payouts p
where ($1::date is null or p.arrival_date >= $1) and ($2::text is null or p.currency = $2)
order by p.arrival_date desc nulls last, p.stripe_payout_id
"""

_NOT_MATCHED = """
select id from recon.payouts
where status = 'paid' and reconciliation <> 'matched' and ($1::date is null or arrival_date >= $1)
order by arrival_date, id
"""


async def payout_rows(
    con: asyncpg.Connection, *, since: datetime | None, currency: str | None
) -> list[dict[str, Any]]:
    """Payouts that arrived on or after ``since`` (UTC day), newest first: ``stripe_payout_id``,
    ``arrival_date``, ``amount`` (minor units) and ``amount_decimal``, ``currency``, ``status``,
    ``reconciliation``, the line counts, and ``difference_amount`` (minor units) with its decimal."""
    day = since.astimezone(UTC).date() if since is not None else None
    return [dict(row) for row in await con.fetch(_PAYOUT_ROWS, day, currency)]


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, date):
        return value.isoformat()
    return value


def _as_table(rows: list[dict[str, Any]]) -> str:
    headers = (
        "PAYOUT",
        "ARRIVAL",
        "AMOUNT",
        "CUR",
        "STATUS",
        "RECONCILIATION",
        "LINES",
        "DIFFERING",
        "DIFFERENCE",
    )
    cells = [
        (
            r["stripe_payout_id"],
            _plain(r["arrival_date"]) or "",
            format(r["amount_decimal"], ",f"),
            r["currency"],
            r["status"],
            r["reconciliation"],
            str(r["lines"]),
            str(r["difference_lines"]),
            format(r["difference_decimal"], ",f"),
        )
        for r in rows
    ]
    right = (False, False, True, False, False, False, True, True, True)
    return render_table(headers, cells, right_aligned=right)


async def _reconcile_window(settings: Settings, api_key: str, since: datetime) -> list[str]:
    """Save the API's paid payouts of the window and reconcile every one not matched; the
    payouts whose reconciliation could not finish, with why."""
    reads = StripeReads(api_key, settings.stripe_api_base)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        listed = await reads.paid_payouts(int(since.timestamp()))
        async with pool.acquire() as con:
            for payout in listed:
                await store.save_snapshot(con, payout)
            due = [r["id"] for r in await con.fetch(_NOT_MATCHED, since.astimezone(UTC).date())]
        reconciler = PayoutReconciler(pool, reads)
        notes = []
        for payout_id in due:
            done = await reconciler.reconcile(payout_id)
            if done.state in ("waiting", "not_reconcilable"):
                notes.append(f"{payout_id}: {done.note}")
        return notes
    finally:
        await reads.close()
        await pool.close()


async def reconcile_payouts(settings: Settings, *, since: datetime | None, as_json: bool) -> int:
    if not settings.stripe_api_key:
        raise SettingsError("STRIPE_API_KEY is not set: payouts are read from the Stripe API")
    # The stripe package logs every request at INFO on stdout, where it would break --json.
    logging.getLogger("stripe").setLevel(max(logging.WARNING, logging.getLogger().level))
    window_start = since if since is not None else datetime.now(UTC) - DEFAULT_WINDOW
    try:
        # Log lines go where stdout is at write time (worker/logs.py): to stderr here, so that
        # stdout holds only the table or the one JSON document.
        with contextlib.redirect_stdout(sys.stderr):
            notes = await _reconcile_window(settings, settings.stripe_api_key, window_start)
    except StripeReadFailed as exc:
        print(f"recon: error: Stripe API: {exc}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"recon payouts: not reconciled yet: {note}", file=sys.stderr)
    con = await asyncpg.connect(settings.database_url)
    try:
        rows = await payout_rows(con, since=window_start, currency=None)
    finally:
        await con.close()
    if as_json:
        print(json.dumps([{k: _plain(v) for k, v in row.items()} for row in rows]))
    elif rows:
        print(_as_table(rows))
    else:
        print("no payouts")
    return 0
