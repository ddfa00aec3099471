"""The main job: decode (and store) throughput of every TurboQuant preset against JAX's peers.

    python -m experiments.decode_sweep [--presets ...] [--batch 1 8 32] [--context 4096 16384] [--out results]
                                       [--no-peers] [--no-xla] [--no-store] [--no-decode] [--spare-pages 8]

For each preset x batch x context it stores random K/V into a paged cache (the batch's pages and ``--spare-pages``
more, never read: a serving cache's page count is rarely a power of two, and the Mosaic decode's registers have
moved with it, docs/PERFORMANCE.md, "The decode's registers move with the cache's page count"; 0 gives the earlier
sweeps' caches of exactly B x context / block pages), then times the paged decode
(``tqjax.pallas.decode.paged_decode``'s default kernel: the Mosaic GPU one on Hopper where it reads the
cache, with the Triton kernel as a ``triton_<preset>`` row beside it; the Triton kernel elsewhere;
median of device-synchronised repetitions, warmed up, rotating several query sets), counts the bytes
the kernel must read (the compressed cache of the batch's tokens), and reports GB/s and the fraction of
the device's copy bandwidth measured in the same run, plus the output error against float32 attention
on the unquantized K/V. Peers at the same shapes: JAX's Pallas GPU ``paged_attention`` over bf16 pages
and over int8 pages with per-token scales, tqjax's XLA reference decode over the same quantized cache,
cuDNN dense attention (``jax.nn.dot_product_attention(implementation="cudnn")``) over a contiguous
bf16 cache, and tqjax's own FLASH backend (:mod:`tqjax.pallas.flash_decode`) over the same bf16 pages,
fp32-accurate by default and with bf16-rounded query/probabilities like JAX's op. The store kernel is
timed for decode-sized and prefill-sized N, per jitted call and, as "in-jit", 16 stores inside one
jitted loop per store (the GPU's time without the host's per-call dispatch, which bounds small N;
the key passes an optimization barrier with the cache each step, so its encoding is not hoisted out of the
loop: ``experiments.timing.looped_store``). With ``--in-jit S`` every decode system (the presets and the peers, not
the XLA path) is also timed as S steps inside one jitted loop (``experiments.timing.looped_decode``): a step's time
inside a serving step's jitted function, where no call is dispatched from the host and XLA can run the steps as
CUDA graphs; the report then has an "in-jit us" column and a second speed-up table from it.

On a machine without a GPU it runs a small configuration of the XLA reference path (the Pallas kernels
run only in interpret mode there: checked for correctness once, not timed) and says that its timings
are not GPU timings. Results: a table on stdout; under ``--out`` ``decode.csv`` (the decode rows), ``store.csv``
(the store rows), ``decode.json`` (both, with the device, versions and arguments) and ``decode.png``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import tqjax
from experiments.timing import (
    copy_bandwidth,
    copy_fns,
    device_description,
    in_turns,
    launch_floor,
    looped_decode,
    looped_store,
    time_fn,
)
from tqjax.config import NativeConfig
from tqjax.layout import NativePagedKVCache
from tqjax.pallas.decode import choose_implementation, paged_decode
from tqjax.reference import paged_decode_jit, store_jit

ON_GPU = jax.default_backend() == "gpu"
STORE_LOOP = 16


@dataclasses.dataclass
class Row:
    system: str
    batch: int
    context: int
    time_us: float
    bytes_read: int
    gbps: float
    bw_frac: float
    rel_err: float | None
    in_jit_us: float | None = None  # a step of --in-jit steps in one jitted loop (None: not timed so)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=None, help="kv-cache dtypes (default: all on GPU, 3 on CPU)")
    p.add_argument("--batch", nargs="+", type=int, default=None)
    p.add_argument("--context", nargs="+", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=1 << 20, help="skip batch x context above this")
    p.add_argument("--hq", type=int, default=32 if ON_GPU else 8)
    p.add_argument("--hk", type=int, default=8 if ON_GPU else 2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--spare-pages", type=int, default=8,
                   help="pages of the decode's caches beyond the batch's (0: B x context / block_size, a power of two "
                        "at the default shapes)")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--no-xla", action="store_true",
                   help="GPU: skip the XLA reference path over the quantized cache (the slowest row to time)")
    p.add_argument("--no-store", action="store_true")
    p.add_argument("--no-decode", action="store_true", help="only time the store kernel")
    p.add_argument("--in-jit", type=int, default=0, metavar="STEPS",
                   help="also time each decode system as a step of STEPS in one jitted loop (0: not)")
    p.add_argument("--out", default="results/decode_sweep")
    a = p.parse_args(argv)
    if a.in_jit < 0:
        p.error(f"--in-jit: a number of steps >= 0, got {a.in_jit}")
    if a.presets is None:
        a.presets = list(tqjax.PRESETS) if ON_GPU else ["turboquant_4bit_nc", "turboquant_k8v4", "turboquant_kqjl4v4"]
    if a.batch is None:
        a.batch = [1, 8, 32, 128] if ON_GPU else [1, 4]
    if a.context is None:
        a.context = [1024, 4096, 16384, 65536, 131072] if ON_GPU else [256, 1024]
    return a


def random_kv(rng, tokens, hk, d):
    # keys with per-token scale spread (real keys are not unit vectors); values standard normal
    k = rng.standard_normal((tokens, hk, d), np.float32) * rng.uniform(0.5, 2.0, (tokens, hk, 1)).astype(np.float32)
    v = rng.standard_normal((tokens, hk, d), np.float32)
    return jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)


def fill_cache(cfg, k, v, block_size, hk, spare_pages=0):
    """A cache of ``tokens / block_size + spare_pages`` pages holding ``k``/``v`` [tokens, Hk, D] in slots
    0..tokens-1 (stored in chunks; the spare pages stay zero)."""
    tokens = k.shape[0]
    cache = tqjax.PagedKVCache.allocate(cfg, tokens // block_size + spare_pages, block_size, hk)
    store = store_fn()
    for s in range(0, tokens, 65536):
        e = min(tokens, s + 65536)
        cache = store(cache, k[s:e], v[s:e], jnp.arange(s, e, dtype=jnp.int32))
    return cache


def store_fn():
    """The jitted, donating store (no eager input checks, which read slot_mapping back to the host): on a GPU the
    Pallas store with its default kernel (:func:`tqjax.pallas.store.choose_implementation`: the Mosaic GPU one on
    Hopper where it takes the preset, else Triton's)."""
    if ON_GPU:
        from tqjax.pallas.store import store as pallas_store

        return jax.jit(pallas_store, donate_argnums=0)
    return store_jit


def decode_fn():
    if ON_GPU:
        return paged_decode
    return paged_decode_jit


def dense_attention(q, k, v, batch, context):
    """float32 attention on the unquantized K/V: q [B, Hq, D], k/v [B*ctx, Hk, D] (contiguous sequences)."""
    b, hq, d = q.shape
    hk = k.shape[1]
    kk = k.astype(jnp.float32).reshape(batch, context, hk, d)
    vv = v.astype(jnp.float32).reshape(batch, context, hk, d)
    qq = q.astype(jnp.float32).reshape(b, hk, hq // hk, d)
    s = jnp.einsum("bhgd,bthd->bhgt", qq, kk, precision=jax.lax.Precision.HIGHEST) / math.sqrt(d)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhgt,bthd->bhgd", p, vv, precision=jax.lax.Precision.HIGHEST).reshape(b, hq, d)


def rel_err(out, ref):
    out = out.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def time_system(fn, args, q_sets, in_jit: int, *, iters: int, reps: int):
    """``fn(query, *args)`` jitted with the arrays ``args`` as arguments -> (seconds a call, rotating ``q_sets``;
    seconds a step of ``in_jit`` steps in one jitted loop, or None where ``in_jit`` is 0; the output for
    ``q_sets[0]``)."""
    jf = jax.jit(fn)
    t = time_fn(lambda q: jf(q, *args), [(q,) for q in q_sets], iters=iters, reps=reps)
    t_loop = None
    if in_jit:
        queries = jnp.stack([q_sets[i % len(q_sets)] for i in range(in_jit)])
        t_loop = time_fn(looped_decode(fn, in_jit), [(queries, *args)], iters=max(1, iters // 4), reps=reps) / in_jit
    return t, t_loop, jf(q_sets[0], *args)


def peer_systems(q_sets, k, v, tables, lens, batch, context, block_size):
    """(name, fn(q, *args) -> out, args, bytes read) for JAX's own decode paths at the same shapes (GPU only): the
    arrays in ``args`` (pages, tables, lengths) go to the jitted ``fn`` as arguments."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    tokens, hk, d = k.shape
    pages = tokens // block_size
    # pages in the same (permuted) order as tqjax's cache: sequence token t of batch b sits in slot
    # tables[b, t // bs] * bs + t % bs, and slot s holds token s of the flat K/V.
    kp = k.reshape(pages, block_size, hk, d).transpose(2, 0, 1, 3)
    vp = v.reshape(pages, block_size, hk, d).transpose(2, 0, 1, 3)
    ppseq = tables.shape[1]
    k_splits = max(s for s in (1, 2, 4, 8, 16) if ppseq % s == 0)
    ppcb = max(1, min(8, ppseq // k_splits))
    kw = {"k_splits": k_splits, "pages_per_compute_block": ppcb}

    def int8_pages(x):
        amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
        sc = jnp.maximum(amax, 1e-6) / 127.0
        return jnp.round(x.astype(jnp.float32) / sc[..., None]).astype(jnp.int8), sc

    k8, ks = int8_pages(kp)
    v8, vs = int8_pages(vp)
    # JAX's paged_attention applies no softmax scale: the peers get the query pre-scaled by 1/sqrt(D)
    scale = 1.0 / math.sqrt(d)
    def pa(q, *args):
        return paged_attention(q * scale, *args, **kw)

    bf16_bytes = batch * context * hk * d * 2 * 2
    int8_bytes = batch * context * hk * (d + 4) * 2
    systems = [("jax_paged_bf16", pa, (kp, vp, tables, lens), bf16_bytes),
               ("jax_paged_int8", pa, (k8, v8, tables, lens, ks, vs), int8_bytes)]
    # cuDNN dense over a contiguous bf16 cache: [B, S, Hk, D] per sequence in token order
    order = (tables[:, :, None] * block_size + jnp.arange(block_size)[None, None, :]).reshape(batch, context)
    kc = k[order]
    vc = v[order]
    def dense(q, kc, vc):
        return jax.nn.dot_product_attention(q[:, None], kc, vc, implementation="cudnn")[:, 0]

    systems.append(("cudnn_dense_bf16", dense, (kc, vc), bf16_bytes))
    # tqjax's own FLASH backend (Pallas split-KV decode over the same bf16 pages, fp32-accurate hi/lo
    # products by default; split_dots=False rounds the query/probabilities to bf16 like JAX's op)
    from tqjax.pallas.flash_decode import paged_decode as flash_decode

    native = NativePagedKVCache(key=kp, value=vp, config=NativeConfig.from_cache_dtype("auto", d))
    for name, split in (("tqjax_flash_bf16", True), ("tqjax_flash_bf16_rounded", False)):
        systems.append((name, functools.partial(flash_decode, split_dots=split), (native, tables, lens), bf16_bytes))
    return systems


def _xla_flags_note() -> str:
    """", XLA_FLAGS=..." where the environment sets them (a CUDA graph for every call, docs/PERFORMANCE.md), else ""."""
    return f", XLA_FLAGS={os.environ['XLA_FLAGS']}" if os.environ.get("XLA_FLAGS") else ""


def main(argv=None) -> None:
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(0)
    dev = device_description()
    print(f"tqjax decode sweep on {dev}{_xla_flags_note()}")
    if not ON_GPU:
        print("NOTE: no GPU here: timing the XLA reference path on the CPU (the Pallas kernels run only in "
              "interpret mode, checked once for correctness). These are NOT GPU timings.")
    bw = copy_bandwidth(1 << 30 if ON_GPU else 1 << 27)
    print(f"measured copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)")
    floor = launch_floor()
    print(f"launch floor: {floor * 1e6:.1f} us per jitted call of one empty Pallas kernel")
    rows: list[Row] = []
    configs = [(b, c) for b in a.batch for c in a.context if b * c <= a.max_tokens and c % a.block_size == 0]
    if a.no_decode:
        configs = []
    total = len(configs) * (len(a.presets) + (0 if a.no_peers or not ON_GPU else 5))
    done = 0
    decode = decode_fn()
    t_start = time.time()
    for batch, context in configs:
        tokens = batch * context
        k, v = random_kv(rng, tokens, a.hk, a.head_dim)
        mb = context // a.block_size
        perm = rng.permutation(tokens // a.block_size).astype(np.int32)
        tables = jnp.asarray(perm.reshape(batch, mb))
        lens = jnp.full((batch,), context, jnp.int32)
        q_sets = [jnp.asarray(rng.standard_normal((batch, a.hq, a.head_dim)), jnp.bfloat16) for _ in range(3)]
        # reference output on the unquantized K/V, for up to 4 sequences (memory)
        nb_err = min(batch, 4)
        order = (tables[:nb_err, :, None] * a.block_size + jnp.arange(a.block_size)).reshape(nb_err, context)
        ref = dense_attention(q_sets[0][:nb_err], k[order.reshape(-1)], v[order.reshape(-1)], nb_err, context)
        for name in a.presets:
            cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, a.head_dim)
            cache = fill_cache(cfg, k, v, a.block_size, a.hk, a.spare_pages)
            nbytes = tokens * a.hk * cfg.slot_bytes
            args = (cache, tables, lens)
            t, t_loop, out = time_system(decode, args, q_sets, a.in_jit, iters=20 if ON_GPU else 3,
                                         reps=5 if ON_GPU else 3)
            rows.append(make_row(name, batch, context, t, t_loop, nbytes, bw, rel_err(out[:nb_err], ref)))
            if ON_GPU and choose_implementation(cache, a.hq // a.hk) != "triton":  # the Triton kernel too
                tt, tt_loop, out = time_system(functools.partial(paged_decode, implementation="triton"), args, q_sets,
                                               a.in_jit, iters=20, reps=5)
                rows.append(make_row(f"triton_{name}", batch, context, tt, tt_loop, nbytes, bw,
                                     rel_err(out[:nb_err], ref)))
            if ON_GPU and not a.no_xla:  # the XLA path over the same quantized cache, as a peer (per call only)
                g = functools.partial(paged_decode_jit, cache=cache, block_tables=tables, seq_lens=lens)
                tg = time_fn(g, [(q,) for q in q_sets], iters=5, reps=3)
                rows.append(make_row(f"xla_{name}", batch, context, tg, None, nbytes, bw, None))
                _progress(done, total, t_start, rows[-1])
            elif not ON_GPU and batch == a.batch[0] and context == a.context[0]:
                kern = paged_decode(q_sets[0], cache, tables, lens, interpret=True)
                ref_q = paged_decode_jit(q_sets[0], cache, tables, lens)
                diff = float(jnp.max(jnp.abs(kern.astype(jnp.float32) - ref_q.astype(jnp.float32))))
                print(f"  interpret-mode Pallas kernel vs reference ({name}): max |diff| = {diff:.2e}")
            del cache
            done += 1
            _progress(done, total, t_start, rows[-1] if not ON_GPU else next(r for r in rows[::-1] if r.system == name))
            write_csv(a, rows)
        if ON_GPU and not a.no_peers:
            for pname, pf, pargs, pbytes in peer_systems(q_sets, k, v, tables, lens, batch, context, a.block_size):
                try:
                    t, t_loop, out = time_system(pf, pargs, q_sets, a.in_jit, iters=20, reps=5)
                    rows.append(make_row(pname, batch, context, t, t_loop, pbytes, bw, rel_err(out[:nb_err], ref)))
                except Exception as e:  # noqa: BLE001 - a peer that does not run here is reported, not fatal
                    print(f"  {pname} failed at B={batch} ctx={context}: {type(e).__name__}: {str(e)[:120]}")
                done += 1
                _progress(done, total, t_start, rows[-1])
                write_csv(a, rows)
    store_rows = [] if a.no_store else sweep_store(a, rng, bw)
    report(a, rows, store_rows, dev, bw, floor)


def sweep_store(a, rng, bw):
    """Store kernel: tokens/s and GB/s (bf16 K/V read + compressed slots written) for several N."""
    out = []
    store = store_fn()
    for name in a.presets:
        cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, a.head_dim)
        for n in ([32, 128, 4096, 16384] if ON_GPU else [16, 256]):
            k, v = random_kv(rng, n, a.hk, a.head_dim)
            nblocks = max(2 * n // a.block_size, 4)
            slots = jnp.asarray(rng.permutation(nblocks * a.block_size)[:n].astype(np.int32))
            cache = [tqjax.PagedKVCache.allocate(cfg, nblocks, a.block_size, a.hk)]

            def step(k=k, v=v, slots=slots, cache=cache):
                cache[0] = store(cache[0], k, v, slots)  # donated: updated in place
                return cache[0].key_codes

            # the same store STORE_LOOP times in one jitted loop: the GPU's time without per-call dispatch
            looped = looped_store(lambda c, key, v=v, slots=slots: store(c, key, v, slots), STORE_LOOP)

            def loop_step(cache=cache, looped=looped, k=k):
                cache[0] = looped(cache[0], k)
                return cache[0].key_codes

            nbytes = n * a.hk * (a.head_dim * 2 * 2 + cfg.slot_bytes)
            # a copy of the same bytes, timed the same two ways and in turns with the store (at a few MB both move by
            # 20-50% between runs): what any kernel moving these bytes costs at this size
            copy_call, copy_loop, copy_args = copy_fns(nbytes, STORE_LOOP)
            iters, loop_iters = (20, 5) if ON_GPU else (3, 1)
            times = in_turns({
                "store": lambda step=step: time_fn(step, [()], iters=iters, reps=1),
                "store_loop": lambda f=loop_step: time_fn(f, [()], iters=loop_iters, reps=1) / STORE_LOOP,
                "copy": lambda f=copy_call, xs=copy_args: time_fn(f, xs, iters=iters, reps=1),
                "copy_loop": lambda f=copy_loop, xs=copy_args: time_fn(f, xs, iters=loop_iters, reps=1) / STORE_LOOP,
            }, 5 if ON_GPU else 1, lambda f: f())
            t, t_loop, c, c_loop = (statistics.median(times[k]) for k in ("store", "store_loop", "copy", "copy_loop"))
            out.append({"preset": name, "tokens": n, "time_us": t * 1e6, "tokens_per_s": n / t,
                        "gbps": nbytes / t / 1e9, "bw_frac": nbytes / t / bw, "in_jit_time_us": t_loop * 1e6,
                        "in_jit_bw_frac": nbytes / t_loop / bw, "copy_time_us": c * 1e6,
                        "copy_in_jit_time_us": c_loop * 1e6})
    return out


def make_row(system, batch, context, t, t_loop, nbytes, bw, err) -> Row:
    """A decode row from seconds a call ``t`` and a step in a jitted loop ``t_loop`` (None: not timed so)."""
    return Row(system, batch, context, t * 1e6, nbytes, nbytes / t / 1e9, nbytes / t / bw, err,
               None if t_loop is None else t_loop * 1e6)


def _progress(done, total, t0, row):
    print(f"[{done:3d}/{total}] {time.time() - t0:6.0f}s  {row.system:24s} B={row.batch:<4d} ctx={row.context:<7d} "
          f"{row.time_us:9.1f} us {row.gbps:7.0f} GB/s ({row.bw_frac:4.0%})"
          + ("" if row.in_jit_us is None else f", in-jit {row.in_jit_us:9.1f} us"), flush=True)


def write_csv(a, rows, name: str = "decode.csv", fields=tuple(Row.__dataclass_fields__)):
    """``rows`` (dicts, or :class:`Row`s) as ``a.out/name``; the decode rows after every measurement, so an
    interrupted sweep keeps what it measured."""
    with open(os.path.join(a.out, name), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        w.writerows(r if isinstance(r, dict) else dataclasses.asdict(r) for r in rows)


def report(a, rows, store_rows, dev, bw, floor):
    write_csv(a, rows)
    meta = {"device": dev, "jax": jax.__version__, "copy_bandwidth_gbps": bw / 1e9, "launch_floor_us": floor * 1e6,
            "argv": sys.argv[1:], "hq": a.hq, "hk": a.hk, "head_dim": a.head_dim, "block_size": a.block_size,
            "spare_pages": a.spare_pages, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    with open(os.path.join(a.out, "decode.json"), "w") as f:
        json.dump({"meta": meta, "decode": [dataclasses.asdict(r) for r in rows], "store": store_rows}, f, indent=1)
    print(f"\n== decode: {dev}{_xla_flags_note()}, copy bandwidth {bw / 1e9:.0f} GB/s, Hq={a.hq} Hk={a.hk} "
          f"D={a.head_dim} "
          f"block={a.block_size}, {a.spare_pages} spare pages a cache, launch floor {floor * 1e6:.1f} us"
          + ("" if ON_GPU else "  [CPU: not GPU timings]"))
    looped = any(r.in_jit_us is not None for r in rows)
    print(f"{'system':26s} {'B':>4s} {'ctx':>7s} {'time us':>10s} {'GB/s':>7s} {'of bw':>6s} {'rel err':>8s} "
          f"{'x floor':>8s}" + (f" {'in-jit us':>10s} {'of bw':>6s}" if looped else ""))
    for r in rows:
        e = "" if r.rel_err is None else f"{r.rel_err:.3f}"
        loop = ""
        if looped:
            loop = (f" {'':>10s} {'':>6s}" if r.in_jit_us is None
                    else f" {r.in_jit_us:10.1f} {r.bytes_read / (r.in_jit_us * 1e-6) / bw:6.0%}")
        print(f"{r.system:26s} {r.batch:4d} {r.context:7d} {r.time_us:10.1f} {r.gbps:7.0f} {r.bw_frac:6.0%} {e:>8s} "
              f"{r.time_us / (floor * 1e6):8.1f}" + loop)
    for field, what in (("time_us", "a jitted call each"), ("in_jit_us", f"a step of {a.in_jit} in one jitted loop")):
        speedups = speedup_table(rows, field)
        if speedups:
            print(f"\n== speed-up of each preset over each peer (same B, ctx; {what})")
            for line in speedups:
                print(line)
    if store_rows:
        write_csv(a, store_rows, "store.csv", store_rows[0])
        print("\n== store kernel" + ("" if ON_GPU else " (XLA reference path on CPU)"))
        print("(copy: x -> x * 1.000001 over the store's bytes, read + written, timed the same way; x copy: the store's"
              " time over the copy's)")
        print(f"{'preset':24s} {'N':>6s} {'time us':>9s} {'Mtok/s':>8s} {'GB/s':>6s} {'of bw':>6s} "
              f"{'in-jit us':>10s} {'of bw':>6s} {'copy us':>8s} {'x copy':>6s} {'in-jit copy':>11s} {'x copy':>6s}")
        for s in store_rows:
            print(f"{s['preset']:24s} {s['tokens']:6d} {s['time_us']:9.1f} {s['tokens_per_s'] / 1e6:8.2f} "
                  f"{s['gbps']:6.0f} {s['bw_frac']:6.0%} {s['in_jit_time_us']:10.1f} {s['in_jit_bw_frac']:6.0%} "
                  f"{s['copy_time_us']:8.1f} {s['time_us'] / s['copy_time_us']:6.2f} "
                  f"{s['copy_in_jit_time_us']:11.1f} {s['in_jit_time_us'] / s['copy_in_jit_time_us']:6.2f}")
    plot(a, rows, dev)
    print(f"\nresults: {a.out}/decode.csv" + (", store.csv" if store_rows else "") + ", decode.json"
          + (", decode.png" if rows else ""))


def speedup_table(rows, field: str = "time_us"):
    """Lines of each preset's speed-up over each peer at its (B, ctx), from the rows' ``field`` (time_us: a call;
    in_jit_us: a step in a jitted loop; rows without it are left out)."""
    rows = [r for r in rows if getattr(r, field) is not None]
    by_key = {(r.system, r.batch, r.context): r for r in rows}
    peers = sorted({r.system for r in rows if not r.system.startswith("turboquant")})
    lines = []
    for r in rows:
        if not r.system.startswith("turboquant"):
            continue
        parts = []
        for p in peers:
            if p.startswith(("xla_", "triton_")) and p.split("_", 1)[1] != r.system:
                continue
            other = by_key.get((p, r.batch, r.context))
            if other:
                parts.append(f"{p.replace('_' + r.system, '')}: {getattr(other, field) / getattr(r, field):5.2f}x")
        if parts:
            lines.append(f"{r.system:24s} B={r.batch:<4d} ctx={r.context:<7d} " + "  ".join(parts))
    return lines


def plot(a, rows, dev):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    batches = sorted({r.batch for r in rows})
    if not batches:
        return
    fig, axes = plt.subplots(2, len(batches), figsize=(4 * len(batches), 7), squeeze=False)
    for j, b in enumerate(batches):
        for system in sorted({r.system for r in rows}):
            pts = sorted((r.context, r.time_us, r.bw_frac) for r in rows if r.system == system and r.batch == b)
            if not pts:
                continue
            ctx, t, frac = zip(*pts)
            style = "-" if system.startswith("turboquant") else "--"
            axes[0][j].plot(ctx, t, style, marker="o", label=system)
            axes[1][j].plot(ctx, frac, style, marker="o", label=system)
        axes[0][j].set(title=f"B={b}", xscale="log", yscale="log", ylabel="time (us)")
        axes[1][j].set(xscale="log", xlabel="context", ylabel="fraction of copy bandwidth")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(f"tqjax decode sweep: {dev}")
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "decode.png"), dpi=110)


if __name__ == "__main__":
    main()
