"""Reference path: pure-jnp quantized store, paged decode, prefill attention and dequantization.

This is the ground truth every kernel is tested against and the CPU fallback. It follows vLLM's
TurboQuant math: keys are encoded by :class:`tqjax.codec.KeyCodec`; decode rotates the query once and
scores it against centroid vectors in the rotated domain (no per-key inverse rotation); values are
dequantized; softmax is float32.

Conventions shared by every backend:

* ``slot_mapping[n]`` is the token slot of new token n (block ``slot // block_size``, offset
  ``slot % block_size``); ``slot < 0`` is padding and is skipped. Slots must be distinct and below
  ``cache.num_slots``; when ``slot_mapping`` is concrete (not traced) this is checked, inside jit a
  slot outside the cache is dropped.
* ``block_tables[b, j]`` is the j-th cache block of sequence b; entries at or past
  ``ceil(seq_lens[b] / block_size)`` are never read (they may hold anything, e.g. -1).
* A sequence with ``seq_lens[b] == 0`` attends to nothing: its output is zeros.

Native (unquantized) caches (:class:`tqjax.layout.NativePagedKVCache`, kv_cache_dtype "auto" /
"bfloat16" / "float16") follow the same contract: :func:`store_reference`,
:func:`paged_decode_reference` and :func:`dequantize_reference` dispatch on the cache type (static
under jit) to :func:`native_store_reference` (K/V rounded to the cache dtype and scattered),
:func:`native_paged_decode_reference` (float32 logits and softmax over the upcast K/V) and
:func:`native_dequantize_reference` (the stored K/V, upcast to float32).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from tqjax.codec import key_codec, value_codec
from tqjax.layout import KVCache, NativePagedKVCache, PagedKVCache

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


# ---- input validation (before anything is traced) -------------------------------------------------


def _is_float(x: jax.Array) -> bool:
    return any(x.dtype == d for d in _FLOAT_DTYPES)


def _is_int(x: jax.Array) -> bool:
    return jnp.issubdtype(x.dtype, jnp.integer)


def check_array(name: str, x: object, shape: tuple[int | None, ...], kind: str) -> None:
    """Raise ValueError/TypeError naming ``name`` unless ``x`` has ``shape`` (None = any) and ``kind``."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if len(x.shape) != len(shape):
        raise ValueError(f"{name} must have rank {len(shape)} (shape {_fmt(shape)}), got shape {tuple(x.shape)}")
    for got, want in zip(x.shape, shape):
        if want is not None and got != want:
            raise ValueError(f"{name} must have shape {_fmt(shape)}, got {tuple(x.shape)}")
    if kind == "float" and not _is_float(x):
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if kind == "int" and not _is_int(x):
        raise TypeError(f"{name} must be an integer array (int32), got {x.dtype}")


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"


#: Which cache types a check accepts: "any" (every backend-dispatched op), "turboquant" (the TurboQuant
#: kernels), "native" (the FLASH kernels).
CACHE_KINDS: dict[str, tuple[type, ...]] = {
    "any": (PagedKVCache, NativePagedKVCache),
    "turboquant": (PagedKVCache,),
    "native": (NativePagedKVCache,),
}


def check_cache(cache: object, name: str = "cache", kind: str = "any") -> None:
    """Raise TypeError naming ``name`` unless ``cache`` is a cache of ``kind`` (:data:`CACHE_KINDS`)."""
    types = CACHE_KINDS[kind]
    if isinstance(cache, types):
        return
    want = " or ".join(f"tqjax.{t.__name__}" for t in types)
    got = type(cache).__name__
    if isinstance(cache, CACHE_KINDS["any"]):
        got += f" (kv_cache_dtype {cache.config.name!r})"
        hint = {
            "turboquant": ": unquantized caches are served by the FLASH and REFERENCE backends",
            "native": ": TurboQuant caches are served by the TURBOQUANT and REFERENCE backends",
        }[kind]
    else:
        hint = ""
    raise TypeError(f"{name} must be a {want}, got {got}{hint}")


def check_store_inputs(
    cache: KVCache, key: jax.Array, value: jax.Array, slot_mapping: jax.Array, *, kind: str = "any"
) -> None:
    check_cache(cache, "cache", kind)
    hk, d = cache.num_kv_heads, cache.config.head_dim
    check_array("key", key, (None, hk, d), "float")
    n = key.shape[0]
    check_array("value", value, (n, hk, d), "float")
    check_array("slot_mapping", slot_mapping, (n,), "int")
    if not isinstance(slot_mapping, jax.core.Tracer):
        slots = np.asarray(slot_mapping)
        if slots.size and slots.min() < np.iinfo(np.int32).min:
            raise ValueError("slot_mapping values must fit int32 (use -1 for padding)")
        valid = slots[slots >= 0]
        if valid.size and valid.max() >= cache.num_slots:
            raise ValueError(f"slot_mapping has slot {valid.max()} >= cache.num_slots = {cache.num_slots}")
        if np.unique(valid).size != valid.size:
            raise ValueError("slot_mapping has duplicate slots")


def check_sequence_inputs(cache: KVCache, batch: int | None, block_tables: jax.Array, seq_lens: jax.Array) -> None:
    """block_tables [B, max_blocks] int, seq_lens [B] int with 0 <= seq_lens <= max_blocks * block_size."""
    check_array("block_tables", block_tables, (batch, None), "int")
    check_array("seq_lens", seq_lens, (block_tables.shape[0],), "int")
    if not isinstance(seq_lens, jax.core.Tracer):
        lens = np.asarray(seq_lens)
        cap = block_tables.shape[1] * cache.block_size
        if lens.size and (lens.min() < 0 or lens.max() > cap):
            raise ValueError(f"seq_lens must lie in [0, block_tables.shape[1] * block_size = {cap}], got {lens}")


def check_decode_inputs(
    query: jax.Array, cache: KVCache, block_tables: jax.Array, seq_lens: jax.Array, *, kind: str = "any"
) -> None:
    check_cache(cache, "cache", kind)
    hk, d = cache.num_kv_heads, cache.config.head_dim
    check_array("query", query, (None, None, d), "float")
    b, hq = query.shape[:2]
    if hq % hk:
        raise ValueError(f"query heads ({hq}) must be a multiple of the cache's KV heads ({hk})")
    check_sequence_inputs(cache, b, block_tables, seq_lens)


# ---- store --------------------------------------------------------------------------------------


def store_reference(cache: KVCache, key: jax.Array, value: jax.Array, slot_mapping: jax.Array) -> KVCache:
    """Quantize ``key``/``value`` [N, Hk, D] and write them at ``slot_mapping`` [N] int32 (slot < 0 skipped).

    A native cache stores them rounded to its dtype (:func:`native_store_reference`).
    """
    if isinstance(cache, NativePagedKVCache):
        return native_store_reference(cache, key, value, slot_mapping)
    cfg = cache.config
    k_words, k_scales = key_codec(cfg).encode(key)
    v_words, v_scales = value_codec(cfg).encode(value)
    put = _slot_writer(cache, slot_mapping)
    return PagedKVCache(
        key_codes=put(cache.key_codes, k_words),
        key_scales=None if cache.key_scales is None else put(cache.key_scales, k_scales),
        value_codes=put(cache.value_codes, v_words),
        value_scales=put(cache.value_scales, v_scales),
        config=cfg,
    )


def _slot_writer(cache: KVCache, slot_mapping: jax.Array):
    """``put(dst [Hk, NB, BS, W], src [N, Hk, W])``: the scatter of new tokens into their slots."""
    slot = slot_mapping.astype(jnp.int32)
    # Padding (and, inside jit, any out-of-range slot) goes to block index num_blocks: dropped.
    block = jnp.where(slot >= 0, slot // cache.block_size, cache.num_blocks)
    offset = jnp.where(slot >= 0, slot % cache.block_size, 0)

    def put(dst: jax.Array, src: jax.Array) -> jax.Array:
        return dst.at[:, block, offset].set(jnp.swapaxes(src, 0, 1).astype(dst.dtype), mode="drop")

    return put


# ---- reading sequences back ----------------------------------------------------------------------


def _sequence_gather(block_size: int, block_tables: jax.Array, seq_lens: jax.Array):
    """(``gather(a [Hk, NB, BS, W]) -> [Hk, B, L, W]``, mask [B, L]) with L = max_blocks * block_size."""
    b, mb = block_tables.shape
    used = jnp.arange(mb)[None, :] * block_size < seq_lens[:, None]
    tables = jnp.where(used, block_tables, 0)  # never follow a block-table entry past the sequence

    def gather(a: jax.Array | None) -> jax.Array | None:
        if a is None:
            return None
        g = a[:, tables]  # [Hk, B, MB, BS, W]
        return g.reshape(g.shape[0], b, mb * block_size, g.shape[-1])

    return gather, jnp.arange(mb * block_size)[None, :] < seq_lens[:, None]


def _gather_sequences(cache: PagedKVCache, block_tables: jax.Array, seq_lens: jax.Array):
    """Gather each sequence's slots: arrays ``[Hk, B, L, ...]`` with L = max_blocks * block_size, and mask [B, L]."""
    gather, mask = _sequence_gather(cache.block_size, block_tables, seq_lens)
    return (
        gather(cache.key_codes),
        gather(cache.key_scales),
        gather(cache.value_codes),
        gather(cache.value_scales),
        mask,
    )


def dequantize_reference(
    cache: KVCache, block_tables: jax.Array, seq_lens: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Dequantized K and V of each sequence: float32 ``[B, L, Hk, D]`` each, L = max_blocks * block_size.

    Positions at or past ``seq_lens[b]`` are zero.
    """
    if isinstance(cache, NativePagedKVCache):
        return native_dequantize_reference(cache, block_tables, seq_lens)
    cfg = cache.config
    kw, ks, vw, vs, mask = _gather_sequences(cache, block_tables, seq_lens)
    k = key_codec(cfg).decode(kw, ks)
    v = value_codec(cfg).decode(vw, vs)
    m = mask[None, :, :, None]
    k = jnp.where(m, k, 0.0)
    v = jnp.where(m, v, 0.0)
    return jnp.transpose(k, (1, 2, 0, 3)), jnp.transpose(v, (1, 2, 0, 3))


def _softmax_attend(logits: jax.Array, mask: jax.Array, values: jax.Array, spec: str) -> jax.Array:
    """float32 masked softmax over the last axis of ``logits``; rows with no valid key give zeros."""
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum(spec, p, values, precision=jax.lax.Precision.HIGHEST)


def _apply_softcap(logits: jax.Array, softcap: float | None) -> jax.Array:
    if softcap is None:
        return logits
    return softcap * jnp.tanh(logits / softcap)


def paged_decode_reference(
    query: jax.Array,
    cache: KVCache,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Attention of one new token per sequence over its cached tokens.

    query [B, Hq, D] (Hq a multiple of Hk; query head h uses KV head h // (Hq // Hk)),
    block_tables [B, max_blocks] int32, seq_lens [B] int32 -> out [B, Hq, D] in query.dtype.
    ``scale`` defaults to 1/sqrt(D); ``softcap`` applies ``softcap * tanh(s / softcap)`` to the logits.
    """
    if isinstance(cache, NativePagedKVCache):
        return native_paged_decode_reference(query, cache, block_tables, seq_lens, scale=scale, softcap=softcap)
    cfg = cache.config
    b, hq, d = query.shape
    hk = cache.num_kv_heads
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kc = key_codec(cfg)
    kw, ks, vw, vs, mask = _gather_sequences(cache, block_tables, seq_lens)
    q = query.astype(jnp.float32).reshape(b, hk, hq // hk, d)
    logits = sum(
        jnp.einsum("bhgd,hbld->bhgl", qs, ksv, precision=jax.lax.Precision.HIGHEST)
        for qs, ksv in zip(kc.prepare_query(q), kc.score_vectors(kw, ks))
    )
    logits = _apply_softcap(logits * scale, softcap)
    v = value_codec(cfg).decode(vw, vs)  # [Hk, B, L, D]
    out = _softmax_attend(logits, mask[:, None, None, :], v, "bhgl,hbld->bhgd")
    return out.reshape(b, hq, d).astype(query.dtype)


# ---- native (unquantized) caches -----------------------------------------------------------------


def native_store_reference(
    cache: NativePagedKVCache, key: jax.Array, value: jax.Array, slot_mapping: jax.Array
) -> NativePagedKVCache:
    """Write ``key``/``value`` [N, Hk, D], rounded to the cache dtype, at ``slot_mapping`` (slot < 0 skipped)."""
    put = _slot_writer(cache, slot_mapping)
    return NativePagedKVCache(key=put(cache.key, key), value=put(cache.value, value), config=cache.config)


def _native_sequences(cache: NativePagedKVCache, block_tables: jax.Array, seq_lens: jax.Array):
    """float32 K, V ``[Hk, B, L, D]`` of each sequence (zeros past its length) and the mask [B, L]."""
    gather, mask = _sequence_gather(cache.block_size, block_tables, seq_lens)
    m = mask[None, :, :, None]
    k = jnp.where(m, gather(cache.key).astype(jnp.float32), 0.0)
    v = jnp.where(m, gather(cache.value).astype(jnp.float32), 0.0)
    return k, v, mask


def native_dequantize_reference(
    cache: NativePagedKVCache, block_tables: jax.Array, seq_lens: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The stored K and V of each sequence as float32 ``[B, L, Hk, D]`` (zeros at or past ``seq_lens[b]``)."""
    k, v, _ = _native_sequences(cache, block_tables, seq_lens)
    return jnp.transpose(k, (1, 2, 0, 3)), jnp.transpose(v, (1, 2, 0, 3))


def native_paged_decode_reference(
    query: jax.Array,
    cache: NativePagedKVCache,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """:func:`paged_decode_reference` over a native cache: float32 logits of the float32 query against
    the upcast keys, float32 softmax, float32 sum of the upcast values."""
    b, hq, d = query.shape
    hk = cache.num_kv_heads
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k, v, mask = _native_sequences(cache, block_tables, seq_lens)
    q = query.astype(jnp.float32).reshape(b, hk, hq // hk, d)
    logits = jnp.einsum("bhgd,hbld->bhgl", q, k, precision=jax.lax.Precision.HIGHEST)
    logits = _apply_softcap(logits * scale, softcap)
    out = _softmax_attend(logits, mask[:, None, None, :], v, "bhgl,hbld->bhgd")
    return out.reshape(b, hq, d).astype(query.dtype)


# ---- prefill over exact K/V ---------------------------------------------------------------------


def prefill_attention_reference(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    query_start_loc: jax.Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    causal: bool = True,
    context_key: jax.Array | None = None,
    context_value: jax.Array | None = None,
    context_lens: jax.Array | None = None,
) -> jax.Array:
    """Varlen (packed) attention over exact K/V, optionally after a per-sequence cached context.

    query [T, Hq, D], key/value [T, Hk, D], query_start_loc [S + 1] int32 (sequence s is tokens
    ``query_start_loc[s]:query_start_loc[s+1]``; tokens past ``query_start_loc[-1]`` are padding and
    get zeros) -> out [T, Hq, D] in query.dtype. Token i attends to token j of the same sequence with
    j <= i (if ``causal``).

    Context (chunked prefill): ``context_key`` / ``context_value`` float [S, C, Hk, D] and
    ``context_lens`` int32 [S] (all three or none) put ``context_lens[s] <= C`` tokens
    ``context_key[s, :context_lens[s]]`` before sequence s's tokens, so its token i sits at position
    ``context_lens[s] + i``; every token of sequence s also attends to all of its context (entries
    past ``context_lens[s]`` are ignored). ``context_lens[s] == 0`` gives the context-free result.
    """
    given = [a is not None for a in (context_key, context_value, context_lens)]
    if any(given) and not all(given):
        raise ValueError("context_key, context_value and context_lens must be given together")
    t, hq, d = query.shape
    hk = key.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    pos = jnp.arange(t)
    seg = jnp.searchsorted(query_start_loc, pos, side="right") - 1  # sequence id per token
    in_range = pos < query_start_loc[-1]
    mask = (seg[:, None] == seg[None, :]) & in_range[:, None] & in_range[None, :]
    if causal:
        mask = mask & (pos[None, :] <= pos[:, None])
    key, value = key.astype(jnp.float32), value.astype(jnp.float32)
    if all(given):
        s, c = query_start_loc.shape[0] - 1, context_key.shape[1]
        if context_key.shape != (s, c, hk, d) or context_value.shape != context_key.shape:
            raise ValueError(
                f"context_key/context_value must have shape [S={s}, C, Hk={hk}, D={d}], got "
                f"{tuple(context_key.shape)} and {tuple(context_value.shape)}"
            )
        if context_lens.shape != (s,):
            raise ValueError(f"context_lens must have shape [{s}], got {tuple(context_lens.shape)}")
        valid = jnp.arange(c)[None, :] < context_lens[:, None]  # [S, C]
        own = (seg[:, None] == jnp.arange(s)[None, :]) & in_range[:, None]  # [T, S]
        context_mask = (own[:, :, None] & valid[None]).reshape(t, s * c)
        mask = jnp.concatenate([context_mask, mask], axis=1)  # keys: [contexts of all sequences; tokens]
        key = jnp.concatenate([context_key.astype(jnp.float32).reshape(s * c, hk, d), key])
        value = jnp.concatenate([context_value.astype(jnp.float32).reshape(s * c, hk, d), value])
    q = query.astype(jnp.float32).reshape(t, hk, hq // hk, d)
    logits = jnp.einsum("thgd,shd->hgts", q, key, precision=jax.lax.Precision.HIGHEST)
    logits = _apply_softcap(logits * scale, softcap)
    out = _softmax_attend(logits, mask[None, None], value, "hgts,shd->thgd")
    return out.reshape(t, hq, d).astype(query.dtype)


# ---- jitted entry points --------------------------------------------------------------------------

store_jit = jax.jit(store_reference, donate_argnums=0)
paged_decode_jit = jax.jit(paged_decode_reference, static_argnames=("scale", "softcap"))
dequantize_jit = jax.jit(dequantize_reference)
prefill_attention_jit = functools.partial(
    jax.jit, static_argnames=("scale", "softcap", "causal")
)(prefill_attention_reference)
