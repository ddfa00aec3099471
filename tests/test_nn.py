"""tqjax.nn: metadata pytree, TurboQuantAttention, TransformerLM, the scheduler and generate.

Every model has fresh random weights (norm scales and biases included) and is tiny: d_model 64,
head_dim 32, 4 query heads over 2 KV heads, 2 layers, vocabulary 50, block size 8.

Independent ground truths: the attention/LM forward passes are re-implemented here in float64 numpy
(prefill, exact attention) and in plain jnp (gradients), with RoPE written as a complex rotation of the
channel pairs (i, i + D/2) rather than the module's rotate-half formula.

Tolerance of decode vs exact attention over the unquantized K/V (the "close to exact" check). For one
query head with logits l_t = scale <q, k_t> and softmax weights p_t, quantized keys k^_t shift the
logits by delta_t = scale <q, k_t - k^_t> (the softcap map s -> c tanh(s / c) is 1-Lipschitz, so
softcapped logits move by at most as much). With Delta = max_t |delta_t| (the same bound as
tests/test_reference.py):

    ||o - o^|| <= (e^{2 Delta} - 1) max_t ||v_t|| + max_t ||v_t - v^_t||,

where k^, v^ are the cache contents read back with tqjax.dequantize. The layer output is
o_proj(concat_h o_h), so its error is at most ||W_o||_2 sqrt(sum_h bound_h^2); float32 rounding adds
~1e-6 relative, covered by a 1e-4 * ||out|| slack.

Native ("auto") layers store K/V rounded to bfloat16 (8 significant bits): |k - k^| <= u |k|
elementwise with the unit roundoff u = 2**-8, so the same bound applies with Delta <= u scale ||q|| ||k|| and
||v - v^|| <= u ||v||; everything else is float32.
"""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tqjax
from tqjax import reference
from tqjax.backends import boundary_layer_dtypes
from tqjax.nn import (
    AttentionMetadata,
    BlockAllocator,
    PagedScheduler,
    TransformerLM,
    TurboQuantAttention,
    build_metadata,
    generate,
)
from tqjax.nn.scheduler import _serve_step

D_MODEL, HEAD_DIM, HQ, HK, VOCAB, BLOCK, MLP = 64, 32, 4, 2, 50, 8, 96
EPS = 1e-6
ROPE_BASE = 500.0  # small base: even short sequences rotate every channel pair noticeably


# ---- helpers ---------------------------------------------------------------------------------------


def randomize(module: nnx.Module, seed: int) -> None:
    """Fresh random parameters: kernels/embeddings keep their init, norm scales ~ 1 + 0.3 N(0,1),
    biases ~ 0.1 N(0,1) (they start at 1 and 0, which would hide mistakes)."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = []
    for (path, leaf), key in zip(leaves, keys):
        name = str(path[-1])
        noise = jax.random.normal(key, leaf.shape, leaf.dtype)
        if "scale" in name:
            leaf = 1.0 + 0.3 * noise
        elif "bias" in name:
            leaf = 0.1 * noise
        new.append(leaf)
    pure = jax.tree_util.tree_unflatten(treedef, new)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(module, state)


def params64(module: nnx.Module) -> dict:
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def np_rms(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * scale


def np_rope(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """x [T, H, D] float64: the pair (x_i, x_{i+D/2}) as the complex x_i + i x_{i+D/2}, times e^{i pos w_i}."""
    h = x.shape[-1] // 2
    w = ROPE_BASE ** (-2.0 * np.arange(h) / x.shape[-1])
    z = (x[..., :h] + 1j * x[..., h:]) * np.exp(1j * pos[:, None, None] * w)
    return np.concatenate([z.real, z.imag], axis=-1)


def np_linear(p: dict, x: np.ndarray) -> np.ndarray:
    return x @ p["kernel"] + p.get("bias", 0.0)


def np_qkv(p: dict, x: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Attention-layer projections in float64: x [T, d_model] -> q [T, Hq, D], k, v [T, Hk, D]."""
    t = x.shape[0]
    q = np_linear(p["q_proj"], x).reshape(t, HQ, HEAD_DIM)
    k = np_linear(p["k_proj"], x).reshape(t, HK, HEAD_DIM)
    v = np_linear(p["v_proj"], x).reshape(t, HK, HEAD_DIM)
    if "q_norm" in p:
        q, k = np_rms(q, p["q_norm"]["scale"]), np_rms(k, p["k_norm"]["scale"])
    return np_rope(q, pos), np_rope(k, pos), v


def np_attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, softcap: float | None) -> np.ndarray:
    """float64 attention of one query row over a context: q [Hq, D], k/v [L, Hk, D] -> [Hq, D]."""
    g = HQ // HK
    out = np.zeros_like(q)
    for h in range(HQ):
        s = k[:, h // g] @ q[h] / math.sqrt(HEAD_DIM)
        if softcap is not None:
            s = softcap * np.tanh(s / softcap)
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v[:, h // g]
    return out


def alloc_requests(lens: list[int], first_block: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Disjoint consecutive blocks for requests of ``lens`` tokens (+1 spare token each):
    (block tables, slots of all their first ``len`` tokens)."""
    tables, slots, nxt = [], [], first_block
    for n in lens:
        nb = math.ceil((n + 1) / BLOCK)
        tables.append(list(range(nxt, nxt + nb)))
        nxt += nb
        pos = np.arange(n)
        slots.append((np.asarray(tables[-1])[pos // BLOCK] * BLOCK + pos % BLOCK).tolist())
    return tables, slots


def slot_at(table: list[int], pos: int) -> int:
    return table[pos // BLOCK] * BLOCK + pos % BLOCK


def tiny_lm(
    seed: int, kv_cache_dtypes: str | list[str], *, tie: bool = True, softcap: float | None = None
) -> TransformerLM:
    model = TransformerLM(
        VOCAB, D_MODEL, 2, HQ, HK, HEAD_DIM, MLP,
        kv_cache_dtypes=kv_cache_dtypes, rope_base=ROPE_BASE, qk_norm=True, softcap=softcap,
        tie_embeddings=tie, norm_eps=EPS, rngs=nnx.Rngs(seed),
    )
    randomize(model, seed + 1000)
    return model


# ---- metadata --------------------------------------------------------------------------------------


def test_metadata_pytree_jit_without_retrace() -> None:
    tables, slots = alloc_requests([3, 6])
    md1 = build_metadata([[slot_at(tables[0], 3)], slots[1]], tables, [4, 6], num_decodes=1, max_blocks=4, num_tokens=9)
    md2 = build_metadata(
        [[slot_at(tables[1], 6)], slots[0]], tables[::-1], [7, 3], num_decodes=1, max_blocks=4, num_tokens=9
    )
    assert len(jax.tree_util.tree_leaves(md1)) == 4
    assert jax.tree_util.tree_structure(md1) == jax.tree_util.tree_structure(md2)
    assert jax.tree_util.tree_structure(md1) != jax.tree_util.tree_structure(
        build_metadata(slots, tables, [3, 6], num_decodes=0, max_blocks=4, num_tokens=9)
    )

    @jax.jit
    @chex.assert_max_traces(n=1)
    def positions(md: AttentionMetadata) -> jax.Array:
        return md.positions()

    np.testing.assert_array_equal(positions(md1), [3, 0, 1, 2, 3, 4, 5, 0, 0])
    np.testing.assert_array_equal(positions(md2), [6, 0, 1, 2, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(md1.block_tables[0], [0, -1, -1, -1])
    np.testing.assert_array_equal(md1.slot_mapping[7:], [-1, -1])


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(query_start_loc=[1, 2, 5]), "start at 0"),
        (dict(query_start_loc=[0, 2, 5], slot_mapping=[2, 3, 8, 9, 10]), "must equal the rows of the 1 decode"),
        (dict(seq_lens=[1, 3], slot_mapping=[0, 8, 9, 10, -1]), "request 0 \\(0 cached \\+ 1 new.* a prefill"),
        (dict(seq_lens=[4, 5], slot_mapping=[3, 10, 11, 12, -1]), "request 1 \\(2 cached \\+ 3 new.* a decode"),
        (dict(num_decode_tokens=17), "must lie in \\[num_decodes"),
        (dict(has_prefill_context=1), "must be a bool"),
        (dict(seq_lens=[4, 2]), "must include the new tokens"),
        (dict(slot_mapping=[3, 8, 9, 11, -1]), "slot_mapping\\[3\\] = 11 but request 1 position 2"),
        (dict(slot_mapping=[3, 8, 9, 10, 7]), "padding rows"),
        (dict(seq_lens=[4, 40]), "exceed"),
        (dict(num_decode_tokens=2), "num_decode_tokens"),
        (dict(block_tables=[[0, -1]]), "block_tables has 1 rows"),
        (dict(slot_mapping=[3.0, 8, 9, 10, -1]), "int32"),
    ],
)
def test_metadata_validation(change: dict, match: str) -> None:
    good = dict(
        slot_mapping=[3, 8, 9, 10, -1], block_tables=[[0, -1], [1, 2]], seq_lens=[4, 3],
        query_start_loc=[0, 1, 4], num_decodes=1, num_prefills=1, num_decode_tokens=1,
    )
    good.update(change)
    fields = {k: (jnp.asarray(v) if isinstance(v, list) else v) for k, v in good.items()}
    with pytest.raises((ValueError, TypeError), match=match):
        AttentionMetadata(**fields).validate(num_tokens=5, block_size=BLOCK)


# ---- attention -------------------------------------------------------------------------------------


ATTN_CASES = [
    # preset, qk_norm, softcap, use_bias
    ("turboquant_k8v4", True, None, False),
    ("turboquant_3bit_nc", False, 8.0, True),
    ("auto", True, 8.0, True),  # an unquantized (bf16) boundary layer
]


@pytest.mark.parametrize("preset,qk_norm,softcap,use_bias", ATTN_CASES)
def test_attention_prefill_then_decode(preset: str, qk_norm: bool, softcap: float | None, use_bias: bool) -> None:
    attn = TurboQuantAttention(
        D_MODEL, HQ, HK, HEAD_DIM, kv_cache_dtype=preset, rope_base=ROPE_BASE, qk_norm=qk_norm,
        softcap=softcap, use_bias=use_bias, norm_eps=EPS, rngs=nnx.Rngs(0),
    )
    randomize(attn, 1)
    p = params64(attn)
    rng = np.random.default_rng(2)
    lens = [5, 11, 1]
    tables, slots = alloc_requests(lens)
    n_pad = 3
    x_pre = rng.standard_normal((sum(lens) + n_pad, D_MODEL))
    md_pre = build_metadata(slots, tables, lens, num_decodes=0, num_tokens=len(x_pre), block_size=BLOCK)
    cache = attn.allocate_cache(num_blocks=8, block_size=BLOCK)

    out_pre, cache = attn(jnp.asarray(x_pre, jnp.float32), cache, md_pre)

    # Prefill vs float64: per request, causal attention over its exact K/V.
    pos_pre = np.concatenate([np.arange(n) for n in lens])
    q, k, v = np_qkv(p, x_pre[: sum(lens)], pos_pre)
    starts = np.concatenate([[0], np.cumsum(lens)])
    want = np.zeros((len(x_pre), HQ, HEAD_DIM))
    for b, n in enumerate(lens):
        for i in range(n):
            r = starts[b] + i
            want[r] = np_attend(q[r], k[starts[b] : r + 1], v[starts[b] : r + 1], softcap)
    want = np_linear(p["o_proj"], want.reshape(len(x_pre), -1))
    np.testing.assert_allclose(np.asarray(out_pre), want, rtol=0, atol=1e-5 * np.abs(want).max())  # measured 5e-7

    # One decode step per request, each attending over the quantized cache (its new token included).
    x_dec = rng.standard_normal((len(lens), D_MODEL))
    md_dec = build_metadata(
        [[slot_at(t, n)] for t, n in zip(tables, lens)], tables, [n + 1 for n in lens],
        num_decodes=len(lens), block_size=BLOCK,
    )
    out_dec, cache = attn(jnp.asarray(x_dec, jnp.float32), cache, md_dec)
    q_dec, k_dec, v_dec = np_qkv(p, x_dec, np.asarray(lens))

    # (a) the layer's decode == the reference decode on the same cache (same query, to float32 rounding).
    ref = reference.paged_decode_jit(
        jnp.asarray(q_dec, jnp.float32), cache, md_dec.block_tables, md_dec.seq_lens, softcap=softcap
    )
    ref = np_linear(p["o_proj"], np.asarray(ref, np.float64).reshape(len(lens), -1))
    np.testing.assert_allclose(np.asarray(out_dec), ref, rtol=0, atol=1e-5 * np.abs(ref).max())  # measured 4e-7

    # (b) vs exact attention over the unquantized K/V, within the bound of the module docstring.
    k_hat, v_hat = (np.asarray(a, np.float64) for a in tqjax.dequantize(cache, md_dec.block_tables, md_dec.seq_lens))
    w_o = np.linalg.norm(p["o_proj"]["kernel"], 2)
    g = HQ // HK
    rel_errors = []
    for b, n in enumerate(lens):
        k_all = np.concatenate([k[starts[b] : starts[b + 1]], k_dec[b : b + 1]])
        v_all = np.concatenate([v[starts[b] : starts[b + 1]], v_dec[b : b + 1]])
        exact = np_linear(p["o_proj"], np_attend(q_dec[b], k_all, v_all, softcap).reshape(-1))
        bounds = []
        for h in range(HQ):
            kk, vv = k_all[:, h // g], v_all[:, h // g]
            delta = np.abs((kk - k_hat[b, : n + 1, h // g]) @ q_dec[b, h]).max() / math.sqrt(HEAD_DIM)
            v_err = np.linalg.norm(vv - v_hat[b, : n + 1, h // g], axis=-1).max()
            bounds.append(np.expm1(2 * delta) * np.linalg.norm(vv, axis=-1).max() + v_err)
        err = np.linalg.norm(np.asarray(out_dec[b], np.float64) - exact)
        assert err <= w_o * np.linalg.norm(bounds) + 1e-4 * np.linalg.norm(exact), (b, err)
        rel_errors.append(err / np.linalg.norm(exact))
    if preset == "turboquant_k8v4":
        # fp8 keys + 4-bit values: the error is set by the 4-bit values (tests/test_reference.py measures
        # ~0.10 mean relative error at D=128; here 0.07, and 0.06-0.15 of the bound above).
        assert np.mean(rel_errors) < 0.15, rel_errors
    if preset == "auto":
        # bf16 K/V: the cache holds exactly the rounded K/V, and the decode error is of the order of
        # the unit roundoff u = 2**-8 (the bound above with Delta <= u scale ||q|| ||k||).
        assert isinstance(cache, tqjax.NativePagedKVCache) and cache.key.dtype == jnp.bfloat16
        u = 2.0**-8
        for b, n in enumerate(lens):
            k_all = np.concatenate([k[starts[b] : starts[b + 1]], k_dec[b : b + 1]])
            # float32 projections are within ~1e-6 relative of the float64 ones: a small slack
            assert np.all(np.abs(k_hat[b, : n + 1] - k_all) <= u * np.abs(k_all) * 1.01 + 1e-5)
        assert np.max(rel_errors) < 4 * u, rel_errors


def test_attention_continuation_needs_context_flag() -> None:
    attn = TurboQuantAttention(D_MODEL, HQ, HK, HEAD_DIM, kv_cache_dtype="turboquant_4bit_nc", rngs=nnx.Rngs(0))
    cache = attn.allocate_cache(num_blocks=4, block_size=BLOCK)
    tables, _ = alloc_requests([27])
    # 20 new tokens at positions 7..26 of a 27-token context: a long continuation chunk.
    md = build_metadata([[slot_at(tables[0], i) for i in range(7, 27)]], tables, [27], num_decodes=0)
    assert md.has_prefill_context and (md.num_decodes, md.num_decode_tokens) == (0, 0)
    md = dataclasses.replace(md, has_prefill_context=False)
    x = jnp.ones((20, D_MODEL), jnp.float32)
    with pytest.raises(ValueError, match="prefill request 0 has 7 cached tokens .* has_prefill_context is False"):
        attn(x, cache, md)

    # Inside jit seq_lens are traced: the chunk's rows come out NaN instead of silently wrong.
    @nnx.jit
    def step(attn: TurboQuantAttention, x: jax.Array, cache: tqjax.PagedKVCache, md: AttentionMetadata) -> jax.Array:
        return attn(x, cache, md)[0]

    assert np.isnan(np.asarray(step(attn, x, cache, md))).all()


def test_attention_rejects_mismatched_cache() -> None:
    attn = TurboQuantAttention(D_MODEL, HQ, HK, HEAD_DIM, kv_cache_dtype="turboquant_4bit_nc", rngs=nnx.Rngs(0))
    other = TurboQuantAttention(D_MODEL, HQ, HK, HEAD_DIM, kv_cache_dtype="turboquant_k8v4", rngs=nnx.Rngs(0))
    tables, slots = alloc_requests([2])
    md = build_metadata(slots, tables, [2], num_decodes=0)
    with pytest.raises(ValueError, match="needs turboquant_4bit_nc"):
        attn(jnp.ones((2, D_MODEL)), other.allocate_cache(4, BLOCK), md)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        TurboQuantAttention(D_MODEL, 3, 2, HEAD_DIM, kv_cache_dtype="turboquant_k8v4", rngs=nnx.Rngs(0))


# ---- training mode ---------------------------------------------------------------------------------


def jnp_lm_logits(
    p: dict, tokens: jax.Array, bounds: list[tuple[int, int]], softcap: float | None, tie: bool
) -> jax.Array:
    """Independent plain-jnp forward of the LM (one sequence at a time, dense causal softmax)."""

    def rms(x: jax.Array, scale: jax.Array) -> jax.Array:
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + EPS) * scale

    def rope(x: jax.Array) -> jax.Array:
        n, _, d = x.shape
        w = ROPE_BASE ** (-2.0 * jnp.arange(d // 2) / d)
        z = (x[..., : d // 2] + 1j * x[..., d // 2 :]) * jnp.exp(1j * jnp.arange(n)[:, None, None] * w)
        return jnp.concatenate([z.real, z.imag], axis=-1)

    hp = jax.lax.Precision.HIGHEST
    h = p["embed"]["embedding"][tokens]
    for layer in range(len(p["blocks"])):
        bp = p["blocks"][layer]
        ap = bp["attn"]
        x = rms(h, bp["attn_norm"]["scale"])
        outs = []
        for s, e in bounds:
            n = e - s
            q = jnp.dot(x[s:e], ap["q_proj"]["kernel"], precision=hp).reshape(n, HQ, HEAD_DIM)
            k = jnp.dot(x[s:e], ap["k_proj"]["kernel"], precision=hp).reshape(n, HK, HEAD_DIM)
            v = jnp.dot(x[s:e], ap["v_proj"]["kernel"], precision=hp).reshape(n, HK, HEAD_DIM)
            q, k = rms(q, ap["q_norm"]["scale"]), rms(k, ap["k_norm"]["scale"])
            q, k = rope(q), jnp.repeat(rope(k), HQ // HK, axis=1)
            v = jnp.repeat(v, HQ // HK, axis=1)
            logits = jnp.einsum("qhd,khd->hqk", q, k, precision=hp) / math.sqrt(HEAD_DIM)
            if softcap is not None:
                logits = softcap * jnp.tanh(logits / softcap)
            logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, -1e30)
            o = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(logits, axis=-1), v, precision=hp)
            outs.append(o.reshape(n, HQ * HEAD_DIM))
        h = h + jnp.dot(jnp.concatenate(outs), ap["o_proj"]["kernel"], precision=hp)
        x = rms(h, bp["mlp_norm"]["scale"])
        mp = bp["mlp"]
        mlp = jax.nn.silu(jnp.dot(x, mp["gate"]["kernel"], precision=hp)) * jnp.dot(x, mp["up"]["kernel"], precision=hp)
        h = h + jnp.dot(mlp, mp["down"]["kernel"], precision=hp)
    h = rms(h, p["final_norm"]["scale"])
    head = p["embed"]["embedding"].T if tie else p["head"]["kernel"]
    return jnp.dot(h, head, precision=hp)


def packed_batch(seed: int, lens: list[int], n_pad: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Random packed tokens [sum(lens) + n_pad], query_start_loc, and next-token targets (-1: no loss)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, sum(lens) + n_pad)
    qsl = np.concatenate([[0], np.cumsum(lens)])
    targets = np.full_like(tokens, -1)
    for s, e in zip(qsl[:-1], qsl[1:]):
        targets[s : e - 1] = tokens[s + 1 : e]
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(qsl, jnp.int32), jnp.asarray(targets, jnp.int32)


def next_token_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy over rows with a target (>= 0)."""
    logits = logits[: targets.shape[0]]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    mask = targets >= 0
    return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.sum(mask)


def test_training_gradients_match_independent_jnp() -> None:
    softcap = 5.0
    model = tiny_lm(10, "turboquant_4bit_nc", tie=False, softcap=softcap)
    lens = [7, 3, 12]
    tokens, qsl, targets = packed_batch(11, lens, n_pad=2)
    bounds = list(zip(np.asarray(qsl[:-1]).tolist(), np.asarray(qsl[1:]).tolist()))

    def model_loss(m: TransformerLM) -> jax.Array:
        return next_token_loss(m.train_logits(tokens, qsl), targets)

    def ref_loss(p: dict) -> jax.Array:
        return next_token_loss(jnp_lm_logits(p, tokens[: sum(lens)], bounds, softcap, tie=False), targets[: sum(lens)])

    loss, grad_state = nnx.jit(nnx.value_and_grad(model_loss))(model)
    grads = nnx.to_pure_dict(grad_state)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ref_loss_value, ref_grads = jax.jit(jax.value_and_grad(ref_loss))(params)
    np.testing.assert_allclose(loss, ref_loss_value, rtol=1e-5)
    # float32 both ways, different association orders: measured max deviation ~2e-6 of each max |grad|.
    flat, ref_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref_grads)
    assert len(flat) == len(ref_flat)
    for (path, g), r in zip(flat, ref_flat):
        g, r = np.asarray(g), np.asarray(r)
        assert np.isfinite(g).all(), path
        assert np.abs(r).max() > 0, path
        np.testing.assert_allclose(g, r, rtol=0, atol=2e-5 * np.abs(r).max(), err_msg=jax.tree_util.keystr(path))

    # One SGD step on this batch lowers its loss.
    lr = 0.1
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda w, dw: w - lr * dw, state, grad_state))
    assert float(nnx.jit(model_loss)(model)) < float(loss) - 1e-3


# ---- scheduler and generation ----------------------------------------------------------------------


def test_block_allocator_and_scheduler() -> None:
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(3)
    assert blocks == [0, 1, 2] and alloc.num_free == 1
    with pytest.raises(RuntimeError, match="out of KV-cache blocks"):
        alloc.allocate(2)
    alloc.free(blocks[:2])
    with pytest.raises(ValueError, match="not an allocated block"):
        alloc.free([0])
    assert alloc.num_free == 3

    sched = PagedScheduler(num_blocks=6, block_size=BLOCK, max_blocks_per_seq=3)
    a = sched.add([1] * 8)
    batch = sched.schedule([a])
    assert batch.metadata.num_prefills == 1 and sched.seqs[a].blocks == [0]
    sched.append(a, 5)
    b = sched.add([2] * 10)
    batch = sched.schedule([b, a])  # a decodes (goes first, needs a second block), b prefills
    md = batch.metadata
    assert batch.seq_ids == (a, b) and (md.num_decodes, md.num_prefills) == (1, 1)
    np.testing.assert_array_equal(md.block_tables, [[0, 1, -1], [2, 3, -1]])
    np.testing.assert_array_equal(md.seq_lens, [9, 10])
    np.testing.assert_array_equal(md.slot_mapping, [8] + list(range(16, 26)))
    np.testing.assert_array_equal(batch.last_rows, [0, 10])
    np.testing.assert_array_equal(batch.tokens, [5] + [2] * 10)
    sched.free(a)
    assert sched.allocator.num_free == 4
    c = sched.add([3] * 40)
    with pytest.raises(ValueError, match="exceeds max_blocks_per_seq"):
        sched.schedule([c])
    sched.append(b, 1)
    sched.append(b, 1)
    batch = sched.schedule([b])  # 10 cached + 2 new tokens: a two-row decode (speculative-verify shape)
    md = batch.metadata
    assert (md.num_decodes, md.num_decode_tokens, md.num_prefills) == (1, 2, 0)
    np.testing.assert_array_equal(md.slot_mapping, [26, 27])
    np.testing.assert_array_equal(md.seq_lens, [12])
    np.testing.assert_array_equal(batch.last_rows, [1])
    assert batch.complete.tolist() == [True]


def full_recompute_greedy(model: TransformerLM, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy generation without a cache: every step reruns train_logits (exact attention) on the whole
    packed batch, padded to a fixed length so it compiles once."""
    fwd = nnx.jit(TransformerLM.train_logits)
    total = sum(map(len, prompts)) + len(prompts) * steps
    seqs = [list(p) for p in prompts]
    for _ in range(steps):
        lens = [len(s) for s in seqs]
        qsl = np.concatenate([[0], np.cumsum(lens)])
        tokens = np.zeros(total, np.int32)
        tokens[: qsl[-1]] = np.concatenate(seqs)
        logits = np.asarray(fwd(model, jnp.asarray(tokens), jnp.asarray(qsl, jnp.int32)))
        for s, end in zip(seqs, qsl[1:]):
            s.append(int(logits[end - 1].argmax()))
    return [s[len(p) :] for s, p in zip(seqs, prompts)]


def test_generate_batch_independent_and_matches_recompute() -> None:
    model = tiny_lm(20, ["turboquant_k8v4", "turboquant_3bit_nc"])
    rng = np.random.default_rng(21)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (5, 11, 1)]
    steps = 6

    assert model.kv_cache_dtypes == ["turboquant_k8v4", "turboquant_3bit_nc"]
    batched, caches = generate(model, model.allocate_caches(num_blocks=12, block_size=BLOCK), prompts, steps)
    assert [c.config.name for c in caches] == model.kv_cache_dtypes
    assert all(len(g) == steps for g in batched)
    assert all(0 <= t < VOCAB for g in batched for t in g)
    for prompt, want in zip(prompts, batched):
        alone, caches = generate(model, caches, [prompt], steps)
        assert alone == [want]

    # Prefill logits == no-cache logits (both exact attention), so the first generated token agrees.
    sched = PagedScheduler(12, BLOCK, 4)
    batch = sched.schedule([sched.add(p) for p in prompts])
    logits, caches = model.serve_step(batch.tokens, caches, batch.metadata)
    lens = [len(p) for p in prompts]
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    train = model.train_logits(batch.tokens, qsl)
    np.testing.assert_allclose(logits, train, rtol=0, atol=1e-5)
    recompute = full_recompute_greedy(model, prompts, steps)
    assert [g[0] for g in recompute] == [g[0] for g in batched]


def test_boundary_layers_generate_on_cpu() -> None:
    """kv_cache_dtypes from boundary_layer_dtypes: bf16 "auto" caches at the first and last layers,
    TurboQuant in between, all served on the CPU (the registry routes "auto" to the reference)."""
    dtypes = boundary_layer_dtypes("turboquant_4bit_nc", 4, 1)
    assert dtypes == ["auto", "turboquant_4bit_nc", "turboquant_4bit_nc", "auto"]
    model = TransformerLM(
        VOCAB, D_MODEL, 4, HQ, HK, HEAD_DIM, MLP, kv_cache_dtypes=dtypes, rope_base=ROPE_BASE, qk_norm=True,
        norm_eps=EPS, rngs=nnx.Rngs(50),
    )
    randomize(model, 51)
    caches = model.allocate_caches(num_blocks=8, block_size=BLOCK)
    assert [type(c) for c in caches] == [tqjax.NativePagedKVCache, tqjax.PagedKVCache, tqjax.PagedKVCache,
                                         tqjax.NativePagedKVCache]
    assert caches[0].bytes_per_token == 2 * 2 * HEAD_DIM * HK
    rng = np.random.default_rng(52)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (5, 11)]
    generated, caches = generate(model, caches, prompts, 4)
    assert [c.config.name for c in caches] == dtypes and caches[0].key.dtype == jnp.bfloat16
    assert all(len(g) == 4 and all(0 <= t < VOCAB for t in g) for g in generated)
    assert np.abs(np.asarray(caches[0].key, np.float32)).max() > 0  # the native layers were written
    # The prompt is prefilled over exact K/V, so the first token is the exact model's.
    assert [g[0] for g in full_recompute_greedy(model, prompts, 1)] == [g[0] for g in generated]


def test_native_cache_logits_match_exact_attention() -> None:
    """An all-"auto" LM served with chunked prefill (a first chunk, a long continuation chunk over the
    dequantized bf16 prefix, a short one as decode rows) and teacher-forced decode steps gives the
    logits of exact attention (train_logits over the whole sequence).

    Only the cached K/V differ from exact attention: rounded to bfloat16 (relative at most 2**-8 =: u
    per element). Each layer's attention output then moves by O(u) relative (module docstring bound),
    and the logits by about u of their scale over the 2 layers: measured 2e-3..5.4e-3 of max |logit|
    (0.5-1.4 u; a turboquant_4bit_nc cache: 8e-2..1.8e-1). Asserted: 4 u = 1.6e-2. The first chunk
    attends over exact K/V: float32 agreement (6e-7 measured).
    """
    model = tiny_lm(40, "auto", softcap=6.0)
    seq = np.random.default_rng(41).integers(0, VOCAB, 48).tolist()
    exact = np.asarray(model.train_logits(jnp.asarray(seq, jnp.int32), jnp.asarray([0, 48], jnp.int32)))
    scale = np.abs(exact).max()
    caches = model.allocate_caches(num_blocks=8, block_size=BLOCK)
    sched = PagedScheduler(8, BLOCK, 6, max_prefill_chunk=20)
    sid = sched.add(seq[:44])  # chunks of 20 (first), 20 (long continuation), 4 (decode rows)
    done, errors = 0, []
    while done < len(seq):
        batch = sched.schedule([sid])
        logits, caches = _serve_step(model, batch.tokens, caches, batch.metadata)
        rows = int(batch.metadata.query_start_loc[-1])
        pos = np.asarray(batch.metadata.positions())[:rows]
        errors.append(np.abs(np.asarray(logits)[:rows] - exact[pos]).max() / scale)
        done = int(pos[-1]) + 1
        if batch.complete[0] and done < len(seq):
            sched.append(sid, seq[done])  # teacher forcing
    assert len(errors) == 3 + 4 and isinstance(caches[0], tqjax.NativePagedKVCache)
    assert errors[0] < 1e-5, errors
    assert max(errors[1:]) < 4 * 2.0**-8, errors


def test_generate_eos_and_sampling() -> None:
    model = tiny_lm(30, "turboquant_4bit_nc")
    rng = np.random.default_rng(31)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (4, 9)]
    caches = model.allocate_caches(num_blocks=6, block_size=BLOCK)
    full, caches = generate(model, caches, prompts, 5)
    eos = full[0][1]
    stopped, caches = generate(model, caches, prompts, 5, eos_id=eos)
    for f, s in zip(full, stopped):
        want = f[: f.index(eos) + 1] if eos in f else f
        assert s == want

    key = jax.random.key(32)
    s1, caches = generate(model, caches, prompts, 3, greedy=False, key=key)
    s2, caches = generate(model, caches, prompts, 3, greedy=False, key=key)
    assert s1 == s2 and all(len(g) == 3 and all(0 <= t < VOCAB for t in g) for g in s1)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        generate(model, caches, prompts, 3, greedy=False)
