"""Device experiment: where does the store's time go? (XLA half, kernel half, launch variants)

python -m experiments.store_probe [--presets turboquant_4bit_nc turboquant_k8v4] [--tokens 4096 16384]

For each preset and N (Hk=8, D=128, random distinct slots as in ``decode_sweep``) it times, like the
sweep (``experiments.timing.time_fn``):

* ``full``: the jitted, donating Pallas store (``tqjax.pallas.store.store_jit``), default launch, the
  platform's arithmetic (``store_arithmetic``); on CUDA also ``full portable`` (ROCm's conversions);
* ``full in-jit``: the same store 16 times in one jitted ``fori_loop``, per store: the GPU's time without
  the host's per-call dispatch (which bounds ``full`` at small N); the key passes an
  optimization barrier with the cache each step (``experiments.timing.looped_store``), so XLA cannot
  hoist the key's encoding out of the loop (before, it did for the QJL presets);
* ``xla half``: the XLA ops before the kernel (``_key_features``: norm, rotation, fp16 norms), alone, per
  call and inside a jitted loop (``in-jit``; with a sum of its outputs, timed alone as ``sum of key``);
* ``grid norms in-jit``: for exact Hadamard keys, the XLA ops after the kernel (the fp16 norms from its
  integer statistics, scattered into the cache), in the jitted loop;
* ``tT/wW in-jit``: the full store in the jitted loop with T tokens per program and W warps (``--launches``; per call,
  the host's dispatch of a donating call, 40-70 us on the H200, hides the launches' differences);
* ``reference``: the pure-XLA reference store (``tqjax.reference.store_jit``);
* for QJL keys, their XLA encoding in-jit (``prod exact encoding``: the library's, on integers) beside the float
  path's (``prod float encoding HIGHEST``: a float32 rotation and sketch, the reference before the thirty-eighth
  session but for its matrix; ``sum of key``: the in-jit loop's own cost), and the two compared (codes, signs,
  estimator error);
* with ``--rotation``, for MSE keys, the rotation of the unit keys alone: ``rot f32 HIGHEST`` (what the XLA half runs
  above ``FWHT_MAX_ROWS`` rows), ``rot bf16 +-1`` (the bf16 key times the unnormalised +-1 matrix in one
  bf16 pass, float32 accumulation: exact products) and ``rot fwht``.

``--once`` runs each preset's store twice and exits, for Nsight Compute (docs/PERFORMANCE.md).

Bytes are the sweep's (bf16 K and V read, compressed slots written); "of bw" is against the copy
bandwidth measured in the same run. Prints one table at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import tqjax
from experiments.timing import copy_bandwidth, device_description, looped_store, time_fn
from tqjax import reference
from tqjax.codec import key_codec, take_channels
from tqjax.pallas import store as store_mod
from tqjax.quantizers import ProdCode
from tqjax.rotation import fwht, hadamard_matrix

ON_GPU = jax.default_backend() == "gpu"
LAUNCHES = "64/4,128/8,16/2"  # tokens/warps, beside the default t32/w4 (the ``full`` rows); --launches
STEPS = 16 if ON_GPU else 2


def probe(a, name: str, n: int, rng, bw: float, rows: list, iters: int, reps: int) -> None:
    """Times every piece of one preset's store of ``n`` tokens; appends ``rows``."""
    interpret = not ON_GPU
    cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, a.head_dim)
    k = jnp.asarray(rng.standard_normal((n, a.hk, a.head_dim)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((n, a.hk, a.head_dim)), jnp.bfloat16)
    nblocks = max(2 * n // a.block_size, 4)
    slots = jnp.asarray(rng.permutation(nblocks * a.block_size)[:n].astype(np.int32))
    nbytes = n * a.hk * (a.head_dim * 2 * 2 + cfg.slot_bytes)
    cache = [tqjax.PagedKVCache.allocate(cfg, nblocks, a.block_size, a.hk)]

    def add(what, t):
        rows.append((name, n, what, t * 1e6, nbytes / t / 1e9, nbytes / t / bw))
        r = rows[-1]
        print(f"  {r[0]:22s} N={r[1]:<6d} {r[2]:22s} {r[3]:9.1f} us {r[4]:7.0f} GB/s {r[5]:5.0%}", flush=True)

    def stepper(fn):
        def step():
            cache[0] = fn(cache[0])  # donated: updated in place
            return cache[0].key_codes

        return step

    arithmetic = store_mod.store_arithmetic(interpret)
    full = lambda c, key=k: store_mod.store_jit(c, key, v, slots, interpret=interpret, arithmetic=arithmetic)
    add(f"full ({arithmetic})", time_fn(stepper(full), [()], iters=iters, reps=reps))
    if arithmetic != "portable":
        portable = lambda c, key=k: store_mod.store_jit(c, key, v, slots, interpret=interpret)
        add("full portable", time_fn(stepper(portable), [()], iters=iters, reps=reps))
    # the same store STEPS times inside one jitted loop: the GPU's time, without the host's per-call dispatch
    def in_jit(fn):  # fn(cache, key): the store STEPS times inside one jitted loop, per store
        looped = looped_store(fn, STEPS)
        return time_fn(stepper(lambda c: looped(c, k)), [()], iters=max(2, iters // 4), reps=reps) / STEPS

    def pure_in_jit(fn, x):  # fn(x) STEPS times in one jitted loop, per call, with a sum of its outputs
        # and a copy of x (XLA copies the carried x to change one element): both timed alone as "sum of ..."
        def body(i, x):  # each result's sum feeds one element of the next input, so nothing is hoisted
            total = sum(jnp.sum(y.astype(jnp.float32)) for y in jax.tree.leaves(fn(x)))
            first = (0,) * x.ndim
            return x.at[first].set(jnp.where(total == -1.0, jnp.zeros((), x.dtype), x[first]))

        looped = jax.jit(lambda x: jax.lax.fori_loop(0, STEPS, body, x))
        return time_fn(looped, [(x,)], iters=max(2, iters // 4), reps=reps) / STEPS

    add(f"full in-jit (/{STEPS})", in_jit(full))
    if arithmetic != "portable":
        add(f"portable in-jit (/{STEPS})", in_jit(portable))
    parts = store_mod._plan(cfg, n, store_mod.DEFAULT_BLOCK_TOKENS, store_mod.PLANNING_SHARED_MEMORY)
    xla_half = jax.jit(lambda key: store_mod._key_features(cfg, parts, key))
    add("xla half", time_fn(xla_half, [(k,)], iters=iters, reps=reps))
    add(f"xla half in-jit (/{STEPS})", pure_in_jit(lambda key: store_mod._key_features(cfg, parts, key), k))
    add(f"sum of key in-jit (/{STEPS})", pure_in_jit(lambda key: key, k))  # pure_in_jit's own cost
    if any(part.num_stats for part in parts):  # XLA after the kernel
        columns = []
        for part in parts:  # (||n||**2, field) per part, and for QJL keys (||w_int||**2, field) as well
            columns += [jnp.asarray(rng.integers(1 << 20, 1 << 24, (n, a.hk)), jnp.int32),
                        jnp.full((n, a.hk), 136, jnp.int32)] * (part.num_stats // 2)
        stats = jnp.stack(columns, axis=-1)
        words = jnp.asarray(rng.integers(0, 1 << 32, (n, a.hk, cfg.key_words), dtype=np.uint64).astype(np.uint32))

        def norms(c, key):
            scales = store_mod._kernel_key_scales(c, parts, c.key_scales, stats, words, slots)
            return dataclasses.replace(c, key_scales=scales)

        add(f"kernel norms in-jit (/{STEPS})", in_jit(norms))
    # inside the loop: per call, the host's dispatch hides the launch's effect
    for tokens, warps in (map(int, x.split("/")) for x in a.launches.split(",") if x):
        launch = lambda c, key=k, tokens=tokens, warps=warps: store_mod.store_jit(
            c, key, v, slots, interpret=interpret, block_tokens=tokens, num_warps=warps, arithmetic=arithmetic)
        add(f"t{tokens}/w{warps} in-jit (/{STEPS})", in_jit(launch))
    ref = lambda c: reference.store_jit(c, k, v, slots)
    add("reference", time_fn(stepper(ref), [()], iters=iters, reps=reps))
    if cfg.key_format == "prod":  # the XLA encoding alone: the library's exact one, and the float path's
        prod = key_codec(cfg).prod
        x = k.astype(jnp.float32)
        add(f"prod exact encoding in-jit (/{STEPS})", pure_in_jit(prod.quantize, x))
        add(f"prod float encoding HIGHEST in-jit (/{STEPS})", pure_in_jit(functools.partial(float_encoding, prod), x))
        add(f"sum of key in-jit (/{STEPS})", pure_in_jit(lambda x: x, x))
        compare_with_float_encoding(prod, k[:, 0], rng)
    if cfg.key_format == "mse" and a.rotation:
        codec = key_codec(cfg)
        quantizer, seg = codec.quantizers[0], codec.segments[0]
        rot = quantizer.rotation
        x = take_channels(k, seg)
        highest = jax.jit(lambda x: quantizer.rotate_unit(x)[0])
        add("rot f32 HIGHEST", time_fn(highest, [(x,)], iters=iters, reps=reps))
        if rot.signs is not None:
            pm1 = jnp.asarray(hadamard_matrix(seg.dim) * math.sqrt(seg.dim) * rot.signs, jnp.bfloat16)

            def bf16_pm1(x):
                z = jnp.matmul(x.astype(jnp.bfloat16), pm1.T, preferred_element_type=jnp.float32)
                norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
                return z * (np.float32(1 / math.sqrt(seg.dim)) / jnp.maximum(norm, 1e-30))

            got = jax.jit(bf16_pm1)(x)
            err = float(jnp.max(jnp.abs(got - highest(x))))
            add(f"rot bf16 +-1 (err {err:.1e})", time_fn(jax.jit(bf16_pm1), [(x,)], iters=iters, reps=reps))
            signs = jnp.asarray(rot.signs)
            fw = jax.jit(lambda x: fwht(x.astype(jnp.float32) * signs))
            add("rot fwht", time_fn(fw, [(x,)], iters=iters, reps=reps))


def float_encoding(prod, x: jax.Array) -> ProdCode:
    """The QJL code of ``x`` by the float path at HIGHEST (:meth:`tqjax.TurboQuantProd.float_features`, a float32
    sketch against the same matrix): the paper's definition, which only XLA computes."""
    f = prod.float_features(x, jax.lax.Precision.HIGHEST)
    sketch = jnp.matmul(f.residual, prod.projection.T, precision=jax.lax.Precision.HIGHEST)
    return ProdCode(f.codes, (sketch >= 0).astype(jnp.uint8), f.norm, f.residual_norm)


def compare_with_float_encoding(prod, keys: jax.Array, rng, num_queries: int = 64) -> None:
    """The QJL quantizer's codes (``prod.quantize``, exact on integers) against the float path's
    (:func:`float_encoding`) on ``keys`` [n, D]: the fraction of MSE codes and of sketch signs that differ, and the
    inner-product estimator's RMS error against the exact float64 ``<q, x>`` for ``num_queries`` Gaussian queries,
    with either."""
    new = jax.jit(prod.quantize)(keys)
    old = jax.jit(functools.partial(float_encoding, prod))(keys)
    q = jnp.asarray(rng.standard_normal((num_queries, 1, keys.shape[-1])), jnp.float32)
    exact = np.asarray(q[:, 0], np.float64) @ np.asarray(keys, np.float64).T  # [Q, n]
    est = {name: np.asarray(jax.jit(prod.inner_product)(prod.prepare_query(q), c), np.float64)
           for name, c in (("new", new), ("old", old))}
    rms = {name: float(np.sqrt(np.mean((e - exact) ** 2))) for name, e in est.items()}
    diff = float(np.sqrt(np.mean((est["new"] - est["old"]) ** 2)))
    print(f"  QJL encoding vs the float path's at HIGHEST, {keys.shape[0]} keys: MSE codes differ "
          f"{float(jnp.mean(new.codes != old.codes)):.1e}, sketch signs {float(jnp.mean(new.signs != old.signs)):.1e}; "
          f"estimator RMS error vs exact <q, x> ({num_queries} queries) {rms['new']:.4e} vs {rms['old']:.4e}, "
          f"RMS of their difference {diff:.1e}", flush=True)


def once(a, store=None) -> None:
    """Each preset's store of ``a.tokens[0]`` tokens, twice (compile, then the run to profile): ``store(cache, key,
    value, slots)``, by default the jitted Triton store with this platform's arithmetic."""
    if store is None:
        def store(cache, k, v, slots):
            return store_mod.store_jit(cache, k, v, slots, interpret=not ON_GPU,
                                       arithmetic=store_mod.store_arithmetic(not ON_GPU))
    rng = np.random.default_rng(0)
    n = a.tokens[0]
    for name in a.presets:
        cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, a.head_dim)
        k, v = (jnp.asarray(rng.standard_normal((n, a.hk, a.head_dim)), jnp.bfloat16) for _ in range(2))
        nblocks = max(2 * n // a.block_size, 4)
        slots = jnp.asarray(rng.permutation(nblocks * a.block_size)[:n].astype(np.int32))
        cache = tqjax.PagedKVCache.allocate(cfg, nblocks, a.block_size, a.hk)
        for _ in range(2):
            cache = jax.block_until_ready(store(cache, k, v, slots))
        print(f"{name}: stored {n} tokens twice", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["turboquant_4bit_nc", "turboquant_k8v4"])
    p.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384] if ON_GPU else [64])
    p.add_argument("--hk", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--launches", default=LAUNCHES, help="comma-separated tokens/warps of the Triton store to time "
                   "in the jitted loop (t32/w4 is the default launch)")
    p.add_argument("--rotation", action="store_true",
                   help="also time XLA's float rotations of MSE keys (the store's XLA half before the exact path)")
    p.add_argument("--once", action="store_true",
                   help="run each preset's store of the first --tokens count twice and exit (for a profiler: "
                        "ncu -k regex:tqjax_store -c 1 ...)")
    a = p.parse_args()
    if a.once:
        once(a)
        return
    dev = device_description()
    print(dev, flush=True)
    bw = copy_bandwidth() if ON_GPU else float("nan")
    rng = np.random.default_rng(0)
    iters, reps = (20, 5) if ON_GPU else (2, 1)
    rows = []
    for name in a.presets:
        for n in a.tokens:
            probe(a, name, n, rng, bw, rows, iters, reps)
    print(f"\n== store probe: {dev}, copy bandwidth {bw / 1e9:.0f} GB/s, Hk={a.hk} D={a.head_dim}"
          + ("" if ON_GPU else "  [CPU: interpret mode, not GPU timings]"))
    print(f"{'preset':22s} {'N':>6s} {'what':30s} {'time us':>9s} {'GB/s':>7s} {'of bw':>6s}")
    for r in rows:
        print(f"{r[0]:22s} {r[1]:6d} {r[2]:30s} {r[3]:9.1f} {r[4]:7.0f} {r[5]:6.1%}")


if __name__ == "__main__":
    main()
