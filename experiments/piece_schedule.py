"""The decode's piece order under a list schedule (CPU only, no GPU): when do the programs of
:func:`tqjax.pallas.pieces.piece_table`'s pieces end if each of ``resident`` slots takes the next program in grid
order as soon as it is free (what a GPU's block scheduler does, roughly), each program taking its piece's steps plus
``overhead`` steps? Compares the table's order (whole pieces, then the shorter last pieces longest first) with the
last pieces in sequence order (the twenty-third session's order).

    python -m experiments.piece_schedule [--overhead 3] [--resident 528]

Cases: ``experiments.ragged_decode``'s and batches of 32, 64 and 128 lengths drawn in random order (Hk=8, block
16, 64-token steps). A model, not a timing: it says where the order can matter, the device says by how much.
"""

from __future__ import annotations

import argparse
import heapq

import jax.numpy as jnp
import numpy as np

from experiments import ragged_decode
from tqjax.pallas import pieces

HK, BS, STEP_PAGES = 8, 16, 4


def end_of(durations, resident: int, overhead: float) -> float:
    """When the last of ``durations`` (in grid order) ends on ``resident`` slots, each taking the next when free."""
    slots = [0.0] * resident
    end = 0.0
    for d in durations:
        t = heapq.heappop(slots) + d + overhead
        end = max(end, t)
        heapq.heappush(slots, t)
    return end


def piece_steps(lens: np.ndarray, max_blocks: int, resident: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(steps, sequence) of the table's pieces in its order, and the chunk."""
    table, _ = pieces.piece_table_reference(jnp.asarray(lens, jnp.int32), num_kv_heads=HK, block_size=BS,
                                            max_blocks=max_blocks, step_pages=STEP_PAGES, resident=resident)
    table = np.asarray(table)
    n = pieces.grid_size(len(lens), HK, resident, None, pieces.WAVES, -(-max_blocks // STEP_PAGES))
    used = table[3, :n] < n
    steps = -(-(table[2, :n] - table[1, :n]) // STEP_PAGES)
    return steps[used], table[0, :n][used], int(steps[used].max())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--overhead", type=float, default=3.0, help="steps a program costs beyond its piece's")
    ap.add_argument("--resident", type=int, default=528, help="programs the device holds at once")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(3)
    cases = [(label, width // BS, lens) for label, width, lens in ragged_decode.cases()]
    cases += [(f"B={b}, 1k-32k in random order", 2048, rng.integers(1024, 32769, b)) for b in (32, 64, 128)]
    print(f"list schedule on {args.resident} slots, {args.overhead} steps a program; ends in 64-token steps")
    print("case | pieces | steps | table order | last pieces in sequence order")
    for label, max_blocks, lens in cases:
        steps, seq, chunk = piece_steps(lens, max_blocks, args.resident)
        whole = steps == chunk
        old = np.concatenate([steps[whole], steps[~whole][np.argsort(seq[~whole], kind="stable")]])
        ends = [end_of(np.repeat(s, HK), args.resident, args.overhead) for s in (steps, old)]
        print(f"{label} | {len(steps)} | {int(steps.sum())} | {ends[0]:.0f} | {ends[1]:.0f}")


if __name__ == "__main__":
    main()
