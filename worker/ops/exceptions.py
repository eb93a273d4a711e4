"""``recon exceptions list|resolve|retry``: work through what the worker could not settle alone.

What each does is worker/workbench/exceptions.py, shared with the ops console; this module prints
its answers and turns them into exit codes.
"""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Sequence
from typing import Any

import asyncpg

from worker.ops.text_table import render_table
from worker.settings import Settings, SettingsError
from worker.workbench import exceptions as work
from worker.workbench.exceptions import KINDS, RETRYABLE

EXIT_USAGE = 2
DETAIL_CELL_CHARS = 50
__all__ = ["KINDS", "RETRYABLE", "list_exceptions", "resolve", "retry"]


def _short(detail: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v}" for k, v in detail.items())
    return text if len(text) <= DETAIL_CELL_CHARS else text[: DETAIL_CELL_CHARS - 1] + "…"


def _as_table(items: list[dict[str, Any]]) -> str:
    headers = ("ID", "RAISED", "KIND", "EVENT", "OBJECT", "DETAIL", "RESOLVED", "BY", "NOTE")
    cells = [
        (
            str(e["id"]),
            e["raised_at"] or "",
            e["kind"],
            e["stripe_event_id"] or "",
            e["stripe_object_id"] or "",
            _short(e["detail"]),
            e["resolved_at"] or "open",
            e["resolved_by"] or "",
            e["resolution_note"] or "",
        )
        for e in items
    ]
    return render_table(headers, cells, right_aligned=(True,))


async def list_exceptions(settings: Settings, *, open_only: bool, kind: str | None, as_json: bool) -> int:
    """Print exceptions, newest first: a table, or one JSON array (``[]`` when there are none)."""
    if kind is not None and kind not in KINDS:
        raise SettingsError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    con = await asyncpg.connect(settings.database_url)
    try:
        items = [work.as_dict(r) for r in await work.list_exceptions(con, open_only=open_only, kind=kind)]
    finally:
        await con.close()
    if as_json:
        print(json.dumps(items))
    elif items:
        print(_as_table(items))
    else:
        print("no exceptions" + (" open" if open_only else ""))
    return 0


def _default_by() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return "unknown"


async def resolve(settings: Settings, ids: Sequence[int], *, note: str, by: str | None) -> int:
    """Resolve the named exceptions with a note; exit 2 when an id does not exist."""
    if not note.strip():
        raise SettingsError("--note must say why the exceptions are resolved")
    con = await asyncpg.connect(settings.database_url)
    try:
        closed = await work.resolve(con, ids, note=note, by=by or _default_by())
    except work.UnknownExceptions as unknown:
        print(f"recon: error: {unknown}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        await con.close()
    for exception_id in ids:
        print(f"{'resolved' if exception_id in closed else 'already resolved'} {exception_id}")
    return 0


async def retry(settings: Settings, ids: Sequence[int]) -> int:
    """Re-queue the events behind the named exceptions with a fresh waiting window.

    Exit 2 (nothing done) when an id is unknown or not retryable; exit 1 when the broker refused
    some messages (their inbox rows are restored, their exceptions stay open as they were).
    """
    con = await asyncpg.connect(settings.database_url)
    try:
        outcome = await work.retry(con, settings, ids)
    except work.RetryRefused as refused:
        print(f"recon: error: {refused}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        await con.close()
    for item in outcome.queued:
        print(f"retrying exception {item.exception_id}: {item.event_type} {item.event_id}")
    if outcome.refused:
        names = ", ".join(str(item.exception_id) for item in outcome.refused)
        print(f"recon: error: the broker did not take the events of exceptions {names}", file=sys.stderr)
        return 1
    return 0
