"""A/B timing of the Pallas store's kernels (``tqjax.pallas.store``: Triton; ``tqjax.pallas.store_mgpu``: Mosaic GPU)
on the same inputs, with their differences from the reference store.

    python -m experiments.store_compare [--presets turboquant_4bit_nc ...] [--tokens 4096 16384] [--once]

For each preset and N (Hk=8, D=128, block 16, random distinct slots, bf16 keys and values): each kernel stores
into a fresh cache once, and its arrays are compared with ``tqjax.reference.store_reference`` jitted on the same
device (the count of differing entries per array; for the fp16 key norms also the largest difference in ulps),
then it is timed as ``decode_sweep`` times a store inside a jitted loop (``experiments.timing.looped_store``, 16
stores a call, per store). Bytes: bf16 K and V read plus the compressed slots written; "of bw" against the copy
bandwidth measured in the same run. The Mosaic kernel runs on Hopper GPUs only (elsewhere its rows say why not).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import tqjax
from experiments import store_probe
from experiments.timing import copy_bandwidth, device_description, looped_store, time_fn
from tqjax import reference
from tqjax.pallas import store as pallas_store
from tqjax.pallas import store_mgpu

LOOP = 16


def kernels(slots, value) -> dict:
    """name -> ``(cache, key) -> cache`` (the value and slots fixed)."""
    return {
        "triton": lambda c, key: pallas_store.store_jit(c, key, value, slots,
                                                        arithmetic=pallas_store.store_arithmetic(False)),
        "mosaic": lambda c, key: store_mgpu.store_mgpu_jit(c, key, value, slots),
    }


def differences(got: dict, ref: dict) -> dict:
    out = {name: int(np.count_nonzero(got[name] != ref[name])) for name in ref}
    if out.get("key_scales"):
        ulps = np.abs(got["key_scales"].view(np.int16).astype(np.int32)
                      - ref["key_scales"].view(np.int16).astype(np.int32))
        out["key_scales_max_ulps"] = int(ulps.max())
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=[  # those the Mosaic store takes
        name for name in tqjax.PRESETS if store_mgpu.unsupported(tqjax.TurboQuantConfig.from_cache_dtype(name, 128))
        is None])
    p.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384])
    p.add_argument("--hk", type=int, default=8)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--once", action="store_true",
                   help="store the first --tokens count with the Mosaic kernel twice per preset and exit (for a "
                        "profiler: ncu -k regex:tq_store_mgpu --launch-skip 1 -c 1 ...)")
    a = p.parse_args(argv)
    if jax.default_backend() != "gpu":
        raise SystemExit("store_compare times compiled kernels: it needs a GPU")
    if a.once:  # store_probe's profiling run, through the Mosaic kernel
        store_probe.once(argparse.Namespace(**vars(a), head_dim=128), store=store_mgpu.store_mgpu)
        return
    dev = device_description()
    print(dev, flush=True)
    bw = copy_bandwidth()
    rows = []
    for name in a.presets:
        cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, 128)
        why = store_mgpu.unsupported(cfg)
        for n in a.tokens:
            rng = np.random.default_rng(n)
            num_blocks = 2 * n // a.block_size + 8
            k = jnp.asarray(rng.standard_normal((n, a.hk, 128)) * rng.uniform(0.1, 8, (n, a.hk, 1)), jnp.bfloat16)
            v = jnp.asarray(rng.standard_normal((n, a.hk, 128)) * 2 + rng.uniform(-1, 1, (n, a.hk, 1)), jnp.bfloat16)
            slots = jnp.asarray(rng.permutation(num_blocks * a.block_size)[:n].astype(np.int32))

            def fresh(cfg=cfg, num_blocks=num_blocks):
                return tqjax.PagedKVCache.allocate(cfg, num_blocks, a.block_size, a.hk)

            ref = jax.jit(reference.store_reference)(fresh(), k, v, slots)
            ref = {x: np.asarray(y) for x, y in ref.arrays().items()}
            nbytes = n * a.hk * (4 * 128 + cfg.slot_bytes)
            for label, fn in kernels(slots, v).items():
                if label == "mosaic" and (why is not None or not store_mgpu.on_hopper()):
                    rows.append((name, n, label, float("nan"), float("nan"), why or "needs a Hopper GPU"))
                    continue
                got = {x: np.asarray(y) for x, y in jax.jit(fn)(fresh(), k).arrays().items()}
                loop = looped_store(fn, LOOP)
                state = [fresh()]

                def step(state=state, loop=loop, k=k):
                    state[0] = loop(state[0], k)
                    return state[0].key_codes

                t = time_fn(step, [()], iters=5, reps=5) / LOOP
                rows.append((name, n, label, t * 1e6, nbytes / t, differences(got, ref)))
                print("RESULT", rows[-1], flush=True)
    print(f"\n== store kernels: {dev}, copy bandwidth {bw / 1e9:.0f} GB/s, Hk={a.hk} D=128 block {a.block_size}; "
          f"per store in a jitted loop of {LOOP}")
    print(f"{'preset':22s} {'N':>6s} {'kernel':7s} {'time us':>8s} {'GB/s':>6s} {'of bw':>6s}  vs store_reference")
    for name, n, label, us, rate, diff in rows:
        print(f"{name:22s} {n:6d} {label:7s} {us:8.1f} {rate / 1e9:6.0f} {rate / bw:6.1%}  {diff}")


if __name__ == "__main__":
    main()
