"""tqjax's public functional API: validate the inputs, then dispatch to a backend.

Every function checks shapes and dtypes (errors name the offending argument) before anything is
traced, then calls the backend the registry selects for the cache's kv_cache_dtype, head_dim and
block size on this platform (``backend=None``: the best valid one; a name such as ``"reference"`` or
``"pallas"``: that one, or a ValueError listing why it cannot serve the cache; see
:mod:`tqjax.backends`).

The cache is a TurboQuant :class:`~tqjax.layout.PagedKVCache` or an unquantized
:class:`~tqjax.layout.NativePagedKVCache` (kv_cache_dtype "auto"/"bfloat16"/"float16", served by the
FLASH backend on GPUs and the reference elsewhere); both have the same contract.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tqjax import reference
from tqjax.backends import ops_for_cache
from tqjax.layout import KVCache
from tqjax.pallas import prefill as pallas_prefill
from tqjax.pallas.tuning import prefill_problem
from tqjax.platform import detect_platform
from tqjax.reference import (
    check_cache,
    check_decode_inputs,
    check_sequence_inputs,
    check_store_inputs,
)

PREFILL_BACKENDS = ("pallas", "reference")


def store(
    cache: KVCache,
    key: jax.Array,
    value: jax.Array,
    slot_mapping: jax.Array,
    *,
    backend: str | None = None,
) -> KVCache:
    """Write key/value [N, Hk, D] into ``cache`` at ``slot_mapping`` [N] int32 (slot < 0: padding):
    quantized for a TurboQuant cache, rounded to the cache dtype for a native one.

    The input cache is donated and updated in place: do not use it after the call.
    """
    check_store_inputs(cache, key, value, slot_mapping)
    return ops_for_cache(cache, backend).store(cache, key, value, slot_mapping)


def paged_decode(
    query: jax.Array,
    cache: KVCache,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    backend: str | None = None,
) -> jax.Array:
    """query [B, Hq, D], block_tables [B, max_blocks] int32, seq_lens [B] int32 -> out [B, Hq, D]."""
    check_decode_inputs(query, cache, block_tables, seq_lens)
    ops = ops_for_cache(cache, backend)
    return ops.paged_decode(query, cache, block_tables, seq_lens, scale=scale, softcap=softcap)


def dequantize(
    cache: KVCache, block_tables: jax.Array, seq_lens: jax.Array, *, backend: str | None = None
) -> tuple[jax.Array, jax.Array]:
    """Dequantized (K, V) of each sequence, float32 [B, max_blocks * block_size, Hk, D] each (a native
    cache: its stored values, upcast); zeros at or past ``seq_lens[b]``."""
    check_cache(cache)
    check_sequence_inputs(cache, None, block_tables, seq_lens)
    return ops_for_cache(cache, backend).dequantize(cache, block_tables, seq_lens)


def prefill_attention(
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
    backend: str | None = None,
) -> jax.Array:
    """Packed varlen attention over exact K/V (prefill and training); differentiable.

    query [T, Hq, D], key/value [T, Hk, D], query_start_loc [S + 1] int32 -> [T, Hq, D] in
    query.dtype; optional cached context ``context_key``/``context_value`` [S, C, Hk, D] with
    ``context_lens`` [S] int32 (see :func:`tqjax.reference.prefill_attention_reference`).

    ``backend``: "pallas" (the block-sparse kernels of :mod:`tqjax.pallas.prefill`, with a Pallas
    backward), "reference" (dense jnp), or None: "pallas" on CUDA and ROCm GPUs where its tiles fit
    the shared memory (:func:`tqjax.pallas.tuning.prefill_problem`), "reference" elsewhere (the
    Pallas kernels run on a CPU only in interpret mode, far slower than XLA there).
    For sliding windows and other masks call :func:`tqjax.pallas.prefill.prefill_attention`.
    """
    if backend is None:
        platform = detect_platform()
        itemsize = jnp.result_type(query, key, value).itemsize
        gpu_fits = platform.is_gpu and prefill_problem(query.shape[-1], itemsize, platform) is None
        backend = "pallas" if gpu_fits else "reference"
    if backend not in PREFILL_BACKENDS:
        raise ValueError(f"prefill backend must be one of {PREFILL_BACKENDS} or None, got {backend!r}")
    context = {"context_key": context_key, "context_value": context_value, "context_lens": context_lens}
    if backend == "pallas":
        return pallas_prefill.prefill_attention(
            query, key, value, query_start_loc, scale=scale, softcap=softcap, causal=causal, **context
        )
    return reference.prefill_attention_jit(
        query, key, value, query_start_loc, scale=scale, softcap=softcap, causal=causal, **context
    )
