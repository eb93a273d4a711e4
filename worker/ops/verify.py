"""``recon verify [--since DATE] [--until DATE] [--json]``: the drift check of rule 14, on demand.

Compares each charge with ledger activity in the window (default: the last 2 days) with the
Stripe API, raises each difference as one ``drift`` exception (not again while the same one is
open), prints the differences and exits 1 if there are any. Progress goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from worker.drift.check import DriftCheck, DriftReport, Progress
from worker.drift.stripe_reads import StripeReads
from worker.ops.text_table import render_table
from worker.settings import Settings, SettingsError

DEFAULT_WINDOW = timedelta(days=2)
EXIT_DRIFT = 1


def _progress_to_stderr(progress: Progress) -> None:
    print(progress.line(), file=sys.stderr, flush=True)


def _differences(report: DriftReport) -> list[dict[str, Any]]:
    return [
        {
            "charge": f.difference.charge_id,
            "object": f.difference.object_id,
            "field": f.difference.field,
            "ours": f.difference.ours,
            "stripe": f.difference.stripe,
            "exception": "raised" if f.raised else "already_open",
        }
        for f in report.found
    ]


def _as_table(rows: list[dict[str, Any]]) -> str:
    headers = ("CHARGE", "OBJECT", "FIELD", "OURS", "STRIPE", "EXCEPTION")
    cells = [
        (r["charge"], r["object"], r["field"], json.dumps(r["ours"]), json.dumps(r["stripe"]), r["exception"])
        for r in rows
    ]
    return render_table(headers, cells)


async def verify(settings: Settings, *, since: datetime | None, until: datetime | None, as_json: bool) -> int:
    if not settings.stripe_api_key:
        raise SettingsError("STRIPE_API_KEY is not set: verify reads charges from the Stripe API")
    end = until if until is not None else datetime.now(UTC)
    start = since if since is not None else end - DEFAULT_WINDOW
    if end <= start:
        raise SettingsError("--until must be after --since")
    logging.getLogger("stripe").setLevel(max(logging.WARNING, logging.getLogger().level))
    reads = StripeReads(settings.stripe_api_key, settings.stripe_api_base)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
    try:
        # Log lines go where stdout is at write time (worker/logs.py): to stderr, with the progress.
        with contextlib.redirect_stdout(sys.stderr):
            report = await DriftCheck(pool, reads, on_progress=_progress_to_stderr).run(start, end)
    finally:
        await reads.close()
        await pool.close()
    rows = _differences(report)
    if as_json:
        print(
            json.dumps(
                {
                    "since": start.isoformat(),
                    "until": end.isoformat(),
                    "differences": rows,
                    "failed": report.failures,
                    "charges": report.progress.charges,
                    "checked": report.progress.checked,
                    "skipped_in_flight": report.progress.skipped_in_flight,
                }
            )
        )
    elif rows:
        print(_as_table(rows))
    else:
        print(f"no drift: {report.progress.checked} charges agree with Stripe")
    for failure in report.failures:
        print(f"recon verify: could not check {failure}", file=sys.stderr)
    if report.drift:
        return EXIT_DRIFT
    return 1 if report.failures else 0
