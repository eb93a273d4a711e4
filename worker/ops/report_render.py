"""The finance report's sections rendered as a text table, CSV or JSON.

Money arrives as exact ``Decimal`` major units with the currency's scale (computed by the
database's ``finance.major_units``, the one source of currency exponents), so rendering never
needs to know a currency: it only chooses separators.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Literal

from worker.ops.text_table import render_table

ColumnKind = Literal["text", "money", "percent", "count", "moment", "day", "flag"]


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    header: str
    kind: ColumnKind = "text"


@dataclass(frozen=True, slots=True)
class Section:
    name: str  # machine name: the CSV section and the JSON key
    title: str  # heading in the table format
    columns: tuple[Column, ...]
    rows: list[dict[str, Any]]


def _plain(value: Any, kind: ColumnKind) -> Any:
    """A JSON-ready value: money as an exact decimal string, times as ISO 8601."""
    if value is None:
        return None
    if kind in ("money", "percent"):
        return format(Decimal(value), "f")
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def _table_cell(value: Any, kind: ColumnKind) -> str:
    if value is None:
        return ""
    if kind == "money":
        return format(Decimal(value), ",f")
    if kind == "percent":
        return f"{Decimal(value):f}%"
    if kind == "moment":
        return str(value.astimezone(UTC).strftime("%Y-%m-%d %H:%M"))
    if kind == "flag":
        return "yes" if value else "no"
    return str(_plain(value, kind))


def as_table(sections: list[Section], heading: str) -> str:
    parts = [heading]
    for section in sections:
        headers = [c.header for c in section.columns]
        rows = [[_table_cell(row[c.key], c.kind) for c in section.columns] for row in section.rows]
        right = [c.kind in ("money", "percent", "count") for c in section.columns]
        body = render_table(headers, rows, right_aligned=right) if rows else "(none)"
        parts.append(f"{section.title}\n{body}")
    return "\n\n".join(parts)


def as_csv(sections: list[Section]) -> str:
    """One block per section, each with its own header row led by ``section``, blank-line separated."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for index, section in enumerate(sections):
        if index:
            out.write("\n")
        writer.writerow(["section", *(c.key for c in section.columns)])
        for row in section.rows:
            cells = (_plain(row[c.key], c.kind) for c in section.columns)
            writer.writerow([section.name, *("" if cell is None else cell for cell in cells)])
    return out.getvalue().rstrip("\n")


def as_json(sections: list[Section], filters: dict[str, Any]) -> str:
    document: dict[str, Any] = {"filters": filters}
    for section in sections:
        document[section.name] = [
            {c.key: _plain(row[c.key], c.kind) for c in section.columns} for row in section.rows
        ]
    return json.dumps(document, indent=2)
