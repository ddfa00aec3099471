"""Chunked prefill: continuation chunks of a prompt over the TurboQuant cache (tqjax.nn, tqjax.reference).

A request with ``c`` cached tokens and a chunk of ``n`` new ones is served as (tqjax/nn/metadata.py):
first chunk (c == 0) -> attention over the chunk's exact K/V; short continuation (n <= 16) -> one
paged-decode row per token over the quantized cache; long continuation -> attention over the
dequantized prefix followed by the chunk's exact K/V. Every check compares against an independent
computation over the SAME quantized cache the layer produced:

* the reference prefill with a context vs a float64 numpy loop;
* each chunk of a 63-token prompt, for several chunkings (7+16+40 mixes all three kinds, 63 one-token
  chunks), vs float64 numpy attention (first and long chunks, with the prefix read back by
  tqjax.dequantize) or the reference paged decode run row by row (short chunks);
* a mixed batch (decodes first; chunks of 16 and 17 tokens on both sides of the threshold) vs each
  request run alone;
* the scheduler's chunking and ``generate`` with and without chunked prefill.

Helpers and the tiny model geometry (d_model 64, head_dim 32, 4 query / 2 KV heads, block 8) come
from tests/test_nn.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_nn import (
    BLOCK,
    D_MODEL,
    EPS,
    HEAD_DIM,
    HK,
    HQ,
    ROPE_BASE,
    VOCAB,
    alloc_requests,
    np_attend,
    np_linear,
    np_qkv,
    params64,
    randomize,
    slot_at,
    tiny_lm,
)

import tqjax
from tqjax import reference
from tqjax.nn import (
    SHORT_CHUNK_TOKENS,
    AttentionMetadata,
    PagedScheduler,
    TransformerLM,
    TurboQuantAttention,
    build_metadata,
    generate,
)
from tqjax.nn.scheduler import _serve_step

assert SHORT_CHUNK_TOKENS == 16  # the chunkings below are chosen around it


def f32(a: np.ndarray) -> jax.Array:
    return jnp.asarray(a, jnp.float32)


def copy_cache(cache: tqjax.PagedKVCache) -> tqjax.PagedKVCache:
    """An independent copy (the layer donates the cache it is given)."""
    return jax.tree.map(jnp.copy, cache)


_step = nnx.jit(lambda attn, x, cache, md: attn(x, cache, md))


# ---- reference prefill with a cached context -------------------------------------------------------


@pytest.mark.parametrize("causal,softcap", [(True, None), (True, 5.0), (False, None)])
def test_prefill_with_context_vs_numpy(causal: bool, softcap: float | None) -> None:
    rng = np.random.default_rng(40)
    d, hk, g, cap = 32, 2, 3, 24
    lens, ctx = [5, 17, 9], [0, 11, 24]
    starts = np.concatenate([[0], np.cumsum(lens)])
    t = int(starts[-1]) + 3  # padding tail
    q = 1.5 * rng.standard_normal((t, hk * g, d))
    k, v = rng.standard_normal((t, hk, d)), rng.standard_normal((t, hk, d))
    # Context entries past ctx[s] are random too: they must be ignored.
    kc, vc = rng.standard_normal((3, cap, hk, d)), rng.standard_normal((3, cap, hk, d))
    out = tqjax.prefill_attention(
        f32(q), f32(k), f32(v), jnp.asarray(starts, jnp.int32), causal=causal, softcap=softcap,
        context_key=f32(kc), context_value=f32(vc), context_lens=jnp.asarray(ctx, jnp.int32),
    )
    out = np.asarray(out, np.float64)
    np.testing.assert_array_equal(out[starts[-1] :], 0.0)
    want = np.zeros_like(q)
    for s in range(3):
        for i in range(starts[s], starts[s + 1]):
            stop = i + 1 if causal else starts[s + 1]
            kk = np.concatenate([kc[s, : ctx[s]], k[starts[s] : stop]])
            vv = np.concatenate([vc[s, : ctx[s]], v[starts[s] : stop]])
            for h in range(hk * g):
                logits = kk[:, h // g] @ q[i, h] / math.sqrt(d)
                if softcap is not None:
                    logits = softcap * np.tanh(logits / softcap)
                p = np.exp(logits - logits.max())
                want[i, h] = p @ vv[:, h // g] / p.sum()
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-6 * np.abs(v).max())  # float32: measured 0.1 of atol

    # All-zero context lengths give the context-free result.
    qsl = jnp.asarray(starts, jnp.int32)
    plain = tqjax.prefill_attention(f32(q), f32(k), f32(v), qsl, causal=causal, softcap=softcap)
    empty = tqjax.prefill_attention(
        f32(q), f32(k), f32(v), qsl, causal=causal, softcap=softcap,
        context_key=f32(kc), context_value=f32(vc), context_lens=jnp.zeros(3, jnp.int32),
    )
    # float32 rounding only (the masked context entries change the summation order): measured 1e-6.
    np.testing.assert_allclose(empty, plain, rtol=0, atol=4e-6 * np.abs(v).max())
    with pytest.raises(ValueError, match="given together"):
        reference.prefill_attention_reference(f32(q), f32(k), f32(v), jnp.asarray(starts), context_key=f32(kc))
    with pytest.raises(ValueError, match="context_lens must have shape \\[3\\]"):
        reference.prefill_attention_reference(
            f32(q), f32(k), f32(v), jnp.asarray(starts), context_key=f32(kc), context_value=f32(vc),
            context_lens=jnp.zeros(2, jnp.int32),
        )


# ---- one request, several chunkings ----------------------------------------------------------------


def make_attn(preset: str, softcap: float | None, seed: int) -> TurboQuantAttention:
    attn = TurboQuantAttention(
        D_MODEL, HQ, HK, HEAD_DIM, kv_cache_dtype=preset, rope_base=ROPE_BASE, qk_norm=True, softcap=softcap,
        norm_eps=EPS, rngs=nnx.Rngs(seed),
    )
    randomize(attn, seed + 1)
    return attn


def chunk_metadata(table: list[int], c: int, n: int) -> AttentionMetadata:
    """Metadata of one request running tokens c .. c+n-1 (decode iff it has context and n <= 16)."""
    slots = [slot_at(table, i) for i in range(c, c + n)]
    is_decode = c > 0 and n <= SHORT_CHUNK_TOKENS
    return build_metadata([slots], [table], [c + n], num_decodes=int(is_decode), block_size=BLOCK)


def independent_chunk_output(
    p: dict, x: np.ndarray, c: int, cache: tqjax.PagedKVCache, table: list[int], softcap: float | None
) -> np.ndarray:
    """float64 layer output [n, d_model] of the chunk ``x`` (rows at positions c .. c+n-1) over ``cache``
    (the cache after the chunk was stored)."""
    n = x.shape[0]
    q, k, v = np_qkv(p, x, np.arange(c, c + n))
    o = np.zeros((n, HQ, HEAD_DIM))
    if c > 0 and n <= SHORT_CHUNK_TOKENS:
        # Short continuation: row i is a decode over the quantized cache with context c + i + 1,
        # each row run through the reference decode on its own.
        bt = jnp.asarray([table], jnp.int32)
        for i in range(n):
            lens = jnp.asarray([c + i + 1], jnp.int32)
            row = reference.paged_decode_jit(f32(q[i : i + 1]), cache, bt, lens, softcap=softcap)
            o[i] = np.asarray(row[0], np.float64)
    else:
        # First or long chunk: [dequantized prefix (c tokens); exact K/V of the chunk], causal in the chunk.
        kd, vd = tqjax.dequantize(cache, jnp.asarray([table], jnp.int32), jnp.asarray([c], jnp.int32))
        kp, vp = np.asarray(kd[0, :c], np.float64), np.asarray(vd[0, :c], np.float64)
        for i in range(n):
            o[i] = np_attend(q[i], np.concatenate([kp, k[: i + 1]]), np.concatenate([vp, v[: i + 1]]), softcap)
    return np_linear(p["o_proj"], o.reshape(n, -1))


def test_chunkings_match_independent_computation_over_the_same_cache() -> None:
    softcap = 8.0
    attn = make_attn("turboquant_4bit_nc", softcap, seed=50)
    p = params64(attn)
    x = np.random.default_rng(51).standard_normal((63, D_MODEL))
    tables, _ = alloc_requests([63])
    table = tables[0]
    results = {}
    for chunks in [(63,), (7, 16, 40), (1,) * 63]:
        assert sum(chunks) == 63
        cache = attn.allocate_cache(num_blocks=9, block_size=BLOCK)
        outs, c = [], 0
        for n in chunks:
            md = chunk_metadata(table, c, n)
            assert md.has_prefill_context == (c > 0 and n > SHORT_CHUNK_TOKENS)
            out, cache = _step(attn, f32(x[c : c + n]), cache, md)
            want = independent_chunk_output(p, x[c : c + n], c, cache, table, softcap)
            # float32 vs float64 only (same cache): measured <= 1e-6 of max |want|.
            np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=f"{chunks} at {c}")
            outs.append(np.asarray(out))
            c += n
        results[chunks] = (np.concatenate(outs), cache)

    one_out, one_cache = results[(63,)]
    for chunks, (out, cache) in results.items():
        # The first chunk is exact attention in every chunking, so its rows equal the one-chunk prefill's.
        np.testing.assert_allclose(out[: chunks[0]], one_out[: chunks[0]], rtol=0, atol=1e-6 * np.abs(one_out).max())
        # The same tokens are stored at the same slots whatever the chunking (bitwise on XLA:CPU; a
        # code may flip only if a K/V row rounds differently in a different batch shape).
        for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(one_cache)):
            assert np.mean(np.asarray(a) == np.asarray(b)) > 0.99, chunks
        # Later chunks see a quantized prefix: close to exact attention, not equal (measured 5-6% of max |out|).
        rel = np.abs(out - one_out).max() / np.abs(one_out).max()
        assert rel < 0.25, (chunks, rel)


# ---- mixed batches ---------------------------------------------------------------------------------


def test_mixed_batch_matches_per_request_runs() -> None:
    attn = make_attn("turboquant_k3v4_nc", None, seed=60)
    rng = np.random.default_rng(61)
    # (cached before the step, new in the step): a decode, a short continuation (decode rows, at the
    # threshold), then a first chunk and a long continuation (prefills, one token over the threshold).
    plan = [(12, 1), (9, 16), (0, 11), (20, 17)]
    tables, _ = alloc_requests([c + n for c, n in plan])
    xs = [rng.standard_normal((c + n, D_MODEL)) for c, n in plan]

    cache = attn.allocate_cache(num_blocks=16, block_size=BLOCK)
    warm = [j for j, (c, _) in enumerate(plan) if c]
    md = build_metadata(
        [[slot_at(tables[j], i) for i in range(plan[j][0])] for j in warm], [tables[j] for j in warm],
        [plan[j][0] for j in warm], num_decodes=0, block_size=BLOCK,
    )
    _, cache = _step(attn, f32(np.concatenate([xs[j][: plan[j][0]] for j in warm])), cache, md)

    n_pad = 3
    x_new = np.concatenate([x[c:] for x, (c, _) in zip(xs, plan)] + [np.zeros((n_pad, D_MODEL))])
    md = build_metadata(
        [[slot_at(t, i) for i in range(c, c + n)] for t, (c, n) in zip(tables, plan)], tables,
        [c + n for c, n in plan], num_decodes=2, num_tokens=len(x_new), block_size=BLOCK,
    )
    assert (md.num_decodes, md.num_decode_tokens, md.num_prefills, md.has_prefill_context) == (2, 17, 2, True)
    mixed, mixed_cache = _step(attn, f32(x_new), copy_cache(cache), md)

    start, alone_cache = 0, cache
    for t, x, (c, n) in zip(tables, xs, plan):
        alone, alone_cache = _step(attn, f32(x[c:]), alone_cache, chunk_metadata(t, c, n))
        # Only float32 rounding separates the mixed batch from the request alone.
        np.testing.assert_allclose(mixed[start : start + n], alone, rtol=0, atol=1e-5 * np.abs(alone).max())
        start += n
    np.testing.assert_array_equal(mixed[start:], 0.0)  # padding rows: o_proj(0), no bias
    for a, b in zip(jax.tree.leaves(mixed_cache), jax.tree.leaves(alone_cache)):
        assert np.mean(np.asarray(a) == np.asarray(b)) > 0.99


# ---- scheduler and generate ------------------------------------------------------------------------


def test_scheduler_splits_prompts_into_chunks() -> None:
    sched = PagedScheduler(num_blocks=12, block_size=BLOCK, max_blocks_per_seq=6, max_prefill_chunk=17)
    a = sched.add(list(range(40)))
    b = sched.add([7] * 3)
    kinds = []
    for step in range(3):
        batch = sched.schedule([a, b])
        md = batch.metadata
        kinds.append((batch.seq_ids, md.num_decodes, md.num_decode_tokens, md.has_prefill_context))
        if step == 0:
            np.testing.assert_array_equal(batch.tokens, list(range(17)) + [7] * 3)
            assert batch.complete.tolist() == [False, True]
        if step == 1:
            np.testing.assert_array_equal(md.seq_lens, [4, 34])  # b decodes first; a runs tokens 17..33
            want = [slot_at(sched.seqs[a].blocks, i) for i in range(17, 34)]
            np.testing.assert_array_equal(md.slot_mapping[1:], want)
            assert batch.complete.tolist() == [True, False]
        sched.append(b, 1)
    # Step 0: two first chunks; step 1: b decodes, a runs a long continuation (17 > 16 new tokens);
    # step 2: a's last 6 prompt tokens are a short continuation, run as decode rows after b's decode.
    assert kinds == [((a, b), 0, 0, False), ((b, a), 1, 1, True), ((a, b), 2, 7, False)]
    assert batch.complete.tolist() == [True, True] and sched.seqs[a].num_cached == 40
    with pytest.raises(ValueError, match="max_prefill_chunk"):
        PagedScheduler(4, BLOCK, 2, max_prefill_chunk=0)


def first_token_logits(
    model: TransformerLM,
    caches: list[tqjax.PagedKVCache],
    prompts: list[list[int]],
    generated: list[list[int]],
    max_len: int,
    chunk: int | None,
) -> tuple[np.ndarray, list[tqjax.PagedKVCache]]:
    """Replays generate's schedule through its jitted step (same step shapes, so its compiled steps are
    reused; ``generated`` are its tokens) until every prompt is prefilled. Returns the logits float32
    [num_prompts, V] that predicted each prompt's first generated token, and the caches."""
    sched = PagedScheduler(caches[0].num_blocks, BLOCK, math.ceil(max_len / BLOCK), chunk)
    ids = [sched.add(p) for p in prompts]
    first: dict[int, np.ndarray] = {}
    emitted = dict.fromkeys(ids, 0)
    while len(first) < len(ids):
        batch = sched.schedule(ids)
        logits, caches = _serve_step(model, batch.tokens, caches, batch.metadata)
        for seq, row, complete in zip(batch.seq_ids, batch.last_rows, batch.complete):
            if complete:
                first.setdefault(seq, np.asarray(logits[row]))
                sched.append(seq, generated[seq][emitted[seq]])
                emitted[seq] += 1
    return np.stack([first[i] for i in ids]), caches


def test_generate_with_chunked_prefill() -> None:
    model = tiny_lm(70, ["turboquant_k8v4", "turboquant_4bit_nc"])
    rng = np.random.default_rng(71)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (63, 5, 20)]
    steps, chunk = 4, 24  # 63 -> 24 (first) + 24 (long continuation) + 15 (decode rows)
    caches = model.allocate_caches(num_blocks=24, block_size=BLOCK)
    whole, caches = generate(model, caches, prompts, steps)
    chunked, caches = generate(model, caches, prompts, steps, max_prefill_chunk=chunk)
    assert all(len(g) == steps for g in chunked)

    # Which tokens must match exactly:
    # * prompts of at most `chunk` tokens are prefilled in one chunk over exact K/V either way, and
    #   the other requests of a step are masked out, so all their tokens agree (their logits differ
    #   only by float32 rounding of different batch shapes, far below the logit margins);
    # * the 63-token prompt's first token comes from its last chunk, which attends over the QUANTIZED
    #   prefix instead of exact K/V, so its logits move by the quantization error: the token agrees
    #   because the top-1 margin of the exact logits exceeds twice that move (checked below). Its
    #   later tokens decode from caches whose second-layer K/V were computed from those moved hidden
    #   states, so they may differ legitimately and are not compared.
    assert chunked[1:] == whole[1:]
    assert chunked[0][0] == whole[0][0]

    max_len = max(map(len, prompts)) + steps
    exact, caches = first_token_logits(model, caches, prompts, whole, max_len, None)
    moved, caches = first_token_logits(model, caches, prompts, chunked, max_len, chunk)
    np.testing.assert_array_equal(exact.argmax(-1), [g[0] for g in whole])
    np.testing.assert_allclose(moved[1:], exact[1:], rtol=0, atol=1e-5 * np.abs(exact).max())
    shift = np.abs(moved[0] - exact[0]).max()
    top2 = np.sort(exact[0])[-2:]
    assert 0 < shift and 2 * shift < top2[1] - top2[0], (shift, top2)  # measured 0.31 vs margin 0.68
