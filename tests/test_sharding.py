"""tqjax.sharding and tqjax.nn with a mesh, on 8 simulated CPU devices.

The device count is fixed when jax starts its CPU backend, and this pytest process already runs jax on
one device, so the checks live in tests/sharding_worker.py and run once, in a fresh interpreter started
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; each check becomes one test here, failing
with the worker's traceback. What they check: sharded store / decode / dequantize / prefill equal the
single-device ops on 1x2, 1x4, 1x8 and 2x4 (data x model) meshes with local block ids; every output
(the cache included) stays sharded, each device holding Hk/model heads of its data shard's pages; the
compiled programs contain no collective at all; the sharded store donates the cache and updates every
shard in place; the Pallas kernels (interpret mode) run per shard through a registered backend; bad
inputs fail with clear errors before tracing; a TransformerLM over a 1x4 mesh generates the same tokens
as on one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from once_per_run import computed_once
from sharding_worker import CHECKS

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return computed_once(tmp_path_factory, "sharding_results", lambda: _run_worker(tmp_path_factory))


def _run_worker(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("sharding") / "results.json"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS.parent), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(TESTS / "sharding_worker.py"), str(out)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    if proc.returncode or not out.exists():
        pytest.fail(f"sharding worker failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", list(CHECKS))
def test_multi_device(results: dict[str, dict], name: str) -> None:
    result = results[name]
    assert result["error"] is None, result["error"]
