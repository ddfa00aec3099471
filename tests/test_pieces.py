"""The decode's work pieces (tqjax.pallas.pieces): the table every program reads, checked against the lengths on the
host, and the merge kernel (interpret mode) against float64 attention over the pieces."""

from __future__ import annotations

import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from tqjax.pallas.pieces import (
    FILL,
    WAVES,
    decode_waves,
    grid_size,
    merge_groups,
    merge_pieces,
    merge_pieces_reference,
    merge_program_groups,
    merge_warps,
    piece_table,
    piece_table_reference,
)

STEP_TOKENS = 64


def table_of(lens, *, hk, block_size, max_blocks, resident=528, num_splits=None, waves=WAVES, fill=FILL):
    """The kernel's table (interpret mode), checked equal to the jnp reference's: (table [4, n], info [2, Hk, B'])."""
    kw = {"num_kv_heads": hk, "block_size": block_size, "max_blocks": max_blocks,
          "step_pages": STEP_TOKENS // block_size, "resident": resident, "num_splits": num_splits, "waves": waves,
          "fill": fill}
    lens = jnp.asarray(lens, jnp.int32)
    table, info = (np.asarray(x) for x in piece_table(lens, interpret=True, **kw))
    ref_table, ref_info = (np.asarray(x) for x in piece_table_reference(lens, **kw))
    np.testing.assert_array_equal(table, ref_table)
    np.testing.assert_array_equal(info, ref_info)
    return table, info


def grid_of(b, *, hk, block_size, max_blocks, resident, waves):
    """The module docstring's grid, on the host: max(waves * ceil(resident / Hk), B) pieces, at most a piece a step
    of every sequence."""
    max_steps = max(1, math.ceil(max_blocks / (STEP_TOKENS // block_size)))
    return min(max(waves * math.ceil(resident / hk), b), b * max_steps)


def chosen_chunk(lens, *, hk, block_size, max_blocks, resident, waves=WAVES, fill=FILL):
    """The module docstring's rule, on the host: the shortest chunk (in steps) whose pieces fit one wave (the grid
    of ``waves=1``), unless the grid holds more pieces and the pieces of the shortest chunk that fit it are
    chosen: where one wave's pieces fill less than ``fill`` of the wave, or that finer cut leaves no sequence more
    than 8 pieces (_LONG_MERGE)."""
    pps = STEP_TOKENS // block_size
    max_steps = max(1, math.ceil(max_blocks / pps))
    steps = [math.ceil(min(math.ceil(n / block_size), max_blocks) / pps) for n in lens]

    def shortest(grid):
        return next(c for c in range(1, max_steps + 1) if sum(math.ceil(s / c) for s in steps) <= grid)

    kw = {"hk": hk, "block_size": block_size, "max_blocks": max_blocks, "resident": resident}
    one, every = grid_of(len(lens), waves=1, **kw), grid_of(len(lens), waves=waves, **kw)
    coarse = shortest(one)
    if every == one:
        return coarse
    fine = shortest(every)
    filled = sum(steps) >= fill * one * coarse
    return coarse if filled and math.ceil(max(steps) / fine) > 8 else fine


def check_table(table, info, lens, *, hk, block_size, max_blocks, chunk, n_pieces):
    """Every page of every sequence in exactly one piece of at most ``chunk`` steps starting at a multiple of it;
    a sequence's pieces in consecutive slots, in page order, and each of its KV heads' pieces at slots
    ``slot * Hk + h`` (``info``); whole pieces before the shorter last ones, those longest first (equal lengths in
    sequence order); piece indices past the pieces read nothing and write slot ``n_pieces``."""
    pps = STEP_TOKENS // block_size
    used = [min(math.ceil(n / block_size), max_blocks) for n in lens]
    seen = {}
    steps_in_order = []
    for b, first, end, slot in table[:, :n_pieces].T:
        if slot == n_pieces:
            assert (b, first, end) == (0, 0, 0)
            continue
        assert 0 <= b < len(lens) and first < end <= used[b]
        assert first % (chunk * pps) == 0 and end - first <= chunk * pps
        assert slot not in seen.values()
        seen[(b, first)] = slot
        steps_in_order.append((math.ceil((end - first) / pps), int(b)))
    for b in range(len(lens)):
        firsts = sorted(f for (s, f) in seen if s == b)
        assert firsts == list(range(0, used[b], chunk * pps))  # covered once, each piece ends where the next starts
        slots = [seen[(b, f)] for f in firsts]
        assert slots == list(range(slots[0], slots[0] + len(slots))) if slots else True
        for h in range(hk):
            start, count = info[:, h, b]
            assert count == len(slots) and (not slots or start == slots[0] * hk + h)
    whole = [s == chunk for s, _ in steps_in_order]
    assert whole == sorted(whole, reverse=True)
    last = [(s, b) for s, b in steps_in_order if s != chunk]
    assert last == sorted(last, key=lambda sb: (-sb[0], sb[1]))
    assert (table[3, len(seen):n_pieces] == n_pieces).all()


@pytest.mark.parametrize("waves", [1, 2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_balanced_table_covers_every_page_once(seed, waves):
    """Random ragged batches (empty sequences included), block sizes, KV heads, table widths and resident counts:
    the Triton kernel (interpret mode) gives the jnp reference's table, which cuts every sequence as the rule
    says."""
    rng = np.random.default_rng(seed)
    block_size = [16, 32, 64][seed % 3]
    hk = [1, 2, 8][seed % 3]
    b = int(rng.integers(1, 40))
    max_blocks = int(rng.integers(1, 300))
    lens = rng.integers(0, max_blocks * block_size + 1, b)
    lens[rng.random(b) < 0.2] = 0  # empty sequences
    resident = int(rng.integers(4, 600))
    table, info = table_of(lens, hk=hk, block_size=block_size, max_blocks=max_blocks, resident=resident, waves=waves)
    max_steps = max(1, math.ceil(max_blocks * block_size / STEP_TOKENS))
    n_pieces = grid_size(b, hk, resident, None, waves, max_steps)
    kw = {"hk": hk, "block_size": block_size, "max_blocks": max_blocks, "resident": resident, "waves": waves}
    assert n_pieces == grid_of(b, **kw) and table.shape[1] >= n_pieces and info.shape[2] >= b
    chunk = chosen_chunk(lens, **kw)
    check_table(table, info, lens, hk=hk, block_size=block_size, max_blocks=max_blocks, chunk=chunk,
                n_pieces=n_pieces)


def test_a_batch_of_many_sequences_starts_the_longest_last_pieces_first():
    """300 sequences in random order (B' = 512: the rank's 16 tiles of 32 sequences), one piece each at 528
    resident programs and Hk=8: the kernel's table is the reference's, and the pieces run longest first, where
    sequence order would leave a long sequence to start last (``experiments.piece_schedule``)."""
    rng = np.random.default_rng(5)
    lens = rng.integers(1, 200 * 16, 300)
    table, info = table_of(lens, hk=8, block_size=16, max_blocks=200)
    n_pieces = grid_size(len(lens), 8, 528, None, WAVES, 50)
    chunk = chosen_chunk(lens, hk=8, block_size=16, max_blocks=200, resident=528)
    check_table(table, info, lens, hk=8, block_size=16, max_blocks=200, chunk=chunk, n_pieces=n_pieces)
    steps = np.ceil(lens / 64).astype(int)
    assert chunk == steps.max() and (table[0, :300] == np.argsort(-steps, kind="stable")).all()


@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_fixed_splits_cut_the_table_width(num_splits):
    lens = [0, 1, 700, 5000, 64, 65]
    max_blocks = 5000 // 16 + 9
    table, info = table_of(lens, hk=2, block_size=16, max_blocks=max_blocks, num_splits=num_splits)
    chunk = math.ceil(math.ceil(max_blocks / 4) / num_splits)
    check_table(table, info, lens, hk=2, block_size=16, max_blocks=max_blocks, chunk=chunk,
                n_pieces=len(lens) * num_splits)
    assert info[1].max() <= num_splits


def test_serving_shapes_at_528_resident_programs():
    """The H200's 528 resident programs (4 on each of 132 cores), Hk=8, block 16, the default two waves of pieces:
    a uniform batch is cut finer than one wave cuts it where that leaves each sequence at most 8 pieces
    (B=32, 16k: four of 64 steps, two waves, where one wave gave two of 128); one long sequence (B=1, 128k: 64 of
    32, one wave; 128 of 16 would leave 128 pieces to merge), a short one (B=1, 4k: 64 of one, the grid of 64
    pieces: a piece a step) and batches of a wave's programs or more (B=128, 4k and 16k: one piece each) are cut as
    one wave cuts them; a long sequence among short ones as finely as one wave allows (one of 128k and 31 of 4k:
    63 pieces of 64 steps, filling 95% of the wave, where 2 splits of the table's width left programs of 1024
    steps); lengths drawn in 1k-32k, whose one-wave cut fills 76% of the wave (167-step pieces), in two waves
    (131 pieces of at most 73 steps)."""
    ragged = list(np.sort(np.random.default_rng(1).integers(1024, 32769, 32))[::-1])  # experiments.ragged_decode
    cases = [([16384] * 32, 1024, 128, 64), ([131072], 8192, 64, 32), ([4096], 256, 64, 1),
             ([4096] * 128, 256, 128, 64), ([16384] * 128, 1024, 128, 256), ([131072] + [4096] * 31, 8192, 63, 64),
             (ragged, 2048, 131, 73)]
    for lens, max_blocks, pieces, chunk in cases:
        table, info = table_of(lens, hk=8, block_size=16, max_blocks=max_blocks)
        n_pieces = grid_size(len(lens), 8, 528, None, WAVES, math.ceil(max_blocks / 4))
        used = table[3, :n_pieces] < n_pieces
        assert used.sum() == pieces
        assert ((table[2, :n_pieces][used] - table[1, :n_pieces][used]) // 4).max() == chunk
        assert chunk == chosen_chunk(lens, hk=8, block_size=16, max_blocks=max_blocks, resident=528)
        check_table(table, info, lens, hk=8, block_size=16, max_blocks=max_blocks, chunk=chunk, n_pieces=n_pieces)


def attention_pieces(rng, lens, table, n_pieces, *, hk, block_size, d, rows):
    """float64 softmax attention of random queries over random K/V, computed per piece of ``table`` and KV head
    (outputs normalised within the piece, base-2 log-sum-exps, at slot ``slot * Hk + h``) and over whole
    sequences: (o, lse, want)."""
    n_bh = len(lens) * hk
    k = rng.standard_normal((n_bh, max(max(lens), 1), d))
    v = rng.standard_normal((n_bh, max(max(lens), 1), d))
    q = rng.standard_normal((n_bh, rows, d))
    o = np.full(((n_pieces + 1) * hk, d, rows), np.nan)  # NaN wherever no piece writes (the merge must not read it)
    lse = np.full(((n_pieces + 1) * hk, 8, rows), np.nan)
    want = np.zeros((n_bh, d, rows))
    for bh in range(n_bh):
        n = lens[bh // hk]
        if n:
            s = q[bh] @ k[bh, :n].T  # [rows, n]
            p = np.exp(s - s.max(axis=1, keepdims=True))
            want[bh] = ((p / p.sum(axis=1, keepdims=True)) @ v[bh, :n]).T
    for b, first, end, slot in table[:, :n_pieces].T[table[3, :n_pieces] < n_pieces]:
        t0, t1 = first * block_size, min(end * block_size, lens[b])
        for h in range(hk):
            s = q[b * hk + h] @ k[b * hk + h, t0:t1].T
            m = s.max(axis=1, keepdims=True)
            p = np.exp(s - m)
            o[slot * hk + h] = ((p / p.sum(axis=1, keepdims=True)) @ v[b * hk + h, t0:t1]).T
            lse[slot * hk + h, 0] = (m[:, 0] + np.log(p.sum(axis=1))) / np.log(2.0)
    return o, lse, want


@pytest.mark.parametrize("num_splits,block,groups", [(None, None, 1), (2, None, 1), (None, 2, 1), (None, 4, 4),
                                                     (None, 16, 1), (None, 16, 8)])
def test_merged_pieces_are_attention_over_whole_sequences(num_splits, block, groups):
    """Pieces of a ragged batch (empty sequences included), attended separately in float64 and merged by the
    kernel in interpret mode (and by the jnp reference): attention over each whole sequence, within float32
    rounding (weights below 1, outputs of size ~1: 1e-5), zeros for empty sequences. Slots no piece wrote hold
    NaN; blocks of 2 and 4 pieces merge a sequence in several steps, one tile of 16 reads others' slots too; a
    program merges 1, 4 or all 8 groups of the D rows."""
    rng = np.random.default_rng(7)
    lens = [0, 1, 100, 333, 64, 1000, 0, 17]
    table, info = table_of(lens, hk=2, block_size=16, max_blocks=70, resident=24, num_splits=num_splits)
    n_pieces = grid_size(len(lens), 2, 24, num_splits, WAVES, math.ceil(70 / 4))
    o, lse, want = attention_pieces(rng, lens, table, n_pieces, hk=2, block_size=16, d=64, rows=8)
    want = np.swapaxes(want, 1, 2)  # [B * Hk, rows, D]
    args = (jnp.asarray(o, jnp.float32), jnp.asarray(lse, jnp.float32), jnp.asarray(info))
    assert np.isnan(o).any() and (block in (None, 16) or info[1].max() >= 2 * block)
    got = np.asarray(merge_pieces(*args, batch=len(lens), block=block, groups=groups, interpret=True))
    ref = np.asarray(merge_pieces_reference(*args, batch=len(lens)))
    chex.assert_shape(got, want.shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ref, want, rtol=0, atol=1e-5)
    assert np.all(got[:2] == 0) and np.all(got[12:14] == 0)  # the empty sequences' bh


@pytest.mark.parametrize("pairs,n_groups,want", [(8, 16, 1), (64, 16, 1), (128, 16, 2), (256, 16, 4), (1024, 16, 4),
                                                 (4096, 2, 2), (4096, 1, 1), (4096, 12, 4), (4096, 6, 2), (4096, 3, 1)])
def test_merge_program_groups_keep_1024_programs(pairs, n_groups, want):
    """A program takes the most groups of D rows (a power of 2, at most 4, dividing their count) that leave 1024
    programs: B=1 at Hk=8 and 16 groups one (128 programs), B=16 two, B=32 four (1024 programs)."""
    assert merge_program_groups(pairs, n_groups) == want


def test_merge_default_groups_merge_correctly(monkeypatch):
    """The default groups (here several a program: the program threshold lowered to this small grid) give the
    float64 merge of the pieces within float32 rounding (1e-5, as above)."""
    from tqjax.pallas import pieces

    monkeypatch.setattr(pieces, "_MERGE_PROGRAMS", 16)
    chosen = []

    def spy(*args):  # the rule itself, its answers recorded
        chosen.append(merge_program_groups(*args))
        return chosen[-1]

    monkeypatch.setattr(pieces, "merge_program_groups", spy)
    rng = np.random.default_rng(11)
    lens = [500, 3, 0, 129, 64]
    table, info = table_of(lens, hk=2, block_size=16, max_blocks=40, resident=24)
    n_pieces = grid_size(len(lens), 2, 24, None, WAVES, math.ceil(40 / 4))
    o, lse, want = attention_pieces(rng, lens, table, n_pieces, hk=2, block_size=16, d=64, rows=8)
    args = (jnp.asarray(o, jnp.float32), jnp.asarray(lse, jnp.float32), jnp.asarray(info))
    warps = []

    def warps_spy(programs):
        warps.append((programs, merge_warps(programs)))
        return warps[-1][1]

    monkeypatch.setattr(pieces, "merge_warps", warps_spy)
    got = np.asarray(merge_pieces(*args, batch=len(lens), rows=4, interpret=True))
    assert chosen == [4]  # 10 (sequence, KV head) pairs x 8 groups of D rows: 20 programs of 4 groups
    assert warps == [(20, 4)]  # the grid's programs, few: 4 warps each
    np.testing.assert_allclose(got, np.swapaxes(want, 1, 2)[:, :4], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="num_warps=3"):
        merge_pieces(*args, batch=len(lens), rows=4, num_warps=3, interpret=True)


@pytest.mark.parametrize("programs,want", [(1, 4), (128, 4), (256, 4), (257, 1), (512, 1), (1024, 1)])
def test_merge_warps_four_for_few_programs(programs, want):
    """4 warps a merge program for grids of at most 256 programs (B = 1 and 2 at Hk = 8, D = 128), 1 above."""
    assert merge_warps(programs) == want


_MERGE_LAYOUTS = [(True, 8, jnp.float32, 1), (True, 4, jnp.bfloat16, "all"), (False, 2, jnp.float32, "all"),
                  (False, 16, jnp.float16, 1)]  # d_major, rows, dtype, groups


@pytest.mark.parametrize("channels,d_major,rows,dtype,groups", [
    (channels, *_MERGE_LAYOUTS[i]) for channels, layouts in [("identity", (0, 3)), ("reversed pairs", (1, 2)),
                                                            ("value4", (0, 2)), ("value3", (1, 3))] for i in layouts])
def test_merge_orders_channels_keeps_rows_and_reads_either_layout(channels, d_major, rows, dtype, groups):
    """The merge writes [B * Hk, rows, D] with the channels in order (o's D row i is channel ``channels[i]``: the
    Mosaic decode's value orders, and orders whose groups are smaller), the first ``rows`` query rows, in
    ``dtype``, from o in either layout and base-e log-sum-exps scaled in the kernel: against the float64 merge of
    the same pieces (attention_pieces) and against the jnp reference, a group of D rows a program or all of them.
    Float32: within 1e-5 (as above); bfloat16 and float16 outputs: one rounding of values up to ~4 (2**-7 and 2**-10
    relative). Each order in two of the four layouts and each layout with two orders (every order in both o
    layouts; the Mosaic decode's orders with one group and with all of them): the full cross took 90 s on a CPU."""
    from tqjax.pallas.decode_mgpu import value3_channel_order, value_channel_order

    rng = np.random.default_rng(len(channels) + rows)
    lens, d, r = [300, 0, 65, 1000], 64, max(rows, 8)
    table, info = table_of(lens, hk=2, block_size=16, max_blocks=70, resident=24)
    n_pieces = grid_size(len(lens), 2, 24, None, WAVES, math.ceil(70 / 4))
    o, lse, want = attention_pieces(rng, lens, table, n_pieces, hk=2, block_size=16, d=d, rows=r)
    order = {"identity": np.arange(d), "reversed pairs": np.arange(d).reshape(-1, 2)[:, ::-1].ravel(),
             "value4": value_channel_order(d), "value3": value3_channel_order(d)}[channels]
    o_rows = np.empty_like(o)
    o_rows[:, np.arange(d)] = o[:, order]  # o's row i holds channel order[i]
    want = np.swapaxes(want, 1, 2)[:, :rows]  # [B * Hk, rows, D], channels in order
    o_in = o_rows if d_major else np.swapaxes(o_rows, 1, 2)
    lse_in = lse if d_major else lse[:, :1] * np.log(2.0)  # base e, [slots, 1, R]
    kw = {"batch": len(lens), "rows": rows, "channels": tuple(int(c) for c in order), "d_major": d_major,
          "lse_scale": 1.0 if d_major else 1 / math.log(2.0), "dtype": dtype}
    args = (jnp.asarray(o_in, jnp.float32), jnp.asarray(lse_in, jnp.float32), jnp.asarray(info))
    n_groups = merge_groups(kw["channels"], d)[3].shape[1]  # "all": one program a (sequence, KV head)
    got = merge_pieces(*args, interpret=True, groups=n_groups if groups == "all" else groups, **kw)
    ref = merge_pieces_reference(*args, **kw)
    chex.assert_shape((got, ref), want.shape)
    assert got.dtype == ref.dtype == dtype
    tol = {jnp.float32: 1e-5, jnp.bfloat16: 4 * 2**-8, jnp.float16: 4 * 2**-11}[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=tol)
    np.testing.assert_allclose(np.asarray(ref, np.float64), want, rtol=0, atol=tol)


def test_merge_weighs_empty_rows_nothing():
    """A -inf log-sum-exp (a row with no token) weighs nothing beside finite ones; a (sequence, KV head) whose every
    row is -inf gets zeros, not NaN."""
    o = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16, 8)), jnp.float32)
    lse = np.zeros((4, 8, 8), np.float32)
    lse[0, 0, 3] = -np.inf
    lse[2:, 0, :] = -np.inf
    info = jnp.asarray([[[0, 2]], [[2, 2]]], jnp.int32)  # [2, Hk=1, B=2]: sequence 0 at slots 0-1, 1 at 2-3
    got = np.asarray(merge_pieces(o, jnp.asarray(lse), info, batch=2, interpret=True))  # [B * Hk, R, D]
    np.testing.assert_allclose(got[0, 3], np.asarray(o)[1, :, 3], rtol=1e-6)
    np.testing.assert_allclose(got[0, 0], (np.asarray(o)[0, :, 0] + np.asarray(o)[1, :, 0]) / 2, rtol=1e-6)
    assert np.all(got[1] == 0)


@pytest.mark.parametrize("block", [1, 2, 16])
def test_merge_sequence_without_pieces_gets_zeros_whatever_its_first_slot_holds(block):
    """A sequence of no pieces (count 0) whose first slot holds NaN output and log-sum-exp (the spare slot, which no
    program wrote): zeros, in a load a piece (blocks 1 and 2) and in one tile (16); the other sequence's merge
    unchanged. The kernel merges a first block before its loop whatever the count."""
    rng = np.random.default_rng(2)
    o = rng.standard_normal((17, 16, 8)).astype(np.float32)  # Hk=1: 17 slot rows, sequence 0 at 0-15, the spare 16
    lse = rng.uniform(-2, 2, (17, 8, 8)).astype(np.float32)
    o[16], lse[16] = np.nan, np.nan
    info = jnp.asarray([[[0, 16]], [[16, 0]]], jnp.int32)  # [2, Hk=1, B=2]: sequence 1 has no piece, first slot 16
    got = np.asarray(merge_pieces(jnp.asarray(o), jnp.asarray(lse), info, batch=2, block=block, interpret=True))
    assert np.all(got[1] == 0)
    w = np.exp2(lse[:16, 0] - lse[:16, 0].max(axis=0))  # [16, R]
    np.testing.assert_allclose(got[0], (np.einsum("pdr,pr->rd", o[:16], w) / w.sum(axis=0)[:, None]), rtol=2e-5,
                               atol=2e-6)


@pytest.mark.parametrize("block,n", [(2, 5), (4, 5), (16, 37), (32, 37)])
def test_merge_blocks_past_the_outputs_end_count_each_piece_once(block, n):
    """A (sequence, KV head) whose n pieces end at the outputs' last slot, merged in blocks whose last one reaches
    past it (a load a piece: blocks of 2 and 4; one tile, shifted back to end at the last slot: 16 and 32): each
    piece counted once, nothing read past the end: the float64 merge of random pieces (1 KV head; sequence 0 at slot
    0, sequence 1's pieces at slots 1..n), within float32 rounding. The log-sum-exps span 400 (base 2): a weight
    taken against anything but the block's maximum overflows."""
    rng = np.random.default_rng(block)
    o = rng.standard_normal((n + 1, 16, 8))
    lse = np.zeros((n + 1, 8, 8))
    lse[:, 0] = rng.uniform(-200, 200, (n + 1, 8))
    info = jnp.asarray([[[0, 1]], [[1, n]]], jnp.int32)  # [2, Hk=1, B=2]
    got = np.asarray(merge_pieces(jnp.asarray(o, jnp.float32), jnp.asarray(lse, jnp.float32), info, batch=2,
                                  block=block, interpret=True))  # [B * Hk, R, D]
    w = np.exp2(lse[1:, 0] - lse[1:, 0].max(axis=0))  # [n, R]
    want = np.einsum("sdr,sr->rd", o[1:], w) / w.sum(axis=0)[:, None]
    np.testing.assert_allclose(got[1], want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[0], o[0].T, rtol=0, atol=1e-6)


def test_merge_refuses_bad_shapes_before_tracing():
    """Slots not a multiple of Hk, lse's slots not o's, a block not a power of 2 or past the slot rows, groups that do
    not divide the D rows' groups: each a ValueError naming the argument."""
    o, lse = jnp.zeros((8, 16, 8), jnp.float32), jnp.zeros((8, 8, 8), jnp.float32)
    info = jnp.zeros((2, 2, 2), jnp.int32)  # Hk=2: 4 slot rows
    with pytest.raises(ValueError, match="multiple of Hk=3"):
        merge_pieces(o, lse, jnp.zeros((2, 3, 2), jnp.int32), batch=2, interpret=True)
    with pytest.raises(ValueError, match="slots must agree"):
        merge_pieces(o, lse[:6], info, batch=2, interpret=True)
    for block in (3, 8):
        with pytest.raises(ValueError, match=f"block={block}"):
            merge_pieces(o, lse, info, batch=2, block=block, interpret=True)
    for groups in (3, 0):
        with pytest.raises(ValueError, match=f"groups={groups}"):
            merge_pieces(o, lse, info, batch=2, groups=groups, interpret=True)


@pytest.mark.parametrize("batch,hk,max_steps,want", [
    (1, 8, 64, 1), (1, 8, 8448, 1), (1, 8, 8449, 2), (4, 8, 64, 1), (4, 8, 2112, 1), (4, 8, 2113, 2), (8, 8, 1056, 1),
    (8, 8, 1057, 2), (16, 8, 32, 1), (16, 8, 132, 1), (16, 8, 133, 2), (17, 8, 31, 1), (17, 8, 32, 2), (32, 8, 16, 1),
    (32, 8, 17, 2), (32, 8, 256, 2), (128, 8, 8, 1), (128, 8, 9, 2), (4, 2, 8448, 1), (4, 2, 8449, 2),
    (33, 2, 1024, 1), (33, 2, 1025, 2), (66, 2, 128, 1), (66, 2, 129, 2), (67, 2, 31, 1), (67, 2, 32, 2)])
def test_decode_waves_one_wave_for_short_tables(batch, hk, max_steps, want):
    """One wave where one wave's pieces (528 resident programs: 66 pieces at Hk=8, 264 at Hk=2; at least a piece a
    sequence) hold the whole table at most 8 steps a piece, 32 with 4 or more pieces a sequence (B=9-16 at Hk=8), 128
    with 8 or more (B <= 8); two otherwise (B=32, 16k: 256 steps a sequence; B=17 past 8 steps a piece)."""
    assert decode_waves(batch, hk, 528, max_steps) == want
