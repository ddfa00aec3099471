"""Device experiment: the merge of the decode's pieces (:func:`tqjax.pallas.pieces.merge_pieces`) alone, in variants
(pieces a block, groups of D rows a program, warps a program), timed by Nsight Compute's kernel durations:

    ncu --clock-control none --kernel-name regex:tq_merge --metrics gpu__time_duration.sum \\
        python -m experiments.merge_probe [--points 1/4096 32/16384] [--blocks 4 64] [--groups 1 16] \\
        [--warps 1 4] > ncu.txt
    python -m experiments.ncu_times ncu.txt --kernel tq_merge_pieces

Each point is ``B/context`` at the Mosaic decode's shapes (Hq=32, Hk=8, D=128, block 16, 528 resident programs:
the H200's): the pieces of :func:`tqjax.pallas.pieces.piece_table_reference` for B sequences of ``context`` tokens,
random partial outputs o [slots, 128, 8] and log-sum-exps [slots, 8, 8], 4 query rows kept, the value channel order,
bfloat16 out. Every variant is compiled, launched ``--launches`` times and checked against
:func:`tqjax.pallas.pieces.merge_pieces_reference` (its largest difference printed; a variant off by more than one
bfloat16 step of the outputs fails the run); ``VARIANT`` lines name the launches in order, for
:mod:`experiments.ncu_times`. ``default`` blocks, groups and warps are :func:`tqjax.pallas.pieces.merge_block`'s,
:func:`tqjax.pallas.pieces.merge_program_groups`'s and :func:`tqjax.pallas.pieces.merge_warps`'. On a CPU: interpret
mode at small points (a check of the plumbing).
"""

from __future__ import annotations

import argparse
import functools
import math

from experiments.ncu_times import probe_points


def run(points: list[tuple[int, int]], blocks: list[str], groups: list[str], launches: int,
        warps: tuple[str, ...] = ("default",)) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tqjax.pallas.decode_mgpu import value_channel_order
    from tqjax.pallas.pieces import (
        decode_waves,
        grid_size,
        merge_block,
        merge_groups,
        merge_pieces,
        merge_pieces_reference,
        merge_program_groups,
        merge_warps,
        piece_table_reference,
    )

    cpu = jax.default_backend() == "cpu"
    hk, d, resident = 8, 128, 528
    channels = tuple(int(c) for c in value_channel_order(d))
    size, _, _, starts = merge_groups(channels, d)  # size D rows a group, starts.shape[1] groups
    for b, ctx in points:
        max_blocks = ctx // 16
        max_steps = math.ceil(max_blocks / 4)
        waves = decode_waves(b, hk, resident, max_steps)  # the decode's grid
        n_pieces = grid_size(b, hk, resident, None, waves, max_steps)
        _, info = piece_table_reference(jnp.full((b,), ctx, jnp.int32), num_kv_heads=hk, block_size=16,
                                        max_blocks=max_blocks, step_pages=4, resident=resident, waves=waves)
        slots = (n_pieces + 1) * hk
        rng = np.random.default_rng(b * ctx)
        o = jnp.asarray(rng.standard_normal((slots, d, 8)), jnp.float32)
        lse = jnp.asarray(rng.uniform(-4, 4, (slots, 8, 8)), jnp.float32)
        kw = {"batch": b, "rows": 4, "channels": channels, "dtype": jnp.bfloat16}
        ref = np.asarray(merge_pieces_reference(o, lse, info, **kw), np.float32)
        counts = (merge_program_groups(b * hk, starts.shape[1]) if x == "default" else int(x) for x in groups)
        for g in (g for g in dict.fromkeys(counts) if starts.shape[1] % g == 0):
            n_warps = dict.fromkeys(merge_warps(b * hk * starts.shape[1] // g) if x == "default" else int(x)
                                    for x in warps)
            for block in dict.fromkeys(merge_block(slots, hk, b, g * size * 4) if x == "default" else int(x)
                                       for x in blocks):
                for w in n_warps:
                    f = functools.partial(merge_pieces, block=block, groups=g, num_warps=w, interpret=cpu, **kw)
                    for _ in range(launches):
                        out = jax.block_until_ready(f(o, lse, info))
                    err = float(np.max(np.abs(np.asarray(out, np.float32) - ref)))
                    print(f"VARIANT B={b} ctx={ctx} pieces={n_pieces} block={block} groups={g} warps={w} "
                          f"err={err:.2e}", flush=True)
                    if err > 2.0 ** -7 * max(1.0, float(np.max(np.abs(ref)))):
                        raise SystemExit(f"B={b} ctx={ctx} block={block} groups={g} warps={w}: off the reference "
                                         f"by {err}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", nargs="+", default=None, help="B/context (default: 1/4096 1/32768 32/16384 "
                    "128/16384 on a GPU, 1/1024 2/512 on a CPU)")
    ap.add_argument("--blocks", nargs="+", default=["default"], help="pieces a block: numbers or 'default'")
    ap.add_argument("--groups", nargs="+", default=["default"],
                    help="groups of D rows a program: numbers or 'default'")
    ap.add_argument("--warps", nargs="+", default=["default"],
                    help="warps a program (merge_pieces' num_warps): numbers or 'default'")
    ap.add_argument("--launches", type=int, default=3)
    args = ap.parse_args(argv)
    points = probe_points(args.points, ["1/4096", "1/32768", "32/16384", "128/16384"], ["1/1024", "2/512"])
    run(points, args.blocks, args.groups, args.launches, tuple(args.warps))


if __name__ == "__main__":
    main()
