"""The runner: a batch of messages into one transaction, each event isolated on failure, then each
message's fate (worker/consume/fate.py) carried out after the commit.

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
from typing import Any

import asyncpg
import structlog

import handlers
from handlers import DeadLetter, EventToApply, Policy, Result
from worker.amqp.publisher import Publisher
from worker.consume.acks import Acks
from worker.consume.database import NoConnection, is_transient_db_error, retrying_transient_db_errors
from worker.consume.fate import Applied, Fact, NotYet, Raised, Unreadable, decide, one_line
from worker.consume.inbound import Inbound
from worker.consume.refund_fetch import RefundFetcher, RefundFetchFailed
from worker.consume.settle import record, settle
from worker.settings import Settings

log = structlog.get_logger(__name__)

ApplyEvents = Callable[[asyncpg.Connection, Sequence[EventToApply], Policy], Awaitable[list[Result]]]
RecordDeadLetter = Callable[[asyncpg.Connection, DeadLetter], Awaitable[None]]
RefundFetchNeeded = Callable[[dict[str, Any]], "str | None"]
Fetched = list[dict[str, Any]] | RefundFetchFailed


@dataclass(frozen=True, slots=True)
class Rules:
    """The reconciliation rules the runtime calls (the ``handlers`` package); tests inject their own."""

    apply_events: ApplyEvents
    record_dead_letter: RecordDeadLetter
    refund_fetch_needed: RefundFetchNeeded


def handlers_rules() -> Rules:
    return Rules(handlers.apply_events, handlers.record_dead_letter, handlers.refund_fetch_needed)


class EventFailed(Exception):
    """An event raised outside a savepoint: its batch's transaction must roll back."""

    def __init__(self, error: Exception) -> None:
        super().__init__(one_line(error))
        self.error = error


class DatabaseUnavailable(Exception):
    """Transient database errors outlasted the runner's database retry time."""


@dataclass(slots=True)
class Planned:
    """A message on its way through a batch: the event to apply, or already the fact about it."""

    item: Inbound
    incoming: EventToApply | None = None
    fact: Fact | None = None
    committed: bool = False


class BatchRunner:
    """``db_retry_for_s``: how long a batch keeps retrying through database trouble before its
    messages are deferred to a wait queue (not failed: an outage is nobody's fault, and must not
    dead-letter healthy events)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        rules: Rules,
        settings: Settings,
        publisher: Publisher,
        fetch_refunds: RefundFetcher | None,
        acks: Acks,
        policy: Policy,
        db_retry_for_s: float,
    ) -> None:
        self._pool = pool
        self._rules = rules
        self._settings = settings
        self._publisher = publisher
        self._fetch_refunds = fetch_refunds
        self._acks = acks
        self._policy = policy
        self._db_retry_for_s = db_retry_for_s

    async def run(self, batch: Sequence[Inbound]) -> None:
        """Never raises (but for cancellation): a bug here requeues the batch instead of losing it."""
        # A message whose channel died (broker restart, connection cut) cannot be acked any more
        # and the broker redelivers it: applying it now would only add a duplicate and a retry copy.
        batch = [item for item in batch if item.message.on_open_channel]
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
        planned = [Planned(item) for item in batch]
        fetched = await self._fetch_needed_refunds(planned)
        for entry in planned:
            item = entry.item
            if entry.fact is not None:
                continue
            if item.event is None:
                entry.fact = Unreadable(item.parse_error or "body is not a Stripe event")
                continue
            refunds = fetched.get(item.event_id)
            if isinstance(refunds, RefundFetchFailed):
                # Within the waiting window a failed fetch defers the event; after it the rules
                # judge without the API (and raise the mismatch): a dead API parks nothing forever.
                if self._policy.may_still_wait(item.first_seen_at):
                    entry.fact = NotYet("refund_fetch_failed")
                    continue
                refunds = None
            entry.incoming = EventToApply(item.event, item.attempt, item.first_seen_at, refunds)
        return planned

    async def _fetch_needed_refunds(self, planned: list[Planned]) -> dict[str, Fetched]:
        """event id -> every refund of its charge, or the failure; concurrently, before any transaction."""
        if self._fetch_refunds is None:
            return {}
        wanted: dict[str, str] = {}
        for entry in planned:
            charge_id = self._charge_to_fetch(entry)
            if charge_id is not None:
                wanted[entry.item.event_id] = charge_id
        if not wanted:
            return {}
        charges = sorted(set(wanted.values()))
        fetch = self._fetch_refunds
        results = dict(
            zip(charges, await asyncio.gather(*(self._fetch(fetch, c) for c in charges)), strict=True)
        )
        return {event_id: results[charge] for event_id, charge in wanted.items()}

    def _charge_to_fetch(self, entry: Planned) -> str | None:
        if entry.item.event is None:
            return None
        try:
            return self._rules.refund_fetch_needed(entry.item.event)
        except Exception as exc:  # a payload the rule cannot read is this event's failure
            entry.fact = Raised(one_line(exc))
            return None

    @staticmethod
    async def _fetch(fetch: RefundFetcher, charge_id: str) -> Fetched:
        try:
            return await fetch(charge_id)
        except RefundFetchFailed as exc:
            log.warning("refund_fetch_failed", stripe_charge_id=charge_id, error=str(exc))
            return exc

    async def _apply(self, planned: list[Planned]) -> None:
        todo = [entry for entry in planned if entry.fact is None]
        if not todo:
            return
        try:
            await self._apply_retrying(todo)
        except DatabaseUnavailable as exc:
            log.warning("database_unavailable", size=len(todo), error=one_line(exc))
            for entry in todo:
                entry.fact = NotYet("database_unavailable")
        except Exception as exc:
            # Outside every savepoint, i.e. at COMMIT (a deferred constraint) or in the runtime:
            # no way to tell which event did it, so each runs alone and the culprit fails alone.
            await self._apply_alone(todo, exc)

    async def _apply_alone(self, todo: list[Planned], exc: Exception) -> None:
        if len(todo) == 1:
            log.warning("event_commit_failed", event_id=todo[0].item.event_id, error=one_line(exc))
            todo[0].fact = Raised(one_line(exc))
            return
        log.warning("batch_commit_failed_splitting", size=len(todo), error=one_line(exc))
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
                todo[0].fact = Raised(one_line(failed.error))
                return
        for entry, fact in zip(todo, found, strict=True):
            entry.fact = fact
            entry.committed = True

    async def _transaction_retrying(self, todo: list[Planned], *, isolate: bool) -> list[Fact]:
        try:
            async for attempt in retrying_transient_db_errors(self._db_retry_for_s):
                with attempt:
                    return await self._transaction(todo, isolate)
        except Exception as exc:
            if is_transient_db_error(exc):
                raise DatabaseUnavailable(one_line(exc)) from exc
            raise
        raise RetryEnded("tenacity neither returned nor re-raised")

    async def _transaction(self, todo: list[Planned], isolate: bool) -> list[Fact]:
        started = time.monotonic()
        try:
            con = await self._pool.acquire()
        except Exception as exc:  # no connection is never an event's fault, whatever the error
            raise NoConnection(one_line(exc)) from exc
        try:
            async with con.transaction():
                if isolate:
                    found = [await self._apply_isolated(con, entry) for entry in todo]
                else:
                    found = await self._apply_together(con, todo)
        finally:
            await self._pool.release(con)
        ms = round((time.monotonic() - started) * 1000, 1)
        log.debug("batch_committed", size=len(todo), savepoints=isolate, ms=ms)
        return found

    async def _apply_together(self, con: asyncpg.Connection, todo: list[Planned]) -> list[Fact]:
        """The whole batch in one call to the rules: their claims, locks and writes are set-wise."""
        try:
            results = await self._rules.apply_events(con, [_incoming(entry) for entry in todo], self._policy)
        except Exception as exc:
            if is_transient_db_error(exc) or con.is_closed():
                raise
            if len(todo) == 1:
                log.warning("event_failed", event_id=todo[0].item.event_id, exc_info=True)
            else:
                log.info("batch_event_failed_isolating", size=len(todo), error=one_line(exc))
            raise EventFailed(exc) from exc  # roll the batch back; it reruns with savepoints
        return [Applied(result) for result in results]

    async def _apply_isolated(self, con: asyncpg.Connection, entry: Planned) -> Fact:
        """One event in its own savepoint inside the batch transaction: it fails alone."""
        item = entry.item
        try:
            # Whatever the handlers log while applying carries the event's identity.
            with structlog.contextvars.bound_contextvars(
                event_id=item.event_id, event_type=item.event_type, attempt=item.attempt
            ):
                async with con.transaction():
                    [result] = await self._rules.apply_events(con, [_incoming(entry)], self._policy)
        except Exception as exc:
            if is_transient_db_error(exc) or con.is_closed():
                raise
            log.warning("event_failed", event_id=item.event_id, exc_info=True)
            return Raised(one_line(exc))
        return Applied(result)

    async def _settle(self, planned: list[Planned]) -> None:
        committed_at = time.monotonic()
        fates = [(entry, decide(entry.item, _fact(entry), self._settings)) for entry in planned]
        await self._acks.ack(*(entry.item.message for entry, fate in fates if fate.action == "ack"))
        copies = []
        for entry, fate in fates:
            if fate.action != "ack":
                copies.append(settle(entry.item, fate, self._publisher, self._acks, self._pool))
            record(entry.item, fate, committed_at if entry.committed else None)
        if copies:
            await asyncio.gather(*copies)


class RetryEnded(RuntimeError):
    """tenacity's loop ended without a result or an error: it cannot, with reraise=True."""


class MissingFact(RuntimeError):
    """A planned message reached its settling without a fact: a bug in the runner."""


def _fact(entry: Planned) -> Fact:
    if entry.fact is None:
        raise MissingFact(f"no fact for {entry.item.event_id}")
    return entry.fact


def _incoming(entry: Planned) -> EventToApply:
    if entry.incoming is None:
        raise MissingFact(f"no event to apply for {entry.item.event_id}")
    return entry.incoming
