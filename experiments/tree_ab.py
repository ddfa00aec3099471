"""A/B timing of two trees of the library: this checkout's ``tqjax`` against another revision's, the decode step timed
in alternating processes (a process imports one ``tqjax``; changes now span several modules: the prologue, the piece
table, the merge).

    git archive 0f7d725 tqjax | (mkdir -p ab/old && tar -x -C ab/old)    # on this machine; ab/ travels to the device
    python -m experiments.tree_ab --tree ab/old [--cases mosaic/32/16384 triton/1/4096] [--rounds 2] [--steps 32]

Archive ``tqjax`` alone: the children import it from the tree and ``experiments`` (this module, the cache builder,
the timing) from this checkout. Each case is ``impl/B/context`` (``mosaic``: ``decode_mgpu.paged_decode_mgpu``;
``triton``: ``paged_decode(implementation="triton")``; ``default``: ``paged_decode``'s choice), ``--preset`` at
Hq=32, Hk=8, D=128, block 16 (:func:`experiments.device_check.build`; on a CPU Hq=8, Hk=2, interpret mode: a check
of the plumbing, not timings). A child times, in turns, a step of ``--steps`` in one jitted loop
(:func:`experiments.timing.looped_decode`: the GPU's time) and a jitted call each
(:func:`experiments.timing.time_fn`); the parent runs ``--rounds`` rounds of (this, tree), then prints a table of
medians over the rounds and each case's largest output difference between the trees. Figures move between processes
and calls (docs/PERFORMANCE.md): compare the trees in one call, in rounds.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("mosaic", "triton", "default")


def parse_case(case: str) -> tuple[str, int, int]:
    """``impl/B/context`` -> (impl, B, context)."""
    parts = case.split("/")
    if len(parts) != 3 or parts[0] not in IMPLS or not all(p.isdigit() and int(p) > 0 for p in parts[1:]):
        raise argparse.ArgumentTypeError(f"a case is impl/B/context with impl in {IMPLS}, got {case!r}")
    return parts[0], int(parts[1]), int(parts[2])


def child(label: str, out: str, cases: list[tuple[str, int, int]], preset: str, steps: int) -> None:
    """Time every case with the ``tqjax`` on ``sys.path``; print ``ROW label impl B ctx timed us turns...`` lines and
    save the first query's outputs to ``out/<label>.npz``."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    import tqjax
    from experiments.device_check import build
    from experiments.timing import device_description, in_turns, looped_decode, time_fn
    from tqjax.pallas.decode import paged_decode

    on_gpu = jax.default_backend() == "gpu"
    hq, hk = (32, 8) if on_gpu else (8, 2)
    iters, reps, turns = (20, 5, 3) if on_gpu else (1, 1, 1)
    print(label, tqjax.__file__, device_description(), flush=True)
    outs = {}
    for impl, b, ctx in cases:
        rng = np.random.default_rng(0)
        _, cache, tables, lens = build(f"turboquant_{preset}", b, ctx, hq, hk, 128, 16, rng)
        queries = jnp.asarray(rng.standard_normal((steps, b, hq, 128)), jnp.bfloat16)
        if impl == "mosaic":
            from tqjax.pallas import decode_mgpu

            decode = decode_mgpu.paged_decode_mgpu_unchecked
        else:
            decode = functools.partial(paged_decode, implementation=None if impl == "default" else impl,
                                       interpret=not on_gpu)
        one = jax.jit(decode)
        loop = looped_decode(decode, steps)
        args = (cache, tables, lens)
        outs[f"{impl}_{b}_{ctx}"] = np.asarray(one(queries[0], *args).astype(jnp.float32))
        fns = {"in-jit": (loop, [(queries, *args)], steps),
               "call": (one, [(queries[i % steps], *args) for i in range(3)], 1)}
        times = in_turns(fns, turns, lambda f: time_fn(f[0], f[1], iters=iters, reps=reps) / f[2])
        for timed, ts in times.items():
            print("ROW", label, impl, b, ctx, timed, *(f"{t * 1e6:.1f}" for t in ts), flush=True)
        del cache
    np.savez(os.path.join(out, f"{label}.npz"), **outs)


def summarise(lines: list[str], labels: tuple[str, str], out: str) -> list[str]:
    """The table of a run's ROW lines: per case and timing, each tree's median over its rounds' turns (the turns of
    every round), the ratio, and the outputs' largest difference between the trees."""
    import numpy as np

    got = collections.defaultdict(list)
    for line in lines:
        if line.startswith("ROW "):
            _, label, impl, b, ctx, timed, *turns = line.split()
            got[(impl, int(b), int(ctx), timed, label)].extend(float(t) for t in turns)
    table = [f"impl | B | ctx | timed | {labels[0]} us | {labels[1]} us | {labels[0]} / {labels[1]} | turns"]
    keys = sorted({k[:4] for k in got}, key=lambda k: (k[0], k[1], k[2], k[3] != "in-jit"))
    for key in keys:
        a, b = (got.get((*key, label), []) for label in labels)
        if not a or not b:
            table.append(f"{' | '.join(map(str, key))} | {'missing' if not a else ''} | {'missing' if not b else ''}")
            continue
        ma, mb = statistics.median(a), statistics.median(b)
        table.append(f"{' | '.join(map(str, key))} | {ma:.1f} | {mb:.1f} | {ma / mb:.3f} | "
                     f"{' '.join(map(str, a))} / {' '.join(map(str, b))}")
    paths = [os.path.join(out, f"{label}.npz") for label in labels]
    if all(os.path.exists(p) for p in paths):
        first, second = (np.load(p) for p in paths)
        for k in sorted(set(first.files) & set(second.files)):
            table.append(f"{k}: max |{labels[0]} - {labels[1]}| {float(np.max(np.abs(first[k] - second[k]))):.3e}, "
                         f"max |out| {float(np.max(np.abs(first[k]))):.3e}")
    return table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", required=False, help="a directory holding another revision's tqjax package")
    ap.add_argument("--cases", nargs="+", type=parse_case,
                    default=[parse_case(c) for c in ("mosaic/1/4096", "mosaic/32/16384", "mosaic/128/16384",
                                                     "triton/32/16384")])
    ap.add_argument("--preset", default="4bit_nc", help="the cache's preset, without turboquant_")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        child(a.child, a.out, a.cases, a.preset, a.steps)
        return
    if a.tree is None or not os.path.isdir(os.path.join(a.tree, "tqjax")):
        ap.error(f"--tree: a directory with a tqjax package in it, got {a.tree!r}")
    if a.rounds < 1 or a.steps < 1:
        ap.error("--rounds and --steps must be at least 1")
    labels = ("this", "tree")
    paths = {"this": ROOT, "tree": os.path.abspath(a.tree)}
    cases = [f"{i}/{b}/{c}" for i, b, c in a.cases]
    lines = []
    with tempfile.TemporaryDirectory() as out:
        for r in range(a.rounds):
            for label in labels:
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([paths[label], ROOT]),
                           XLA_PYTHON_CLIENT_PREALLOCATE="false")
                cmd = [sys.executable, os.path.abspath(__file__), "--child", label, "--out", out, "--preset",
                       a.preset, "--steps", str(a.steps), "--cases", *cases]
                run = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
                lines += run.stdout.splitlines()
                print(f"round {r + 1}, {label}: exit {run.returncode}", flush=True)
                if run.returncode:
                    print(run.stdout[-2000:] + run.stderr[-4000:], flush=True)
                    raise SystemExit(f"the {label} tree's child failed")
                print("\n".join(ln for ln in run.stdout.splitlines() if not ln.startswith("ROW")), flush=True)
        print(f"\n== tree A/B: this = {paths['this']}, tree = {paths['tree']}; turboquant_{a.preset}, "
              f"{a.rounds} rounds, a step of {a.steps} in one jitted loop (in-jit) or a jitted call (call)")
        print("\n".join(summarise(lines, labels, out)))


if __name__ == "__main__":
    main()
