"""Pallas paged decode vs the reference decode (interpret mode on CPU; the same tests on a GPU).

Tolerance: the kernel and the reference compute the same float32 function in a different order
(split-KV log-sum-exp merge, online softmax, products of float16 (default) or tf32 hi/lo splits of
the query and of the probabilities on the GPU; the polynomial centroids round onto the table exactly),
so they agree to float32 accumulation error: relative errors of a few 1e-7 per operation over sums of O(seq_len)
terms, checked at 2e-5 of max|out|.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ptx_interpreter import run_ptx

import tqjax
from tqjax.pallas.decode import centroid_lookup, choose_num_splits, paged_decode
from tqjax.reference import paged_decode_jit, store_jit

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
RTOL = 2e-5


def make_case(name: str, *, head_dim: int, block_size: int, hk: int, group: int, lens, seed: int):
    """A cache filled with random tokens, random block tables (garbage past each sequence)."""
    rng = np.random.default_rng(seed)
    cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, head_dim)
    b = len(lens)
    max_blocks = max(1, -(-max(lens) // block_size))
    num_blocks = b * max_blocks + 3
    cache = tqjax.PagedKVCache.allocate(cfg, num_blocks, block_size, hk)
    n = num_blocks * block_size
    k = jnp.asarray(rng.standard_normal((n, hk, head_dim)) * rng.uniform(0.5, 2.0, (n, hk, 1)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((n, hk, head_dim)), jnp.float32)
    cache = store_jit(cache, k, v, jnp.arange(n, dtype=jnp.int32))  # jitted: one compile per shape, not one per op
    perm = rng.permutation(num_blocks)
    tables = np.full((b, max_blocks), -7, np.int32)
    tables[:, 1::2] = 2**30  # garbage the kernel must never follow
    for i, length in enumerate(lens):
        used = -(-length // block_size)
        tables[i, :used] = perm[i * max_blocks : i * max_blocks + used]
    q = jnp.asarray(rng.standard_normal((b, hk * group, head_dim)), jnp.float32)
    return q, cache, jnp.asarray(tables), jnp.asarray(np.asarray(lens, np.int32))


def check(q, cache, tables, lens, **kw):
    ref = paged_decode_jit(q, cache, tables, lens, scale=kw.get("scale"), softcap=kw.get("softcap"))
    out = paged_decode(q, cache, tables, lens, interpret=INTERPRET, implementation="triton", **kw)
    chex.assert_shape(out, q.shape)
    assert bool(jnp.all(jnp.isfinite(out)))
    tol = RTOL * float(jnp.max(jnp.abs(ref)))
    chex.assert_trees_all_close(out, ref, atol=tol, rtol=0)
    empty = np.asarray(lens) == 0
    assert float(jnp.max(jnp.abs(out[empty]), initial=0.0)) == 0.0  # empty sequences give zeros, not NaN
    return out


@pytest.mark.parametrize("name", list(tqjax.PRESETS))
def test_every_preset(name):
    check(*make_case(name, head_dim=128, block_size=16, hk=2, group=4, lens=[0, 1, 37, 90], seed=1), num_splits=2)


@pytest.mark.parametrize("name", ["turboquant_4bit_nc", "turboquant_kqjl3v4"])
def test_tf32_score_products(name):
    """The tf32 split (SPLIT_QUERY), the alternative to the default float16 operands, is as accurate."""
    from tqjax.pallas.decode import SPLIT_QUERY

    check(*make_case(name, head_dim=128, block_size=16, hk=2, group=4, lens=[3, 70], seed=5), precision=SPLIT_QUERY)


def test_f16_split_keeps_small_and_large_magnitudes():
    """SPLIT_F16 (the default) scales query rows and each step's probabilities by powers of 2 into
    float16's range before splitting them. KV head 0: queries of ~5e-4 against keys of norm ~1e4 (the
    query's low part would be float16-subnormal unscaled) and value scales of ~1e-6 (so would the
    probabilities times them); KV head 1: queries of ~3e4 (float16 overflow unscaled) against keys of
    norm ~1e-3, value scales ~1e2. Both heads' logits stay O(1), and each head's output is checked at
    float32 accuracy against its own max|out|."""
    import dataclasses

    q, cache, tables, lens = make_case("turboquant_4bit_nc", head_dim=128, block_size=16, hk=2, group=4,
                                       lens=[40, 21], seed=6)
    per_head = lambda a, x: (a.astype(jnp.float32) * jnp.asarray(x)[:, None, None, None]).astype(a.dtype)
    q = q * jnp.repeat(jnp.asarray([5e-4, 3e4]), 4)[None, :, None]
    cache = dataclasses.replace(cache, key_scales=per_head(cache.key_scales, [2e3, 1e-4]),
                                value_scales=per_head(cache.value_scales, [1e-5, 1e3]))
    assert bool(jnp.all(jnp.isfinite(cache.key_scales.astype(jnp.float32))))
    ref = paged_decode_jit(q, cache, tables, lens)
    out = paged_decode(q, cache, tables, lens, interpret=INTERPRET, implementation="triton")
    for h in range(2):
        rows = slice(4 * h, 4 * h + 4)
        chex.assert_trees_all_close(out[:, rows], ref[:, rows], atol=RTOL * float(jnp.max(jnp.abs(ref[:, rows]))), rtol=0)


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("name", ["turboquant_4bit_nc", "turboquant_k3v4_nc"])
def test_gqa_ratios(name, group):
    check(*make_case(name, head_dim=128, block_size=16, hk=2, group=group, lens=[5, 64], seed=group))


@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("name", ["turboquant_3bit_nc", "turboquant_k8v4", "turboquant_kqjl4v4"])
def test_head_dims(name, head_dim):
    check(*make_case(name, head_dim=head_dim, block_size=16, hk=1, group=4, lens=[33, 17], seed=head_dim))


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_block_sizes(block_size):
    lens = [block_size * 2 + 3, 1, block_size]
    check(*make_case("turboquant_4bit_nc", head_dim=128, block_size=block_size, hk=1, group=4, lens=lens, seed=7),
          num_splits=3)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize("block_tokens", [16, 64])
def test_splits_and_chunks(num_splits, block_tokens):
    case = make_case("turboquant_k2p5v4", head_dim=128, block_size=16, hk=2, group=2, lens=[150, 3, 0], seed=11)
    check(*case, num_splits=num_splits, block_tokens=block_tokens)


@pytest.mark.parametrize("lookup,dot_mode", [("select", "mma"), ("poly", "fma"), ("select", "fma"), ("poly", "mma"),
                                             ("poly_fma", "mma"), ("poly", "mma_t"), ("poly_fma", "mma_t"),
                                             ("prmt", "mma_t"), ("prmt", "fma")])
def test_lookup_and_dot_modes(lookup, dot_mode):
    if lookup in ("poly_fma", "prmt") and INTERPRET:
        pytest.skip("inline PTX runs only in a compiled CUDA kernel (its lowering is tested below)")
    if (lookup, dot_mode) == ("poly", "mma_t") and INTERPRET:
        pytest.skip("the interpret-mode default: every other test here runs it (on CUDA GPUs the lookup is prmt)")
    check(*make_case("turboquant_kqjl3v4", head_dim=128, block_size=16, hk=2, group=4, lens=[70, 9], seed=3),
          lookup=lookup, dot_mode=dot_mode)


@pytest.mark.parametrize("group,precision", [(1, "split_f16"), (8, "split_query"), (16, "split_f16")])
def test_transposed_products(group, precision):
    """dot_mode "mma_t" (tokens as the rows of the products, the GQA group padded to 8 columns) for
    a group smaller than 8, one that fills it and one wider (16 columns), ragged lengths, softcap,
    both splits."""
    check(*make_case("turboquant_4bit_nc", head_dim=128, block_size=16, hk=2, group=group, lens=[77, 0, 16],
                     seed=group), dot_mode="mma_t", precision=precision, softcap=20.0, num_splits=2)


def test_softcap_and_scale():
    check(*make_case("turboquant_4bit_nc", head_dim=128, block_size=16, hk=1, group=4, lens=[50], seed=5),
          scale=0.3, softcap=8.0)


def test_bf16_query():
    q, cache, tables, lens = make_case("turboquant_4bit_nc", head_dim=128, block_size=16, hk=1, group=4,
                                       lens=[40, 20], seed=9)
    q16 = q.astype(jnp.bfloat16)
    out = paged_decode(q16, cache, tables, lens, interpret=INTERPRET, implementation="triton")
    assert out.dtype == jnp.bfloat16
    ref = paged_decode_jit(q16, cache, tables, lens)
    # both round the same float32 result to bfloat16: at most one bf16 ulp (2**-8 relative) apart
    chex.assert_trees_all_close(out.astype(jnp.float32), ref.astype(jnp.float32),
                                atol=2**-7 * float(jnp.max(jnp.abs(ref.astype(jnp.float32)))), rtol=0)


def test_no_retrace_across_steps():
    q, cache, tables, lens = make_case("turboquant_3bit_nc", head_dim=128, block_size=16, hk=1, group=4,
                                       lens=[20, 40], seed=2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(q, cache, tables, lens):
        return paged_decode(q, cache, tables, lens, interpret=INTERPRET, implementation="triton", num_splits=2)

    for i in range(3):
        step(q + i, cache, tables, lens + i)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_polynomial_centroids_match_table(bits, dim):
    """The in-kernel polynomial, rounded to tf32, gives every decode-table entry exactly (so it is used,
    not the select fallback, for every codebook a preset uses: 1..5 bits), in both its forms."""
    from tqjax.pallas.decode import _poly_eval_f32, _poly_fma_host

    c = tqjax.TurboQuantMSE(dim, bits).centroids  # the decode table the reference uses
    lk = centroid_lookup(tqjax.lloyd_max_codebook(bits, dim).centroids, "poly")
    assert lk.centroids == tuple(float(x) for x in c)
    if bits == 1:
        assert lk.method in ("poly", "select")
        return
    assert lk.method == "poly"
    got = _poly_eval_f32(np.arange(c.size), c.size, np.asarray(lk.coefs, np.float32))
    np.testing.assert_array_equal(got, c)
    # the FMA form (emulated exactly on the host) keeps the same coefficients and is exact too
    fma = centroid_lookup(tqjax.lloyd_max_codebook(bits, dim).centroids, "poly_fma")
    assert fma.method == "poly_fma" and fma.coefs == lk.coefs
    got = _poly_fma_host(np.arange(c.size), c.size, np.asarray(fma.coefs, np.float32))
    np.testing.assert_array_equal(got, c)


@pytest.mark.parametrize("distribution", ["beta", "gaussian"])
def test_polynomial_lookup_exists_for_other_dims(distribution):
    """The polynomial in ``x * x`` is exact (both forms, checked inside centroid_lookup) for 2-5-bit
    codebooks of head dims the presets do not fix, and for the Gaussian approximation: no fallback to
    the compare/select chain."""
    for dim in (32, 48, 80, 96, 160, 192, 384, 512):
        for bits in (2, 3, 4, 5):
            lk = centroid_lookup(tqjax.lloyd_max_codebook(bits, dim, distribution).centroids, "poly_fma")
            assert lk.method == "poly_fma", (dim, bits)


def test_every_decode_table_is_exact_in_float16():
    """SPLIT_F16 (the default) feeds the decoded key tile to float16 products unrounded: every table
    (1-8 bits, head_dim 32-512) must be exact in float16, else the decode falls back to the tf32 split."""
    from tqjax.pallas.decode import _exact_in_f16

    assert not _exact_in_f16([0.1, 1e-6])  # below float16's subnormal spacing: the check can fail
    assert not _exact_in_f16([0.1, 1.0 + 2.0**-12])  # 13 significant bits
    for bits in range(1, 9):
        for dim in (32, 64, 128, 256, 512):
            assert _exact_in_f16(tqjax.TurboQuantMSE(dim, bits).centroids), (bits, dim)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("method", ["poly", "poly_fma", "prmt", "select"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_kernel_lookup_gives_the_table(bits, method, dtype):
    """The in-kernel lookup (compiled on the GPU, where "poly_fma" is inline PTX and may round straight
    to float16) returns exactly the decode-table entry of every code, in float32 and in float16."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    from tqjax.pallas.decode import _lookup

    if method in ("poly_fma", "prmt") and INTERPRET:
        pytest.skip("inline PTX: compiled CUDA kernels only")
    table = tqjax.TurboQuantMSE(128, bits).centroids
    lk = centroid_lookup(tqjax.lloyd_max_codebook(bits, 128).centroids, method)
    assert lk.method == ("poly_fma" if (method, bits) == ("prmt", 5) else method)  # 32 entries: no prmt
    codes = np.random.default_rng(bits).permutation(np.arange(32 * 32) % table.size).reshape(32, 32).astype(np.int32)

    def kernel(c_ref, o_ref):
        o_ref[...] = _lookup(c_ref[...], lk, dtype)

    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(codes.shape, dtype), interpret=INTERPRET,
        compiler_params=pltriton.CompilerParams(num_warps=2, num_stages=1),
    )(jnp.asarray(codes))
    np.testing.assert_array_equal(np.asarray(out, np.float64), table[codes])


@pytest.mark.parametrize("distribution", ["beta", "gaussian"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_prmt_asm_gives_the_table(bits, distribution):
    """The "prmt" lookup's PTX, run by a host interpreter of its instructions, returns the float16 bits of
    the decode table for every combination of four codes (the GPU tests run the compiled block)."""
    from tqjax.pallas.decode import prmt_asm

    for dim in (64, 128, 256):
        lk = centroid_lookup(tqjax.lloyd_max_codebook(bits, dim, distribution).centroids, "prmt")
        assert lk.method == "prmt"
        table = np.asarray(lk.centroids).astype(np.float16).view(np.uint16).astype(np.uint32)
        n = table.size
        codes = np.stack(np.meshgrid(*[np.arange(n)] * 4, indexing="ij"), -1).reshape(-1, 4).astype(np.uint32)
        regs = run_ptx(prmt_asm(lk), {f"${2 + i}": codes[:, i] for i in range(4)})
        got = np.stack([regs["$0"] & 0xFFFF, regs["$0"] >> 16, regs["$1"] & 0xFFFF, regs["$1"] >> 16], -1)
        np.testing.assert_array_equal(got, table[codes], err_msg=f"bits={bits} dim={dim}")


def test_num_splits_heuristic():
    assert choose_num_splits(1, 8, 256, 2, 132) == 33  # 8 programs -> ~2 waves over 132 cores
    assert choose_num_splits(128, 8, 256, 2, 132) == 1  # 1024 programs already fill the device
    assert choose_num_splits(1, 1, 3, 2, 132) == 2  # never more splits than chunks of pages


def test_bad_arguments():
    q, cache, tables, lens = make_case("turboquant_4bit_nc", head_dim=128, block_size=16, hk=1, group=4,
                                       lens=[4], seed=0)
    with pytest.raises(ValueError, match="lookup"):
        paged_decode(q, cache, tables, lens, lookup="table", interpret=INTERPRET)
    for lookup in ("poly_fma", "prmt"):
        with pytest.raises(ValueError, match="PTX"):
            paged_decode(q, cache, tables, lens, lookup=lookup, interpret=True)
    with pytest.raises(ValueError, match="cut must be one of"):
        paged_decode(q, cache, tables, lens, cut="diagonal", interpret=INTERPRET)
    with pytest.raises(ValueError, match="not with cut='lengths'"):
        paged_decode(q, cache, tables, lens, cut="lengths", num_splits=2, interpret=INTERPRET)
    with pytest.raises(ValueError, match="by the lengths unless num_splits"):
        paged_decode(q, cache, tables, lens, cut="width", implementation="mosaic")


@pytest.mark.parametrize("name,dot_mode,group,block_size,block_tokens", [
    ("turboquant_4bit_nc", "mma_t", 4, 16, 64),
    ("turboquant_k8v4", "mma", 8, 32, 32),
    ("turboquant_kqjl3v4", "fma", 2, 16, 32),
    ("turboquant_k3p5v4", "mma_t", 1, 64, 64),
])
def test_lengths_cut_matches_reference(name, dot_mode, group, block_size, block_tokens):
    """cut="lengths" (pieces by the sequences' lengths, tqjax.pallas.pieces): a ragged batch with empty sequences
    in block tables twice as wide as the longest (garbage past every sequence) gives the reference's output, and
    the jitted step holds the table and merge kernels (the cut is not silently the width's)."""
    q, cache, tables, lens = make_case(name, head_dim=128, block_size=block_size, hk=2, group=group,
                                       lens=[0, 700, 1, 64, 333, 0, 129], seed=group + block_size)
    tables = jnp.concatenate([tables, jnp.full_like(tables, 2**30)], axis=1)
    check(q, cache, tables, lens, cut="lengths", dot_mode=dot_mode, block_tokens=block_tokens,
          lookup="poly" if INTERPRET or dot_mode == "fma" else None)
    step = jax.make_jaxpr(lambda q: paged_decode(q, cache, tables, lens, interpret=INTERPRET, implementation="triton",
                                                 cut="lengths", dot_mode=dot_mode))(q)
    assert "tq_piece_table" in str(step) and "tq_merge_pieces" in str(step)


def test_ptx_lookup_is_the_cuda_default_only(monkeypatch):
    """The inline-PTX lookup ("prmt") is the tuned default on CUDA; ROCm and the interpreter get "poly",
    and an explicit "prmt" or "poly_fma" on ROCm is refused before any kernel is traced."""
    from tqjax.pallas import decode as decode_module
    from tqjax.pallas.tuning import decode_params
    from tqjax.platform import Platform

    assert decode_params("turboquant_4bit_nc", Platform("cuda", "sm90"))["lookup"] == "prmt"
    assert decode_params("turboquant_4bit_nc", Platform("rocm", "gfx942"))["lookup"] == "poly"
    assert decode_params("turboquant_4bit_nc", Platform("cpu"))["lookup"] == "poly"
    q, cache, tables, lens = make_case("turboquant_4bit_nc", head_dim=128, block_size=16, hk=1, group=4,
                                       lens=[4], seed=0)
    monkeypatch.setattr(decode_module, "detect_platform", lambda: Platform("rocm", "gfx942"))
    for lookup in ("poly_fma", "prmt"):
        with pytest.raises(ValueError, match="not ROCm"):
            paged_decode(q, cache, tables, lens, lookup=lookup)
    with pytest.raises(ValueError, match="dot_mode"):
        paged_decode(q, cache, tables, lens, dot_mode="wgmma", interpret=INTERPRET)
    with pytest.raises(ValueError, match="query"):
        paged_decode(q[:, :, :64], cache, tables, lens, interpret=INTERPRET)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode(q, cache, tables, lens + 100, interpret=INTERPRET)


def test_tuned_launch_follows_the_detected_platform(monkeypatch):
    """The tuned launch parameters and the lookup checks come from the same platform detection: with
    the platform reported as an H200, a 4bit_nc decode launches with the H200 entry of tuning.json,
    and the CUDA default lookup becomes "poly" in interpret mode."""
    from tqjax.pallas import decode as decode_module
    from tqjax.pallas.tuning import decode_params
    from tqjax.platform import Platform

    h200 = decode_params("turboquant_4bit_nc", Platform("cuda", "sm90", "NVIDIA H200"))
    launch = lambda p: (p["block_tokens"], p["num_warps"], p["num_stages"])
    assert launch(h200) != launch(decode_params("turboquant_4bit_nc", Platform("cpu")))  # else the test is void

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return jnp.zeros(args[0].shape, jnp.float32)

    monkeypatch.setattr(decode_module, "detect_platform", lambda: Platform("cuda", "sm90", "NVIDIA H200"))
    monkeypatch.setattr(decode_module, "_paged_decode", spy)
    q, cache, tables, lens = make_case("turboquant_4bit_nc", head_dim=128, block_size=16, hk=1, group=4,
                                       lens=[4], seed=0)
    paged_decode(q, cache, tables, lens, interpret=True)
    assert launch(seen) == launch(h200)
    assert seen["lookup"] == "poly"


@functools.lru_cache(maxsize=None)
def _lowering_case(name):
    cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, 128)
    cache = tqjax.PagedKVCache.allocate(cfg, 32, 16, 2)
    return (jnp.zeros((2, 8, 128), jnp.bfloat16), cache, jnp.zeros((2, 8), jnp.int32), jnp.full((2,), 100, jnp.int32))


def _lowers(platform, name, num_splits=2, **kw):
    """Whether ``_paged_decode(**kw)`` for ``name`` passes the Pallas Triton lowering for ``platform``
    (export, so it runs on the CPU, no GPU needed)."""
    from tqjax.pallas import decode

    def f(q, cache, tables, lens):
        return decode._paged_decode(q, cache, tables, lens, scale=0.1, softcap=None, num_splits=num_splits,
                                    block_tokens=32, num_warps=4, interpret=False, **kw)

    exported = jax.export.export(
        jax.jit(f), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*_lowering_case(name))
    return "__gpu$xla.gpu.triton" in exported.mlir_module()


@pytest.mark.parametrize("dot_mode", ["mma", "mma_t"])
def test_lowers_to_triton_for_rocm(dot_mode):
    """The ROCm configuration (plain-jnp "poly" lookup, no inline PTX; float16 products, which AMD's
    matrix cores all have) passes the Pallas Triton lowering for ROCm."""
    from tqjax.pallas.decode import SPLIT_F16

    assert _lowers("rocm", "turboquant_kqjl3v4", num_stages=1, lookup="poly", dot_mode=dot_mode, precision=SPLIT_F16)


@pytest.mark.parametrize("dot_mode", ["mma_f16", "mma_tf32", "mma_t", "fma"])
@pytest.mark.parametrize("name", list(tqjax.PRESETS))
def test_lowers_to_triton_for_cuda(name, dot_mode):
    """The kernel passes the Pallas Triton lowering for CUDA."""
    from tqjax.pallas.decode import SPLIT_F16, SPLIT_QUERY

    assert _lowers("cuda", name, num_stages=2, lookup="poly" if dot_mode == "fma" else "poly_fma",
                   dot_mode=dot_mode if dot_mode in ("mma_t", "fma") else "mma",
                   precision=SPLIT_QUERY if dot_mode == "mma_tf32" else SPLIT_F16)


@pytest.mark.parametrize("platform,lookup,dot_mode", [("cuda", "poly_fma", "mma_t"), ("cuda", "poly", "fma"),
                                                      ("rocm", "poly", "mma")])
def test_lengths_cut_lowers_to_triton(platform, lookup, dot_mode):
    """The pieces' decode (whole query and output refs indexed by the table's sequence and slot) passes the Pallas
    Triton lowering: one indexer a load, the ref views Triton refuses avoided."""
    from tqjax.pallas.decode import SPLIT_F16

    assert _lowers(platform, "turboquant_kqjl3v4", num_splits=None, num_stages=1, lookup=lookup, dot_mode=dot_mode,
                   precision=SPLIT_F16, resident=264)
