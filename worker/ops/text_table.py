"""Plain-text tables for the operator commands (dead-letters list, report, demo)."""

from __future__ import annotations

from collections.abc import Sequence

# Columns whose cells are right-aligned (amounts, counts) so digits line up.
Alignment = Sequence[bool]


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, right_aligned: Alignment = ()
) -> str:
    """A fixed-width table with a header rule; ``right_aligned[i]`` right-aligns column i."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    align = list(right_aligned) + [False] * (len(headers) - len(right_aligned))

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.rjust(w) if right else cell.ljust(w)
            for cell, w, right in zip(cells, widths, align, strict=True)
        )
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])
