"""Run GPU test files as several pytest processes sharing one GPU, and summarise them.

    python -m experiments.gpu_tests tests/test_decode_mgpu.py tests/test_large_cache_gpu.py [--shards 6]

The GPU tests spend most of their time compiling, one core at a time: on the lent H200 (16 cores) the 84 tests of
the two files above take over five minutes in one process and 80 s in six (twenty-second session); their 89 tests took
147 s in eight processes and had not finished in 150 s in fourteen (twenty-third session, one call each); 125 s in
eight, and 90 over 200 s in eight in a later call (twenty-fourth session: the lent machine's speed varies);
90 in 173 s (twenty-fifth session). The test ids
matching ``--marker`` are collected once and dealt round-robin (so each shard mixes the slow and the quick
parametrisations); every process gets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` so that they share the GPU's memory.
Each shard's output goes to ``<out>/shard<i>.log``; the exit status is 1 if any shard failed or found no tests.
Timings are not to be taken from tests run this way (the processes share the device).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence


def deal(ids: Sequence[str], shards: int) -> list[list[str]]:
    """Test ids dealt round-robin to at most ``shards`` non-empty lists, in their collection order."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    hands = [list(ids[i::shards]) for i in range(shards)]
    return [hand for hand in hands if hand]


def _pytest(args: Sequence[str]) -> list[str]:
    # The project's addopts (-n 2) would start workers inside each shard.
    return [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", *args]


def collect(paths: Sequence[str], marker: str) -> list[str]:
    """The ids of the tests under ``paths`` that ``-m marker`` selects."""
    run = subprocess.run(_pytest(["--collect-only", "-q", "-m", marker, *paths]), check=False, capture_output=True,
                         text=True)
    ids = [line for line in run.stdout.splitlines() if "::" in line]
    if run.returncode not in (0, 5) or not ids:  # 5: nothing collected
        raise SystemExit(f"collecting {' '.join(paths)} with -m {marker!r} gave no tests "
                         f"(pytest exit {run.returncode}):\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    return ids


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="test files or directories")
    ap.add_argument("--shards", type=int, default=6, help="pytest processes at once")
    ap.add_argument("--marker", default="gpu", help="pytest -m expression selecting the tests")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the shards' logs")
    args = ap.parse_args(argv)

    ids = collect(args.paths, args.marker)
    hands = deal(ids, args.shards)
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    start = time.perf_counter()
    logs = [os.path.join(args.out, f"shard{i}.log") for i in range(len(hands))]
    with contextlib.ExitStack() as stack:
        procs = [subprocess.Popen(_pytest(["-q", "-m", args.marker, *hand]), stdout=stack.enter_context(open(log, "w")),
                                  stderr=subprocess.STDOUT, env=env) for hand, log in zip(hands, logs)]
        codes = [proc.wait() for proc in procs]
    failed = 0
    for i, (code, log) in enumerate(zip(codes, logs)):
        with open(log) as f:
            summary = [line for line in f.read().splitlines() if line.startswith(("FAILED", "ERROR"))
                       or (" in " in line and ("passed" in line or "failed" in line or "error" in line))]
        print(f"shard {i}: {len(hands[i])} tests, exit {code}: " + " | ".join(summary[-6:]))
        failed += code != 0
    print(f"{len(ids)} tests in {len(hands)} processes, {time.perf_counter() - start:.0f} s; "
          + (f"{failed} shard(s) failed" if failed else "every shard passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
