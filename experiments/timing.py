"""Device timing helpers shared by the sweeps (see the device METHOD: warm up, median, rotate inputs)."""

from __future__ import annotations

import functools
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def time_fn(fn: Callable, arg_sets: Sequence[tuple], *, iters: int = 20, reps: int = 5, warmup: int = 3) -> float:
    """Median seconds per call of ``fn(*args)``, cycling through ``arg_sets`` (several input sets so
    repeated calls do not just measure the L2 cache). Each rep times ``iters`` back-to-back calls and
    synchronises once, so launch overhead is amortised as in a serving loop."""
    for i in range(warmup):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for i in range(iters):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples)


def store_slots(rng, n: int, num_blocks: int, block_size: int, pattern: str = "random"):
    """``n`` distinct cache slots (int32 numpy) of ``num_blocks`` blocks: ``"random"``, any slots in any order (each
    token's row lands apart from its neighbours': a decode step's pattern, and the worst for a prefill's writes), or
    ``"blocks"``, whole blocks in a random order, the tokens in order inside each (a block allocator's pattern for a
    prefill: a block's rows of one head are contiguous in the cache)."""
    if n > num_blocks * block_size:
        raise ValueError(f"{n} tokens: the cache has {num_blocks * block_size} slots")
    if pattern == "random":
        return rng.permutation(num_blocks * block_size)[:n].astype(np.int32)
    if pattern == "blocks":
        blocks = rng.permutation(num_blocks)[:-(-n // block_size)]
        return (blocks[:, None] * block_size + np.arange(block_size)).reshape(-1)[:n].astype(np.int32)
    raise ValueError(f"slot pattern {pattern!r}: expected 'random' or 'blocks'")


def in_turns(fns: dict, repeats: int, timer: Callable) -> dict:
    """{label: fn} -> {label: [timer(fn), one a turn]}: every fn timed ``repeats`` times, the fns taking turns (the
    lent GPUs' figures move more between calls than within one, and drift within one: compare versions in turns)."""
    times = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            times[label].append(timer(fn))
    return times


def copy_fns(nbytes: int, steps: int) -> tuple[Callable, Callable, list[tuple]]:
    """A copy of ``nbytes`` (bytes read plus bytes written, counted as :func:`copy_bandwidth` counts them: ``x -> x *
    1.000001`` over ``nbytes / 8`` float32 elements) as ``(call, loop, arg_sets)`` for :func:`time_fn`: a jitted call,
    and :func:`looped_copy` of ``steps`` (its time over ``steps`` is a copy's in a jitted loop). A kernel that moves
    ``nbytes`` cannot be expected to beat it: at a few tens of MB the launch and the ramp of a grid are a large part
    of a copy's time too, which the bandwidth of :func:`copy_bandwidth` (gigabytes) leaves out."""
    n = max(nbytes // 8, 1)
    xs = [jax.random.normal(jax.random.key(i), (n,), jnp.float32) for i in range(2)]
    return jax.jit(lambda x: x * 1.000001), looped_copy(steps), [(x,) for x in xs]


def looped_copy(steps: int) -> Callable:
    """``x -> x * 1.000001 ** steps``, jitted, one multiplication a step of a loop: each step's input passes an
    optimization barrier, so XLA neither fuses the steps into one pass nor folds the constants."""

    def body(i, x):
        return jax.lax.optimization_barrier(x) * 1.000001

    return jax.jit(lambda x: jax.lax.fori_loop(0, steps, body, x))


def looped_store(store: Callable, steps: int) -> Callable:
    """``(cache, key) -> cache``, jitted, donating the cache: ``store(cache, key)`` ``steps`` times in one
    loop (a store's GPU time without the host's per-call dispatch). Each step passes the key through an
    optimization barrier together with the cache, so XLA cannot hoist the key's encoding, which depends
    on the key alone, out of the loop (it did, for the QJL presets), and copies nothing for it (changing
    a key element each step instead made XLA copy the whole key every step)."""

    def looped(cache, key):
        def body(i, cache):
            key_i, cache = jax.lax.optimization_barrier((key, cache))
            return store(cache, key_i)

        return jax.lax.fori_loop(0, steps, body, cache)

    return jax.jit(looped, donate_argnums=0)


def looped_decode(decode: Callable, steps: int) -> Callable:
    """``(queries [steps, ...], *args) -> outputs [steps, ...]``, jitted: ``decode(query, *args)`` for each query in
    one ``lax.map``, the arrays (a cache, tables, lengths) traced arguments, not captured constants. Its time over
    ``steps`` is a decode step's GPU time inside a jitted serving step: no host dispatch a call, and XLA runs the
    loop's body as a command buffer (a CUDA graph) where it can. H200, ``4bit_nc``, B=32, 16k (twenty-sixth
    session): 302.4 us a step in such a loop, 313.2 without command buffers, 317.1 per jitted call either way."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")

    def looped(queries, *args):
        if queries.shape[0] != steps:
            raise ValueError(f"queries: {steps} steps' queries expected, got shape {queries.shape}")
        return jax.lax.map(lambda q: decode(q, *args), queries)

    return jax.jit(looped)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device copy bandwidth in bytes/s over an array of ``nbytes``, counting bytes read plus bytes written
    (:func:`copy_fns`' jitted call, ``x -> x * 1.000001``)."""
    call, _, args = copy_fns(2 * nbytes, 1)
    return 2 * nbytes / time_fn(call, args, iters=10, reps=5)


def on_cache(decode: Callable, cache, block_tables: jax.Array, seq_lens: jax.Array, **static) -> Callable:
    """query -> ``decode(query, cache, block_tables, seq_lens, **static)``, jitted with the cache, tables and lengths
    as arguments. Bound into the jitted function (``jax.jit(functools.partial(decode, cache=cache, ...))``) they are
    constants captured in the lowering: a 2.3 GB cache took minutes to compile (twenty-fifth session)."""
    f = jax.jit(functools.partial(decode, **static))
    return lambda query: f(query, cache, block_tables, seq_lens)


def launch_floor() -> float:
    """Seconds per call of a jitted step that launches one empty Pallas kernel (one program, one warp,
    writing 16 floats), timed like the kernels (:func:`time_fn`): the least any Pallas decode step can
    cost on this device with this timing. Interpret mode without a GPU (then not a GPU figure)."""

    def kernel(o_ref):
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

    call = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32), interpret=jax.default_backend() != "gpu",
        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
    )
    f = jax.jit(lambda i: call())
    return time_fn(f, [(i,) for i in range(3)], iters=50, reps=5)


def device_description() -> str:
    dev = jax.devices()[0]
    return f"{getattr(dev, 'device_kind', dev.platform)} ({dev.platform}), jax {jax.__version__}"


def load_versions(paths: str, prefix: str) -> dict:
    """Other versions of a kernel module, to time beside the installed one: comma-separated file ``paths`` ->
    {file name without ``.py``: the module loaded from it (as ``prefix`` + that name)}."""
    out = {}
    for path in filter(None, paths.split(",")):
        name = os.path.basename(path).removesuffix(".py")
        spec = importlib.util.spec_from_file_location(prefix + name, path)
        out[name] = importlib.util.module_from_spec(spec)
        sys.modules[prefix + name] = out[name]  # a dataclass looks its module up there
        spec.loader.exec_module(out[name])
    return out
