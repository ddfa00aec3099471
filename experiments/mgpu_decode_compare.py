"""A/B timing of the Mosaic GPU decode (``tqjax.pallas.decode_mgpu``) on the same paged caches: the module as it
is, at chosen split counts, and optionally another version of it loaded from a file.

    git show 9c18739:tqjax/pallas/decode_mgpu.py > /tmp/decode_mgpu_old.py
    python -m experiments.mgpu_decode_compare --against /tmp/decode_mgpu_old.py
    python -m experiments.mgpu_decode_compare --points 4bit_nc/8/32768 --splits 4,6,8 --stages 2,3
    python -m experiments.mgpu_decode_compare --points 3bit_nc/32/16384/32776   (a cache of 32776 pages)
    MOSAIC_GPU_DUMP_PTXAS=1 python -m experiments.mgpu_decode_compare ...   (ptxas prints registers per thread)
    ncu --clock-control none --set full -k regex:tq_decode_mgpu --launch-skip 2 -c 1 -o prof \\
        python -m experiments.mgpu_decode_compare --points 4bit_nc/32/16384 --once
    ncu -i prof.ncu-rep --page source --csv --print-source sass > sass.csv; python -m experiments.ncu_loop sass.csv

Each point builds one cache (Hq=32, Hk=8, D=128 or ``--head-dim``, block 16, random K/V through the store),
times each kernel on three query sets (``experiments.timing.time_fn``; with ``--repeats R`` R times, the kernels
taking turns, median reported: figures move between calls more than within one) and checks it against the float32
reference decode. The rows print as they finish (prefixed ``RESULT``) and again as a table with the copy
bandwidth of the same run. Hopper GPUs only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.device_check import build
from experiments.timing import (
    copy_bandwidth,
    device_description,
    in_turns,
    load_versions,
    on_cache,
    time_fn,
)
from tqjax.pallas import decode_mgpu
from tqjax.reference import paged_decode_reference

HQ, HK, BLOCK = 32, 8, 16


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", default="4bit_nc/32/16384,4bit_nc/8/32768,4bit_nc/128/4096,k8v4/32/16384",
                    help="comma-separated preset suffix/batch/context[/cache pages]")
    ap.add_argument("--splits", default="", help="comma-separated split counts (default: each module's default)")
    ap.add_argument("--stages", default="2", help="comma-separated page-copy stages")
    ap.add_argument("--against", default="",
                    help="other decode_mgpu.py files (comma-separated) to time beside this one")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1,
                    help="times each kernel is timed, the kernels taking turns (median reported)")
    ap.add_argument("--once", action="store_true", help="run the first kernel of the first point 4 times, untimed")
    args = ap.parse_args(argv)

    modules = {"this": decode_mgpu} | load_versions(args.against, "decode_mgpu_")
    splits = [int(s) for s in args.splits.split(",") if s] or [None]
    variants = [(s, st) for st in (int(x) for x in args.stages.split(",")) for s in splits]
    print(device_description(), flush=True)
    bw = 0.0 if args.once else copy_bandwidth()
    rows = []
    for point in args.points.split(","):
        preset, b, ctx, *pages = point.split("/")
        name, b, ctx = f"turboquant_{preset}", int(b), int(ctx)
        rng = np.random.default_rng(0)
        _, cache, bt, lens = build(name, b, ctx, HQ, HK, args.head_dim, BLOCK, rng, *map(int, pages))
        qs = [jnp.asarray(rng.standard_normal((b, HQ, args.head_dim)), jnp.float32) for _ in range(3)]
        nbytes = cache.nbytes * ctx * b // cache.num_slots
        ref = None if args.once else paged_decode_reference(qs[0], cache, bt, lens)
        chosen = {}
        for label, module in modules.items():
            for s, stages in variants:
                f = on_cache(module.paged_decode_mgpu, cache, bt, lens, num_splits=s, stages=stages)
                if args.once:
                    for _ in range(4):
                        jax.block_until_ready(f(qs[0]))
                    print("ran", point, label, s)
                    return
                kernel = f"{label} S={s if s else 'default'}" + (f" stages={stages}" if stages != 2 else "")
                try:
                    t0 = time.time()
                    out = f(qs[0])
                    err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
                    print("RESULT", point, kernel, f"max rel err {err:.1e}, compile and first run "
                          f"{time.time() - t0:.1f} s", flush=True)
                    chosen[kernel] = (f, err)
                except Exception as e:  # noqa: BLE001 (an experiment: report and go on)
                    print("RESULT", name, b, ctx, kernel, "FAILED", type(e).__name__, str(e)[:2000], flush=True)
        times = in_turns({kernel: f for kernel, (f, _) in chosen.items()}, args.repeats,
                         lambda f, qs=qs: time_fn(f, [(q,) for q in qs]))
        shown = f"{name} ({pages[0]} pages)" if pages else name
        for kernel, (_, err) in chosen.items():
            t = statistics.median(times[kernel])
            rows.append((shown, b, ctx, kernel, t, nbytes / t / bw, err))
            print("RESULT", rows[-1], [round(x * 1e6, 1) for x in times[kernel]], flush=True)
    print(f"RESULT {device_description()}; copy bw {bw / 1e9:.0f} GB/s; Hq={HQ} Hk={HK} D={args.head_dim} "
          f"block {BLOCK}")
    print("RESULT preset | B | ctx | kernel | us | of copy bw | max rel err vs reference")
    for name, b, ctx, kernel, t, frac, err in rows:
        print(f"RESULT {name} | {b} | {ctx} | {kernel} | {t * 1e6:.1f} | {frac:.2f} | {err:.1e}")


if __name__ == "__main__":
    main()
