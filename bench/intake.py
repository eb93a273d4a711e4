"""Intake benchmark: signed webhooks → `recon receiver` → confirmed on the durable quorum queue.

Starts N `recon receiver` processes on one port (SO_REUSEPORT) against a RabbitMQ vhost it
creates and deletes, and load-generator processes (aiohttp client) that build distinct events
from tests/fixtures/stripe and sign each just before sending. Phases: closed loop at each
--concurrency, then open loop at --rate. The same load then runs against a bare aiohttp app that
only does verify_header + JSON parse (the baseline). CPU is read from /proc/<pid>/stat for the
generators, the receivers and RabbitMQ's beam.smp, so the split says who paid for what.

    .venv/bin/python bench/intake.py            # full: 10,000 measured requests per phase
    .venv/bin/python bench/intake.py --quick    # a smoke run
    .venv/bin/python bench/intake.py --processes 2 --profile
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FIXTURES = ROOT / "tests" / "fixtures" / "stripe"
AMQP_BASE = os.environ.get("RECON_BENCH_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672/")
CLK_TCK = os.sysconf("SC_CLK_TCK")
BROKER_CALL_TIMEOUT_S = 60.0
ID_PLACEHOLDER = "evt_BENCH_PLACEHOLDER_0000000000000000"
# (event type, fixture object): a mix of the handled types, as Stripe would send them.
EVENT_MIX = (
    ("charge.refunded", "charge"),
    ("refund.created", "refund"),
    ("charge.dispute.created", "dispute"),
    ("charge.succeeded", "charge"),
)


# ---------------------------------------------------------------- load generator (own process)


def event_templates() -> list[bytes]:
    """One compact event body per type, with a fixed-width id placeholder swapped per request."""
    envelope = json.loads((FIXTURES / "event.json").read_text())
    templates = []
    for event_type, fixture in EVENT_MIX:
        obj = json.loads((FIXTURES / f"{fixture}.json").read_text())
        event = envelope | {
            "id": ID_PLACEHOLDER,
            "type": event_type,
            "created": int(time.time()),
            "api_version": "2024-06-20",
            "livemode": False,
            "data": {"object": obj},
        }
        templates.append(json.dumps(event, separators=(",", ":")).encode())
    return templates


class EventSource:
    """Distinct signed events: a new id per request, signed right before it is sent."""

    def __init__(self, secret: str, generator_id: int) -> None:
        import stripe

        self._sign = stripe.WebhookSignature.generate_signature_header
        self._secret = secret
        self._templates = event_templates()
        self._prefix = f"evt_b{uuid.uuid4().hex[:10]}g{generator_id:02d}"
        self._n = 0

    def next(self) -> tuple[bytes, dict[str, str]]:
        self._n += 1
        event_id = f"{self._prefix}{self._n:0{len(ID_PLACEHOLDER) - len(self._prefix)}d}"
        body = self._templates[self._n % len(self._templates)].replace(
            ID_PLACEHOLDER.encode(), event_id.encode()
        )
        header = self._sign(body.decode(), self._secret)
        return body, {"Stripe-Signature": header, "Content-Type": "application/json"}


@dataclass
class Tally:
    latencies_s: array.array[float] = field(default_factory=lambda: array.array("d"))
    statuses: Counter[str] = field(default_factory=Counter)


async def _send(
    http: aiohttp.ClientSession, url: str, source: EventSource, tally: Tally, since: float
) -> None:
    body, headers = source.next()
    try:
        async with http.post(url, data=body, headers=headers) as response:
            await response.read()
            status = str(response.status)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        status = type(exc).__name__
    tally.latencies_s.append(time.perf_counter() - since)
    tally.statuses[status] += 1


async def closed_loop(
    http: aiohttp.ClientSession, url: str, source: EventSource, count: int, concurrency: int
) -> Tally:
    """`concurrency` clients, each sending its next request as soon as the last is answered."""
    tally = Tally()
    remaining = iter(range(count))

    async def client() -> None:
        for _ in remaining:
            await _send(http, url, source, tally, time.perf_counter())

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return tally


async def open_loop(
    http: aiohttp.ClientSession, url: str, source: EventSource, count: int, rate: float
) -> Tally:
    """Requests start on a fixed schedule whatever the answers do; latency counts from the
    scheduled start, so a stalled server cannot hide its queueing (no coordinated omission)."""
    tally = Tally()
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    for i in range(count):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0.001:
            await asyncio.sleep(delay)
        task = asyncio.create_task(_send(http, url, source, tally, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    return tally


async def _run_phase(
    http: aiohttp.ClientSession, url: str, source: EventSource, spec: dict[str, Any]
) -> Tally:
    if spec["mode"] == "closed":
        return await closed_loop(http, url, source, spec["count"], spec["concurrency"])
    return await open_loop(http, url, source, spec["count"], spec["rate"])


async def _generator(conn: Connection, url: str, secret: str, generator_id: int) -> None:
    source = EventSource(secret, generator_id)
    connector = aiohttp.TCPConnector(limit=1024, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        conn.send("ready")
        while (spec := conn.recv()) is not None:
            started = time.perf_counter()
            tally = await _run_phase(http, url, source, spec)
            elapsed = time.perf_counter() - started
            conn.send(
                {
                    "elapsed_s": elapsed,
                    "latencies": tally.latencies_s.tobytes(),
                    "statuses": dict(tally.statuses),
                }
            )


def generator_main(conn: Connection, url: str, secret: str, generator_id: int) -> None:
    import uvloop

    uvloop.run(_generator(conn, url, secret, generator_id))


# ---------------------------------------------------------------- baseline server (own process)


def serve_baseline(port: int, secret: str, amqp_url: str | None = None) -> None:
    """The least a correct receiver must do: verify_header + JSON parse, answer 200. No broker.

    With ``amqp_url`` it is the floor of bench/peer_intake.py: the least our obligations cost. It
    also publishes the exact bytes, with the receiver's properties (event_message), persistent and
    mandatory, round-robin over the receiver's number of bare aiormq confirm channels (one channel
    passes one publish per loop turn), and answers 200 once confirmed; still no log line, no
    metrics, no reconnects."""
    import aiormq
    import orjson
    import stripe
    import uvloop
    from aiohttp import web

    sys.path.insert(0, str(ROOT))
    from worker.amqp import topology
    from worker.amqp.publisher import event_message
    from worker.intake.broker_link import PUBLISH_CHANNELS

    channels: list[aiormq.abc.AbstractChannel] = []
    turn = 0

    async def webhook(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            stripe.WebhookSignature.verify_header(
                body, request.headers.get("Stripe-Signature"), secret, tolerance=300
            )
            event = orjson.loads(body)
        except (stripe.SignatureVerificationError, ValueError):
            return web.json_response({"error": "rejected"}, status=400)
        if channels:
            nonlocal turn
            turn = (turn + 1) % len(channels)
            message = event_message(body, event["id"], event["type"], event["created"])
            confirmation = await channels[turn].basic_publish(
                body,
                exchange=topology.EVENTS_EXCHANGE,
                routing_key=event["type"],
                properties=message.properties,
                mandatory=True,
                timeout=5.0,
            )
            if not isinstance(confirmation, aiormq.spec.Basic.Ack):
                return web.json_response({"error": "not_confirmed"}, status=503)
        return web.Response(body=b'{"received":true}', content_type="application/json")

    async def ready(_request: web.Request) -> web.Response:
        waiting = amqp_url is not None and not channels
        return web.json_response({"ready": not waiting}, status=503 if waiting else 200)

    async def broker(_app: web.Application) -> Any:
        if amqp_url is None:
            yield
            return
        connection = await aiormq.connect(amqp_url)
        channels.extend([await connection.channel(publisher_confirms=True) for _ in range(PUBLISH_CHANNELS)])
        yield
        await connection.close()

    app = web.Application()
    app.router.add_post("/webhooks/stripe", webhook)
    app.router.add_get("/readyz", ready)
    app.cleanup_ctx.append(broker)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, reuse_port=True)


# ---------------------------------------------------------------- orchestration


def cpu_seconds(pid: int, kernel_only: bool = False) -> float:
    """utime + stime (or stime alone) of one process, from /proc/<pid>/stat."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[12]) + (0 if kernel_only else int(fields[11]))) / CLK_TCK
    return 0.0


def machine_busy_seconds() -> float:
    """Non-idle CPU time of the whole machine (all processes, ours and everyone else's)."""
    jiffies = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = jiffies[3] + jiffies[4]  # idle + iowait
    return (sum(jiffies[:8]) - idle) / CLK_TCK


def broker_pid() -> int | None:
    """The beam.smp that listens on the AMQP port (other beam.smp may be CLI tools)."""
    out = subprocess.run(["ss", "-ltnpH", "sport = :5672"], capture_output=True, text=True).stdout
    for part in out.split("pid=")[1:]:
        return int(part.split(",")[0])
    return None


def rabbitmqctl(*args: str) -> None:
    command = ["rabbitmqctl", "-q", *args]
    subprocess.run(command, check=True, capture_output=True, timeout=BROKER_CALL_TIMEOUT_S * 2)


def vhost_url(vhost: str) -> str:
    """The AMQP URL of one of the bench's vhosts on the broker under test."""
    return AMQP_BASE + quote(vhost, safe="")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Target:
    name: str
    pids: list[int]
    url: str


def start_receivers(processes: int, env: dict[str, str], workdir: Path) -> list[subprocess.Popen[bytes]]:
    recon = Path(sys.executable).parent / "recon"
    procs = []
    for i in range(processes):
        log = (RESULTS / f"receiver-{i}.log").open("wb")
        # cwd is an empty directory so a developer's .env cannot change the settings.
        procs.append(subprocess.Popen([str(recon), "receiver"], env=env, cwd=workdir, stdout=log, stderr=log))
    return procs


def start_baselines(
    processes: int, port: int, secret: str, amqp_url: str | None = None
) -> list[subprocess.Popen[bytes]]:
    """``processes`` baseline servers on one port; with ``amqp_url``, the floor (serve_baseline)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-baseline", str(port)]
    # Its own variable: an AMQP_URL in the developer's shell must not turn the baseline into the floor.
    env = os.environ | {"BENCH_SECRET": secret} | ({"BENCH_AMQP_URL": amqp_url} if amqp_url else {})
    return [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL) for _ in range(processes)]


async def wait_ready(base_url: str, processes: int, procs: list[subprocess.Popen[bytes]]) -> None:
    """Ready once many fresh connections in a row (spread over the processes) get /readyz 200."""
    deadline = time.monotonic() + 30
    streak = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        while streak < 10 * processes:
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise SystemExit(f"{base_url} did not become ready (see bench/results/*.log)")
            try:
                async with http.get(f"{base_url}/readyz") as response:
                    streak = streak + 1 if response.status == 200 else 0
            except aiohttp.ClientError:
                streak = 0
            if streak == 0:
                await asyncio.sleep(0.1)


def stop(procs: list[subprocess.Popen[bytes]]) -> list[int | None]:
    """SIGTERM (the graceful path) and collect exit codes; a receiver should exit 0."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=40))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(None)
    return codes


# ---------------------------------------------------------------- measuring one phase


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


@dataclass
class PhaseResult:
    target: str
    phase: str
    requests: int
    accepted: int
    statuses: dict[str, int]
    wall_s: float
    accepted_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    cpu_s: dict[str, float]
    cpu_us_per_request: dict[str, float]


class Bench:
    def __init__(
        self, args: argparse.Namespace, gens: list[tuple[multiprocessing.Process, Connection]]
    ) -> None:
        self.args = args
        self.gens = gens
        self.broker = broker_pid()

    def _cpu(self, target: Target) -> dict[str, float]:
        return {
            "generator": sum(cpu_seconds(p.pid or 0) for p, _ in self.gens),
            "receiver": sum(cpu_seconds(pid) for pid in target.pids),
            "broker": cpu_seconds(self.broker) if self.broker else 0.0,
            "receiver_kernel": sum(cpu_seconds(pid, kernel_only=True) for pid in target.pids),
            "machine": machine_busy_seconds(),
        }

    def _dispatch(self, spec: dict[str, Any]) -> list[dict[str, Any]]:
        share = dict(spec, count=spec["count"] // len(self.gens))
        if spec["mode"] == "closed":
            share["concurrency"] = max(1, spec["concurrency"] // len(self.gens))
        else:
            share["rate"] = spec["rate"] / len(self.gens)
        for _, conn in self.gens:
            conn.send(share)
        return [conn.recv() for _, conn in self.gens]

    def phase(self, target: Target, name: str, spec: dict[str, Any]) -> PhaseResult:
        self._dispatch(dict(spec, count=self.args.warmup))
        before, started = self._cpu(target), time.perf_counter()
        replies = self._dispatch(dict(spec, count=self.args.requests))
        wall_s = time.perf_counter() - started
        after = self._cpu(target)
        return summarise(target.name, name, replies, wall_s, before, after)


def summarise(
    target: str,
    phase: str,
    replies: list[dict[str, Any]],
    wall_s: float,
    before: dict[str, float],
    after: dict[str, float],
) -> PhaseResult:
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    for reply in replies:
        latencies.extend(array.array("d", reply["latencies"]))
        statuses.update(reply["statuses"])
    latencies.sort()
    requests, accepted = len(latencies), statuses.get("200", 0)
    elapsed = max(reply["elapsed_s"] for reply in replies)
    cpu = {k: round(after[k] - before[k], 2) for k in before}
    ours = cpu["generator"] + cpu["receiver"] + cpu["broker"]
    per_request = {k: round(v / requests * 1e6) for k, v in cpu.items()} | {
        "total": round(ours / requests * 1e6)
    }
    # Cores busy during the phase, whoever used them: other work on the machine shows here.
    cpu["machine_cores_busy"] = round(cpu.pop("machine") / wall_s, 2)
    per_request.pop("machine")
    ms = [round(percentile(latencies, q) * 1000, 2) for q in (0.5, 0.9, 0.99)]
    return PhaseResult(
        target,
        phase,
        requests,
        accepted,
        dict(statuses),
        round(wall_s, 2),
        round(accepted / elapsed),
        *ms,
        round(latencies[-1] * 1000, 2),
        cpu,
        per_request,
    )


async def purge_work_queue(amqp_url: str) -> None:
    """Between phases: the bench measures intake, and a growing queue would tax the broker.

    Bounded: on a shared broker that has stopped answering, the bench reports and goes on
    (the vhost, and its messages, are deleted at the end anyway).
    """
    import aio_pika

    try:
        async with asyncio.timeout(BROKER_CALL_TIMEOUT_S):
            connection = await aio_pika.connect(amqp_url, timeout=BROKER_CALL_TIMEOUT_S)
            async with connection:
                channel = await connection.channel()
                queue = await channel.declare_queue("recon.events", passive=True)
                await queue.purge()
    except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
        print(f"warning: could not purge recon.events ({type(exc).__name__}); the broker may be overloaded")


async def publish_only(amqp_url: str, count: int, concurrency: int) -> PhaseResult:
    """The ceiling without HTTP: worker.Publisher alone, this process publishing fixture
    bodies with `concurrency` confirms in flight on one channel, as the receiver does."""
    sys.path.insert(0, str(ROOT))
    from worker.amqp.connection import connect, declare_topology, open_confirm_channel
    from worker.amqp.publisher import Publisher, event_message
    from worker.settings import Settings

    settings = Settings(amqp_url=amqp_url)
    connection = await connect(amqp_url)
    await declare_topology(connection, settings)
    publisher = Publisher(await open_confirm_channel(connection))
    bodies = event_templates()
    tally, remaining = Tally(), iter(range(count))

    async def publish_some() -> None:
        for i in remaining:
            started = time.perf_counter()
            message = event_message(
                bodies[i % len(bodies)], f"evt_probe{i}", EVENT_MIX[i % len(EVENT_MIX)][0], 1
            )
            await publisher.publish_event(message)
            tally.latencies_s.append(time.perf_counter() - started)
            tally.statuses["200"] += 1

    pid, broker_process = os.getpid(), broker_pid()
    probe = Target("publish-only", [pid], "")

    def sample() -> dict[str, float]:
        return {
            "generator": 0.0,
            "receiver": cpu_seconds(pid),
            "broker": cpu_seconds(broker_process or 0),
            "receiver_kernel": cpu_seconds(pid, kernel_only=True),
            "machine": machine_busy_seconds(),
        }

    async with connection:
        before, started = sample(), time.perf_counter()
        await asyncio.gather(*(publish_some() for _ in range(concurrency)))
        wall_s = time.perf_counter() - started
        after = sample()
    reply = {"elapsed_s": wall_s, "latencies": tally.latencies_s.tobytes(), "statuses": dict(tally.statuses)}
    return summarise(probe.name, f"confirms c={concurrency}", [reply], wall_s, before, after)


def phase_specs(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    specs = [(f"closed c={c}", {"mode": "closed", "concurrency": c}) for c in args.concurrency]
    return [*specs, (f"open {args.rate:g}/s", {"mode": "open", "rate": args.rate})]


@contextlib.contextmanager
def profiling(pid: int, enabled: bool, out: Path) -> Any:
    """py-spy on one receiver for the duration of a phase (SIGINT makes it write its output)."""
    if not enabled:
        yield
        return
    spy = Path(sys.executable).parent / "py-spy"
    proc = subprocess.Popen(
        [str(spy), "record", "-p", str(pid), "-r", "250", "-f", "raw", "-o", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def profile_summary(path: Path, top: int = 14) -> list[str]:
    """Self and inclusive sample shares from py-spy's collapsed stacks."""
    if not path.exists():
        return ["(no profile written)"]
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
            for f in stack.split(";")
        ]
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    lines = [f"profile: {total} samples"]
    lines += [f"  self {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines += [f"  incl {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top * 2)]
    return lines


async def run_target(bench: Bench, target: Target, amqp_url: str | None) -> list[PhaseResult]:
    results = []
    for i, (name, spec) in enumerate(phase_specs(bench.args)):
        out = RESULTS / "intake-profile.txt"
        profile = bench.args.profile and target.name == "receiver" and i == len(bench.args.concurrency) - 1
        with profiling(target.pids[0], profile, out):
            result = await asyncio.to_thread(bench.phase, target, name, spec)
        print(format_row(result), flush=True)
        results.append(result)
        if amqp_url:
            await purge_work_queue(amqp_url)
    return results


def format_row(r: PhaseResult) -> str:
    cpu = r.cpu_us_per_request
    other = {k: v for k, v in r.statuses.items() if k != "200"}
    return (
        f"{r.target:9} {r.phase:14} {r.accepted_per_s:7,d}/s  p50 {r.p50_ms:6.2f}  p90 {r.p90_ms:6.2f}  "
        f"p99 {r.p99_ms:7.2f}  max {r.max_ms:7.2f} ms  cpu/req {cpu['total']:4d} us "
        f"(gen {cpu['generator']}, recv {cpu['receiver']} [kernel {cpu['receiver_kernel']}], "
        f"broker {cpu['broker']})  machine {r.cpu_s['machine_cores_busy']:.2f} cores busy"
        + (f"  non-200: {other}" if other else "")
    )


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10_000, help="measured requests per phase")
    parser.add_argument("--warmup", type=int, default=2_000, help="unmeasured requests before each phase")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[16, 64])
    parser.add_argument("--rate", type=float, default=2500.0, help="open-loop requests per second")
    parser.add_argument(
        "--processes", type=int, default=1, help="receiver (and baseline) processes on one port"
    )
    parser.add_argument("--generators", type=int, default=1, help="load-generator processes")
    parser.add_argument("--quick", action="store_true", help="2,000 measured, 300 warm-up: a smoke run")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the receiver during the last closed phase"
    )
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.warmup = 2_000, 300
    return args


def start_generators(count: int, url: str, secret: str) -> list[tuple[multiprocessing.Process, Connection]]:
    context = multiprocessing.get_context("spawn")
    gens = []
    for i in range(count):
        parent, child = context.Pipe()
        process = context.Process(target=generator_main, args=(child, url, secret, i), daemon=True)
        process.start()
        gens.append((process, parent))
    for _, conn in gens:
        assert conn.recv() == "ready"
    return gens


def stop_generators(gens: list[tuple[multiprocessing.Process, Connection]]) -> None:
    for process, conn in gens:
        conn.send(None)
        process.join(timeout=10)


async def bench_receiver(
    args: argparse.Namespace, vhost: str, secret: str, workdir: Path
) -> tuple[list[PhaseResult], list[int | None]]:
    port = free_port()
    amqp_url = vhost_url(vhost)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "AMQP_URL": amqp_url,
        "STRIPE_WEBHOOK_SECRETS": secret,
        "RECON_HTTP_HOST": "127.0.0.1",
        "RECON_HTTP_PORT": str(port),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "info",
    }
    procs = start_receivers(args.processes, env, workdir)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_ready(base, args.processes, procs)
        gens = start_generators(args.generators, f"{base}/webhooks/stripe", secret)
        try:
            results = await run_target(
                Bench(args, gens), Target("receiver", [p.pid for p in procs], base), amqp_url
            )
        finally:
            stop_generators(gens)
    finally:
        codes = stop(procs)
    return results, codes


async def bench_baseline(args: argparse.Namespace, secret: str) -> list[PhaseResult]:
    port = free_port()
    procs = start_baselines(args.processes, port, secret)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_ready(base, args.processes, procs)
        gens = start_generators(args.generators, f"{base}/webhooks/stripe", secret)
        try:
            return await run_target(Bench(args, gens), Target("baseline", [p.pid for p in procs], base), None)
        finally:
            stop_generators(gens)
    finally:
        stop(procs)


def report(
    receiver: list[PhaseResult],
    baseline: list[PhaseResult],
    probe: PhaseResult,
    codes: list[int | None],
    args: argparse.Namespace,
) -> None:
    print()
    for ours, base in zip(receiver, baseline, strict=True):
        throughput = ours.accepted_per_s / max(1, base.accepted_per_s)
        cpu = ours.cpu_us_per_request["receiver"] / max(1, base.cpu_us_per_request["receiver"])
        print(f"ratio ours/baseline {ours.phase:14} throughput {throughput:.2f}  receiver cpu/req {cpu:.2f}")
    print(f"receiver exit codes after SIGTERM: {codes}")
    if args.profile:
        print("\n".join(profile_summary(RESULTS / "intake-profile.txt")))
    out = RESULTS / f"intake-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(
        json.dumps(
            {
                "args": {k: v for k, v in vars(args).items() if k != "serve_baseline"},
                "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
                "results": [asdict(r) for r in [*receiver, probe, *baseline]],
                "receiver_exit_codes": codes,
            },
            indent=2,
        )
    )
    print(f"written {out.relative_to(ROOT)}")


async def main(args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    secret = "whsec_" + secrets.token_hex(24)
    vhost = f"recon-bench-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    workdir = RESULTS / f"cwd-{vhost}"
    workdir.mkdir()
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        print(f"{os.cpu_count()} cpus, broker pid {broker_pid()}, ", end="")
        print(f"{args.requests} measured + {args.warmup} warm-up requests per phase")
        receiver, codes = await bench_receiver(args, vhost, secret, workdir)
        amqp_url = vhost_url(vhost)
        async with asyncio.timeout(BROKER_CALL_TIMEOUT_S * 5):
            probe = await publish_only(amqp_url, args.requests, max(args.concurrency))
        print(format_row(probe), flush=True)
        await purge_work_queue(amqp_url)
        baseline = [] if args.no_baseline else await bench_baseline(args, secret)
        report(receiver, baseline or receiver, probe, codes, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        try:
            rabbitmqctl("delete_vhost", vhost)
        except (subprocess.SubprocessError, OSError):
            print(f"warning: could not delete vhost {vhost}: rabbitmqctl delete_vhost {vhost}")


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.serve_baseline:
        serve_baseline(arguments.serve_baseline, os.environ["BENCH_SECRET"], os.environ.get("BENCH_AMQP_URL"))
    else:
        asyncio.run(main(arguments))
