"""A local Stripe API for what localstripe lacks: payouts, balance transactions and disputes.

Served by aiohttp on a real port, in Stripe's shapes: objects as the API returns them, list
objects (``object: "list"``, ``data``, ``has_more``, ``url``) paged by ``limit`` and
``starting_after`` newest first, ``expand[]=data.source`` on balance transactions, and Stripe's
error bodies (``{"error": {"type", "code", "message", "param"}}``) for a missing object, a bad
key and a 429. Requests to anything else — charges and refunds — go to ``upstream`` (localstripe)
unchanged, so one ``STRIPE_API_BASE`` serves both. Charges and refunds the test puts here are
served from here instead (a test that needs a shape localstripe cannot make).

Every request is recorded with its time; ``rate_limit_next`` makes the next N requests a 429, and
``fail_next[path]`` the next N requests to that path Stripe's 500 ``api_error``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tests.stripe_events import fixture, unique_id

API_KEY = "sk_test_recon_ledger_api"
MAX_LIMIT = 100


@dataclass(frozen=True, slots=True)
class Seen:
    at: float  # time.monotonic()
    method: str
    path: str
    query: dict[str, str]
    status: int


def stripe_error(
    status: int, error_type: str, message: str, code: str | None = None, param: str | None = None
) -> web.Response:
    body = {
        "error": {
            "type": error_type,
            "message": message,
            "code": code,
            "param": param,
            "doc_url": f"https://stripe.com/docs/error-codes/{code}" if code else None,
        }
    }
    return web.json_response(body, status=status, headers={"Request-Id": unique_id("req")})


def list_object(url: str, items: list[dict[str, Any]], query: dict[str, str]) -> web.Response:
    """One page of ``items`` (already newest first) as Stripe pages them."""
    try:
        limit = int(query.get("limit", "10"))
    except ValueError:
        return stripe_error(
            400, "invalid_request_error", "Invalid integer: limit", "parameter_invalid_integer", "limit"
        )
    if not 1 <= limit <= MAX_LIMIT:
        return stripe_error(
            400,
            "invalid_request_error",
            "This value must be between 1 and 100.",
            "parameter_invalid_integer",
            "limit",
        )
    start = 0
    after = query.get("starting_after")
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            return stripe_error(
                400,
                "invalid_request_error",
                f"No such object: '{after}'",
                "resource_missing",
                "starting_after",
            )
        start = ids.index(after) + 1
    page = items[start : start + limit]
    return web.json_response(
        {"object": "list", "data": page, "has_more": start + limit < len(items), "url": url}
    )


def _expansions(query: dict[str, str]) -> set[str]:
    """``expand[]=x`` or ``expand[0]=x``: what the caller asked to expand."""
    return {value for key, value in query.items() if key == "expand[]" or key.startswith("expand[")}


@dataclass
class StripeLedgerApi:
    upstream: str | None = None
    payouts: dict[str, dict[str, Any]] = field(default_factory=dict)
    # payout id -> its balance transactions, newest first (the payout's own included, as Stripe lists it)
    payout_lines: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    disputes: dict[str, dict[str, Any]] = field(default_factory=dict)
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    rate_limit_next: int = 0
    fail_next: dict[str, int] = field(default_factory=dict)  # path -> how many more 500s
    seen: list[Seen] = field(default_factory=list)

    # What a test puts in -----------------------------------------------------------------------

    def add_payout(self, payout: dict[str, Any], transactions: list[dict[str, Any]]) -> None:
        self.payouts[payout["id"]] = payout
        self.payout_lines[payout["id"]] = transactions

    def requests_to(self, path_prefix: str) -> list[Seen]:
        return [s for s in self.seen if s.path.startswith(path_prefix)]

    # Routes ------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/v1/payouts", self._list_payouts)
        app.router.add_get("/v1/payouts/{id}", self._payout)
        app.router.add_get("/v1/balance_transactions", self._list_balance_transactions)
        app.router.add_get("/v1/disputes", self._list_disputes)
        app.router.add_get("/v1/disputes/{id}", self._dispute)
        app.router.add_get("/v1/charges/{id}", self._charge)
        app.router.add_get("/v1/refunds", self._list_refunds)
        app.router.add_route("*", "/{tail:.*}", self._proxy)
        return app

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            response: web.StreamResponse = stripe_error(
                401, "invalid_request_error", "Invalid API Key provided: sk_test_****", "api_key_invalid"
            )
        elif self.rate_limit_next > 0:
            self.rate_limit_next -= 1
            response = stripe_error(
                429,
                "invalid_request_error",
                "Too many requests in a short time; back off and retry.",
                "rate_limit",
            )
        elif self.fail_next.get(request.path, 0) > 0:
            self.fail_next[request.path] -= 1
            response = stripe_error(500, "api_error", "An unknown error occurred")
        else:
            response = await handler(request)
        self.seen.append(
            Seen(time.monotonic(), request.method, request.path, dict(request.query), response.status)
        )
        return response

    async def _payout(self, request: web.Request) -> web.Response:
        payout = self.payouts.get(request.match_info["id"])
        if payout is None:
            return stripe_error(
                404,
                "invalid_request_error",
                f"No such payout: '{request.match_info['id']}'",
                "resource_missing",
                "id",
            )
        return web.json_response(payout)

    async def _list_payouts(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        gte = query.get("arrival_date[gte]")
        items = [
            p
            for p in sorted(self.payouts.values(), key=lambda p: (p["created"], p["id"]), reverse=True)
            if (query.get("status") is None or p["status"] == query["status"])
            and (gte is None or p["arrival_date"] >= int(gte))
        ]
        return list_object("/v1/payouts", items, query)

    async def _list_balance_transactions(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        payout_id = query.get("payout")
        if payout_id is not None and payout_id not in self.payouts:
            return stripe_error(
                404, "invalid_request_error", f"No such payout: '{payout_id}'", "resource_missing", "payout"
            )
        items = self.payout_lines.get(payout_id or "", [])
        if "data.source" in _expansions(query):
            items = [self._expanded(txn) for txn in items]
        return list_object("/v1/balance_transactions", items, query)

    def _expanded(self, txn: dict[str, Any]) -> dict[str, Any]:
        source_id = txn.get("source")
        known = {**self.charges, **self.refunds, **self.disputes, **self.payouts}
        if not isinstance(source_id, str) or source_id not in known:
            return txn
        return dict(txn, source=copy.deepcopy(known[source_id]))

    async def _list_disputes(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        charge = query.get("charge")
        items = [
            d
            for d in sorted(self.disputes.values(), key=lambda d: (d["created"], d["id"]), reverse=True)
            if charge is None or d["charge"] == charge
        ]
        return list_object("/v1/disputes", items, query)

    async def _dispute(self, request: web.Request) -> web.Response:
        dispute = self.disputes.get(request.match_info["id"])
        if dispute is None:
            return stripe_error(
                404,
                "invalid_request_error",
                f"No such dispute: '{request.match_info['id']}'",
                "resource_missing",
                "dispute",
            )
        return web.json_response(dispute)

    async def _charge(self, request: web.Request) -> web.StreamResponse:
        charge = self.charges.get(request.match_info["id"])
        if charge is None:
            return await self._proxy(request)
        return web.json_response(charge)

    async def _list_refunds(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        mine = [r for r in self.refunds.values() if r["charge"] == query.get("charge")]
        if not mine and self.upstream is not None:
            return await self._proxy(request)
        mine.sort(key=lambda r: (r["created"], r["id"]), reverse=True)
        return list_object("/v1/refunds", mine, query)

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        if self.upstream is None:
            return stripe_error(
                404, "invalid_request_error", f"Unrecognized request URL (GET: {request.path})"
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                request.method, self.upstream + request.path_qs, data=await request.read(), headers=headers
            ) as answer,
        ):
            body = await answer.read()
            return web.Response(body=body, status=answer.status, content_type="application/json")


@asynccontextmanager
async def serving(api: StripeLedgerApi) -> AsyncIterator[str]:
    """``api`` on a free port of 127.0.0.1; yields its base URL."""
    runner = web.AppRunner(api.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


# Stripe objects ----------------------------------------------------------------------------------


def payout(
    *,
    payout_id: str,
    amount: int,
    currency: str = "usd",
    status: str = "paid",
    reconciliation_status: str = "completed",
    arrival_date: int,
    created: int,
    automatic: bool = True,
) -> dict[str, Any]:
    """A payout object in the API's shape (no payout fixture in tests/fixtures: built field by field)."""
    return {
        "id": payout_id,
        "object": "payout",
        "amount": amount,
        "application_fee": None,
        "application_fee_amount": None,
        "arrival_date": arrival_date,
        "automatic": automatic,
        "balance_transaction": f"txn_{payout_id}",
        "created": created,
        "currency": currency,
        "description": "STRIPE PAYOUT",
        "destination": "ba_recon_test",
        "failure_balance_transaction": None,
        "failure_code": None,
        "failure_message": None,
        "livemode": False,
        "metadata": {},
        "method": "standard",
        "original_payout": None,
        "reconciliation_status": reconciliation_status,
        "reversed_by": None,
        "source_type": "card",
        "statement_descriptor": None,
        "status": status,
        "type": "bank_account",
    }


def line(
    *,
    txn_type: str,
    amount: int,
    source: str | None,
    fee: int = 0,
    currency: str = "usd",
    reporting_category: str | None = None,
    exchange_rate: float | None = None,
    txn_id: str | None = None,
    created: int,
) -> dict[str, Any]:
    """A balance transaction from Stripe's fixture, with the fields a payout line sets."""
    obj = fixture("balance_transaction")
    obj.update(
        id=txn_id or unique_id("txn"),
        type=txn_type,
        amount=amount,
        fee=fee,
        net=amount - fee,
        currency=currency,
        fee_details=[
            {
                "amount": fee,
                "application": None,
                "currency": currency,
                "description": "Stripe processing fees",
                "type": "stripe_fee",
            }
        ]
        if fee
        else [],
        reporting_category=reporting_category or txn_type,
        source=source,
        exchange_rate=exchange_rate,
        status="available",
        created=created,
        available_on=created + 2 * 86400,
    )
    return obj


def payout_own_line(payout_obj: dict[str, Any]) -> dict[str, Any]:
    """The payout's own transaction, which Stripe lists among the payout's balance transactions."""
    return line(
        txn_type="payout",
        amount=-payout_obj["amount"],
        source=payout_obj["id"],
        currency=payout_obj["currency"],
        txn_id=payout_obj["balance_transaction"],
        created=payout_obj["created"],
    )
