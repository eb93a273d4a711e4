"""The host application's webhook endpoint, in the test's loop: records every POST, and can fail first."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


def verify_recon_signature(body: bytes, header: str, secret: str) -> bool:
    """What docs/backoffice.md tells a host to do: HMAC-SHA256 over "<t>.<body>", constant-time compare."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    expected = hmac.new(secret.encode(), fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields.get("v1", ""))


@dataclass
class HostSink:
    fail_first: int = 0  # answer 503 to this many POSTs before accepting
    # Every POST: (JSON body, raw body, Recon-Signature header, the status we answered).
    attempts: list[tuple[dict[str, Any], bytes, str, int]] = field(default_factory=list)

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = 200
        if self.fail_first > 0:
            self.fail_first -= 1
            status = 503
        self.attempts.append((json.loads(body), body, request.headers.get("Recon-Signature", ""), status))
        return web.json_response({"ok": status == 200}, status=status)

    def accepted(self) -> list[dict[str, Any]]:
        """Bodies of the POSTs answered 2xx."""
        return [body for body, _raw, _sig, status in self.attempts if status == 200]


@asynccontextmanager
async def host_sink(port: int, fail_first: int = 0) -> AsyncIterator[HostSink]:
    sink = HostSink(fail_first=fail_first)
    app = web.Application()
    app.router.add_post("/recon-webhooks", sink.receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield sink
    finally:
        await runner.cleanup()
