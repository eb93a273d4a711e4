"""How many project functions one ``refund.created`` webhook runs through, POST to ledger row and to ack.

What it measures: for ONE signed ``refund.created`` webhook POSTed to an in-process ``recon run``
app (receiver and consumer in one event loop), the distinct project functions and the distinct
project source files that run

* ``to_ledger``: from the first call of the receiver's POST handler (``receive_webhook``) up to and
  including the first call of ``handlers/pipeline.py`` ``Pipeline.run`` after it (the statement
  that writes the refund's ledger row), and
* ``to_ack``: from the same start up to and including the first call of the AMQP
  ``Delivery.ack`` (``worker/amqp/delivery.py``, or ``worker/deliveries.py`` in older trees).

"Project" means source files under ``<tree>/worker/`` and ``<tree>/handlers/``. A function is a
distinct (file, ``co_qualname``) pair. The figures come from ``sys.setprofile`` ``call`` events on
the event loop's thread, so calls in the request handler's task, the consumer's tasks and in
plain loop callbacks are all seen. Secondary figures: ``call_events`` counts every ``call`` event
(including each resumption of a suspended coroutine, which the profiler also reports as a call),
``invocations`` counts only fresh starts (resumptions left out), and ``named`` is the distinct
count without comprehensions and generator expressions (separate code objects on 3.11).

How it runs: a fresh database (the tree's own ``create_database`` and ``apply_migrations``) and
a fresh RabbitMQ vhost (``rabbitmqctl``), an order and payment for two charges, the tree's
``worker.serve.build_app("run", settings)`` started with aiohttp's AppRunner on 127.0.0.1, logging
configured as ``recon run`` does (JSON, info; the lines go to /dev/null unless ``--logs``), the
uvloop event loop as ``recon run`` uses. After ``/readyz`` answers 200, one warm-up refund is
POSTed and waited for (its inbox outcome ``applied``) so that imports and first-use paths are not
counted; then the profiler is installed, the loop is left to go quiet, the measured refund is
POSTed and the script waits (with a deadline) until the ack marker was seen. The database and the
vhost are dropped at the end, also on failure.

Run it against the tree whose ``worker``/``handlers`` packages it should import (the default is
the repository that holds this script)::

    PYTHONPATH=/work/main /work/main/.venv/bin/python /work/main/bench/call_path.py
    PYTHONPATH=/tmp/old /work/main/.venv/bin/python /work/main/bench/call_path.py --tree /tmp/old --list

It prints a small table and one JSON line
``{"tree": ..., "to_ledger": {"calls": N, "files": M, ...}, "to_ack": {"calls": N, "files": M, ...}}``;
``--list`` adds the ordered distinct functions up to each marker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dis
import importlib
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FrameType, ModuleType
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg
import stripe
from aiohttp import web

PG_BASE = "postgresql://postgres@127.0.0.1:5432"
AMQP_BASE = "amqp://guest:guest@127.0.0.1:5672/"
PROJECT_DIRS = ("worker", "handlers")
PROJECT_PACKAGES = ("worker", "handlers", "schema")
# Each module is looked for in these places, newest layout first (by file, not by trying imports:
# a module that exists but fails to import must fail loudly, not fall back to an older name).
RECEIVER_MODULES = ("worker.intake.receiver", "worker.receiver")
DELIVERY_MODULES = ("worker.amqp.delivery", "worker.deliveries")
MIGRATE_MODULES = ("worker.ops.migrate", "worker.migrate")
FINAL_OUTCOMES = ("applied", "duplicate", "stale", "unmatched", "mismatch", "dead_lettered")
READY_TIMEOUT_S = 60.0
APPLIED_TIMEOUT_S = 60.0
MARKER_TIMEOUT_S = 60.0
QUIET_S = 0.3  # the loop counts as quiet once no project function ran for this long
QUIET_TIMEOUT_S = 15.0
POLL_S = 0.005
RABBITMQCTL_TIMEOUT_S = 120.0

Func = tuple[str, str]  # (file relative to the tree, co_qualname)
# Comprehensions and generator expressions are code objects of their own on 3.11 (and so distinct
# qualnames); ``named`` is the distinct count without them.
INLINE_CODE = ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>")


# --- the tree -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    root: Path
    modules: dict[str, ModuleType]

    def module(self, role: str) -> ModuleType:
        return self.modules[role]


def _module_file(root: Path, dotted: str) -> Path:
    return root.joinpath(*dotted.split(".")).with_suffix(".py")


def _pick(root: Path, candidates: tuple[str, ...]) -> str:
    for dotted in candidates:
        if _module_file(root, dotted).is_file():
            return dotted
    raise SystemExit(f"call_path: none of {', '.join(candidates)} exists under {root}")


def _under(path: str | os.PathLike[str] | None, root: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(root)


def check_imported_from(root: Path) -> None:
    """Every imported worker/handlers/schema module must come from ``root``; else exit loudly."""
    wrong = [
        f"{name} -> {getattr(module, '__file__', None)}"
        for name, module in list(sys.modules.items())
        if name.split(".")[0] in PROJECT_PACKAGES and not _under(getattr(module, "__file__", None), root)
    ]
    if wrong:
        raise SystemExit(f"call_path: modules imported from outside {root}:\n  " + "\n  ".join(wrong))


def import_tree(root: Path) -> Tree:
    sys.path.insert(0, str(root))
    for package in PROJECT_PACKAGES:  # schema: the migrations read their .sql files from it
        importlib.import_module(package)
    check_imported_from(root)
    roles = {
        "serve": "worker.serve",
        "settings": "worker.settings",
        "logs": "worker.logs",
        "pipeline": "handlers.pipeline",
        "receiver": _pick(root, RECEIVER_MODULES),
        "delivery": _pick(root, DELIVERY_MODULES),
        "migrate": _pick(root, MIGRATE_MODULES),
    }
    modules = {role: importlib.import_module(dotted) for role, dotted in roles.items()}
    check_imported_from(root)
    return Tree(root, modules)


def code_of(tree: Tree, role: str, qualname: str) -> CodeType:
    """The code object of ``qualname`` in the module of ``role``, checked to be the tree's own."""
    target: Any = tree.module(role)
    for part in qualname.split("."):
        target = getattr(target, part)
    code: CodeType = target.__code__
    if not _under(code.co_filename, tree.root) or code.co_qualname != qualname:
        raise SystemExit(f"call_path: {qualname} is {code.co_filename}:{code.co_qualname}, not the tree's")
    return code


def describe_tree(root: Path) -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", *PROJECT_DIRS],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"HEAD {head}" + (", worker/handlers modified" if dirty else ", clean")


# --- the profiler ---------------------------------------------------------------------------


def _first_resume(code: CodeType) -> int:
    """Offset of the RESUME that starts a frame: f_lasti is at it on a fresh call, past it on a
    resumption of a suspended coroutine or generator."""
    return next((i.offset for i in dis.get_instructions(code) if i.opname == "RESUME"), 0)


@dataclass(frozen=True, slots=True)
class Call:
    func: Func
    resumed: bool
    task: str


@dataclass
class Recorder:
    """A ``sys.setprofile`` function: records the project ``call`` events from the start marker on."""

    root: Path
    start: CodeType
    ledger: CodeType
    ack: CodeType
    calls: list[Call] = field(default_factory=list)
    ledger_at: int | None = None  # index into calls of the ledger marker
    ack_at: int | None = None
    project_events: int = 0  # every project call event seen, recording or not (for quiescence)
    _codes: dict[CodeType, tuple[Func, int] | None] = field(default_factory=dict)
    _files: dict[str, str | None] = field(default_factory=dict)

    def _relative(self, filename: str) -> str | None:
        if filename not in self._files:
            path = Path(filename).resolve()
            rel = path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else None
            project = rel is not None and rel.split("/")[0] in PROJECT_DIRS
            self._files[filename] = rel if project else None
        return self._files[filename]

    def _classify(self, code: CodeType) -> tuple[Func, int] | None:
        if code not in self._codes:
            rel = self._relative(code.co_filename)
            self._codes[code] = None if rel is None else ((rel, code.co_qualname), _first_resume(code))
        return self._codes[code]

    def __call__(self, frame: FrameType, event: str, _arg: object) -> None:
        if event != "call":
            return
        code = frame.f_code
        known = self._classify(code)
        if known is None:
            return
        self.project_events += 1
        if not self.calls and code is not self.start:
            return
        func, first_resume = known
        resumed = frame.f_lasti > first_resume
        self.calls.append(Call(func, resumed, _task_name()))
        if resumed:
            return
        if code is self.ledger and self.ledger_at is None:
            self.ledger_at = len(self.calls) - 1
        elif code is self.ack and self.ack_at is None:
            self.ack_at = len(self.calls) - 1


def _task_name() -> str:
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return "-"
    if task is None:
        return "(loop callback)"
    coro = task.get_coro()
    return getattr(coro, "__qualname__", None) or task.get_name()


@dataclass(frozen=True)
class Span:
    name: str
    calls: list[Call]

    @property
    def distinct(self) -> list[Func]:
        return list(dict.fromkeys(c.func for c in self.calls))

    @property
    def files(self) -> list[str]:
        return list(dict.fromkeys(f for f, _ in self.distinct))

    def figures(self) -> dict[str, int]:
        return {
            "calls": len(self.distinct),
            "files": len(self.files),
            "named": sum(not q.endswith(INLINE_CODE) for _, q in self.distinct),
            "call_events": len(self.calls),
            "invocations": sum(not c.resumed for c in self.calls),
        }


# --- the servers' side: database, vhost -----------------------------------------------------


def rabbitmqctl(*args: str) -> None:
    """One CLI call in its own process group, killed whole on a timeout (the CLI is an Erlang VM)."""
    process = subprocess.Popen(
        ["rabbitmqctl", "-q", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        _out, err = process.communicate(timeout=RABBITMQCTL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {err.decode(errors='replace').strip()}")


async def drop_database(name: str) -> None:
    con = await asyncpg.connect(f"{PG_BASE}/postgres")
    try:
        quoted = await con.fetchval("select quote_ident($1)", name)
        await con.execute(f"drop database if exists {quoted} with (force)")
    finally:
        await con.close()


@contextlib.contextmanager
def vhost(name: str) -> Iterator[str]:
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield AMQP_BASE + quote(name, safe="")
    finally:
        try:
            rabbitmqctl("delete_vhost", name)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            print(f"call_path: could not delete vhost {name}: {exc}", file=sys.stderr)


async def add_order_with_payment(con: asyncpg.Connection, number: str, charge_id: str, amount: int) -> None:
    """What the host application writes for a paid order (as tests/host_records.py does)."""
    order_id = await con.fetchval(
        "insert into recon.orders (number, currency, amount_total, buyer_email, status) "
        "values ($1, 'usd', $2, 'buyer@example.com', 'pending') returning id",
        number,
        amount,
    )
    await con.execute(
        "insert into recon.payments (stripe_charge_id, order_id, method, currency, amount) "
        "values ($1, $2, 'stripe_card', 'usd', $3)",
        charge_id,
        order_id,
        amount,
    )


# --- the events -----------------------------------------------------------------------------


def fixture(root: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / "tests" / "fixtures" / "stripe" / f"{name}.json").read_text())
    return data


def refund_created(root: Path, tag: str, charge_id: str, amount: int) -> dict[str, Any]:
    """A refund.created event from Stripe's own fixture objects (as tests/builders.py builds it)."""
    now = int(time.time())
    refund = fixture(root, "refund")
    refund.update(id=f"re_callpath{tag}", charge=charge_id, amount=amount, currency="usd", created=now)
    refund.update(status="succeeded")
    event = fixture(root, "event")
    event.update(
        id=f"evt_callpath{tag}",
        type="refund.created",
        created=now,
        api_version="2024-06-20",
        livemode=False,
        data={"object": refund},
    )
    return event


async def post_event(session: aiohttp.ClientSession, url: str, event: dict[str, Any], secret: str) -> None:
    body = json.dumps(event, separators=(",", ":")).encode()
    header = stripe.WebhookSignature.generate_signature_header(
        body.decode(), secret, timestamp=int(time.time())
    )
    headers = {"Stripe-Signature": header, "Content-Type": "application/json"}
    async with session.post(url, data=body, headers=headers) as response:
        text = await response.text()
        if response.status != 200:
            raise RuntimeError(f"POST {event['id']}: {response.status} {text}")


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
                last = f"{response.status} {await response.text()}"
        except aiohttp.ClientError as exc:
            last = repr(exc)
        await asyncio.sleep(0.05)
    raise RuntimeError(f"/readyz not 200 after {READY_TIMEOUT_S}s: {last}")


async def wait_applied(con: asyncpg.Connection, event_id: str) -> None:
    deadline = time.monotonic() + APPLIED_TIMEOUT_S
    outcome = None
    while time.monotonic() < deadline:
        outcome = await con.fetchval("select outcome from recon.event_inbox where event_id = $1", event_id)
        if outcome in FINAL_OUTCOMES:
            break
        await asyncio.sleep(0.01)
    if outcome != "applied":
        raise RuntimeError(f"{event_id}: inbox outcome {outcome!r}, not applied")


async def wait_quiet(recorder: Recorder) -> None:
    """Until no project function ran for QUIET_S: the warm-up's tail (its ack, its log lines) is over."""
    deadline = time.monotonic() + QUIET_TIMEOUT_S
    seen, since = recorder.project_events, time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        if recorder.project_events != seen:
            seen, since = recorder.project_events, time.monotonic()
        elif time.monotonic() - since >= QUIET_S:
            return
    raise RuntimeError(f"project code kept running for {QUIET_TIMEOUT_S}s after the warm-up")


async def wait_marker(recorder: Recorder) -> None:
    deadline = time.monotonic() + MARKER_TIMEOUT_S
    while recorder.ack_at is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no Delivery.ack within {MARKER_TIMEOUT_S}s of the POST")
        await asyncio.sleep(POLL_S)


# --- one measurement ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Run:
    tree: Tree
    database_url: str
    amqp_url: str
    secret: str = field(default_factory=lambda: "whsec_" + secrets.token_hex(16))
    tag: str = field(default_factory=lambda: secrets.token_hex(6))

    def recorder(self) -> Recorder:
        return Recorder(
            root=self.tree.root,
            start=code_of(self.tree, "receiver", "receive_webhook"),
            ledger=code_of(self.tree, "pipeline", "Pipeline.run"),
            ack=code_of(self.tree, "delivery", "Delivery.ack"),
        )

    async def prepare_database(self) -> list[str]:
        migrate = self.tree.module("migrate")
        await migrate.create_database(self.database_url)
        await migrate.apply_migrations(self.database_url)
        charges = [f"ch_callpath{self.tag}w", f"ch_callpath{self.tag}m"]
        con = await asyncpg.connect(self.database_url)
        try:
            for i, charge_id in enumerate(charges):
                await add_order_with_payment(con, f"CP-{self.tag}-{i}", charge_id, 1000)
        finally:
            await con.close()
        return charges

    async def measure(self) -> Recorder:
        warm_charge, measured_charge = await self.prepare_database()
        settings_cls = self.tree.module("settings").Settings
        settings = settings_cls(
            database_url=self.database_url,
            amqp_url=self.amqp_url,
            webhook_secrets=(self.secret,),
            http_port=free_port(),
            worker_http_port=free_port(),
        )
        app, port = self.tree.module("serve").build_app("run", settings)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
            check_imported_from(self.tree.root)
            return await self._exchange(f"http://127.0.0.1:{port}", warm_charge, measured_charge)
        finally:
            sys.setprofile(None)
            await runner.cleanup()

    async def _exchange(self, base: str, warm_charge: str, measured_charge: str) -> Recorder:
        root = self.tree.root
        warm = refund_created(root, f"{self.tag}w", warm_charge, 300)
        measured = refund_created(root, f"{self.tag}m", measured_charge, 400)
        recorder = self.recorder()
        con = await asyncpg.connect(self.database_url)
        try:
            async with aiohttp.ClientSession() as session:
                await wait_ready(session, f"{base}/readyz")
                await post_event(session, f"{base}/webhooks/stripe", warm, self.secret)
                await wait_applied(con, warm["id"])
                sys.setprofile(recorder)
                await wait_quiet(recorder)
                await post_event(session, f"{base}/webhooks/stripe", measured, self.secret)
                await wait_marker(recorder)
                sys.setprofile(None)
            await wait_applied(con, measured["id"])
            booked = await con.fetchval(
                "select count(*) from recon.ledger_entries where kind = 'refund' and source_id = $1",
                measured["data"]["object"]["id"],
            )
        finally:
            await con.close()
        if booked != 1:
            raise RuntimeError(f"the measured refund has {booked} ledger rows, not 1")
        if recorder.ledger_at is None:
            raise RuntimeError("Pipeline.run was not called between the POST and the ack")
        return recorder


async def measure(tree: Tree) -> Recorder:
    name = f"recon_callpath_{secrets.token_hex(6)}"
    run = Run(tree, f"{PG_BASE}/{name}", "")
    try:
        with vhost(name.replace("_", "-")) as amqp_url:
            run.amqp_url = amqp_url
            return await run.measure()
    finally:
        await drop_database(name)


# --- output ---------------------------------------------------------------------------------


def spans(recorder: Recorder) -> list[Span]:
    assert recorder.ledger_at is not None and recorder.ack_at is not None
    return [
        Span("to_ledger", recorder.calls[: recorder.ledger_at + 1]),
        Span("to_ack", recorder.calls[: recorder.ack_at + 1]),
    ]


def report(root: Path, recorder: Recorder, listing: bool) -> None:
    measured = spans(recorder)
    print(f"tree {root} ({describe_tree(root)})")
    print(f"{'span':<10} {'functions':>9} {'files':>5} {'named':>5} {'call events':>11} {'invocations':>11}")
    for span in measured:
        f = span.figures()
        print(
            f"{span.name:<10} {f['calls']:>9} {f['files']:>5} {f['named']:>5} {f['call_events']:>11} "
            f"{f['invocations']:>11}"
        )
    if listing:
        for span in measured:
            tasks: dict[Func, list[str]] = {}
            for call in span.calls:
                tasks.setdefault(call.func, [])
                if call.task not in tasks[call.func]:
                    tasks[call.func].append(call.task)
            print(f"\n{span.name}: {len(span.distinct)} distinct functions in order of first call")
            for i, (path, qualname) in enumerate(span.distinct, 1):
                print(f"{i:4} {path}:{qualname}  [{', '.join(tasks[(path, qualname)])}]")
    print(json.dumps({"tree": str(root), **{span.name: span.figures() for span in measured}}))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tree", type=Path, default=Path(__file__).resolve().parents[1], help="source tree to import"
    )
    parser.add_argument("--list", action="store_true", help="list the distinct functions up to each marker")
    parser.add_argument("--logs", action="store_true", help="let the app's log lines through (to stderr)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop (uvloop)")
    return parser.parse_args()


def loop_factory(name: str) -> Any:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def main() -> int:
    args = parse_args()
    root = args.tree.resolve()
    tree = import_tree(root)
    # StdoutLogger writes to sys.stdout as it is when a line is logged: keep the app's lines off ours.
    sink = sys.stderr if args.logs else io.StringIO()
    with contextlib.redirect_stdout(sink):
        tree.module("logs").configure_logging("json", "info", cache_loggers=True)
        with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
            recorder = runner.run(measure(tree))
    check_imported_from(root)
    report(root, recorder, args.list)
    return 0


if __name__ == "__main__":
    sys.exit(main())
