"""The statements of a run of events, sent together: one round trip per statement text.

The event-family handlers plan their bookings first (``add``: the arguments come from the
payload and the payment's id, never from another statement's result), the run's statements go
to PostgreSQL pipelined (asyncpg ``fetchmany``, in the order they were added), and then each
event, in delivery order, reads its rows (``row``) and decides what they mean. A statement here
returns exactly one row per execution, so its n-th execution is its n-th row.

Statements of different texts touch different objects (refunds, disputes, dispute balance
transactions), so running them text by text leaves the database as running them in event order
would; only the ids of audit and ledger rows are ordered differently. The one text that reads
another's rows is the refund follow-up (handlers/refunds.py), always added right after the refund
statement and so run after every execution of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg


@dataclass(frozen=True, slots=True)
class Ticket:
    sql: str
    index: int


class Pipeline:
    def __init__(self) -> None:
        self._args: dict[str, list[tuple[Any, ...]]] = {}
        self._rows: dict[str, list[asyncpg.Record]] = {}

    def add(self, sql: str, args: tuple[Any, ...]) -> Ticket:
        planned = self._args.setdefault(sql, [])
        planned.append(args)
        return Ticket(sql, len(planned) - 1)

    async def run(self, con: asyncpg.Connection) -> None:
        for sql, args in self._args.items():
            rows = await con.fetchmany(sql, args)
            if len(rows) != len(args):  # a statement here must return one row per execution
                raise RuntimeError(f"pipeline: {len(rows)} rows for {len(args)} executions")
            self._rows[sql] = rows
        self._args.clear()

    def row(self, ticket: Ticket) -> asyncpg.Record:
        return self._rows[ticket.sql][ticket.index]
