"""Isolation on the shared servers: a fresh database and a fresh RabbitMQ vhost per test."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import socket
import subprocess
import uuid
from urllib.parse import quote

import asyncpg
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential
from yarl import URL

from worker.ops import migrate

PG_ADMIN_URL = os.environ.get("RECON_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_BASE = os.environ.get("RECON_TEST_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672/")
# Every database and vhost a test process makes is named after it: its pid and this host (a CI
# container sharing the servers has pids of its own), so a later run can tell a leftover of a
# process that died (a timeout, a kill) from the live work of a run beside it.
HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
RUN_TAG = f"{os.getpid()}-{HOST_TAG}-{uuid.uuid4().hex[:6]}"
_OWNED = re.compile(r"^recon[-_](?:test|t|tpl|m)[-_](\d+)[-_]([0-9a-f]{6})[-_]")
# What every vhost deletion here runs, as the user tag the tests' vhosts are made with.
_DELETE_VHOST = 'rabbit_vhost:delete(V, <<"recon-tests">>)'


def database_url(name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


async def create_template() -> str:
    """A migrated database that each test clones (CREATE DATABASE … TEMPLATE is ~50 ms)."""
    name = f"recon_tpl_{RUN_TAG.replace('-', '_')}"
    url = database_url(name)
    await migrate.create_database(url)
    await migrate.apply_migrations(url)
    return name


async def clone_database(template: str) -> str:
    name = f"recon_t_{RUN_TAG.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    con = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await con.execute(f'create database "{name}" template "{template}"')
    finally:
        await con.close()
    return name


async def drop_database(name: str) -> None:
    con = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await con.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await con.close()


def left_by_a_dead_process(name: str) -> bool:
    """A test database or vhost whose maker, on this host, no longer runs."""
    owner = _OWNED.match(name)
    if owner is None or owner.group(2) != HOST_TAG:
        return False
    try:
        os.kill(int(owner.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


async def remove_leftovers() -> list[str]:
    """Drops the databases and deletes the vhosts that killed test processes left behind (each
    live vhost holds about 11 of RabbitMQ's few file descriptors). Returns what it removed."""
    con = await asyncpg.connect(PG_ADMIN_URL)
    try:
        rows = await con.fetch("select datname from pg_database where datname like 'recon\\_%'")
    finally:
        await con.close()
    databases = [row["datname"] for row in rows if left_by_a_dead_process(row["datname"])]
    for name in databases:
        await drop_database(name)
    vhosts = [name for name in await vhost_names() if left_by_a_dead_process(name)]
    if vhosts:
        # catch: a process beside us may be removing the same ones.
        expr = f"[catch {_DELETE_VHOST} || V <- {_erl_binaries(vhosts)}], ok."
        await asyncio.to_thread(_rabbitmqctl_eval, expr)
    return databases + vhosts


async def vhost_names() -> list[str]:
    """Every vhost on the shared node."""
    return (await asyncio.to_thread(rabbitmqctl, "list_vhosts", "name")).split()


def _erl_binaries(names: list[str]) -> str:
    return "[" + ", ".join(f'<<"{n}">>' for n in names) + "]"


class VhostPool:
    """Fresh vhosts for tests, made in batches (rabbitmqctl costs ~0.6 s a call); none is reused.

    Each vhost holds two quorum queues, i.e. Ra servers: left alive for the whole session, a
    few hundred of them slow the node down until adding one more vhost takes seconds. So the
    vhosts of finished tests are deleted in the same CLI call that makes the next batch.
    """

    # Each live vhost holds about 11 of the node's file descriptors (927 here): a process keeps up
    # to two batches alive (the free one and the finished ones awaiting deletion), so the batch
    # shrinks with the number of xdist processes to keep the whole run under about 50 vhosts.
    BATCH = max(6, 24 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))

    def __init__(self) -> None:
        self._free: list[str] = []
        self._live: set[str] = set()
        self._finished: list[str] = []
        self._counter = 0
        self._lock = asyncio.Lock()

    def _make_batch(self) -> None:
        names = [f"recon-test-{RUN_TAG}-{self._counter + i}" for i in range(self.BATCH)]
        self._counter += self.BATCH
        finished, self._finished = self._finished, []
        expr = (
            f"[{_DELETE_VHOST} || V <- {_erl_binaries(finished)}], "
            f'[begin rabbit_vhost:add(V, <<"recon-tests">>), '
            f'rabbit_auth_backend_internal:set_permissions(<<"guest">>, V, <<".*">>, <<".*">>, '
            f'<<".*">>, <<"recon-tests">>) end || V <- {_erl_binaries(names)}], ok.'
        )
        _rabbitmqctl_eval(expr)
        self._live.difference_update(finished)
        self._free.extend(names)
        self._live.update(names)

    async def take(self) -> str:
        async with self._lock:
            if not self._free:
                await asyncio.to_thread(self._make_batch)
            return self._free.pop(0)

    def release(self, name: str) -> None:
        """The test that had ``name`` is over: delete it with the next batch (or at the end)."""
        self._finished.append(name)

    def delete_all(self) -> None:
        if self._live:
            names = _erl_binaries(sorted(self._live))
            expr = f"[{_DELETE_VHOST} || V <- {names}], ok."
            try:
                _rabbitmqctl_eval_once(expr, timeout_s=300)
            except subprocess.SubprocessError:
                pass  # best effort at session end: a leftover vhost harms no later test's isolation
            self._live.clear()


def _rabbitmqctl_eval_once(expr: str, timeout_s: float = 120) -> None:
    rabbitmqctl("eval", expr, timeout_s=timeout_s)


def rabbitmqctl(*args: str, timeout_s: float = 120) -> str:
    """One CLI call, in its own process group: on a timeout the whole group is killed. Its output.

    rabbitmqctl is a shell wrapper around an Erlang VM; subprocess's timeout kills only the
    wrapper, and an orphaned VM keeps one of the CLI's few distribution ports until every later
    call fails with "Distribution failed".
    """
    process = subprocess.Popen(
        ["rabbitmqctl", "-q", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, f"rabbitmqctl {args[0]}", stderr=err)
    return out.decode()


# A lone CLI call sometimes fails when many hit the node at once (parallel test runs).
_rabbitmqctl_eval = retry(
    retry=retry_if_exception_type(subprocess.SubprocessError),
    stop=stop_after_attempt(4),
    wait=wait_exponential(multiplier=0.5, max=5),
    reraise=True,
)(_rabbitmqctl_eval_once)


def amqp_url(vhost: str) -> str:
    return AMQP_BASE + quote(vhost, safe="")


def vhost_of(url: str) -> str:
    """The vhost an AMQP URL names (amqp_url's inverse)."""
    return URL(url).path.lstrip("/")  # yarl decodes the path
