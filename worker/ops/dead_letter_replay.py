"""``recon dead-letters list|replay``: inspect dead-lettered events and re-queue them.

What each does is worker/workbench/dead_letters.py, shared with the ops console; this module
prints its answers and turns them into exit codes.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any

import asyncpg

from worker.ops.text_table import render_table
from worker.settings import Settings
from worker.workbench import dead_letters as work

EXIT_USAGE = 2
ERROR_CELL_CHARS = 60


def _iso(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment else ""


def _one_line(error: str | None) -> str:
    text = " ".join((error or "").split())
    return text if len(text) <= ERROR_CELL_CHARS else text[: ERROR_CELL_CHARS - 1] + "…"


def _as_dict(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "event_id": row["event_id"],
        "event_type": row["event_type"],
        "attempts": row["attempts"],
        "last_error": row["last_error"],
        "first_seen_at": _iso(row["first_seen_at"]),
        "last_seen_at": _iso(row["last_seen_at"]),
    }


def _as_table(rows: list[asyncpg.Record]) -> str:
    headers = ("EVENT ID", "TYPE", "ATTEMPTS", "LAST ERROR", "FIRST SEEN", "LAST SEEN")
    cells = [
        (
            r["event_id"],
            r["event_type"],
            str(r["attempts"]),
            _one_line(r["last_error"]),
            _iso(r["first_seen_at"]),
            _iso(r["last_seen_at"]),
        )
        for r in rows
    ]
    return render_table(headers, cells, right_aligned=(False, False, True))


async def list_dead_letters(settings: Settings, *, as_json: bool) -> int:
    """Print the dead letters not yet replayed: a table, or one JSON array (``[]`` when none)."""
    con = await asyncpg.connect(settings.database_url)
    try:
        rows = await work.pending(con)
    finally:
        await con.close()
    if as_json:
        print(json.dumps([_as_dict(row) for row in rows]))
    elif rows:
        print(_as_table(rows))
    else:
        print("no dead-lettered events waiting for replay")
    return 0


async def replay(settings: Settings, event_ids: list[str], *, replay_all: bool) -> int:
    """Re-queue the named dead letters (or every one not yet replayed); exit 2 on an unknown id."""
    con = await asyncpg.connect(settings.database_url)
    try:
        outcome = await work.replay(con, settings, event_ids, replay_all=replay_all)
    except work.NotDeadLettered as unknown:
        print(f"recon: error: {unknown}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        await con.close()
    if outcome.unconfirmed:
        reason = next(iter(outcome.unconfirmed.values()))
        ids = ", ".join(outcome.unconfirmed)
        print(
            f"recon: error: broker did not confirm {len(outcome.unconfirmed)} ({reason}), "
            f"not re-queued: {ids}",
            file=sys.stderr,
        )
    for letter in outcome.letters:
        if letter.event_id in outcome.confirmed:
            print(f"replayed {letter.event_id} ({letter.event_type})")
    print(f"{len(outcome.confirmed)} of {len(outcome.letters)} dead-lettered events re-queued")
    return 0 if len(outcome.confirmed) == len(outcome.letters) else 1
