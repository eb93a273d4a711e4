"""One budget for a graceful stop, shared by every step of it.

The deploy files give a process 45 s between SIGTERM and SIGKILL (systemd ``TimeoutStopSec``,
Kubernetes ``terminationGracePeriodSeconds``, Compose ``stop_grace_period``). Every step of a stop
— in-flight webhook requests, draining both lane sets, closing the broker connections and the
pool — takes what is left of one ``Deadline`` started when the stop begins, so together they
end within ``BUDGET_S`` whatever each of them meets. What a step cannot finish in time stays
unacked and the broker redelivers it: a late stop loses nothing, it only repeats work.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

STOP_GRACE_S = 45.0  # what deploy/ gives; tests/test_deploy.py keeps the files at least this
BUDGET_S = 40.0  # ours, leaving the interpreter time to exit
REQUESTS_GRACE_S = 10.0  # in-flight requests: a webhook waits at most its publish timeout (5 s)


class Deadline:
    """Started once, when the stop begins; ``remaining`` is what is left for the next step."""

    def __init__(self, budget_s: float = BUDGET_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget_s = budget_s
        self._clock = clock
        self._started: float | None = None

    def start(self) -> None:
        if self._started is None:
            self._started = self._clock()

    def remaining(self, keep_s: float = 0.0) -> float:
        """Seconds left, less ``keep_s`` held back for the steps after this one (never negative)."""
        elapsed = 0.0 if self._started is None else self._clock() - self._started
        return max(0.0, self.budget_s - elapsed - keep_s)


SHUTDOWN = web.AppKey("recon_shutdown", Deadline)


def add_shutdown_deadline(app: web.Application, budget_s: float = BUDGET_S) -> Deadline:
    """The app's deadline, started by aiohttp's on_shutdown (before in-flight requests are waited
    for); cleanup steps start it too, for apps that stop without that signal (tests' runners)."""
    if SHUTDOWN not in app:
        deadline = app[SHUTDOWN] = Deadline(budget_s)

        async def start(_app: web.Application) -> None:
            deadline.start()

        app.on_shutdown.append(start)
    return app[SHUTDOWN]
