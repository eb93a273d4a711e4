"""``recon report``: the finance summary, read from the ``finance`` views only.

* the summary finance asks for first, by UTC day and currency: gross charges (charge rows with
  their capture adjustments), refunds net of reversals, the refund rate, dispute movements,
  chargebacks (disputes closed lost that day, by count and amount), fees (dispute and processing);
* every non-charge row kind by UTC day of ``occurred_at`` and currency;
* payouts (arrived on or after ``--since``) and their reconciliation state;
* open disputes, soonest evidence deadline first;
* open exceptions by kind.

``--since`` limits the summary and the movements (money that moved on or after it); open disputes and open
exceptions are current state and always listed in full. ``--currency`` limits movements and
disputes. Amounts are summed as the views' exact ``amount_decimal`` (numeric, never float).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from worker.ops.payouts import payout_rows
from worker.ops.report_render import Column, Section, as_csv, as_json, as_table
from worker.settings import Settings

# A chargeback is a dispute that closed lost: counted on the UTC day it closed, in its currency.
# The refund rate is refunds (net of reversals) over gross charges of the same day and currency.
_SUMMARY_SQL = """
with money as (
    select (occurred_at at time zone 'UTC')::date as day, currency,
           coalesce(sum(amount_decimal) filter (where kind in ('charge', 'capture_adjustment')),
                    finance.major_units(0, currency)) as gross_charges,
           coalesce(sum(amount_decimal) filter (where kind in ('refund', 'refund_reversal')),
                    finance.major_units(0, currency)) as refunds,
           coalesce(sum(amount_decimal)
                        filter (where kind in ('dispute_withdrawal', 'dispute_reinstatement')),
                    finance.major_units(0, currency)) as dispute_movements,
           coalesce(sum(amount_decimal) filter (where kind in ('dispute_fee', 'processing_fee')),
                    finance.major_units(0, currency)) as fees,
           sum(amount_decimal) as net
    from finance.ledger
    where ($1::timestamptz is null or occurred_at >= $1) and ($2::text is null or currency = $2)
    group by 1, 2
), lost as (
    select (closed_at at time zone 'UTC')::date as day, currency, count(*) as chargebacks,
           sum(finance.major_units(amount, currency)) as chargeback_amount
    from finance.disputes
    where status = 'lost' and closed_at is not null
      and ($1::timestamptz is null or closed_at >= $1) and ($2::text is null or currency = $2)
    group by 1, 2
)
select day, currency,
       coalesce(m.gross_charges, finance.major_units(0, currency)) as gross_charges,
       coalesce(m.refunds, finance.major_units(0, currency)) as refunds,
       case when m.gross_charges > 0 then round(100 * -m.refunds / m.gross_charges, 2) end as refund_rate,
       coalesce(m.dispute_movements, finance.major_units(0, currency)) as dispute_movements,
       coalesce(l.chargebacks, 0) as chargebacks,
       coalesce(l.chargeback_amount, finance.major_units(0, currency)) as chargeback_amount,
       coalesce(m.fees, finance.major_units(0, currency)) as fees,
       coalesce(m.net, finance.major_units(0, currency)) as net
from money m
full join lost l using (day, currency)
order by day, currency
"""

# Signed sums per kind, exactly as booked; a day and currency with no movement of some kind
# shows that kind as zero at the currency's scale (major_units(0, currency)).
_MOVEMENTS_SQL = """
select (occurred_at at time zone 'UTC')::date as day,
       currency,
       coalesce(sum(amount_decimal) filter (where kind = 'refund'),
                finance.major_units(0, currency)) as refunds,
       coalesce(sum(amount_decimal) filter (where kind = 'refund_reversal'),
                finance.major_units(0, currency)) as refund_reversals,
       coalesce(sum(amount_decimal) filter (where kind = 'dispute_withdrawal'),
                finance.major_units(0, currency)) as dispute_withdrawals,
       coalesce(sum(amount_decimal) filter (where kind = 'dispute_fee'),
                finance.major_units(0, currency)) as dispute_fees,
       coalesce(sum(amount_decimal) filter (where kind = 'dispute_reinstatement'),
                finance.major_units(0, currency)) as dispute_reinstatements,
       coalesce(sum(amount_decimal) filter (where kind = 'capture_adjustment'),
                finance.major_units(0, currency)) as capture_adjustments,
       coalesce(sum(amount_decimal) filter (where kind = 'processing_fee'),
                finance.major_units(0, currency)) as processing_fees,
       sum(amount_decimal) as net
from finance.ledger
where kind <> 'charge'
  and ($1::timestamptz is null or occurred_at >= $1)
  and ($2::text is null or currency = $2)
group by 1, 2
order by 1, 2
"""

_OPEN_DISPUTES_SQL = """
select evidence_due_by, stripe_dispute_id, stripe_charge_id, order_number, invoice_number,
       finance.major_units(amount, currency) as amount, currency, reason, status
from finance.open_disputes
where $1::text is null or currency = $1
order by evidence_due_by asc nulls last, stripe_dispute_id
"""

_OPEN_EXCEPTIONS_SQL = """
select kind, count(*) as open, min(raised_at) as oldest_raised_at
from finance.exceptions
where resolved_at is null
group by kind
order by kind
"""

SUMMARY_COLUMNS = (
    Column("day", "DAY (UTC)", "day"),
    Column("currency", "CUR"),
    Column("gross_charges", "GROSS CHARGES", "money"),
    Column("refunds", "REFUNDS", "money"),
    Column("refund_rate", "REFUND RATE", "percent"),
    Column("dispute_movements", "DISPUTE MOVEMENTS", "money"),
    Column("chargebacks", "CHARGEBACKS", "count"),
    Column("chargeback_amount", "CHARGED BACK", "money"),
    Column("fees", "FEES", "money"),
    Column("net", "NET", "money"),
)
MOVEMENT_COLUMNS = (
    Column("day", "DAY (UTC)", "day"),
    Column("currency", "CUR"),
    Column("refunds", "REFUNDS", "money"),
    Column("refund_reversals", "REFUND REVERSALS", "money"),
    Column("dispute_withdrawals", "DISPUTE WITHDRAWALS", "money"),
    Column("dispute_fees", "DISPUTE FEES", "money"),
    Column("dispute_reinstatements", "DISPUTE REINSTATEMENTS", "money"),
    Column("capture_adjustments", "CAPTURE ADJUSTMENTS", "money"),
    Column("processing_fees", "PROCESSING FEES", "money"),
    Column("net", "NET", "money"),
)
PAYOUT_COLUMNS = (
    Column("arrival_date", "ARRIVAL", "day"),
    Column("stripe_payout_id", "PAYOUT"),
    Column("amount_decimal", "AMOUNT", "money"),
    Column("currency", "CUR"),
    Column("status", "STATUS"),
    Column("reconciliation", "RECONCILIATION"),
    Column("lines", "LINES", "count"),
    Column("difference_lines", "DIFFERING", "count"),
    Column("difference_decimal", "DIFFERENCE", "money"),
)
DISPUTE_COLUMNS = (
    Column("evidence_due_by", "EVIDENCE DUE (UTC)", "moment"),
    Column("stripe_dispute_id", "DISPUTE"),
    Column("stripe_charge_id", "CHARGE"),
    Column("order_number", "ORDER"),
    Column("invoice_number", "INVOICE"),
    Column("amount", "AMOUNT", "money"),
    Column("currency", "CUR"),
    Column("reason", "REASON"),
    Column("status", "STATUS"),
)
EXCEPTION_COLUMNS = (
    Column("kind", "KIND"),
    Column("open", "OPEN", "count"),
    Column("oldest_raised_at", "OLDEST (UTC)", "moment"),
)


async def load_sections(
    con: asyncpg.Connection, *, since: datetime | None, currency: str | None
) -> list[Section]:
    # UTC on this connection so timestamps print as UTC whatever the server's default is.
    await con.execute("set time zone 'UTC'")
    summary = await con.fetch(_SUMMARY_SQL, since, currency)
    movements = await con.fetch(_MOVEMENTS_SQL, since, currency)
    payouts = await payout_rows(con, since=since, currency=currency)
    disputes = await con.fetch(_OPEN_DISPUTES_SQL, currency)
    exceptions = await con.fetch(_OPEN_EXCEPTIONS_SQL)
    return [
        Section(
            "summary",
            "Summary by day (UTC) and currency: gross charges, refunds, chargebacks, fees",
            SUMMARY_COLUMNS,
            [dict(r) for r in summary],
        ),
        Section(
            "movements",
            "Every movement but charges, by kind, day (UTC) and currency",
            MOVEMENT_COLUMNS,
            [dict(r) for r in movements],
        ),
        Section("payouts", "Payouts and their reconciliation, newest first", PAYOUT_COLUMNS, payouts),
        Section(
            "open_disputes",
            "Open disputes, soonest evidence due first",
            DISPUTE_COLUMNS,
            [dict(r) for r in disputes],
        ),
        Section(
            "open_exceptions", "Open exceptions by kind", EXCEPTION_COLUMNS, [dict(r) for r in exceptions]
        ),
    ]


def _heading(since: datetime | None, currency: str | None) -> str:
    scope = [f"since {since.isoformat()}" if since else "all time"]
    if currency:
        scope.append(f"currency {currency}")
    return f"stripe-recon finance report ({', '.join(scope)}); amounts in major units"


def render(sections: list[Section], fmt: str, *, since: datetime | None, currency: str | None) -> str:
    if fmt == "csv":
        return as_csv(sections)
    if fmt == "json":
        filters: dict[str, Any] = {"since": since.isoformat() if since else None, "currency": currency}
        return as_json(sections, filters)
    return as_table(sections, _heading(since, currency))


async def print_report(settings: Settings, *, since: datetime | None, currency: str | None, fmt: str) -> int:
    """Print the summary in ``fmt`` (table, csv or json) to stdout."""
    con = await asyncpg.connect(settings.database_url)
    try:
        sections = await load_sections(con, since=since, currency=currency)
    finally:
        await con.close()
    print(render(sections, fmt, since=since, currency=currency))
    return 0
