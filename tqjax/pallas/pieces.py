"""Split-KV decode work cut by the batch's actual lengths: which pages each program of the Mosaic decode reads
(:func:`piece_table`, a Pallas kernel of a program per sequence, :func:`piece_table_reference` beside it in plain
jnp), and the merge of the pieces' partial outputs (:func:`merge_pieces`, a Pallas kernel;
:func:`merge_pieces_reference`).

Why. A split count per (sequence, KV head) fixed from the block table's width leaves the device idle on ragged
batches and on tables wider than the sequences (a server sizes them for its longest context). H200, ``4bit_nc``,
B=32 (``docs/data/decode_mgpu_ragged_h200_2026-11-30_s24.log``): one sequence of 128k tokens and 31 of 4k took
1107.5 us at the 2 splits the table's width gave, 300.4 us at 32; 32 sequences of 16.8k tokens in a table 32k
wide 602.1 us, against 318.4 for 16k tokens in a table 16k wide. Here the work is cut on the device, inside the
jitted step, where the lengths are known:

- each sequence is cut into pieces of ``chunk`` steps of ``step_pages`` pages (64 tokens), the last piece
  shorter; a piece is read by Hk programs, one a KV head (grid ``(Hk, pieces)``, the head from the program id:
  ptxas keeps it in a uniform register);
- the grid is static: ``max(WAVES * ceil(resident / Hk), B)`` pieces (:data:`WAVES` = 2 waves of the programs
  the device holds at once, or one piece a sequence), at most ``B * max_steps`` (a piece a step of every
  sequence: B=1, 4k, 64 pieces), ``B * S`` with a fixed split count S; programs past the last piece skip the
  whole kernel body (a wave of them costs 2-5 us, below); one wave where even a full table's pieces would be short
  (:func:`decode_waves`, at 8 KV heads: B=1 up to 540k tokens, B=4 to 135k, B=8 to 67k, B=16 to 8.4k, B=32 to 1k);
- ``chunk`` is the shortest whose pieces fit one wave (``max(ceil(resident / Hk), B)`` pieces: for equal lengths
  the split counts the table's width gave before: B=32, 16k: 2 pieces of 128 steps; B=1, 128k: 64 of 32), unless
  the shortest whose pieces fit the whole grid is taken: where one wave's pieces fill less than :data:`FILL` of
  the wave (ragged lengths: their last pieces are short; then the block scheduler balances the finer pieces), or
  where that finer cut leaves no sequence more than 8 pieces (:data:`_LONG_MERGE`) (B=32, 16k: 4 of 64 steps;
  a sequence of many pieces keeps the one-wave cut: the merge's longest program bounds the merge); with S given,
  ``ceil(max_steps / S)`` (the table's width cut in S);
- piece j is the j-th of the whole pieces (sequence-major), then of the shorter last pieces, longest first
  (equal lengths in sequence order), so that the block scheduler starts the long ones first. Measured against
  sequence order (H200, ``4bit_nc``, random lengths in random order, docs/data/piece_order_h200_2026-11-30_s26.log,
  in turns): B=64, 1k-32k 754.9 us against 793.5; B=96 1251.3 against 1289.2; B=128, log-normal around 4k 797.3
  against 858.1; but B=128, 1k-32k (one piece a sequence) 1686.1 against 1617.6 (and 1676.1 against 1590.6 with the
  lengths ascending; shortest first 1604.8 there): not the list schedule's gain (``python -m
  experiments.piece_schedule`` modelled 559 steps against 839 for that batch); piece indices past the last piece
  read nothing (their table column is ``(0, 0, 0, pieces)``);
- a piece's programs write their partial outputs (normalised within the piece) and log-sum-exps to slots of
  their own, ``slot * Hk + h``, a sequence's pieces in consecutive ``slot``; ``slot = pieces`` is the empty
  ones'. :func:`merge_pieces` combines each (sequence, KV head)'s slots by their log-sum-exps, in slot order
  (deterministic: no atomics).

Measured, two waves (H200, ``4bit_nc``, B=32, docs/data/decode_mgpu_waves_h200_2026-11-30_s25.log, call 3, against
one wave in turns): lengths in 1k-32k 370.1 us against 421.2; in 0.5k-16k 220.5 against 234.3; log-normal around 4k
125.8 against 128.8; 16k tokens in 16k-wide tables 329.2 against 331.4; where the one-wave cut stays, the skipped
programs' wave costs 3-5 us (7.9k in 128k-wide tables 187.2 against 184.0; 128k + 31 x 4k 213.2 against 208.5); B=1,
4k: the same (43.6 and 43.8 us a step in a jitted loop: 64 pieces either way). Four waves cut finer still (1k-32k
344.0 us against 413.2 for one wave, call 2) but their three skipped waves cost 12.7 us on the uniform batch
(programs running the body to no page: 32.5 us). At B=128, 16k, two pieces a sequence (a grid of 2 * B) took 1231.1
us against 1192.9 for one: the grid is ``max(2 * ceil(resident / Hk), B)``, which keeps one piece a sequence there
(not timed in that form).

Measured, one wave (H200, ``4bit_nc``, B=32, docs/data/decode_mgpu_pieces_h200_2026-11-30_s24.log, against the
table's splits in the same calls; calls A and B, revisions before the last): 128k + 31 x 4k 227.4-228.6 us against
1096.9-1115.3; 16.8k tokens in 32k-wide tables 368.0-374.0 against 609.0-613.3; 7.9k in 128k-wide tables
202.8-205.7 against 315.5-321.5; lengths drawn in 1k-32k 452.6-453.8 against 529.5-536.8 (16 fixed splits took
353.7 there: one wave of pieces is not the best cut for every batch). The cost, two more launches a step (the
table, one program; the merge, one program per sequence and KV head with 8 pieces' loads in flight at once), in the
revision that landed (call C): 16k tokens in 16k-wide tables 332.8 us against 327.1 (kernels in turns); B=1, 4k
41.8 us a step in a jitted loop (25.1 in this session's first call, before pieces). The table as a dozen jnp ops
(call A) or as this one program (call B) timed the same; B=1 went from 54.5 to 41.8 us from call B to C (the merge
loading 8 pieces at once instead of one, and the key tables' words as the decode's constants). The merge then
took 38.8 us of that step under ncu (the decode 8.5); cut over the D rows (8 a program, one warp), B=1, 4k took 28.6
us a step against 42.5, B=1, 32k 50.7 against 65.6, B=32, 16k 313.1 against 313.0
(docs/data/decode_merge_h200_2026-11-30_s26.log). Since then the table is made in the decode's prologue
(``decode_mgpu.decode_prologue``), where one program doing it all took 76 us at B=128 (its rank tiles; ncu): a program
per sequence now writes that sequence's columns, working out the chunk, counts and its last piece's rank from
vectors of all the lengths (prologue 85 -> 28.7 us at B=128, 16k; docs/data/prologue_h200_2026-12-01_s27.log).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

__all__ = ["decode_waves", "grid_size", "merge_block", "merge_groups", "merge_pieces", "merge_pieces_reference",
           "merge_program_groups", "merge_warps", "piece_table", "piece_table_reference", "table_program"]

_PIECE_ROWS = 32  # table columns written per store (a power of 2)
WAVES = 2  # the decode's grid: pieces for this many waves of resident programs (module docstring)
FILL = 0.9  # one wave's chunk where its pieces fill at least this much of the wave (and the finer one's merge is long)
# one wave where one wave's pieces, at least this many a sequence, would hold the whole table at most this many steps
# a piece (decode_waves; the last entry applies to every batch)
_ONE_WAVE_LIMITS = ((8, 128), (4, 32), (1, 8))


def grid_size(batch: int, num_kv_heads: int, resident: int, num_splits: int | None = None, waves: int = 1,
              max_steps: int | None = None) -> int:
    """Sequence pieces the decode's grid holds (each run by ``num_kv_heads`` programs, one a KV head):
    ``max(waves * ceil(resident / num_kv_heads), batch)`` (``waves`` waves of resident programs, at least a piece a
    sequence), at most ``batch * max_steps`` (a piece a step of every sequence); ``batch * num_splits`` with a fixed
    split count."""
    if num_splits is not None:
        return batch * num_splits
    n = max(waves * -(-resident // num_kv_heads), batch)
    return n if max_steps is None else min(n, batch * max_steps)


def decode_waves(batch: int, num_kv_heads: int, resident: int, max_steps: int) -> int:
    """The Mosaic decode's waves of pieces for a block table of ``batch`` rows of ``max_steps`` steps: 1 where one
    wave's pieces (:func:`grid_size`) would hold every step of the table in pieces short enough for the pieces a
    sequence gets (:data:`_ONE_WAVE_LIMITS`: at most 8 steps a piece; 32 with 4 pieces a sequence or more; 128 with
    8 or more), else :data:`WAVES`. A second wave's programs without a piece cost 2-5 us, more than finer pieces save
    where a piece is short, or where a sequence has enough pieces for ragged lengths to balance anyway. H200,
    ``4bit_nc``, Hk=8 (66 pieces a wave), one wave against two in turns: tables of 256 and 512 steps (B=1, 16k to
    B=16, 2k), uniform and ragged, one wave 4-13% faster (docs/data/decode_h200_2026-12-01_s31.log, call 9); tables
    of 1024-8192 steps (docs/data/decode_waves_h200_2026-12-01_s33.log): B=4 to 16 up to 2048 steps, uniform and
    ragged, one wave 2-9% faster, B=2 to 8 at 4096 and 8192 steps (32k-256k) 1.5-3%, but B=16 at 4096 steps even
    (uniform) or 3% slower (ragged), ragged B=32 (two pieces a sequence in one wave: its long sequences' pieces run
    alone at the end) 0-11% slower at 1024-2048 steps, and B=32 at 4096-8192 steps 0.7-2% slower. In wide tables two
    waves cut ragged batches evenly (B=32, lengths in 1k-32k: 370.1 us against 421.2, module docstring)."""
    one_wave = grid_size(batch, num_kv_heads, resident, None, 1)
    per_sequence = one_wave // batch
    limit = next(steps for pieces, steps in _ONE_WAVE_LIMITS if per_sequence >= pieces)
    return 1 if batch * max_steps <= limit * one_wave else WAVES


def _table_shapes(batch: int, num_kv_heads: int, n_pieces: int) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """Shapes of the table [4, pieces rounded up to _PIECE_ROWS] and of info [2, Hk, B rounded up to a power of 2]."""
    return (4, -(-n_pieces // _PIECE_ROWS) * _PIECE_ROWS), (2, num_kv_heads, max(2, pl.next_power_of_2(batch)))


def _max_steps(max_blocks: int, step_pages: int) -> int:
    """Steps of the longest sequence the block table holds."""
    return max(1, -(-max_blocks // step_pages))


def _steps(seq_lens, *, block_size: int, max_blocks: int, step_pages: int):
    """(pages, steps) of each sequence: its used pages (clamped to the table) and 64-token steps."""
    used = jnp.clip((seq_lens + block_size - 1) // block_size, 0, max_blocks)
    return used, (used + step_pages - 1) // step_pages


def _ahead(rem_a, idx_a, rem_b, idx_b):
    """int32 [A, B]: 1 where sequence a's last piece (``rem_a`` steps, sequence ``idx_a``) goes before sequence b's
    (longer first; equal lengths in sequence order)."""
    longer = rem_a[:, None] > rem_b[None, :]
    return (longer | ((rem_a[:, None] == rem_b[None, :]) & (idx_a[:, None] < idx_b[None, :]))).astype(jnp.int32)


def _pieces_of(steps, count, whole, chunk, used, rank, j, *, step_pages: int, n_pieces: int, batch: int):
    """Columns (b, first page, end page, slot) [len(j)] of pieces ``j`` (:func:`piece_table`), from the
    sequences' steps, pieces and whole pieces [B'] (sequences past B: 0), the chunk, and the ranks [B'] of the
    sequences' shorter last pieces among them (:func:`_ahead`; any value for a sequence without one)."""
    part = count - whole
    cum_whole, cum_count = jnp.cumsum(whole), jnp.cumsum(count)
    total_whole, total = jnp.sum(whole), jnp.sum(count)
    is_whole = j < total_whole
    b_idx = lax.broadcasted_iota(jnp.int32, (1, steps.shape[0]), 1)
    b_whole = jnp.sum((cum_whole[None, :] <= j[:, None]).astype(jnp.int32), axis=1)
    ranked = (part[None, :] > 0) & (rank[None, :] == (j - total_whole)[:, None])  # the last piece of that rank
    b_part = jnp.sum(jnp.where(ranked, b_idx, 0), axis=1)
    b = jnp.minimum(jnp.where(is_whole, b_whole, b_part), batch - 1)
    onehot = b[:, None] == b_idx

    def at_b(x):  # x[b] for each piece (a one-hot sum)
        return jnp.sum(jnp.where(onehot, x[None, :], 0), axis=1)

    whole_b, count_b = at_b(whole), at_b(count)
    k = jnp.where(is_whole, j - (at_b(cum_whole) - whole_b), whole_b)  # the piece's index within its sequence
    first = k * chunk * step_pages
    end = jnp.minimum(first + chunk * step_pages, at_b(used))
    slot = at_b(cum_count) - count_b + k
    valid = j < total
    return (jnp.where(valid, b, 0), jnp.where(valid, first, 0), jnp.where(valid, end, 0),
            jnp.where(valid, slot, n_pieces))


def _fill_rule(steps, coarse, fine, n_wave: int, fill: float):
    """The chunk from ``coarse`` (the shortest whose pieces fit one wave, ``n_wave`` pieces) and ``fine`` (several
    waves'): ``coarse`` where its pieces fill at least ``fill`` of the wave's steps (the batch's steps against
    ``n_wave * coarse``) and ``fine`` cuts a sequence into more than :data:`_LONG_MERGE` pieces, else ``fine``."""
    filled = jnp.sum(steps).astype(jnp.float32) >= fill * n_wave * coarse.astype(jnp.float32)
    long_merge = (jnp.max(steps) + fine - 1) // fine > _LONG_MERGE
    return jnp.where(filled & long_merge, coarse, fine)


def _chunk(steps, *, max_steps: int, n_pieces: int, n_wave: int, num_splits: int | None, fill: float):
    """The pieces' length in steps (:func:`piece_table`), from the sequences' steps [B'] (0 past B)."""
    if num_splits is not None:
        return jnp.int32(-(-max_steps // num_splits))

    def shortest(limit):  # the shortest chunk whose pieces fit: bisection (the pieces only fall as the chunk grows)
        def halve(_, lo_hi):
            lo, hi = lo_hi
            mid = (lo + hi) // 2
            fits = jnp.sum((steps + mid - 1) // mid) <= limit
            return jnp.where(fits, lo, mid + 1), jnp.where(fits, mid, hi)

        return lax.fori_loop(0, max_steps.bit_length(), halve, (jnp.int32(1), jnp.int32(max_steps)))[1]

    chunk = shortest(n_wave)
    if n_pieces > n_wave:
        chunk = _fill_rule(steps, chunk, shortest(n_pieces), n_wave, fill)
    return chunk


def _store_columns(table_ref, lo, hi, values):
    """Columns ``[lo, hi)`` of ``table_ref`` [4, W] (W a multiple of _PIECE_ROWS) := ``values(j)`` (four int32
    [_PIECE_ROWS] rows for the columns j), in aligned tiles of _PIECE_ROWS columns, masked to the range (other
    programs write the tiles' other columns)."""

    def tile(t, _):
        j = t * _PIECE_ROWS + lax.broadcasted_iota(jnp.int32, (_PIECE_ROWS,), 0)
        mask = (j >= lo) & (j < hi)
        for c, col in enumerate(values(j)):
            pltriton.store(table_ref.at[jnp.int32(c), pl.ds(t * _PIECE_ROWS, _PIECE_ROWS)], col, mask=mask)

    lax.fori_loop(lo // _PIECE_ROWS, (hi + _PIECE_ROWS - 1) // _PIECE_ROWS, tile, None)


def _table_share(lens_ref, table_ref, info_ref, seq, *, batch: int, block_size: int, max_blocks: int,
                 step_pages: int, n_pieces: int, n_wave: int, num_splits: int | None, fill: float):
    """Sequence ``seq``'s share of :func:`piece_table`, one program's (a program per sequence, in parallel): the
    columns of its pieces; program 0 also the columns past the last piece and ``info``. Each program works out the
    chunk, the pieces' counts and its last piece's rank from all the lengths (vectors of B', no [B', B'] tiles:
    one program doing the whole table took 76 us at B=128 on the H200, twenty-sixth session)."""
    hk, bp = info_ref.shape[1], info_ref.shape[2]
    b_idx = lax.broadcasted_iota(jnp.int32, (bp,), 0)
    lens = pltriton.load(lens_ref.at[pl.ds(0, bp)], mask=b_idx < batch, other=0)
    used, steps = _steps(lens, block_size=block_size, max_blocks=max_blocks, step_pages=step_pages)
    chunk = _chunk(steps, max_steps=_max_steps(max_blocks, step_pages), n_pieces=n_pieces, n_wave=n_wave,
                   num_splits=num_splits, fill=fill)
    whole = steps // chunk
    count = whole + (steps % chunk > 0).astype(jnp.int32)
    rem = steps % chunk

    def mine(x):  # x[seq] (a one-hot sum: no gather in a Triton program)
        return jnp.sum(jnp.where(b_idx == seq, x, 0))

    def before(x):  # sum of x over the sequences before seq
        return jnp.sum(jnp.where(b_idx < seq, x, 0))

    used_s, whole_s, rem_s = mine(used), mine(whole), mine(rem)
    whole0, slot0 = before(whole), before(count)
    total_whole, total = jnp.sum(whole), jnp.sum(count)
    span = chunk * step_pages

    def whole_columns(j):
        k = j - whole0
        return (jnp.full_like(j, seq), k * span, jnp.minimum(k * span + span, used_s), slot0 + k)

    _store_columns(table_ref, whole0, whole0 + whole_s, whole_columns)
    # the shorter last piece goes after every whole piece, ranked among the last pieces (_ahead: longer first)
    rank = jnp.sum(((rem > 0) & ((rem > rem_s) | ((rem == rem_s) & (b_idx < seq)))).astype(jnp.int32))
    last = total_whole + rank
    first = whole_s * span
    _store_columns(table_ref, last, jnp.where(rem_s > 0, last + 1, last),
                   lambda j: (jnp.full_like(j, seq), jnp.full_like(j, first), jnp.full_like(j, used_s),
                              jnp.full_like(j, slot0 + whole_s)))

    @pl.when(seq == 0)
    def _():
        _store_columns(table_ref, total, table_ref.shape[1],
                       lambda j: (jnp.zeros_like(j), jnp.zeros_like(j), jnp.zeros_like(j), jnp.full_like(j, n_pieces)))
        first_slot = jnp.cumsum(count) - count
        for h in range(hk):
            info_ref[0, h, :] = first_slot * hk + h
            info_ref[1, h, :] = count


@functools.partial(jax.jit, static_argnames=("num_kv_heads", "block_size", "max_blocks", "step_pages", "resident",
                                             "num_splits", "waves", "fill", "interpret"))
def piece_table(seq_lens: jax.Array, *, num_kv_heads: int, block_size: int, max_blocks: int, step_pages: int,
                resident: int, num_splits: int | None = None, waves: int = WAVES, fill: float = FILL,
                interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """seq_lens [B] int32 -> (table int32 [4, >= pieces], info int32 [2, Hk, >= B]); ``pieces`` =
    :func:`grid_size`. A program per sequence (Triton lowering: CUDA, ROCm, interpret mode).

    Column j < pieces of ``table`` = (b, first page, end page, slot) of piece j: the programs (h, j), one a KV head,
    read pages ``[first, end)`` of the block table's row b (at most ``chunk * step_pages``) and write slot
    ``slot * Hk + h``; ``(0, 0, 0, pieces)`` for a piece index past the last piece. ``info[:, h, b]`` = (first
    slot, count) of KV head h's pieces of sequence b, at slots ``first, first + Hk, ...`` (count 0: an empty
    sequence). ``resident``: programs the device holds at once; ``waves``, ``fill``: the grid's waves and the chunk's
    rule (module docstring); ``num_splits``: a fixed split count instead of the chunk chosen from the lengths.
    Columns and rows past those are padding."""
    body, out_shape = table_program(seq_lens.shape[0], num_kv_heads=num_kv_heads, block_size=block_size,
                                    max_blocks=max_blocks, step_pages=step_pages, resident=resident,
                                    num_splits=num_splits, waves=waves, fill=fill)
    return pl.pallas_call(
        lambda lens_ref, table_ref, info_ref: body(lens_ref, table_ref, info_ref, pl.program_id(0)),
        grid=(seq_lens.shape[0],),
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        name="tq_piece_table",
    )(seq_lens.astype(jnp.int32))


def table_program(batch: int, *, num_kv_heads: int, block_size: int, max_blocks: int, step_pages: int,
                  resident: int, num_splits: int | None = None, waves: int = WAVES, fill: float = FILL):
    """:func:`piece_table`'s programs for another Triton kernel to run in a program per sequence (the Mosaic decode's
    prologue): ``(body, out_shape)``, ``body(lens_ref, table_ref, info_ref, seq)`` on whole refs (sequence ``seq``'s
    share, an int32 scalar; every sequence's must run), ``out_shape`` the table's and the info's
    ``jax.ShapeDtypeStruct``."""
    n_pieces, n_wave = (grid_size(batch, num_kv_heads, resident, num_splits, w, _max_steps(max_blocks, step_pages))
                        for w in (waves, 1))
    table_shape, info_shape = _table_shapes(batch, num_kv_heads, n_pieces)
    body = functools.partial(_table_share, batch=batch, block_size=block_size, max_blocks=max_blocks,
                             step_pages=step_pages, n_pieces=n_pieces, n_wave=n_wave, num_splits=num_splits,
                             fill=fill)
    return body, (jax.ShapeDtypeStruct(table_shape, jnp.int32), jax.ShapeDtypeStruct(info_shape, jnp.int32))


@functools.partial(jax.jit, static_argnames=("num_kv_heads", "block_size", "max_blocks", "step_pages", "resident",
                                             "num_splits", "waves", "fill"))
def piece_table_reference(seq_lens: jax.Array, *, num_kv_heads: int, block_size: int, max_blocks: int,
                          step_pages: int, resident: int, num_splits: int | None = None, waves: int = WAVES,
                          fill: float = FILL) -> tuple[jax.Array, jax.Array]:
    """:func:`piece_table` in plain jnp (every chunk tried at once, not bisected), its padding included."""
    batch, hk = seq_lens.shape[0], num_kv_heads
    n_pieces, n_wave = (grid_size(batch, hk, resident, num_splits, w, _max_steps(max_blocks, step_pages))
                        for w in (waves, 1))
    table_shape, info_shape = _table_shapes(batch, hk, n_pieces)
    lens = jnp.zeros(info_shape[2], jnp.int32).at[:batch].set(seq_lens)
    used, steps = _steps(lens, block_size=block_size, max_blocks=max_blocks, step_pages=step_pages)
    max_steps = _max_steps(max_blocks, step_pages)
    if num_splits is not None:
        chunk = jnp.int32(-(-max_steps // num_splits))
    else:
        c = jnp.arange(1, max_steps + 1, dtype=jnp.int32)
        pieces = jnp.sum((steps[None, :] + c[:, None] - 1) // c[:, None], axis=1)
        chunk = c[jnp.argmax(pieces <= n_wave)]  # the first that fits (the longest always does: one piece a sequence)
        if n_pieces > n_wave:
            chunk = _fill_rule(steps, chunk, c[jnp.argmax(pieces <= n_pieces)], n_wave, fill)
    whole = steps // chunk
    count = whole + (steps % chunk > 0).astype(jnp.int32)
    rem, idx = steps % chunk, jnp.arange(steps.shape[0], dtype=jnp.int32)
    rank = jnp.sum(jnp.where(rem[:, None] > 0, _ahead(rem, idx, rem, idx), 0), axis=0)
    j = jnp.arange(table_shape[1], dtype=jnp.int32)
    table = jnp.stack(_pieces_of(steps, count, whole, chunk, used, rank, j, step_pages=step_pages,
                                 n_pieces=n_pieces, batch=batch))
    first_slot = jnp.cumsum(count) - count
    heads = jnp.arange(hk, dtype=jnp.int32)[:, None]
    info = jnp.stack([first_slot[None, :] * hk + heads, jnp.broadcast_to(count, (hk, count.shape[0]))])
    return table.astype(jnp.int32), info.astype(jnp.int32)


_LONG_MERGE = 8  # pieces of a sequence beyond which _fill_rule calls the finer cut's merge long
_MERGE_TILE = 16  # blocks of at least this many pieces load as one tile (below: a load a piece)
_MERGE_BLOCK = 64  # pieces a merge program loads at once, at most (a power of 2: one online merge step a block)
# a block's elements of o, at most: 64 floats a thread of the program's warp (PyPI Triton 3.9, sm_90: the Mosaic
# layout's block of 64 pieces x 8 D rows x 4 query rows in 136 registers; the Triton decode's 64 x 8 x 16 in 255 and
# 123 spilled stores, docs/data/static_sass_cpu_2026-12-01_s28.log)
_MERGE_ELEMENTS = 2048
_MERGE_ROWS = 8  # D rows of the partial outputs a merge program combines, at most (a power of 2)
# merge programs enough to keep the device busy: a program takes more groups of D rows only while the grid keeps
# this many (H200, under ncu, docs/data/merge_h200_2026-12-01_s29.log: B=32, 16k, 4 groups a program (1024
# programs) 4.9 us against 6.5 for 1 (4096); B=128 6.5 against 13.0; B=1, 4k, 1 group (128 programs) 5.5 against
# 8.1 for 4 (32))
_MERGE_PROGRAMS = 1024
_MERGE_GROUPS = 4  # groups of D rows a merge program takes, at most
# merge programs few enough for 4 warps each (more: 1). H200, under ncu (docs/data/merge_h200_2026-12-01_s31.log):
# 128 programs (B=1, 4k) 4.8-5.0 us with 4 warps against 5.3 with 1, 256 (B=2) 6.1 against 6.4; 512 (B=4) 5.7
# against 5.4, 1024 (B=8 to 128) 5.6-8.8 against 4.2-5.4
_MERGE_FEW_PROGRAMS = 256


@functools.cache
def merge_groups(channels: tuple[int, ...] | None, d: int) -> tuple[int, int, int, np.ndarray]:
    """The merge programs' share of the D rows of the pieces' outputs, whose row i holds output channel
    ``channels[i]`` (None: channel i): ``(size, row_stride, channel_stride, starts)``, program g combining rows
    ``starts[0, g] + i * row_stride`` into channels ``starts[1, g] + i * channel_stride``, i < size: the largest
    power-of-2 size up to 8 for which such strided groups cover the rows once (the decode's value orders: 4)."""
    chan = np.arange(d) if channels is None else np.asarray(channels)
    size = min(d, _MERGE_ROWS)
    while True:
        for row_stride in (1 << k for k in range(d.bit_length())):
            free, starts, strides = np.ones(d, bool), [], set()
            for r in range(d):
                if not free[r]:
                    continue
                rows = r + row_stride * np.arange(size)
                if rows[-1] >= d or not free[rows].all():
                    break
                steps = np.diff(chan[rows])
                if size > 1 and (steps[0] <= 0 or np.any(steps != steps[0])):
                    break
                strides.add(int(steps[0]) if size > 1 else 1)
                free[rows] = False
                starts.append((r, chan[r]))
            else:
                if len(strides) == 1:
                    return size, row_stride, strides.pop(), np.array(starts, np.int32).T.copy()
        size //= 2


def merge_block(slots: int, num_kv_heads: int, batch: int, piece_elements: int) -> int:
    """Pieces a merge program loads at once: the largest power of 2 up to the slot rows a sequence has on average
    (``slots // num_kv_heads`` over ``batch``), at most :data:`_MERGE_BLOCK`, the slot rows, and
    :data:`_MERGE_ELEMENTS` over a piece's ``piece_elements`` (the program's D rows times the query rows kept)."""
    n_rows = slots // num_kv_heads
    cap = min(_MERGE_BLOCK, max(1, _MERGE_ELEMENTS // piece_elements), n_rows)
    return 1 << (min(cap, -(-n_rows // batch)).bit_length() - 1)


def merge_program_groups(pairs: int, n_groups: int) -> int:
    """Groups of D rows a merge program takes, of ``n_groups`` for each of ``pairs`` (sequence, KV head) pairs: the
    largest power of 2 up to :data:`_MERGE_GROUPS` that divides ``n_groups`` and leaves at least
    :data:`_MERGE_PROGRAMS` programs (1 where none does)."""
    groups = 1
    while (2 * groups <= _MERGE_GROUPS and n_groups % (2 * groups) == 0
           and pairs * n_groups // (2 * groups) >= _MERGE_PROGRAMS):
        groups *= 2
    return groups


def merge_warps(programs: int) -> int:
    """Warps a merge program: 4 where the grid has at most :data:`_MERGE_FEW_PROGRAMS` programs (a program's
    tiles split over its warps: a shorter chain each), 1 otherwise (more programs at once)."""
    return 4 if programs <= _MERGE_FEW_PROGRAMS else 1


def _tree(op, xs: list):
    """``op`` over ``xs`` (a power-of-2 count) as a balanced tree: independent steps, not a chain."""
    while len(xs) > 1:
        xs = [op(xs[k], xs[k + 1]) for k in range(0, len(xs), 2)]
    return xs[0]


def _static_at(values: tuple[int, ...], i):
    """``values[i]`` for a traced int32 index: a chain of selects over the constants (no memory round trip)."""
    out = jnp.int32(values[0])
    for k, v in enumerate(values[1:], 1):
        out = jnp.where(i == k, jnp.int32(v), out)
    return out


def _merge_kernel(info_ref, o_ref, lse_ref, out_ref, *, starts: tuple[tuple[int, ...], tuple[int, ...]], block: int,
                  groups: int, size: int, row_stride: int, channel_stride: int, rows: int, d_major: bool,
                  lse_scale: float):
    # o_ref [P, Hk, D, R] (d_major) or [P, Hk, R, D], lse_ref [P, Hk, L, R]: slot s = p * Hk + h at [p, h]
    n_rows, hk = o_ref.shape[0], o_ref.shape[1]
    b, h = pl.program_id(0) // hk, pl.program_id(0) % hk
    mine = [pl.program_id(1) * groups + g for g in range(groups)]  # this program's groups of D rows
    # the groups' first rows and channels as constants: loaded from memory, ptxas put that load after the wait for
    # the table's first slot, a third round trip before the tiles' loads
    d_rows = [pl.ds(_static_at(starts[0], g), size, row_stride) for g in mine]
    first, count = info_ref[0, h, b] // hk, info_ref[1, h, b]  # the pieces at rows first .. first + count - 1
    q_rows = pl.ds(0, rows)
    scaled = (lambda lse: lse) if lse_scale == 1.0 else (lambda lse: lse * lse_scale)
    along = (lambda w: w[None, :]) if d_major else (lambda w: w[:, None])  # a [rows] weight along o's tile

    def load(p):  # o's tiles [.., size, rows] (d_major) or [.., rows, size], a group each, and the log-sum-exps
        tiles = [o_ref[p, h, dr, q_rows] if d_major else o_ref[p, h, q_rows, dr] for dr in d_rows]
        return tiles, lse_ref[p, h, 0, q_rows]

    def online(carry, lse_max, ws, o_ws):  # the running merge and a block's maximum, weights and weighted sums
        m, den, accs = carry
        m_new = jnp.maximum(m, lse_max)
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        a = jnp.exp2(m - m_safe)
        return m_new, den * a + ws(m_safe), [acc * along(a) + o_w for acc, o_w in zip(accs, o_ws(m_safe))]

    def tile_step(i, carry):  # the block's rows in one tile load, shifted back where they would pass the end
        start = jnp.minimum(first + i * block, n_rows - block)
        piece = start + lax.broadcasted_iota(jnp.int32, (block, rows), 0) - first
        tiles, lse = load(pl.ds(start, block))
        lse = jnp.where((piece >= i * block) & (piece < count), scaled(lse), -jnp.inf)  # others' rows: -inf

        def o_ws(m_safe):  # rows of no weight may hold anything (NaN: unwritten); -inf (empty) rows weigh nothing
            w = jnp.exp2(lse - m_safe[None, :])
            w = w[:, None, :] if d_major else w[:, :, None]
            return [jnp.sum(jnp.where(w > 0, o * w, 0.0), axis=0) for o in tiles]

        return online(carry, jnp.max(lse, axis=0), lambda m_safe: jnp.sum(jnp.exp2(lse - m_safe[None, :]), axis=0),
                      o_ws)

    def piece_step(i, carry):  # a load a piece, all first (their addresses do not wait for the sums)
        ok = [i * block + u < count for u in range(block)]
        loads = [load(jnp.where(k, first + i * block + u, first)) for u, k in enumerate(ok)]  # past: weight 0
        lses = [jnp.where(k, scaled(lse), -jnp.inf) for k, (_, lse) in zip(ok, loads)]

        def o_ws(m_safe):  # a piece past the count (its load at the first slot) weighs 0, whatever that slot holds
            ws = [along(jnp.exp2(lse - m_safe)) for lse in lses]
            return [_tree(jnp.add, [jnp.where(w > 0, tiles[g] * w, 0.0) for (tiles, _), w in zip(loads, ws)])
                    for g in range(groups)]

        return online(carry, _tree(jnp.maximum, lses),
                      lambda m_safe: _tree(jnp.add, [jnp.exp2(lse - m_safe) for lse in lses]), o_ws)

    shape = (size, rows) if d_major else (rows, size)
    init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
            [jnp.zeros(shape, jnp.float32) for _ in range(groups)])
    step = tile_step if block >= _MERGE_TILE else piece_step
    # the first block before the loop: its loads wait for the table's first slot, not for the count (in the loop,
    # the compilers sank them under the loop's test: one more round trip to memory); a sequence without pieces weighs
    # all its rows at 0
    carry = step(0, init)
    _, den, accs = lax.fori_loop(1, (count + block - 1) // block, step, carry)
    den = along(jnp.where(den > 0, den, 1.0))
    for g, acc in zip(mine, accs):
        out = acc / den
        out_ref[pl.program_id(0), q_rows, pl.ds(_static_at(starts[1], g), size, channel_stride)] = (
            (out.T if d_major else out).astype(out_ref.dtype))


@functools.partial(jax.jit, static_argnames=("batch", "rows", "channels", "d_major", "lse_scale", "dtype",
                                             "block", "groups", "num_warps", "interpret"))
def merge_pieces(o: jax.Array, lse: jax.Array, info: jax.Array, *, batch: int, rows: int | None = None,
                 channels: tuple[int, ...] | None = None, d_major: bool = True, lse_scale: float = 1.0,
                 dtype: Any = jnp.float32, block: int | None = None, groups: int | None = None,
                 num_warps: int | None = None, interpret: bool = False) -> jax.Array:
    """The pieces' partial outputs -> [B * Hk, rows, D] ``dtype`` (row b * Hk + h; channels in order). ``o``: each
    piece's output for R query rows, normalised within the piece, float32 [slots, D, R] (``d_major``) or [slots,
    R, D]; its D row i is output channel ``channels[i]`` (None: i). ``lse`` [slots, L, R] float32: row 0 the
    pieces' log-sum-exps, in base 2 once times ``lse_scale``. ``info`` [2, Hk, >= B] int32 (:func:`piece_table`): KV
    head h of sequence b has ``info[1, h, b]`` pieces, at slots ``info[0, h, b] + i * Hk``; one without pieces gets
    zeros. Slots a multiple of Hk; slots of no piece may hold anything (NaN too). ``rows``: the first query rows kept
    (default R). D, R and ``rows`` powers of 2. ``block``: pieces a program loads at once (a power of 2 up to the
    slot rows, slots / Hk; default :func:`merge_block`). ``groups``: groups of D rows a program merges (a divisor of
    their count; the pieces' weights computed once for all; default :func:`merge_program_groups`).

    One program per (sequence, KV head) and group of up to 8 of the D rows (:func:`merge_groups`: strided rows
    into strided channels, so that the channel order costs no pass of its own), one warp (Triton lowering: CUDA,
    ROCm, interpret mode): a merge is latency, so more programs with less each finish sooner (H200, 8 KV heads, 64
    pieces each, under ncu: 13.0 us for 8 rows a program against 38.8 for a program of 4 warps per (sequence, KV
    head); docs/data/decode_merge_h200_2026-11-30_s26.log). A (sequence, KV head)'s slots are consecutive rows of o
    seen as [slots / Hk, Hk, ...]; a program loads a block of them at once and merges the block in one online
    log-sum-exp step (the block's maximum, then independent weights and sums): blocks of :data:`_MERGE_TILE` or
    more as one tile of whole rows (others' too, weighing nothing), smaller ones a load a piece. H200, under ncu
    (docs/data/merge_h200_2026-12-01_s28.log, call 4): 64 pieces a sequence (B=1, 4k), a tile of 64 5.6 us, of 32
    5.7, of 16 6.1 (a load a piece, call 3: 8.8-9.5; a step a piece before: 9.5-9.9); 4 (B=32, 16k), a load a piece
    6.5 us (a tile, call 2: 7.8), and 4.9 with 4 groups of D rows a program (docs/data/merge_h200_2026-12-01_s29.log).
    The first block is merged before the loop and the groups' starts are constants, so that the tiles' loads wait for
    one round trip to the table, not three: B=32, 16k 4.3 us against 5.1, B=128 5.3 against 6.4, B=1 unchanged
    (docs/data/merge_h200_2026-12-01_s30.log). ``num_warps``: a program's warps (default :func:`merge_warps`: 4
    for a grid of few programs, whose tiles they split, fewer instructions a warp: B=1, 4k, PyPI Triton 3.9's SASS
    1264 a warp at 1, 672 at 4; 4.8-5.0 us against 5.3, docs/data/merge_h200_2026-12-01_s31.log).
    """
    n_bh, hk = batch * info.shape[1], info.shape[1]
    d, r = (o.shape[1], o.shape[2]) if d_major else (o.shape[2], o.shape[1])
    if o.shape[0] % hk or lse.shape[0] != o.shape[0]:
        raise ValueError(f"o {o.shape} and lse {lse.shape}: their slots must agree and be a multiple of Hk={hk}")
    rows = r if rows is None else rows
    size, row_stride, channel_stride, starts = merge_groups(channels, d)
    groups = merge_program_groups(n_bh, starts.shape[1]) if groups is None else groups
    if groups < 1 or starts.shape[1] % groups:
        raise ValueError(f"groups={groups} must divide the {starts.shape[1]} groups of D rows")
    block = merge_block(o.shape[0], hk, batch, groups * size * rows) if block is None else block
    if block < 1 or block & (block - 1) or block > o.shape[0] // hk:
        raise ValueError(f"block={block} must be a power of 2 up to the slot rows, {o.shape[0] // hk}")
    n_programs = n_bh * (starts.shape[1] // groups)
    num_warps = merge_warps(n_programs) if num_warps is None else num_warps
    if num_warps < 1 or num_warps & (num_warps - 1):
        raise ValueError(f"num_warps={num_warps} must be a power of 2")
    kernel = functools.partial(_merge_kernel, starts=tuple(tuple(int(x) for x in row) for row in starts), block=block,
                               groups=groups, size=size, row_stride=row_stride, channel_stride=channel_stride,
                               rows=rows, d_major=d_major, lse_scale=lse_scale)
    return pl.pallas_call(
        kernel,
        grid=(n_bh, starts.shape[1] // groups),
        out_shape=jax.ShapeDtypeStruct((n_bh, rows, d), dtype),
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        name="tq_merge_pieces",
    )(info, o.reshape(o.shape[0] // hk, hk, *o.shape[1:]),
      lse.reshape(lse.shape[0] // hk, hk, *lse.shape[1:]))


def merge_pieces_reference(o: jax.Array, lse: jax.Array, info: jax.Array, *, batch: int, rows: int | None = None,
                           channels: tuple[int, ...] | None = None, d_major: bool = True, lse_scale: float = 1.0,
                           dtype: Any = jnp.float32) -> jax.Array:
    """:func:`merge_pieces` in plain jnp (segment reductions over the slots)."""
    o = o if d_major else jnp.swapaxes(o, 1, 2)  # [slots, D, R]
    n_bh = batch * info.shape[1]
    first = jnp.swapaxes(info[0], 0, 1)[:batch].reshape(n_bh, 1)  # [B * Hk, 1], row b * Hk + h
    count = jnp.swapaxes(info[1], 0, 1)[:batch].reshape(n_bh, 1)
    offset = jnp.arange(o.shape[0])[None, :] - first  # [B * Hk, slots]
    hk = info.shape[1]
    inside = (offset >= 0) & (offset % hk == 0) & (offset // hk < count)
    owner = jnp.where(jnp.any(inside, axis=0), jnp.argmax(inside, axis=0), n_bh)  # a slot's bh (n_bh: none)
    lse0 = jnp.where(owner[:, None] < n_bh, lse[:, 0, :] * lse_scale, -jnp.inf)
    m = jax.ops.segment_max(lse0, owner, num_segments=n_bh + 1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp2(lse0 - m[owner])
    den = jax.ops.segment_sum(w, owner, num_segments=n_bh + 1)
    num = jax.ops.segment_sum(o * w[:, None, :], owner, num_segments=n_bh + 1)
    merged = (num / jnp.where(den > 0, den, 1.0)[:, None, :])[:n_bh]  # [B * Hk, D, R], o's rows
    if channels is not None:
        merged = merged[:, np.argsort(channels)]  # channel c is o's row argsort(channels)[c]
    return jnp.swapaxes(merged, 1, 2)[:, :rows].astype(dtype)
