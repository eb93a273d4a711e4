"""/healthz, /readyz and /metrics, shared by the receiver and the worker's own HTTP port."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

ReadinessCheck = Callable[[], Awaitable[str | None]]
"""Returns None when ready, else a short reason (never a secret)."""

READINESS_CHECKS = web.AppKey("readiness_checks", list[ReadinessCheck])


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    reasons = [reason for check in request.app[READINESS_CHECKS] if (reason := await check())]
    if reasons:
        return web.json_response({"ready": False, "reasons": reasons}, status=503)
    return web.json_response({"ready": True})


async def metrics(_request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest())
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


def add_health_routes(app: web.Application) -> None:
    app.setdefault(READINESS_CHECKS, [])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
