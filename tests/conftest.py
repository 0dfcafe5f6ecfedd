"""Session-wide fixtures: one pool of gloo workers for every distributed test."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from pool import WorkerPool


@pytest.fixture(scope="session")
def _pool_holder():
    holder = {"pool": None}
    yield holder
    if holder["pool"] is not None:
        holder["pool"].close()


@pytest.fixture
def pool(_pool_holder) -> WorkerPool:
    """The session's worker pool (restarted if an earlier test killed it)."""
    current = _pool_holder["pool"]
    if current is None or not current.alive:
        _pool_holder["pool"] = current = WorkerPool()
    return current
