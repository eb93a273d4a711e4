"""Reconciliation benchmark: how fast one `recon worker` drains a full queue into the ledger.

Creates its own database (migrated) and RabbitMQ vhost and drops both at the end. Seeds the host
app's orders and payments, fills the work queue with a shuffled mix of refund, reversal and
dispute events (10% duplicate deliveries, built by tests/event_stream.py from Stripe's fixtures)
published with confirms, then starts one `recon worker` subprocess and polls until every event
has a final outcome and the queue has nothing left to deliver; after the worker has stopped, the
queue must be empty (a message it never acked would be back). Reports events/s and the p99
reconcile latency (the worker's recon_reconcile_seconds histogram: delivery to commit).

Then pgbench (TPC-B-like, scale 10, 8 clients, 2 threads, 20 s) on the same server, in its own
database, and the ratio of our events/s to its tps.

The end-to-end mode sends signed webhooks to `recon run` at a fixed rate (open loop, from a
separate process) and reports the lag from each POST to its ledger row (booked_at − send time).

    .venv/bin/python bench/reconcile.py                       # full: 20,000 events + pgbench + e2e
    .venv/bin/python bench/reconcile.py --events 2000 --pgbench-s 5 --e2e-events 1500
    .venv/bin/python bench/reconcile.py --skip-e2e --skip-pgbench

--find-rate runs only end-to-end steps (a fresh database each, ~20 s of load each): rates stepping
up from --find-start by --find-factor until p99 POST → ledger lag ≥ 1 s, up to 3 steps in
between, then 0.5 R. It prints R, the machine's CPU µs per webhook at R (recon run + RabbitMQ +
this database's PostgreSQL + the load generator), capacity = cores ÷ that, R ÷ capacity and the
p99 lag at 0.5 R. With --find-repeats N each rate runs N times and passes when most runs did;
the figures at R and at 0.5 R are then medians.

    .venv/bin/python bench/reconcile.py --find-rate
    .venv/bin/python bench/reconcile.py --find-rate --find-start 1400 --find-repeats 3   # by majority
    .venv/bin/python bench/reconcile.py --find-rate --step-s 5 --find-max-steps 3   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import webhook_sender  # noqa: E402
from tests import event_stream  # noqa: E402
from tests.stripe_events import encode  # noqa: E402
from worker.amqp import topology  # noqa: E402
from worker.amqp.connection import connect, declare_topology, open_confirm_channel  # noqa: E402
from worker.amqp.publisher import Publisher, event_message  # noqa: E402
from worker.ops import migrate  # noqa: E402
from worker.settings import Settings  # noqa: E402

PG_ADMIN_URL = os.environ.get("RECON_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_SOCKET_DIR = "/var/run/postgresql"
CLK_TCK = os.sysconf("SC_CLK_TCK")
AMQP_BASE = os.environ.get("RECON_BENCH_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672/")
EVENTS_PER_CHARGE = 2.9  # what tests/event_stream.py produces on average, duplicates included
PUBLISH_IN_FLIGHT = 500
LOG_LEVEL = "info"  # production's default: one JSON line per event is part of the cost
# RECON_WORKER_CONCURRENCY for the measured worker: the product's default unless --concurrency says
# otherwise (users run the defaults; the prefetch window widens by itself under a backlog).
CONCURRENCY = Settings().worker_concurrency


# ------------------------------------------------------------------------------ environment

# --pg-socket: the worker and pgbench both reach PostgreSQL over its Unix socket instead of TCP.
PG_OVER_SOCKET = False


def db_url(name: str) -> str:
    """The URL of database ``name`` for the measured clients (worker, pgbench): TCP by default."""
    if PG_OVER_SOCKET:
        return f"postgresql://postgres@/{name}?host={PG_SOCKET_DIR}"
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@dataclass
class Isolated:
    """A database and a vhost of this run's own."""

    name: str

    @property
    def database_url(self) -> str:
        return db_url(self.name)

    @property
    def amqp_url(self) -> str:
        return AMQP_BASE + quote(self.name, safe="")

    async def create(self) -> None:
        await migrate.create_database(self.database_url)
        await migrate.apply_migrations(self.database_url)
        _rabbitmqctl("add_vhost", self.name)
        _rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")

    async def drop(self) -> None:
        with contextlib.suppress(Exception):
            _rabbitmqctl("delete_vhost", self.name)
        con = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await con.execute(f'drop database if exists "{self.name}" with (force)')
        finally:
            await con.close()


def _settings(env: Isolated) -> Settings:
    return Settings(database_url=env.database_url, amqp_url=env.amqp_url)


def _process_env(env: Isolated, **extra: str) -> dict[str, str]:
    values = {
        **os.environ,
        "DATABASE_URL": env.database_url,
        "AMQP_URL": env.amqp_url,
        "LOG_LEVEL": LOG_LEVEL,
        "LOG_FORMAT": "json",
    }
    values.pop("STRIPE_API_KEY", None)
    values.update(extra)
    return values


def _spawn(command: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "worker.cli", command],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(10)


# ---------------------------------------------------------------------------------- helpers


async def _wait_ready(port: int, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"process exited with {process.returncode} before it was ready")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise SystemExit("not ready in time")


async def _metrics(port: int) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as response:
        return await response.text()


def histogram_quantile(metrics_text: str, name: str, q: float) -> float | None:
    """The q-quantile of a Prometheus histogram, interpolated linearly inside its bucket."""
    buckets = [
        (float(le), float(count))
        for le, count in re.findall(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', metrics_text, re.M)
    ]
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1.0
            return lower_bound + share * (bound - lower_bound)
        lower_bound, lower_count = bound, count
    return None


# ------------------------------------------------------------------------- drain benchmark


async def fill_queue(env: Isolated, events: list[dict[str, Any]]) -> float:
    """Publish every event with confirms, many in flight; returns the publish rate."""
    settings = _settings(env)
    connection = await connect(env.amqp_url)
    try:
        await declare_topology(connection, settings)
        publisher = Publisher(await open_confirm_channel(connection))
        started = time.perf_counter()
        for start in range(0, len(events), PUBLISH_IN_FLIGHT):
            chunk = events[start : start + PUBLISH_IN_FLIGHT]
            await asyncio.gather(
                *(
                    publisher.publish_event(event_message(encode(e), e["id"], e["type"], e["created"]))
                    for e in chunk
                )
            )
        return len(events) / (time.perf_counter() - started)
    finally:
        await connection.close()


async def _poll(probe: Any, interval_s: float, timeout_s: float = 900.0) -> None:
    """Poll until ``probe()`` is true; a benchmark that stalls fails instead of hanging."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await probe():
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"stalled: nothing finished in {timeout_s} s")
        await asyncio.sleep(interval_s)


@dataclass
class OwnPostgres:
    backends: list[int]
    background: list[int]


class Watcher:
    """One PostgreSQL connection and one AMQP channel for all of a phase's polling.

    Opening a connection per poll (20 a second in the drain) made PostgreSQL fork a backend and
    RabbitMQ run a handshake each time, on the cores being measured.
    """

    def __init__(self, env: Isolated) -> None:
        self._env = env
        self._con: asyncpg.Connection | None = None
        self._amqp: Any = None
        self._channel: Any = None

    async def __aenter__(self) -> Watcher:
        self._con = await asyncpg.connect(self._env.database_url)
        self._amqp = await connect(self._env.amqp_url)
        self._channel = await self._amqp.channel()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._amqp is not None:
            await self._amqp.close()
        if self._con is not None:
            await self._con.close()

    async def scalar(self, sql: str) -> Any:
        assert self._con is not None
        return await self._con.fetchval(sql)

    async def own_postgres_pids(self) -> OwnPostgres:
        """This run's database's backends (not this watcher's), and the server processes that
        write WAL and checkpoints for every database: the PostgreSQL CPU to count as this run's,
        on a server other people's tests share."""
        assert self._con is not None
        rows = await self._con.fetch(
            "select pid, datname is not null as backend from pg_stat_activity"
            " where (datname = current_database() and pid <> pg_backend_pid())"
            " or backend_type in ('checkpointer', 'background writer', 'walwriter')"
        )
        return OwnPostgres(
            backends=[int(r["pid"]) for r in rows if r["backend"]],
            background=[int(r["pid"]) for r in rows if not r["backend"]],
        )

    async def settled(self, distinct: int) -> bool:
        done = await self.scalar("select count(*) from recon.event_inbox where outcome <> 'retrying'")
        return bool(done == distinct)

    async def queue_ready(self) -> int:
        """Messages ready in the work queue (delivered but unacked ones are not counted)."""
        queue = await self._channel.declare_queue(topology.WORK_QUEUE, passive=True)
        assert queue.declaration_result.message_count is not None
        return int(queue.declaration_result.message_count)

    async def drained(self, distinct: int) -> bool:
        """Every distinct event final and nothing left to deliver (duplicates included)."""
        return await self.settled(distinct) and await self.queue_ready() == 0


async def drain(env: Isolated, stream: event_stream.Stream, workdir: Path, profile: bool) -> dict[str, Any]:
    published_per_s = await fill_queue(env, stream.events)
    port = _free_port()
    worker_env = _process_env(
        env, RECON_WORKER_HTTP_PORT=str(port), RECON_WORKER_CONCURRENCY=str(CONCURRENCY)
    )
    worker = _spawn("worker", worker_env, workdir / "worker.log")
    spy = _py_spy(worker.pid, workdir / "worker-profile.txt") if profile else None
    async with Watcher(env) as watch:
        try:
            await _wait_ready(port, worker)
            # The clock starts with the first inbox row: the work, not the worker's start-up.
            await _poll(lambda: watch.scalar("select exists (select 1 from recon.event_inbox)"), 0.01)
            first = time.perf_counter()
            cpu_before = cpu_snapshot({"worker": worker.pid})
            await _poll(lambda: watch.drained(len(stream.event_ids)), interval_s=0.05)
            finished = time.perf_counter()
            cpu = cpu_delta(cpu_before, cpu_snapshot({"worker": worker.pid}))
            metrics_text = await _metrics(port)
        finally:
            code = _stop(worker)
            if spy is not None:
                spy.wait(30)
        # Whatever the worker left unacked is back in the queue once it is gone: it must be nothing.
        left_in_queue = await watch.queue_ready()
    seconds = finished - first
    p99 = histogram_quantile(metrics_text, "recon_reconcile_seconds", 0.99)
    p50 = histogram_quantile(metrics_text, "recon_reconcile_seconds", 0.50)
    return {
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "messages": len(stream.events),
        "distinct_events": len(stream.event_ids),
        "published_per_s": round(published_per_s),
        "seconds": round(seconds, 2),
        "events_per_s": round(len(stream.events) / seconds),
        "reconcile_p50_ms": round(p50 * 1000, 1) if p50 is not None else None,
        "reconcile_p99_ms": round(p99 * 1000, 1) if p99 is not None else None,
        "cpu_us_per_event": {who: round(s * 1e6 / len(stream.events)) for who, s in cpu.items()},
        "machine_busy_cores": round(cpu["machine"] / seconds, 2),
        "worker_exit": code,
        "left_in_queue_after_exit": left_in_queue,
    }


def _ticks(pid: int) -> float:
    """utime + stime of one process, in seconds (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _pids(user: str, command: str) -> list[int]:
    found = subprocess.run(["pgrep", "-u", user, "-x", command], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def cpu_snapshot(ours: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far: our processes (name -> pid), RabbitMQ, every PostgreSQL process (other
    databases' too: the server is shared), and the whole machine (busy time summed over cores)."""
    machine = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = machine[3] + machine[4]
    return {
        **{name: _ticks(pid) for name, pid in ours.items()},
        "rabbitmq": sum(_ticks(pid) for pid in _pids("rabbitmq", "beam.smp")),
        "postgres": sum(_ticks(pid) for pid in _pids("postgres", "postgres")),
        "machine": (sum(machine) - idle) / CLK_TCK,
    }


def postgres_ticks() -> dict[int, float]:
    return {pid: _ticks(pid) for pid in _pids("postgres", "postgres")}


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    # PostgreSQL backends that exited in between took their CPU with them: that share is lost.
    return {who: max(0.0, after[who] - before[who]) for who in after}


def _py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """Collapsed stacks (flamegraph.pl / speedscope input) of one of our processes while it runs."""
    spy = ROOT / ".venv" / "bin" / "py-spy"
    command = [str(spy), "record", "-p", str(pid), "-o", str(out), "--format", "raw", "--nonblocking"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ------------------------------------------------------------------------------- pgbench


def pgbench(seconds: int, scale: int = 10, clients: int = 8, threads: int = 2) -> float:
    name = f"recon_pgbench_{os.getpid()}"
    url = db_url(name)
    subprocess.run(["psql", PG_ADMIN_URL, "-qc", f'drop database if exists "{name}"'], check=True)
    subprocess.run(["psql", PG_ADMIN_URL, "-qc", f'create database "{name}"'], check=True)
    try:
        subprocess.run(["pgbench", "-i", "-q", "-s", str(scale), url], check=True, capture_output=True)
        run = subprocess.run(
            ["pgbench", "-c", str(clients), "-j", str(threads), "-T", str(seconds), url],
            check=True,
            capture_output=True,
            text=True,
        )
    finally:
        subprocess.run(
            ["psql", PG_ADMIN_URL, "-qc", f'drop database if exists "{name}" with (force)'], check=True
        )
    match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", run.stdout)
    if match is None:
        raise SystemExit(f"cannot read pgbench's tps from:\n{run.stdout}")
    return float(match.group(1))


# --------------------------------------------------------------------------- end to end


async def end_to_end(
    env: Isolated,
    stream: event_stream.Stream,
    rate: float,
    workdir: Path,
    split: bool = False,
    profile: bool = False,
) -> dict[str, Any]:
    """``recon run`` (receiver and worker in one process), or with ``split`` the same
    pair as two processes on this machine: `recon receiver` and `recon worker`."""
    secret = "whsec_" + secrets.token_hex(16)
    http_port, worker_port = _free_port(), _free_port()
    process_env = _process_env(
        env,
        STRIPE_WEBHOOK_SECRETS=secret,
        RECON_HTTP_PORT=str(http_port),
        RECON_WORKER_HTTP_PORT=str(worker_port),
        RECON_WORKER_CONCURRENCY=str(CONCURRENCY),
    )
    settings = _settings(env)
    connection = await connect(env.amqp_url)
    await declare_topology(connection, settings)
    await connection.close()
    if split:
        processes = [
            _spawn("receiver", process_env, workdir / "receiver.log"),
            _spawn("worker", process_env, workdir / "worker-e2e.log"),
        ]
    else:
        processes = [_spawn("run", process_env, workdir / "run.log")]
    spies = (
        [_py_spy(p.pid, workdir / f"e2e-profile-{i}.txt") for i, p in enumerate(processes)] if profile else []
    )
    try:
        for process, port in zip(processes, (http_port, worker_port), strict=False):
            await _wait_ready(port, process)
        bodies = [(e["id"], encode(e)) for e in stream.events]
        out = workdir / "sent.json"
        sender = multiprocessing.get_context("spawn").Process(
            target=webhook_sender.send_open_loop,
            args=(f"http://127.0.0.1:{http_port}", bodies, secret, rate, out),
        )
        names = ["receiver", "worker"] if split else ["recon run"]
        ours = {name: process.pid for name, process in zip(names, processes, strict=True)}
        cpu_before, postgres_before = cpu_snapshot(ours), postgres_ticks()
        window_start = time.perf_counter()
        sender.start()
        await asyncio.to_thread(sender.join)
        if sender.exitcode != 0:
            raise SystemExit(f"the load generator failed (exit {sender.exitcode}); its traceback is above")
        async with Watcher(env) as watch:
            await _poll(lambda: watch.settled(len(stream.event_ids)), interval_s=0.1)
            cpu = cpu_delta(cpu_before, cpu_snapshot(ours))
            # Where the lag is spent: POST → 200 (the receiver) and delivery → commit (the worker);
            # the rest is the wait in the work queue and in the consumer's prefetch.
            received = await _metrics(http_port)
            worked = await _metrics(worker_port) if split else received
            window_s = time.perf_counter() - window_start
            postgres_after, own = postgres_ticks(), await watch.own_postgres_pids()
            # A backend that started during the run counts from zero.
            cpu["postgres (own database)"] = sum(
                postgres_after[pid] - postgres_before.get(pid, 0.0)
                for pid in own.backends
                if pid in postgres_after
            )
            cpu["postgres (wal, checkpoints: shared)"] = sum(
                postgres_after[pid] - postgres_before.get(pid, 0.0)
                for pid in own.background
                if pid in postgres_after
            )
            # processed_at is now(), the transaction's start: one value per batch (two lanes rarely tie).
            per_transaction = await watch.scalar(
                "select count(*)::float8 / nullif(count(distinct processed_at), 0) from recon.event_inbox"
                " where processed_at is not null"
            )
    finally:
        code = max(_stop(process) for process in processes)
        for spy in spies:
            spy.wait(30)
    report = json.loads(out.read_text())
    timed = await _ledger_lags(env.database_url, report["sent"])
    lags = sorted(lag for _, lag in timed)
    return {
        "mode": "recon receiver + recon worker" if split else "recon run",
        "posts": len(bodies),
        "rate_per_s": rate,
        "statuses": report["statuses"],
        "ledger_rows": len(lags),
        "lag_p50_ms": round(_quantile(lags, 0.50) * 1000, 1),
        "lag_p99_ms": round(_quantile(lags, 0.99) * 1000, 1),
        "lag_max_ms": round(max(lags) * 1000, 1),
        "events_per_transaction": round(per_transaction or 0, 1),
        "lag_p99_ms_by_second": _by_second(timed),
        "parts_ms": {
            f"{part}_{label}": round((histogram_quantile(text, name, q) or 0.0) * 1000, 1)
            for part, text, name in (
                ("post_to_200", received, "recon_webhook_ack_seconds"),
                ("delivery_to_commit", worked, "recon_reconcile_seconds"),
            )
            for label, q in (("p50", 0.5), ("p99", 0.99))
        },
        # The load generator's CPU is the sender process's own; "machine" includes it.
        "cpu_us_per_event": {
            who: round(seconds * 1e6 / len(bodies))
            for who, seconds in {**cpu, "load generator": report["cpu_s"]}.items()
        },
        "cpu_window_s": round(window_s, 2),
        "run_exit": code,
    }


async def _ledger_lags(database_url: str, sent: dict[str, float]) -> list[tuple[float, float]]:
    """(sent at, POST → ledger lag) of every ledger row whose event the generator sent."""
    con = await asyncpg.connect(database_url)
    try:
        rows = await con.fetch(
            "select stripe_event_id, extract(epoch from booked_at)::float8 as t from finance.ledger"
        )
    finally:
        await con.close()
    return [
        (sent[row["stripe_event_id"]], row["t"] - sent[row["stripe_event_id"]])
        for row in rows
        if row["stripe_event_id"] in sent
    ]


def _by_second(timed: list[tuple[float, float]]) -> list[float]:
    """The lag's p99 for each second of the run, by when the POST was sent: whether a tail is a
    steady climb (past capacity) or one stall (a checkpoint, a window change) shows here."""
    if not timed:
        return []
    start = min(at for at, _ in timed)
    seconds: dict[int, list[float]] = {}
    for at, lag in timed:
        seconds.setdefault(int(at - start), []).append(lag)
    return [round(_quantile(seconds.get(i, [0.0]), 0.99) * 1000, 1) for i in range(max(seconds) + 1)]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------------------------------------------ main


def _stream(events: int, tag: str) -> event_stream.Stream:
    """At least ``events`` messages (a little over is trimmed from the shuffled stream)."""
    built = event_stream.build(max(1, round(events / EVENTS_PER_CHARGE * 1.05)), tag=tag)
    return event_stream.Stream(built.payments, built.events[:events])


async def _prepared(tag: str, events: int) -> tuple[Isolated, event_stream.Stream]:
    env = Isolated(f"recon_bench_{tag}_{uuid.uuid4().hex[:8]}")
    try:
        await env.create()
        stream = _stream(events, tag)
        con = await asyncpg.connect(env.database_url)
        try:
            await event_stream.seed(con, stream.payments, buyer_emails=True)  # as a shop's orders have
        finally:
            await con.close()
    except BaseException:
        await env.drop()  # a half-made environment (e.g. the vhost timed out) is not left behind
        raise
    return env, stream


async def main(args: argparse.Namespace) -> dict[str, Any]:
    workdir = ROOT / "bench" / "results" / f"reconcile-{time.strftime('%Y%m%dT%H%M%S')}"
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": _machine(),
        "workdir": str(workdir.relative_to(ROOT)),
        "postgres_transport": "unix socket" if PG_OVER_SOCKET else "tcp 127.0.0.1",
        "log_level": LOG_LEVEL,
        "worker_concurrency": CONCURRENCY,
    }
    env, stream = await _prepared("drain", args.events)
    try:
        results["drain"] = await drain(env, stream, workdir, args.profile)
    finally:
        await env.drop()
    _print(results)
    if not args.skip_pgbench:
        results["pgbench_tps"] = round(await asyncio.to_thread(pgbench, args.pgbench_s))
        results["events_per_s_over_pgbench_tps"] = round(
            results["drain"]["events_per_s"] / results["pgbench_tps"], 2
        )
        _print(results)
    if not args.skip_e2e:
        env, stream = await _prepared("e2e", args.e2e_events)
        # pgbench leaves dirty buffers and autovacuum work behind: let the server catch up first.
        await asyncio.to_thread(_quiesce)
        results["host_speed_ms_before_e2e"] = host_speed_ms()
        try:
            key = "end_to_end_split" if args.e2e_split else "end_to_end"
            results[key] = await end_to_end(
                env, stream, args.rate, workdir, split=args.e2e_split, profile=args.profile
            )
        finally:
            await env.drop()
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    return results


# ------------------------------------------------------------------------- --find-rate

LAG_LIMIT_MS = 1000.0  # R: the highest offered rate whose p99 POST → ledger lag stays below this
# What one webhook costs the machine: the processes of the run, each counted once. PostgreSQL is
# its backends for this database plus its WAL writer and checkpointer (the server is shared);
# RabbitMQ's one beam.smp cannot be split, so other people's traffic on it is in its figure.
MACHINE_PARTS = ("recon run", "rabbitmq", "postgres (own database)", "load generator")
SPLIT_PARTS = ("receiver", "worker", *MACHINE_PARTS[1:])  # --e2e-split: our two processes


def machine_parts(result: dict[str, Any]) -> tuple[str, ...]:
    return SPLIT_PARTS if "worker" in result["cpu_us_per_event"] else MACHINE_PARTS


def machine_us_per_webhook(result: dict[str, Any]) -> int:
    return sum(result["cpu_us_per_event"][part] for part in machine_parts(result))


def background_cores(seconds: float = 3.0) -> dict[str, float]:
    """Cores busy while this bench is idle, just before a step: other people's work on the shared
    RabbitMQ and on the machine, subtracted from the step's figures for the "net" estimate."""
    before = cpu_snapshot({})
    time.sleep(seconds)
    return {who: round(v / seconds, 3) for who, v in cpu_delta(before, cpu_snapshot({})).items()}


def net_of_background(result: dict[str, Any], background: dict[str, float]) -> dict[str, int]:
    """The step's CPU per webhook with the idle rate measured before it taken out (an estimate:
    other people's load is not steady)."""
    cpu = result["cpu_us_per_event"]
    idle_us = {
        who: background[who] * result["cpu_window_s"] * 1e6 / result["posts"]
        for who in ("rabbitmq", "machine")
    }
    rabbitmq = max(0, round(cpu["rabbitmq"] - idle_us["rabbitmq"]))
    parts = {**cpu, "rabbitmq": rabbitmq}
    return {
        "rabbitmq": rabbitmq,
        "machine (/proc/stat)": max(0, round(cpu["machine"] - idle_us["machine"])),
        "sum": sum(parts[part] for part in machine_parts(result)),
    }


async def rate_step(
    rate: float, seconds: float, workdir: Path, step: int, split: bool = False
) -> dict[str, Any]:
    """One open-loop run of ``recon run`` (with ``split``: `recon receiver` and `recon worker`) at
    ``rate`` for ``seconds``, in a fresh database."""
    env, stream = await _prepared(f"rate{step}", max(100, round(rate * seconds)))
    await asyncio.to_thread(_quiesce, 2.0)
    background = await asyncio.to_thread(background_cores)
    speed = host_speed_ms(rounds=3)
    step_dir = workdir / f"step-{step:02d}-{rate:g}"
    step_dir.mkdir()
    try:
        result = await end_to_end(env, stream, rate, step_dir, split=split)
    finally:
        await env.drop()
    result["host_speed_ms"] = speed
    result["machine_us_per_webhook"] = machine_us_per_webhook(result)
    result["background_cores"] = background
    result["net_of_background_us"] = net_of_background(result, background)
    cpu = result["cpu_us_per_event"]
    print(
        f"step {step:2d}  {rate:7.1f}/s  host_speed_ms {speed:5.1f}  lag p50 {result['lag_p50_ms']:8.1f}"
        f"  p99 {result['lag_p99_ms']:8.1f} ms  {result['events_per_transaction']:5.1f} events/txn"
        f"  parts (ms) {result['parts_ms']}"
        f"  cpu us/webhook: "
        + ", ".join(f"{who} {cpu[who]}" for who in (*machine_parts(result), "machine"))
        + f"  sum {result['machine_us_per_webhook']}  (net of background {result['net_of_background_us']},"
        f" background cores {background})  statuses {result['statuses']}",
        flush=True,
    )
    return result


def _passes(result: dict[str, Any]) -> bool:
    return bool(result["lag_p99_ms"] < LAG_LIMIT_MS)


def _at(steps: list[dict[str, Any]], rate: float) -> list[dict[str, Any]]:
    return [s for s in steps if s["rate_per_s"] == rate]


def _rate_passes(steps: list[dict[str, Any]], rate: float) -> bool:
    """A rate passes when more than half of its runs kept p99 under 1 s. On this host one run's
    tail moves with the neighbours: the same rate passed and failed within minutes."""
    runs = _at(steps, rate)
    return sum(_passes(s) for s in runs) * 2 > len(runs)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


async def _trial(rate: float, args: argparse.Namespace, workdir: Path, steps: list[dict[str, Any]]) -> bool:
    """``--find-repeats`` runs at ``rate``, appended to ``steps``; whether the rate passes."""
    for _ in range(args.find_repeats):
        steps.append(await rate_step(rate, args.step_s, workdir, len(steps) + 1, args.e2e_split))
    return _rate_passes(steps, rate)


async def search_rate(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """Up by ``--find-factor`` from ``--find-start`` until p99 ≥ 1 s (down, if the start already
    fails), then ``--find-bisect`` steps halving the gap between the highest pass and the lowest
    failure (fewer once they are within 3%): one step there left R up to 14% below the real one.
    Each rate runs ``--find-repeats`` times and passes by majority."""
    steps: list[dict[str, Any]] = []
    rates = [args.find_start]
    up = await _trial(args.find_start, args, workdir, steps)
    while len(rates) < args.find_max_steps:
        rate = round(rates[-1] * (args.find_factor if up else 1 / args.find_factor))
        rates.append(rate)
        if await _trial(rate, args, workdir, steps) != up:
            break
    for _ in range(args.find_bisect):
        passed = [r for r in rates if _rate_passes(steps, r)]
        failed = [r for r in rates if not _rate_passes(steps, r)]
        if not (passed and failed) or min(failed) <= max(passed) * 1.03:
            break
        between = round((max(passed) * min(failed)) ** 0.5)
        rates.append(between)
        await _trial(between, args, workdir, steps)
    return steps


async def find_rate(args: argparse.Namespace) -> dict[str, Any]:
    """R, the machine's CPU per webhook at R, capacity = cores ÷ that, R ÷ capacity, and the
    p99 lag at 0.5 R, all in one run (issue 14's end-to-end targets). With ``--find-repeats``
    above 1, the figures at R and at 0.5 R are the medians of their runs."""
    workdir = ROOT / "bench" / "results" / f"find-rate-{time.strftime('%Y%m%dT%H%M%S')}"
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": _machine(), "workdir": str(workdir.relative_to(ROOT))}
    results["worker_concurrency"] = CONCURRENCY
    results["repeats"] = args.find_repeats
    steps = await search_rate(args, workdir)
    results["steps"] = steps
    passing = sorted({s["rate_per_s"] for s in steps if _rate_passes(steps, s["rate_per_s"])})
    if not passing:
        results["R"] = None
        print("no rate tried kept p99 under 1 s")
    else:
        rate = passing[-1]
        at_r = _at(steps, rate)
        half_rate = round(rate / 2)
        runs = list(steps)  # the half-R runs are numbered after the search's
        await _trial(half_rate, args, workdir, runs)
        half_steps = runs[len(steps) :]
        machine_us = _median([s["machine_us_per_webhook"] for s in at_r])
        net_us = _median([s["net_of_background_us"]["sum"] for s in at_r])
        cores = os.cpu_count() or 1
        capacity = cores * 1e6 / machine_us
        net_capacity = cores * 1e6 / max(1.0, net_us)
        results |= {
            "net_of_background": {
                "machine_us_per_webhook_at_R": round(net_us),
                "capacity_per_s": round(net_capacity),
                "R_over_capacity": round(rate / net_capacity, 2),
            },
            "R": rate,
            "machine_us_per_webhook_at_R": round(machine_us),
            "capacity_per_s": round(capacity),
            "R_over_capacity": round(rate / capacity, 2),
            "lag_p99_ms_at_half_R": _median([s["lag_p99_ms"] for s in half_steps]),
            "half_R": half_steps[0],
            "half_R_runs": half_steps,
        }
    results["host_speed_ms_at_end"] = host_speed_ms()
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    _print_find_rate(results)
    return results


def _print_find_rate(results: dict[str, Any]) -> None:
    speeds = [s["host_speed_ms"] for s in results["steps"]]
    print(
        f"\nhost_speed_ms: at start {results['machine']['host_speed_ms_at_start']}, steps "
        f"{min(speeds)}–{max(speeds)}, at end {results['host_speed_ms_at_end']}; "
        f"load average at start {results['machine']['loadavg_at_start']}"
    )
    if results["R"] is None:
        return
    if all(_rate_passes(results["steps"], s["rate_per_s"]) for s in results["steps"]):
        print("every rate tried passed (--find-max-steps): R is a lower bound")
    print(
        f"R = {results['R']:g}/s (highest rate with p99 POST → ledger < 1 s"
        f"{f', in most of {repeats} runs' if (repeats := results['repeats']) > 1 else ''})\n"
        f"machine CPU per webhook at R = {results['machine_us_per_webhook_at_R']} us "
        f"({' + '.join(machine_parts(results['half_R']))})\n"
        f"capacity = {os.cpu_count()} cores / that = {results['capacity_per_s']}/s\n"
        f"R / capacity = {results['R_over_capacity']}   (target >= 0.85)\n"
        f"lag p99 at 0.5 R ({results['half_R']['rate_per_s']:g}/s) = {results['lag_p99_ms_at_half_R']} ms"
        "   (target < 250 ms)"
    )
    net = results["net_of_background"]
    print(
        f"with RabbitMQ's idle rate before the step taken out (others' traffic, an estimate): "
        f"{net['machine_us_per_webhook_at_R']} us per webhook, capacity {net['capacity_per_s']}/s, "
        f"R / capacity {net['R_over_capacity']}"
    )


def _quiesce(settle_s: float = 5.0) -> None:
    subprocess.run(["psql", PG_ADMIN_URL, "-qc", "checkpoint"], check=True)
    time.sleep(settle_s)


def host_speed_ms(rounds: int = 5) -> float:
    """CPU milliseconds of one fixed piece of Python work (best of ``rounds``): the same code costs
    up to 1.7× more from one quarter hour to the next on these shared hosts, so each run records
    this beside its figures, and runs are compared with it in view (docs/performance.md)."""
    body = encode(event_stream.build(1, tag="speed").events[0])
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(2_000):
            json.loads(body)
        sum(i * i for i in range(200_000))
        best = min(best, time.process_time() - started)
    return round(best * 1000, 1)


def _machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "unknown",
    )
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": sys.version.split()[0],
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],  # others' work on a shared box
        "host_speed_ms_at_start": host_speed_ms(),
    }


def _print(results: dict[str, Any]) -> None:
    print(json.dumps(results, indent=2), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="messages in the queue for the drain")
    parser.add_argument("--e2e-events", type=int, default=3_000, help="webhooks for the end-to-end run")
    parser.add_argument(
        "--rate",
        type=float,
        default=100.0,
        help="end-to-end POSTs per second (open loop; 100: the lag target)",
    )
    parser.add_argument("--pgbench-s", type=int, default=20, help="pgbench duration")
    parser.add_argument("--skip-pgbench", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument(
        "--e2e-split",
        action="store_true",
        help="end to end (and --find-rate) through `recon receiver` + `recon worker`",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy our processes (drain and end to end)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=Settings().worker_concurrency,
        help="the worker's RECON_WORKER_CONCURRENCY (default: the product's default)",
    )
    parser.add_argument("--pg-socket", action="store_true", help="worker and pgbench use the Unix socket")
    parser.add_argument(
        "--find-rate",
        action="store_true",
        help="only search R, the highest rate with p99 lag < 1 s through `recon run`; report capacity",
    )
    parser.add_argument("--find-start", type=float, default=200.0, help="--find-rate's first rate")
    parser.add_argument("--find-factor", type=float, default=1.3, help="--find-rate's step between rates")
    parser.add_argument("--find-max-steps", type=int, default=10, help="--find-rate's most rates tried")
    parser.add_argument(
        "--find-bisect", type=int, default=3, help="--find-rate's steps between last pass and first failure"
    )
    parser.add_argument("--step-s", type=float, default=20.0, help="--find-rate's seconds of load per rate")
    parser.add_argument(
        "--find-repeats", type=int, default=1, help="--find-rate's runs per rate; a rate passes by majority"
    )
    parser.add_argument(
        "--log-level", default="info", help="the processes' LOG_LEVEL (info: a line per event)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    LOG_LEVEL = arguments.log_level
    CONCURRENCY = arguments.concurrency
    PG_OVER_SOCKET = arguments.pg_socket
    if arguments.find_rate:
        asyncio.run(find_rate(arguments))
    else:
        _print(asyncio.run(main(arguments)))
