"""Drive the consumer runtime in-process with injected rules, and feed its queues for real."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
from aiohttp import web

from tests.harness import fetch, wait_until
from tests.stripe_events import encode
from worker.amqp import topology
from worker.amqp.connection import connect, declare_topology, open_confirm_channel
from worker.amqp.publisher import Publisher, event_message
from worker.consume.consumer import CONSUMER, Consumer, ConsumerTimings, consumer_ctx
from worker.consume.refund_fetch import RefundFetcher
from worker.consume.runner import Rules
from worker.health import add_health_routes
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def consumer_running(
    settings: Settings,
    rules: Rules | None = None,
    fetcher: RefundFetcher | None = None,
    timings: ConsumerTimings | None = None,
) -> AsyncIterator[Consumer]:
    """The consumer's cleanup context in a bare aiohttp app; leaving runs the SIGTERM path (drain)."""
    app = web.Application()
    add_health_routes(app)
    app.cleanup_ctx.append(consumer_ctx(settings, rules, fetcher, timings or ConsumerTimings()))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        yield app[CONSUMER]
    finally:
        await runner.cleanup()


@asynccontextmanager
async def feeder(amqp_url: str, settings: Settings) -> AsyncIterator[Feeder]:
    """A confirmed publisher into the test's vhost, with the topology declared."""
    connection = await connect(amqp_url)
    try:
        await declare_topology(connection, settings)
        channel = await open_confirm_channel(connection)
        yield Feeder(connection, Publisher(channel))
    finally:
        await connection.close()


@dataclass
class Feeder:
    connection: aio_pika.abc.AbstractRobustConnection
    publisher: Publisher

    async def event(self, event: dict[str, Any], headers: dict[str, Any] | None = None) -> None:
        message = event_message(encode(event), event["id"], event["type"], event["created"], headers)
        await self.publisher.publish_event(message)

    async def raw(self, body: bytes, event_type: str = "charge.refunded", message_id: str = "evt_x") -> None:
        message = event_message(body, message_id, event_type, 0)
        await self.publisher.publish_event(message)

    async def depth(self, queue_name: str = topology.WORK_QUEUE) -> int:
        """Messages ready in a queue (unacked ones are not counted)."""
        channel = await self.connection.channel()
        try:
            underlay = await channel.get_underlay_channel()
            declared = await underlay.queue_declare(queue_name, passive=True)
            return int(declared.message_count or 0)
        finally:
            await channel.close()


def event(event_id: str, charge_id: str = "ch_1", event_type: str = "charge.refunded") -> dict[str, Any]:
    """A minimal envelope; mechanics tests do not need a realistic object."""
    return {
        "id": event_id,
        "object": "event",
        "type": event_type,
        "created": 1_700_000_000,
        "data": {"object": {"id": charge_id, "object": "charge"}},
    }


APPLIED_TABLE = """
create table if not exists public.applied (
    event_id text primary key,
    attempt int not null,
    fetched int,
    applied_seq bigint generated always as identity
);
create table if not exists public.dead (
    event_id text, event_type text, error text, attempts int, body bytea
);
"""


@dataclass
class FakeRules:
    """Rules whose effects are rows in public.applied / public.dead. ``behaviour`` maps an event id
    to a coroutine run first on each apply: it may raise, or return a Result to use instead of the
    normal insert (None: carry on). Every apply call is recorded as (event id, attempt)."""

    behaviour: dict[str, Callable[[asyncpg.Connection, Any], Awaitable[Any]]] = field(default_factory=dict)
    calls: list[tuple[str, int]] = field(default_factory=list)
    fetch_for: Callable[[dict[str, Any]], str | None] = lambda _event: None

    def rules(self) -> Rules:
        return Rules(self.apply_events, self.record_dead_letter, self.fetch_for)

    async def apply_events(self, con: asyncpg.Connection, deliveries: Any, policy: Any) -> list[Any]:
        return [await self.apply_event(con, delivery, policy) for delivery in deliveries]

    async def apply_event(self, con: asyncpg.Connection, delivery: Any, policy: Any) -> Any:
        from handlers import Result

        event_id = delivery.event["id"]
        self.calls.append((event_id, delivery.attempt))
        special = self.behaviour.get(event_id)
        if special is not None and (outcome := await special(con, delivery)) is not None:
            return outcome
        fetched = None if delivery.fetched_refunds is None else len(delivery.fetched_refunds)
        inserted = await con.fetchval(
            "insert into public.applied (event_id, attempt, fetched) values ($1, $2, $3) "
            "on conflict do nothing returning event_id",
            event_id,
            delivery.attempt,
            fetched,
        )
        object_id = delivery.event["data"]["object"]["id"]
        return Result("applied" if inserted else "duplicate", stripe_object_id=object_id)

    async def record_dead_letter(self, con: asyncpg.Connection, dead: Any) -> None:
        await con.execute(
            "insert into public.dead (event_id, event_type, error, attempts, body) "
            "values ($1, $2, $3, $4, $5)",
            dead.event_id,
            dead.event_type,
            dead.error,
            dead.attempts,
            dead.body,
        )


async def prepare_fake_tables(database_url: str) -> None:
    con = await asyncpg.connect(database_url)
    try:
        await con.execute(APPLIED_TABLE)
    finally:
        await con.close()


# --- `recon worker` as a real subprocess --------------------------------------------------------


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    retry = ",".join(str(d) for d in settings.retry_delays_s)
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "AMQP_URL": settings.amqp_url,
        "RECON_WORKER_HTTP_PORT": str(settings.worker_http_port),
        "RECON_MAX_ATTEMPTS": str(settings.max_attempts),
        "RECON_UNMATCHED_RETRY_S": str(settings.unmatched_retry_s),
        "RECON_RETRY_DELAYS_S": retry,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "info",
    }
    env.pop("STRIPE_API_KEY", None)
    env.update(extra)
    return env


class WorkerProcess:
    """``recon worker`` in a subprocess; its stdout (JSON log lines) goes to a file for post-mortems."""

    def __init__(self, settings: Settings, log_path: Path, **extra_env: str) -> None:
        self._settings = settings
        self._log_path = log_path
        self._env = worker_env(settings, **extra_env)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self._log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker"],
            cwd=ROOT,
            env=self._env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    async def ready(self) -> None:
        """Wait for /readyz 200 (the consumer is started: topology declared, consuming)."""
        import aiohttp

        url = f"http://127.0.0.1:{self._settings.worker_http_port}/readyz"

        async def probe() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited early with {self.process.returncode}: {self.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with aiohttp.ClientSession() as http, http.get(url) as response:
                    return response.status == 200
            return False

        await wait_until(probe, timeout_s=30, interval_s=0.1, what="worker readiness")

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self, timeout_s: float = 40.0) -> int:
        assert self.process is not None
        return await asyncio.to_thread(self.process.wait, timeout_s)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        text = self._log_path.read_text(errors="replace") if self._log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


# --- what FakeRules left behind, read once for every test that uses them ----------------------


async def applied_attempts(database_url: str) -> dict[str, int]:
    """event id -> the attempt that committed it (public.applied)."""
    rows = await fetch(database_url, "select event_id, attempt from public.applied")
    return {row["event_id"]: row["attempt"] for row in rows}


async def applied_count_is(database_url: str, expected: int) -> bool:
    """True once exactly ``expected`` events are committed in public.applied."""
    rows = await fetch(database_url, "select count(*) as n from public.applied")
    return bool(rows[0]["n"] == expected)


async def dead_letters(database_url: str) -> list[asyncpg.Record]:
    """The dead letters FakeRules recorded (public.dead), by event id."""
    return await fetch(database_url, "select * from public.dead order by event_id")


def called(fake: FakeRules, event_id: str) -> int:
    """How many times the rules were called with ``event_id``."""
    return sum(1 for called_id, _ in fake.calls if called_id == event_id)
