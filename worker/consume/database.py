"""The worker's PostgreSQL pool and the one policy for database trouble that is nobody's fault."""

from __future__ import annotations

import asyncpg
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from worker.settings import Settings


class NoConnection(Exception):
    """The pool could not hand out a connection (server down, refused, misconfigured)."""


_TRANSIENT_DB_ERRORS = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.PostgresConnectionError,  # includes ConnectionDoesNotExistError: the server went away
    asyncpg.CannotConnectNowError,  # starting up or shutting down
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
    NoConnection,
    OSError,  # connection refused or reset while (re)connecting
    TimeoutError,
)


# Whatever the database answers or fails to answer with: for a caller that has another way out
# (readiness reports it, a deferral falls back to the broker's wait queue, the mover tries again).
DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def is_transient_db_error(exc: BaseException) -> bool:
    """Errors that say nothing about the event: the same batch may well succeed on a retry."""
    if isinstance(exc, _TRANSIENT_DB_ERRORS):
        return True
    # asyncpg raises InterfaceError for a connection that died under it.
    return isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc)


def retrying_transient_db_errors(for_s: float) -> AsyncRetrying:
    """The one retry policy for database trouble that says nothing about the event (tenacity)."""
    return AsyncRetrying(
        retry=retry_if_exception(is_transient_db_error),
        stop=stop_after_delay(for_s),
        wait=wait_exponential(multiplier=0.05, max=2.0),
        reraise=True,
    )


async def _keep_session(_con: asyncpg.Connection) -> None:
    """Nothing to reset on release: the worker keeps no session state (no SET, LISTEN, advisory
    lock or cursor) on pooled connections, and asyncpg still rolls back an open transaction. The
    default reset costs a round trip per batch."""


# Every statement of the worker finds a handful of rows by key. With the default random_page_cost
# (4, for spinning disks) the planner prices index probes so high that it seq-scans tables of a
# few thousand rows (payments, orders, invoices) and hash-joins them on every batch
# (docs/performance.md has the plans and the figures). 1.1 is the usual value for SSDs and for
# data in cache; it is set on our sessions only, not on a database the host app shares.
SESSION_SETTINGS = {"random_page_cost": "1.1"}


class PoolNotCreated(RuntimeError):
    """asyncpg.create_pool returned None: it does only when told not to initialise, which we never do."""


async def open_pool(settings: Settings, max_size: int) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=1,
        max_size=max_size,
        command_timeout=30,
        reset=_keep_session,
        server_settings={**SESSION_SETTINGS, **settings.database_session()},
    )
    if pool is None:
        raise PoolNotCreated("asyncpg.create_pool returned no pool")
    return pool
