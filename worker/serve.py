"""Long-running modes: ``recon receiver``, ``recon worker`` and ``recon run``.

aiohttp's run_app owns the signals: on SIGTERM it stops accepting, lets in-flight requests
finish, then runs the cleanup contexts in reverse (the consumer drains, the broker closes)
and returns, so the process exits 0. All of it fits one budget (worker/shutdown.py).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from worker import shutdown
from worker.settings import Settings


def build_app(mode: str, settings: Settings) -> tuple[web.Application, int]:
    """The aiohttp application for a mode and the port it listens on."""
    from worker.health import add_health_routes

    if mode in ("receiver", "run"):
        settings.require_webhook_secrets()
        from worker.intake.receiver import create_app

        app = create_app(settings)
        port = settings.http_port
    else:
        app = web.Application()
        shutdown.add_shutdown_deadline(app)
        add_health_routes(app)
        port = settings.worker_http_port
    if mode in ("worker", "run"):
        from worker.consume.consumer import consumer_ctx

        app.cleanup_ctx.append(consumer_ctx(settings))
    return app, port


def serve(mode: str, settings: Settings) -> int:
    app, port = build_app(mode, settings)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    web.run_app(
        app,
        host=settings.http_host,
        port=port,
        shutdown_timeout=shutdown.REQUESTS_GRACE_S,
        access_log=None,  # the receiver logs one structured line per request itself
        print=None,
        reuse_port=True,  # several receiver processes may share one port (SO_REUSEPORT)
    )
    return 0
