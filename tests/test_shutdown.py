"""One shutdown budget: every step takes what is left of it, so a stop ends within the budget."""

from __future__ import annotations

from worker.shutdown import BUDGET_S, REQUESTS_GRACE_S, STOP_GRACE_S, Deadline


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_deadline_counts_from_its_first_start_only() -> None:
    """Before the stop begins the whole budget is left; a second start does not reset it."""
    clock = Clock()
    deadline = Deadline(40.0, clock)
    clock.now += 500
    assert deadline.remaining() == 40.0
    deadline.start()
    clock.now += 15
    deadline.start()
    assert deadline.remaining() == 25.0
    assert deadline.remaining(keep_s=5.0) == 20.0
    clock.now += 60
    assert deadline.remaining() == 0.0


def test_the_budget_fits_inside_what_the_deploy_files_allow() -> None:
    """The requests' grace is part of the budget, and the budget ends before SIGKILL."""
    assert REQUESTS_GRACE_S < BUDGET_S < STOP_GRACE_S
