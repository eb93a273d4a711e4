"""The console's routes, mounted by ``api.create_api_app`` under ``/console``.

Every page but the login needs a session (else 303 to the login); every POST needs the form's CSRF
token (else 403, nothing done). Actions answer with a redirect to the page that shows their result
(POST/redirect/GET), or re-render the page with the refusal in words.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from typing import Any
from urllib.parse import quote

import asyncpg
import structlog
from aiohttp import web

from worker.backoffice import store
from worker.backoffice.console import reads, render, session
from worker.backoffice.owner_view import OwnerKind, owner_view
from worker.backoffice.service import BackOffice, fingerprint
from worker.backoffice.tokens import token_name_of
from worker.settings import Settings
from worker.workbench import dead_letters as dead_letter_work
from worker.workbench import exceptions as exception_work

log = structlog.get_logger(__name__)

PREFIX = "/console"
_STYLESHEET = resources.files("worker.backoffice.console").joinpath("static/console.css").read_bytes()
# The routes (by name) open without a session. By the route matched, not the decoded path, which
# "/console/static%2Fconsole.css" would make equal to the stylesheet's.
_OPEN_ROUTES = frozenset({"login", "stylesheet"})
_TEXT_MAX = 2000
_SECURITY_HEADERS = {
    # No script, no outside origin: the console works offline and an injected tag does nothing.
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(slots=True)
class ConsoleState:
    settings: Settings
    pool: asyncpg.Pool
    backoffice: BackOffice | None  # None: no STRIPE_API_KEY, refunds cannot be started
    clock: Callable[[], float] = time.time


CONSOLE_STATE = web.AppKey("recon_console", ConsoleState)
SESSION = web.RequestKey("recon_console_session", session.Session)


def _state(request: web.Request) -> ConsoleState:
    return request.config_dict[CONSOLE_STATE]


async def _html(
    request: web.Request, template: str, context: dict[str, Any], *, status: int = 200
) -> web.Response:
    async with _state(request).pool.acquire() as con:
        exponents = await reads.exponents(con, render.currencies_in(context))
    active = request.get(SESSION)
    body = render.page(
        template,
        {
            "operator": active.operator if active else None,
            "csrf": active.csrf if active else "",
            "path": request.path,
            **context,
        },
        exponents,
    )
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _to_login(request: web.Request) -> web.Response:
    target = request.path_qs if request.method == "GET" else PREFIX + "/"
    return _see_other(f"{PREFIX}/login?next={quote(target, safe='/')}")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A session for every page but the login; the CSRF token for every POST; safe headers always."""
    response = await _guarded(request, handler)
    response.headers.update(_SECURITY_HEADERS)
    return response


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.match_info.route.name in _OPEN_ROUTES:
        return await handler(request)
    state = _state(request)
    cookie = request.cookies.get(session.SESSION_COOKIE)
    active = session.read(state.settings.api_tokens, cookie, state.clock())
    if active is not None:
        async with state.pool.acquire() as con:
            if await session.signed_out(con, active):
                active = None
    if active is None:
        return _to_login(request)
    request[SESSION] = active
    if request.method == "POST":
        form = await request.post()
        given = form.get("csrf")
        if not session.same_token(active.csrf, given if isinstance(given, str) else None):
            log.warning("console_csrf_refused", path=request.path, operator=active.operator)
            return await _html(request, "refused.html.j2", {}, status=403)
    return await handler(request)


def _field(form: Any, name: str) -> str:
    value = form.get(name)
    return value.strip()[:_TEXT_MAX] if isinstance(value, str) else ""


def _safe_next(target: str) -> str:
    # Only a console path: the login never sends anyone to another site.
    if target.startswith(PREFIX + "/") and not target.startswith("//") and "\\" not in target:
        return target
    return PREFIX + "/"


async def login_page(request: web.Request) -> web.StreamResponse:
    if request.method == "POST":
        return await _login(request)
    return await _login_form(request, request.query.get("next", ""), error=None)


async def _login_form(
    request: web.Request, next_target: str, error: str | None, status: int = 200
) -> web.Response:
    csrf = session.new_login_csrf()
    response = await _html(
        request,
        "login.html.j2",
        {"login_csrf": csrf, "error": error, "next": _safe_next(next_target)},
        status=status,
    )
    response.set_cookie(
        session.LOGIN_COOKIE, csrf, path=PREFIX, httponly=True, samesite="Strict", max_age=3600
    )
    return response


async def _login(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    form = await request.post()
    given, next_field = form.get("csrf"), form.get("next")
    next_target = next_field if isinstance(next_field, str) else ""
    if not session.same_token(
        request.cookies.get(session.LOGIN_COOKIE), given if isinstance(given, str) else None
    ):
        return await _login_form(request, next_target, "The sign-in form expired. Please try again.", 403)
    token = form.get("token")
    name = token_name_of(state.settings.api_tokens, token.strip() if isinstance(token, str) else "")
    if name is None:
        log.info("console_sign_in_refused")
        return await _login_form(request, next_target, "That token is not valid.", 401)
    lifetime_s = state.settings.console_session_s
    cookie = session.issue(state.settings.api_tokens, name, int(state.clock()) + lifetime_s)
    log.info("console_signed_in", operator=name)
    response = _see_other(_safe_next(next_target))
    response.set_cookie(
        session.SESSION_COOKIE,
        cookie,
        path=PREFIX,
        httponly=True,
        samesite="Strict",
        max_age=lifetime_s,
        secure=request.secure,
    )
    response.del_cookie(session.LOGIN_COOKIE, path=PREFIX)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    # Recorded, not only deleted from this browser: a copy of the cookie ends with it.
    async with _state(request).pool.acquire() as con:
        await session.sign_out(con, request[SESSION])
    response = _see_other(f"{PREFIX}/login")
    response.del_cookie(session.SESSION_COOKIE, path=PREFIX)
    return response


async def stylesheet(_request: web.Request) -> web.Response:
    return web.Response(
        body=_STYLESHEET, content_type="text/css", headers={"Cache-Control": "public, max-age=3600"}
    )


async def overview(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    async with state.pool.acquire() as con:
        facts = await reads.overview(con)
    depths = await reads.queue_depths(state.settings)
    return await _html(request, "overview.html.j2", {**facts, "queues": depths})


async def search(request: web.Request) -> web.StreamResponse:
    query = request.query.get("q", "")[:200]
    async with _state(request).pool.acquire() as con:
        found = await reads.search(con, query)
    if len(found) == 1:
        kind, number = found[0]
        return _see_other(render.owner_url(kind, number))
    return await _html(request, "search.html.j2", {"query": query, "found": found})


def _dashboard_base(settings: Settings) -> str:
    test_mode = (settings.stripe_api_key or "").startswith(("sk_test_", "rk_test_"))
    return "https://dashboard.stripe.com/test/" if test_mode else "https://dashboard.stripe.com/"


def _owner_page(kind: OwnerKind) -> Handler:
    async def show(request: web.Request) -> web.StreamResponse:
        return await _render_owner(request, kind, request.match_info["number"])

    return show


async def _render_owner(
    request: web.Request,
    kind: OwnerKind,
    number: str,
    *,
    error: str | None = None,
    form: dict[str, str] | None = None,
    status: int = 200,
) -> web.Response:
    state = _state(request)
    async with state.pool.acquire() as con:
        view = await owner_view(con, kind, number)
        shown = request.query.get("request", "")
        just_made = await store.read_request(con, int(shown)) if shown.isdigit() and len(shown) < 18 else None
    if view is None:
        return await _html(request, "not_found.html.j2", {"what": f"{kind} {number}"}, status=404)
    if just_made is not None and just_made.get(f"{kind}_number") != number:
        just_made = None
    open_disputes = [d for d in view["disputes"] if d["closed_at"] is None]
    context = {
        "kind": kind,
        "view": view,
        "open_disputes": open_disputes,
        "dashboard": _dashboard_base(state.settings),
        "error": error,
        "form": form or {"reason": "requested_by_customer", "notify_buyer": "on"},
        "reasons": store.REASONS,
        "idempotency_key": secrets.token_urlsafe(18),
        "just_made": just_made,
        "can_refund": state.backoffice is not None,
    }
    return await _html(request, "owner.html.j2", context, status=status)


class FormRefused(Exception):
    """A form the console cannot take, said in words."""


async def _minor_units(request: web.Request, text: str, currency: str) -> int | None:
    """The Amount field (major units, as a buyer reads it) in minor units; empty is everything."""
    if not text:
        return None
    async with _state(request).pool.acquire() as con:
        exponent = (await reads.exponents(con, {currency})).get(currency, 2)
    try:
        major = Decimal(text.replace(",", "").lstrip("$€£¥₹₩"))
    except InvalidOperation:
        raise FormRefused(f"The amount {text!r} is not a number.") from None
    minor = major.scaleb(exponent)
    if not major.is_finite() or minor <= 0 or minor != minor.to_integral_value():
        raise FormRefused(f"The amount must be positive, with at most {exponent} decimals.")
    return int(minor)


def _refused_words(refused: store.RefundRefused, money: Callable[[int | None, str | None], str]) -> str:
    if isinstance(refused, store.ExceedsRefundable):
        currency = str(refused.extra.get("currency", ""))
        cap = money(refused.refundable, currency)
        return f"Over the cap: at most {cap} is refundable now. Nothing was sent."
    return f"Refused: {refused.detail}."


def _refund_post(kind: OwnerKind) -> Handler:
    # The kind is the route's, never read back from the path: a number is the shop's own text and
    # may itself contain "/invoices/".
    async def post(request: web.Request) -> web.StreamResponse:
        return await _post_refund(request, kind, request.match_info["number"])

    return post


async def _post_refund(request: web.Request, kind: OwnerKind, number: str) -> web.StreamResponse:
    form = await request.post()
    fields = {name: _field(form, name) for name in ("amount", "reason", "note", "message", "key")}
    fields["notify_buyer"] = "on" if form.get("notify_buyer") else ""
    backoffice = _state(request).backoffice
    try:
        if backoffice is None:
            raise FormRefused("Refunds cannot be started: STRIPE_API_KEY is not set.")
        if fields["reason"] not in store.REASONS:
            raise FormRefused("Choose a reason.")
        if fields["reason"] == "other" and not fields["note"]:
            raise FormRefused("A refund with reason Other needs a note that says why.")
        async with _state(request).pool.acquire() as con:
            view = await owner_view(con, kind, number)
        if view is None:
            raise FormRefused(f"No {kind} {number}.")
        amount = await _minor_units(request, fields["amount"], view["currency"])
        ask = store.RefundAsk(
            kind,
            number,
            amount,
            fields["reason"],
            fields["note"] or None,
            bool(fields["notify_buyer"]),
            fields["message"] or None,
        )
        body = {
            f"{kind}_number": number,
            "amount": amount,
            "reason": ask.reason,
            "note": ask.note,
            "notify_buyer": ask.notify_buyer,
            "message": ask.message,
        }
        answer = await backoffice.request_refund(
            ask,
            requested_by=request[SESSION].operator,
            idempotency_key=fields["key"] or secrets.token_urlsafe(18),
            body_fingerprint=fingerprint(body),
        )
    except FormRefused as refused:
        return await _render_owner(request, kind, number, error=str(refused), form=fields, status=422)
    except store.RefundRefused as refused:
        return await _refusal(request, kind, number, refused, fields)
    except store.IdempotencyKeyReused:
        message = "This form was already sent with other values. Reload the page and try again."
        return await _render_owner(request, kind, number, error=message, form=fields, status=409)
    made = answer.request["id"] if answer.request else ""
    return _see_other(f"{render.owner_url(kind, number)}?request={made}#refunds")


async def _refusal(
    request: web.Request, kind: OwnerKind, number: str, refused: store.RefundRefused, fields: dict[str, str]
) -> web.Response:
    currency = str(refused.extra.get("currency", "usd"))
    async with _state(request).pool.acquire() as con:
        money = render.money_formatter(await reads.exponents(con, {currency}))
    words = _refused_words(refused, money)
    return await _render_owner(request, kind, number, error=words, form=fields, status=422)


async def post_reject(request: web.Request) -> web.StreamResponse:
    number = request.match_info["number"]
    form = await request.post()
    note, key = _field(form, "note"), _field(form, "key")
    backoffice = _state(request).backoffice
    if backoffice is None:
        message = "Orders cannot be rejected: STRIPE_API_KEY is not set."
        return await _render_owner(request, "order", number, error=message, status=422)
    if not note:
        message = "Rejecting an order needs a note that says why."
        return await _render_owner(request, "order", number, error=message, status=422)
    try:
        answer = await backoffice.reject_order(
            number,
            note,
            requested_by=request[SESSION].operator,
            idempotency_key=key or None,
            body_fingerprint=fingerprint({"note": note}),
        )
    except store.RefundRefused as refused:
        return await _refusal(request, "order", number, refused, {})
    except store.IdempotencyKeyReused:
        message = "This form was already sent with other values. Reload the page and try again."
        return await _render_owner(request, "order", number, error=message, status=409)
    made = answer.request["id"] if answer.request else ""
    return _see_other(f"{render.owner_url('order', number)}?request={made}#refunds")


async def exceptions_page(request: web.Request) -> web.StreamResponse:
    return await _render_exceptions(request)


async def _render_exceptions(
    request: web.Request, *, error: str | None = None, status: int = 200
) -> web.Response:
    show_resolved = request.query.get("resolved") == "1"
    async with _state(request).pool.acquire() as con:
        rows = await exception_work.list_exceptions(
            con, open_only=not show_resolved, kind=None, limit=reads.LIST_LIMIT
        )
    items = [exception_work.as_dict(r) | {"raised": r["raised_at"], "closed": r["resolved_at"]} for r in rows]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for item in sorted(items, key=lambda e: e["kind"]):
        by_kind.setdefault(item["kind"], []).append(item)
    context = {
        "by_kind": by_kind,
        "show_resolved": show_resolved,
        "retryable": exception_work.RETRYABLE,
        "error": error,
        "done": request.query.get("done", ""),
        "done_id": request.query.get("id", ""),
    }
    return await _html(request, "exceptions.html.j2", context, status=status)


def _exception_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 18:
        raise web.HTTPNotFound()
    return int(raw)


async def post_resolve(request: web.Request) -> web.StreamResponse:
    exception_id = _exception_id(request)
    note = _field(await request.post(), "note")
    try:
        async with _state(request).pool.acquire() as con:
            await exception_work.resolve(con, [exception_id], note=note, by=request[SESSION].operator)
    except exception_work.NoteRequired:
        return await _render_exceptions(
            request, error=f"Exception {exception_id}: a note must say why it is resolved.", status=422
        )
    except exception_work.UnknownExceptions as unknown:
        return await _render_exceptions(request, error=f"{unknown}.", status=404)
    return _see_other(f"{PREFIX}/exceptions?done=resolved&id={exception_id}")


async def post_retry(request: web.Request) -> web.StreamResponse:
    exception_id = _exception_id(request)
    state = _state(request)
    try:
        async with state.pool.acquire() as con:
            outcome = await exception_work.retry(con, state.settings, [exception_id])
    except exception_work.RetryRefused as refused:
        return await _render_exceptions(request, error=f"Not retried: {refused}.", status=422)
    if outcome.refused:
        message = f"Not retried: the broker did not take the event of exception {exception_id}."
        return await _render_exceptions(request, error=message, status=503)
    log.info("console_exception_retried", exception_id=exception_id, operator=request[SESSION].operator)
    return _see_other(f"{PREFIX}/exceptions?done=retried&id={exception_id}")


async def dead_letters_page(request: web.Request) -> web.StreamResponse:
    return await _render_dead_letters(request)


async def _render_dead_letters(
    request: web.Request, *, error: str | None = None, status: int = 200
) -> web.Response:
    async with _state(request).pool.acquire() as con:
        letters = await reads.dead_letters(con)
    context = {"letters": letters, "error": error, "replayed": request.query.get("replayed", "")}
    return await _html(request, "dead_letters.html.j2", context, status=status)


async def post_replay(request: web.Request) -> web.StreamResponse:
    event_id = request.match_info["event_id"]
    state = _state(request)
    try:
        async with state.pool.acquire() as con:
            outcome = await dead_letter_work.replay(con, state.settings, [event_id], replay_all=False)
    except dead_letter_work.NotDeadLettered as unknown:
        return await _render_dead_letters(request, error=f"{unknown}.", status=404)
    if event_id not in outcome.confirmed:
        message = f"Not replayed: the broker did not confirm {event_id}; it stays here."
        return await _render_dead_letters(request, error=message, status=503)
    log.info("console_dead_letter_replayed", event_id=event_id, operator=request[SESSION].operator)
    return _see_other(f"{PREFIX}/dead-letters?replayed={quote(event_id, safe='')}")


async def payouts_page(request: web.Request) -> web.StreamResponse:
    async with _state(request).pool.acquire() as con:
        rows = await reads.payouts(con)
    return await _html(request, "payouts.html.j2", {"payouts": rows})


async def payout_page(request: web.Request) -> web.StreamResponse:
    payout_id = request.match_info["id"]
    async with _state(request).pool.acquire() as con:
        found = await reads.payout(con, payout_id)
    if found is None:
        return await _html(request, "not_found.html.j2", {"what": f"payout {payout_id}"}, status=404)
    return await _html(request, "payout.html.j2", {"payout": found})


async def not_found(request: web.Request) -> web.StreamResponse:
    return await _html(request, "not_found.html.j2", {"what": "page"}, status=404)


def console_app() -> web.Application:
    """The console as a sub-application; its state (CONSOLE_STATE) is set on the parent app."""
    app = web.Application(middlewares=[guard])
    app.router.add_route("*", "/login", login_page, name="login")
    app.router.add_post("/logout", logout)
    app.router.add_get("/static/console.css", stylesheet, name="stylesheet")
    app.router.add_get("/", overview)
    app.router.add_get("/search", search)
    app.router.add_get("/orders/{number}", _owner_page("order"))
    app.router.add_post("/orders/{number}/refund", _refund_post("order"))
    app.router.add_post("/orders/{number}/reject", post_reject)
    app.router.add_get("/invoices/{number}", _owner_page("invoice"))
    app.router.add_post("/invoices/{number}/refund", _refund_post("invoice"))
    app.router.add_get("/exceptions", exceptions_page)
    app.router.add_post("/exceptions/{id}/resolve", post_resolve)
    app.router.add_post("/exceptions/{id}/retry", post_retry)
    app.router.add_get("/dead-letters", dead_letters_page)
    app.router.add_post("/dead-letters/{event_id}/replay", post_replay)
    app.router.add_get("/payouts", payouts_page)
    app.router.add_get("/payouts/{id}", payout_page)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
