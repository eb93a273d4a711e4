"""The runner: a batch of messages into one transaction, each event isolated on failure, then verdicts.

Why a batch: the commit (a WAL flush) is the cost that dominates a small event, so N events share
one. A failing event rolls back alone and is retried or dead-lettered alone; the others commit —
by a savepoint per event, taken only when a batch has actually met a failing event (see
``_apply_retrying``). Transient database trouble (deadlock, serialization, a lost connection)
retries the whole batch — safe because nothing of it was committed, and every handler is safe to
run twice anyway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aio_pika
import asyncpg
import structlog
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from worker import verdicts
from worker.acks import Acks
from worker.broker import Publisher
from worker.deliveries import Inbound
from worker.refund_fetch import RefundFetcher, RefundFetchFailed
from worker.settings import Settings
from worker.verdicts import Verdict

if TYPE_CHECKING:
    from handlers import DeadLetter, Delivery, Policy, Result

log = structlog.get_logger("worker.consumer")

# How long a batch keeps retrying through database trouble before its messages are deferred to a
# wait queue (not failed: an outage is nobody's fault, and must not dead-letter healthy events).
DB_RETRY_FOR_S = 20.0

ApplyEvents = Callable[[asyncpg.Connection, Sequence["Delivery"], "Policy"], Awaitable[list["Result"]]]
RecordDeadLetter = Callable[[asyncpg.Connection, "DeadLetter"], Awaitable[None]]
RefundFetchNeeded = Callable[[dict[str, Any]], "str | None"]
Fetched = list[dict[str, Any]] | RefundFetchFailed


@dataclass(frozen=True, slots=True)
class Rules:
    """The reconciliation rules the runtime calls (handlers/__init__.py); tests inject their own."""

    apply_events: ApplyEvents
    record_dead_letter: RecordDeadLetter
    refund_fetch_needed: RefundFetchNeeded


def handlers_rules() -> Rules:
    import handlers

    return Rules(handlers.apply_events, handlers.record_dead_letter, handlers.refund_fetch_needed)


_TRANSIENT_DB_ERRORS = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.PostgresConnectionError,  # includes ConnectionDoesNotExistError: the server went away
    asyncpg.CannotConnectNowError,  # starting up or shutting down
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
    OSError,  # connection refused or reset while (re)connecting
    TimeoutError,
)


def is_transient_db_error(exc: BaseException) -> bool:
    """Errors that say nothing about the event: the same batch may well succeed on a retry."""
    if isinstance(exc, (*_TRANSIENT_DB_ERRORS, NoConnection)):
        return True
    # asyncpg raises InterfaceError for a connection that died under it.
    return isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc)


class EventFailed(Exception):
    """An event raised outside a savepoint: its batch's transaction must roll back."""

    def __init__(self, error: Exception) -> None:
        super().__init__(verdicts.one_line(error))
        self.error = error


def retrying_transient_db_errors(for_s: float) -> AsyncRetrying:
    """The one retry policy for database trouble that says nothing about the event (tenacity)."""
    return AsyncRetrying(
        retry=retry_if_exception(is_transient_db_error),
        stop=stop_after_delay(for_s),
        wait=wait_exponential(multiplier=0.05, max=2.0),
        reraise=True,
    )


class NoConnection(Exception):
    """The pool could not hand out a connection (server down, refused, misconfigured)."""


class DatabaseUnavailable(Exception):
    """Transient database errors outlasted DB_RETRY_FOR_S."""


@dataclass(slots=True)
class Planned:
    """A message on its way through a batch: its Delivery, or already a verdict (then no transaction)."""

    item: Inbound
    delivery: Delivery | None = None
    verdict: Verdict | None = None
    committed: bool = False


class BatchRunner:
    def __init__(
        self,
        pool: asyncpg.Pool,
        rules: Rules,
        settings: Settings,
        publisher: Publisher,
        fetch_refunds: RefundFetcher | None,
        acks: Acks,
    ) -> None:
        from handlers import Policy

        self._pool = pool
        self._rules = rules
        self._settings = settings
        self._publisher = publisher
        self._fetch_refunds = fetch_refunds
        self._acks = acks
        self._policy = Policy(unmatched_retry_s=settings.unmatched_retry_s)

    async def run(self, batch: Sequence[Inbound]) -> None:
        """Never raises (but for cancellation): a bug here requeues the batch instead of losing it."""
        batch = [item for item in batch if delivered_on_open_channel(item)]
        if not batch:
            return
        try:
            planned = await self._plan(batch)
            await self._apply(planned)
        except Exception:
            log.exception("batch_crashed", size=len(batch))
            for item in batch:
                await self._acks.nack(item.message)
            return
        await self._settle(planned)

    async def _plan(self, batch: Sequence[Inbound]) -> list[Planned]:
        from handlers import Delivery

        planned = [Planned(item) for item in batch]
        fetched = await self._fetch_needed_refunds(planned)
        for entry in planned:
            item = entry.item
            if entry.verdict is not None:
                continue
            if item.event is None:
                entry.verdict = verdicts.poison(item.parse_error or "body is not a Stripe event")
                continue
            refunds = fetched.get(item.event_id)
            if isinstance(refunds, RefundFetchFailed):
                if self._may_still_wait(item):
                    entry.verdict = verdicts.deferred("refund_fetch_failed")
                    continue
                refunds = None
            entry.delivery = Delivery(item.event, item.attempt, item.first_seen_at, refunds)
        return planned

    def _may_still_wait(self, item: Inbound) -> bool:
        """A failed fetch defers the event only within the unmatched window; after it the handlers
        judge without the API (and raise the mismatch), so a dead API cannot park an event forever."""
        waited_s = time.time() - item.first_seen_ms / 1000
        return waited_s < self._settings.unmatched_retry_s

    async def _fetch_needed_refunds(self, planned: list[Planned]) -> dict[str, Fetched]:
        """event id -> every refund of its charge, or the failure; concurrently, before any transaction."""
        wanted: dict[str, str] = {}
        for entry in planned:
            charge_id = self._charge_to_fetch(entry)
            if charge_id is not None:
                wanted[entry.item.event_id] = charge_id
        if not wanted:
            return {}
        charges = sorted(set(wanted.values()))
        results = dict(zip(charges, await asyncio.gather(*map(self._fetch_or_failure, charges)), strict=True))
        return {event_id: results[charge] for event_id, charge in wanted.items()}

    def _charge_to_fetch(self, entry: Planned) -> str | None:
        if entry.item.event is None or self._fetch_refunds is None:
            return None
        try:
            return self._rules.refund_fetch_needed(entry.item.event)
        except Exception as exc:  # a payload the rule cannot read is this event's failure
            entry.verdict = verdicts.failed(entry.item, exc, self._settings)
            return None

    async def _fetch_or_failure(self, charge_id: str) -> Fetched:
        assert self._fetch_refunds is not None
        try:
            return await self._fetch_refunds(charge_id)
        except RefundFetchFailed as exc:
            log.warning("refund_fetch_failed", stripe_charge_id=charge_id, error=str(exc))
            return exc

    async def _apply(self, planned: list[Planned]) -> None:
        todo = [entry for entry in planned if entry.verdict is None]
        if not todo:
            return
        try:
            await self._apply_retrying(todo)
        except DatabaseUnavailable as exc:
            log.warning("database_unavailable", size=len(todo), error=verdicts.one_line(exc))
            for entry in todo:
                entry.verdict = verdicts.deferred("database_unavailable")
        except Exception as exc:
            # Outside every savepoint, i.e. at COMMIT (a deferred constraint) or in the runtime:
            # no way to tell which event did it, so each runs alone and the culprit fails alone.
            await self._apply_alone(todo, exc)

    async def _apply_alone(self, todo: list[Planned], exc: Exception) -> None:
        if len(todo) == 1:
            log.warning("event_commit_failed", event_id=todo[0].item.event_id, error=verdicts.one_line(exc))
            todo[0].verdict = verdicts.failed(todo[0].item, exc, self._settings)
            return
        log.warning("batch_commit_failed_splitting", size=len(todo), error=verdicts.one_line(exc))
        for entry in todo:
            await self._apply([entry])

    async def _apply_retrying(self, todo: list[Planned]) -> None:
        """Savepoints only when needed: the batch first runs as one call to the rules (set-wise
        claims, locks and writes); if an event raises, the whole transaction rolls back and the
        batch runs again with a savepoint per event, so the culprit fails alone and the others
        commit — the same outcome as savepoints throughout, paid for only on failure.
        """
        try:
            found = await self._transaction_retrying(todo, isolate=False)
        except EventFailed as failed:
            if len(todo) > 1:
                found = await self._transaction_retrying(todo, isolate=True)
            else:  # alone, the rollback was its savepoint: nothing of it committed
                todo[0].verdict = verdicts.failed(todo[0].item, failed.error, self._settings)
                return
        for entry, verdict in zip(todo, found, strict=True):
            entry.verdict = verdict
            entry.committed = True

    async def _transaction_retrying(self, todo: list[Planned], *, isolate: bool) -> list[Verdict]:
        try:
            async for attempt in retrying_transient_db_errors(DB_RETRY_FOR_S):
                with attempt:
                    return await self._transaction(todo, isolate)
        except Exception as exc:
            if is_transient_db_error(exc):
                raise DatabaseUnavailable(verdicts.one_line(exc)) from exc
            raise
        raise AssertionError("unreachable: tenacity either returned or re-raised")

    async def _transaction(self, todo: list[Planned], isolate: bool) -> list[Verdict]:
        started = time.monotonic()
        try:
            con = await self._pool.acquire()
        except Exception as exc:  # no connection is never an event's fault, whatever the error
            raise NoConnection(verdicts.one_line(exc)) from exc
        try:
            async with con.transaction():
                if isolate:
                    found = [await self._apply_isolated(con, entry) for entry in todo]
                else:
                    found = await self._apply_together(con, todo)
        finally:
            await self._pool.release(con)
        log.debug(
            "batch_committed",
            size=len(todo),
            savepoints=isolate,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        return found

    async def _apply_together(self, con: asyncpg.Connection, todo: list[Planned]) -> list[Verdict]:
        """The whole batch in one call to the rules: their claims, locks and writes are set-wise."""
        deliveries = [entry.delivery for entry in todo if entry.delivery is not None]
        assert len(deliveries) == len(todo)
        try:
            results = await self._rules.apply_events(con, deliveries, self._policy)
        except Exception as exc:
            if is_transient_db_error(exc) or con.is_closed():
                raise
            if len(todo) == 1:
                log.warning("event_failed", event_id=todo[0].item.event_id, exc_info=True)
            else:
                log.info("batch_event_failed_isolating", size=len(todo), error=verdicts.one_line(exc))
            raise EventFailed(exc) from exc  # roll the batch back; it reruns with savepoints
        return [verdict_for(result) for result in results]

    async def _apply_isolated(self, con: asyncpg.Connection, entry: Planned) -> Verdict:
        """One event in its own savepoint inside the batch transaction: it fails alone."""
        assert entry.delivery is not None
        item = entry.item
        try:
            # Whatever the handlers log while applying carries the event's identity.
            with structlog.contextvars.bound_contextvars(
                event_id=item.event_id, event_type=item.event_type, attempt=item.attempt
            ):
                async with con.transaction():
                    [result] = await self._rules.apply_events(con, [entry.delivery], self._policy)
        except Exception as exc:
            if is_transient_db_error(exc) or con.is_closed():
                raise
            log.warning("event_failed", event_id=item.event_id, exc_info=True)
            return verdicts.failed(item, exc, self._settings)
        return verdict_for(result)

    async def _settle(self, planned: list[Planned]) -> None:
        committed_at = time.monotonic()
        publishes = []
        done = [entry.item.message for entry in planned if entry.verdict and entry.verdict.action == "ack"]
        await self._acks.ack(*done)  # one frame for the batch where the window allows
        for entry in planned:
            assert entry.verdict is not None
            if entry.verdict.action != "ack":
                publishes.append(
                    verdicts.settle(entry.item, entry.verdict, self._publisher, self._settings, self._acks)
                )
            verdicts.record(entry.item, entry.verdict, committed_at if entry.committed else None)
        if publishes:
            await asyncio.gather(*publishes)


def delivered_on_open_channel(item: Inbound) -> bool:
    """A message whose channel died (broker restart, connection cut) cannot be acked any more and
    the broker redelivers it: applying it now would only add a duplicate and a stray retry copy."""
    try:
        item.message.channel  # noqa: B018 - the property raises once the channel is closed
    except aio_pika.exceptions.ChannelInvalidStateError:
        return False
    return True


def verdict_for(result: Result) -> Verdict:
    common = {
        "stripe_object_id": result.stripe_object_id,
        "order_number": result.order_number,
        "invoice_number": result.invoice_number,
    }
    if result.outcome == "retrying":
        return Verdict("retry", "retrying", reason=result.retry_reason or "not_yet", **common)
    return Verdict("ack", result.outcome, **common)
