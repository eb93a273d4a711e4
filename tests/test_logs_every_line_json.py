"""`recon run` with LOG_FORMAT=json writes nothing but JSON lines, whichever library logs.

The process is a real subprocess; each library is made to speak: aiohttp's server gets a request
that is not valid HTTP (an over-long header), the stripe client gets a 404 from a local stand-in
for the API (STRIPE_API_BASE), aio-pika and aiormq lose the broker through a TCP proxy of the
test's own (the shared RabbitMQ is never touched). LOG_LEVEL=debug, so that even the lines shown
only at debug are on the output and are checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from tests import builders as b
from tests.conftest import free_port
from tests.harness import post_event, wait_until
from tests.stripe_events import TEST_SECRET
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow

API_KEY = "sk_test_recon_every_line_json_4242"
EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
SECRET = re.compile(r"(whsec_|sk_test_|sk_live_)[A-Za-z0-9]")
# What the stand-in API answers: a Stripe error whose text carries what must never be logged.
NOT_FOUND = {
    "error": {
        "type": "invalid_request_error",
        "code": "resource_missing",
        "param": "charge",
        "message": "No such charge; ask jenny.rosen@example.com about key whsec_leaked0123",
    }
}


class Output:
    """Every line of the process's stdout and stderr, with a wait for a line that matches."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self._grew = asyncio.Event()

    async def pump(self, stream: asyncio.StreamReader, name: str) -> None:
        while line := await stream.readline():
            self.lines.append((name, line.decode(errors="replace").rstrip("\n")))
            self._grew.set()

    def records(self) -> list[dict[str, Any]]:
        found = []
        for _name, line in self.lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    found.append(record)
        return found

    async def wait_for(self, matches: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        try:
            async with asyncio.timeout(30):
                while True:
                    self._grew.clear()
                    for record in self.records():
                        if matches(record):
                            return record
                    await self._grew.wait()
        except TimeoutError:
            tail = "\n".join(line for _name, line in self.lines[-20:])
            raise AssertionError(f"no log line for {what}; last lines:\n{tail}") from None


@contextlib.asynccontextmanager
async def stripe_api_answering_404() -> AsyncIterator[str]:
    """A local stand-in for the Stripe API: every request gets Stripe's 404 error shape."""

    async def not_found(_request: web.Request) -> web.Response:
        return web.json_response(NOT_FOUND, status=404, headers={"Request-Id": "req_every_line"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", not_found)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def broker_proxy(amqp_url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A TCP proxy to the shared broker; yields it and the AMQP URL that goes through it."""
    target = urlsplit(amqp_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672)
    await proxy.start()
    try:
        yield proxy, target._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}").geturl()
    finally:
        await proxy.close()


async def over_long_header(port: int) -> bytes:
    """A request aiohttp's parser refuses (a header line over 8190 bytes); returns the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        header = "X-Note: jenny.rosen@example.com " + "a" * 9000
        writer.write(f"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def refund_to_fetch() -> dict[str, Any]:
    """A charge.refunded as API 2024-06-20 sends it (no refund list): the worker asks the API."""
    charge = b.charge(amount=5000, currency="eur", amount_refunded=1200)
    return b.charge_event("charge.refunded", charge, api_version=b.NEW_API_VERSION)


async def ready(http: aiohttp.ClientSession, base_url: str, process: asyncio.subprocess.Process) -> bool:
    if process.returncode is not None:
        raise AssertionError(f"recon run exited early with {process.returncode}")
    with contextlib.suppress(aiohttp.ClientError):
        async with http.get(f"{base_url}/readyz") as response:
            return response.status == 200
    return False


def _from(library: str) -> Callable[[dict[str, Any]], bool]:
    return lambda record: str(record.get("logger", "")).split(".")[0] == library


async def test_every_line_of_recon_run_is_one_json_object_without_secrets(
    database_url: str, amqp_url: str, tmp_path: Path
) -> None:
    """With LOG_FORMAT=json every line on stdout and stderr — the project's own, aiohttp's for a
    malformed request, stripe's for a 404, aio-pika's and aiormq's for a lost broker — parses as
    one JSON object with level, logger, event and timestamp; no whsec_/sk_test_ secret and no
    e-mail address appears, though the bad request and the API's answer carried both; the
    libraries' routine lines are at debug; and the process still stops cleanly on SIGTERM."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    async with (
        stripe_api_answering_404() as api_base,
        broker_proxy(amqp_url) as (proxy, proxied_amqp_url),
        aiohttp.ClientSession() as http,
    ):
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "RECON_", "SMTP_"))},
            "DATABASE_URL": database_url,
            "AMQP_URL": proxied_amqp_url,
            "STRIPE_WEBHOOK_SECRETS": TEST_SECRET,
            "STRIPE_API_KEY": API_KEY,
            "STRIPE_API_BASE": api_base,
            "RECON_HTTP_PORT": str(port),
            "RECON_RETRY_DELAYS_S": "60",  # one fetch is enough: the retry stays queued
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "debug",
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker.cli",
            "run",
            cwd=tmp_path,  # no .env of the repository's
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 20,
        )
        assert process.stdout is not None and process.stderr is not None
        output = Output()
        pumps = [
            asyncio.create_task(output.pump(process.stdout, "stdout")),
            asyncio.create_task(output.pump(process.stderr, "stderr")),
        ]
        try:
            await wait_until(lambda: ready(http, base_url, process), timeout_s=30, what="readiness")

            answer = await over_long_header(port)
            assert answer.split(b" ", 2)[1] == b"400", answer[:200]
            await output.wait_for(_from("aiohttp"), "aiohttp's malformed request")

            status, _ = await post_event(http, base_url, refund_to_fetch())
            assert status == 200
            await output.wait_for(_from("stripe"), "the stripe client's request")
            await output.wait_for(lambda r: r.get("event") == "refund_fetch_failed", "the 404")

            await proxy.cut()
            await output.wait_for(
                lambda r: (_from("aio_pika")(r) or _from("aiormq")(r)) and r["level"] != "debug",
                "the lost broker, above debug",
            )
            await proxy.restore()  # the stop below then closes a connection, not a retry loop
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(45):
                    returncode = await process.wait()
            except TimeoutError:
                process.kill()
                returncode = await process.wait()
            await asyncio.gather(*pumps)

    assert returncode == 0
    assert output.lines
    for name, line in output.lines:
        record = json.loads(line)  # fails on any line that is not JSON
        assert isinstance(record, dict), (name, line)
        assert {"level", "logger", "event", "timestamp"} <= set(record), (name, line)
        assert record["level"] in ("debug", "info", "warning", "error", "critical"), (name, line)
        assert not SECRET.search(line) and not EMAIL.search(line), (name, line)
        assert TEST_SECRET not in line and API_KEY not in line, (name, line)
    records = output.records()
    assert {"aiohttp", "stripe", "worker"} <= {str(r["logger"]).split(".")[0] for r in records}
    assert {r["level"] for r in records if _from("stripe")(r)} == {"debug"}
    [malformed] = [r for r in records if r["logger"] == "aiohttp.server" and "exception" in r]
    assert malformed["level"] == "debug" and "LineTooLong" in malformed["exception"]
