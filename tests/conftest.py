"""Shared fixtures: every test gets its own database and RabbitMQ vhost on the real servers."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import pytest_asyncio

from tests import servers
from tests.consumer_harness import FakeRules, prepare_fake_tables
from tests.stripe_events import TEST_SECRET
from worker.settings import Settings

_vhosts = servers.VhostPool()


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated template database for the session; each test clones its own from it."""
    import asyncio

    name = asyncio.run(servers.create_template())
    yield name
    asyncio.run(servers.drop_database(name))


@pytest.fixture(scope="session", autouse=True)
def _delete_vhosts() -> Iterator[None]:
    """Removes what killed test processes left behind (once per run: the first xdist process),
    and deletes the RabbitMQ vhosts this process made when the session ends."""
    import asyncio

    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0":
        asyncio.run(servers.remove_leftovers())
    yield
    _vhosts.delete_all()


@pytest_asyncio.fixture
async def database_url(pg_template: str) -> AsyncIterator[str]:
    """A freshly migrated database of this test's own."""
    name = await servers.clone_database(pg_template)
    yield servers.database_url(name)
    await servers.drop_database(name)


@pytest_asyncio.fixture
async def amqp_url() -> AsyncIterator[str]:
    """A RabbitMQ vhost of this test's own (deleted with the session)."""
    vhost = await _vhosts.take()
    yield servers.amqp_url(vhost)
    _vhosts.release(vhost)


@pytest_asyncio.fixture
async def con(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this test's own database."""
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def settings(database_url: str, amqp_url: str) -> Settings:
    """Settings pointing at this test's own database and vhost, with short retry delays."""
    return Settings(
        database_url=database_url,
        amqp_url=amqp_url,
        webhook_secrets=(TEST_SECRET,),
        http_port=free_port(),
        worker_http_port=free_port(),
        retry_delays_s=(0.2, 0.5, 1.0),
        unmatched_retry_s=30,
        max_attempts=3,
        log_format="json",
        log_level="info",
    )


@pytest_asyncio.fixture
async def fake(settings: Settings) -> FakeRules:
    """Injected rules whose effects are rows in public.applied / public.dead of this test's database."""
    await prepare_fake_tables(settings.database_url)
    return FakeRules()


@pytest.fixture(autouse=True)
def _structlog_config_restored() -> Iterator[None]:
    """Each test starts with the logging configuration the previous one found: `recon` called
    in-process configures structlog for good (e.g. LOG_LEVEL=error, which filters info and
    warning lines before any processor), and would leave later tests' capture_logs empty."""
    import structlog

    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
