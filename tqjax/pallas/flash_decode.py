"""Split-KV paged decode over a native (unquantized bf16/fp16) cache, in Pallas (Triton lowering:
CUDA and ROCm): the FLASH backend's decode.

Same structure as :mod:`tqjax.pallas.decode`, without any unpacking. One program per (sequence b,
KV head h, split s) handles the whole GQA group of query heads that share KV head h (the group is the
rows of the tensor-core products, padded to at least 16 rows), so every cache byte is read once per
step. The program walks its split's pages ``block_tokens`` tokens at a time: it gathers the K and V
pages through the block table (masked loads: no block-table entry at or past the sequence's last used
page is ever read), scores the group against the keys with one matrix product, and runs an fp32
online softmax; the splits are merged by their log-sum-exp (:func:`tqjax.pallas.decode.split_kv_decode`).

Precision: K and V enter the products in the cache dtype, exactly as stored. With ``split_dots``
(the default, :func:`tqjax.pallas.tuning.flash_decode_params`) the float32 query and the float32
probabilities enter as ``hi + lo`` pairs in the cache dtype (two products each, accumulated in
float32), which reproduces the float32 reference to about 2**-16 relative; without it they are
rounded to the cache dtype once (the usual flash-decoding trade, ~2**-8 relative for bf16).

Index arithmetic: cache refs are indexed per dimension (head, block id, token, channel); the lowering
multiplies by the strides, in int64 for any array over 4 GiB. The arrays have 2-byte elements, so an
array of up to 4 GiB has fewer than 2**31 elements and its int32 offsets cannot overflow (see
:mod:`tqjax.layout`).

Supported head dims: powers of two in [16, 256] (Triton tiles are power-of-two shapes and a
tensor-core product needs K >= 16); the registry sends other head dims to the reference.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from tqjax.config import is_power_of_two
from tqjax.layout import NativePagedKVCache
from tqjax.pallas.decode import check_cut, plan_cut, split_hi_lo, split_kv_decode
from tqjax.pallas.tuning import flash_decode_params
from tqjax.reference import check_decode_inputs, native_paged_decode_reference

__all__ = ["MAX_HEAD_DIM", "MIN_HEAD_DIM", "check_head_dim", "native_paged_decode_reference", "paged_decode"]

_MIN_DOT = 16  # tl.dot needs M, N, K >= 16: the GQA group is padded to this many rows, chunks hold >= 16 tokens
_LOG2E = math.log2(math.e)
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256


def head_dim_problem(head_dim: int) -> str | None:
    """None if the kernel supports ``head_dim``, else the reason (a sentence naming it)."""
    if isinstance(head_dim, int) and is_power_of_two(head_dim) and MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return None
    return (
        f"head_dim {head_dim!r} not supported: the flash decode kernel needs a power of two in "
        f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] (power-of-two Triton tiles, tensor-core products with K >= 16)"
    )


def check_head_dim(head_dim: int) -> None:
    why = head_dim_problem(head_dim)
    if why is not None:
        raise ValueError(why)


def _flash_decode_kernel(
    block_tables_ref,  # [B, max_blocks] int32
    seq_lens_ref,  # [B] int32
    q_hi_ref,  # [Gp, D] cache dtype: the query of this (b, h), rounded
    q_lo_ref,  # [Gp, D] cache dtype: its remainder (None without split_dots or for a query in the cache dtype)
    key_ref,  # [NB, BS, D] cache dtype (this KV head)
    value_ref,  # [NB, BS, D]
    o_ref,  # [Gp, D] float32, normalised within the split
    lse_ref,  # [Gp] float32, log-sum-exp of the split (-inf if empty)
    *,
    b,  # the sequence
    first_page,  # this program's pages of its block-table row: [first_page, end_page), end_page <= its used pages
    end_page,
    q_lead: tuple = (),  # indices before the (b, h) slice's in the query refs (whole refs: (b, h))
    o_lead: tuple = (),  # and in the output refs (whole refs: the program's slot)
    pages_per_chunk: int,
    scale: float,
    softcap: float | None,
    split_dots: bool,
):
    block_size = key_ref.shape[1]
    d = key_ref.shape[2]
    gp = q_hi_ref.shape[-2]
    cdt = key_ref.dtype
    t = pages_per_chunk * block_size

    seq_len = seq_lens_ref[b]
    n_chunks = jnp.maximum(end_page - first_page + pages_per_chunk - 1, 0) // pages_per_chunk

    def mm(a, bmat, contract):
        return jax.lax.dot_general(a, bmat, (contract, ((), ())), preferred_element_type=jnp.float32)

    q_hi = q_hi_ref[(*q_lead, ...)]
    q_lo = None if q_lo_ref is None else q_lo_ref[(*q_lead, ...)]

    def body(i, carry):
        acc, m_prev, l_prev = carry
        page0 = first_page + i * pages_per_chunk
        page_ok = page0 + jnp.arange(pages_per_chunk, dtype=jnp.int32) < end_page
        # Masked load: block-table entries at or past the sequence's last used page are never read.
        pages = pltriton.load(block_tables_ref.at[b, pl.ds(page0, pages_per_chunk)], mask=page_ok, other=0)
        tok = page0 * block_size + jnp.arange(t, dtype=jnp.int32)
        valid = (tok < seq_len) & (tok < end_page * block_size)  # [T]: this split's tokens only
        k = key_ref[pages, :, pl.ds(0, d)].reshape(t, d)
        # Invalid rows of a page hold anything (another sequence's tokens, stale data): zero them so
        # that a non-finite value there cannot reach the p @ v product (p is 0 there).
        v = jnp.where(valid[:, None], value_ref[pages, :, pl.ds(0, d)].reshape(t, d), jnp.zeros((), cdt))

        logits = mm(q_hi, k, ((1,), (1,)))
        if q_lo is not None:
            logits += mm(q_lo, k, ((1,), (1,)))
        logits = logits * scale
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        logits = jnp.where(valid[None, :], logits, -jnp.inf)

        # online softmax (base 2); stats keep a trailing axis of size 1
        m_next = jnp.maximum(m_prev, jnp.max(logits, axis=-1, keepdims=True))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        alpha = jnp.exp2((m_prev - m_safe) * _LOG2E)
        p = jnp.exp2((logits - m_safe) * _LOG2E)  # exactly 0 where invalid
        l_next = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
        if split_dots:
            p_hi, p_lo = split_hi_lo(p, cdt)
            pv = mm(p_hi, v, ((1,), (0,))) + mm(p_lo, v, ((1,), (0,)))
        else:
            pv = mm(p.astype(cdt), v, ((1,), (0,)))
        return acc * alpha + pv, m_next, l_next

    init = (
        jnp.zeros((gp, d), jnp.float32),
        jnp.full((gp, 1), -jnp.inf, jnp.float32),
        jnp.zeros((gp, 1), jnp.float32),
    )
    acc, m, l = jax.lax.fori_loop(0, n_chunks, body, init)
    l_safe = jnp.where(l > 0, l, 1.0)
    o_ref[(*o_lead, ...)] = acc / l_safe
    lse_ref[(*o_lead, ...)] = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf).reshape(gp)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "softcap", "num_splits", "block_tokens", "num_warps", "num_stages", "split_dots",
                     "interpret", "resident"),
)
def _paged_decode(
    query, cache, block_tables, seq_lens, *, scale, softcap, num_splits, block_tokens, num_warps, num_stages,
    split_dots, interpret, resident=None,
):
    """``num_splits`` S: the table's width cut in S; None: the work cut by the lengths (:mod:`tqjax.pallas.pieces`,
    ``resident`` programs a wave)."""
    b, hq, d = query.shape
    hk = cache.num_kv_heads
    g = hq // hk
    gp = max(_MIN_DOT, pl.next_power_of_2(g))
    cdt = cache.key.dtype
    pages_per_chunk = max(1, block_tokens // cache.block_size)

    q = jnp.pad(query.reshape(b, hk, g, d), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    if split_dots and query.dtype != cdt:
        q_hi, q_lo = split_hi_lo(q.astype(jnp.float32), cdt, in_xla=True)
    else:
        q_hi, q_lo = q.astype(cdt), None

    kernel = functools.partial(_flash_decode_kernel, pages_per_chunk=pages_per_chunk, scale=scale, softcap=softcap,
                               split_dots=split_dots)
    queries, cache_arrays = [q_hi, q_lo], [cache.key, cache.value]
    launch = {"out_dim": d, "num_warps": num_warps, "num_stages": num_stages, "interpret": interpret,
              "name": f"flash_decode_{cache.config.name}", "rows": gp}
    out = split_kv_decode(kernel, block_tables, seq_lens, queries, cache_arrays, num_splits=num_splits,
                          resident=resident, block_size=cache.block_size, pages_per_chunk=pages_per_chunk, keep=g,
                          **launch)
    return out[:, :, :g].reshape(b, hq, d).astype(query.dtype)


def paged_decode(
    query: jax.Array,
    cache: NativePagedKVCache,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    block_tokens: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    split_dots: bool | None = None,
    interpret: bool = False,
    cut: str | None = None,
) -> jax.Array:
    """Pallas paged decode over a native cache; same contract as
    :func:`tqjax.reference.native_paged_decode_reference`.

    query [B, Hq, D], block_tables [B, max_blocks] int32, seq_lens [B] int32 -> [B, Hq, D] in
    query.dtype. Tuning (static; None takes :func:`tqjax.pallas.tuning.flash_decode_params`):
    ``num_splits`` (None: from batch, heads and the device's core count), ``block_tokens`` (tokens per
    inner step; at least one block and 16 tokens), ``num_warps``, ``num_stages``, ``split_dots`` (see
    the module docstring). ``interpret``: run the Pallas interpreter (any platform; for tests). ``cut``: "width"
    (``num_splits`` splits of each block table's width) or "lengths" (pieces by the sequences' lengths,
    :mod:`tqjax.pallas.pieces`); None: "width" where ``num_splits`` is given, else the tuned cut ("lengths",
    :data:`tqjax.pallas.tuning.FLASH_DECODE_DEFAULTS`).
    """
    check_decode_inputs(query, cache, block_tables, seq_lens, kind="native")
    check_head_dim(cache.config.head_dim)
    check_cut(cut, num_splits)
    tuned = flash_decode_params(cache.config.head_dim)
    block_tokens = tuned["block_tokens"] if block_tokens is None else block_tokens
    num_warps = tuned["num_warps"] if num_warps is None else num_warps
    num_stages = tuned["num_stages"] if num_stages is None else num_stages
    split_dots = tuned["split_dots"] if split_dots is None else bool(split_dots)
    block_tokens = pl.next_power_of_2(max(block_tokens, cache.block_size, _MIN_DOT))
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    softcap = None if softcap is None else float(softcap)
    b, max_blocks = block_tables.shape
    pages_per_chunk = block_tokens // cache.block_size
    num_splits, resident = plan_cut(cut, num_splits, tuned["cut"], batch=b, num_kv_heads=cache.num_kv_heads,
                                    max_blocks=max_blocks, pages_per_chunk=pages_per_chunk)
    return _paged_decode(
        query, cache, block_tables, seq_lens, scale=scale, softcap=softcap, num_splits=num_splits,
        block_tokens=block_tokens, num_warps=num_warps, num_stages=num_stages, split_dots=split_dots,
        interpret=interpret, resident=resident,
    )
