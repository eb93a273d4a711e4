"""The layout keeps its promises: the receiver's list of types is the rules' table, no module
imports its own package root, and at most twelve modules sit directly in worker/."""

from __future__ import annotations

from pathlib import Path

import grimp

from handlers import HANDLERS
from worker.events import HANDLED_TYPES

ROOT = Path(__file__).resolve().parent.parent


def test_the_receiver_queues_exactly_the_types_the_rules_apply() -> None:
    """worker/events.py lists the types the receiver queues; handlers' table applies them. A type
    in one and not the other would be queued and dead-lettered, or never queued at all."""
    assert set(HANDLERS) == HANDLED_TYPES


def test_no_module_imports_its_own_package_root() -> None:
    """A module that imports its package's __init__ makes a cycle through it (lazy and
    type-checking imports counted): shared types live in modules of their own."""
    graph = grimp.build_graph("worker", "handlers")
    offenders = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if module.startswith(imported + "."):
                offenders.append(f"{module} -> {imported}")
    assert offenders == []


def test_worker_keeps_at_most_twelve_modules_at_its_top() -> None:
    """The parts live in subpackages (intake, consume, amqp, ops); the top holds the few modules
    every part shares."""
    top = [p.name for p in (ROOT / "worker").glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= 12, sorted(top)
    assert {p.name for p in (ROOT / "worker").iterdir() if (p / "__init__.py").exists()} >= {
        "intake",
        "consume",
        "amqp",
        "ops",
    }
