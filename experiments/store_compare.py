"""A/B timing of the Pallas store's kernels (``tqjax.pallas.store``: Triton; ``tqjax.pallas.store_mgpu``: Mosaic GPU)
on the same inputs, with their differences from the reference store.

    python -m experiments.store_compare [--presets turboquant_4bit_nc ...] [--tokens 4096 16384] [--once]
    git show c9b1166:tqjax/pallas/store_mgpu.py > /tmp/store_mgpu_old.py
    python -m experiments.store_compare --against /tmp/store_mgpu_old.py --kernels mosaic --repeats 3
    git show HEAD:tqjax/pallas/store.py > /tmp/store_old.py
    python -m experiments.store_compare --against-triton /tmp/store_old.py --kernels triton --repeats 3

For each preset and N (Hk=8, D=128 or ``--head-dim``, block 16, random distinct slots or with ``--slots blocks`` whole
blocks in a random order, bf16 keys and values): each
kernel stores into a fresh cache once, and its arrays are compared with ``tqjax.reference.store_reference`` jitted
on the same device (the count of differing entries per array; for the fp16 key norms also the largest difference in
ulps), then it is timed as ``decode_sweep`` times a store inside a jitted loop (``experiments.timing.looped_store``,
16 stores a call, per store). ``--against`` adds other versions of ``store_mgpu.py`` (loaded from files, named after
them), ``--against-triton`` other versions of ``store.py`` (their ``store_jit``, default launch); with ``--repeats R`` every kernel is timed R times, the kernels taking turns, and the median is reported
(figures move 10-15% between calls of the lent machines, less within one: compare versions in one call). Bytes: bf16
K and V read plus the compressed slots written; "of bw" against the copy bandwidth measured in the same run. The
Mosaic kernel runs on Hopper GPUs only (elsewhere its rows say why not).
"""

from __future__ import annotations

import argparse
import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import tqjax
from experiments import store_probe
from experiments.timing import (
    copy_bandwidth,
    device_description,
    in_turns,
    load_versions,
    looped_store,
    store_slots,
    time_fn,
)
from tqjax import reference
from tqjax.pallas import store as pallas_store
from tqjax.pallas import store_mgpu

LOOP = 16


def kernels(slots, value, others: dict, launches: str = "", triton_others: dict | None = None,
            arithmetic: str | None = None) -> dict:
    """name -> (``(cache, key) -> cache`` (the value and slots fixed), the Mosaic module it runs or None): the
    Triton store (default launch, and ``launches``: comma-separated tokens/warps), the ``store_jit`` of the store
    modules in ``triton_others`` ({name: module}), this Mosaic store and those of ``others`` ({name: module}).
    ``arithmetic``: the Triton stores' (None: this GPU's default)."""
    mosaic = {"mosaic": store_mgpu} | {f"mosaic:{name}": module for name, module in others.items()}
    arithmetic = arithmetic or pallas_store.store_arithmetic(False)
    out = {"triton": (lambda c, key: pallas_store.store_jit(c, key, value, slots, arithmetic=arithmetic), None)}
    for launch in filter(None, launches.split(",")):
        tokens, warps = map(int, launch.split("/"))
        out[f"triton:t{tokens}/w{warps}"] = (lambda c, key, t=tokens, w=warps: pallas_store.store_jit(
            c, key, value, slots, arithmetic=arithmetic, block_tokens=t, num_warps=w), None)
    for name, module in (triton_others or {}).items():
        out[f"triton:{name}"] = (lambda c, key, module=module: module.store_jit(
            c, key, value, slots, arithmetic=arithmetic), None)
    for name, module in mosaic.items():
        out[name] = (lambda c, key, module=module: module.store_mgpu_jit(c, key, value, slots), module)
    return out


def differences(got: dict, ref: dict) -> dict:
    out = {name: int(np.count_nonzero(got[name] != ref[name])) for name in ref}
    if out.get("key_scales"):
        ulps = np.abs(got["key_scales"].view(np.int16).astype(np.int32)
                      - ref["key_scales"].view(np.int16).astype(np.int32))
        out["key_scales_max_ulps"] = int(ulps.max())
    return out


def _step(loop, state: list, key):
    """One timed call: ``loop`` (LOOP stores) on the cache in ``state[0]``, which it replaces (donated)."""
    state[0] = loop(state[0], key)
    return state[0].key_codes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=[  # those the Mosaic store takes
        name for name in tqjax.PRESETS if store_mgpu.unsupported(tqjax.TurboQuantConfig.from_cache_dtype(name, 128))
        is None])
    p.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384])
    p.add_argument("--hk", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--slots", choices=("random", "blocks"), default="random",
                   help="the stored tokens' slots: any, in any order (a decode step's pattern), or whole blocks in a "
                        "random order, in order inside each (a prefill's; experiments.timing.store_slots)")
    p.add_argument("--once", action="store_true",
                   help="store the first --tokens count with the Mosaic kernel twice per preset and exit (for a "
                        "profiler: ncu -k regex:tq_store_mgpu --launch-skip 1 -c 1 ...)")
    p.add_argument("--against", default="", help="other store_mgpu.py files (comma-separated) to time beside this one")
    p.add_argument("--against-triton", default="",
                   help="other store.py files (comma-separated) whose Triton store to time beside this one")
    p.add_argument("--launches", default="", help="Triton store launches (comma-separated tokens/warps) to time "
                   "beside its default")
    p.add_argument("--arithmetic", choices=pallas_store.ARITHMETIC, default=None,
                   help="the Triton stores' conversions (default: this GPU's; 'portable' is ROCm's)")
    p.add_argument("--kernels", default="", help="comma-separated prefixes of the kernels to run (default: all; "
                   "'mosaic' runs this Mosaic store and the --against ones)")
    p.add_argument("--repeats", type=int, default=1, help="times each kernel is timed, in turns (median reported)")
    a = p.parse_args(argv)
    others = load_versions(a.against, "store_mgpu_")
    triton_others = load_versions(a.against_triton, "store_")
    if jax.default_backend() != "gpu":
        raise SystemExit("store_compare times compiled kernels: it needs a GPU")
    if a.once:  # store_probe's profiling run, through the Mosaic kernel
        store_probe.once(a, store=store_mgpu.store_mgpu)
        return
    dev = device_description()
    print(dev, flush=True)
    bw = copy_bandwidth()
    rows = []
    for name in a.presets:
        cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, a.head_dim)
        for n in a.tokens:
            rng = np.random.default_rng(n)
            num_blocks = 2 * n // a.block_size + 8
            shape = (n, a.hk, a.head_dim)
            k = jnp.asarray(rng.standard_normal(shape) * rng.uniform(0.1, 8, (n, a.hk, 1)), jnp.bfloat16)
            v = jnp.asarray(rng.standard_normal(shape) * 2 + rng.uniform(-1, 1, (n, a.hk, 1)), jnp.bfloat16)
            slots = jnp.asarray(store_slots(rng, n, num_blocks, a.block_size, a.slots))

            def fresh(cfg=cfg, num_blocks=num_blocks):
                return tqjax.PagedKVCache.allocate(cfg, num_blocks, a.block_size, a.hk)

            ref = jax.jit(reference.store_reference)(fresh(), k, v, slots)
            ref = {x: np.asarray(y) for x, y in ref.arrays().items()}
            nbytes = n * a.hk * (4 * a.head_dim + cfg.slot_bytes)
            chosen = {}
            for label, (fn, module) in kernels(slots, v, others, a.launches, triton_others, a.arithmetic).items():
                if a.kernels and not any(label.startswith(k) for k in a.kernels.split(",")):
                    continue
                if module is not None and (module.unsupported(cfg) is not None or not module.on_hopper()):
                    rows.append((name, n, label, float("nan"), float("nan"),
                                 module.unsupported(cfg) or "needs a Hopper GPU"))
                    continue
                got = {x: np.asarray(y) for x, y in jax.jit(fn)(fresh(), k).arrays().items()}
                chosen[label] = (looped_store(fn, LOOP), [fresh()], differences(got, ref))
            steps = {label: functools.partial(_step, loop, state, k) for label, (loop, state, _) in chosen.items()}
            times = in_turns(steps, a.repeats, lambda fn: time_fn(fn, [()], iters=5, reps=5) / LOOP)
            for label, (_, _, diff) in chosen.items():
                t = statistics.median(times[label])
                rows.append((name, n, label, t * 1e6, nbytes / t, diff))
                print("RESULT", rows[-1], [round(x * 1e6, 1) for x in times[label]], flush=True)
    print(f"\n== store kernels: {dev}, copy bandwidth {bw / 1e9:.0f} GB/s, Hk={a.hk} D={a.head_dim} "
          f"block {a.block_size}, {a.slots} slots; "
          f"per store in a jitted loop of {LOOP}")
    width = max([7] + [len(r[2]) for r in rows])
    print(f"{'preset':22s} {'N':>6s} {'kernel':{width}s} {'time us':>8s} {'GB/s':>6s} {'of bw':>6s}  "
          "vs store_reference")
    for name, n, label, us, rate, diff in rows:
        print(f"{name:22s} {n:6d} {label:{width}s} {us:8.1f} {rate / 1e9:6.0f} {rate / bw:6.1%}  {diff}")


if __name__ == "__main__":
    main()
