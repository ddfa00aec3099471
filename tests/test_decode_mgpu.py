"""The Mosaic GPU paged decode (tqjax.pallas.decode_mgpu) vs the reference decode.

On a CPU (CI): the kernel's PTX blocks run on a host interpreter of their instructions and must give the
decode table's float16 bits (keys) and ``code * 2**e`` exactly (values); the kernel lowers for CUDA
(``jax.export``, the Pallas -> Mosaic GPU lowering and its layout checks) at several shapes; unsupported
caches are named. On a Hopper GPU (``-m gpu``): the kernel against the reference decode, as
``tests/test_pallas_decode.py`` checks the Triton kernel, with the same tolerance (2e-5 of max|out|: the
products take float16 hi + lo parts of the scaled query and of the probabilities, exact float16 key
and value tiles, float32 accumulation).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from ptx_interpreter import run_ptx
from test_pallas_decode import RTOL, make_case

import tqjax
from tqjax.codec import key_codec
from tqjax.pallas import decode_mgpu, pieces
from tqjax.pallas.decode_mgpu import (
    HADAMARD_PAIRS,
    HALF,
    LAZY_MAX_BITS,
    NARROW,
    VALUE_EXP_MAX,
    copy_shape,
    decode_prologue,
    decode_prologue_reference,
    flat_pages,
    fp8_words_asm,
    hadamard_form,
    key2_word_asm,
    key3_channel_order,
    key3_word_asm,
    key_channel_order,
    key_word_asm,
    lazy_maximum,
    merge_kernel_pieces,
    narrow,
    odd_table,
    on_hopper,
    paged_decode_mgpu,
    paged_decode_mgpu_jit,
    programs_per_core,
    prologue_defaults,
    qjl_channel_order,
    qjl_word_asm,
    query_bound,
    query_columns,
    query_matrix,
    query_row,
    resident_programs,
    table_words,
    tile_order,
    tile_query,
    tile_unit,
    unsupported,
    value3_channel_order,
    value3_word_asm,
    value_channel_order,
    value_constants,
    value_tile_plan,
    value_word_asm,
)
from tqjax.reference import paged_decode_jit, store_jit

MOSAIC_PRESETS = ("turboquant_4bit_nc", "turboquant_k8v4", "turboquant_k3v4_nc", "turboquant_3bit_nc",
                  "turboquant_kqjl4v4", "turboquant_kqjl3v4", "turboquant_k3p5v4", "turboquant_k2p5v4")
SPLIT_PRESETS = ("turboquant_k3p5v4", "turboquant_k2p5v4")


def _halves(regs: dict, names) -> np.ndarray:
    """uint32 registers (float16 pairs, low half first) -> uint16 [..., 2 * len(names)]."""
    return np.stack([h for n in names for h in (regs[n] & 0xFFFF, regs[n] >> 16)], -1).astype(np.uint16)


@pytest.mark.parametrize("odd", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_key_word_asm_gives_the_table(head_dim, odd):
    """Every code in every nibble of a word comes out as the table's float16 bits, in channel order: the
    presets' odd tables (8 entries and a sign) and a table that is not odd (16 entries)."""
    cfg = tqjax.TurboQuantConfig.from_cache_dtype("turboquant_4bit_nc", head_dim)
    table = np.asarray(key_codec(cfg).quantizers[0].centroids, np.float32)
    assert odd_table(table)
    if not odd:
        table = table.copy()
        table[11] *= 1.25  # still sorted, no longer odd
        assert not odd_table(table)
    rng = np.random.default_rng(head_dim)
    codes = rng.integers(0, 16, (4096, 8)).astype(np.uint32)
    codes[:16] = np.arange(16)[:, None]  # every code in every position
    words = np.bitwise_or.reduce(codes << (4 * np.arange(8, dtype=np.uint32)), axis=1)
    asm = key_word_asm(table)
    assert ("pl0" in asm) != odd  # the half table where it suffices
    f16 = table.astype(np.float16).view(np.uint16)
    low_words = [sum(int(f16[i] & 0xFF) << (8 * i) for i in range(4)),
                 sum(int(f16[i] >> 8) << (8 * i) for i in range(4))]
    operands = {"$4": words, "$5": np.full(words.shape, low_words[0], np.uint32),
                "$6": np.full(words.shape, low_words[1], np.uint32)}  # the odd table's low words, from registers
    got = _halves(run_ptx(asm, operands), ["$0", "$1", "$2", "$3"])
    np.testing.assert_array_equal(got, table.astype(np.float16).view(np.uint16)[codes])


@pytest.mark.parametrize("seed", [0, 1])
def test_key3_word_asm_gives_the_table(seed):
    """3-bit keys (turboquant_k3v4_nc) as tqjax.packing stores them (bit 0 of 32 channels in one word, bits 1-2
    of 16 in another): both spans and parities of 32 channels' words, every code in every position."""
    cfg = tqjax.TurboQuantConfig.from_cache_dtype("turboquant_k3v4_nc", 128)
    table = np.asarray(key_codec(cfg).quantizers[0].centroids, np.float32)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 8, (2048, 32)).astype(np.uint32)
    codes[:8] = (np.arange(8)[:, None] + np.arange(32)) % 8  # every code in every position
    words = np.asarray(tqjax.packing.pack_codes(codes, 3, xp=np), np.uint32)  # [2048, 3]: bit-0 word, 2 two-bit words
    f16 = table.astype(np.float16).view(np.uint16)
    low = [np.full(len(words), sum(int(f16[i] >> s & 0xFF) << (8 * i) for i in range(4)), np.uint32) for s in (0, 8)]
    for half in range(2):  # the 16-channel span: half of the bit-0 word, two-bit word `half`
        for parity in range(2):  # its channels 2n + parity
            regs = run_ptx(key3_word_asm(table, half, parity),
                           {"$4": words[:, 0], "$5": words[:, 1 + half], "$6": low[0], "$7": low[1]})
            got = _halves(regs, ["$0", "$1", "$2", "$3"])
            channels = 16 * half + 2 * np.arange(8) + parity
            np.testing.assert_array_equal(got, table.astype(np.float16).view(np.uint16)[codes[:, channels]])
    with pytest.raises(ValueError, match="8 entries"):
        key3_word_asm(np.zeros(16, np.float32), 0, 0)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_key2_tile_in_registers_follows_key3_channel_order(head_dim):
    """2-bit keys (turboquant_kqjl3v4's MSE part) as the kernel builds its tile: thread lane % 4 = l loads its
    D/64 words of a row (l * D/64 ..), group g from word g // 2 with parity g % 2 (key2_word_asm on the PTX
    interpreter); column c holds the table value of channel key3_channel_order[c] (the 3-bit keys' spans and
    parities), every code in every position."""
    cfg = tqjax.TurboQuantConfig.from_cache_dtype("turboquant_kqjl3v4", 128)
    table = np.asarray(key_codec(cfg).quantizers[0].centroids, np.float32)
    f16 = table.astype(np.float16)
    rng = np.random.default_rng(head_dim)
    rows = 64
    codes = rng.integers(0, 4, (rows, head_dim)).astype(np.uint32)
    codes[:4] = (np.arange(4)[:, None] + np.arange(head_dim)) % 4
    words = np.asarray(tqjax.packing.pack_codes(codes, 2, xp=np), np.uint32)  # [rows, D/16]
    planes = [np.full(rows, sum(int(f16.view(np.uint16)[i] >> s & 0xFF) << (8 * i) for i in range(4)), np.uint32)
              for s in (0, 8)]
    n2 = head_dim // 64
    tile = np.zeros((rows, head_dim), np.float16)
    for lane4 in range(4):
        for g in range(head_dim // 32):
            regs = run_ptx(key2_word_asm(table, g % 2),
                           {"$4": words[:, lane4 * n2 + g // 2], "$5": planes[0], "$6": planes[1]})
            _place_group(tile, regs, g, lane4)
    np.testing.assert_array_equal(tile, f16[codes][:, key3_channel_order(head_dim)])
    with pytest.raises(ValueError, match="4 entries"):
        key2_word_asm(np.zeros(8, np.float32), 0)


def test_key_word_asm_rejects_other_tables():
    with pytest.raises(ValueError, match="16 entries"):
        key_word_asm(np.zeros(8, np.float32))


def test_fp8_words_asm_converts_every_byte():
    """Every float8 e4m3 byte (NaN's two excepted) in every position of the two words comes out as the
    float16 bits of its value, in channel order."""
    rng = np.random.default_rng(2)
    finite = np.setdiff1d(np.arange(256), [0x7F, 0xFF]).astype(np.uint8)
    raw = rng.choice(finite, (4096, 8)).astype(np.uint8)
    raw.reshape(-1)[: finite.size] = finite  # every byte somewhere
    words = raw.reshape(-1, 2, 4).view("<u4").reshape(-1, 2).astype(np.uint32)
    regs = run_ptx(fp8_words_asm(), {"$4": words[:, 0], "$5": words[:, 1]})
    want = raw.view(ml_dtypes.float8_e4m3fn).astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(_halves(regs, ["$0", "$1", "$2", "$3"]), want)


def test_value_word_asm_centres_and_scales_codes_exactly():
    """(code - 7.5) * 2**e exactly, for every code in every position and every power of two the kernel
    meets (a float16 value scale's, subnormal ones taken as 2**-14, larger ones capped at 2**9), the pairs
    in value_channel_order; the offset -71.5 * 2**e as the kernel builds its float16 bits (exponent field + 6,
    mantissa 0x078) is that value."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, (2048, 8)).astype(np.uint32)
    codes[:16] = np.arange(16)[:, None]
    words = np.bitwise_or.reduce(codes << (4 * np.arange(8, dtype=np.uint32)), axis=1)
    order = value_channel_order(8)
    assert VALUE_EXP_MAX == 9
    for e in range(-14, VALUE_EXP_MAX + 1):
        p2 = int(np.float16(2.0**e).view(np.uint16))
        n2 = (p2 + (6 << 10)) | 0x8078
        assert np.uint16(n2).view(np.float16) == -71.5 * 2.0**e, e
        regs = run_ptx(value_word_asm(), {"$4": words, "$5": np.full(words.shape, p2 | (p2 << 16), np.uint32),
                                          "$6": np.full(words.shape, n2 | (n2 << 16), np.uint32)})
        got = _halves(regs, ["$0", "$1", "$2", "$3"]).view(np.float16).astype(np.float64)
        np.testing.assert_array_equal(got, (codes[:, order] - 7.5) * 2.0**e, err_msg=f"e={e}")


def test_value3_word_asm_centres_and_scales_codes_exactly():
    """3-bit values (turboquant_3bit_nc) as tqjax.packing stores them: (code - 3.5) * 2**e exactly, in
    value3_channel_order, for every code in every position of 32 channels' words and every power of two the
    kernel meets; the offset -67.5 * 2**e as the kernel builds its float16 bits (value_constants)."""
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 8, (1024, 32)).astype(np.uint32)
    codes[:8] = (np.arange(8)[:, None] + np.arange(32)) % 8
    words = np.asarray(tqjax.packing.pack_codes(codes, 3, xp=np), np.uint32)
    centre, _, mantissa = value_constants(3)
    order = value3_channel_order(32)
    for e in range(-14, VALUE_EXP_MAX + 1):
        p2 = int(np.float16(2.0**e).view(np.uint16))
        n2 = (p2 + (6 << 10)) | 0x8000 | mantissa
        assert np.uint16(n2).view(np.float16) == -(64 + centre) * 2.0**e, e
        for g in range(4):  # span g // 2 (half of the bit-0 word, two-bit word), parity g % 2
            regs = run_ptx(value3_word_asm(g // 2, g % 2), {
                "$4": words[:, 0], "$5": words[:, 1 + g // 2],
                "$6": np.full(len(words), p2 | (p2 << 16), np.uint32),
                "$7": np.full(len(words), n2 | (n2 << 16), np.uint32)})
            got = _halves(regs, ["$0", "$1", "$2", "$3"]).view(np.float16).astype(np.float64)
            want = (codes[:, order[8 * g:8 * g + 8]] - centre) * 2.0**e
            np.testing.assert_array_equal(got, want, err_msg=f"e={e} g={g}")


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_3bit_value_stores_cover_the_tile_without_bank_conflicts(head_dim):
    """_store_values3's order: thread t stores the 8-channel groups g = i ^ 4 (t % 2) of half t % 2 of row t // 2
    (D = 64: g = i): every unit of the tile once, no quarter-warp store meets a bank conflict (without the
    stagger the two halves of a row share bank groups at D >= 128)."""
    groups = head_dim // 16
    stagger = 0 if head_dim == 64 else 4
    seen = collections.Counter()
    for warp in range(4):
        lanes = np.arange(32) + 32 * warp
        for i in range(groups):
            units = [tile_unit(t // 2, (t % 2) * groups + (i ^ (stagger * (t % 2))), head_dim) for t in map(int, lanes)]
            assert _bank_conflicts(np.array(units)) == 0, (warp, i)
            seen.update(units)
    assert sorted(seen) == list(range(64 * head_dim // 8)) and set(seen.values()) == {1}


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_3bit_value_tile_follows_value3_channel_order(head_dim):
    """_store_values3 as the kernel runs it (thread t: half h = t % 2 of row t // 2, bit-0 words h n0 + (h ^ k),
    two-bit words h n2 + (2h ^ m), group i from bit-0 word i // 4 half i // 2 % 2 and two-bit word i // 2,
    parity i % 2, into unit h groups + (4h ^ i); D = 64: bit-0 word h, two-bit words 2h + m, unit 4h + i;
    value3_word_asm on the PTX interpreter) fills column c of the tile with channel value3_channel_order[c]."""
    rng = np.random.default_rng(head_dim)
    rows = 4
    codes = rng.integers(0, 8, (rows, head_dim)).astype(np.uint32)
    words = np.asarray(tqjax.packing.pack_codes(codes, 3, xp=np), np.uint32)
    p2 = int(np.float16(1.0).view(np.uint16))
    n2 = (p2 + (6 << 10)) | 0x8000 | value_constants(3)[2]
    one = {"$6": np.full(rows, p2 | (p2 << 16), np.uint32), "$7": np.full(rows, n2 | (n2 << 16), np.uint32)}
    groups, n0, n2w = head_dim // 16, head_dim // 64, head_dim // 32
    tile = np.full((rows, head_dim), np.nan)
    stagger = 0 if head_dim == 64 else 1
    for h in range(2):
        bit0 = [words[:, h * n0 + ((stagger * h) ^ k)] for k in range(n0)]
        two = [words[:, head_dim // 32 + h * n2w + ((2 * stagger * h) ^ m)] for m in range(n2w)]
        for i in range(groups):
            regs = run_ptx(value3_word_asm(i // 2 % 2, i % 2), {"$4": bit0[i // 4], "$5": two[i // 2], **one})
            unit = h * groups + ((4 * stagger * h) ^ i)
            tile[:, 8 * unit:8 * unit + 8] = _halves(regs, ["$0", "$1", "$2", "$3"]).view(np.float16)
    order = value3_channel_order(head_dim)
    np.testing.assert_array_equal(np.sort(order), np.arange(head_dim))
    np.testing.assert_array_equal(tile, codes[:, order] - 3.5)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_value_channel_order_is_a_permutation_within_words(head_dim):
    order = value_channel_order(head_dim)
    np.testing.assert_array_equal(np.sort(order), np.arange(head_dim))
    np.testing.assert_array_equal(order // 8, np.arange(head_dim) // 8)


def _bank_conflicts(units_by_lane: np.ndarray) -> int:
    """Extra shared-memory wavefronts of one warp's 16-byte accesses ([32] unit indices): each quarter-warp
    is served in one unless two of its distinct units share a 16-byte bank group (unit % 8)."""
    extra = 0
    for quarter in units_by_lane.reshape(4, 8):
        groups: dict = {}
        for u in quarter:
            groups.setdefault(int(u) % 8, set()).add(int(u))
        extra += max(len(g) for g in groups.values()) - 1
    return extra


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_value_tile_plan_covers_the_tile_without_bank_conflicts(head_dim):
    """Every (token row, word) of a step's value words is converted by exactly one thread, each thread's
    words lie in one row (one value scale), and no quarter-warp's 16-byte load or store meets a bank
    conflict (loads from the [64, D/8] words, stores into the swizzled float16 tile)."""
    words = head_dim // 8
    seen = np.zeros((64, words), int)
    for warp in range(4):
        lanes = np.arange(32) + 32 * warp
        for j in range(head_dim // 64):
            plan = [value_tile_plan(int(t), j, 0, head_dim) for t in lanes]
            load_units = np.array([(r * words + w) // 4 for r, w in plan])
            assert all((r * words + w) % 4 == 0 for r, w in plan)  # 16-byte aligned
            assert _bank_conflicts(load_units) == 0, (warp, j)
            for i in range(4):
                plan = [value_tile_plan(int(t), j, i, head_dim) for t in lanes]
                rows = {int(t) // 2 for t in lanes}
                assert {r for r, _ in plan} == rows
                for r, w in plan:
                    seen[r, w] += 1
                assert _bank_conflicts(np.array([tile_unit(r, w, head_dim) for r, w in plan])) == 0, (warp, j, i)
    np.testing.assert_array_equal(seen, 1)


QUERY_CASES = [
    # preset, head_dim, Hq, Hk, query dtype
    ("turboquant_4bit_nc", 128, 32, 8, jnp.float32),
    ("turboquant_kqjl3v4", 128, 12, 4, jnp.bfloat16),  # D' = 2 D, a group of 3
    ("turboquant_k3p5v4", 128, 8, 8, jnp.float32),  # split keys, a group of 1
    ("turboquant_k8v4", 64, 16, 2, jnp.float16),  # float8 keys: the matrix a permutation
    ("turboquant_3bit_nc", 256, 14, 2, jnp.float32),  # a group of 7
    ("turboquant_kqjl4v4", 256, 16, 2, jnp.float32),  # D' = 512
]


PROLOGUE_VARIANTS = [(True, None, None, None)] + [  # (table_apart, form, num_warps, columns): the default, others
    (False, "chunks", 8, None), (True, "outer", 4, 2), (True, "chunks", 4, 1), (True, "chunks", 8, 4),
    (True, "chunks", 4, None), (True, "hadamard", None, None), (False, "hadamard", 1, None)]


@pytest.mark.parametrize("name,head_dim,hq,hk,dtype,variant",
                         [(*case, PROLOGUE_VARIANTS[0]) for case in QUERY_CASES]
                         + [(*QUERY_CASES[i], v) for i in (1, 4) for v in PROLOGUE_VARIANTS[1:5]
                            if i == 1 or v[1] != "outer"]  # the outer products: 30-40 s a case on a CPU
                         + [(*QUERY_CASES[i], v) for i in (0, 2, 3) for v in PROLOGUE_VARIANTS[5:]]
                         + [(*QUERY_CASES[4], v) for v in PROLOGUE_VARIANTS[6:]])  # D=256, 7 rows: 4 tiles of 2
def test_decode_prologue(name, head_dim, hq, hk, dtype, variant):
    """The prologue kernel (interpret mode) and its jnp reference (XLA's composition, the former path): the query's
    operands against float64 ``q @ query_matrix`` (tile_query on the identity, checked against tile_query itself):
    the inverse powers (times the factor) equal, hi + lo times them within 1e-6 of the row's largest magnitude (the
    kernel's float32 sums of D products: ~sqrt(D) roundings of 2**-24; the split itself keeps 2**-22), each row's
    bound (its largest magnitude before the matrix times query_bound) scaled into [2**13, 2**14) and its hi part
    below 2**14, the rows past the group zero (16 rows, groups of at most 4: 8, each head's parts side by side);
    rows of magnitudes from 1e-3 to 1e3, an all-zero row and the signs of the matrix's longest column (the bound met
    where that column is flat: Hadamard rotations). Program 0's piece
    table equal to piece_table_reference's. Every case in the default variant (the columns its rule gives: 1, 2 or 4
    here; the Hadamard form, :func:`hadamard_form`, where the matrix has one: MSE, split and float8 keys); groups of 3
    and 7 in the others (the table shared, whole rows, 8 warps), the outer products (the table apart, 2 column blocks)
    in groups of 3; the Hadamard presets also with the dense products and with the Hadamard form beside a shared
    table, a group of 7 at D=256 too (its rows in tiles of 2, :data:`decode_mgpu._HADAMARD_TILE`)."""
    cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, head_dim)
    rng = np.random.default_rng(head_dim + hq)
    b, g, factor = 3, hq // hk, 0.0625 * 1.4426950408889634
    q = rng.standard_normal((b, hq, head_dim)) * 10.0 ** rng.uniform(-3, 3, (b, hq, 1))
    q[1, 0] = 0.0
    w = np.asarray(query_matrix(cfg), np.float64)
    q[2, 1] = 3.0 * np.sign(w[:, np.argmax((w * w).sum(axis=0))])  # the bound met where that column is flat
    q = jnp.asarray(q, dtype)
    lens = jnp.asarray([700, 0, 5000], jnp.int32)
    q64 = np.asarray(q.astype(jnp.float32), np.float64)
    tq = np.asarray(tile_query(cfg, q.astype(jnp.float32)), np.float64)
    assert np.all(np.abs(tq - q64 @ w) <= 1e-6 * np.abs(q64 @ w).max(axis=-1, keepdims=True))
    want = (q64 @ w).reshape(b, hk, g, w.shape[1])
    kw = {"num_kv_heads": hk, "factor": factor, "block_size": 16, "max_blocks": 320, "step_pages": 4, "resident": 24,
          "num_splits": None}
    table_apart, form, num_warps, columns = variant
    got = decode_prologue(q, lens, cfg, interpret=True, table_apart=table_apart, form=form, num_warps=num_warps,
                          columns=columns, **kw)
    ref = decode_prologue_reference(q, lens, cfg, **kw)
    heads = NARROW if narrow(g) else HALF
    for q16, qinv, _, _ in (got, ref):
        chex.assert_shape(q16, (b, hk, 2 * heads, w.shape[1]))
        chex.assert_shape(qinv, (b, hk, 32))
        assert q16.dtype == jnp.float16 and qinv.dtype == jnp.float32
        hi, lo = (np.asarray(q16[:, :, [query_row(r, part, g) for r in range(heads)]], np.float64) for part in (0, 1))
        inv = np.asarray(qinv, np.float64)
        np.testing.assert_array_equal(inv[..., :8], inv[..., 8:16])
        x = (hi + lo) * inv[..., :heads, None] / factor
        top = np.abs(want).max(axis=-1, keepdims=True)
        assert np.all(np.abs(x[:, :, :g] - want) <= 1e-6 * top), np.abs(x[:, :, :g] - want).max(axis=-1) / top[..., 0]
        assert not hi[:, :, g:].any() and not lo[:, :, g:].any()
        assert np.all(np.abs(hi) < 2**14)
        bound = np.abs(q64).max(axis=-1).reshape(b, hk, g) * query_bound(cfg) / inv[..., :g] * factor
        assert np.all((bound >= 2**13) & (bound < 2**14) | (top[..., 0] == 0)), bound
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref[1]))
    for table_got, table_ref in zip(got[2:], ref[2:]):
        np.testing.assert_array_equal(np.asarray(table_got), np.asarray(table_ref))


@pytest.mark.parametrize("name,head_dim", sorted({case[:2] for case in QUERY_CASES}))
def test_query_bound(name, head_dim):
    """query_bound(config) bounds every entry of ``q @ query_matrix`` by max|q| times it: random rows of several
    scales, and the signs of each column (where |q @ w| is that column's 1-norm, the most a row of largest magnitude
    1 gives it); met within 1e-6 by a flat column (the Hadamard rotations'); a float32 at most one step above
    sqrt(D) times the longest column's norm."""
    cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, head_dim)
    w = np.asarray(query_matrix(cfg), np.float64)
    bound = query_bound(cfg)
    c = np.sqrt(w.shape[0]) * np.sqrt((w * w).sum(axis=0)).max()
    assert c <= bound <= np.nextafter(np.float32(c), np.float32(np.inf))
    rng = np.random.default_rng(head_dim)
    q = np.concatenate([rng.standard_normal((64, w.shape[0])) * 10.0 ** rng.uniform(-3, 3, (64, 1)), np.sign(w).T])
    ratio = np.abs(q @ w).max(axis=-1) / np.abs(q).max(axis=-1)
    assert np.all(ratio <= bound)
    if cfg.key_format == "mse":  # a Hadamard rotation: flat columns (split keys: each segment's own, narrower)
        assert ratio.max() >= bound * (1 - 1e-6)


def test_prologue_defaults_rule():
    """The prologue's default form and warps: the matrix's products below HADAMARD_PAIRS pairs and where no Hadamard
    structure exists (QJL keys), 4 warps, 2 from 64 to 1023 pairs; else the Hadamard form, 2 warps, 1 from 1024 pairs
    on."""
    mse, qjl = (tqjax.TurboQuantConfig.from_cache_dtype(n, 128) for n in ("turboquant_4bit_nc", "turboquant_kqjl4v4"))
    assert prologue_defaults(mse, 8) == prologue_defaults(mse, HADAMARD_PAIRS - 1) == ("chunks", 4)
    assert prologue_defaults(mse, HADAMARD_PAIRS) == prologue_defaults(mse, 1023) == ("hadamard", 2)
    assert prologue_defaults(mse, 1024) == ("hadamard", 1)
    assert prologue_defaults(qjl, 63) == prologue_defaults(qjl, 1024) == ("chunks", 4)
    assert prologue_defaults(qjl, 64) == prologue_defaults(qjl, 1023) == ("chunks", 2)


def test_query_columns_rule():
    """The prologue's column blocks: the most (up to 8, >= 16 columns each) whose programs the device holds at once
    (H200's 528: B=1 8, B=32 2, B=128 1 with Hk=8), fewer for narrow rows, 1 where even that does not fit."""
    assert [query_columns(pairs, 128, 528) for pairs in (8, 256, 264, 265, 1024)] == [8, 2, 2, 1, 1]
    assert query_columns(8, 64, 528) == 4 and query_columns(8, 16, 528) == 1 and query_columns(4, 512, 528) == 8
    assert query_columns(130, 128, 528) == 4 and query_columns(8, 128, 8) == 1


@pytest.mark.parametrize("name,head_dim,width", [("turboquant_4bit_nc", 128, 128), ("turboquant_3bit_nc", 64, 64),
                                                  ("turboquant_4bit_nc", 256, 256), ("turboquant_k3p5v4", 128, 64),
                                                  ("turboquant_k2p5v4", 256, 128), ("turboquant_k8v4", 128, 1),
                                                  ("turboquant_kqjl4v4", 128, None), ("turboquant_kqjl3v4", 64, None)])
def test_hadamard_form(name, head_dim, width):
    """hadamard_form: MSE keys with a Hadamard rotation are one block of D columns, split keys two of D/2, float8 keys
    D of 1 (a permutation); the codes' gather is a permutation of the channels and, signed and transformed block by
    block in float64, gives query_matrix (which tile_query makes) within float32 rounding; the kernel's two-contraction
    transform (_hadamard_rows, jnp here) gives the same within float32 sums. QJL keys (a dense projection) have
    none, and asking for the form there is an error."""
    from tqjax.rotation import hadamard_matrix

    cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, head_dim)
    form = hadamard_form(cfg)
    if width is None:
        assert form is None
        with pytest.raises(ValueError, match="Hadamard"):
            decode_prologue(jnp.ones((1, 4, head_dim)), jnp.ones((1,), jnp.int32), cfg, num_kv_heads=1, factor=1.0,
                            block_size=16, max_blocks=4, step_pages=4, resident=8, num_splits=None, form="hadamard",
                            interpret=True)
        return
    codes, got_width = form
    assert got_width == width and codes.dtype == np.int32 and codes.shape == (head_dim,)
    gather, sign = codes >> 1, 1.0 - 2.0 * (codes & 1)
    np.testing.assert_array_equal(np.sort(gather), np.arange(head_dim))
    rng = np.random.default_rng(head_dim)
    q = rng.standard_normal((5, head_dim))
    x = (q[:, gather] * sign).reshape(5, head_dim // width, width)
    want = (x @ hadamard_matrix(width) if width > 1 else x).reshape(5, head_dim)
    w = np.asarray(query_matrix(cfg), np.float64)
    np.testing.assert_allclose(q @ w, want, atol=1e-6 * np.abs(want).max())
    kernel_math = jax.vmap(lambda row: decode_mgpu._hadamard_rows(row, width))(jnp.asarray(q[:, gather] * sign,
                                                                                           jnp.float32))
    np.testing.assert_allclose(np.asarray(kernel_math, np.float64), want, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("name,head_dim,hq,hk,platform", [
    ("turboquant_kqjl3v4", 128, 12, 4, "cuda"), ("turboquant_kqjl3v4", 128, 12, 4, "rocm"),
    ("turboquant_4bit_nc", 128, 12, 4, "cuda"), ("turboquant_4bit_nc", 128, 12, 4, "rocm"),
    ("turboquant_k3p5v4", 128, 12, 4, "cuda"), ("turboquant_k8v4", 128, 12, 4, "cuda"),
    ("turboquant_3bit_nc", 256, 16, 2, "cuda"),  # the Hadamard form's rows in 4 tiles of 2
])
def test_decode_prologue_lowers_to_triton(name, head_dim, hq, hk, platform):
    """The prologue kernel passes the Pallas Triton lowering (export, on the CPU) for CUDA and ROCm: the dense
    products (QJL keys, the default) and the Hadamard form (MSE, split and float8 keys, asked for: below
    HADAMARD_PAIRS pairs the default is the dense products)."""
    cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, head_dim)
    form = "hadamard" if hadamard_form(cfg) is not None else None
    exported = jax.export.export(
        jax.jit(lambda q, n: decode_prologue(q, n, cfg, num_kv_heads=hk, factor=0.1, block_size=16, max_blocks=64,
                                             step_pages=4, resident=528, num_splits=None, form=form)),
        platforms=[platform], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(jax.ShapeDtypeStruct((2, hq, head_dim), jnp.bfloat16), jax.ShapeDtypeStruct((2,), jnp.int32))
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


def _emulated_kernel(cache):
    """A stand-in for decode_mgpu._build_call on the CPU: the kernel's contract in jnp (float32, exact softmax). Piece
    j of the table (sequence b, pages [first, end), slot) and KV head h: the logits of the 8 query rows (groups of
    at most 4: 4, then zeros), ``(hi + lo) * qinv`` (base 2, the scale in qinv; the parts' rows as query_row says)
    times the key tile (each segment's score vectors in tile_order's columns), over the piece's tokens below the
    sequence's length; outputs normalised within the piece, row i channel
    value_channel_order[i] (3-bit values: value3_channel_order), at [slot * Hk + h]; log-sum-exps (base 2) at
    [slot * Hk + h, 0]. MSE, split and float8 keys (not QJL)."""
    from tqjax import reference
    from tqjax.codec import value_codec

    def build(cfg, hk, block_size, n_pieces, stages, softcap, waves=1, group=8):
        assert softcap is None and cfg.key_format != "prod"
        order = (value3_channel_order if cfg.value_bits == 3 else value_channel_order)(cfg.head_dim)
        heads = NARROW if narrow(group) else HALF

        def call(work, tables, lens, q16, qinv, *arrays):
            kw, ks, vw, vs, _ = reference._gather_sequences(cache, tables, lens)  # [Hk, B, L, ...]
            vecs = key_codec(cfg).score_vectors(kw, ks)
            ktile = jnp.concatenate([v[..., tile_order(cfg, i)] for i, v in enumerate(vecs)], axis=-1)
            v = value_codec(cfg).decode(vw, vs)  # [Hk, B, L, D]
            hi, lo = (q16[:, :, [query_row(r, part, group) for r in range(heads)]].astype(jnp.float32)
                      for part in (0, 1))
            q = (hi + lo) * qinv[:, :, :heads, None]
            logits = jnp.einsum("bhrc,hblc->bhrl", q, ktile, precision=jax.lax.Precision.HIGHEST)
            tok = jnp.arange(logits.shape[-1])
            o = jnp.zeros(((n_pieces + 1) * hk, cfg.head_dim, 8), jnp.float32)
            lse = jnp.zeros(((n_pieces + 1) * hk, 8, 8), jnp.float32)
            for j in range(n_pieces):
                b, first, end, slot = work[0, j], work[1, j], work[2, j], work[3, j]
                inside = (tok >= first * block_size) & (tok < jnp.minimum(end * block_size, lens[b]))
                s = jnp.where(inside, logits[b], -jnp.inf)  # [Hk, 8, L]
                m = jnp.max(s, axis=-1, keepdims=True)
                p = jnp.exp2(s - jnp.where(jnp.isfinite(m), m, 0.0))
                den = jnp.sum(p, axis=-1, keepdims=True)
                out = jnp.einsum("hrl,hld->hrd", p, v[:, b], precision=jax.lax.Precision.HIGHEST)
                out = out / jnp.where(den > 0, den, 1.0)
                at = slot * hk + jnp.arange(hk)
                o = o.at[at, :, :heads].set(jnp.swapaxes(out[..., order], 1, 2))  # row i: channel order[i]
                lse = lse.at[at, 0, :heads].set(jnp.where(den[..., 0] > 0, m[..., 0] + jnp.log2(den[..., 0]), -jnp.inf))
            return o, lse

        return call

    return build


@pytest.mark.parametrize("name,head_dim,group,dtype", [
    ("turboquant_4bit_nc", 128, 4, jnp.float32), ("turboquant_3bit_nc", 128, 3, jnp.float32),
    ("turboquant_k8v4", 64, 8, jnp.bfloat16), ("turboquant_k3p5v4", 128, 1, jnp.float32),
    ("turboquant_k3v4_nc", 256, 2, jnp.float32)])
def test_decode_wrapper_around_an_emulated_kernel(monkeypatch, name, head_dim, group, dtype):
    """paged_decode_mgpu_jit on the CPU with the Mosaic kernel replaced by its contract in jnp (_emulated_kernel)
    and the Triton kernels in interpret mode: the prologue (the query's operands, the piece table at 24 resident
    programs: several pieces a sequence), the merge's channel order, rows and dtype give the reference decode's
    output (float32: within RTOL of max|out|, the float16 hi/lo query keeping 2**-22; bfloat16: one rounding,
    2**-8)."""
    from tqjax.pallas import decode_mgpu

    lens = [0, 1, 65, 333, 1000]
    q, cache, tables, lens = make_case(name, head_dim=head_dim, block_size=16, hk=2, group=group, lens=lens,
                                       seed=head_dim + group)
    q = q.astype(dtype)
    monkeypatch.setattr(decode_mgpu, "_build_call", _emulated_kernel(cache))
    monkeypatch.setattr(decode_mgpu, "decode_prologue", functools.partial(decode_prologue, interpret=True))
    monkeypatch.setattr(decode_mgpu, "merge_kernel_pieces", functools.partial(merge_kernel_pieces, interpret=True))
    # a jit of its own (not the module's, whose cache may hold the real kernel): one program, not eager ops
    call = jax.jit(decode_mgpu.paged_decode_mgpu_jit.__wrapped__,
                   static_argnames=("scale", "softcap", "num_splits", "stages", "resident"))
    out = call(q, cache, tables, lens, scale=0.1, softcap=None, num_splits=None, stages=2, resident=24)
    ref = paged_decode_jit(q.astype(jnp.float32), cache, tables, lens, scale=0.1)
    assert out.shape == q.shape and out.dtype == dtype
    tol = RTOL if dtype == jnp.float32 else 2**-8
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=0,
                               atol=tol * float(jnp.max(jnp.abs(ref))))
    assert not np.asarray(out[0], np.float32).any()  # the empty sequence


@pytest.mark.parametrize("name,head_dim", [(name, 128) for name in MOSAIC_PRESETS] + [
    ("turboquant_kqjl3v4", 64), ("turboquant_3bit_nc", 64), ("turboquant_k2p5v4", 256), ("turboquant_kqjl4v4", 256)])
def test_tile_query_and_tables_give_the_reference_scores(name, head_dim):
    """The kernel's view of a key: each segment's tile (its codes looked up in the float16 table whose low words
    table_words gives, in the converters' column order; float8 keys as they are; QJL: then the signs (2 s - 1)
    times the residual norm in qjl_channel_order) times tile_query's matching columns, times the segment's norm,
    is the reference score <q, k> of tqjax.codec (float64 sums of the same float32 operands)."""
    cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, head_dim)
    codec = key_codec(cfg)
    rng = np.random.default_rng(head_dim + len(name))
    keys = jnp.asarray(rng.standard_normal((40, head_dim)) * rng.uniform(0.1, 10, (40, 1)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((3, head_dim)), jnp.float32)
    words, scales = codec.encode(keys)
    ref = sum(np.asarray(qs, np.float64) @ np.asarray(v, np.float64).T
              for qs, v in zip(codec.prepare_query(q), codec.score_vectors(words, scales)))
    qt = np.asarray(tile_query(cfg, q), np.float64)
    lows = table_words(cfg).view(np.uint32)
    got = np.zeros_like(ref)
    segments = [s for s in cfg.key_segments if s.kind != "qjl"]
    for i, seg in enumerate(segments):
        cols = slice(i * seg.dim, (i + 1) * seg.dim)
        if cfg.key_format == "fp8":
            tile = np.asarray(codec.score_vectors(words, None)[0], np.float64)[:, key_channel_order(head_dim)]
            got += qt[:, cols] @ tile.T
            continue
        f16 = np.asarray(codec.quantizers[i].centroids, np.float32).astype(np.float16)
        lo, hi = lows[2 * i], lows[2 * i + 1]
        first4 = [(int(lo) >> 8 * k & 0xFF) | (int(hi) >> 8 * k & 0xFF) << 8 for k in range(4)]
        np.testing.assert_array_equal(np.array(first4, np.uint16), f16.view(np.uint16)[:4])
        codes = np.asarray(codec.segment_codes(words, seg))
        # the converters' column orders (test_key*_tile_in_registers_follow*)
        order = (key3_channel_order if seg.bits in (2, 3) else key_channel_order)(seg.dim)
        np.testing.assert_array_equal(tile_order(cfg, i), order)
        tile = f16.astype(np.float64)[codes][:, order]
        norm = np.asarray(scales[:, i], np.float64)
        got += (qt[:, cols] @ tile.T) * norm
    if cfg.key_format == "prod":
        signs = np.asarray(codec.segment_codes(words, cfg.key_segments[-1]), np.float64)[:, qjl_channel_order(head_dim)]
        sign_tile = (2 * signs - 1) * np.asarray(scales[:, 1], np.float64)[:, None]
        got += (qt[:, head_dim:] @ sign_tile.T) * np.asarray(scales[:, 0], np.float64)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_copy_shape_keeps_rows_or_copies_pages_flat():
    """Rows of a multiple of 16 bytes are copied as they are; rows of 24 bytes (3-bit codes at D=64) as whole
    pages of 64-byte rows, which flat_pages reads from the same row-major words."""
    assert copy_shape(16, 16) == (16, 16) and copy_shape(64, 4) == (64, 4)
    assert copy_shape(16, 6) == (6, 16) and copy_shape(64, 6) == (24, 16)
    with pytest.raises(ValueError, match="64-byte"):
        copy_shape(4, 6)
    words = jnp.arange(2 * 3 * 32 * 6, dtype=jnp.uint32).reshape(2, 3, 32, 6)
    flat = flat_pages(words)
    assert flat.shape == (2, 3, 12, 16)
    np.testing.assert_array_equal(flat[1, 2].reshape(-1), words[1, 2].reshape(-1))
    assert flat_pages(words[..., :4]).shape == (2, 3, 32, 4)


def test_tile_unit_is_the_swizzled_tiled_layout():
    """tile_unit against the layout spelled out: (8, 64) float16 tiles in row-major order, each 8 rows of
    128 bytes whose 16-byte units are XORed with the row within the tile."""
    d = 256
    for row in range(64):
        for cw in range(d // 8):
            byte = ((row // 8) * (d // 64) + cw // 8) * 1024 + (row % 8) * 128 + 16 * ((cw % 8) ^ (row % 8))
            assert tile_unit(row, cw, d) * 16 == byte


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_key_channel_order_matches_the_threads_words(head_dim):
    """The key tile in registers: thread lane % 4 = l holds (Mosaic's WGMMA layout) columns
    8j + 2l + {0, 1} of its rows, and converts the words l * D/32 .. (l + 1) * D/32 - 1 of each row (one
    PTX block per word, pair i of word g into register j = 4g + i): the channel order is a permutation that
    puts exactly those channels in those columns, so K[:, order] @ q[order] == K @ q."""
    order = key_channel_order(head_dim)
    np.testing.assert_array_equal(np.sort(order), np.arange(head_dim))
    g = head_dim // 32
    for lane4 in range(4):
        for j in range(head_dim // 8):
            for e in range(2):
                word = lane4 * g + j // 4  # the word (8 channels) the thread converts for register j
                assert order[8 * j + 2 * lane4 + e] == 8 * word + 2 * (j % 4) + e
    rng = np.random.default_rng(head_dim)
    k, q = rng.standard_normal((64, head_dim)), rng.standard_normal(head_dim)
    np.testing.assert_allclose(k[:, order] @ q[order], k @ q, rtol=1e-12)


def _place_group(tile: np.ndarray, regs: dict, g: int, lane4: int) -> None:
    """Group g's four float16 pairs ($0..$3) of lane lane4 into a [rows, D] key tile as Mosaic's WGMMA layout
    places them: register j = 4g + i holds columns 8j + 2 lane4 + 0..1 (low half first)."""
    for i in range(4):
        for e in range(2):
            half = (regs[f"${i}"].astype(np.uint32) >> (16 * e)) & 0xFFFF
            tile[:, 8 * (4 * g + i) + 2 * lane4 + e] = half.astype(np.uint16).view(np.float16)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_sign_tile_in_registers_is_the_sketch_times_gamma(head_dim):
    """The QJL sign tile as the kernel builds it (thread lane % 4 = l loads its sign words of a row: D >= 128
    words l * D/128 .., D = 64 half l % 2 of word l // 2 shifted down; group g of 4 registers from word
    4g // 16 of those, bits from 4g % 16, by qjl_word_asm run on the PTX interpreter) holds (2 s - 1) g of
    sketch coordinate qjl_channel_order[c] in column c (Mosaic's WGMMA layout: register j of lane l is columns
    8j + 2l + 0..1), so its product with the projected query in that order is the sketch's."""
    rng = np.random.default_rng(head_dim)
    order = qjl_channel_order(head_dim)
    np.testing.assert_array_equal(np.sort(order), np.arange(head_dim))
    rows = 8
    signs = rng.integers(0, 2, (rows, head_dim))
    words = (signs.reshape(rows, -1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(-1)
    gamma = rng.uniform(0.05, 0.6, rows).astype(np.float16)
    pair = gamma.view(np.uint16).astype(np.uint32) * 0x10001
    tile = np.zeros((rows, head_dim))
    n = max(1, head_dim // 128)
    for lane4 in range(4):
        if head_dim == 64:
            mine = [words[:, lane4 // 2] >> (8 * (lane4 % 2))]
        else:
            mine = [words[:, lane4 * n + k] for k in range(n)]
        for g in range(head_dim // 32):
            out = run_ptx(qjl_word_asm(4 * g % 16), {"$4": mine[4 * g // 16] & 0xFFFFFFFF, "$5": pair})
            _place_group(tile, out, g, lane4)
    expected = (2.0 * signs - 1.0) * gamma.astype(np.float64)[:, None]
    np.testing.assert_array_equal(tile, expected[:, order])
    q = rng.standard_normal(head_dim)
    np.testing.assert_allclose(tile @ q[order], expected @ q, rtol=1e-12)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_key3_tile_in_registers_follows_key3_channel_order(head_dim):
    """The 3-bit key tile as the kernel builds it (thread lane % 4 = l loads its bit-0 words, D = 64 half
    l % 2 of word l // 2 shifted down, and its two-bit words; group g from bit-0 word g // 4, half g // 2 % 2,
    two-bit word g // 2, parity g % 2, by key3_word_asm on the PTX interpreter) holds the table value of
    channel key3_channel_order[c] in column c (register j of lane l: columns 8j + 2l + 0..1)."""
    cfg = tqjax.TurboQuantConfig.from_cache_dtype("turboquant_k3v4_nc", 128)
    table = np.asarray(key_codec(cfg).quantizers[0].centroids, np.float32)
    f16 = table.astype(np.float16)
    order = key3_channel_order(head_dim)
    np.testing.assert_array_equal(np.sort(order), np.arange(head_dim))
    rng = np.random.default_rng(head_dim)
    rows = 16
    codes = rng.integers(0, 8, (rows, head_dim)).astype(np.uint32)
    words = np.asarray(tqjax.packing.pack_codes(codes, 3, xp=np), np.uint32)  # [rows, 3 D/32]
    bit0_words, two_words = words[:, :head_dim // 32], words[:, head_dim // 32:]
    low = [np.full(rows, sum(int(f16.view(np.uint16)[i] >> s & 0xFF) << (8 * i) for i in range(4)), np.uint32)
           for s in (0, 8)]
    groups = head_dim // 32
    n0, n2 = max(1, groups // 4), groups // 2
    tile = np.zeros((rows, head_dim), np.float16)
    for lane4 in range(4):
        if head_dim == 64:
            bit0 = [bit0_words[:, lane4 // 2] >> (16 * (lane4 % 2))]
        else:
            bit0 = [bit0_words[:, lane4 * n0 + k] for k in range(n0)]
        two = [two_words[:, lane4 * n2 + k] for k in range(n2)]
        for g in range(groups):
            regs = run_ptx(key3_word_asm(table, g // 2 % 2, g % 2),
                           {"$4": bit0[g // 4], "$5": two[g // 2], "$6": low[0], "$7": low[1]})
            _place_group(tile, regs, g, lane4)
    np.testing.assert_array_equal(tile, f16[codes][:, order])


@pytest.mark.parametrize("value_bits", [4, 3])
def test_merge_kernel_pieces_against_float64(value_bits):
    """The kernel's per-piece outputs ([slots, D, 8], D rows in value_channel_order, 3-bit values
    value3_channel_order) and base-2 log-sum-exps ([slots, 8, 8], row 0) merge, per (sequence, KV head), over its
    slots (first + i * Hk) into the softmax over all its pieces' tokens: float64 on the host, channels in their
    order, empty rows (-inf) weigh nothing, a head without pieces and a row with every piece empty give zeros
    (merge kernel in interpret mode)."""
    rng = np.random.default_rng(4)
    d, hk = 64, 2
    counts = [3, 0, 1, 2]  # pieces of sequences 0-3 (a sequence's pieces in consecutive slots, 2 heads each)
    firsts = np.cumsum([0] + counts[:-1])
    info = np.zeros((2, hk, 4), np.int32)
    for b in range(4):
        info[0, :, b] = firsts[b] * hk + np.arange(hk)
        info[1, :, b] = counts[b]
    slots = (sum(counts) + 1) * hk
    o = rng.standard_normal((slots, d, 8)).astype(np.float32)
    lse = np.full((slots, 8, 8), 7.0, np.float32)
    lse[:, 0, :] = (rng.standard_normal((slots, 8)) * 20).astype(np.float32)
    lse[1 * hk + 0, 0, :] = -np.inf  # one empty piece
    lse[[4 * hk + 1, 5 * hk + 1], 0, 5] = -np.inf  # every piece of one row of sequence 3, head 1, empty
    got = np.asarray(merge_kernel_pieces(jnp.asarray(o), jnp.asarray(lse), jnp.asarray(info), value_bits, batch=4,
                                         interpret=True))
    chex.assert_shape(got, (4 * hk, 8, d))
    channels = np.empty_like(o, dtype=np.float64)
    order = (value3_channel_order if value_bits == 3 else value_channel_order)(d)
    channels[:, order] = o  # row c of the kernel's output is channel order[c]
    want = np.zeros((4 * hk, 8, d))
    for b in range(4):
        for h in range(hk):
            idx = info[0, h, b] + hk * np.arange(counts[b])
            if not counts[b]:
                continue
            lse2 = lse[idx, 0, :].astype(np.float64)  # [pieces, 8]
            m = np.max(lse2, axis=0)
            w = np.where(np.isfinite(lse2), np.exp2(lse2 - np.where(np.isfinite(m), m, 0)), 0.0)
            den = w.sum(axis=0)[:, None]
            want[b * hk + h] = np.where(den > 0, np.einsum("sr,sdr->rd", w, channels[idx]) / np.where(den > 0, den, 1),
                                        0.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.max(np.abs(want)))
    assert np.all(got[2:4] == 0) and np.all(got[3 * hk + 1, 5] == 0)


@pytest.mark.parametrize("bits", [3, 4])
def test_probability_factor_leaves_room_for_lazy_probabilities(bits):
    """p * value scale / 2**e * 2**p_top is split into float16 parts: below 2**15 for the largest value scale the
    store writes (2 * 65504 / (2**bits - 1); its 2**e stops at 2**VALUE_EXP_MAX) and the largest probability, 1
    with the maximum taken every step, 2**LAZY_MAX_BITS with a lazy one."""
    top = float(np.float16(2 * 65504 / (2**bits - 1)))
    e = min(int(np.floor(np.log2(top))), VALUE_EXP_MAX)
    for lazy, p_max in ((False, 1), (True, 2**LAZY_MAX_BITS)):
        _, p_top, _ = value_constants(bits, lazy)
        factor = top / 2**e * 2**p_top
        assert factor * p_max < 2**15, (lazy, factor)
        assert factor * p_max >= 2**12  # no precision given away: the lazy factor is smaller only by p's room


def test_lazy_maximum_where_it_was_faster():
    """The lazy maximum for 4-bit values, split keys included, and for 3-bit values in the narrow form (groups of at
    most 4); not for 3-bit values in 16 columns (142-152 registers at B=1)."""
    for group in range(1, 9):
        lazy = {name: lazy_maximum(tqjax.TurboQuantConfig.from_cache_dtype(name, 128), group) for name in tqjax.PRESETS}
        assert lazy == {name: name != "turboquant_3bit_nc" or group <= 4 for name in tqjax.PRESETS}, group


def test_unsupported_names_the_reason():
    assert sorted(MOSAIC_PRESETS) == sorted(tqjax.PRESETS)  # every preset at D=128 and 256
    for name in MOSAIC_PRESETS:
        for head_dim in (128, 256):
            assert unsupported(tqjax.TurboQuantConfig.from_cache_dtype(name, head_dim), 4, 16) is None, name
        # D=64: 3-bit codes too (rows of 24 bytes, copied flat: copy_shape), not split keys (32-channel segments)
        reason = unsupported(tqjax.TurboQuantConfig.from_cache_dtype(name, 64), 4, 16)
        assert (reason is not None and "split keys" in reason) if name in SPLIT_PRESETS else reason is None, name
    cfg = tqjax.TurboQuantConfig.from_cache_dtype("turboquant_4bit_nc", 128)
    assert unsupported(cfg, 8, 16) is None
    assert "at most 8" in unsupported(cfg, 16, 16)
    assert "block_size" in unsupported(cfg, 4, 128)
    assert "values are 8-bit" in unsupported(dataclasses.replace(cfg, value_bits=8), 4, 16)


@pytest.mark.parametrize("name,head_dim,block_size,group,softcap,splits", [
    ("turboquant_4bit_nc", 128, 16, 4, None, 2),
    ("turboquant_4bit_nc", 64, 32, 1, 30.0, 1),
    ("turboquant_4bit_nc", 256, 64, 8, None, 3),
    ("turboquant_k8v4", 128, 16, 4, None, 2),
    ("turboquant_k8v4", 64, 64, 8, 30.0, 1),
    ("turboquant_k3v4_nc", 128, 16, 4, None, 2),
    ("turboquant_k3v4_nc", 128, 32, 8, 30.0, 1),
    ("turboquant_k3v4_nc", 256, 16, 1, None, 3),
    ("turboquant_3bit_nc", 128, 16, 4, None, 2),
    ("turboquant_3bit_nc", 256, 64, 8, 30.0, 1),
    ("turboquant_kqjl4v4", 128, 16, 4, None, 2),
    ("turboquant_kqjl4v4", 64, 32, 8, 30.0, 1),
    ("turboquant_kqjl4v4", 256, 16, 1, None, 3),
    ("turboquant_kqjl3v4", 128, 16, 4, None, 2),
    ("turboquant_kqjl3v4", 256, 64, 8, 30.0, 1),
    ("turboquant_k3v4_nc", 64, 16, 4, None, 2),
    ("turboquant_3bit_nc", 64, 64, 8, 30.0, 1),
    ("turboquant_kqjl3v4", 64, 32, 1, None, 3),
    ("turboquant_k3p5v4", 128, 16, 4, None, 2),
    ("turboquant_k3p5v4", 256, 64, 1, 30.0, 1),
    ("turboquant_k2p5v4", 128, 32, 8, None, 3),
    ("turboquant_k2p5v4", 256, 16, 4, None, 2),
])
def test_lowers_for_cuda(name, head_dim, block_size, group, softcap, splits):
    """The Pallas -> Mosaic GPU lowering (layouts, transfers, products) accepts the kernel (no GPU
    needed: jax.export for the "cuda" platform); the compile and the run need a Hopper GPU."""
    cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, head_dim)
    cache = jax.eval_shape(lambda: tqjax.PagedKVCache.allocate(cfg, 40, block_size, 2))
    q = jax.ShapeDtypeStruct((3, 2 * group, head_dim), jnp.float32)
    tables = jax.ShapeDtypeStruct((3, 9), jnp.int32)
    lens = jax.ShapeDtypeStruct((3,), jnp.int32)

    def f(q, cache, tables, lens):
        return paged_decode_mgpu_jit(q, cache, tables, lens, scale=0.1, softcap=softcap, num_splits=splits, stages=2)

    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")  # the pieces' merge kernel
    module = jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=[triton])(q, cache, tables,
                                                                                          lens).mlir_module()
    assert "tq_decode_mgpu" in module


def test_programs_a_core_holds():
    """D=256 programs take 83-107 KB of shared memory, two a core; QJL keys at D=128 fit 3 a core, the others 4;
    at D=64 groups of at most 4 fit 5 (but QJL 3-bit keys): the decode's pieces are cut for that many resident
    programs (528 at D=128 on 132 cores)."""
    cfg = tqjax.TurboQuantConfig.from_cache_dtype
    assert resident_programs(cfg("turboquant_4bit_nc", 128), num_cores=132) == 528
    assert programs_per_core(cfg("turboquant_4bit_nc", 256)) == 2
    assert programs_per_core(cfg("turboquant_k8v4", 128)) == 4
    assert programs_per_core(cfg("turboquant_kqjl4v4", 128)) == 3
    assert programs_per_core(cfg("turboquant_k3p5v4", 128)) == 4
    # D=64: 93-96 registers in the narrow form (groups of at most 4), 101-112 in 16 columns; QJL 3-bit keys 109
    for name in ("turboquant_4bit_nc", "turboquant_k8v4", "turboquant_3bit_nc", "turboquant_k3v4_nc",
                 "turboquant_kqjl4v4"):
        assert [programs_per_core(cfg(name, 64), group) for group in (1, 4, 5, 8)] == [5, 5, 4, 4], name
    assert programs_per_core(cfg("turboquant_kqjl3v4", 64), 4) == 4
    assert resident_programs(cfg("turboquant_4bit_nc", 64), 4, num_cores=132) == 660


@pytest.mark.skipif(on_hopper(), reason="checks the refusal off Hopper")
def test_refuses_other_caches_and_devices():
    q, cache, tables, lens = make_case("turboquant_4bit_nc", head_dim=128, block_size=16, hk=1, group=4,
                                       lens=[5], seed=0)
    with pytest.raises(RuntimeError, match="Hopper"):
        paged_decode_mgpu(q, cache, tables, lens)
    q, cache, tables, lens = make_case("turboquant_k3p5v4", head_dim=64, block_size=16, hk=1, group=4,
                                       lens=[5], seed=0)
    with pytest.raises(NotImplementedError, match="split keys at head_dim 64"):
        paged_decode_mgpu(q, cache, tables, lens)


def test_paged_decode_chooses_the_kernel(monkeypatch):
    """tqjax.pallas.decode.paged_decode runs the Mosaic GPU kernel by default on Hopper for the caches it
    reads, and the Triton one elsewhere, in interpret mode, and when given Triton tuning arguments."""
    from tqjax.pallas import decode_mgpu
    from tqjax.pallas.decode import choose_implementation, paged_decode

    def cache(name, block_size=16):
        cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, 128)
        return jax.eval_shape(lambda: tqjax.PagedKVCache.allocate(cfg, 8, block_size, 2))

    monkeypatch.setattr(decode_mgpu, "on_hopper", lambda: True)
    assert choose_implementation(cache("turboquant_4bit_nc"), 4) == "mosaic"
    assert choose_implementation(cache("turboquant_4bit_nc"), 4, interpret=True) == "triton"
    assert choose_implementation(cache("turboquant_4bit_nc"), 4, triton_args=True) == "triton"
    assert choose_implementation(cache("turboquant_4bit_nc"), 16) == "triton"  # group > 8
    assert choose_implementation(cache("turboquant_4bit_nc", 128), 4) == "triton"  # block_size 128
    assert choose_implementation(cache("turboquant_k8v4"), 4) == "mosaic"
    assert choose_implementation(cache("turboquant_3bit_nc"), 4) == "mosaic"
    assert choose_implementation(cache("turboquant_kqjl4v4"), 4) == "mosaic"
    assert choose_implementation(cache("turboquant_kqjl3v4"), 4) == "mosaic"
    assert choose_implementation(cache("turboquant_k3p5v4"), 4) == "mosaic"
    assert choose_implementation(cache("turboquant_k2p5v4"), 4) == "mosaic"
    assert choose_implementation(cache("turboquant_k3v4_nc"), 4) == "mosaic"
    monkeypatch.setattr(decode_mgpu, "on_hopper", lambda: False)
    assert choose_implementation(cache("turboquant_4bit_nc"), 4) == "triton"

    q, c, tables, lens = make_case("turboquant_4bit_nc", head_dim=128, block_size=16, hk=1, group=4, lens=[5], seed=0)
    with pytest.raises(ValueError, match="implementation must be one of"):
        paged_decode(q, c, tables, lens, implementation="cuda")
    with pytest.raises(ValueError, match="num_splits only"):
        paged_decode(q, c, tables, lens, implementation="mosaic", num_warps=4)
    if not on_hopper():
        with pytest.raises(RuntimeError, match="Hopper"):
            paged_decode(q, c, tables, lens, implementation="mosaic")


def test_mosaic_decode_checks_its_inputs_once(monkeypatch) -> None:
    """paged_decode checks the inputs (reading seq_lens back to the host) once, not again in the Mosaic kernel's
    entry; paged_decode_mgpu on its own checks them too."""
    from tqjax import reference
    from tqjax.pallas import decode_mgpu
    from tqjax.pallas.decode import paged_decode

    calls = []
    check = reference.check_sequence_inputs
    monkeypatch.setattr(reference, "check_sequence_inputs", lambda *a: calls.append(1) or check(*a))
    monkeypatch.setattr(decode_mgpu, "on_hopper", lambda: False)  # stop at the launch: the checks are before it
    q, c, tables, lens = make_case("turboquant_4bit_nc", head_dim=128, block_size=16, hk=1, group=4, lens=[5], seed=0)
    with pytest.raises(RuntimeError, match="Hopper"):
        paged_decode(q, c, tables, lens, implementation="mosaic")
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="Hopper"):
        decode_mgpu.paged_decode_mgpu(q, c, tables, lens)
    assert len(calls) == 2


needs_hopper = pytest.mark.skipif(not on_hopper(), reason="Mosaic GPU kernel: needs a Hopper GPU (sm_90)")


def _check(q, cache, tables, lens, *, scale=None, softcap=None, num_splits=None, stages=2):
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    ref = paged_decode_jit(q, cache, tables, lens, scale=scale, softcap=softcap)
    out = paged_decode_mgpu(q, cache, tables, lens, scale=scale, softcap=softcap, num_splits=num_splits,
                            stages=stages)
    assert out.shape == q.shape
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=RTOL * float(jnp.max(jnp.abs(ref))), rtol=0)
    empty = np.asarray(lens) == 0
    assert float(jnp.max(jnp.abs(out[empty]), initial=0.0)) == 0.0  # empty sequences give zeros


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.gpu
@needs_hopper
def test_matches_reference(head_dim, block_size, group):
    lens = [0, 1, 15, 16, 63, 64, 65, 333, 700]
    q, cache, tables, lens = make_case("turboquant_4bit_nc", head_dim=head_dim, block_size=block_size, hk=2,
                                       group=group, lens=lens, seed=head_dim + block_size + group)
    _check(q, cache, tables, lens)


@pytest.mark.parametrize("name,group", [("turboquant_4bit_nc", 3), ("turboquant_4bit_nc", 6),
                                        ("turboquant_3bit_nc", 5), ("turboquant_kqjl3v4", 7)])
@pytest.mark.gpu
@needs_hopper
def test_groups_not_a_power_of_two(name, group):
    """Groups of 3, 5, 6 and 7 query heads: the query kernel's rows past the group zero, the merge keeping a power
    of 2 of the kernel's rows (a group of 3, in the narrow form: 4; 5-7: all 8) and the wrapper the group's (4- and
    3-bit value channel orders, QJL keys)."""
    lens = [0, 1, 65, 333, 1500]
    q, cache, tables, lens = make_case(name, head_dim=128, block_size=16, hk=2, group=group, lens=lens,
                                       seed=group)
    _check(q, cache, tables, lens)


@pytest.mark.parametrize("head_dim,block_size,group,num_splits", [
    (64, 16, 4, 1), (128, 16, 4, 2), (128, 32, 8, 1), (256, 64, 1, 3), (128, 64, 4, None),
])
@pytest.mark.gpu
@needs_hopper
def test_fp8_keys_match_reference(head_dim, block_size, group, num_splits):
    """turboquant_k8v4: float8 keys (no norms) converted by cvt.rn.f16x2.e4m3x2, two words per 8 channels."""
    lens = [0, 1, 17, 64, 65, 333, 1500]
    q, cache, tables, lens = make_case("turboquant_k8v4", head_dim=head_dim, block_size=block_size, hk=2,
                                       group=group, lens=lens, seed=head_dim + block_size + group)
    if num_splits is None:
        scale = 1 / np.sqrt(head_dim)
        ref = paged_decode_jit(q, cache, tables, lens, scale=scale)
        out = tqjax.paged_decode(q, cache, tables, lens)  # the backend's default: this kernel on Hopper
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=RTOL * float(jnp.max(jnp.abs(ref))), rtol=0)
    else:
        _check(q, cache, tables, lens, num_splits=num_splits)


@pytest.mark.parametrize("name,head_dim,block_size,group", [
    ("turboquant_k3v4_nc", 128, 16, 4), ("turboquant_k3v4_nc", 128, 16, 8), ("turboquant_k3v4_nc", 128, 64, 1),
    ("turboquant_k3v4_nc", 256, 32, 4), ("turboquant_3bit_nc", 128, 16, 4), ("turboquant_3bit_nc", 128, 32, 8),
    ("turboquant_3bit_nc", 256, 16, 1), ("turboquant_kqjl4v4", 64, 16, 4),
    ("turboquant_kqjl4v4", 128, 16, 4), ("turboquant_kqjl4v4", 128, 32, 8), ("turboquant_kqjl4v4", 256, 16, 1),
    ("turboquant_kqjl3v4", 128, 16, 4), ("turboquant_kqjl3v4", 256, 32, 2), ("turboquant_k3v4_nc", 64, 16, 4),
    ("turboquant_3bit_nc", 64, 32, 8), ("turboquant_3bit_nc", 64, 64, 1), ("turboquant_kqjl3v4", 64, 16, 4)])
@pytest.mark.gpu
@needs_hopper
def test_3bit_codes_match_reference(name, head_dim, block_size, group):
    """turboquant_k3v4_nc: 3-bit keys in packing's two fields (key3_word_asm), 4-bit values;
    turboquant_3bit_nc: 3-bit values too (value3_word_asm); the QJL presets: 3-bit / 2-bit MSE codes plus the
    sign sketch (qjl_word_asm, times the residual norm), a second score product with the projected query
    (D=256: one value tile)."""
    lens = [0, 1, 17, 64, 65, 333, 1500]
    q, cache, tables, lens = make_case(name, head_dim=head_dim, block_size=block_size, hk=2, group=group, lens=lens,
                                       seed=head_dim + block_size + group)
    _check(q, cache, tables, lens, num_splits=2)


@pytest.mark.parametrize("name,head_dim,block_size,group,num_splits", [
    ("turboquant_k3p5v4", 128, 16, 4, 2), ("turboquant_k3p5v4", 128, 64, 8, 1), ("turboquant_k3p5v4", 256, 32, 1, 3),
    ("turboquant_k2p5v4", 128, 16, 4, 2), ("turboquant_k2p5v4", 128, 32, 2, 1), ("turboquant_k2p5v4", 256, 16, 8, 2)])
@pytest.mark.gpu
@needs_hopper
def test_split_keys_match_reference(name, head_dim, block_size, group, num_splits):
    """Split keys: two segments of D/2 channels (4+3 or 3+2 bits) with their own tables, rotations and norms: two
    key tiles, two score products into separate sums, each times its norm (rows of 56 and 40 bytes at D=128:
    pages copied whole)."""
    lens = [0, 1, 17, 64, 65, 333, 1500]
    q, cache, tables, lens = make_case(name, head_dim=head_dim, block_size=block_size, hk=2, group=group, lens=lens,
                                       seed=head_dim + block_size + group)
    _check(q, cache, tables, lens, num_splits=num_splits)


@pytest.mark.parametrize("num_splits,stages", [(2, 2), (3, 3), (5, 2), (16, 1)])
@pytest.mark.gpu
@needs_hopper
def test_splits_and_stages(num_splits, stages):
    q, cache, tables, lens = make_case("turboquant_4bit_nc", head_dim=128, block_size=16, hk=2, group=4,
                                       lens=[0, 5, 200, 1000, 1500], seed=num_splits)
    _check(q, cache, tables, lens, num_splits=num_splits, stages=stages)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("name", ["turboquant_4bit_nc", "turboquant_3bit_nc", "turboquant_k8v4",
                                  "turboquant_k3p5v4", "turboquant_kqjl4v4"])
def test_ragged_batch_in_a_wide_table(name):
    """One long sequence among short and empty ones, the block table twice as wide as the longest (garbage past
    every sequence), KV heads 8: the default pieces (the long sequence cut across many programs, most programs of
    the 528-wide grid without a piece) and 3 fixed splits of the table's width."""
    q, cache, tables, lens = make_case(name, head_dim=128, block_size=16, hk=8, group=4,
                                       lens=[20000, 0, 1, 64, 700, 3], seed=11)
    tables = jnp.concatenate([tables, jnp.full_like(tables, 2**30)], axis=1)
    for num_splits in (None, 3):
        _check(q, cache, tables, lens, num_splits=num_splits)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("name,head_dim,batch,hk,group,form", [
    ("turboquant_4bit_nc", 128, 128, 8, 4, ("hadamard", 1)),  # 1024 pairs: one warp a prologue program
    ("turboquant_3bit_nc", 64, 16, 4, 3, ("hadamard", 2)),  # 64 pairs, a group of 3 (rows padded to 4)
    ("turboquant_k8v4", 128, 32, 2, 8, ("hadamard", 2)),  # float8 keys: a permutation
    ("turboquant_k3p5v4", 128, 16, 4, 7, ("hadamard", 2)),  # split keys: two blocks of 64
    ("turboquant_k2p5v4", 256, 64, 1, 1, ("hadamard", 2)),  # split keys at 256, a group of 1
    ("turboquant_3bit_nc", 256, 32, 2, 8, ("hadamard", 2)),  # D=256, a group of 8: rows in 4 tiles of 2
    ("turboquant_4bit_nc", 128, 16, 4, 8, ("hadamard", 2)),  # a group of 8 at 128: 2 tiles of 4
    ("turboquant_kqjl4v4", 128, 16, 4, 4, ("chunks", 2)),  # QJL keys: the matrix's products, 2 warps
])
def test_large_batch_prologue_decodes(name, head_dim, batch, hk, group, form):
    """Batches of at least 64 (sequence, KV head) pairs, where the prologue takes the Hadamard form or (QJL keys) the
    matrix's products with 2 warps (prologue_defaults), compiled for the GPU: the decode's output is the reference's
    (ragged lengths, some empty)."""
    assert prologue_defaults(tqjax.TurboQuantConfig.from_cache_dtype(name, head_dim), batch * hk) == form
    rng = np.random.default_rng(batch + group)
    lens = [int(n) for n in rng.integers(0, 300, batch)]
    lens[1] = 0
    q, cache, tables, lens = make_case(name, head_dim=head_dim, block_size=16, hk=hk, group=group, lens=lens,
                                       seed=batch)
    _check(q, cache, tables, lens)


@pytest.mark.gpu
@needs_hopper
def test_waves_of_pieces():
    """A ragged batch (24 lengths in 1-6000, 2 empty) at the H200's 528 resident programs, KV heads 8: one wave of
    pieces, two waves by the fill rule (the finer chunk here: the one-wave pieces fill little of the wave), and two and
    four waves always cut finely (most programs of the grid without a piece, skipped): each the reference's output."""
    rng = np.random.default_rng(12)
    lens = [int(n) for n in rng.integers(1, 6000, 24)]
    lens[3] = lens[17] = 0
    q, cache, tables, lens = make_case("turboquant_4bit_nc", head_dim=128, block_size=16, hk=8, group=4, lens=lens,
                                       seed=12)
    scale = 1.0 / np.sqrt(128)
    ref = paged_decode_jit(q, cache, tables, lens, scale=scale)
    for waves, fill in [(1, pieces.FILL), (2, pieces.FILL), (2, 9.0), (4, 9.0)]:
        out = paged_decode_mgpu_jit(q, cache, tables, lens, scale=scale, softcap=None, num_splits=None, stages=2,
                                    resident=528, waves=waves, fill=fill)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=RTOL * float(jnp.max(jnp.abs(ref))), rtol=0,
                                   err_msg=f"waves={waves}, fill={fill}")
        assert float(jnp.max(jnp.abs(out[np.asarray(lens) == 0]))) == 0.0


@pytest.mark.gpu
@needs_hopper
def test_softcap_and_scale():
    q, cache, tables, lens = make_case("turboquant_4bit_nc", head_dim=128, block_size=16, hk=2, group=4,
                                       lens=[3, 129, 900], seed=7)
    _check(q * 4.0, cache, tables, lens, scale=0.3, softcap=20.0, num_splits=2)


@pytest.mark.gpu
@needs_hopper
def test_bf16_query():
    """A bfloat16 query gives a bfloat16 output: within one bfloat16 rounding of the reference's."""
    q, cache, tables, lens = make_case("turboquant_4bit_nc", head_dim=128, block_size=16, hk=2, group=4,
                                       lens=[3, 129, 900], seed=8)
    q = q.astype(jnp.bfloat16)
    ref = paged_decode_jit(q, cache, tables, lens, scale=1 / np.sqrt(128))
    out = paged_decode_mgpu(q, cache, tables, lens, scale=1 / np.sqrt(128))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=2**-7 * float(jnp.max(jnp.abs(ref.astype(jnp.float32)))), rtol=0)


@pytest.mark.gpu
@needs_hopper
def test_long_split():
    """Hundreds of 64-token steps in one split stay within 2e-5 of max|out| (each step's value product
    gets its own accumulator, added in float32: summing the steps in the wgmma accumulator, whose sums do
    not round to nearest, lost 8e-4 over these 16k tokens on the H200)."""
    q, cache, tables, lens = make_case("turboquant_4bit_nc", head_dim=128, block_size=16, hk=1, group=4,
                                       lens=[16384, 9000], seed=5)
    _check(q, cache, tables, lens)


def ramped_keys_case(name: str, ramps, *, head_dim: int = 128, block_size: int = 16, seed: int = 21):
    """make_case's sequences (one per ramp, 1000 tokens each) with keys re-stored at gain ``ramp(t)`` for
    position t: logits that climb (the running maximum raised at many steps), fall, or jump."""
    lens = [1000] * len(ramps)
    q, cache, tables, lens = make_case(name, head_dim=head_dim, block_size=block_size, hk=2, group=4, lens=lens,
                                       seed=seed)
    n = cache.num_slots
    gain = np.ones(n, np.float32)
    for i, ramp in enumerate(ramps):
        t = np.arange(1000)
        gain[np.asarray(tables)[i, t // block_size] * block_size + t % block_size] = ramp(t)
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((n, 2, head_dim)) * gain[:, None, None]
    v = rng.standard_normal((n, 2, head_dim))
    fresh = tqjax.PagedKVCache.allocate(cache.config, cache.num_blocks, block_size, 2)
    fresh = store_jit(fresh, jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), jnp.arange(n, dtype=jnp.int32))
    return q, fresh, tables, lens


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("name", ["turboquant_4bit_nc", "turboquant_k8v4", "turboquant_k3p5v4", "turboquant_3bit_nc"])
def test_lazy_maximum_where_logits_climb_fall_and_jump(name):
    """The running maximum is raised only where a logit exceeds it by more than LAZY_MAX_BITS (log2 units).
    Keys whose gain climbs 1.5 every 64 tokens push the maximum up ~5 at most steps (each must be raised, or
    probabilities up to 2**60 overflow float16: inf); falling gains never raise it after the first step;
    a sawtooth jumps by 7 and falls back. Also k8v4 (one value tile, stored after the wait for every warp's
    value product), a split preset and 3-bit values (lazy in the narrow form, groups of at most 4)."""
    ramps = [lambda t: 1 + 1.5 * t / 64, lambda t: 16 - 1.5 * t / 64, lambda t: 1 + 1.5 * ((t // 64) % 5)]
    q, cache, tables, lens = ramped_keys_case(name, ramps)
    for num_splits in (1, 3):
        _check(q, cache, tables, lens, num_splits=num_splits)


def float64_decode(q, cache, tables, lens, scale: float) -> np.ndarray:
    """Attention in float64 on the host over the cache's dequantized (float32) K/V: q [B, Hq, D]."""
    k, v = tqjax.dequantize(cache, tables, lens, backend="reference")  # [B, T, Hk, D]
    k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
    b, hq, d = q.shape
    g = hq // cache.num_kv_heads
    qg = np.asarray(q, np.float64).reshape(b, -1, g, d)
    s = np.einsum("bhgd,bthd->bhgt", qg, k) * scale
    s = np.where(np.arange(k.shape[1]) < np.asarray(lens)[:, None, None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (np.einsum("bhgt,bthd->bhgd", p, v) / p.sum(-1)[..., None]).reshape(b, hq, d)


def test_float64_decode_matches_the_reference():
    """The float64 check below, against the float32 reference on a CPU: the same attention."""
    q, cache, tables, lens = make_case("turboquant_4bit_nc", head_dim=64, block_size=16, hk=2, group=4,
                                       lens=[37, 300], seed=3)
    ref = np.asarray(paged_decode_jit(q, cache, tables, lens, scale=0.125), np.float64)
    want = float64_decode(q, cache, tables, lens, 0.125)
    assert np.max(np.abs(ref - want)) < 1e-5 * np.max(np.abs(want))


@pytest.mark.gpu
@needs_hopper
def test_one_long_split_against_float64():
    """32k tokens in one split stay within 4e-6 of max|out| of float64 attention (H200: 8e-7; the float32
    reference 1e-6..2e-6). Before the value codes were centred, the kernel's separate float32 sums of
    ``p * code * scale`` and of ``p * zero`` cancelled: 9e-5 here."""
    q, cache, tables, lens = make_case("turboquant_4bit_nc", head_dim=128, block_size=16, hk=1, group=4,
                                       lens=[32768], seed=12)
    out = paged_decode_mgpu(q, cache, tables, lens, num_splits=1)
    want = float64_decode(q, cache, tables, lens, 1 / np.sqrt(128))
    err = np.max(np.abs(np.asarray(out, np.float64) - want)) / np.max(np.abs(want))
    assert err < 4e-6, err


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("name", ["turboquant_4bit_nc", "turboquant_3bit_nc"])
def test_small_and_large_value_scales(name):
    """Value scales far from 1 (their power of two goes into the float16 value tile, the rest with the
    probabilities; from 2**10 on the tile's stops at 2**VALUE_EXP_MAX and the excess goes with the
    probabilities too): still 2e-5 of max|out|. The random values' scales are about 0.2-1.1; x5000 gives about
    2**10 .. 2**12, and the last case scales them up to 0.95 of the largest scale the store writes (a range of
    2 * 65504 over 2**bits - 1 levels: 2**13 for 4 bits, 2**14 for 3). The zero points (float16 too, up to
    65504) go up with the scales only as far as they stay finite (x20000 made them inf: NaN everywhere)."""
    q, cache, tables, lens = make_case(name, head_dim=128, block_size=16, hk=1, group=4, lens=[77, 640], seed=11)
    scales = np.asarray(cache.value_scales, np.float32)
    top = 0.95 * 2 * 65504 / (2**cache.config.value_bits - 1) / np.abs(scales[..., 0]).max()
    for factor in (1e-3, 300.0, 5000.0, top):
        zero_factor = min(factor, 0.5 * 65504 / np.abs(scales[..., 1]).max())
        scaled = (scales * np.array([factor, zero_factor], np.float32)).astype(np.float16)
        assert np.isfinite(scaled).all()
        big = tqjax.PagedKVCache(key_codes=cache.key_codes, key_scales=cache.key_scales,
                                 value_codes=cache.value_codes, value_scales=jnp.asarray(scaled),
                                 config=cache.config)
        _check(q, big, tables, lens)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("name, head_dim", [(n, 128) for n in MOSAIC_PRESETS]
                         + [(n, 64) for n in ("turboquant_3bit_nc", "turboquant_4bit_nc", "turboquant_k8v4",
                                              "turboquant_k3v4_nc", "turboquant_kqjl4v4", "turboquant_kqjl3v4")]
                         + [("turboquant_3bit_nc", 256), ("turboquant_kqjl4v4", 256)])
def test_gpu_registers_let_the_programs_share_a_multiprocessor(name, head_dim, capfd, monkeypatch):
    """The splits assume ``programs_per_core`` programs of 128 threads resident a multiprocessor (65536 registers,
    given per warp in units of 256: 128 a thread for 4 programs, 168 for 3). ptxas chooses the count (Mosaic
    cannot cap it), and with the step's scales carried converted it moved with constants of the kernel: 135 for
    ``3bit_nc`` at D=128 on the H200 whenever the cache's page count was not a power of two (3 programs resident,
    8% slower at B=32, 16k tokens), 136 at block size 32 (docs/PERFORMANCE.md, "The decode's registers move with
    the cache's page count"). Caches of 4096 and 40000 pages, two batches and split counts, this toolchain. No
    spills: `kqjl4v4` at D=256 compiles to 255 registers in the narrow form (groups of 4, as here; CPU, ptxas 13.0,
    docs/data/static_sass_narrow_cpu_2026-12-03_s43.log), the most a thread can have."""
    config = tqjax.TurboQuantConfig.from_cache_dtype(name, head_dim)
    limit = 65536 // (128 * programs_per_core(config, 4)) // 8 * 8  # groups of 4: 32 query heads, 8 KV heads
    monkeypatch.setenv("MOSAIC_GPU_DUMP_PTXAS", "1")  # ptxas -v's report, on stdout, for each kernel compiled
    for pages in (4096, 40000):
        cache = tqjax.PagedKVCache.allocate(config, pages, 16, 8)
        for batch, blocks, splits in ((2, 64, None), (1, 256, 64)):
            q = jnp.ones((batch, 32, head_dim), jnp.float32)
            tables = jnp.arange(batch * blocks, dtype=jnp.int32).reshape(batch, blocks)
            lens = jnp.full((batch,), 16 * blocks - 5, jnp.int32)
            capfd.readouterr()
            jax.block_until_ready(paged_decode_mgpu(q, cache, tables, lens, num_splits=splits))
            report = capfd.readouterr()
            registers = [int(r) for r in re.findall(r"Used (\d+) registers", report.out + report.err)]
            spills = [int(r) for r in re.findall(r"(\d+) bytes spill stores", report.out + report.err)]
            where = f"{name} D={head_dim}, B={batch} and {splits or 'default'} splits, a cache of {pages} pages"
            assert registers, f"{where}: no ptxas report (was the kernel compiled here?)"
            assert spills and not any(spills), f"{where}: ptxas spilled {max(spills, default=None)} bytes a thread"
            assert max(registers) <= limit, (
                f"{where}: the Mosaic decode compiled to {max(registers)} registers a thread, above {limit}: fewer "
                f"than programs_per_core = {programs_per_core(config, 4)} programs fit a multiprocessor")
