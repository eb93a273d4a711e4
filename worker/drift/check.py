"""The drift check (rule 14): each charge with ledger activity in a window, compared with what the
Stripe API says of it now; each difference raised as one ``drift`` exception, unless the same one
is already open.

Charges with an event still in flight are skipped (an inbox row ``retrying``, or an event received
in the last ``settle_s``): their ledger is about to change, and a difference now would be noise.
Requests go through ``StripeReads`` (a steady rate, 429 waited out); a few charges are checked at
once so that the rate, not the round trips, sets the pace. The ledger's side of a charge is read
right after Stripe's, so an event applied in between cannot look like drift.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import orjson
import structlog

from worker import metrics
from worker.drift.compare import Difference, OurCharge, OurDispute, OurRefund, StripeCharge, compare
from worker.drift.stripe_reads import StripeReadFailed, StripeReads

log = structlog.get_logger(__name__)

_CHARGES = """
select p.id, p.stripe_charge_id,
       exists (select 1 from recon.disputes d where d.payment_id = p.id) as has_disputes
from recon.payments p
where p.stripe_charge_id is not null
  and exists (select 1 from recon.ledger_entries l
              where l.payment_id = p.id
                and ((l.occurred_at >= $1 and l.occurred_at < $2)
                     or (l.booked_at >= $1 and l.booked_at < $2)))
order by p.id
"""

_IN_FLIGHT = """
select distinct e.payment_id from recon.event_inbox e
where e.payment_id = any($1::bigint[])
  and (e.outcome = 'retrying' or e.received_at > now() - make_interval(secs => $2)
       or e.processed_at > now() - make_interval(secs => $2))
"""

_OURS = """
select p.charge_total, p.charge_booked,
       coalesce((select jsonb_agg(jsonb_build_object(
                    'id', r.id, 'amount', r.amount, 'status', r.status,
                    'live', exists (select 1 from recon.ledger_entries l
                                    where l.kind = 'refund' and l.source_id = r.id)
                            and not exists (select 1 from recon.ledger_entries l
                                            where l.kind = 'refund_reversal' and l.source_id = r.id)))
                 from recon.refunds r where r.payment_id = p.id and not r.is_release), '[]') as refunds,
       coalesce((select jsonb_agg(jsonb_build_object(
                    'id', d.id, 'status', d.status,
                    'txns', coalesce((select jsonb_agg(l.source_id) from recon.ledger_entries l
                                      where l.payment_id = p.id and l.stripe_object_id = d.id
                                        and l.kind in ('dispute_withdrawal', 'dispute_reinstatement')),
                                     '[]')))
                 from recon.disputes d where d.payment_id = p.id), '[]') as disputes
from recon.payments p where p.id = $1
"""

_RAISE = """
insert into recon.exceptions (kind, stripe_event_id, stripe_object_id, detail)
values ('drift', null, $1, $2::jsonb)
on conflict (kind, coalesce(stripe_event_id, ''), coalesce(stripe_object_id, ''))
    where resolved_at is null do nothing
returning id
"""


@dataclass(frozen=True, slots=True)
class DriftTimings:
    """``settle_s``: an event received this recently keeps its charge out of the check;
    ``concurrency``: charges checked at once; ``progress_every_s``: how often progress is reported."""

    settle_s: float = 300.0
    concurrency: int = 4
    progress_every_s: float = 5.0


@dataclass(slots=True)
class Progress:
    charges: int  # to check
    checked: int = 0
    skipped_in_flight: int = 0
    failed: int = 0  # charges Stripe would not give us (after retries)
    differences: int = 0
    requests: int = 0
    rate_limited: int = 0
    requests_per_s: float = 0.0
    elapsed_s: float = 0.0

    def line(self) -> str:
        return (
            f"verify: {self.checked}/{self.charges} charges checked, {self.differences} differences, "
            f"{self.skipped_in_flight} skipped in flight, {self.failed} failed; "
            f"{self.requests} requests ({self.requests_per_s:.1f}/s), {self.rate_limited} rate-limited, "
            f"{self.elapsed_s:.1f}s"
        )


@dataclass(frozen=True, slots=True)
class Found:
    difference: Difference
    raised: bool  # False: the same difference was already open


@dataclass(slots=True)
class DriftReport:
    progress: Progress
    found: list[Found] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # "ch_…: why"

    @property
    def drift(self) -> bool:
        return bool(self.found)


class DriftCheck:
    def __init__(
        self,
        pool: asyncpg.Pool,
        reads: StripeReads,
        timings: DriftTimings = DriftTimings(),
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self._pool = pool
        self._reads = reads
        self._timings = timings
        self._on_progress = on_progress

    async def run(self, since: datetime, until: datetime) -> DriftReport:
        started = time.monotonic()
        async with self._pool.acquire() as con:
            rows = await con.fetch(_CHARGES, since, until)
            in_flight = {
                r["payment_id"]
                for r in await con.fetch(_IN_FLIGHT, [r["id"] for r in rows], self._timings.settle_s)
            }
        todo = [(r["id"], r["stripe_charge_id"], r["has_disputes"]) for r in rows if r["id"] not in in_flight]
        report = DriftReport(Progress(charges=len(rows), skipped_in_flight=len(rows) - len(todo)))
        queue: asyncio.Queue[tuple[int, str, bool]] = asyncio.Queue()
        for item in todo:
            queue.put_nowait(item)
        reporter = asyncio.create_task(self._report_every(report, started))
        try:
            workers = max(1, self._timings.concurrency)
            await asyncio.gather(*(self._work(queue, report) for _ in range(workers)))
        finally:
            reporter.cancel()
        self._update(report, started)
        if self._on_progress is not None:
            self._on_progress(report.progress)
        metrics.VERIFY_RUNS.labels(
            "drift" if report.drift else ("failed" if report.failures else "clean")
        ).inc()
        return report

    async def _work(self, queue: asyncio.Queue[tuple[int, str, bool]], report: DriftReport) -> None:
        while not queue.empty():
            payment_id, charge_id, has_disputes = queue.get_nowait()
            try:
                stripe_side = await self._stripe_side(charge_id, has_disputes)
            except StripeReadFailed as exc:
                report.progress.failed += 1
                report.failures.append(f"{charge_id}: {exc}")
                continue
            async with self._pool.acquire() as con:
                ours = await self._our_side(con, payment_id, charge_id)
                for difference in compare(ours, stripe_side):
                    raised = await con.fetchval(
                        _RAISE, difference.object_id, orjson.dumps(difference.detail()).decode()
                    )
                    report.found.append(Found(difference, raised is not None))
                    metrics.DRIFT_FOUND.labels(difference.field).inc()
                    report.progress.differences += 1
            report.progress.checked += 1

    async def _stripe_side(self, charge_id: str, has_disputes: bool) -> StripeCharge:
        """The charge, its refunds, and its disputes when either side knows of one (a request saved
        for the many charges never disputed)."""
        charge = await self._reads.charge(charge_id)
        refunds = await self._reads.refunds(charge_id)
        disputed = has_disputes or bool(charge.get("disputed"))
        disputes = await self._reads.disputes(charge_id) if disputed else []
        return StripeCharge(charge, refunds, disputes)

    @staticmethod
    async def _our_side(con: asyncpg.Connection, payment_id: int, charge_id: str) -> OurCharge:
        row = await con.fetchrow(_OURS, payment_id)
        ours = OurCharge(charge_id, int(row["charge_total"]) if row["charge_booked"] else 0)
        for refund in orjson.loads(row["refunds"]):
            ours.refunds[refund["id"]] = OurRefund(
                int(refund["amount"]), refund["status"], bool(refund["live"])
            )
        for dispute in orjson.loads(row["disputes"]):
            ours.disputes[dispute["id"]] = OurDispute(dispute["status"], frozenset(dispute["txns"]))
        return ours

    def _update(self, report: DriftReport, started: float) -> None:
        counts = self._reads.counts
        progress = report.progress
        progress.requests, progress.rate_limited = counts.requests, counts.rate_limited
        progress.elapsed_s = time.monotonic() - started
        progress.requests_per_s = counts.requests / progress.elapsed_s if progress.elapsed_s > 0 else 0.0

    async def _report_every(self, report: DriftReport, started: float) -> None:
        while True:
            await asyncio.sleep(self._timings.progress_every_s)  # a reporting period, not a wait for work
            self._update(report, started)
            if self._on_progress is not None:
                self._on_progress(report.progress)
