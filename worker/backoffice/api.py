"""The back-office API (RECON_API_PORT): refunds the shop starts, and what its screens show.

    POST /v1/refunds                  Idempotency-Key required: 201 new, 200 the same again,
                                      409 the key with another body, 422 refused (nothing stored)
    GET  /v1/refunds/{id}
    POST /v1/orders/{number}/reject   201 with the request, 200 null when nothing was refundable
    GET  /v1/orders/{number}   GET /v1/invoices/{number}
    /console/…                        the ops console (console/pages.py): HTML, signed in with a token

Every route needs ``Authorization: Bearer <token>`` of RECON_API_TOKENS; the token's name is
who asked (``requested_by``). Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import structlog
from aiohttp import web

from worker.backoffice import store
from worker.backoffice.console.pages import CONSOLE_STATE, ConsoleState, console_app
from worker.backoffice.console.pages import PREFIX as CONSOLE_PREFIX
from worker.backoffice.owner_view import OwnerKind, owner_view
from worker.backoffice.service import Answer, BackOffice, fingerprint
from worker.backoffice.stripe_refunds import StripeRefundApi
from worker.backoffice.submit import AnsweredHook, RefundApi, Submitter, SubmitTimings
from worker.backoffice.tokens import token_name_of
from worker.settings import Settings

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 64 * 1024
DEFAULT_SUBMIT_TIMINGS = SubmitTimings()
_TEXT_MAX = 2000
_OWNER_FIELDS = {"order_number": "order", "invoice_number": "invoice", "charge": "charge"}
_REFUND_FIELDS = frozenset({*_OWNER_FIELDS, "amount", "reason", "note", "notify_buyer", "message"})


@dataclass(slots=True)
class ApiState:
    backoffice: BackOffice | None  # None: no STRIPE_API_KEY, refunds cannot be started
    pool: asyncpg.Pool


API_STATE = web.AppKey("recon_backoffice_api", ApiState)
CALLER = web.RequestKey("recon_caller", str)  # the name of the token that authenticated the request


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(type(value).__name__)


def json_answer(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body, default=_default), status=status, content_type="application/json"
    )


def error(status: int, code: str, detail: str | None = None, **extra: Any) -> web.Response:
    body: dict[str, Any] = {"error": code, **extra}
    if detail:
        body["detail"] = detail
    return json_answer(body, status)


def token_name(tokens: tuple[tuple[str, str], ...], header: str | None) -> str | None:
    """The name of the token in an ``Authorization: Bearer`` header, compared in constant time with
    every configured token (no early exit that would tell how many matched)."""
    if not header or not header.startswith("Bearer "):
        return None
    return token_name_of(tokens, header[len("Bearer ") :].strip())


def auth_middleware(tokens: tuple[tuple[str, str], ...]) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def authenticate(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        name = token_name(tokens, request.headers.get("Authorization"))
        if name is None:
            response = error(401, "unauthorized", "a valid Authorization: Bearer token is required")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        request[CALLER] = name
        return await handler(request)

    return authenticate


class BadBody(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        raise BadBody(400, "invalid_json", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadBody(400, "invalid_json", "the body must be a JSON object")
    return body


def _text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > _TEXT_MAX:
        raise BadBody(422, f"invalid_{name}", f"{name} must be a string of at most {_TEXT_MAX} characters")
    return value.strip() or None


def parse_refund_ask(body: dict[str, Any]) -> store.RefundAsk:
    """The body of POST /v1/refunds, checked; raises BadBody (422) naming the field."""
    unknown = sorted(set(body) - _REFUND_FIELDS)
    if unknown:
        raise BadBody(422, "unknown_field", f"unknown field(s): {', '.join(unknown)}")
    owners = [(field, body[field]) for field in _OWNER_FIELDS if body.get(field) is not None]
    if len(owners) != 1 or not isinstance(owners[0][1], str) or not owners[0][1].strip():
        raise BadBody(422, "invalid_owner", "give exactly one of order_number, invoice_number, charge")
    field, owner = owners[0]
    amount = body.get("amount")
    if amount is not None and (isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0):
        raise BadBody(422, "invalid_amount", "amount must be a positive whole number of minor units")
    reason = body.get("reason")
    if reason not in store.REASONS:
        raise BadBody(422, "invalid_reason", f"reason must be one of {', '.join(store.REASONS)}")
    note = _text(body, "note")
    if reason == "other" and note is None:
        raise BadBody(422, "note_required", "reason 'other' needs a note")
    notify = body.get("notify_buyer", True)
    if not isinstance(notify, bool):
        raise BadBody(422, "invalid_notify_buyer", "notify_buyer must be true or false")
    return store.RefundAsk(
        owner_kind=_OWNER_FIELDS[field],  # type: ignore[arg-type]
        owner=owner.strip(),
        amount=amount,
        reason=str(reason),
        note=note,
        notify_buyer=notify,
        message=_text(body, "message"),
    )


def _answer(answer: Answer) -> web.Response:
    if answer.request is None:
        return json_answer(None, 200)
    return json_answer(answer.request, 201 if answer.created else 200)


async def _refused_or(call: Callable[[], Awaitable[Answer]]) -> web.Response:
    try:
        return _answer(await call())
    except store.RefundRefused as refused:
        return error(422, refused.error, refused.detail, **refused.extra)
    except store.IdempotencyKeyReused:
        return error(409, "idempotency_key_reused", "this Idempotency-Key was used with another body")


def _backoffice(request: web.Request) -> BackOffice:
    backoffice = request.app[API_STATE].backoffice
    if backoffice is None:
        raise BadBody(503, "stripe_not_configured", "STRIPE_API_KEY is not set: refunds cannot be started")
    return backoffice


async def post_refund(request: web.Request) -> web.Response:
    key = request.headers.get("Idempotency-Key", "").strip()
    if not key or len(key) > 255:
        raise BadBody(
            400, "idempotency_key_required", "the Idempotency-Key header (1-255 characters) is required"
        )
    body = await _json_object(request)
    ask = parse_refund_ask(body)
    backoffice = _backoffice(request)
    return await _refused_or(
        lambda: backoffice.request_refund(
            ask, requested_by=request[CALLER], idempotency_key=key, body_fingerprint=fingerprint(body)
        )
    )


async def post_reject(request: web.Request) -> web.Response:
    body = await _json_object(request)
    unknown = sorted(set(body) - {"note"})
    if unknown:
        raise BadBody(422, "unknown_field", f"unknown field(s): {', '.join(unknown)}")
    note = _text(body, "note")
    if note is None:
        raise BadBody(422, "note_required", "rejecting an order needs a note")
    key = request.headers.get("Idempotency-Key", "").strip() or None
    backoffice = _backoffice(request)
    number = request.match_info["number"]
    return await _refused_or(
        lambda: backoffice.reject_order(
            number,
            note,
            requested_by=request[CALLER],
            idempotency_key=key,
            body_fingerprint=fingerprint(body),
        )
    )


async def get_refund(request: web.Request) -> web.Response:
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 18:
        return error(404, "not_found", "no such refund request")
    async with request.app[API_STATE].pool.acquire() as con:
        found = await store.read_request(con, int(raw))
    return json_answer(found) if found is not None else error(404, "not_found", "no such refund request")


def _get_owner(kind: OwnerKind) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def get_owner(request: web.Request) -> web.Response:
        async with request.app[API_STATE].pool.acquire() as con:
            view = await owner_view(con, kind, request.match_info["number"])
        return json_answer(view) if view is not None else error(404, "not_found", f"no such {kind}")

    return get_owner


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every answer is JSON: our refusals, and aiohttp's own 404/405/413 (the console answers HTML)."""
    if request.path == CONSOLE_PREFIX or request.path.startswith(CONSOLE_PREFIX + "/"):
        return await handler(request)
    try:
        return await handler(request)
    except BadBody as bad:
        return error(bad.status, bad.code, bad.detail)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)


def create_api_app(
    settings: Settings,
    *,
    stripe_api: RefundApi | None = None,
    submit_timings: SubmitTimings = DEFAULT_SUBMIT_TIMINGS,
    after_stripe_answered: AnsweredHook | None = None,
) -> web.Application:
    """The API as an aiohttp app (its pool and Stripe client in its cleanup context). ``stripe_api``
    defaults to the real client when STRIPE_API_KEY is set; ``after_stripe_answered`` is the
    fault-injection point tests stop the submission at."""
    app = web.Application(
        middlewares=[json_errors, auth_middleware(settings.api_tokens)], client_max_size=MAX_BODY_BYTES
    )

    async def resources(app: web.Application) -> AsyncIterator[None]:
        pool = await open_backoffice_pool(settings)
        owned: StripeRefundApi | None = None
        api = stripe_api
        if api is None and settings.stripe_api_key:
            api = owned = StripeRefundApi(settings.stripe_api_key, settings.stripe_api_base)
        submitter = Submitter(pool, api, submit_timings, after_stripe_answered) if api is not None else None
        backoffice = BackOffice(pool, submitter) if submitter is not None else None
        app[API_STATE] = ApiState(backoffice, pool)
        app[CONSOLE_STATE] = ConsoleState(settings, pool, backoffice)
        try:
            yield
        finally:
            if owned is not None:
                await owned.close()
            await pool.close()

    app.cleanup_ctx.append(resources)
    app.router.add_post("/v1/refunds", post_refund)
    app.router.add_get("/v1/refunds/{id}", get_refund)
    app.router.add_post("/v1/orders/{number}/reject", post_reject)
    app.router.add_get("/v1/orders/{number}", _get_owner("order"))
    app.router.add_get("/v1/invoices/{number}", _get_owner("invoice"))
    app.router.add_get(CONSOLE_PREFIX, _to_console)
    app.add_subapp(CONSOLE_PREFIX, console_app())
    return app


async def _to_console(_request: web.Request) -> web.Response:
    return web.Response(status=308, headers={"Location": CONSOLE_PREFIX + "/"})


async def open_backoffice_pool(settings: Settings, max_size: int = 4) -> asyncpg.Pool:
    """The back office's own connections: a slow operator screen never takes a lane's."""
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=1,
        max_size=max_size,
        command_timeout=30,
        server_settings=settings.database_session(),
    )
    if pool is None:  # only when told not to initialise, which we never do
        raise RuntimeError("asyncpg.create_pool returned no pool")
    return pool
