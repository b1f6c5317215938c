from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from durable_streams_asgi import tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_tune_gc_raises_the_young_threshold_and_freezes_startup_objects(restore_gc: None) -> None:
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    tune_gc()
    assert gc.get_threshold() == (10_000, 20, 20)
    assert gc.get_freeze_count() > 0


def test_tune_gc_never_lowers_older_thresholds(restore_gc: None) -> None:
    gc.set_threshold(700, 50, 100)
    tune_gc(threshold=5_000)
    assert gc.get_threshold() == (5_000, 50, 100)
