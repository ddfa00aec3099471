"""Device experiment: the Mosaic decode's prologue (:func:`tqjax.pallas.decode_mgpu.decode_prologue`: the query's
operands and the piece table, one Triton launch) alone, in variants, timed by Nsight Compute's kernel durations:

    ncu --clock-control none --kernel-name regex:tq_decode_prologue --metrics gpu__time_duration.sum \\
        python -m experiments.prologue_probe [--points 1/4096 32/16384 128/16384] > ncu.txt
    python -m experiments.ncu_times ncu.txt --kernel tq_decode_prologue

A variant is ``shared|apart``/``chunks|outer|hadamard``/warps[/cN] (``decode_prologue``'s ``table_apart``,
``form``, ``num_warps``, ``columns`` N, without it the form's default: :func:`~tqjax.pallas.decode_mgpu.query_columns`
for the matrix's products, 1 for the Hadamard form; the defaults:
:func:`~tqjax.pallas.decode_mgpu.prologue_defaults`), each point ``B/context`` (``--preset``, Hq=32, Hk=8, D=128,
block 16, a block table as wide as the context, 528 resident programs: the H200's). Every variant is compiled, launched
``--launches`` times and checked against the first variant's outputs: the table and ``info`` equal, the scaled
rows ``(hi + lo) * qinv`` within 4e-6 of each row's largest magnitude (two float32 sums in other orders, each within
~2e-6 of the exact one); ``VARIANT`` lines name the launches in order, for :mod:`experiments.ncu_times`. On a CPU:
interpret mode at small points.
"""

from __future__ import annotations

import argparse
import re

from experiments.ncu_times import probe_points

VARIANTS = ("apart/chunks/4", "apart/hadamard/4", "apart/hadamard/2", "apart/hadamard/1", "apart/chunks/4/c1",
            "apart/chunks/4/c2", "apart/chunks/4/c4", "apart/chunks/4/c8",
            "apart/chunks/8", "shared/chunks/4", "apart/outer/4")


def parse_variant(text: str) -> tuple[bool, str, int, int | None]:
    """``shared|apart/chunks|outer|hadamard/warps[/cN]`` -> (table_apart, form, num_warps, columns or None)."""
    m = re.fullmatch(r"(shared|apart)/(chunks|outer|hadamard)/(\d+)(?:/c(\d+))?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"a variant is shared|apart/chunks|outer|hadamard/warps[/cN], got {text!r}")
    return m.group(1) == "apart", m.group(2), int(m.group(3)), None if m.group(4) is None else int(m.group(4))


def run(points: list[tuple[int, int]], variants: list[str], preset: str, launches: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import tqjax
    from tqjax.pallas.decode_mgpu import decode_prologue, query_row

    cpu = jax.default_backend() == "cpu"
    hq, hk, d = 32, 8, 128
    cfg = tqjax.TurboQuantConfig.from_cache_dtype(preset, d)
    for b, ctx in points:
        rng = np.random.default_rng(b * ctx)
        q = jnp.asarray(rng.standard_normal((b, hq, d)), jnp.bfloat16)
        lens = jnp.asarray(rng.integers(ctx // 2, ctx + 1, b), jnp.int32)
        kw = {"num_kv_heads": hk, "factor": 0.0625, "block_size": 16, "max_blocks": ctx // 16, "step_pages": 4,
              "resident": 528, "num_splits": None, "interpret": cpu}
        want = None
        for text in variants:
            apart, form, warps, columns = parse_variant(text)
            for _ in range(launches):
                got = jax.block_until_ready(decode_prologue(q, lens, cfg, table_apart=apart, form=form,
                                                            num_warps=warps, columns=columns, **kw))
            q16, qinv = (np.asarray(x, np.float64) for x in got[:2])
            heads = q16.shape[2] // 2  # 4 in the narrow form, else 8
            hi, lo = (q16[:, :, [query_row(r, part, hq // hk) for r in range(heads)]] for part in (0, 1))
            rows = (hi + lo) * qinv[..., :heads, None]
            if want is None:
                want = (rows, np.asarray(got[2]), np.asarray(got[3]))
            err = float(np.max(np.abs(rows - want[0]) / np.maximum(np.abs(want[0]).max(axis=-1, keepdims=True),
                                                                    1e-30)))
            print(f"VARIANT B={b} ctx={ctx} {text} err={err:.1e}", flush=True)
            if err > 4e-6 or not (np.array_equal(got[2], want[1]) and np.array_equal(got[3], want[2])):
                raise SystemExit(f"B={b} ctx={ctx} {text}: off the first variant (rows {err:.1e}, or the table)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", nargs="+", default=None, help="B/context (default: 1/4096 32/16384 128/16384 on "
                    "a GPU, 1/1024 3/512 on a CPU)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), type=str)
    ap.add_argument("--preset", default="turboquant_4bit_nc")
    ap.add_argument("--launches", type=int, default=3)
    args = ap.parse_args(argv)
    for v in args.variants:
        parse_variant(v)
    points = probe_points(args.points, ["1/4096", "32/16384", "128/16384"], ["1/1024", "3/512"])
    run(points, args.variants, args.preset, args.launches)


if __name__ == "__main__":
    main()
