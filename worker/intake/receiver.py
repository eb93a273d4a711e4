"""The webhook receiver: POST /webhooks/stripe → verified → durably queued → 200.

The route never opens the database and never calls Stripe: it checks the size, the signature
and the envelope (worker/intake/verify.py), publishes the exact raw bytes with a publisher
confirm (worker/intake/broker_link.py) and only then answers 200, so a 2xx always means "queued".
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import orjson
import structlog
from aiohttp import web

from worker import metrics
from worker.amqp.publisher import PublishFailed, event_message
from worker.events import HANDLED_TYPES
from worker.health import READINESS_CHECKS, add_health_routes
from worker.intake.broker_link import BrokerLink, BrokerUnavailable
from worker.intake.verify import AFTER_SIGNATURE, VerifiedEvent, WebhookRejected, verify_webhook
from worker.settings import Settings
from worker.shutdown import SHUTDOWN, add_shutdown_deadline

WEBHOOK_PATH = "/webhooks/stripe"
SIGNATURE_HEADER = "Stripe-Signature"
BODY_TOO_LARGE = "body_too_large"
BROKER_UNAVAILABLE = "broker_unavailable"
PUBLISH_NOT_CONFIRMED = "publish_not_confirmed"
# Label for requests whose type we cannot trust: an unverified body must not mint label values.
UNVERIFIED_TYPE = "unverified"

RECEIVER_SETTINGS = web.AppKey("receiver_settings", Settings)
BROKER_LINK = web.AppKey("broker_link", BrokerLink)

_RECEIVED = b'{"received":true}'
_IGNORED = b'{"received":true,"ignored":true}'

log = structlog.get_logger(__name__)


class BodyTooLarge(Exception):
    """The body is over RECON_MAX_BODY_BYTES: answer 413 without buffering the rest."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What one POST came to: the HTTP answer plus the fields of its log line and metrics."""

    status: int
    body: bytes
    outcome: str  # queued | ignored | rejected | unavailable
    reason: str | None = None
    event_id: str | None = None
    event_type: str | None = None


def _error(
    status: int,
    outcome: str,
    reason: str,
    detail: str,
    event_id: str | None = None,
    event_type: str | None = None,
) -> Answer:
    body = orjson.dumps({"error": reason, "detail": detail})
    return Answer(status, body, outcome, reason, event_id, event_type)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The raw body, refusing early on a declared length and capping a chunked stream as it arrives."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge
    body = bytearray()
    while chunk := await request.content.readany():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


async def _queue(link: BrokerLink, event: VerifiedEvent) -> Answer:
    message = event_message(event.body, event.event_id, event.event_type, event.created)
    try:
        await link.publish(message)
    except BrokerUnavailable:
        detail = "broker unreachable; not queued, retry later"
        return _error(503, "unavailable", BROKER_UNAVAILABLE, detail, event.event_id, event.event_type)
    except PublishFailed:
        detail = "broker did not confirm; not queued, retry later"
        return _error(503, "unavailable", PUBLISH_NOT_CONFIRMED, detail, event.event_id, event.event_type)
    metrics.WEBHOOKS_QUEUED.labels(event.event_type).inc()
    return Answer(200, _RECEIVED, "queued", None, event.event_id, event.event_type)


async def _take(request: web.Request) -> Answer:
    settings = request.app[RECEIVER_SETTINGS]
    try:
        body = await read_body(request, settings.max_body_bytes)
    except BodyTooLarge:
        return _error(413, "rejected", BODY_TOO_LARGE, f"body is over {settings.max_body_bytes} bytes")
    try:
        event = verify_webhook(
            body,
            request.headers.get(SIGNATURE_HEADER),
            settings.webhook_secrets,
            settings.webhook_tolerance_s,
            settings.livemode,
        )
    except WebhookRejected as exc:
        if exc.reason in AFTER_SIGNATURE:
            metrics.WEBHOOKS_VERIFIED.labels(exc.event_type or "unknown").inc()
        return _error(400, "rejected", exc.reason, exc.detail, exc.event_id, exc.event_type)
    metrics.WEBHOOKS_VERIFIED.labels(event.event_type).inc()
    if event.event_type not in HANDLED_TYPES:
        metrics.WEBHOOKS_IGNORED.labels(event.event_type).inc()
        return Answer(200, _IGNORED, "ignored", None, event.event_id, event.event_type)
    return await _queue(request.app[BROKER_LINK], event)


def _record(answer: Answer, started: float) -> None:
    """One log line and the metrics of one request. Never the body, the header or a secret."""
    elapsed_s = time.perf_counter() - started
    metrics.WEBHOOK_ACK_SECONDS.observe(elapsed_s)
    metrics.WEBHOOKS_RECEIVED.labels(answer.event_type or UNVERIFIED_TYPE).inc()
    if answer.reason is not None:
        metrics.WEBHOOKS_REJECTED.labels(answer.reason).inc()
    emit = log.warning if answer.status >= 500 else log.info
    emit(
        "webhook",
        outcome=answer.outcome,
        status=answer.status,
        reason=answer.reason,
        event_id=answer.event_id,
        event_type=answer.event_type,
        latency_ms=round(elapsed_s * 1000, 3),
    )


async def receive_webhook(request: web.Request) -> web.Response:
    started = time.perf_counter()
    answer = await _take(request)
    _record(answer, started)
    return web.Response(status=answer.status, body=answer.body, content_type="application/json")


async def _broker_ctx(app: web.Application) -> AsyncIterator[None]:
    link = app[BROKER_LINK]
    await link.start()
    yield
    # aiohttp runs this after the server stopped accepting and in-flight requests had their
    # grace; close() still waits for unconfirmed publishes, within the shutdown deadline.
    deadline = app[SHUTDOWN]
    deadline.start()
    await link.close(deadline)


def _broker_readiness(link: BrokerLink) -> Callable[[], Awaitable[str | None]]:
    async def check() -> str | None:
        return link.not_ready_reason()

    return check


def create_app(settings: Settings) -> web.Application:
    """The receiver's aiohttp app; ``recon run`` appends the consumer's cleanup_ctx to it."""
    settings.require_webhook_secrets()
    app = web.Application()
    app[RECEIVER_SETTINGS] = settings
    # Created here, connected in _broker_ctx: the app's state is complete before it starts.
    app[BROKER_LINK] = BrokerLink(settings)
    add_shutdown_deadline(app)
    add_health_routes(app)
    app[READINESS_CHECKS].append(_broker_readiness(app[BROKER_LINK]))
    app.cleanup_ctx.append(_broker_ctx)
    app.router.add_post(WEBHOOK_PATH, receive_webhook)
    return app
