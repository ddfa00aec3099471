"""Device experiment: where does the Pallas decode kernel's time go? (variants of one shape)

python -m experiments.decode_probe [--presets ...] [--lookups poly_fma,prmt | --variants prmt/64/2/1/t,...]
python -m experiments.decode_probe --once --presets turboquant_4bit_nc --context 4096   # under ncu

Times each preset's decode (B=32, 16k by default) with each variant's centroid lookup and launch
parameters (tokens per step / warps / stages), next to a read-only probe with the same access pattern;
``--once`` runs one decode and exits, for a profiler (docs/PERFORMANCE.md has the ncu command).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from experiments.device_check import build
from experiments.timing import copy_bandwidth, device_description, on_cache, time_fn
from tqjax.pallas.decode import SPLIT_F16, SPLIT_QUERY, paged_decode
from tqjax.pallas.tuning import decode_params
from tqjax.reference import paged_decode_reference


def read_probe(cache, bt, lens, block_tokens, num_warps, num_stages):
    """Reads every used page of key/value codes with the decode kernel's access pattern, no math."""
    b = bt.shape[0]
    bs = cache.block_size
    ppc = max(1, block_tokens // bs)
    t = ppc * bs
    wk, wv = cache.key_codes.shape[-1], cache.value_codes.shape[-1]

    def kernel(bt_ref, len_ref, kc_ref, vc_ref, o_ref):
        bi = pl.program_id(0)
        used = (len_ref[bi] + bs - 1) // bs
        n = (used + ppc - 1) // ppc

        def body(i, acc):
            idx = i * ppc + jnp.arange(ppc, dtype=jnp.int32)
            pages = pltriton.load(bt_ref.at[bi, pl.ds(i * ppc, ppc)], mask=idx < used, other=0)
            k = kc_ref[pages].reshape(t, wk)
            v = vc_ref[pages].reshape(t, wv)
            return acc ^ jnp.sum(k, axis=0, keepdims=True) ^ jnp.sum(v, axis=0, keepdims=True)

        acc = jax.lax.fori_loop(0, n, body, jnp.zeros((1, wk), jnp.uint32))
        o_ref[...] = jnp.sum(acc, axis=1)

    per_head = lambda a: pl.BlockSpec((None,) + a.shape[1:], lambda i, j: (j, 0, 0, 0))
    f = pl.pallas_call(
        kernel,
        grid=(b, cache.num_kv_heads),
        in_specs=[pl.BlockSpec(bt.shape, lambda i, j: (0, 0)), pl.BlockSpec(lens.shape, lambda i, j: (0,)),
                  per_head(cache.key_codes), per_head(cache.value_codes)],
        out_specs=pl.BlockSpec((None, None, 1), lambda i, j: (i, j, 0)),
        out_shape=jax.ShapeDtypeStruct((b, cache.num_kv_heads, 1), jnp.uint32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    )
    return jax.jit(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--presets", default="turboquant_4bit_nc,turboquant_3bit_nc,turboquant_k8v4,turboquant_kqjl4v4")
    ap.add_argument("--lookups", default="poly_fma,prmt",
                    help="comma-separated centroid lookups (tqjax.pallas.decode.LOOKUPS), each timed with the tuned "
                         "launch parameters")
    ap.add_argument("--variants", default="",
                    help="comma-separated lookup/block_tokens/num_warps/num_stages[/flag...] variants (e.g. "
                         "poly_fma/64/8/2/t); flags: x3 (one TF32x3 score product), tf32 (the tf32 split, "
                         "SPLIT_QUERY), f16 (float16 operands, SPLIT_F16, the default), t (dot_mode mma_t: "
                         "transposed products), m (dot_mode mma); without t or m the tuned dot_mode (mma_t on "
                         "CUDA since the seventh session of 2026-11-29, mma before); timed instead of --lookups")
    ap.add_argument("--no-read-probe", action="store_true")
    ap.add_argument("--once", action="store_true",
                    help="run the first preset's decode once with the tuned parameters and exit (for a profiler: "
                         "ncu -k regex:tq_decode -c 1 ...)")
    ap.add_argument("--calls", type=int, default=0,
                    help="with --once: this many more jitted decode steps after the first (for a timeline of "
                         "every kernel of a step: nsys or ncu without -k)")
    args = ap.parse_args()
    if args.once:
        rng = np.random.default_rng(0)
        name = args.presets.split(",")[0]
        _, cache, bt, lens = build(name, args.batch, args.context, 32, 8, 128, 16, rng)
        q = jnp.asarray(rng.standard_normal((args.batch, 32, 128)), jnp.float32)
        step = on_cache(paged_decode, cache, bt, lens)
        for _ in range(1 + args.calls):  # a compiling call, then the steady state a timeline should show
            step(q).block_until_ready()
        return
    print(device_description(), flush=True)
    bw = copy_bandwidth()
    rng = np.random.default_rng(0)
    b, ctx, hq, hk, d, bs = args.batch, args.context, 32, 8, 128, 16
    rows = []
    for name in args.presets.split(","):
        _, cache, bt, lens = build(name, b, ctx, hq, hk, d, bs, rng)
        nbytes = cache.nbytes
        qs = [jnp.asarray(rng.standard_normal((b, hq, d)), jnp.bfloat16) for _ in range(3)]
        ref = paged_decode_reference(qs[0].astype(jnp.float32), cache, bt, lens)
        if not args.no_read_probe and all(x & (x - 1) == 0 for x in (cache.key_codes.shape[-1], cache.value_codes.shape[-1])):
            rp = read_probe(cache, bt, lens, 32, 4, 2)  # whole-slot loads need power-of-2 word counts
            t = time_fn(rp, [(bt, lens, cache.key_codes, cache.value_codes)])
            rows.append((name, "read-only probe", 32, 4, 2, f"{t*1e6:.0f}", f"{nbytes/t/1e9:.0f}",
                         f"{nbytes/t/bw:.2f}", ""))
            print(rows[-1], flush=True)
        tuned = decode_params(name)
        if args.variants:
            variants = [v.split("/") for v in args.variants.split(",")]
        else:
            variants = [(lk, tuned["block_tokens"], tuned["num_warps"], tuned["num_stages"])
                        for lk in args.lookups.split(",")]
        for lookup, bt_tok, w, s, *flags in variants:
            bt_tok, w, s = int(bt_tok), int(w), int(s)
            precisions = {"x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3, "tf32": SPLIT_QUERY, "f16": SPLIT_F16}
            precision = next((precisions[f] for f in flags if f in precisions), None)
            dot_mode = "mma_t" if "t" in flags else "mma" if "m" in flags else None
            lookup_name = "/".join([lookup, *flags])
            try:
                f = on_cache(paged_decode, cache, bt, lens, lookup=lookup, block_tokens=bt_tok, num_warps=w,
                             num_stages=s, precision=precision, dot_mode=dot_mode)
                err = float(jnp.max(jnp.abs(f(qs[0].astype(jnp.float32)) - ref)) / jnp.max(jnp.abs(ref)))
                t = time_fn(f, [(q,) for q in qs])
                rows.append((name, lookup_name, bt_tok, w, s, f"{t*1e6:.0f}", f"{nbytes/t/1e9:.0f}",
                             f"{nbytes/t/bw:.2f}", f"{err:.1e}"))
            except Exception as e:  # noqa: BLE001
                rows.append((name, lookup_name, bt_tok, w, s, "ERR", str(e)[:80]))
            print(rows[-1], flush=True)
    print(f"\n{device_description()}; copy bw {bw/1e9:.0f} GB/s; B={b} ctx={ctx} Hq={hq} Hk={hk} D={d} bs={bs}")
    print("preset variant block_tokens warps stages us GB/s frac_of_copy_bw max_rel_err_vs_reference")
    for r in rows:
        print(" ".join(str(x) for x in r))


if __name__ == "__main__":
    main()
