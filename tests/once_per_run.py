"""Expensive module fixtures computed once per test run, shared by the pytest-xdist workers."""

from __future__ import annotations

import fcntl
import os
import pickle
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def computed_once(tmp_path_factory: pytest.TempPathFactory, name: str, produce: Callable[[], T]) -> T:
    """``produce()``, computed once per run: under pytest-xdist (the README's command runs 2 workers,
    each of which would otherwise build every module fixture its tests need) the first worker to ask
    computes and pickles it into the run's temp dir, the others wait on a file lock and read it. A
    single pytest process just computes it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return produce()
    shared = tmp_path_factory.getbasetemp().parent  # this run's temp dir, common to its workers
    path = shared / f"{name}.pkl"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return pickle.loads(path.read_bytes())
        value = produce()
        path.write_bytes(pickle.dumps(value))
        return value
