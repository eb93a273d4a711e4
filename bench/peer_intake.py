"""Intake side by side with a peer: `recon receiver` and stripe-sync-engine 0.48.5, alternated.

The peer is bench/peer/server.js: the library's `processWebhook` (verify the signature, parse,
upsert the object into its own PostgreSQL schema) behind a bare node:http server, with its
migrations applied to a database of its own on the shared server (dropped at the end). Ours is
`recon receiver` as bench/intake.py runs it (verify, parse, confirmed mandatory publish to the
quorum queue, a JSON log line), against a RabbitMQ vhost of its own (deleted at the end).

Each round builds one set of distinct events (a fresh event id and a fresh object id each, so the
peer inserts rows rather than fighting over one; charge.succeeded, charge.refunded, refund.created,
charge.dispute.created — types the peer stores from the payload without calling Stripe's API) and
sends the same bodies to both targets, in turn, from a separate load-generator process: raw HTTP/1.1
over `--concurrency` keep-alive connections, one request outstanding on each (closed loop), every
request signed before the clock starts. The order alternates round by round (ours first, then the
peer first, ...) so a drift in the shared machine's speed does not favour one side. Between phases
our work queue is purged and the peer's tables are truncated.

`--floor` adds a third target to each round: the least our obligations can cost in this stack,
bench/intake.py's baseline server publishing as well: aiohttp on uvloop, `verify_header`, one orjson
parse, and the same persistent, mandatory, confirmed publish of the same properties and bytes
(worker.amqp.publisher.event_message), round-robin over as many bare aiormq channels as the
receiver uses, into the same queue; no log line, no metrics, no reconnects. What the floor cannot
reach, no trimming of `recon receiver` can.

    .venv/bin/python bench/peer_intake.py                 # 3 rounds, 10,000 measured + 2,000 warm-up
    .venv/bin/python bench/peer_intake.py --quick         # 2 rounds, 2,000 + 300: a smoke run
    .venv/bin/python bench/peer_intake.py --floor         # ours, the floor and the peer, alternated
    .venv/bin/python bench/peer_intake.py --processes 2   # two of ours (and of the floor) on one port
    # also: --rounds N --requests N --warmup N --concurrency N
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import intake, reconcile  # noqa: E402
from bench.webhook_sender import _Connection, http_request  # noqa: E402
from tests.stripe_events import sign  # noqa: E402
from worker.amqp import topology  # noqa: E402

PEER_DIR = ROOT / "bench" / "peer"
RESULTS = ROOT / "bench" / "results"
PG_ADMIN_URL = reconcile.PG_ADMIN_URL
PEER_ROWS = (
    "select (select count(*) from stripe.charges) + (select count(*) from stripe.refunds)"
    " + (select count(*) from stripe.disputes)"
)
PEER_TRUNCATE = "truncate stripe.charges, stripe.refunds, stripe.disputes"
REQUEST_TIMEOUT_S = 30.0  # an unanswered request counts as failed (599) instead of stalling the bench
PHASE_TIMEOUT_S = 600.0


# ---------------------------------------------------------------- the events, the same for both


def round_bodies(count: int, tag: str) -> list[bytes]:
    """``count`` distinct event bodies: a fresh event id and data.object.id in each."""
    bodies = []
    templates = intake.event_templates()
    object_ids = [json.loads(t)["data"]["object"]["id"] for t in templates]
    placeholder = intake.ID_PLACEHOLDER.encode()
    for i in range(count):
        kind = i % len(templates)
        old_id = object_ids[kind]
        new_id = f"{old_id.split('_')[0]}_bench{tag}{i:08d}"
        body = templates[kind].replace(placeholder, f"evt_bench{tag}{i:08d}".encode())
        bodies.append(body.replace(old_id.encode(), new_id.encode()))
    return bodies


# ---------------------------------------------------------------- load generator (own process)


async def _closed_loop(host: str, port: int, requests: list[bytes], concurrency: int) -> dict[str, Any]:
    """``concurrency`` connections, each sending its next request as soon as the last is answered."""
    loop = asyncio.get_running_loop()
    connections = [(await loop.create_connection(_Connection, host, port))[1] for _ in range(concurrency)]
    latencies = array.array("d")
    statuses: Counter[int] = Counter()
    remaining = iter(requests)

    async def client(connection: _Connection) -> None:
        for request in remaining:
            started = time.perf_counter()
            try:
                status = await asyncio.wait_for(connection.post(request), REQUEST_TIMEOUT_S)
            except (ConnectionError, TimeoutError):
                status = 599
            latencies.append(time.perf_counter() - started)
            statuses[status] += 1

    cpu_before, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(c) for c in connections))
    elapsed_s = time.perf_counter() - started
    for connection in connections:
        connection.close()
    return {
        "elapsed_s": elapsed_s,
        "cpu_s": time.process_time() - cpu_before,
        "latencies": latencies.tobytes(),
        "statuses": {str(k): v for k, v in statuses.items()},
    }


def generator_main(conn: Connection, url: str, secret: str, concurrency: int) -> None:
    """Per phase: sign the warm-up and measured bodies, run the warm-up, then wait for "go" (the
    parent reads the servers' CPU in between) and run the measured part."""
    host, port = url.removeprefix("http://").split(":")
    while (phase := conn.recv()) is not None:
        warmup, measured = ([http_request(body, sign(body, secret)) for body in bodies] for bodies in phase)
        uvloop.run(_closed_loop(host, int(port), warmup, concurrency))
        conn.send("warm")
        conn.recv()
        conn.send(uvloop.run(_closed_loop(host, int(port), measured, concurrency)))


# ---------------------------------------------------------------- the two targets


@dataclass
class Target:
    name: str
    processes: list[subprocess.Popen[bytes]]  # one, but for ours with --processes N
    url: str
    backend: str  # the server process that does the target's durable work: "rabbitmq" or "postgres"

    def cpu_snapshot(self) -> dict[str, float]:
        """reconcile.cpu_snapshot, the target's processes summed as "server"."""
        snapshot = reconcile.cpu_snapshot({f"server-{p.pid}": p.pid for p in self.processes})
        servers = [key for key in snapshot if key.startswith("server-")]
        return {**snapshot, "server": sum(snapshot.pop(key) for key in servers)}


def start_ours(vhost: str, secret: str, workdir: Path, processes: int) -> Target:
    port = intake.free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "AMQP_URL": intake.vhost_url(vhost),
        "STRIPE_WEBHOOK_SECRETS": secret,
        "RECON_HTTP_HOST": "127.0.0.1",
        "RECON_HTTP_PORT": str(port),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "info",
    }
    started = intake.start_receivers(processes, env, workdir)  # one port, SO_REUSEPORT
    return Target("ours", started, f"http://127.0.0.1:{port}", "rabbitmq")


def start_floor(vhost: str, secret: str, processes: int) -> Target:
    port = intake.free_port()
    amqp_url = intake.vhost_url(vhost)
    started = intake.start_baselines(processes, port, secret, amqp_url)
    return Target("floor", started, f"http://127.0.0.1:{port}", "rabbitmq")


def migrate_peer(database: str) -> None:
    """The peer's own migrations (it logs and swallows a failure, so the tables are checked)."""
    env = os.environ | {"DATABASE_URL": reconcile.db_url(database)}
    subprocess.run(["node", "server.js", "migrate"], cwd=PEER_DIR, env=env, check=True, capture_output=True)
    found = subprocess.run(
        ["psql", reconcile.db_url(database), "-Atc", "select to_regclass('stripe.charges') is not null"],
        check=True,
        capture_output=True,
        text=True,
    )
    if found.stdout.strip() != "t":
        raise SystemExit("the peer's migrations did not create stripe.charges")


def start_peer(database: str, secret: str) -> Target:
    port = intake.free_port()
    env = os.environ | {
        "DATABASE_URL": reconcile.db_url(database),
        "STRIPE_WEBHOOK_SECRET": secret,
        "PORT": str(port),
    }
    log = (RESULTS / "peer-server.log").open("wb")
    process = subprocess.Popen(["node", "server.js"], cwd=PEER_DIR, env=env, stdout=log, stderr=log)
    return Target("peer", [process], f"http://127.0.0.1:{port}", "postgres")


async def stored_then_reset(target: Target, vhost: str, database: str) -> int:
    """What the phase left stored (messages in our queue, rows in the peer's tables: one per
    accepted request, warm-up included), then empty it so each phase starts alike."""
    if target.backend == "rabbitmq":
        amqp_url = intake.vhost_url(vhost)
        connection = await aio_pika.connect(amqp_url, timeout=intake.BROKER_CALL_TIMEOUT_S)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(topology.WORK_QUEUE, passive=True)
            stored = queue.declaration_result.message_count or 0
        await intake.purge_work_queue(amqp_url)
        return int(stored)
    con = await asyncpg.connect(reconcile.db_url(database))
    try:
        stored = await con.fetchval(PEER_ROWS)
        await con.execute(PEER_TRUNCATE)
    finally:
        await con.close()
    return int(stored)


# ---------------------------------------------------------------- one phase


@dataclass
class PhaseResult:
    round: int
    target: str
    host_speed_ms: float
    requests: int
    accepted: int
    statuses: dict[str, int]
    accepted_per_s: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    cpu_us_per_request: dict[str, int]
    machine_busy_cores: float
    stored: int = 0  # queued messages (ours) or rows (the peer) after the phase, warm-up included


def run_phase(
    conn: Connection, target: Target, bodies: tuple[list[bytes], list[bytes]], round_no: int
) -> PhaseResult:
    speed = reconcile.host_speed_ms(rounds=3)
    conn.send(bodies)
    if _reply(conn) != "warm":
        raise SystemExit("the load generator failed during the warm-up")
    before = target.cpu_snapshot()
    started = time.perf_counter()
    conn.send("go")
    reply = _reply(conn)
    wall_s = time.perf_counter() - started
    cpu = reconcile.cpu_delta(before, target.cpu_snapshot())
    return summarise(round_no, target, speed, reply, cpu, wall_s)


def _reply(conn: Connection) -> Any:
    if not conn.poll(PHASE_TIMEOUT_S):
        raise SystemExit(f"the load generator sent nothing in {PHASE_TIMEOUT_S:.0f} s")
    return conn.recv()


def summarise(
    round_no: int, target: Target, speed: float, reply: dict[str, Any], cpu: dict[str, float], wall_s: float
) -> PhaseResult:
    latencies = sorted(array.array("d", reply["latencies"]))
    requests, accepted = len(latencies), reply["statuses"].get("200", 0)
    share = {
        "server": cpu["server"],
        target.backend: cpu[target.backend],
        "generator": reply["cpu_s"],
        "machine": cpu["machine"],
    }

    def ms(q: float) -> float:
        return round(intake.percentile(latencies, q) * 1000, 1)

    return PhaseResult(
        round=round_no,
        target=target.name,
        host_speed_ms=speed,
        requests=requests,
        accepted=accepted,
        statuses=reply["statuses"],
        accepted_per_s=round(accepted / reply["elapsed_s"]),
        p50_ms=ms(0.5),
        p90_ms=ms(0.9),
        p99_ms=ms(0.99),
        max_ms=round(latencies[-1] * 1000, 1),
        cpu_us_per_request={who: round(seconds * 1e6 / requests) for who, seconds in share.items()},
        machine_busy_cores=round(cpu["machine"] / wall_s, 2),
    )


def format_row(r: PhaseResult) -> str:
    cpu = ", ".join(f"{who} {us}" for who, us in r.cpu_us_per_request.items())
    other = {k: v for k, v in r.statuses.items() if k != "200"}
    return (
        f"round {r.round} {r.target:4}  host_speed_ms {r.host_speed_ms:5.1f}  {r.accepted_per_s:6,d}/s  "
        f"p50 {r.p50_ms:6.1f}  p90 {r.p90_ms:6.1f}  p99 {r.p99_ms:6.1f}  max {r.max_ms:6.1f} ms  "
        f"cpu us/req: {cpu}  machine {r.machine_busy_cores:.2f} cores busy  stored {r.stored:,d}"
        + (f"  non-200: {other}" if other else "")
    )


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, help="alternations, each ours and the peer (default 3)")
    parser.add_argument("--requests", type=int, default=10_000, help="measured requests per phase")
    parser.add_argument("--warmup", type=int, default=2_000, help="unmeasured requests before each phase")
    parser.add_argument("--concurrency", type=int, default=64, help="keep-alive connections, closed loop")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2,000 + 300: a smoke run")
    parser.add_argument("--floor", action="store_true", help="also the floor: verify, parse, publish")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="our receivers (and floor servers) on one port; the peer stays one process",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.warmup = 2_000, 300
    args.rounds = args.rounds or (2 if args.quick else 3)
    return args


def summary(results: list[PhaseResult]) -> dict[str, Any]:
    """Medians over the rounds, and ours ÷ the peer's."""
    medians = {
        name: {
            key: round(statistics.median(getattr(r, key) for r in results if r.target == name), 1)
            for key in ("accepted_per_s", "p50_ms", "p99_ms")
        }
        for name in sorted({r.target for r in results})
    }
    peer = medians["peer"]
    ratios = {
        **_over(medians["ours"], peer),
        "per_round_accepted": [
            round(o.accepted_per_s / max(1, p.accepted_per_s), 2)
            for o, p in zip(
                [r for r in results if r.target == "ours"],
                [r for r in results if r.target == "peer"],
                strict=True,
            )
        ],
    }
    outcome: dict[str, Any] = {"median": medians, "ours_over_peer": ratios}
    if "floor" in medians:
        outcome["floor_over_peer"] = _over(medians["floor"], peer)
    return outcome


def _over(target: dict[str, float], peer: dict[str, float]) -> dict[str, float]:
    """A target's median accepted rate and p99 as multiples of the peer's."""
    return {
        "accepted_per_s": round(target["accepted_per_s"] / max(1, peer["accepted_per_s"]), 2),
        "p99": round(target["p99_ms"] / max(0.1, peer["p99_ms"]), 2),
    }


async def alternate(args: argparse.Namespace, targets: dict[str, Target], vhost: str, database: str) -> Any:
    context = multiprocessing.get_context("spawn")
    results: list[PhaseResult] = []
    for round_no in range(1, args.rounds + 1):
        tag = f"{round_no:02d}{uuid.uuid4().hex[:6]}"
        every = round_bodies(args.warmup + args.requests, tag)
        bodies = (every[: args.warmup], every[args.warmup :])
        order = [name for name in ("ours", "floor", "peer") if name in targets]
        order = order if round_no % 2 else order[::-1]
        for name in order:
            target = targets[name]
            parent, child = context.Pipe()
            sender = context.Process(
                target=generator_main, args=(child, target.url, args.secret, args.concurrency), daemon=True
            )
            sender.start()
            try:
                result = await asyncio.to_thread(run_phase, parent, target, bodies, round_no)
            finally:
                parent.send(None)
                sender.join(30)
            result.stored = await stored_then_reset(target, vhost, database)
            print(format_row(result), flush=True)
            results.append(result)
    return results


async def main(args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    args.secret = "whsec_" + secrets.token_hex(24)
    suffix = uuid.uuid4().hex[:8]
    vhost, database = f"recon-peer-bench-{suffix}", f"recon_peer_bench_{suffix}"
    workdir = RESULTS / f"cwd-{vhost}"
    workdir.mkdir()
    targets: dict[str, Target] = {}
    started = {"host_speed_ms": reconcile.host_speed_ms(), "loadavg": os.getloadavg()}
    print(
        f"{os.cpu_count()} cpus, load average {started['loadavg']}, host_speed_ms {started['host_speed_ms']}"
    )
    try:
        prepare(vhost, database)
        ours = start_ours(vhost, args.secret, workdir, args.processes)
        targets = {"ours": ours, "peer": start_peer(database, args.secret)}
        await intake.wait_ready(ours.url, args.processes, ours.processes)  # declares the topology
        if args.floor:
            targets["floor"] = start_floor(vhost, args.secret, args.processes)
        for target in targets.values():
            await intake.wait_ready(target.url, len(target.processes), target.processes)
        results = await alternate(args, targets, vhost, database)
    finally:
        codes = {name: intake.stop(t.processes) for name, t in targets.items()}
        cleanup(vhost, database, workdir)
    report(args, started, results, codes)


def prepare(vhost: str, database: str) -> None:
    """Our vhost, and the peer's database with its migrations applied."""
    intake.rabbitmqctl("add_vhost", vhost)
    intake.rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    subprocess.run(["psql", PG_ADMIN_URL, "-qc", f'create database "{database}"'], check=True)
    migrate_peer(database)


def cleanup(vhost: str, database: str, workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    subprocess.run(["psql", PG_ADMIN_URL, "-qc", f'drop database if exists "{database}" with (force)'])
    try:
        intake.rabbitmqctl("delete_vhost", vhost)
    except (subprocess.SubprocessError, OSError):
        print(f"warning: could not delete vhost {vhost}: rabbitmqctl delete_vhost {vhost}")


def report(
    args: argparse.Namespace, started: dict[str, Any], results: list[PhaseResult], codes: dict[str, Any]
) -> None:
    outcome = summary(results)
    print(f"\nmedians over {args.rounds} rounds: {json.dumps(outcome['median'])}")
    print(f"ours / peer: {json.dumps(outcome['ours_over_peer'])}")
    if "floor_over_peer" in outcome:
        print(f"floor / peer: {json.dumps(outcome['floor_over_peer'])}")
    print(f"host_speed_ms at start {started['host_speed_ms']}, at end {reconcile.host_speed_ms()}")
    print(f"exit codes after SIGTERM: {codes}")
    out = RESULTS / f"peer-intake-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    arguments = {k: v for k, v in vars(args).items() if k != "secret"}
    record = {"args": arguments, "start": started, "results": [asdict(r) for r in results], **outcome}
    out.write_text(json.dumps(record | {"exit_codes": codes}, indent=2))
    print(f"written {out.relative_to(ROOT)}")


def _interrupted(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # so a SIGTERM (e.g. from `timeout`) still runs the clean-up


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupted)
    asyncio.run(main(parse_args()))
