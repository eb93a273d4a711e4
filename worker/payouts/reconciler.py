"""The payout reconciler (rule 13): outside any transaction it asks Stripe whether the payout's own
reconciliation is complete and lists every page of its balance transactions; then, in one
transaction, it matches each line to the ledger, books the fees and records the result.

    payout.* webhook ─▶ handlers/payouts.py saves the payout, due now, and NOTIFYs on commit
    PayoutReconciler.run_forever ─▶ claims a due payout (a lease) ─▶ GET /v1/payouts/{id}
        reconciliation_status not completed ─▶ due again after a backoff
        completed ─▶ GET /v1/balance_transactions?payout=… (every page) ─▶ one transaction:
            judge each line (lines.py), processing_fee rows, the lines, matched | differences,
            one payout_difference exception

``recon payouts`` calls ``reconcile`` directly for payouts webhooks never announced.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
import structlog

from worker import metrics
from worker.drift.stripe_reads import StripeReadFailed, StripeReads
from worker.payouts import store
from worker.payouts.lines import judge_payout, payout_lines

log = structlog.get_logger(__name__)

# handlers/payouts.py notifies on this channel when a paid payout becomes due (a test keeps the two equal).
PAYOUT_CHANNEL = "recon_payouts"

State = Literal["matched", "differences", "waiting", "not_paid", "not_reconcilable"]


@dataclass(frozen=True, slots=True)
class PayoutTimings:
    """``poll_s``: the longest the loop sleeps without a notification; ``lease_s``: how long a claimed
    payout is left to its claimer; ``retry_delays_s``: the waits while Stripe has not completed the
    payout's reconciliation or the API failed (the last repeats)."""

    poll_s: float = 60.0
    lease_s: float = 600.0
    retry_delays_s: Sequence[float] = (60.0, 300.0, 900.0, 3600.0)

    def retry_delay_s(self, attempts: int) -> float:
        delays = self.retry_delays_s
        return float(delays[min(max(attempts, 1), len(delays)) - 1])


@dataclass(frozen=True, slots=True)
class Reconciled:
    payout_id: str
    state: State
    lines: int = 0
    difference_amount: int = 0
    note: str | None = None


class PayoutReconciler:
    def __init__(
        self, pool: asyncpg.Pool, reads: StripeReads, timings: PayoutTimings = PayoutTimings()
    ) -> None:
        self._pool = pool
        self._reads = reads
        self._timings = timings

    async def reconcile(self, payout_id: str, attempts: int = 1) -> Reconciled:
        """Reconcile one payout now if Stripe lets us; never raises for the API's refusals."""
        try:
            payout = await self._reads.payout(payout_id)
        except StripeReadFailed as exc:
            return await self._later(payout_id, attempts, f"fetching the payout: {exc}")
        async with self._pool.acquire() as con:
            await store.save_snapshot(con, payout)
        if payout.get("status") != "paid":
            # failed or canceled: nothing was paid out; pending or in transit: its webhook will come.
            return Reconciled(payout_id, "not_paid", note=str(payout.get("status")))
        stripe_state = payout.get("reconciliation_status")
        if payout.get("automatic") is False or stripe_state == "not_applicable":
            async with self._pool.acquire() as con:
                await store.set_aside(con, payout_id, "a manual payout: Stripe lists no lines for it")
            return Reconciled(payout_id, "not_reconcilable", note="manual payout")
        if stripe_state != "completed":
            return await self._later(payout_id, attempts, f"Stripe's reconciliation_status is {stripe_state}")
        try:
            transactions = await self._reads.payout_lines(payout_id)
        except StripeReadFailed as exc:
            return await self._later(payout_id, attempts, f"listing its balance transactions: {exc}")
        return await self._record(
            payout_id, int(payout["amount"]), str(payout["currency"]).lower(), transactions
        )

    async def _later(self, payout_id: str, attempts: int, why: str) -> Reconciled:
        delay_s = self._timings.retry_delay_s(attempts)
        async with self._pool.acquire() as con:
            await store.retry_later(con, payout_id, delay_s, why)
        log.info("payout_reconciliation_deferred", stripe_payout_id=payout_id, why=why, retry_in_s=delay_s)
        return Reconciled(payout_id, "waiting", note=why)

    async def _record(
        self, payout_id: str, amount: int, currency: str, transactions: list[dict[str, Any]]
    ) -> Reconciled:
        lines = payout_lines(payout_id, transactions)
        async with self._pool.acquire() as con, con.transaction():
            payout = await store.lock_payout(con, payout_id)
            if payout is None:
                raise LookupError(f"payout {payout_id} vanished while being reconciled")
            facts = await store.ledger_facts(con, lines)
            judgement = judge_payout(amount, lines, facts)
            fees = await store.book_fees(con, judgement.verdicts, payout["stripe_event_id"])
            await store.save_lines(con, payout_id, judgement.verdicts)
            await store.save_result(con, payout_id, currency, judgement)
        metrics.PAYOUTS_RECONCILED.labels(judgement.reconciliation).inc()
        log.info(
            "payout_reconciled",
            stripe_payout_id=payout_id,
            reconciliation=judgement.reconciliation,
            lines=len(lines),
            differences=len(judgement.differences),
            difference_amount=judgement.difference_amount,
            fees_booked=fees,
        )
        return Reconciled(payout_id, judgement.reconciliation, len(lines), judgement.difference_amount)

    async def run_due(self) -> list[Reconciled]:
        """Every payout due now, one after another (each claimed with a lease first)."""
        done: list[Reconciled] = []
        while True:
            async with self._pool.acquire() as con:
                claimed = await store.claim_due(con, self._timings.lease_s)
            if claimed is None:
                return done
            done.append(await self.reconcile(claimed.payout_id, claimed.attempts))

    async def run_forever(self, database_url: str) -> None:
        """Reconcile due payouts whenever a handler says one is due, and every ``poll_s`` anyway (a
        retry falls due, a notification was missed while the listener was down)."""
        wake = asyncio.Event()
        listener = await self._listen(database_url, wake)
        try:
            while True:
                wake.clear()
                try:
                    await self.run_due()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("payout_reconciler_database_error", error=type(exc).__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self._timings.poll_s)
                if listener is None or listener.is_closed():
                    listener = await self._listen(database_url, wake)
        finally:
            if listener is not None and not listener.is_closed():
                await asyncio.shield(listener.close(timeout=2))

    @staticmethod
    async def _listen(database_url: str, wake: asyncio.Event) -> asyncpg.Connection | None:
        try:
            con = await asyncpg.connect(database_url, timeout=5)
            await con.add_listener(PAYOUT_CHANNEL, lambda *_: wake.set())
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            log.warning("payout_listener_unavailable", error=type(exc).__name__)
            return None
        return con
