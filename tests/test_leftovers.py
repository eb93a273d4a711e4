"""A test run removes the databases and vhosts that killed test processes left on the shared servers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import asyncpg
import pytest_asyncio

from tests import servers


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


async def _databases() -> set[str]:
    con = await asyncpg.connect(servers.PG_ADMIN_URL)
    try:
        return {row["datname"] for row in await con.fetch("select datname from pg_database")}
    finally:
        await con.close()


@pytest_asyncio.fixture
async def planted() -> AsyncIterator[dict[str, str]]:
    """A database and a vhost named as a dead process on this host would name them, the same for
    this live process, and a dead process's on another host; whatever remains is removed after."""
    dead, here = _dead_pid(), os.getpid()
    other_host = "000000" if servers.HOST_TAG != "000000" else "111111"
    names = {
        "dead_db": f"recon_t_{dead}_{servers.HOST_TAG}_aaaaaa_11111111",
        "live_db": f"recon_t_{here}_{servers.HOST_TAG}_bbbbbb_22222222",
        "other_db": f"recon_t_{dead}_{other_host}_cccccc_33333333",
        "dead_vhost": f"recon-test-{dead}-{servers.HOST_TAG}-dddddd-0",
        "live_vhost": f"recon-test-{here}-{servers.HOST_TAG}-eeeeee-0",
    }
    con = await asyncpg.connect(servers.PG_ADMIN_URL)
    try:
        for key in ("dead_db", "live_db", "other_db"):
            await con.execute(f'create database "{names[key]}"')
    finally:
        await con.close()
    for key in ("dead_vhost", "live_vhost"):
        await asyncio.to_thread(servers.rabbitmqctl, "add_vhost", names[key])
    yield names
    for key in ("dead_db", "live_db", "other_db"):
        await servers.drop_database(names[key])
    for key in ("dead_vhost", "live_vhost"):
        if names[key] in await servers.vhost_names():
            await asyncio.to_thread(servers.rabbitmqctl, "delete_vhost", names[key])


async def test_only_what_a_dead_process_on_this_host_left_is_removed(planted: dict[str, str]) -> None:
    """The dead process's database and vhost go; the live process's and the other host's stay."""
    removed = await servers.remove_leftovers()
    assert {planted["dead_db"], planted["dead_vhost"]} <= set(removed)
    databases, vhosts = await _databases(), set(await servers.vhost_names())
    assert planted["dead_db"] not in databases and planted["dead_vhost"] not in vhosts
    assert {planted["live_db"], planted["other_db"]} <= databases
    assert planted["live_vhost"] in vhosts


def test_every_name_the_servers_module_makes_carries_its_owner() -> None:
    """Vhosts, the template, clones and the migration tests' databases: each is this live process's,
    and the same name with a dead process's pid is a leftover. Other databases never are."""
    tag, dead = servers.RUN_TAG, _dead_pid()
    under = tag.replace("-", "_")
    names = [f"recon-test-{tag}-0", f"recon_tpl_{under}", f"recon_t_{under}_12345678", f"recon_m_{under}_a"]
    for name in names:
        assert not servers.left_by_a_dead_process(name)
        assert servers.left_by_a_dead_process(name.replace(str(os.getpid()), str(dead), 1))
    assert not servers.left_by_a_dead_process("recon_bench_drain_313faabc")
