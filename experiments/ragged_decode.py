"""The Mosaic GPU decode on ragged batches and block tables wider than the sequences, as a server runs it: the work
cut in pieces by the lengths (``tqjax.pallas.pieces``, the default) against fixed split counts of the table's
width, pieces for other numbers of waves, and optionally other versions of the module.

    python -m experiments.ragged_decode [--presets 4bit_nc 3bit_nc] [--splits 2,16] [--waves 1,4] [--against old.py]
        [--triton] [--cases "16k in a 16k table;128k + 31 x 4k"] [--repeats 3]

``--triton`` adds the Triton decode (the path of ROCm and other CUDA GPUs) with its two cuts, ``cut="width"``
(splits of the table's width, its tuned default) and ``cut="lengths"`` (the pieces).

Cases (Hq=32, Hk=8, D=128, block 16; B=32 unless the label says): 16k tokens each in a 16k-wide table; the same
total in 32k- and 128k-wide tables (a server's tables sized for its longest context); 32 lengths drawn between 1k
and 32k, and between 0.5k and 16k; 32 lengths drawn log-normally around 4k (between 64 and 32k); one sequence of
128k tokens and 31 of 4k; 128 sequences of 16k; 128 sequences of 1k-32k in random order (not sorted: the order of
the last pieces matters there). Each cache holds exactly the batch's pages plus 8, random K/V made
on the device and stored; tables of distinct random pages, entries past a sequence's pages 0. Each kernel is timed
like ``decode_sweep`` (``experiments.timing.time_fn``; with ``--repeats R`` R times, the kernels taking turns,
median reported); "of copy bw" counts the compressed bytes of the batch's tokens against the copy bandwidth of the
same run; "rel diff" is the largest difference from the case's first kernel over its largest output. Hopper GPUs
only.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import tqjax
from experiments.device_check import random_cache
from experiments.timing import (
    copy_bandwidth,
    device_description,
    in_turns,
    load_versions,
    on_cache,
    time_fn,
)
from tqjax.pallas import decode_mgpu, pieces
from tqjax.pallas.decode import paged_decode

B, HQ, HK, D, BS = 32, 32, 8, 128, 16


def cases() -> list[tuple[str, int, np.ndarray]]:
    """(label, table width in tokens, lengths [batch])."""
    ragged = np.sort(np.random.default_rng(1).integers(1024, 32769, B))[::-1]
    tail = np.array([131072] + [4096] * (B - 1))
    rng = np.random.default_rng(7)
    short = np.sort(rng.integers(512, 16385, B))[::-1]
    lognormal = np.sort(np.clip(np.exp(rng.normal(np.log(4096), 1.0, B)).astype(int), 64, 32768))[::-1]
    return [
        ("16k in a 16k table", 16384, np.full(B, 16384)),
        ("16.8k in a 32k table", 32768, np.full(B, int(ragged.mean()))),
        ("1k-32k in a 32k table", 32768, ragged),
        ("0.5k-16k in a 16k table", 16384, short),
        ("lognormal 4k in a 32k table", 32768, lognormal),
        ("7.9k in a 128k table", 131072, np.full(B, int(tail.sum()) // B)),
        ("128k + 31 x 4k", 131072, tail),
        ("B=128, 16k in a 16k table", 16384, np.full(128, 16384)),
        ("B=128, 1k-32k in random order", 32768, np.random.default_rng(11).integers(1024, 32769, 128)),
    ]


def build(name: str, lens: np.ndarray, width: int, seed: int = 0):
    """A cache of exactly the batch's pages plus 8, random K/V (:func:`experiments.device_check.random_cache`);
    block tables [B, width / block] of distinct random pages, 0 past each sequence's pages."""
    cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, D)
    used = [-(-int(n) // BS) for n in lens]
    pages = sum(used) + 8
    cache = random_cache(cfg, pages, BS, HK, seed)
    perm = np.random.default_rng(seed).permutation(pages)
    tables = np.zeros((len(lens), width // BS), np.int32)
    offset = 0
    for b, u in enumerate(used):
        tables[b, :u] = perm[offset:offset + u]
        offset += u
    return cache, jnp.asarray(tables), jnp.asarray(lens.astype(np.int32))


def waves_decode(query, cache, block_tables, seq_lens, *, waves: int):
    """The default pieces cut for ``waves`` waves of resident programs (the default:
    :func:`tqjax.pallas.pieces.decode_waves`)."""
    return decode_mgpu.paged_decode_mgpu_jit(query, cache, block_tables, seq_lens, scale=D**-0.5, softcap=None,
                                             num_splits=None, stages=2, resident=decode_mgpu.resident_programs(
                                                 cache.config, query.shape[1] // cache.num_kv_heads), waves=waves)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["4bit_nc"], help="preset suffixes")
    ap.add_argument("--splits", default="2,16", help="comma-separated fixed split counts timed beside the pieces")
    ap.add_argument("--waves", default="", help="comma-separated waves of pieces timed beside the default "
                    f"(pieces.decode_waves: 1 for short tables, else {pieces.WAVES})")
    ap.add_argument("--triton", action="store_true", help="also the Triton decode, cut by the width and by the lengths")
    ap.add_argument("--against", default="", help="other decode_mgpu.py files (comma-separated), at their defaults")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--cases", default="", help="semicolon-separated case labels to run (default: every case)")
    args = ap.parse_args(argv)

    others = load_versions(args.against, "decode_mgpu_")
    print(device_description(), flush=True)
    bw = copy_bandwidth()
    rows = []
    for preset in args.presets:
        name = f"turboquant_{preset}"
        for label, width, lens_np in cases():
            if args.cases and label not in args.cases.split(";"):
                continue
            cache, tables, lens = build(name, lens_np, width)
            qs = [jax.random.normal(jax.random.key(100 + i), (len(lens_np), HQ, D), jnp.float32) for i in range(3)]
            nbytes = cache.nbytes * int(lens_np.sum()) // cache.num_slots
            kernels = {"pieces": functools.partial(decode_mgpu.paged_decode_mgpu, num_splits=None)}
            kernels |= {f"S={s}": functools.partial(decode_mgpu.paged_decode_mgpu, num_splits=int(s))
                        for s in args.splits.split(",") if s}
            kernels |= {f"waves={w}": functools.partial(waves_decode, waves=int(w)) for w in args.waves.split(",") if w}
            kernels |= {f"{other} default": mod.paged_decode_mgpu for other, mod in others.items()}
            if args.triton:
                kernels |= {f"triton {cut}": functools.partial(paged_decode, implementation="triton", cut=cut)
                            for cut in ("width", "lengths")}
            fns, first = {}, None
            for kernel, decode in kernels.items():
                f = on_cache(decode, cache, tables, lens)
                out = f(qs[0])
                first = out if first is None else first
                fns[kernel] = (f, float(jnp.max(jnp.abs(out - first)) / jnp.max(jnp.abs(first))))
            times = in_turns({k: f for k, (f, _) in fns.items()}, args.repeats,
                             lambda f, qs=qs: time_fn(f, [(q,) for q in qs]))
            for kernel, (_, diff) in fns.items():
                t = statistics.median(times[kernel])
                rows.append((preset, label, int(lens_np.sum()), kernel, t, nbytes / t / bw, diff))
                print("ROW", rows[-1], flush=True)
            del cache
    print(f"\n{device_description()}; copy bw {bw / 1e9:.0f} GB/s; Hq={HQ} Hk={HK} D={D} block {BS}")
    print("preset | case | tokens | kernel | us | of copy bw | rel diff")
    for preset, label, tokens, kernel, t, frac, diff in rows:
        print(f"{preset} | {label} | {tokens} | {kernel} | {t * 1e6:.1f} | {frac:.2f} | {diff:.1e}")


if __name__ == "__main__":
    main()
