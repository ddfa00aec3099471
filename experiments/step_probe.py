"""Device experiment: is a small decode step bound by the host's dispatch or by the GPU?

python -m experiments.step_probe [--presets ...] [--batch 1] [--context 4096] [--steps 32]

For each preset (Hq=32, Hk=8, D=128, block 16, as in ``decode_sweep``) it times, like the sweep
(``experiments.timing.time_fn``, back-to-back jitted calls, one synchronisation per repetition):

* ``floor``: one empty Pallas kernel per jitted call (``experiments.timing.launch_floor``);
* ``dispatch``: a jitted call with the decode's arguments (query, the cache's arrays, block tables,
  lengths) that launches one tiny XLA op (the host cost of the arguments, no kernel of ours);
* ``decode``: the jitted Pallas decode, as ``decode_sweep`` times it;
* ``in-jit step``: ``--steps`` decode steps inside one jitted ``lax.scan`` (a different query per
  step), divided by the steps: the GPU's time per step without the host's per-call dispatch.

If ``decode`` is near ``in-jit step`` the GPU bounds the step; if near ``dispatch`` the host does.
Prints one table at the end.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.device_check import build
from experiments.timing import device_description, launch_floor, time_fn
from tqjax.pallas.decode import paged_decode

ON_GPU = jax.default_backend() == "gpu"


def _scan_steps(decode, qsteps, cache, bt, lens):
    """``decode`` on every query of ``qsteps`` [S, B, Hq, D] in one ``lax.scan`` (outputs summed)."""

    def body(acc, q):
        out = decode(q, cache, bt, lens)
        return acc + out[0, 0, 0].astype(jnp.float32), None

    return jax.lax.scan(body, jnp.float32(0), qsteps)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["turboquant_4bit_nc", "turboquant_k8v4", "turboquant_3bit_nc"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=4096 if ON_GPU else 64)
    p.add_argument("--steps", type=int, default=32 if ON_GPU else 2)
    a = p.parse_args()
    dev = device_description()
    print(dev, flush=True)
    iters, reps = (50, 5) if ON_GPU else (2, 1)
    rng = np.random.default_rng(0)
    floor = launch_floor()
    rows = [("(all)", "floor", floor)]
    print(f"floor {floor * 1e6:.1f} us", flush=True)
    for name in a.presets:
        _, cache, bt, lens = build(name, a.batch, a.context, 32, 8, 128, 16, rng)
        qs = [jnp.asarray(rng.standard_normal((a.batch, 32, 128)), jnp.bfloat16) for _ in range(3)]
        qsteps = jnp.asarray(rng.standard_normal((a.steps, a.batch, 32, 128)), jnp.bfloat16)
        decode = functools.partial(paged_decode, interpret=not ON_GPU)

        def touch(q, cache, bt, lens):
            return q[0, 0, 0] + lens[0].astype(q.dtype)

        dispatch = functools.partial(jax.jit(touch), cache=cache, bt=bt, lens=lens)
        rows.append((name, "dispatch", time_fn(dispatch, [(q,) for q in qs], iters=iters, reps=reps)))
        step = functools.partial(jax.jit(decode), cache=cache, block_tables=bt, seq_lens=lens)
        rows.append((name, "decode", time_fn(step, [(q,) for q in qs], iters=iters, reps=reps)))

        scanned = jax.jit(functools.partial(_scan_steps, decode))
        t = time_fn(functools.partial(scanned, cache=cache, bt=bt, lens=lens), [(qsteps,)], iters=max(2, iters // 10),
                    reps=reps)
        rows.append((name, f"in-jit step (/{a.steps})", t / a.steps))
        for r in rows[-3:]:
            print(f"  {r[0]:22s} {r[1]:22s} {r[2] * 1e6:8.1f} us", flush=True)
    print(f"\n== step probe: {dev}, B={a.batch}, ctx {a.context}" + ("" if ON_GPU else "  [CPU: not GPU timings]"))
    print(f"{'preset':22s} {'what':22s} {'time us':>9s} {'x floor':>8s}")
    for name, what, t in rows:
        print(f"{name:22s} {what:22s} {t * 1e6:9.1f} {t / floor:8.2f}")


if __name__ == "__main__":
    main()
