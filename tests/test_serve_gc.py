"""The long-running modes tune the garbage collector once the app is built."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from worker import serve


@pytest.fixture
def restored_gc() -> Iterator[None]:
    """Whatever the test does to the collector is undone afterwards (the test process goes on)."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_start_up_objects_leave_the_collections_and_the_young_generation_grows(restored_gc: None) -> None:
    """What existed before the tuning is frozen (no collection scans it again) and generation 0 waits
    for 20,000 new objects; the older generations keep their thresholds."""
    before = gc.get_threshold()
    built_at_start_up = {"app": ["routes", "settings"]}
    assert any(o is built_at_start_up for o in gc.get_objects())
    serve.tune_garbage_collector()
    assert not any(o is built_at_start_up for o in gc.get_objects())
    assert gc.get_threshold() == (serve.YOUNG_GENERATION_THRESHOLD, before[1], before[2])
    assert serve.YOUNG_GENERATION_THRESHOLD > before[0]
