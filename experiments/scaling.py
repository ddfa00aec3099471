"""Multi-device decode scaling: throughput from 1 to N devices at a fixed per-device load.

    python -m experiments.scaling [--devices 1 2 4 8] [--modes tp dp] [--batch-per-device 8]
                                  [--context 4096] [--preset turboquant_4bit_nc] [--out results/scaling]

Two modes, both through :mod:`tqjax.sharding` (``jax.shard_map``, one single-device decode per device,
no collective):

* ``tp``: tensor parallelism over KV heads, a ``1 x n`` mesh. The batch is ``n * batch_per_device``
  requests; each device decodes all of them with its ``Hk / n`` KV heads (and ``Hq / n`` query heads).
* ``dp``: data parallelism over requests, an ``n x 1`` mesh. Each device owns its own pool of pages and
  decodes its ``batch_per_device`` requests with all heads (block tables hold local block ids).

Either way every device reads ``batch_per_device * context * Hk`` compressed token slots per step, the
load of one device at n = 1, so ideal scaling keeps the step time flat and multiplies the throughput
(tokens/s = requests per step / step time) by n. The efficiency column is tokens/s(n) / (n *
tokens/s(1)) (the baseline is the smallest device count run). Each compiled step is checked to contain no collective,
and its output against the single-device decode (the same backend on one device over the whole cache, global block
ids): ``err vs 1 dev`` is max|difference| / max|out|, and a run fails above one ulp of the output dtype.

The cache is filled by the sharded store with random K/V generated on the devices, in chunks. Timing
is :func:`experiments.timing.time_fn` (warmed up, median of device-synchronised repetitions, rotating
query sets), over a jitted step (no host-side input checks inside the timed loop).

On a machine without a GPU it simulates 8 CPU devices (``--xla_force_host_platform_device_count``,
set before jax starts) and runs a tiny configuration through the reference backend: the simulated
devices share the host's cores, so these timings are NOT GPU timings and say nothing about scaling.
Results: a table on stdout, CSV + JSON under ``--out``.
"""

from __future__ import annotations

import os

# Simulated CPU devices must be requested before jax starts its CPU backend; on a GPU host this only
# adds CPU devices that jax.devices() does not return.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse
import csv
import dataclasses
import json
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import tqjax
from experiments.timing import device_description, time_fn
from tqjax import sharding

ON_GPU = jax.default_backend() == "gpu"
STORE_CHUNK = 65536  # tokens per data shard per store call while filling the cache


@dataclasses.dataclass
class Row:
    """One (mode, device count) measurement."""

    mode: str
    devices: int
    mesh: str
    batch: int
    batch_per_device: int
    context: int
    time_us: float
    tokens_per_s: float
    speedup: float
    efficiency: float
    bytes_per_device: int
    gbps_per_device: float
    err_vs_single_device: float


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", nargs="+", type=int, default=None, help="device counts (default: 1, 2, 4, ... all)")
    p.add_argument("--modes", nargs="+", choices=("tp", "dp"), default=["tp", "dp"])
    p.add_argument("--batch-per-device", type=int, default=8 if ON_GPU else 2)
    p.add_argument("--context", type=int, default=4096 if ON_GPU else 128)
    p.add_argument("--preset", default="turboquant_4bit_nc")
    p.add_argument("--hq", type=int, default=32 if ON_GPU else 16)
    p.add_argument("--hk", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128 if ON_GPU else 64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--backend", default=None, help="per-device backend (default: the registry's choice)")
    p.add_argument("--out", default="results/scaling")
    a = p.parse_args(argv)
    available = jax.device_count()
    if a.devices is None:
        a.devices = [1 << k for k in range(available.bit_length()) if 1 << k <= available]
    if max(a.devices) > available:
        p.error(f"--devices {max(a.devices)} exceeds the {available} available devices")
    if a.context % a.block_size:
        p.error(f"--context ({a.context}) must be a multiple of --block-size ({a.block_size})")
    return a


def fill_cache(
    cfg: tqjax.TurboQuantConfig, a: argparse.Namespace, mesh: Mesh, blocks_per_shard: int, key: jax.Array
) -> tqjax.PagedKVCache:
    """A sharded cache whose every slot holds a stored random bf16 key/value (made on the devices)."""
    cache = sharding.allocate_sharded(cfg, blocks_per_shard, a.block_size, a.hk, mesh)
    data = mesh.shape[sharding.DATA]
    slots_per_shard = blocks_per_shard * a.block_size
    make = jax.jit(
        lambda k, n: jax.random.normal(k, (data * n, a.hk, a.head_dim), jnp.bfloat16),
        static_argnums=1,
        out_shardings=NamedSharding(mesh, P(sharding.DATA, sharding.MODEL, None)),
    )
    for start in range(0, slots_per_shard, STORE_CHUNK):
        n = min(STORE_CHUNK, slots_per_shard - start)
        key, kk, kv = jax.random.split(key, 3)
        slots = jnp.asarray(np.tile(np.arange(start, start + n, dtype=np.int32), data))
        cache = sharding.sharded_store(cache, make(kk, n), make(kv, n), slots, mesh=mesh, backend=a.backend)
    return cache


# The sharded decode runs the single-device kernel on each device's heads and requests; only the split count
# (chosen from the local head count and batch) may differ from the single-device run. That moves the float32
# log-sum-exp merge by a few float32 ulps, which can flip the output's final rounding: one ulp of the output
# dtype at max|out| (bf16: 2**-7 of it), or 1e-5 of max|out| (~100 float32 ulps) for a float32 output. An
# indexing error (a wrong page, head or request) moves the output by O(max|out|).
def sharded_tolerance(dtype) -> float:
    return max(1e-5, float(jnp.finfo(dtype).eps))


def single_device_error(
    out: jax.Array, query: jax.Array, cache: tqjax.PagedKVCache, tables: jax.Array, lens: jax.Array, data: int,
    blocks_per_shard: int, backend: str | None,
) -> float:
    """max|sharded out - single-device out| / max|single-device out|, the latter from :func:`tqjax.paged_decode`
    on device 0 over the whole cache (the data shards' pages concatenated: local block b of shard i is global
    block i * blocks_per_shard + b)."""
    dev0 = jax.devices()[0]
    local_tables = np.asarray(tables)
    rows = local_tables.shape[0] // data
    shard_of_row = np.arange(local_tables.shape[0]) // rows
    global_tables = local_tables + (shard_of_row * blocks_per_shard)[:, None]
    whole = jax.device_put(cache, dev0)
    ref = tqjax.paged_decode(jax.device_put(query, dev0), whole, jax.device_put(jnp.asarray(global_tables), dev0),
                             jax.device_put(lens, dev0), backend=backend)
    ref = np.asarray(ref, np.float32)
    return float(np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max())


def measure(mode: str, n: int, a: argparse.Namespace, rng: np.random.Generator) -> tuple[float, int, float]:
    """(seconds per decode step, requests per step, :func:`single_device_error`) for ``mode`` on ``n`` devices."""
    mesh = sharding.make_mesh(1, n) if mode == "tp" else sharding.make_mesh(n, 1)
    data = mesh.shape[sharding.DATA]
    batch = n * a.batch_per_device
    local_batch = batch // data
    blocks_per_seq = a.context // a.block_size
    blocks_per_shard = local_batch * blocks_per_seq
    cfg = tqjax.TurboQuantConfig.from_cache_dtype(a.preset, a.head_dim)
    cache = fill_cache(cfg, a, mesh, blocks_per_shard, jax.random.key(int(rng.integers(1 << 31))))
    # each data shard's requests get a random permutation of its own (local) blocks
    tables = np.concatenate([rng.permutation(blocks_per_shard).reshape(local_batch, blocks_per_seq) for _ in range(data)])
    # Inputs live where the sharded decode reads them (rows over "data", query heads over "model"), as a
    # server's would: left on one device, every step would first copy them to the others.
    by_rows = NamedSharding(mesh, P(sharding.DATA))
    tables = jax.device_put(jnp.asarray(tables.astype(np.int32)), by_rows)
    lens = jax.device_put(jnp.full((batch,), a.context, jnp.int32), by_rows)
    by_heads = NamedSharding(mesh, P(sharding.DATA, sharding.MODEL, None))
    queries = [jax.device_put(jnp.asarray(rng.standard_normal((batch, a.hq, a.head_dim)), jnp.bfloat16), by_heads)
               for _ in range(3)]

    out = sharding.sharded_paged_decode(queries[0], cache, tables, lens, mesh=mesh, backend=a.backend)  # checked once
    err = single_device_error(out, queries[0], cache, tables, lens, data, blocks_per_shard, a.backend)
    if not err <= sharded_tolerance(out.dtype):  # also catches NaN
        raise RuntimeError(f"{mode} on {n} devices: the sharded decode differs from the single-device decode by "
                           f"{err:.2e} of max|out| (tolerance {sharded_tolerance(out.dtype):.1e})")
    step = jax.jit(lambda q, c, t, s: sharding.sharded_paged_decode(q, c, t, s, mesh=mesh, backend=a.backend))
    found = sharding.collectives_in(step.lower(queries[0], cache, tables, lens).compile().as_text())
    if found:
        raise RuntimeError(f"{mode} on {n} devices: the compiled decode has collectives: {found[:3]}")
    t = time_fn(
        lambda q: step(q, cache, tables, lens), [(q,) for q in queries],
        iters=20 if ON_GPU else 3, reps=5 if ON_GPU else 3,
    )
    return t, batch, err


def main(argv: Sequence[str] | None = None) -> None:
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    dev = device_description()
    print(f"tqjax decode scaling on {jax.device_count()} x {dev}")
    if not ON_GPU:
        print(
            "NOTE: no GPU here: simulated CPU devices sharing the host's cores, reference backend, tiny "
            "shapes. These are NOT GPU timings and do not measure scaling; the run checks that the "
            "sharded path works end to end."
        )
    cfg = tqjax.TurboQuantConfig.from_cache_dtype(a.preset, a.head_dim)
    bytes_per_device = a.batch_per_device * a.context * a.hk * cfg.slot_bytes
    rng = np.random.default_rng(0)
    rows: list[Row] = []
    t0 = time.time()
    for mode in a.modes:
        first = None  # (devices, tokens/s) of the smallest device count measured: the baseline
        for n in sorted(a.devices):
            if mode == "tp" and a.hk % n:
                print(f"skip tp on {n} devices: Hk = {a.hk} is not divisible by {n}")
                continue
            t, batch, err = measure(mode, n, a, rng)
            tps = batch / t
            first = (n, tps) if first is None else first
            mesh = f"1x{n}" if mode == "tp" else f"{n}x1"
            efficiency = (tps / n) / (first[1] / first[0])
            rows.append(
                Row(mode, n, mesh, batch, a.batch_per_device, a.context, t * 1e6, tps, tps / first[1], efficiency,
                    bytes_per_device, bytes_per_device / t / 1e9, err)
            )
            r = rows[-1]
            print(f"[{time.time() - t0:5.0f}s] {mode} n={n} mesh {mesh}: {r.time_us:9.1f} us/step, "
                  f"{r.tokens_per_s:10.0f} tok/s, efficiency {r.efficiency:4.0%}", flush=True)
    report(a, rows, dev)


def report(a: argparse.Namespace, rows: list[Row], dev: str) -> None:
    with open(os.path.join(a.out, "scaling.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(Row.__dataclass_fields__))
        w.writeheader()
        w.writerows(dataclasses.asdict(r) for r in rows)
    meta = {
        "device": dev, "device_count": jax.device_count(), "gpu_timings": ON_GPU, "jax": jax.__version__,
        "argv": sys.argv[1:], "preset": a.preset, "hq": a.hq, "hk": a.hk, "head_dim": a.head_dim,
        "block_size": a.block_size, "backend": a.backend,
    }
    with open(os.path.join(a.out, "scaling.json"), "w") as f:
        json.dump({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    print(f"\n== decode scaling: {dev}, {a.preset}, Hq={a.hq} Hk={a.hk} D={a.head_dim} block={a.block_size}, "
          f"{a.batch_per_device} requests x {a.context} tokens per device" + ("" if ON_GPU else "  [CPU: not GPU timings]"))
    print(f"{'mode':4s} {'n':>3s} {'mesh':>5s} {'batch':>6s} {'us/step':>10s} {'tok/s':>11s} {'speedup':>8s} "
          f"{'eff':>5s} {'GB/s/dev':>9s} {'err vs 1 dev':>12s}")
    for r in rows:
        print(f"{r.mode:4s} {r.devices:3d} {r.mesh:>5s} {r.batch:6d} {r.time_us:10.1f} {r.tokens_per_s:11.0f} "
              f"{r.speedup:7.2f}x {r.efficiency:5.0%} {r.gbps_per_device:9.2f} {r.err_vs_single_device:12.1e}")
    print(f"\nresults: {a.out}/scaling.csv, scaling.json")


if __name__ == "__main__":
    main()
