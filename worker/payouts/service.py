"""The worker's checks against Stripe, as one aiohttp cleanup context: the payout reconciler loop,
and the drift check for the last 2 days every ``RECON_VERIFY_INTERVAL_S`` (when set).

Both need ``STRIPE_API_KEY``; without it nothing runs (the consumer already warns about the key)
and paid payouts stay ``pending`` until it is set.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import structlog
from aiohttp import web

from worker.drift.check import DriftCheck, DriftTimings, Progress
from worker.drift.stripe_reads import ReadTimings, StripeReads
from worker.payouts.reconciler import PayoutReconciler, PayoutTimings
from worker.settings import Settings

log = structlog.get_logger(__name__)

VERIFY_WINDOW = timedelta(days=2)


@dataclass(frozen=True, slots=True)
class ServiceTimings:
    payouts: PayoutTimings = PayoutTimings()
    reads: ReadTimings = ReadTimings()
    drift: DriftTimings = DriftTimings(progress_every_s=60.0)
    close_timeout_s: float = 5.0


def _log_progress(progress: Progress) -> None:
    log.info("verify_progress", **{k: getattr(progress, k) for k in progress.__dataclass_fields__})


async def periodic_drift_check(
    pool: asyncpg.Pool, reads: StripeReads, interval_s: float, timings: DriftTimings
) -> None:
    """The rule 14 check of the last 2 days, every ``interval_s``, the first one an interval after start."""
    check = DriftCheck(pool, reads, timings, on_progress=_log_progress)
    while True:
        await asyncio.sleep(interval_s)  # the check's period, not a wait for work
        until = datetime.now(UTC)
        try:
            report = await check.run(until - VERIFY_WINDOW, until)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("verify_database_error", error=type(exc).__name__)
            continue
        summary = {
            "differences": len(report.found),
            "raised": sum(1 for f in report.found if f.raised),
            "failed": len(report.failures),
            "charges": report.progress.charges,
        }
        if report.drift:
            log.warning("verify_found_drift", **summary)
        else:
            log.info("verify_finished", **summary)


def payouts_ctx(
    settings: Settings, timings: ServiceTimings = ServiceTimings()
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Start the payout reconciler (and the periodic drift check) with the app; stop them with it."""

    async def payouts_context(_app: web.Application) -> AsyncIterator[None]:
        if not settings.stripe_api_key:
            log.warning("payout_reconciliation_off", reason="STRIPE_API_KEY is not set")
            yield
            return
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
        reads = StripeReads(settings.stripe_api_key, settings.stripe_api_base, timings.reads)
        reconciler = PayoutReconciler(pool, reads, timings.payouts)
        tasks = [asyncio.create_task(reconciler.run_forever(settings.database_url), name="payout-reconciler")]
        if settings.verify_interval_s > 0:
            verify = periodic_drift_check(pool, reads, settings.verify_interval_s, timings.drift)
            tasks.append(asyncio.create_task(verify, name="drift-check"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            # A reconciliation cut short rolls back; its lease runs out and it is done again.
            await asyncio.gather(*tasks, return_exceptions=True)
            await reads.close()
            try:
                await asyncio.wait_for(pool.close(), timings.close_timeout_s)
            except TimeoutError:
                pool.terminate()

    return payouts_context
