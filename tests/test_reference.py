"""The reference path (tqjax.store / paged_decode / dequantize / prefill_attention) vs float64 numpy.

Error bound for decode against the UNQUANTIZED cache (checked for every query head of every preset).
For one query head q over tokens t with keys k_t, values v_t, exact logits l_t = scale <q, k_t> and
weights p_t = softmax(l)_t, the quantized path computes logits l_t - delta_t with
delta_t = scale <q, k_t - k^_t> (k^ = the decoded keys, tqjax.dequantize) and values v^_t. Let
Delta = max_t |delta_t|. Then

    p^_t / p_t = e^{-delta_t} / sum_s p_s e^{-delta_s}  lies in [e^{-2 Delta}, e^{2 Delta}],

so |p^_t - p_t| <= (e^{2 Delta} - 1) p_t and sum_t |p^_t - p_t| <= e^{2 Delta} - 1. Writing
o^ - o = sum_t p^_t (v^_t - v_t) + sum_t (p^_t - p_t) v_t and using sum_t p^_t = 1:

    ||o - o^|| <= (e^{2 Delta} - 1) max_t ||v_t|| + max_t ||v_t - v^_t||.

float32 slack: the kernel scores in the rotated domain (<Pi q, c> instead of <q, Pi^T c>) and in
float32, so its logits differ from scale <q, k^_t> by a rounding error eps (below); it enters the same
inequality as Delta + eps, and the float32 weighted sum of L values adds <= 4 sqrt(L) u max ||v^||
(random-walk accumulation of L terms of size <= max ||v^||, u = 2^-24, 4-sigma).

Rounding model for eps (also the tolerance of decode vs the DEQUANTIZED cache, where Delta = 0): a
logit goes through 3 float32 reduction stages (rotate/project the query, the dot product, and -- on the
dequantized side -- the inverse rotation of the key), each off by about u * sum_i |a_i b_i| (partial
sums of random-sign terms stay below the sum of magnitudes); we allow 4x that per stage:
eps = 12 u scale max_t sum_i |q_i| |k^_ti| (+ 4 u softcap for the tanh). With scale = 1/sqrt(128),
||q|| ~ 17 and ||k|| ~ 15 this is ~1e-5, i.e. decode and the float64 computation over the dequantized
cache agree to ~2e-5 relative to max ||v^||; measured agreement is ~1e-6.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cache_helpers import random_cache, snap_to_grid_np

import tqjax
from tqjax import PRESETS, PagedKVCache, TurboQuantConfig, reference
from tqjax.codec import key_codec, value_codec
from tqjax.quantizers import grid_bits

D = 128
HK = 2
U32 = 2.0**-24
GQA_RATIOS = (1, 4, 8)
PRESET_NAMES = sorted(PRESETS)

# Ceiling on the mean relative error ||o - o^|| / ||o|| over all non-empty query heads (the typical
# error, unlike the worst-case bound above), each ~1.35x the value measured here (in parentheses). It is
# set by the value bits (4-bit values alone give ~0.1 -- the length-1 sequence is exactly that) plus the
# key error; QJL keys are unbiased but noisier than MSE keys of the same total bits.
REL_ERROR_CEILING = {
    "turboquant_k8v4": 0.14,  # (0.103)
    "turboquant_4bit_nc": 0.19,  # (0.140)
    "turboquant_k3v4_nc": 0.32,  # (0.242)
    "turboquant_3bit_nc": 0.37,  # (0.280)
    "turboquant_kqjl4v4": 0.40,  # (0.294)
    "turboquant_kqjl3v4": 0.58,  # (0.436)
    "turboquant_k3p5v4": 0.26,  # (0.191)
    "turboquant_k2p5v4": 0.40,  # (0.296)
}


def gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def config(name: str, head_dim: int = D) -> TurboQuantConfig:
    return TurboQuantConfig.from_cache_dtype(name, head_dim)


def random_kv(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys with uneven channel scales and per-token norms; values with a per-channel offset."""
    keys = rng.standard_normal((n, HK, d)) * np.exp(0.5 * rng.standard_normal(d)) * rng.uniform(0.5, 2.0, (n, 1, 1))
    values = rng.standard_normal((n, HK, d)) + 0.3 * rng.standard_normal(d)
    return keys, values


def np_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, softcap: float | None = None) -> np.ndarray:
    """float64 softmax attention of one head: q [D], k/v [L, D] -> [D]; L = 0 gives zeros."""
    if k.shape[0] == 0:
        return np.zeros(v.shape[-1])
    logits = scale * (k @ q)
    if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
    p = np.exp(logits - logits.max())
    return (p / p.sum()) @ v


def f32(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def i32(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x, jnp.int32)


def f64(x: jax.Array) -> np.ndarray:
    return np.asarray(x, np.float64)


# ---- store -----------------------------------------------------------------------------------------


def codec_round_trip(cfg: TurboQuantConfig):
    """jit of the codec alone: encodings, their decodes and the key score vectors (one compile per test)."""
    kc, vc = key_codec(cfg), value_codec(cfg)

    def run(key: jax.Array, value: jax.Array):
        kw, ks = kc.encode(key)
        vw, vs = vc.encode(value)
        return dict(
            key_codes=kw, key_scales=ks, value_codes=vw, value_scales=vs,
            k_dec=kc.decode(kw, ks), v_dec=vc.decode(vw, vs), score=kc.score_vectors(kw, ks),
        )

    return jax.jit(run)


def decode_envelope(cfg: TurboQuantConfig, score_vectors: list[np.ndarray]) -> np.ndarray:
    """Per-element magnitude E with |fl(decode) - decode| <= gamma_{2D+2} E (products of matrices).

    mse/split: |s| @ |Pi| per segment (s = score vector, centroids times norm); prod: (|m| + |v| @ |S|) @ |Pi|
    with m, v the MSE and QJL score vectors; fp8: a plain conversion, exact.
    """
    codec = key_codec(cfg)
    vecs = [np.abs(np.asarray(v, np.float64)) for v in score_vectors]
    if cfg.key_format == "fp8":
        return np.zeros_like(vecs[0])
    if cfg.key_format == "prod":
        rotated = vecs[-1] @ np.abs(codec.prod.projection.astype(np.float64))
        if len(vecs) == 2:
            rotated = rotated + vecs[0]
        return rotated @ np.abs(codec.prod.rotation.matrix.astype(np.float64))
    out = np.zeros((*vecs[0].shape[:-1], cfg.head_dim))
    for i, seg in enumerate(codec.segments):
        out[..., np.asarray(seg.channels)] = vecs[i] @ np.abs(codec.quantizers[i].rotation.matrix.astype(np.float64))
    return out


STORE_CASES = [(name, D) for name in PRESET_NAMES] + [
    (name, d) for name in ("turboquant_kqjl3v4", "turboquant_k2p5v4") for d in (64, 256)
]


@pytest.mark.parametrize("name,head_dim", STORE_CASES)
def test_store_round_trip(name: str, head_dim: int) -> None:
    cfg = config(name, head_dim)
    rng = np.random.default_rng([1, PRESET_NAMES.index(name), head_dim])
    nb, bs = 6, 16
    n_real, n_pad = 30, 10
    real_slots = rng.choice(nb * bs, n_real, replace=False)
    pads = rng.choice([-1, -5, -(2**31)], n_pad)
    slots = np.concatenate([real_slots, pads])
    order = rng.permutation(n_real + n_pad)
    slots = slots[order]
    is_real = slots >= 0
    key, value = random_kv(rng, n_real + n_pad, head_dim)

    cache = random_cache(cfg, nb, bs, HK, rng, scale_std=4.0)
    inputs = cache.arrays()
    before = {k: np.array(a) for k, a in inputs.items()}
    new = tqjax.store(cache, f32(key), f32(value), i32(slots))
    # Donated: the input cache's buffers are gone.
    for a in inputs.values():
        assert a.is_deleted()
    chex.assert_trees_all_equal_shapes_and_dtypes(new.arrays(), {k: jnp.asarray(v) for k, v in before.items()})

    # Written slots hold exactly the codec's encoding (same words, same fp16 bits); all else untouched.
    ref = jax.tree.map(np.asarray, codec_round_trip(cfg)(f32(key), f32(value)))
    blk, off = slots[is_real] // bs, slots[is_real] % bs
    for arr_name, after in new.arrays().items():
        expected = before[arr_name].copy()
        expected[:, blk, off] = np.swapaxes(ref[arr_name][is_real], 0, 1)
        got = np.asarray(after)
        if got.dtype == np.float16:
            got, expected = got.view(np.uint16), expected.view(np.uint16)
        np.testing.assert_array_equal(got, expected, err_msg=arr_name)

    # Stored slots decode (through the public dequantize over a table of all blocks) to the codec's
    # decode of the same encoding. Both are float32 evaluations of the same formula in different XLA
    # programs, so they may differ in summation order only: within 2 gamma_{2D+2} of the envelope.
    k_all, v_all = tqjax.dequantize(new, i32(np.arange(nb)[None]), i32([nb * bs]))
    chex.assert_shape((k_all, v_all), (1, nb * bs, HK, head_dim))
    k_dec = f64(k_all)[0, slots[is_real]]
    v_dec = f64(v_all)[0, slots[is_real]]
    k_codec = ref["k_dec"][is_real].astype(np.float64)
    tol = 2 * gamma(2 * head_dim + 2) * decode_envelope(cfg, [v[is_real] for v in ref["score"]])
    assert np.all(np.abs(k_dec - k_codec) <= tol), np.max(np.abs(k_dec - k_codec) - tol)
    # Values: codes * scale + zero, one multiply-add per element (FMA or not: <= 2 roundings).
    v_codec = ref["v_dec"][is_real].astype(np.float64)
    zero = ref["value_scales"][is_real][..., 1:2].astype(np.float64)
    v_tol = 2 * U32 * (np.abs(v_codec) + np.abs(zero))
    assert np.all(np.abs(v_dec - v_codec) <= v_tol)
    # And the decode is an actual reconstruction of the input (not just self-consistent): mean relative key
    # error well under 1. Worst is 3-bit QJL (~0.43: its dequantized sign sketch is unbiased but noisy,
    # ||S^T sign(S r)|| sqrt(pi/2)/d ~ 1.25 ||r||); MSE/split presets are <= ~0.3 (sqrt(D_mse)).
    rel = np.linalg.norm(k_dec - key[is_real], axis=-1) / np.linalg.norm(key[is_real], axis=-1)
    print(f"{name} d={head_dim}: mean relative key error {np.mean(rel):.3f}")
    assert np.mean(rel) < 0.6


NORM_CORRECTED = [name for name in PRESET_NAMES if PRESETS[name].norm_correction]


@pytest.mark.parametrize("name", NORM_CORRECTED)
def test_stored_norm_is_norm_corrected(name: str) -> None:
    """With norm correction the cache stores ``||k_seg|| / ||c[codes]||`` per key segment, so a decoded
    key segment has the input segment's norm. Checked against float64 numpy from the stored codes.

    Hadamard rotations code the key snapped to a per-vector grid (``tqjax.quantizers.snap_to_grid``), so
    ``||k||`` is the snapped segment's norm, recomputed here in numpy from its definition (``n`` =
    ``x * 2**(g - 1 - E)`` rounded half up, ``2**E <= max|x| < 2**(E + 1)``). It is stored as the float32
    ``sqrt`` of the exact integer ``||n||**2`` times the grid step (relative error ~ u)
    over ``sqrt`` of a fixed-point sum of squares (D roundings of 0.5 in units of 2**-27 at D=128 on a
    sum near 2**27: ~5e-7), then rounded to fp16 (half an ulp = 2**-11 relative at most); so it is the
    float64 value's fp16 rounding or an fp16 neighbour of it, a neighbour only when the float64 value
    lies within ~1e-5 relative of a rounding midpoint (fp16 ulps are >= 2**-11 relative: a few percent
    of the values at most).
    """
    cfg = config(name)
    rng = np.random.default_rng([17, PRESET_NAMES.index(name)])
    key, value = random_kv(rng, 64, D)
    out = jax.tree.map(np.asarray, codec_round_trip(cfg)(f32(key), f32(value)))
    kc = key_codec(cfg)
    for i, seg in enumerate(cfg.key_segments):
        codes = np.asarray(kc.segment_codes(jnp.asarray(out["key_codes"]), seg))
        centroids = kc.quantizers[i].centroids.astype(np.float64)
        k_seg = key[..., np.asarray(seg.channels)]
        snapped = snap_to_grid_np(k_seg, grid_bits(seg.dim))
        want = np.linalg.norm(snapped, axis=-1) / np.linalg.norm(centroids[codes], axis=-1)
        got = out["key_scales"][..., i]
        ulps = np.abs(got.view(np.uint16).astype(np.int32) - want.astype(np.float16).view(np.uint16).astype(np.int32))
        assert ulps.max() <= 1 and np.mean(ulps == 0) > 0.9, (seg, ulps.max(), np.mean(ulps == 0))
        # the decoded segment (centroids times the stored norm) has the input's norm, to fp16 precision
        decoded = np.linalg.norm(out["score"][i].astype(np.float64), axis=-1)
        np.testing.assert_allclose(decoded, np.linalg.norm(snapped, axis=-1), rtol=2.0**-11 + 1e-5)
        # and the snapped segment is the input to well within a bf16 ulp of its largest element
        np.testing.assert_allclose(snapped, k_seg, rtol=0, atol=float(np.max(np.abs(k_seg))) * 2.0**-11)



def test_store_rejects_duplicate_and_out_of_range_slots() -> None:
    cfg = config("turboquant_4bit_nc")
    rng = np.random.default_rng(2)
    cache = random_cache(cfg, 4, 16, HK, rng, scale_std=4.0)
    key, value = random_kv(rng, 3, D)
    for slots in ([5, 9, 5], [0, 64, -1], [1, 2, 10**6]):
        with pytest.raises(ValueError, match="slot_mapping"):
            tqjax.store(cache, f32(key), f32(value), i32(slots))
    # Validation happens before the call: the cache was not donated and is still usable.
    assert not cache.key_codes.is_deleted()
    tqjax.store(cache, f32(key), f32(value), i32([5, -1, 63]))


def test_store_rejects_slots_outside_int32() -> None:
    """An int64 slot below -2**31 would wrap when cast to int32 (-2**32 -> slot 0): it must raise."""
    cfg = config("turboquant_4bit_nc")
    rng = np.random.default_rng(3)
    cache = random_cache(cfg, 4, 16, HK, rng, scale_std=4.0)
    key, value = random_kv(rng, 2, D)
    with pytest.raises(ValueError, match="slot_mapping"):
        tqjax.store(cache, f32(key), f32(value), np.array([5, -(2**32)], np.int64))


# ---- paged decode ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def decode_case(name: str) -> dict:
    """One stored cache per preset: 5 ragged sequences over randomly permuted blocks.

    Block size alternates 16/32 over the presets; lengths include 0, 1, a full table and one that is
    not a multiple of the block size; block-table entries past each sequence hold garbage (-1, 2**30,
    or a valid block full of garbage); unwritten slots of partly used blocks hold garbage too.
    """
    i = PRESET_NAMES.index(name)
    rng = np.random.default_rng([10, i])
    cfg = config(name)
    bs = (16, 32)[i % 2]
    max_blocks = 5 if bs == 16 else 3
    cap = max_blocks * bs
    lens = np.array([cap - bs // 2 - 3, 0, cap, bs + 5, 1])
    used = -(-lens // bs)
    nb = int(used.sum()) + 3
    perm = rng.permutation(nb)
    spare = perm[used.sum() :]
    tables = np.empty((len(lens), max_blocks), np.int64)
    start = 0
    for b, u in enumerate(used):
        tables[b, :u] = perm[start : start + u]
        tables[b, u:] = rng.choice([-1, 2**30, int(spare[0])], max_blocks - u)
        start += u
    keys, values, slots = [], [], []
    for b, length in enumerate(lens):
        k, v = random_kv(rng, int(length), D)
        keys.append(k)
        values.append(v)
        t = np.arange(length)
        slots.append(tables[b, t // bs] * bs + t % bs)
    slot_all = np.concatenate(slots + [np.full(7, -1)])
    k_all = np.concatenate(keys + [rng.standard_normal((7, HK, D))])
    v_all = np.concatenate(values + [rng.standard_normal((7, HK, D))])
    order = rng.permutation(len(slot_all))
    cache = tqjax.store(random_cache(cfg, nb, bs, HK, rng, scale_std=4.0), f32(k_all[order]), f32(v_all[order]), i32(slot_all[order]))
    k_deq, v_deq = tqjax.dequantize(cache, i32(tables), i32(lens))
    queries = {g: 1.5 * rng.standard_normal((len(lens), HK * g, D)) for g in GQA_RATIOS}
    return dict(
        cfg=cfg, cache=cache, tables=tables, lens=lens, keys=keys, values=values, queries=queries,
        k_deq=f64(k_deq), v_deq=f64(v_deq), bs=bs,
    )


def rounding_eps(q: np.ndarray, k_hat: np.ndarray, scale: float, softcap: float | None) -> float:
    """eps = 12 u scale max_t sum_i |q_i| |k^_ti| (+ 4 u softcap): see the module docstring."""
    if k_hat.shape[0] == 0:
        return 0.0
    eps = 12 * U32 * scale * float(np.max(np.abs(k_hat) @ np.abs(q)))
    return eps + (4 * U32 * softcap if softcap is not None else 0.0)


def decode(case: dict, gqa: int, **kw) -> np.ndarray:
    out = tqjax.paged_decode(f32(case["queries"][gqa]), case["cache"], i32(case["tables"]), i32(case["lens"]), **kw)
    chex.assert_shape(out, case["queries"][gqa].shape)
    chex.assert_type(out, jnp.float32)
    chex.assert_tree_all_finite(out)
    return f64(out)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_paged_decode_vs_unquantized_within_bound(name: str) -> None:
    case = decode_case(name)
    scale = 1 / math.sqrt(D)
    rel_errors, bound_use = [], []
    for gqa in GQA_RATIOS:
        out = decode(case, gqa)
        q = case["queries"][gqa]
        for b, length in enumerate(case["lens"]):
            if length == 0:
                np.testing.assert_array_equal(out[b], 0.0)  # empty sequence: zeros, no NaN
                continue
            for h in range(q.shape[1]):
                g = h // gqa
                k, v = case["keys"][b][:, g], case["values"][b][:, g]
                k_hat, v_hat = case["k_deq"][b, :length, g], case["v_deq"][b, :length, g]
                o = np_attention(q[b, h], k, v, scale)
                delta = scale * np.max(np.abs((k - k_hat) @ q[b, h]))
                eps = rounding_eps(q[b, h], k_hat, scale, None)
                v_max = np.max(np.linalg.norm(v, axis=1))
                bound = (
                    np.expm1(2 * (delta + eps)) * v_max
                    + np.max(np.linalg.norm(v - v_hat, axis=1))
                    + 4 * math.sqrt(length) * U32 * np.max(np.linalg.norm(v_hat, axis=1))
                )
                err = np.linalg.norm(out[b, h] - o)
                assert err <= bound, (name, gqa, b, h, err, bound)
                rel_errors.append(err / np.linalg.norm(o))
                bound_use.append(err / bound)
    mean_rel = float(np.mean(rel_errors))
    ceiling = REL_ERROR_CEILING[name]
    print(f"{name}: mean rel error {mean_rel:.3f} (ceiling {ceiling}), max err/bound {max(bound_use):.3f}")
    assert mean_rel < ceiling


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("scale,softcap", [(None, None), (0.3, 8.0)])
def test_paged_decode_vs_dequantized(name: str, scale: float | None, softcap: float | None) -> None:
    """Rotated-domain scoring == scoring against the dequantized keys, to float32 rounding.

    (0.3, 8.0): a larger scale than 1/sqrt(D) makes logits ~ +-6 so that the softcap's tanh bends them
    (run at GQA 4 only: scale and softcap are static, so each value is another compile).
    """
    case = decode_case(name)
    s = 1 / math.sqrt(D) if scale is None else scale
    worst = 0.0
    for gqa in GQA_RATIOS if softcap is None else (4,):
        out = decode(case, gqa, scale=scale, softcap=softcap)
        q = case["queries"][gqa]
        for b, length in enumerate(case["lens"]):
            for h in range(q.shape[1]):
                g = h // gqa
                k_hat, v_hat = case["k_deq"][b, :length, g], case["v_deq"][b, :length, g]
                o = np_attention(q[b, h], k_hat, v_hat, s, softcap)
                if length == 0:
                    np.testing.assert_array_equal(out[b, h], 0.0)
                    continue
                v_max = np.max(np.linalg.norm(v_hat, axis=1))
                eps = rounding_eps(q[b, h], k_hat, s, softcap)
                tol = (np.expm1(2 * eps) + 4 * math.sqrt(length) * U32) * v_max
                err = np.linalg.norm(out[b, h] - o)
                assert err <= tol, (name, gqa, b, h, err, tol)
                worst = max(worst, err / v_max)
    print(f"{name} scale={scale} softcap={softcap}: max ||o - o_deq|| / max||v^|| = {worst:.2e}")


def test_dequantize_zeroes_positions_past_seq_len() -> None:
    case = decode_case("turboquant_4bit_nc")
    for b, length in enumerate(case["lens"]):
        assert np.all(case["k_deq"][b, length:] == 0) and np.all(case["v_deq"][b, length:] == 0)
        chex.assert_tree_all_finite((case["k_deq"], case["v_deq"]))


# ---- prefill ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal,softcap", [(True, None), (False, None), (True, 5.0)])
def test_prefill_vs_numpy(causal: bool, softcap: float | None) -> None:
    rng = np.random.default_rng(20)
    d, hk, gqa = 64, 2, 4
    lens = [5, 17, 9]
    starts = np.concatenate([[0], np.cumsum(lens)])
    t = int(starts[-1]) + 4  # padding tail
    q = 1.5 * rng.standard_normal((t, hk * gqa, d))
    k = rng.standard_normal((t, hk, d))
    v = rng.standard_normal((t, hk, d))
    out = tqjax.prefill_attention(f32(q), f32(k), f32(v), i32(starts), causal=causal, softcap=softcap)
    chex.assert_shape(out, q.shape)
    out = f64(out)
    np.testing.assert_array_equal(out[starts[-1] :], 0.0)
    scale = 1 / math.sqrt(d)
    for s in range(len(lens)):
        for i in range(starts[s], starts[s + 1]):
            stop = i + 1 if causal else starts[s + 1]
            for h in range(hk * gqa):
                kk, vv = k[starts[s] : stop, h // gqa], v[starts[s] : stop, h // gqa]
                o = np_attention(q[i, h], kk, vv, scale, softcap)
                # Same rounding model as decode (no dequantization stage: 2 of the 3 stages, keep 12u).
                eps = rounding_eps(q[i, h], kk, scale, softcap)
                tol = (np.expm1(2 * eps) + 4 * math.sqrt(len(kk)) * U32) * np.max(np.linalg.norm(vv, axis=1))
                assert np.linalg.norm(out[i, h] - o) <= tol, (s, i, h)


# ---- bad input through the public API --------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cache() -> PagedKVCache:
    return random_cache(config("turboquant_k3v4_nc"), 4, 16, HK, np.random.default_rng(30), scale_std=4.0)


def _store_args(rng: np.random.Generator, n: int = 3) -> dict:
    key, value = random_kv(rng, n, D)
    return dict(key=f32(key), value=f32(value), slot_mapping=i32(rng.choice(64, n, replace=False)))


STORE_BAD = [
    ("key", lambda a: a["key"][0], ValueError),  # rank 2
    ("key", lambda a: a["key"][..., :64], ValueError),  # head dim
    ("key", lambda a: jnp.concatenate([a["key"]] * 2, axis=1), ValueError),  # KV heads
    ("key", lambda a: a["key"].astype(jnp.int32), TypeError),
    ("key", lambda a: np.asarray(a["key"]).tolist(), TypeError),
    ("value", lambda a: a["value"][0], ValueError),  # rank 2
    ("value", lambda a: a["value"][:2], ValueError),  # N mismatch
    ("value", lambda a: a["value"][..., :64], ValueError),
    ("value", lambda a: a["value"].astype(jnp.uint8), TypeError),
    ("slot_mapping", lambda a: a["slot_mapping"][:, None], ValueError),
    ("slot_mapping", lambda a: a["slot_mapping"][:2], ValueError),
    ("slot_mapping", lambda a: a["slot_mapping"].astype(jnp.float32), TypeError),
]


@pytest.mark.parametrize("arg,mutate,exc", STORE_BAD)
def test_store_bad_input_names_argument(small_cache, arg, mutate, exc) -> None:
    args = _store_args(np.random.default_rng(31))
    args[arg] = mutate(args)
    with pytest.raises(exc, match=rf"\b{arg}\b"):
        tqjax.store(small_cache, args["key"], args["value"], args["slot_mapping"])
    assert not small_cache.key_codes.is_deleted()


def _decode_args(rng: np.random.Generator) -> dict:
    return dict(
        query=f32(rng.standard_normal((3, 2 * HK, D))),
        block_tables=i32(rng.permutation(4)[None, :3].repeat(3, 0)),
        seq_lens=i32([5, 0, 40]),
    )


DECODE_BAD = [
    ("query", lambda a: a["query"][0], ValueError),
    ("query", lambda a: a["query"][..., :64], ValueError),
    ("query", lambda a: a["query"].astype(jnp.int32), TypeError),
    ("query heads", lambda a: a["query"][:, :3], ValueError),  # 3 query heads over 2 KV heads
    ("block_tables", lambda a: a["block_tables"][0], ValueError),
    ("block_tables", lambda a: a["block_tables"][:2], ValueError),
    ("block_tables", lambda a: a["block_tables"].astype(jnp.float32), TypeError),
    ("seq_lens", lambda a: a["seq_lens"][:, None], ValueError),
    ("seq_lens", lambda a: a["seq_lens"][:2], ValueError),
    ("seq_lens", lambda a: a["seq_lens"].astype(jnp.float32), TypeError),
    ("seq_lens", lambda a: i32([5, -1, 40]), ValueError),
    ("seq_lens", lambda a: i32([5, 0, 49]), ValueError),  # > 3 blocks * 16
]


@pytest.mark.parametrize("arg,mutate,exc", DECODE_BAD)
def test_paged_decode_bad_input_names_argument(small_cache, arg, mutate, exc) -> None:
    args = _decode_args(np.random.default_rng(32))
    field = arg.split()[0]
    args[field] = mutate(args)
    with pytest.raises(exc, match=rf"\b{arg}\b"):
        tqjax.paged_decode(args["query"], small_cache, args["block_tables"], args["seq_lens"])


def test_non_cache_and_unknown_backend(small_cache) -> None:
    rng = np.random.default_rng(33)
    sa, da = _store_args(rng), _decode_args(rng)
    not_a_cache = small_cache.arrays()
    with pytest.raises(TypeError, match="cache"):
        tqjax.store(not_a_cache, sa["key"], sa["value"], sa["slot_mapping"])
    with pytest.raises(TypeError, match="cache"):
        tqjax.paged_decode(da["query"], not_a_cache, da["block_tables"], da["seq_lens"])
    with pytest.raises(TypeError, match="cache"):
        tqjax.dequantize(not_a_cache, da["block_tables"], da["seq_lens"])
    with pytest.raises(ValueError, match=r"no_such_backend.*reference"):
        tqjax.paged_decode(da["query"], small_cache, da["block_tables"], da["seq_lens"], backend="no_such_backend")
    with pytest.raises(ValueError, match=r"no_such_backend.*reference"):
        tqjax.store(small_cache, sa["key"], sa["value"], sa["slot_mapping"], backend="no_such_backend")
    assert not small_cache.key_codes.is_deleted()


# ---- jit ------------------------------------------------------------------------------------------


def test_paged_decode_does_not_retrace() -> None:
    chex.clear_trace_counter()
    cfg = config("turboquant_k3p5v4")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(query, cache, tables, lens):
        return tqjax.paged_decode(query, cache, tables, lens)

    cache_size = getattr(reference.paged_decode_jit, "_cache_size", None)
    sizes = []
    for step in range(3):
        rng = np.random.default_rng(40 + step)
        key, value = random_kv(rng, 20, D)
        # A new cache object (same shapes, equal static config) and fresh inputs every call.
        cache = tqjax.store(random_cache(cfg, 4, 16, HK, rng, scale_std=4.0), f32(key), f32(value), i32(rng.choice(64, 20, replace=False)))
        query = f32(rng.standard_normal((2, 4, D)))
        tables = i32(rng.permutation(4)[None].repeat(2, 0))
        lens = i32(rng.integers(0, 65, 2))
        out = run(query, cache, tables, lens)
        direct = tqjax.paged_decode(query, cache, tables, lens)
        chex.assert_trees_all_close(out, direct, rtol=0, atol=0)  # same program, same inputs
        if cache_size is not None:
            sizes.append(cache_size())
    if cache_size is not None:
        assert sizes[0] == sizes[-1], sizes  # the public entry point compiled once for these shapes
