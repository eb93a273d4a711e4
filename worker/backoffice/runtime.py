"""The back office inside ``recon worker`` and ``recon run``: the API on its own port, the two outbox
senders and the recovery of refund requests, started and stopped in one cleanup context.

All of it runs on the back office's own small pool and tasks, apart from the lanes: a dead SMTP
server, a slow host or a slow Stripe delays only its own work, never reconciliation. Stopping
takes what the process's one shutdown budget leaves (worker/shutdown.py): the API's in-flight
requests begin draining as soon as the stop begins; then the loops are cancelled — nothing of theirs
needs finishing: a send cut off is due again when its lease ends (the receiver sees the same id
twice at worst), a refund cut off after Stripe's answer is found at Stripe by the next recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from worker.backoffice.api import create_api_app, open_backoffice_pool
from worker.backoffice.host_webhooks import GIVE_UP_AFTER_S, HostWebhookDeliverer
from worker.backoffice.mail import MailDeliverer
from worker.backoffice.outbox import OutboxSender, OutboxTimings
from worker.backoffice.stripe_refunds import StripeRefundApi
from worker.backoffice.submit import AnsweredHook, RefundApi, Submitter, SubmitTimings
from worker.settings import Settings
from worker.shutdown import REQUESTS_GRACE_S, SHUTDOWN, Deadline

log = structlog.get_logger(__name__)

LOOPS_STOP_S = 5.0  # at most this long to see the cancelled loops end
CLOSE_RESERVE_S = 5.0  # held back for the consumer's closing steps, which run after this


@dataclass(frozen=True, slots=True)
class BackOfficeTimings:
    email: OutboxTimings = OutboxTimings(lease_s=60.0)
    host_webhook: OutboxTimings = OutboxTimings(lease_s=60.0, give_up_after_s=GIVE_UP_AFTER_S)
    submit: SubmitTimings = SubmitTimings()
    smtp_timeout_s: float = 20.0
    webhook_timeout_s: float = 10.0


@dataclass(slots=True)
class _Running:
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, name: str, coroutine: Coroutine[Any, Any, None]) -> None:
        self.tasks.append(asyncio.create_task(coroutine, name=name))

    async def stop(self, within_s: float) -> None:
        for task in self.tasks:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), within_s)


@dataclass(slots=True)
class _ApiStop:
    """The API's runner, stopped from the app's on_shutdown — the moment the stop begins, alongside
    the app's own in-flight requests — and waited for in the cleanup context."""

    runner: web.AppRunner | None = None
    task: asyncio.Task[None] | None = None

    async def begin(self, _app: web.Application | None = None) -> None:
        if self.runner is not None and self.task is None:
            self.task = asyncio.create_task(self.runner.cleanup(), name="backoffice-api-stop")

    async def wait(self, within_s: float) -> None:
        await self.begin()
        if self.task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.task), within_s)


def add_backoffice(
    app: web.Application,
    settings: Settings,
    timings: BackOfficeTimings = BackOfficeTimings(),
    *,
    stripe_api: RefundApi | None = None,
    after_stripe_answered: AnsweredHook | None = None,
) -> None:
    """The loops always, the API when RECON_API_TOKENS is set, on ``app``'s start and stop."""
    api_stop = _ApiStop()
    app.on_shutdown.append(api_stop.begin)

    async def backoffice_context(app: web.Application) -> AsyncIterator[None]:
        deadline = app[SHUTDOWN] if SHUTDOWN in app else Deadline()
        pool = await open_backoffice_pool(settings)
        owned = (
            StripeRefundApi(settings.stripe_api_key, settings.stripe_api_base)
            if stripe_api is None and settings.stripe_api_key
            else None
        )
        refunds = stripe_api or owned
        mail = MailDeliverer(
            settings.smtp_url,
            settings.mail_from,
            notify_dashboard_refunds=settings.notify_dashboard_refunds,
            timeout_s=timings.smtp_timeout_s,
        )
        hooks = HostWebhookDeliverer(
            settings.host_webhook_url, settings.host_webhook_secret, timeout_s=timings.webhook_timeout_s
        )
        running = _Running()
        try:
            running.start("outbox-email", OutboxSender(pool, "email", mail, timings.email).run_forever())
            running.start(
                "outbox-host-webhook",
                OutboxSender(pool, "host_webhook", hooks, timings.host_webhook).run_forever(),
            )
            if refunds is not None:
                submitter = Submitter(pool, refunds, timings.submit, after_stripe_answered)
                running.start("refund-recovery", submitter.recover_forever())
            if settings.api_enabled:
                api = create_api_app(
                    settings,
                    stripe_api=refunds,
                    submit_timings=timings.submit,
                    after_stripe_answered=after_stripe_answered,
                )
                api_stop.runner = web.AppRunner(api, access_log=None, shutdown_timeout=REQUESTS_GRACE_S)
                await api_stop.runner.setup()
                await web.TCPSite(api_stop.runner, settings.api_host, settings.api_port).start()
                log.info("backoffice_api_listening", host=settings.api_host, port=settings.api_port)
            log.info("backoffice_started", api=settings.api_enabled, refunds=refunds is not None)
            yield
        finally:
            # Also on a failed start (the API port taken): close what was opened.
            deadline.start()
            await api_stop.wait(deadline.remaining(keep_s=CLOSE_RESERVE_S))
            await running.stop(min(LOOPS_STOP_S, deadline.remaining(keep_s=CLOSE_RESERVE_S)))
            await hooks.close()
            if owned is not None:
                await owned.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pool.close(), deadline.remaining())

    app.cleanup_ctx.append(backoffice_context)
