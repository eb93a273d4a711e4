"""scripts/setup.sh finds a stopped PostgreSQL and a stopped RabbitMQ and starts them.

The shared servers must never be stopped, so this test gives the script a PostgreSQL cluster
and a RabbitMQ node of its own, created stopped on free ports, and points the script's checks at
them (RECON_SETUP_* and RabbitMQ's RABBITMQ_* variables). The install path (Debian packages
missing) is not exercised: removing the packages would take the shared servers with them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiormq
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "scripts" / "setup.sh"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(c) for c in ("pg_createcluster", "rabbitmq-server")),
    reason="needs root and the Debian postgresql and rabbitmq-server packages (as on CI)",
)


def _run(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)


def _pg_version() -> str:
    return sorted(os.listdir("/etc/postgresql"), key=lambda v: [int(p) for p in v.split(".")])[-1]


def _cluster_status(version: str, cluster: str) -> str:
    for line in _run("pg_lsclusters", "--no-header").stdout.splitlines():
        fields = line.split()
        if fields[:2] == [version, cluster]:
            return fields[3]
    return "missing"


@pytest.fixture
def stopped_postgres() -> Iterator[tuple[str, int]]:
    """A PostgreSQL cluster of the test's own, made and left stopped, on a free port; dropped after."""
    version, cluster, port = _pg_version(), f"recon_setup_{uuid.uuid4().hex[:8]}", free_port()
    made = _run("pg_createcluster", version, cluster, "--port", str(port))
    assert made.returncode == 0, made.stderr
    try:
        assert _cluster_status(version, cluster) == "down"
        yield cluster, port
    finally:
        _run("pg_dropcluster", "--stop", version, cluster)


@pytest.fixture
def stopped_rabbitmq() -> Iterator[dict[str, str]]:
    """RabbitMQ's own variables for a second node: name, ports, config, data and logs."""
    # Not pytest's tmp_path: its parents are private to root, and the node runs as rabbitmq.
    home = Path(tempfile.mkdtemp(prefix="recon-setup-rabbitmq-"))
    port, dist_port = free_port(), free_port()
    (home / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{port}\n")
    (home / "enabled_plugins").write_text("[].\n")  # no management plugin: its port is taken
    shutil.chown(home, "rabbitmq", "rabbitmq")
    for child in home.iterdir():
        shutil.chown(child, "rabbitmq", "rabbitmq")
    node = {
        "RABBITMQ_NODENAME": f"recon-setup-{uuid.uuid4().hex[:8]}@localhost",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
        "RABBITMQ_LOG_BASE": str(home / "log"),
        "RABBITMQ_PID_FILE": str(home / "node.pid"),
    }
    try:
        yield node
    finally:
        _run("rabbitmqctl", "-n", node["RABBITMQ_NODENAME"], "stop")
        shutil.rmtree(home, ignore_errors=True)


async def test_setup_starts_a_stopped_postgres_and_rabbitmq_then_leaves_them_running(
    stopped_postgres: tuple[str, int], stopped_rabbitmq: dict[str, str]
) -> None:
    """`setup.sh services` starts a stopped PostgreSQL cluster and RabbitMQ node found by their
    ports, and a second run finds both answering and starts nothing."""
    cluster, pg_port = stopped_postgres
    amqp_port = int(stopped_rabbitmq["RABBITMQ_NODE_PORT"])
    env = {
        **os.environ,
        **stopped_rabbitmq,
        "RECON_SETUP_PG_PORT": str(pg_port),
        "RECON_SETUP_PG_CLUSTER": cluster,
        "RECON_SETUP_AMQP_PORT": str(amqp_port),
    }

    first = _run("bash", str(SETUP), "services", env=env)

    assert first.returncode == 0, first.stderr
    assert "setup: starting PostgreSQL" in first.stderr
    assert "setup: starting RabbitMQ" in first.stderr
    assert _cluster_status(_pg_version(), cluster) == "online"
    # A broker that speaks AMQP on the new node's port, not only an open socket.
    connection = await aiormq.connect(f"amqp://guest:guest@127.0.0.1:{amqp_port}/")
    await connection.close()

    again = _run("bash", str(SETUP), "services", env=env)

    assert again.returncode == 0, again.stderr
    assert "starting" not in again.stderr  # running servers are detected and left alone
