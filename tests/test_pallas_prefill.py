"""Block-sparse Pallas prefill attention (tqjax.pallas.prefill) and its mask algebra (tqjax.masks).

Interpret mode on CPU (the same tests run the compiled kernels on a GPU). Shapes are small, so each
configuration compiles in a few seconds; the whole file stays well under 90 s on two CPU cores.

Tolerances, from the arithmetic:

* float32 inputs: the kernel and the dense reference compute the same float32 function in a different
  order (online softmax over blocks, base-2 exponentials, per-block products with fp32 accumulation;
  HIGHEST-precision products in interpret mode). Each output is a convex combination of values, so the
  rounding error is a few float32 ulps times the number of summed terms' condition (<= ~1e-6 relative
  for rows of <= 200 keys): checked at ``2e-5 * max|ref|`` (as the decode tests). Gradients add the
  recomputed ``p = exp2(s - lse)`` and ``ds = p (dp - delta)`` (a difference of O(1) terms) and a sum
  over up to T rows: checked at ``1e-4 * max|grad|``.
* bfloat16 inputs: both sides read the same bf16 values and accumulate products exactly in fp32 (a
  bf16 x bf16 product is exact in fp32), but the kernel rounds the probabilities to bf16 before
  ``p @ v`` (relative error <= 2**-9 per weight, so <= 2**-9 * max|v| on the output) and both round
  the output to bf16 (<= 2**-9 relative each): checked at ``2**-7 * max(|v|) + 2**-7 * max|ref|``.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tqjax
import tqjax.reference
from tqjax.masks import (
    EMPTY,
    FULL,
    PARTIAL,
    AndMask,
    CausalMask,
    EmptyMask,
    FullMask,
    LocalMask,
    MultiHeadMask,
    OrMask,
    block_table,
    compact_table,
    dense_mask,
)
from tqjax.pallas.prefill import (
    dense_masked_attention_reference,
    float32_precision,
    prefill_attention,
    resolve_mask,
    visited_blocks,
)
from tqjax.pallas.tuning import (
    PREFILL_DEFAULTS,
    SMEM_MARGIN,
    prefill_params,
    prefill_problem,
    prefill_smem_bytes,
)
from tqjax.platform import Platform
from tqjax.reference import prefill_attention_jit

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
F32_RTOL = 2e-5
GRAD_RTOL = 1e-4
BLOCKS = {"block_q": 16, "block_k": 16, "bwd_block_q": 16, "bwd_block_k": 16}

dense_ref = jax.jit(dense_masked_attention_reference, static_argnames=("mask", "scale", "softcap"))

# ---- mask algebra -----------------------------------------------------------------------------------

MASKS = [
    CausalMask(),
    CausalMask(offset=5),
    CausalMask(offset=-7),
    LocalMask(8, 0),
    LocalMask(5, 3),
    LocalMask(None, 4),
    LocalMask(6, None, offset=2),
    FullMask(),
    EmptyMask(),
    CausalMask() & LocalMask(10, 10),
    LocalMask(3, 0) | (CausalMask(-20) & LocalMask(30, None)),
    OrMask((LocalMask(2, 2, offset=-15), LocalMask(2, 2, offset=15), CausalMask(-40))),
    AndMask((CausalMask(), LocalMask(20, 0), LocalMask(None, 0, offset=-3))),
]


@pytest.mark.parametrize("mask", MASKS, ids=repr)
@pytest.mark.parametrize("q_len,kv_len,bq,bk", [(64, 64, 16, 16), (50, 77, 16, 8), (33, 20, 8, 32), (1, 5, 16, 16)])
def test_block_table_matches_brute_force(mask, q_len, kv_len, bq, bk):
    dense = dense_mask(mask, q_len, kv_len)[0]
    # the bands (used in-kernel) give the same dense mask as the direct definition
    q, kv = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
    from_bands = np.zeros((q_len, kv_len), bool)
    for lo, hi in mask.bands():
        from_bands |= (kv - q >= lo) & (kv - q <= hi)
    np.testing.assert_array_equal(from_bands, dense)
    table = block_table(mask, q_len, kv_len, bq, bk)
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    assert table.shape == (1, nq, nk) and table.dtype == np.int8
    for i in range(nq):
        for j in range(nk):
            blk = dense[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
            want = FULL if blk.all() else PARTIAL if blk.any() else EMPTY
            assert table[0, i, j] == want, (i, j)


def test_multi_head_table_and_sharing():
    heads = (CausalMask(), LocalMask(4, 0), CausalMask() & LocalMask(9, 0), LocalMask(3, 0) | CausalMask(-12))
    mh = MultiHeadMask(heads)
    table = block_table(mh, 40, 40, 8, 8)
    assert table.shape == (4, 5, 5)
    dense = dense_mask(mh, 40, 40)
    for h in range(4):
        np.testing.assert_array_equal(table[h], block_table(heads[h], 40, 40, 8, 8)[0])
        np.testing.assert_array_equal(dense[h], dense_mask(heads[h], 40, 40)[0])
    # equal heads collapse to one shared table
    assert block_table(MultiHeadMask((CausalMask(),) * 3), 40, 40, 8, 8).shape == (1, 5, 5)


def test_masks_are_hashable_static_values():
    a = CausalMask() & LocalMask(16, 0)
    b = AndMask((CausalMask(), LocalMask(16, 0)))
    assert a == b and hash(a) == hash(b)
    assert a.bands() == ((-16, 0),)
    assert (LocalMask(2, 0) | LocalMask(1, 5)).bands() == ((-2, 5),)  # overlapping bands merge
    assert (LocalMask(2, 0, offset=-10) | LocalMask(2, 0)).bands() == ((-12, -10), (-2, 0))
    assert resolve_mask(True, 8) == CausalMask() & LocalMask(8, 8)
    assert resolve_mask(False, (4, 2)) == LocalMask(4, 2)
    with pytest.raises(ValueError, match="left"):
        LocalMask(-1, 0)
    with pytest.raises(TypeError, match="MultiHeadMask"):
        CausalMask() & MultiHeadMask((CausalMask(),))


def test_compact_table():
    table = block_table(CausalMask() & LocalMask(31, 0), 64, 64, 16, 16)
    index, full, count = compact_table(np.asarray(table))
    assert index.shape == (1, 4, 3) and count.tolist() == [[1, 2, 3, 3]]
    assert index[0, 0].tolist() == [0, 4, 4] and index[0, 3].tolist() == [1, 2, 3]  # padded with nk
    assert full[0, 3].tolist() == [0, 1, 0] and full[0, 0].tolist() == [0, 0, 0]


def test_prefill_params():
    cuda = prefill_params(128, Platform("cuda", "sm90"))
    assert cuda == PREFILL_DEFAULTS["cuda"]
    assert prefill_params(256, Platform("cuda", "sm90"))["block_k"] == 32
    assert prefill_params(64, Platform("cuda", "sm90"))["num_warps"] == 4
    assert prefill_params(128, Platform("rocm", "gfx942"))["num_stages"] == 1
    assert set(cuda) <= set(prefill_attention.__code__.co_varnames)


@pytest.mark.parametrize("arch", ["cuda sm80", "cuda sm86", "cuda sm90", "cuda sm100", "cuda sm120", "cuda None",
                                  "rocm gfx90a", "rocm gfx942", "rocm gfx950"])
def test_prefill_params_fit_shared_memory(arch):
    """Default tiles, shrunk per GPU, fit its shared memory (or :func:`prefill_problem` says why not);
    on the H100/H200 the measured bf16 tiles stay, float32 (training) gets smaller ones (the 3-stage
    128 x 128 float32 forward asked for 385 KiB of the 227 KiB there)."""
    kind, a = arch.split()
    platform = Platform(kind, None if a == "None" else a)
    budget = platform.shared_memory_per_block
    assert budget is not None and budget >= 64 * 1024
    for d in (64, 128, 256):
        for itemsize in (2, 4):
            p = prefill_params(d, platform, itemsize=itemsize)
            fwd, bwd = prefill_smem_bytes(p, d, itemsize)
            fits = fwd <= budget - SMEM_MARGIN and bwd <= budget - SMEM_MARGIN
            why = prefill_problem(d, itemsize, platform)
            assert fits == (why is None), (d, itemsize, p, fwd, bwd, budget)
            # 16-bit inputs fit everywhere; float32 (TF32x3 stages every operand twice) fits the 227 KiB
            # GPUs at every head dim, elsewhere the dispatcher may fall back to the reference
            assert fits or (itemsize == 4 and budget < 227 * 1024), (d, itemsize, p, fwd, bwd, budget)
            assert all(p[k] >= 16 and p[k] & (p[k] - 1) == 0 for k in ("block_q", "block_k", "bwd_block_q", "bwd_block_k"))
    if arch == "cuda sm90":
        assert prefill_params(128, platform, itemsize=2) == PREFILL_DEFAULTS["cuda"]
        f32 = prefill_params(128, platform, itemsize=4)
        assert prefill_smem_bytes(f32, 128, 4)[0] < prefill_smem_bytes(PREFILL_DEFAULTS["cuda"], 128, 4)[0]
    assert Platform("cpu").shared_memory_per_block is None


# ---- forward ---------------------------------------------------------------------------------------

# ragged packing: a 1-token sequence, sequences straddling blocks, a long one with whole blocks
# inside it (FULL blocks run unmasked) and a padding tail; T is not a multiple of the block size.
QSL = (0, 1, 38, 40, 131)
T = 150


def make_inputs(seed, *, t=T, hq=4, hk=2, d=64, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((t, hq, d)) * 1.5
    k = rng.standard_normal((t, hk, d)) * rng.uniform(0.5, 1.5, (t, hk, 1))
    v = rng.standard_normal((t, hk, d))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def assert_close_to(out, ref, v, dtype):
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    assert bool(jnp.all(jnp.isfinite(out)))
    if dtype == jnp.float32:
        tol = F32_RTOL * float(jnp.max(jnp.abs(ref)))
    else:
        tol = 2**-7 * float(jnp.max(jnp.abs(v.astype(jnp.float32)))) + 2**-7 * float(jnp.max(jnp.abs(ref)))
    chex.assert_trees_all_close(out, ref, atol=tol, rtol=0)


FORWARD_CASES = {
    "causal-f32-d64-g2": ({"causal": True}, {}, jnp.float32),
    "full-f32-g1": ({"causal": False}, {"hq": 2, "hk": 2}, jnp.float32),
    "window-bf16-d128-g4": ({"window": (12, 0), "causal": False}, {"hq": 4, "hk": 1, "d": 128}, jnp.bfloat16),
    "causal-and-window-bf16": ({"window": 20}, {}, jnp.bfloat16),
    "per-head-f32-g4": (
        {"mask": MultiHeadMask((CausalMask(), LocalMask(8, 0), CausalMask() & LocalMask(25, 0),
                                LocalMask(3, 3) | CausalMask(-40)))},
        {"hq": 4, "hk": 1}, jnp.float32,
    ),
    "or-bands-softcap-scale-f32": (
        {"mask": LocalMask(6, 0) | (CausalMask(-30) & LocalMask(45, None)), "softcap": 4.0, "scale": 0.3},
        {}, jnp.float32,
    ),
    "d256-bf16-softcap": ({"softcap": 30.0}, {"t": 45, "hq": 2, "hk": 1, "d": 256}, jnp.bfloat16),
}


@pytest.mark.parametrize("name", list(FORWARD_CASES))
def test_forward_matches_dense_reference(name):
    kw, shape, dtype = FORWARD_CASES[name]
    q, k, v = make_inputs(hash(name) % 1000, dtype=dtype, **shape)
    t = q.shape[0]
    qsl = jnp.asarray([x for x in QSL if x < t - 9] + [t - 9], jnp.int32)
    out = prefill_attention(q, k, v, qsl, interpret=INTERPRET, **BLOCKS, **kw)
    chex.assert_shape(out, q.shape)
    assert out.dtype == dtype
    mask = resolve_mask(kw.get("causal", True), kw.get("window"), kw.get("mask"))
    ref = dense_ref(q, k, v, qsl, mask=mask, scale=kw.get("scale"), softcap=kw.get("softcap"))
    if isinstance(mask, (CausalMask, FullMask)):  # the plain causal / full cases match the repo's reference
        ref0 = prefill_attention_jit(q, k, v, qsl, causal=isinstance(mask, CausalMask), scale=kw.get("scale"),
                                     softcap=kw.get("softcap"))
        assert_close_to(ref, ref0, v, dtype)
    assert_close_to(out, ref, v, dtype)
    assert float(jnp.max(jnp.abs(out[t - 9 :].astype(jnp.float32)))) == 0.0  # padding rows are zeros


# ---- context (chunked prefill continuation) ------------------------------------------------------------


def make_context(seed, s, c, hk, d):
    rng = np.random.default_rng(seed)
    ck = jnp.asarray(rng.standard_normal((s, c, hk, d)), jnp.float32)
    cv = jnp.asarray(rng.standard_normal((s, c, hk, d)), jnp.float32)
    return ck, cv


@pytest.mark.parametrize("causal", [True, False])
def test_context_matches_reference(causal):
    q, k, v = make_inputs(5, t=60, hq=4, hk=2)
    qsl = jnp.asarray([0, 1, 30, 52], jnp.int32)
    ck, cv = make_context(6, 3, 40, 2, 64)
    lens = jnp.asarray([17, 0, 40], jnp.int32)
    kw = {"context_key": ck, "context_value": cv, "context_lens": lens}
    out = prefill_attention(q, k, v, qsl, causal=causal, interpret=INTERPRET, **BLOCKS, **kw)
    ref = prefill_attention_jit(q, k, v, qsl, causal=causal, **kw)
    assert_close_to(out, ref, v, jnp.float32)
    if causal:  # the general dense reference agrees with the repo's reference on context too
        assert_close_to(dense_ref(q, k, v, qsl, mask=CausalMask(), **kw), ref, v, jnp.float32)


def test_context_with_window_and_bf16_chunk():
    q, k, v = make_inputs(7, t=48, hq=2, hk=1, dtype=jnp.bfloat16)
    qsl = jnp.asarray([0, 20, 45], jnp.int32)
    ck, cv = make_context(8, 2, 24, 1, 64)
    kw = {"context_key": ck, "context_value": cv, "context_lens": jnp.asarray([24, 9], jnp.int32)}
    out = prefill_attention(q, k, v, qsl, window=(10, 0), interpret=INTERPRET, **BLOCKS, **kw)
    ref = dense_ref(q, k, v, qsl, mask=CausalMask() & LocalMask(10, 0), **kw)
    # the context is float32, so the kernel computes in float32: only the bf16 output rounding remains
    assert_close_to(out, ref, v, jnp.bfloat16)


# ---- gradients ----------------------------------------------------------------------------------------


def check_grads(q, k, v, qsl, kw, mask, *, seed=0, blocks=BLOCKS):
    w = jnp.asarray(np.random.default_rng(seed).standard_normal(q.shape), jnp.float32)

    def loss_kernel(q, k, v):
        return jnp.sum(prefill_attention(q, k, v, qsl, interpret=INTERPRET, **blocks, **kw) * w)

    def loss_ref(q, k, v):
        return jnp.sum(dense_masked_attention_reference(q, k, v, qsl, mask=mask, scale=kw.get("scale"),
                                                        softcap=kw.get("softcap")) * w)

    got = jax.jit(jax.grad(loss_kernel, (0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss_ref, (0, 1, 2)))(q, k, v)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert bool(jnp.all(jnp.isfinite(a))), name
        tol = GRAD_RTOL * float(jnp.max(jnp.abs(b)))
        chex.assert_trees_all_close(a, b, atol=tol, rtol=0, custom_message=name)


def causal_lse_reference(q, k, qsl, n_valid):
    """Natural log-sum-exp of each row's causal, same-sequence logits [T, Hq] (-inf past n_valid)."""
    t, hq, d = q.shape
    rows = jnp.arange(t)
    seg = jnp.searchsorted(qsl, rows, side="right")
    ok = (seg[:, None] == seg[None, :]) & (rows[None, :] <= rows[:, None]) & (rows[:, None] < n_valid)
    kk = jnp.repeat(k, hq // k.shape[1], axis=1)
    logits = jnp.einsum("thd,shd->hts", q, kk, precision="highest") / np.sqrt(d)
    return jax.nn.logsumexp(jnp.where(ok[None], logits, -jnp.inf), axis=-1).T


def test_grads_causal_packed_gqa_with_lse():
    """dq/dk/dv of a loss on the output AND on the returned log-sum-exp; the lse values too."""
    q, k, v = make_inputs(9, t=100, hq=4, hk=2)
    qsl = jnp.asarray([0, 1, 37, 90], jnp.int32)
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal((100, 4)), jnp.float32) * (jnp.arange(100) < 90)[:, None]

    def loss(q, k, v, fn):
        out, lse = fn(q, k, v)
        lse = jnp.where(w_lse != 0, lse, 0.0)  # padding rows have lse = -inf
        return jnp.sum(out * w) + jnp.sum(lse * w_lse), lse

    def kernel(q, k, v):
        return prefill_attention(q, k, v, qsl, interpret=INTERPRET, return_lse=True, **BLOCKS)

    def reference(q, k, v):
        return prefill_attention_jit(q, k, v, qsl), causal_lse_reference(q, k, qsl, 90)

    (_, lse), got = jax.jit(jax.value_and_grad(functools.partial(loss, fn=kernel), (0, 1, 2), has_aux=True))(q, k, v)
    (_, lse_ref), want = jax.jit(jax.value_and_grad(functools.partial(loss, fn=reference), (0, 1, 2), has_aux=True))(
        q, k, v)
    chex.assert_trees_all_close(lse, lse_ref, atol=F32_RTOL * float(jnp.max(jnp.abs(lse_ref))), rtol=0)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        chex.assert_trees_all_close(a, b, atol=GRAD_RTOL * float(jnp.max(jnp.abs(b))), rtol=0, custom_message=name)


def test_grads_per_head_window_softcap_gqa4():
    mask = MultiHeadMask((CausalMask(), LocalMask(8, 0), CausalMask() & LocalMask(20, 0), LocalMask(4, 4)))
    q, k, v = make_inputs(10, t=70, hq=4, hk=1, d=128)
    qsl = jnp.asarray([0, 33, 64], jnp.int32)
    check_grads(q, k, v, qsl, {"mask": mask, "softcap": 5.0}, mask, seed=2)


@pytest.mark.parametrize("dtype,d", [(jnp.float32, 128), (jnp.bfloat16, 128), (jnp.float32, 256), (jnp.bfloat16, 256)],
                         ids=["f32-d128", "bf16-d128", "f32-d256", "bf16-d256"])
def test_default_tiles_forward_and_grads(dtype, d):
    """The tuned default tiles (not the small test tiles above): 300 tokens so that 128-token tiles
    have full, partial and padded blocks; float32 as in training, bf16 as in serving. On a GPU this
    compiles the tiles each device actually runs with, shared-memory fit included (float32 at D=128
    once asked the H200 for more than its 227 KiB)."""
    q, k, v = make_inputs(13, t=300, hq=4, hk=2, d=d, dtype=dtype)
    qsl = jnp.asarray([0, 7, 140, 290], jnp.int32)
    out = prefill_attention(q, k, v, qsl, interpret=INTERPRET)
    assert_close_to(out, dense_ref(q, k, v, qsl, mask=CausalMask()), v, dtype)
    if dtype == jnp.float32:
        check_grads(q, k, v, qsl, {}, CausalMask(), seed=3, blocks={})


def test_float32_precision_follows_jax_default_matmul_precision():
    x3, tf32 = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3, jax.lax.DotAlgorithmPreset.TF32_TF32_F32
    assert float32_precision() == x3  # unset: float32-accurate
    for name, want in [("float32", x3), ("highest", x3), ("tensorfloat32", tf32), ("bfloat16", tf32),
                       ("default", tf32), ("high", tf32)]:
        with jax.default_matmul_precision(name):
            assert float32_precision() == want, name


def test_tensorfloat32_forward_and_grads():
    """Under jax.default_matmul_precision("tensorfloat32") (how train_to_serve trains) float32 inputs go
    through one TF32 pass on a GPU (interpret mode computes HIGHEST). Tolerance: TF32 rounds each
    product input to 11 significant bits (2**-11 relative), so logits of these inputs (|q|, |k| ~ 1.5
    * sqrt(D)) move by up to ~1e-2 and outputs/gradients by ~1% of their largest value."""
    q, k, v = make_inputs(14, t=150, hq=4, hk=2, d=128)
    qsl = jnp.asarray(QSL, jnp.int32)
    with jax.default_matmul_precision("tensorfloat32"):
        out = prefill_attention(q, k, v, qsl, interpret=INTERPRET)
        w = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)
        grads = jax.grad(lambda *a: jnp.sum(prefill_attention(*a, qsl, interpret=INTERPRET) * w), (0, 1, 2))(q, k, v)
    ref = dense_ref(q, k, v, qsl, mask=CausalMask())
    ref_grads = jax.grad(lambda *a: jnp.sum(dense_ref(*a, qsl, mask=CausalMask()) * w), (0, 1, 2))(q, k, v)
    chex.assert_trees_all_close(out, ref, atol=1e-2 * float(jnp.max(jnp.abs(ref))), rtol=0)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        chex.assert_trees_all_close(a, b, atol=2e-2 * float(jnp.max(jnp.abs(b))), rtol=0, custom_message=name)


# ---- tracing, errors, lowering ------------------------------------------------------------------------


def test_no_retrace_across_calls():
    """Same shapes, new query_start_loc values: one trace. The first packing is one sequence filling
    T = 3 blocks, so the blocks below the diagonal are FULL and run unmasked."""
    q, k, v = make_inputs(12, t=48, hq=2, hk=1)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(q, k, v, qsl):
        return prefill_attention(q, k, v, qsl, interpret=INTERPRET, **BLOCKS)

    for i, qsl in enumerate(([0, 48, 48], [0, 30, 31], [0, 5, 40])):  # incl. an empty sequence
        qsl = jnp.asarray(qsl, jnp.int32)
        assert_close_to(step(q + i, k, v, qsl), prefill_attention_jit(q + i, k, v, qsl), v, jnp.float32)


def test_bad_arguments():
    q, k, v = make_inputs(13, t=20, hq=4, hk=2)
    qsl = jnp.asarray([0, 20], jnp.int32)
    call = functools.partial(prefill_attention, interpret=INTERPRET)
    with pytest.raises(ValueError, match="key"):
        call(q, k[:10], v, qsl)
    with pytest.raises(ValueError, match="value"):
        call(q, k, v[..., :32], qsl)
    with pytest.raises(TypeError, match="query"):
        call(q.astype(jnp.int32), k, v, qsl)
    with pytest.raises(ValueError, match="multiple"):
        call(q[:, :3], k, v, qsl)
    with pytest.raises(TypeError, match="query_start_loc"):
        call(q, k, v, qsl.astype(jnp.float32))
    with pytest.raises(ValueError, match="query_start_loc"):
        call(q, k, v, jnp.asarray([0, 25], jnp.int32))
    with pytest.raises(ValueError, match="block_q"):
        call(q, k, v, qsl, block_q=48)
    with pytest.raises(ValueError, match="softcap"):
        call(q, k, v, qsl, softcap=-1.0)
    with pytest.raises(ValueError, match="heads"):
        call(q, k, v, qsl, mask=MultiHeadMask((CausalMask(),) * 3))
    with pytest.raises(ValueError, match="either mask"):
        call(q, k, v, qsl, mask=CausalMask(), window=4)
    with pytest.raises(TypeError, match="mask"):
        call(q, k, v, qsl, mask="causal")
    ck = jnp.ones((1, 8, 2, 64))
    with pytest.raises(ValueError, match="together"):
        call(q, k, v, qsl, context_key=ck)
    with pytest.raises(ValueError, match="context_lens"):
        call(q, k, v, qsl, context_key=ck, context_value=ck, context_lens=jnp.asarray([9], jnp.int32))


LOWERING_CASES = {
    "causal-bf16-d128-g4": ({}, 4, 1, 128, jnp.bfloat16),
    "perhead-window-softcap-f32-d64": (
        {"mask": MultiHeadMask((CausalMask(), LocalMask(32, 0))), "softcap": 10.0}, 2, 2, 64, jnp.float32),
    "causal-f32-tensorfloat32": ({"_matmul_precision": "tensorfloat32"}, 4, 2, 128, jnp.float32),
}


@pytest.mark.parametrize("name", list(LOWERING_CASES))
def test_lowers_to_triton_for_cuda(name):
    """Forward and backward pass the Pallas Triton lowering for CUDA (runs on CPU: export, no GPU)."""
    kw, hq, hk, d, dtype = LOWERING_CASES[name]
    kw = dict(kw)
    matmul_precision = kw.pop("_matmul_precision", None)
    shapes = (jax.ShapeDtypeStruct((300, hq, d), dtype), jax.ShapeDtypeStruct((300, hk, d), dtype),
              jax.ShapeDtypeStruct((300, hk, d), dtype), jax.ShapeDtypeStruct((4,), jnp.int32))
    kw = dict(kw, block_q=64, block_k=32, bwd_block_q=32, bwd_block_k=32, interpret=False)

    def fwd(q, k, v, qsl):
        return prefill_attention(q, k, v, qsl, **kw)

    def bwd(q, k, v, qsl):
        return jax.grad(lambda *a: jnp.sum(fwd(*a, qsl).astype(jnp.float32)), (0, 1, 2))(q, k, v)

    for f, calls in ((fwd, 1), (bwd, 3)):
        with jax.default_matmul_precision(matmul_precision):
            exported = jax.export.export(
                jax.jit(f), platforms=["cuda"],
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
            )(*shapes)
        assert exported.mlir_module().count("__gpu$xla.gpu.triton") == calls
        # the metadata prep before the kernels has no while loop (a GPU may sync with the host per trip)
        assert "stablehlo.while" not in exported.mlir_module()


def test_context_lowers_to_triton_for_cuda():
    shapes = [jax.ShapeDtypeStruct((100, 8, 128), jnp.bfloat16)] + [jax.ShapeDtypeStruct((100, 2, 128), jnp.bfloat16)] * 2
    shapes += [jax.ShapeDtypeStruct((3,), jnp.int32), jax.ShapeDtypeStruct((2, 64, 2, 128), jnp.float32),
               jax.ShapeDtypeStruct((2, 64, 2, 128), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32)]

    def f(q, k, v, qsl, ck, cv, cl):
        return prefill_attention(q, k, v, qsl, context_key=ck, context_value=cv, context_lens=cl, block_q=64,
                                 block_k=64)

    exported = jax.export.export(
        jax.jit(f), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*shapes)
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


def test_block_lists_skip_empty_blocks():
    """The kv loop of each q block covers exactly its non-empty blocks (the benchmark's premise)."""
    table = block_table(CausalMask() & LocalMask(31, 0), 256, 256, 16, 16)
    index, _, count = compact_table(np.asarray(table))
    assert count.max() == 3 and index.shape[-1] == 3  # a 32-key window touches at most 3 16-key blocks
    assert int((table == FULL).sum()) == 15  # each block just below the diagonal is full: no mask work


@pytest.mark.parametrize("mask", [CausalMask(), CausalMask() & LocalMask(20, 0), FullMask(),
                                  MultiHeadMask((CausalMask(), LocalMask(5, 5)))], ids=repr)
@pytest.mark.parametrize("qsl", [(0, 200), (0, 1, 70, 75, 190), (0, 33, 97, 130)])
def test_visited_blocks_cover_exactly_what_is_needed(mask, qsl):
    """The loop visits every kv block holding a visible (query, key) pair of the q block (brute force
    over the dense mask with sequences) and, for these masks, nothing else: empty blocks and blocks of
    other sequences are skipped."""
    t, bq, bk = 200, 16, 32
    heads = 2
    visited = visited_blocks(jnp.asarray(qsl, jnp.int32), t, mask=mask, num_heads=heads, block_q=bq, block_k=bk)
    rows = np.arange(t)
    seg = np.searchsorted(np.asarray(qsl), rows, side="right")
    same = (seg[:, None] == seg[None, :]) & (rows[:, None] < qsl[-1]) & (rows[None, :] < qsl[-1])
    dense = dense_mask(mask, t, t, heads) & same[None]
    nq, nk = -(-t // bq), -(-t // bk)
    padded = np.zeros((dense.shape[0], nq * bq, nk * bk), bool)
    padded[:, :t, :t] = dense
    needed = padded.reshape(dense.shape[0], nq, bq, nk, bk).any(axis=(2, 4))
    assert visited.shape == needed.shape
    np.testing.assert_array_equal(visited, needed)


def test_public_dispatch():
    """tqjax.prefill_attention: the reference on a CPU by default; backend names are checked."""
    rng = np.random.default_rng(11)
    q = jnp.asarray(rng.standard_normal((12, 4, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((12, 2, 64)), jnp.float32)
    qsl = jnp.asarray([0, 5, 12], jnp.int32)
    ref = tqjax.reference.prefill_attention_reference(q, k, k, qsl)
    if jax.default_backend() == "cpu":
        chex.assert_trees_all_equal(tqjax.prefill_attention(q, k, k, qsl), tqjax.prefill_attention(q, k, k, qsl,
                                                                                                       backend="reference"))
    chex.assert_trees_all_close(tqjax.prefill_attention(q, k, k, qsl), ref, atol=2e-5 * float(jnp.max(jnp.abs(ref))))
    with pytest.raises(ValueError, match="prefill backend"):
        tqjax.prefill_attention(q, k, k, qsl, backend="flash")


def test_no_fitting_tile_falls_back_to_the_reference(monkeypatch):
    """On a simulated MI300 (64 KiB of LDS) float32 at head_dim 128 fits no tile: the dispatcher uses the
    reference, and the Pallas entry point refuses with the reason before tracing a kernel."""
    gfx942 = Platform("rocm", "gfx942")
    monkeypatch.setattr(tqjax.ops, "detect_platform", lambda: gfx942)
    monkeypatch.setattr(tqjax.pallas.tuning, "detect_platform", lambda: gfx942)
    q, k, v = make_inputs(15, t=40, hq=2, hk=1, d=128)
    qsl = jnp.asarray([0, 40], jnp.int32)
    chex.assert_trees_all_equal(tqjax.prefill_attention(q, k, v, qsl), prefill_attention_jit(q, k, v, qsl))
    with pytest.raises(ValueError, match=r"shared memory .* rocm gfx942 has 64 KiB"):
        prefill_attention(q, k, v, qsl)
    assert prefill_problem(128, 2, gfx942) is None  # bf16 fits
