"""Long-running modes: ``recon receiver``, ``recon worker`` and ``recon run``.

aiohttp's run_app owns the signals: on SIGTERM it stops accepting, lets in-flight requests
finish, then runs the cleanup contexts in reverse (the back office stops, the consumer drains,
the broker closes) and returns, so the process exits 0. All of it fits one budget
(worker/shutdown.py). ``worker`` and ``run`` also serve the back-office API on its own port
(RECON_API_HOST:RECON_API_PORT) when RECON_API_TOKENS is set, and always run its loops.
"""

from __future__ import annotations

import asyncio
import gc
from typing import TYPE_CHECKING

from aiohttp import web

from worker import shutdown
from worker.settings import Settings, SettingsError

if TYPE_CHECKING:
    from worker.payouts.service import ServiceTimings


def build_app(
    mode: str, settings: Settings, *, payout_timings: ServiceTimings | None = None
) -> tuple[web.Application, int]:
    """The aiohttp application for a mode and the port it listens on. ``payout_timings``: the
    payout reconciler's and drift check's waits (tests shorten them; the defaults otherwise)."""
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
        from worker.backoffice.runtime import add_backoffice
        from worker.consume.consumer import consumer_ctx
        from worker.payouts import payouts_ctx

        app.cleanup_ctx.append(consumer_ctx(settings))
        # The payout reconciler and the periodic drift check (rule 13, 14): their own loops, never
        # a lane's; they read the Stripe API outside any transaction.
        app.cleanup_ctx.append(
            payouts_ctx(settings) if payout_timings is None else payouts_ctx(settings, payout_timings)
        )
        # After the consumer: cleanup runs in reverse, so the API stops taking refunds before the
        # lanes drain. The outbox senders and refund recovery run whether or not the API is on.
        _refuse_shared_api_port(settings, port)
        add_backoffice(app, settings)
    return app, port


def _refuse_shared_api_port(settings: Settings, port: int) -> None:
    """The back-office API never listens on the public webhook port (nor the health port)."""
    if settings.api_enabled and settings.api_port in (port, settings.http_port):
        raise SettingsError(
            f"RECON_API_PORT ({settings.api_port}) must differ from the webhook and health ports"
        )


# A server's young objects are the messages, requests and rows in flight; nearly all are freed by
# reference counting, but with 800 deliveries in the prefetch window the count of live ones stayed
# above the default threshold of 700, so at 1,600 webhooks/s `recon run` spent 13% of its CPU in
# collections that freed nothing (tens of milliseconds each for the oldest generation).
YOUNG_GENERATION_THRESHOLD = 20_000


def tune_garbage_collector() -> None:
    """For a long-running server: what start-up built (modules, classes, the app) is never garbage,
    so ``gc.freeze`` keeps it out of every later collection; and the young generation is collected
    after 20,000 net new objects instead of 700 (docs/performance.md has the measurements)."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, older, oldest)


def serve(mode: str, settings: Settings) -> int:
    app, port = build_app(mode, settings)
    tune_garbage_collector()
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
