"""The Stripe API for the back-office tests: localstripe, with a thin front for what it does not do.

localstripe (PyPI) creates and lists real charges and refunds with their metadata. It does not
honour ``Idempotency-Key``, refuses Stripe's ``reason`` parameter, and lets a charge be refunded
past its amount. ``StripeFront`` sits between our client and localstripe and does those three as
Stripe does: the same key returns the first answer (until ``forget_idempotency_keys``, which is
what Stripe does after 24 hours), ``reason`` is recorded and not forwarded, and a refund beyond
what is left of the charge gets Stripe's ``charge_already_refunded`` refusal. Everything else is
forwarded unchanged. It also counts the refunds created, and can refuse one charge with a given
error, or answer 500 for the next N calls.

localstripe runs once per module in a thread with a loop of its own, with its pickling to /tmp
switched off, as tests/test_refund_fetch.py runs it. Its aiohttp app is a module global bound to
the first loop that runs it, so each thread here serves a fresh app with the same routes and
middlewares (the store behind them is localstripe's one global store).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp
import stripe
from aiohttp import web

API_KEY = "sk_test_localstripe_backoffice"


@contextmanager
def localstripe_thread() -> Iterator[str]:
    """localstripe's API on a free port, served from a thread with its own event loop."""
    import localstripe.resources
    from localstripe.server import app as shared

    app = web.Application(middlewares=list(shared.middlewares))
    app.on_response_prepare.extend(shared.on_response_prepare)
    for route in shared.router.routes():
        app.router.add_route(route.method, route.resource.canonical, route.handler)  # type: ignore[union-attr]
    store = localstripe.resources.store
    saved_dump = store.dump_to_disk
    store.dump_to_disk = lambda: None  # type: ignore[method-assign]
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    started = threading.Event()
    address: list[str] = []

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host_port = runner.addresses[0]
        address.append(f"http://{host_port[0]}:{host_port[1]}")
        started.set()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=serve, name="localstripe", daemon=True)
    thread.start()
    assert started.wait(10), "localstripe did not start"
    try:
        yield address[0]
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        store.dump_to_disk = saved_dump  # type: ignore[method-assign]


@dataclass
class StripeFront:
    upstream: str
    created: list[dict[str, Any]] = field(default_factory=list)  # refunds localstripe created
    reasons: dict[str, str] = field(default_factory=dict)  # refund id -> the reason we sent
    create_calls: int = 0  # POST /v1/refunds received, replays included
    refusals: dict[str, tuple[str, str]] = field(default_factory=dict)  # charge -> (code, message)
    fail_next: int = 0  # answer 500 to this many calls
    _answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    _http: aiohttp.ClientSession | None = None

    def forget_idempotency_keys(self) -> None:
        """What Stripe does to a key 24 hours after its first use."""
        self._answers.clear()

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, bytes]:
        assert self._http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        url = f"{self.upstream}{request.path_qs}"
        async with self._http.request(request.method, url, data=body, headers=headers) as answer:
            return answer.status, await answer.read()

    async def _left_to_refund(self, request: web.Request, charge: str) -> int:
        assert self._http is not None
        auth = {"Authorization": request.headers["Authorization"]}
        async with self._http.get(f"{self.upstream}/v1/charges/{charge}", headers=auth) as answer:
            found = await answer.json()
        return int(found["amount"]) - int(found.get("amount_refunded") or 0)

    async def _create_refund(self, request: web.Request) -> tuple[int, bytes]:
        form = parse_qsl((await request.read()).decode(), keep_blank_values=True)
        fields = dict(form)
        charge = fields["charge"]
        if charge in self.refusals:
            code, message = self.refusals[charge]
            return 400, _error(code, message)
        if "amount" in fields and int(fields["amount"]) > await self._left_to_refund(request, charge):
            return 400, _error("charge_already_refunded", f"Charge {charge} has already been refunded.")
        status, body = await self._forward(
            request, urlencode([(k, v) for k, v in form if k != "reason"]).encode()
        )
        if status == 200:
            refund = json.loads(body)
            self.created.append(refund)
            if "reason" in fields:
                self.reasons[refund["id"]] = fields["reason"]
        return status, body

    async def handle(self, request: web.Request) -> web.Response:
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=500, body=_error("api_error", "front: made to fail"))
        if request.method == "POST" and request.path == "/v1/refunds":
            self.create_calls += 1
            key = request.headers.get("Idempotency-Key")
            if key and key in self._answers:
                status, body = self._answers[key]
            else:
                status, body = await self._create_refund(request)
                if key and status < 500:
                    self._answers[key] = (status, body)
        else:
            status, body = await self._forward(request, await request.read())
        return web.Response(status=status, body=body, content_type="application/json")

    def refunds_for(self, request_id: int) -> list[dict[str, Any]]:
        return [
            r
            for r in self.created
            if (r.get("metadata") or {}).get("recon_refund_request_id") == str(request_id)
        ]


def _error(code: str, message: str) -> bytes:
    return json.dumps({"error": {"type": "invalid_request_error", "code": code, "message": message}}).encode()


@asynccontextmanager
async def stripe_front(upstream: str) -> AsyncIterator[tuple[StripeFront, str]]:
    """The front on a free port of this test's loop; yields it and its base URL."""
    front = StripeFront(upstream)
    front._http = aiohttp.ClientSession()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", front.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield front, f"http://{host}:{port}"
    finally:
        await runner.cleanup()
        await front._http.close()


async def captured_charge(api_base: str, amount: int, currency: str) -> str:
    """A captured charge created through the API (localstripe behind the front)."""
    http = stripe.AIOHTTPClient()
    client = stripe.StripeClient(API_KEY, base_addresses={"api": api_base}, http_client=http)
    try:
        card = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}
        method = await client.v1.payment_methods.create_async(params={"type": "card", "card": card})
        charge = await client.v1.charges.create_async(
            params={"amount": amount, "currency": currency, "source": method.id}
        )
        return str(charge.id)
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]


async def refund_directly(api_base: str, charge_id: str, amount: int) -> dict[str, Any]:
    """A refund made outside the app (the Stripe dashboard), straight at localstripe."""
    http = stripe.AIOHTTPClient()
    client = stripe.StripeClient(API_KEY, base_addresses={"api": api_base}, http_client=http)
    try:
        refund = await client.v1.refunds.create_async(params={"charge": charge_id, "amount": amount})
        return refund.to_dict()
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
