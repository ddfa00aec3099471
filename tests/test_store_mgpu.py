"""The Mosaic GPU store (tqjax.pallas.store_mgpu) against the reference store, bit for bit.

On a CPU (CI): the kernel lowers for CUDA (``jax.export``: the Pallas -> Mosaic GPU lowering) for every preset
it takes, the caches it does not take are named, and the host-side operands (the rotation matrix permuted on
both sides, the squares' table) are checked against the quantizer's own math. On a Hopper GPU (``-m gpu``):
every cache array written by the kernel equals ``tqjax.reference.store_reference``'s on the same inputs
(codes, fp16 key norms, value scales), slots it must not write keep their random words, and the cache is
updated in place.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cache_helpers import on_cpu, random_cache
from test_pallas_store import _inputs, _slots, _to_numpy

import tqjax
from tqjax.codec import key_codec
from tqjax.layout import PagedKVCache
from tqjax.packing import pack_codes
from tqjax.pallas import store_mgpu
from tqjax.pallas.decode_mgpu import key_channel_order, on_hopper
from tqjax.pallas.store import choose_implementation, store
from tqjax.reference import store_reference

PRESETS = ("turboquant_4bit_nc", "turboquant_3bit_nc", "turboquant_k3v4_nc", "turboquant_k3p5v4", "turboquant_k2p5v4",
           "turboquant_kqjl4v4", "turboquant_kqjl3v4")
CASES = [(name, head_dim) for head_dim in (128, 64) for name in PRESETS]  # (preset, head_dim) the kernel takes
needs_hopper = pytest.mark.skipif(not on_hopper(), reason="Mosaic GPU kernel: needs a Hopper GPU (sm_90)")
_reference_jit = jax.jit(store_reference)


def _config(name: str, head_dim: int = 128) -> tqjax.TurboQuantConfig:
    return tqjax.TurboQuantConfig.from_cache_dtype(name, head_dim)


# ---- CPU ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, head_dim", CASES)
@pytest.mark.parametrize("n, block_size", [(1, 16), (200, 64)])
def test_kernel_lowers_for_cuda(name: str, head_dim: int, n: int, block_size: int) -> None:
    cfg = _config(name, head_dim)
    cache = jax.eval_shape(lambda: PagedKVCache.allocate(cfg, 64, block_size, 2))
    x = jax.ShapeDtypeStruct((n, 2, head_dim), jnp.bfloat16)
    text = jax.export.export(store_mgpu.store_mgpu_jit, platforms=["cuda"])(
        cache, x, x, jax.ShapeDtypeStruct((n,), jnp.int32)).mlir_module()
    assert "mosaic_gpu" in text
    # in place, nothing copied: the call's outputs alias its last four operands (the cache arrays) and nothing
    # else (a ref the kernel might write, such as the key handed to inline_mgpu, would be aliased and copied)
    (call,) = [line for line in text.splitlines() if "stablehlo.custom_call @mosaic_gpu" in line]
    operands = re.search(r"custom_call @mosaic_gpu\w*\(([^)]*)\)", call).group(1).count("%")
    aliased = sorted(int(i) for i in re.findall(r"output_operand_alias<[^>]*operand_index = (\d+)", call))
    assert aliased == list(range(operands - 4, operands)), (operands, aliased)


@pytest.mark.parametrize("name, head_dim, reason", [
    ("turboquant_k8v4", 128, "fp8 keys"),
    ("turboquant_kqjl4v4", 256, "head_dim 256"),
    ("turboquant_k3p5v4", 256, "head_dim 256"),
    ("turboquant_4bit_nc", 256, "head_dim 256"),
])
def test_unsupported_caches_are_named(name: str, head_dim: int, reason: str) -> None:
    assert reason in store_mgpu.unsupported(_config(name, head_dim))
    for taken, dim in CASES:
        assert store_mgpu.unsupported(_config(taken, dim)) is None


def test_haar_rotation_is_not_taken() -> None:
    for name in ("turboquant_4bit_nc", "turboquant_kqjl4v4"):
        cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, 128, rotation="haar")
        assert "rotation" in store_mgpu.unsupported(cfg)


def test_calibrated_outliers_and_uncorrected_norms_are_not_taken() -> None:
    outliers = tuple(range(1, 128, 2))  # odd channels: a gather, not the first half
    cfg = tqjax.TurboQuantConfig.from_cache_dtype("turboquant_k3p5v4", 128, outlier_channels=outliers)
    assert "calibrated" in store_mgpu.unsupported(cfg)
    cfg = dataclasses.replace(_config("turboquant_4bit_nc"), norm_correction=False)
    assert "norm correction" in store_mgpu.unsupported(cfg)


@pytest.mark.parametrize("name, head_dim", CASES)
def test_rotation_operand_gives_each_thread_its_channels(name: str, head_dim: int) -> None:
    """With the left operand's columns in key_channel_order, the product with the operand (stored as B^T) is the
    quantizer's integer rotation ``n @ M^T`` with its columns in the same order, exactly."""
    cfg = _config(name, head_dim)
    codec = key_codec(cfg)
    order = key_channel_order(head_dim)
    rng = np.random.default_rng(0)
    n = rng.integers(-(2**11), 2**11 + 1, (64, head_dim)).astype(np.float64)
    got = n[:, order] @ store_mgpu.rotation_operand(cfg).astype(np.float64).T
    # each key segment's channels rotated by its own +-1 matrix (split keys: two halves, two matrices)
    expected = np.zeros_like(n)
    if cfg.key_format == "prod":  # one rotation of every channel
        expected = n @ np.asarray(codec.prod.pm1, np.float64).T
    for i, seg in enumerate(cfg.key_segments if cfg.key_format != "prod" else ()):
        at = list(seg.channels)
        expected[:, at] = n[:, at] @ np.asarray(codec.quantizers[i].pm1, np.float64).T
    np.testing.assert_array_equal(got, expected[:, order])
    if cfg.key_format == "prod":  # the sketch's operand, the same way: w_int S_int^T with its columns in that order
        got = n[:, order] @ store_mgpu.sketch_operand(cfg).astype(np.float64).T
        np.testing.assert_array_equal(got, (n @ np.asarray(codec.prod.sketch_matrix, np.float64).T)[:, order])
    # thread lane % 4 = c holds columns 8j + 2c + e, j < D/8: channels D/4 c .. D/4 (c + 1) - 1, in order
    per = head_dim // 4
    for c in range(4):
        cols = [8 * j + 2 * c + e for j in range(head_dim // 8) for e in range(2)]
        np.testing.assert_array_equal(order[cols], np.arange(per * c, per * c + per))


@pytest.mark.parametrize("name", ["turboquant_kqjl4v4", "turboquant_kqjl3v4"])
def test_centroid_table_is_the_centroids_by_magnitude(name: str) -> None:
    """QJL keys: entry m is the float32 bits of the MSE stage's centroid c[half + m] = -c[half - 1 - m]."""
    cfg = _config(name)
    table = store_mgpu.centroid_table(cfg)
    c = np.asarray(key_codec(cfg).prod.mse.centroids, np.float32)
    half = len(c) // 2
    assert half == 1 << (cfg.key_bits - 2)
    np.testing.assert_array_equal(table[:half].view(np.float32), c[half:])
    np.testing.assert_array_equal(table[:half].view(np.float32), -c[:half][::-1])
    assert not table[half:].any()


@pytest.mark.parametrize("name", [p for p in PRESETS if "qjl" not in p])
def test_square_table_is_the_squares_by_magnitude(name: str) -> None:
    cfg = _config(name)
    table = store_mgpu.square_table(cfg)
    used = np.zeros(32, bool)
    for i in range(len(cfg.key_segments)):  # segment i's squares from entry 16 i
        q = key_codec(cfg).quantizers[i]
        half = len(q._squares) // 2
        for m in range(half):  # count m of positive limits below: code half + m (z > 0) or half - 1 - m
            assert table[16 * i + m] == q._squares[half + m] == q._squares[half - 1 - m]
        used[16 * i:16 * i + half] = True
    assert not table[~used].any()


@pytest.mark.parametrize("name, head_dim", CASES)
def test_threads_words_make_the_packed_rows(name: str, head_dim: int) -> None:
    """Each thread packs its D/4 codes (channels D/4 c .. of a quad lane c: a key segment's lane c % (4 /
    segments)) field by field and stores them where field_runs says: the rows are the codec's (pack_codes of each
    segment), every word written once, every store aligned to its width."""
    cfg = _config(name, head_dim)
    rng = np.random.default_rng(3)
    segs = cfg.key_segments
    lanes = 4 if cfg.key_format == "prod" else 4 // len(segs)  # QJL keys: both segments over every channel
    per = head_dim // 4  # a thread's channels of a row
    key = jnp.asarray(rng.standard_normal((5, head_dim)), jnp.float32)
    if cfg.key_format == "prod":  # the MSE codes and the signs, each a segment
        code = key_codec(cfg).prod.quantize(key)
        codes = [np.asarray(code.codes), np.asarray(code.signs)]
    else:
        codes = [np.asarray(c) for c in key_codec(cfg).mse_codes(key)[0]]  # per segment [5, seg.dim]
    expected_keys = np.asarray(key_codec(cfg).encode(key)[0])
    values = rng.integers(0, 1 << cfg.value_bits, (5, head_dim))
    expected_values = np.asarray(pack_codes(jnp.asarray(values, jnp.uint32), cfg.value_bits))
    cases = [(expected_keys, [(seg.bits, seg.dim, seg.word_start, c) for seg, c in zip(segs, codes)], lanes),
             (expected_values, [(cfg.value_bits, head_dim, 0, values)], 4)]
    for expected, pieces, lanes_per in cases:
        row_words = expected.shape[-1]
        got = np.zeros_like(expected)
        written = np.zeros(row_words, int)
        for bits, dim, word_start, seg_codes in pieces:
            for lane in range(lanes_per):
                mine = seg_codes[:, per * lane:per * lane + per]
                # field by field (pack_codes takes 32 codes: a 16-code thread's padded, its words a field's first)
                mine = np.pad(mine, ((0, 0), (0, 32 - per)))
                words = np.asarray(pack_codes(jnp.asarray(mine, jnp.uint32), bits))
                first = 0
                for run in store_mgpu.field_runs(bits, dim, word_start, row_words, per):
                    if run.words:
                        at, n = run.start + lane * run.words, run.words
                        got[:, at:at + n] = words[:, first:first + n]
                        written[at:at + n] += 1
                    else:  # half a word: the lane pair's even lane in the low half (its partner's from a shuffle)
                        at, n = run.start + lane // 2, 1
                        got[:, at] |= words[:, first] << np.uint32(16 * (lane % 2))
                        written[at] += lane % 2 == 0  # the even lane stores the word
                    first += run.width
                    assert row_words % run.chunk == 0 and at % run.chunk == 0 and n % run.chunk == 0, (name, bits)
        np.testing.assert_array_equal(written, 1)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.skipif(on_hopper(), reason="checks the refusal off Hopper")
def test_refused_off_hopper() -> None:
    cfg = _config("turboquant_4bit_nc")
    cache = PagedKVCache.allocate(cfg, 4, 16, 2)
    x = jnp.ones((3, 2, 128), jnp.bfloat16)
    with pytest.raises(RuntimeError, match="Hopper"):
        store_mgpu.store_mgpu(cache, x, x, jnp.arange(3, dtype=jnp.int32))


def test_refusal_names_dtypes_and_caches(monkeypatch) -> None:
    monkeypatch.setattr(store_mgpu, "on_hopper", lambda: True)
    x = jnp.ones((3, 2, 128), jnp.bfloat16)
    cache = PagedKVCache.allocate(_config("turboquant_4bit_nc"), 4, 16, 2)
    assert store_mgpu.refusal(cache, x, x) is None
    assert "bf16" in store_mgpu.refusal(cache, x.astype(jnp.float32), x)
    assert "bf16" in store_mgpu.refusal(cache, x, x.astype(jnp.float16))
    assert "fp8 keys" in store_mgpu.refusal(PagedKVCache.allocate(_config("turboquant_k8v4"), 4, 16, 2), x, x)
    with pytest.raises(NotImplementedError, match="bf16"):
        store_mgpu.store_mgpu(cache, x.astype(jnp.float32), x, jnp.arange(3, dtype=jnp.int32))


def test_store_refuses_mosaic_with_the_reason_and_unknown_implementations() -> None:
    cfg = _config("turboquant_4bit_nc")
    cache = PagedKVCache.allocate(cfg, 4, 16, 2)
    x = jnp.ones((3, 2, 128), jnp.bfloat16)
    slots = jnp.arange(3, dtype=jnp.int32)
    assert choose_implementation(cache, x, x, interpret=True) == "triton"
    with pytest.raises(NotImplementedError, match="interpret mode"):
        store(cache, x, x, slots, interpret=True, implementation="mosaic")
    with pytest.raises(ValueError, match="implementation must be one of"):
        store(cache, x, x, slots, interpret=True, implementation="cuda")


@pytest.mark.skipif(on_hopper(), reason="checks the choice off Hopper")
def test_store_chooses_triton_off_hopper() -> None:
    cfg = _config("turboquant_4bit_nc")
    x = jnp.ones((3, 2, 128), jnp.bfloat16)
    assert choose_implementation(PagedKVCache.allocate(cfg, 4, 16, 2), x, x) == "triton"


# ---- GPU ---------------------------------------------------------------------------------------------


def _check(name: str, n: int, block_size: int, *, hk: int = 2, seed: int = 0, pad_every: int = 5,
           slots: np.ndarray | None = None, head_dim: int = 128) -> None:
    """The kernel's cache equals the reference's computed on the CPU, bit for bit, and XLA's GPU reference's but
    for rare one-ulp key norms (its float32 division is ``div.full``); slots not stored keep their words."""
    rng = np.random.default_rng(seed)
    cfg = _config(name, head_dim)
    num_blocks = max(2, -(-2 * n // block_size))
    cache = random_cache(cfg, num_blocks, block_size, hk, rng)
    key, value = _inputs(n, hk, head_dim, jnp.bfloat16, rng)
    if slots is None:
        slots = _slots(n, cache.num_slots, rng, pad_every=pad_every)
    before = _to_numpy(cache)
    expected = _to_numpy(on_cpu(store_reference, cache, key, value, jnp.asarray(slots)))
    on_gpu = _to_numpy(_reference_jit(cache, key, value, jnp.asarray(slots)))
    got = _to_numpy(store_mgpu.store_mgpu_jit(cache, key, value, jnp.asarray(slots)))
    written = np.zeros((hk, num_blocks, block_size), bool)
    for s in slots[(slots >= 0) & (slots < num_blocks * block_size)]:
        written[:, s // block_size, s % block_size] = True
    for array in expected:
        where = f"{name} D={head_dim} n={n} bs={block_size}: {array}"
        bad = np.argwhere(np.any((got[array] != expected[array]).reshape(*got[array].shape[:3], -1), axis=-1))
        assert bad.size == 0, f"{where} differs from store_reference at (head, page, row) {bad[:5].tolist()}"
        assert np.array_equal(got[array][~written], before[array][~written]), f"{where}: unwritten slots changed"
        if array == "key_scales":
            ulps = np.abs(got[array].view(np.int16).astype(np.int32) - on_gpu[array].view(np.int16).astype(np.int32))
            assert ulps.max() <= 1 and np.mean(ulps > 0) < 1e-3, where
        elif array == "key_codes" and cfg.key_format == "prod":
            # QJL keys: XLA's float32 square root on the GPU is not IEEE either, so its residual's scale L (rounded
            # to 13 bits) moves now and then (H200: 1 word of 131072 rows x 16 at 16k tokens, its signs and codes)
            rows = np.any(got[array] != on_gpu[array], axis=-1)
            assert np.mean(rows) < 1e-3, where
        else:
            assert np.array_equal(got[array], on_gpu[array]), f"{where} differs from the reference on the GPU"


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("n, block_size", [(1, 16), (63, 16), (64, 32), (200, 64), (4099, 16), (4101, 32)])
def test_gpu_bit_exact(name: str, n: int, block_size: int) -> None:
    _check(name, n, block_size)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("n, block_size", [(1, 16), (200, 64), (4101, 32)])
def test_gpu_bit_exact_head_dim_64(name: str, n: int, block_size: int) -> None:
    _check(name, n, block_size, head_dim=64, hk=8)


@needs_hopper
@pytest.mark.gpu
def test_gpu_bit_exact_many_heads_contiguous_slots() -> None:
    _check("turboquant_4bit_nc", 16384, 16, hk=8, pad_every=0, slots=np.arange(16384, dtype=np.int32) + 5)


@needs_hopper
@pytest.mark.gpu
def test_gpu_bit_exact_two_rounds_with_an_overlapping_last_tile() -> None:
    """1040 items on 528 warpgroups (132 programs of 4): most store a second item (its copies issued during the
    first one's keys), the last tile overlapping the one before it."""
    _check("turboquant_3bit_nc", 8261, 16, hk=8)


@needs_hopper
@pytest.mark.gpu
def test_gpu_out_of_range_and_padding_slots_are_skipped() -> None:
    """Inside jit (no input check) a slot >= num_slots is dropped, like the reference's."""
    slots = np.array([3, -1, 10**6, 7, -5, 2**31 - 1, 0], np.int32)
    _check("turboquant_k3v4_nc", len(slots), 16, slots=slots)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("name, head_dim", CASES)
def test_gpu_registers_let_the_programs_share_a_multiprocessor(name: str, head_dim: int, capfd, monkeypatch) -> None:
    """``PROGRAMS_PER_CORE`` programs of ``WARPGROUPS`` x 128 threads fit a multiprocessor's 65536 registers
    (registers are given per warp in units of 256: 128 a thread for 4 warpgroups, 168 for 3). The kernel launches
    that many programs a multiprocessor, each warpgroup taking every ``workers``-th item, so with fewer resident the
    last programs run in a second wave (30-45% slower at 16k tokens: docs/PERFORMANCE.md, "A cliff at 168
    registers"). ptxas chooses the count (Mosaic cannot cap it) and moves it with N (128-168 on the H200 with jax
    0.11.2 for one warpgroup a program), so this checks the toolchain in use. A program of 4 warpgroups is held to 128
    registers by ptxas itself, which spills instead: the split presets spill 48-64 bytes a thread (static count,
    ptxas 13.0; still 2-15% faster than 3 programs of one warpgroup at 4096-16k tokens on the H200, 4-10% slower at
    64k: docs/PERFORMANCE.md, "Four warpgroups share the store's matrix"), the QJL presets 76-100 bytes (their
    residual's 32 floats a row held until the row's largest is known), the others nothing; more fails here. QJL keys
    at head_dim 64 take 101-114 registers: 4 programs a multiprocessor (``programs_per_core``)."""
    cfg = _config(name, head_dim)
    programs = store_mgpu.programs_per_core(cfg) * store_mgpu.WARPGROUPS[head_dim]
    spill_limit = {"mse": 0, "split": 64, "prod": 112}[cfg.key_format]  # QJL: 76-100 B (static count)
    limit = 65536 // (128 * programs) // 8 * 8
    monkeypatch.setenv("MOSAIC_GPU_DUMP_PTXAS", "1")  # ptxas -v's report, on stdout, for each kernel compiled
    for n in (4096, 16384):
        cache = PagedKVCache.allocate(_config(name, head_dim), 2 * n // 16 + 3, 16, 8)  # no other test's shape
        x = jnp.ones((n, 8, head_dim), jnp.bfloat16)
        capfd.readouterr()
        jax.block_until_ready(store_mgpu.store_mgpu_jit(cache, x, x, jnp.arange(n, dtype=jnp.int32)))
        report = capfd.readouterr()
        registers = [int(r) for r in re.findall(r"Used (\d+) registers", report.out + report.err)]
        assert registers, f"{name} D={head_dim} n={n}: no ptxas report (was the kernel compiled here?)"
        assert max(registers) <= limit, (
            f"{name} D={head_dim} n={n}: the Mosaic store compiled to {max(registers)} registers a thread, above "
            f"{limit}: fewer than {programs} warpgroups fit a multiprocessor")
        spills = [int(b) for b in re.findall(r"(\d+) bytes spill stores", report.out + report.err)]
        assert spills, f"{name} D={head_dim} n={n}: no spill count in ptxas's report"
        assert max(spills) <= spill_limit, (
            f"{name} D={head_dim} n={n}: the Mosaic store spills {max(spills)} bytes a thread (at most {spill_limit} "
            "measured)")


@needs_hopper
@pytest.mark.gpu
def test_gpu_cache_is_donated_and_updated_in_place() -> None:
    rng = np.random.default_rng(5)
    cache = random_cache(_config("turboquant_4bit_nc"), 8, 16, 2, rng)
    key, value = _inputs(9, 2, 128, jnp.bfloat16, rng)
    old = cache.arrays()
    new = store_mgpu.store_mgpu(cache, key, value, jnp.asarray(_slots(9, cache.num_slots, rng)))
    for name, array in old.items():
        assert array.is_deleted(), f"{name} was not donated"
        assert not new.arrays()[name].is_deleted()


@needs_hopper
@pytest.mark.gpu
def test_gpu_store_defaults_to_mosaic_where_it_runs() -> None:
    rng = np.random.default_rng(8)
    x = jnp.ones((3, 2, 128), jnp.bfloat16)
    for name, dtype, expected in [("turboquant_4bit_nc", jnp.bfloat16, "mosaic"), ("turboquant_k3v4_nc", jnp.bfloat16,
                                  "mosaic"), ("turboquant_k3p5v4", jnp.bfloat16, "mosaic"),
                                  ("turboquant_k8v4", jnp.bfloat16, "triton"), ("turboquant_kqjl4v4", jnp.bfloat16,
                                  "mosaic"), ("turboquant_4bit_nc", jnp.float16, "triton")]:
        cache = PagedKVCache.allocate(_config(name), 4, 16, 2)
        assert choose_implementation(cache, x.astype(dtype), x.astype(dtype)) == expected, (name, dtype)
    cache = random_cache(_config("turboquant_4bit_nc"), 8, 16, 2, rng)
    key, value = _inputs(40, 2, 128, jnp.bfloat16, rng)
    slots = jnp.asarray(_slots(40, cache.num_slots, rng))
    expected = _to_numpy(on_cpu(store_reference, cache, key, value, slots))
    got = _to_numpy(store(cache, key, value, slots))
    for array in expected:
        assert np.array_equal(got[array], expected[array]), array
