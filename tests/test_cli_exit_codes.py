"""Contract section 2: every `recon` command exits 0 on success, 2 with one line on stderr for a
bad argument or setting, and 1 (one line, no traceback) when PostgreSQL or RabbitMQ cannot be
reached. Each command runs as the console script does, in a process of its own, from a working
directory with no .env, against this test's database and vhost and a local fake of the Stripe API."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web

from tests import builders as b
from tests import host_records as host
from tests.conftest import free_port
from tests.harness import via_port
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk_test_recon_cli_exit_codes"
SINCE = "2024-07-01"


async def _empty_list(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "url": request.path, "data": [], "has_more": False})


async def _refund_created(request: web.Request) -> web.Response:
    form = await request.post()
    refund = b.refund(charge_id=str(form["charge"]), amount=int(str(form["amount"])), status="pending")
    refund["metadata"] = {key[9:-1]: value for key, value in form.items() if key.startswith("metadata[")}
    return web.json_response(refund)


@pytest.fixture
async def stripe_api() -> AsyncIterator[str]:
    """A Stripe API with nothing in it: every list is empty; a refund it is asked for is created."""
    app = web.Application()
    app.router.add_post("/v1/refunds", _refund_created)
    app.router.add_get("/{path:.*}", _empty_list)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str


@dataclass
class Recon:
    """`recon ...` as a subprocess with this test's settings; ``env`` overrides them."""

    settings: Settings
    stripe_api: str
    cwd: Path

    def env(self, **overrides: str) -> dict[str, str]:
        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT),
            "DATABASE_URL": self.settings.database_url,
            "AMQP_URL": self.settings.amqp_url,
            "STRIPE_API_KEY": API_KEY,
            "STRIPE_API_BASE": self.stripe_api,
            "LOG_FORMAT": "json",
        }
        # Coverage's own variables (scripts/coverage.sh), so these processes are measured too.
        env.update({k: v for k, v in os.environ.items() if "COVERAGE" in k})
        env.update(overrides)
        return {key: value for key, value in env.items() if value != ""}

    async def __call__(self, *argv: str, **env: str) -> Ran:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker.cli",
            *argv,
            cwd=self.cwd,
            env=self.env(**env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return Ran(process.returncode, out.decode(), err.decode())


@pytest.fixture
def recon(settings: Settings, stripe_api: str, tmp_path: Path) -> Recon:
    """Runs `recon` against this test's database, vhost and fake Stripe API, from an empty directory."""
    return Recon(settings, stripe_api, tmp_path)


def closed_url(url: str) -> str:
    """The same URL on a local port nothing listens on."""
    return via_port(url, free_port())


async def _exceptions(settings: Settings) -> tuple[int, int]:
    """An over_refund exception (resolvable) and an unmatched_charge one whose event is stored
    (retryable), raised by the rules themselves; their ids."""
    con = await asyncpg.connect(settings.database_url)
    try:
        unmatched = b.refund_event("refund.created", b.refund(charge_id="ch_nobody", amount=100))
        result = await host.apply(con, b.incoming(unmatched), retry_s=0)
        assert result.outcome == "unmatched"
        retryable = await con.fetchval("select id from recon.exceptions where kind = 'unmatched_charge'")
        resolvable = await con.fetchval(
            "insert into recon.exceptions (kind, stripe_event_id, stripe_object_id)"
            " values ('over_refund', 'evt_over', 're_over') returning id"
        )
        await host.add_order(con, "ORD-EMPTY")
        await host.add_order_with_payment(con, "ORD-PAID", "ch_paid", amount=1000)
        await host.apply(con, b.incoming(b.charge_event("charge.succeeded", b.charge(charge_id="ch_paid"))))
    finally:
        await con.close()
    return int(resolvable), int(retryable)


async def each(
    recon: Recon, commands: Sequence[tuple[str, ...]], **env: str
) -> list[tuple[tuple[str, ...], Ran]]:
    """Every command's run, a few at a time (each is a process of its own)."""
    gate = asyncio.Semaphore(4)

    async def one(argv: tuple[str, ...]) -> tuple[tuple[str, ...], Ran]:
        async with gate:
            return argv, await recon(*argv, **env)

    return list(await asyncio.gather(*(one(argv) for argv in commands)))


def one_line(ran: Ran) -> bool:
    lines = ran.stderr.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("recon") and "Traceback" not in ran.stderr


async def test_every_command_exits_0_on_success(recon: Recon, settings: Settings) -> None:
    """Each command, given what it needs, succeeds with exit 0 (with --json, one JSON document)."""
    resolvable, retryable = await _exceptions(settings)
    commands: list[tuple[str, ...]] = [
        ("migrate",),
        ("migrate", "--create-db"),
        ("dead-letters", "list", "--json"),
        ("dead-letters", "replay", "--all"),
        ("backfill", "--since", SINCE),
        ("report", "--format", "json"),
        ("exceptions", "list", "--json"),
        ("exceptions", "resolve", str(resolvable), "--note", "checked with Stripe"),
        ("exceptions", "retry", str(retryable)),
        ("verify", "--since", SINCE, "--json"),
        ("payouts", "--since", SINCE, "--json"),
        ("reject-order", "ORD-EMPTY", "--note", "fraud suspected"),
        ("refund", "--order", "ORD-PAID", "--amount", "100", "--reason", "duplicate", "--no-notify"),
    ]
    for argv in commands:
        ran = await recon(*argv)
        assert ran.code == 0, (argv, ran)


BAD_ARGUMENTS: list[tuple[str, ...]] = [
    ("migrate", "--drop-everything"),
    ("dead-letters", "list", "--yaml"),
    ("dead-letters", "replay"),  # neither EVENT_ID nor --all
    ("dead-letters", "replay", "evt_1", "--all"),  # both
    ("backfill",),  # --since is required
    ("backfill", "--since", "yesterday"),
    ("backfill", "--since", "2024-07-02", "--until", "2024-07-01"),
    ("report", "--format", "xml"),
    ("report", "--since", "2024-13-01"),
    ("exceptions", "list", "--kind", "no_such_kind"),
    ("exceptions", "resolve", "1"),  # --note is required
    ("exceptions", "resolve", "1", "--note", "   "),
    ("exceptions", "retry", "one"),
    ("verify", "--since", "2024-02-30"),
    ("verify", "--since", "2024-07-02", "--until", "2024-07-01"),
    ("payouts", "--since", "soon"),
    ("refund", "--order", "ORD-1", "--reason", "because"),
    ("refund", "--order", "ORD-1", "--reason", "other"),  # other needs a note
    ("refund", "--order", "ORD-1", "--amount", "-5", "--reason", "duplicate"),
    ("reject-order", "ORD-1"),  # --note is required
]


async def test_a_bad_argument_exits_2_with_one_line(recon: Recon) -> None:
    """A bad or missing argument of any command: exit 2 and one clear line on stderr (not
    argparse's usage block, not a traceback)."""
    wrong = [
        (argv, ran)
        for argv, ran in await each(recon, BAD_ARGUMENTS)
        if (ran.code, one_line(ran)) != (2, True)
    ]
    assert wrong == []


EVERY_COMMAND: list[tuple[str, ...]] = [
    ("migrate",),
    ("dead-letters", "list"),
    ("dead-letters", "replay", "--all"),
    ("backfill", "--since", SINCE),
    ("report",),
    ("exceptions", "list"),
    ("exceptions", "resolve", "1", "--note", "n"),
    ("exceptions", "retry", "1"),
    ("verify", "--since", SINCE),
    ("payouts", "--since", SINCE),
    ("refund", "--order", "ORD-1", "--reason", "duplicate"),
    ("reject-order", "ORD-1", "--note", "n"),
]


async def test_a_bad_setting_exits_2_with_one_line_for_every_command(recon: Recon) -> None:
    """A setting that does not parse, or one a command needs and lacks (STRIPE_API_KEY for the
    commands that read the Stripe API), exits 2 with one line naming it."""
    for argv in EVERY_COMMAND:
        ran = await recon(*argv, RECON_MAX_ATTEMPTS="eight")
        assert (ran.code, one_line(ran)) == (2, True), (argv, ran)
        assert "RECON_MAX_ATTEMPTS" in ran.stderr
    for argv in [
        ("backfill", "--since", SINCE),
        ("verify",),
        ("payouts",),
        ("reject-order", "O", "--note", "n"),
    ]:
        ran = await recon(*argv, STRIPE_API_KEY="")
        assert (ran.code, one_line(ran)) == (2, True), (argv, ran)
        assert "STRIPE_API_KEY" in ran.stderr


async def test_an_unreachable_database_exits_1_for_every_command(recon: Recon, settings: Settings) -> None:
    """DATABASE_URL on a port nothing listens on: every command that needs PostgreSQL exits 1 with
    one line, no traceback and not the URL."""
    url = closed_url(settings.database_url)
    for argv, ran in await each(recon, EVERY_COMMAND, DATABASE_URL=url):
        assert (ran.code, one_line(ran)) == (1, True), (argv, ran)
        assert url not in ran.stderr


async def test_an_unreachable_broker_exits_1_for_the_commands_that_queue(
    recon: Recon, settings: Settings
) -> None:
    """AMQP_URL on a port nothing listens on: the commands that publish (a dead-letter replay, a
    backfill that found events to queue, an exception retry) exit 1 with one line."""
    _resolvable, retryable = await _exceptions(settings)
    con = await asyncpg.connect(settings.database_url)
    try:
        await con.execute(
            "insert into recon.dead_letters (event_id, event_type, body, last_error, attempts, first_seen_at)"
            " values ('evt_dead', 'refund.created', $1, 'KeyError', 8, now())",
            b'{"id": "evt_dead", "object": "event", "type": "refund.created", "created": 1,'
            b' "data": {"object": {}}}',
        )
    finally:
        await con.close()
    url = closed_url(settings.amqp_url)
    publishing = [("dead-letters", "replay", "--all"), ("exceptions", "retry", str(retryable))]
    for argv, ran in await each(recon, publishing, AMQP_URL=url):
        assert (ran.code, one_line(ran)) == (1, True), (argv, ran)
        assert url not in ran.stderr


async def test_a_database_that_refuses_exits_1_with_one_line(recon: Recon, settings: Settings) -> None:
    """PostgreSQL answers but the database does not exist: exit 1 with one line naming why, not a
    traceback (a server that refuses is as unusable as one that cannot be reached)."""
    url = settings.database_url.rsplit("/", 1)[0] + "/recon_no_such_database"
    for argv, ran in await each(recon, [("report",), ("exceptions", "list")], DATABASE_URL=url):
        assert (ran.code, one_line(ran)) == (1, True), (argv, ran)
        assert "does not exist" in ran.stderr and "Traceback" not in ran.stderr
