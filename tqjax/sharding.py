"""tqjax over several devices with JAX's own SPMD: a ``("data", "model")`` mesh and ``shard_map``.

Every sharded op runs the single-device implementation (the backend the registry selects, see
:mod:`tqjax.backends`) once per device on that device's shard, inside :func:`jax.shard_map`; the
shards never talk to each other.

Mesh axes (:func:`make_mesh`):

* ``"model"``: tensor parallelism over KV heads. A device holds ``Hk / model`` KV heads of every page
  and gets the ``Hq / model`` query heads that read them: query head h reads KV head ``h // (Hq / Hk)``,
  so with contiguous head shards a GQA group never straddles two devices.
* ``"data"``: data parallelism over requests. The pages (the ``num_blocks`` axis) are split into
  ``data`` equal pools, one per data shard, and a batch is split into ``data`` equal, consecutive
  groups of requests (decode rows, stored tokens, packed prefill batches); group i is served by data
  shard i from pool i only.

**Local block ids.** Block tables and slot mappings hold ids LOCAL to the request's data shard: a
block id lies in ``[0, num_blocks / data)`` and a slot in ``[0, num_blocks / data * block_size)``;
the same local id names different pages on different data shards. Local block b of data shard i is
global block ``i * num_blocks / data + b`` of the cache array. Each data shard runs its own block
allocator (with ``data == 1`` local and global ids coincide).

PartitionSpecs (``P``):

=====================================================  ============================================
cache arrays ``[Hk, num_blocks, block_size, W]``        :data:`CACHE_SPEC` ``P("model", "data")``
query / attention output ``[B or T, Hq, D]``            ``P("data", "model")``
new key / value ``[N, Hk, D]``                          ``P("data", "model")``
slot_mapping ``[N]``, seq_lens ``[B]``                  ``P("data")``
block_tables ``[B, max_blocks]``                        ``P("data")``
dequantized K / V ``[B, L, Hk, D]``                     ``P("data", None, "model")``
prefill query_start_loc ``[data * (S + 1)]``            ``P("data")``
=====================================================  ============================================

Both kinds of cache are sharded alike: a native (unquantized) cache's ``key`` / ``value`` arrays
``[Hk, num_blocks, block_size, D]`` carry the same :data:`CACHE_SPEC` as the TurboQuant arrays, and
each shard runs the backend the registry selects for its dtype.

No gathers: attention needs no cross-device traffic at all. The ops are compiled with no collective
(tests/test_sharding.py checks the compiled HLO of the sharded store, decode, dequantize and prefill
for any all-gather, all-to-all, collective-permute, all-reduce or reduce-scatter), outputs stay
sharded by head, and the cache must already carry :func:`cache_sharding` (a cache laid out otherwise
is refused rather than silently moved). Combining the heads (the all-reduce after a row-parallel
output projection) belongs to the model, see :class:`tqjax.nn.TurboQuantAttention`.

Inputs are validated before anything is traced (divisibility by the mesh axes, shapes, and, when
concrete, local slot and block ids); errors name the offending argument.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tqjax import ops
from tqjax.backends import backend_ops, select_backend
from tqjax.config import CacheConfig
from tqjax.layout import KVCache, allocate_cache
from tqjax.reference import check_array, check_cache

DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)

#: Every cache array ``[Hk, num_blocks, block_size, W]``: heads over "model", pages over "data".
CACHE_SPEC = P(MODEL, DATA, None, None)
_ROWS_HEADS = P(DATA, MODEL, None)  # [B or T or N, heads, D]
_ROWS = P(DATA)  # [B or N or S], and block_tables [B, max_blocks]
_SEQ_HEADS = P(DATA, None, MODEL, None)  # [B or S, L, Hk, D]

_COLLECTIVE = re.compile(r"\b(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)(-start)?\(")


def shard_map(f: Callable, mesh: Mesh, in_specs: Any, out_specs: Any) -> Callable:
    """:func:`jax.shard_map` (jax >= 0.10.2; the deprecated ``jax.experimental.shard_map`` is not
    used) without the replication check: each shard runs a whole single-device op, whose outputs all
    vary over both mesh axes."""
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def make_mesh(data: int = 1, model: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "model")`` mesh over the first ``data * model`` of ``devices`` (default: all
    devices; ``model=None``: ``len(devices) // data``). Neighbouring devices share a data shard."""
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(data, bool) or not isinstance(data, int) or data < 1:
        raise ValueError(f"data must be a positive int, got {data!r}")
    model = len(devices) // data if model is None else model
    if isinstance(model, bool) or not isinstance(model, int) or model < 1:
        raise ValueError(f"model must be a positive int (at most {len(devices)} // data), got {model!r}")
    if data * model > len(devices):
        raise ValueError(f"a {data} x {model} mesh needs {data * model} devices, only {len(devices)} available")
    return Mesh(np.asarray(devices[: data * model], dtype=object).reshape(data, model), AXES)


def mesh_sizes(mesh: Mesh) -> tuple[int, int]:
    """(data, model) axis sizes; ValueError unless ``mesh`` has exactly the axes ("data", "model")."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if tuple(mesh.axis_names) != AXES:
        raise ValueError(f"mesh axes must be {AXES} (see tqjax.sharding.make_mesh), got {tuple(mesh.axis_names)}")
    return mesh.shape[DATA], mesh.shape[MODEL]


def _divisible(what: str, n: int, axis: str, size: int) -> None:
    if n % size:
        raise ValueError(f"{what} ({n}) must be divisible by the mesh's {axis!r} axis size ({size})")


def _check_geometry(mesh: Mesh, num_kv_heads: int, num_blocks: int) -> tuple[int, int]:
    data, model = mesh_sizes(mesh)
    _divisible("the number of KV heads", num_kv_heads, MODEL, model)
    _divisible("num_blocks", num_blocks, DATA, data)
    return data, model


# ---- placing caches -------------------------------------------------------------------------------


def cache_sharding(cache: KVCache, mesh: Mesh) -> KVCache:
    """The :class:`NamedSharding` of every array of ``cache`` (a pytree like the cache)."""
    return jax.tree.map(lambda _: NamedSharding(mesh, CACHE_SPEC), cache)


def allocate_sharded(
    config: CacheConfig, blocks_per_shard: int, block_size: int, num_kv_heads: int, mesh: Mesh
) -> KVCache:
    """A zeroed cache of ``data * blocks_per_shard`` blocks, created directly in its shards (each device
    allocates only its ``[Hk / model, blocks_per_shard, block_size, W]`` pieces).

    Each data shard owns ``blocks_per_shard`` pages, addressed by local block ids
    ``0 .. blocks_per_shard - 1``.
    """
    data, _ = mesh_sizes(mesh)
    num_blocks = data * blocks_per_shard
    _check_geometry(mesh, num_kv_heads, num_blocks)
    shape = jax.eval_shape(lambda: allocate_cache(config, num_blocks, block_size, num_kv_heads))
    make = jax.jit(
        lambda: allocate_cache(config, num_blocks, block_size, num_kv_heads),
        out_shardings=cache_sharding(shape, mesh),
    )
    return make()


def shard_cache(cache: KVCache, mesh: Mesh) -> KVCache:
    """Move an existing cache into its shards (:func:`cache_sharding`); its pages become the
    ``data`` consecutive pools of ``num_blocks / data`` blocks."""
    check_cache(cache)
    _check_geometry(mesh, cache.num_kv_heads, cache.num_blocks)
    return jax.device_put(cache, cache_sharding(cache, mesh))


def _check_cache_placement(cache: KVCache, mesh: Mesh) -> None:
    """A concrete cache must already be sharded as :data:`CACHE_SPEC` (never moved implicitly)."""
    want = NamedSharding(mesh, CACHE_SPEC)
    for name, a in cache.arrays().items():
        if isinstance(a, jax.core.Tracer):
            continue
        if not isinstance(a, jax.Array) or not a.sharding.is_equivalent_to(want, a.ndim):
            got = getattr(a, "sharding", type(a).__name__)
            raise ValueError(
                f"cache.{name} is laid out as {got}, not as {want}: place the cache with "
                f"tqjax.sharding.allocate_sharded or shard_cache (the sharded ops never move a cache)"
            )


# ---- validation -------------------------------------------------------------------------------------


def _concrete(x: Any) -> np.ndarray | None:
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def _check_local_slots(slot_mapping: jax.Array, data: int, local_slots: int) -> None:
    slots = _concrete(slot_mapping)
    if slots is None:
        return
    for i, shard in enumerate(np.split(slots.astype(np.int64), data)):
        valid = shard[shard >= 0]
        if valid.size and valid.max() >= local_slots:
            raise ValueError(
                f"slot_mapping of data shard {i} has slot {valid.max()} >= {local_slots}, the slots of one data "
                f"shard's pages: slots are local to the data shard (see tqjax.sharding)"
            )
        if np.unique(valid).size != valid.size:
            raise ValueError(f"slot_mapping of data shard {i} has duplicate slots")


def _check_local_tables(
    block_tables: jax.Array, seq_lens: jax.Array, block_size: int, local_blocks: int
) -> None:
    tables, lens = _concrete(block_tables), _concrete(seq_lens)
    if tables is None or lens is None:
        return
    used = np.arange(tables.shape[1])[None, :] * block_size < lens[:, None]
    bad = used & ((tables < 0) | (tables >= local_blocks))
    if bad.any():
        b, j = np.argwhere(bad)[0]
        raise ValueError(
            f"block_tables[{b}, {j}] = {tables[b, j]} is not a local block id in [0, {local_blocks}): block "
            f"tables hold ids local to the request's data shard (see tqjax.sharding)"
        )


def _check_sequences(cache: KVCache, mesh: Mesh, batch: int | None, block_tables, seq_lens) -> int:
    """Shapes of block_tables / seq_lens, B divisible by "data", concrete ids local; returns B."""
    data, _ = _check_geometry(mesh, cache.num_kv_heads, cache.num_blocks)
    check_array("block_tables", block_tables, (batch, None), "int")
    b = block_tables.shape[0]
    check_array("seq_lens", seq_lens, (b,), "int")
    _divisible("the batch (requests)", b, DATA, data)
    lens = _concrete(seq_lens)
    cap = block_tables.shape[1] * cache.block_size
    if lens is not None and lens.size and (lens.min() < 0 or lens.max() > cap):
        raise ValueError(f"seq_lens must lie in [0, block_tables.shape[1] * block_size = {cap}], got {lens}")
    _check_local_tables(block_tables, seq_lens, cache.block_size, cache.num_blocks // data)
    return b


def _backend(cache: KVCache, backend: str | None) -> str:
    cfg = cache.config
    return select_backend(cfg.name, cfg.head_dim, cache.block_size, backend=backend)


# ---- the sharded ops -------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("mesh", "backend"), donate_argnums=0)
def _store(cache, key, value, slot_mapping, *, mesh, backend):
    body = backend_ops(backend).store
    return shard_map(body, mesh, (CACHE_SPEC, _ROWS_HEADS, _ROWS_HEADS, _ROWS), CACHE_SPEC)(
        cache, key, value, slot_mapping
    )


def sharded_store(
    cache: KVCache,
    key: jax.Array,
    value: jax.Array,
    slot_mapping: jax.Array,
    *,
    mesh: Mesh,
    backend: str | None = None,
) -> KVCache:
    """:func:`tqjax.store` on every shard: key/value [N, Hk, D] float, slot_mapping [N] int32 of LOCAL
    slots (token group i of ``N / data`` tokens goes to data shard i's pages; slot < 0: padding).

    The cache (sharded as :func:`cache_sharding`) is donated and updated in place, shard by shard.
    ``backend``: as in :func:`tqjax.store`, the single-device backend run on each shard.
    """
    check_cache(cache)
    data, _ = _check_geometry(mesh, cache.num_kv_heads, cache.num_blocks)
    hk, d = cache.num_kv_heads, cache.config.head_dim
    check_array("key", key, (None, hk, d), "float")
    n = key.shape[0]
    check_array("value", value, (n, hk, d), "float")
    check_array("slot_mapping", slot_mapping, (n,), "int")
    _divisible("the number of new tokens (key.shape[0])", n, DATA, data)
    _check_local_slots(slot_mapping, data, cache.num_slots // data)
    _check_cache_placement(cache, mesh)
    return _store(cache, key, value, slot_mapping, mesh=mesh, backend=_backend(cache, backend))


@functools.partial(jax.jit, static_argnames=("mesh", "backend", "scale", "softcap"))
def _paged_decode(query, cache, block_tables, seq_lens, *, mesh, backend, scale, softcap):
    body = functools.partial(backend_ops(backend).paged_decode, scale=scale, softcap=softcap)
    return shard_map(body, mesh, (_ROWS_HEADS, CACHE_SPEC, _ROWS, _ROWS), _ROWS_HEADS)(
        query, cache, block_tables, seq_lens
    )


def sharded_paged_decode(
    query: jax.Array,
    cache: KVCache,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    *,
    mesh: Mesh,
    scale: float | None = None,
    softcap: float | None = None,
    backend: str | None = None,
) -> jax.Array:
    """:func:`tqjax.paged_decode` on every shard: query [B, Hq, D], block_tables [B, max_blocks] int32 of
    LOCAL block ids, seq_lens [B] int32 -> out [B, Hq, D] in query.dtype, sharded ``P("data", "model")``.

    Request group i (``B / data`` consecutive rows) reads data shard i's pages; each device attends
    with its ``Hq / model`` query heads over its ``Hk / model`` KV heads.
    """
    check_cache(cache)
    hk, d = cache.num_kv_heads, cache.config.head_dim
    check_array("query", query, (None, None, d), "float")
    b, hq = query.shape[:2]
    if hq % hk:
        raise ValueError(f"query heads ({hq}) must be a multiple of the cache's KV heads ({hk})")
    _check_sequences(cache, mesh, b, block_tables, seq_lens)
    _check_cache_placement(cache, mesh)
    return _paged_decode(
        query, cache, block_tables, seq_lens, mesh=mesh, backend=_backend(cache, backend), scale=scale, softcap=softcap
    )


@functools.partial(jax.jit, static_argnames=("mesh", "backend"))
def _dequantize(cache, block_tables, seq_lens, *, mesh, backend):
    body = backend_ops(backend).dequantize
    return shard_map(body, mesh, (CACHE_SPEC, _ROWS, _ROWS), (_SEQ_HEADS, _SEQ_HEADS))(cache, block_tables, seq_lens)


def sharded_dequantize(
    cache: KVCache, block_tables: jax.Array, seq_lens: jax.Array, *, mesh: Mesh, backend: str | None = None
) -> tuple[jax.Array, jax.Array]:
    """:func:`tqjax.dequantize` on every shard: block_tables [B, max_blocks] int32 of LOCAL block ids,
    seq_lens [B] int32 -> (K, V) float32 [B, max_blocks * block_size, Hk, D] each, sharded
    ``P("data", None, "model")``."""
    check_cache(cache)
    _check_sequences(cache, mesh, None, block_tables, seq_lens)
    _check_cache_placement(cache, mesh)
    return _dequantize(cache, block_tables, seq_lens, mesh=mesh, backend=_backend(cache, backend))


@functools.partial(jax.jit, static_argnames=("mesh", "scale", "softcap", "causal"))
def _prefill(query, key, value, query_start_loc, context, *, mesh, scale, softcap, causal):
    def body(q, k, v, qsl, ctx):
        ck, cv, cl = ctx if ctx is not None else (None, None, None)
        return ops.prefill_attention(  # the platform's prefill: Pallas on GPUs, the reference elsewhere
            q, k, v, qsl, scale=scale, softcap=softcap, causal=causal, context_key=ck, context_value=cv, context_lens=cl
        )

    context_specs = None if context is None else (_SEQ_HEADS, _SEQ_HEADS, _ROWS)
    in_specs = (_ROWS_HEADS, _ROWS_HEADS, _ROWS_HEADS, _ROWS, context_specs)
    return shard_map(body, mesh, in_specs, _ROWS_HEADS)(query, key, value, query_start_loc, context)


def sharded_prefill_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    query_start_loc: jax.Array,
    *,
    mesh: Mesh,
    scale: float | None = None,
    softcap: float | None = None,
    causal: bool = True,
    context_key: jax.Array | None = None,
    context_value: jax.Array | None = None,
    context_lens: jax.Array | None = None,
) -> jax.Array:
    """:func:`tqjax.prefill_attention` on every shard: query [T, Hq, D], key/value [T, Hk, D] ->
    out [T, Hq, D] in query.dtype, sharded ``P("data", "model")``.

    With a data axis of size n the rows are n packed batches of ``T / n`` rows, one per data shard, and
    ``query_start_loc`` int32 [n * (S + 1)] is their n local ``query_start_loc`` vectors (each starting
    at 0, offsets within its own ``T / n`` rows) concatenated; with n == 1 it is the usual [S + 1].
    The optional context (chunked prefill) is ``context_key`` / ``context_value`` float
    [n * S, C, Hk, D] and ``context_lens`` int32 [n * S], the n shards' contexts concatenated.
    """
    given = [a is not None for a in (context_key, context_value, context_lens)]
    if any(given) and not all(given):
        raise ValueError("context_key, context_value and context_lens must be given together")
    data, model = mesh_sizes(mesh)
    check_array("query", query, (None, None, None), "float")
    t, hq, d = query.shape
    check_array("key", key, (t, None, d), "float")
    hk = key.shape[1]
    check_array("value", value, (t, hk, d), "float")
    if hq % hk:
        raise ValueError(f"query heads ({hq}) must be a multiple of the KV heads ({hk})")
    _divisible("the number of KV heads", hk, MODEL, model)
    _divisible("the number of rows (query.shape[0])", t, DATA, data)
    check_array("query_start_loc", query_start_loc, (None,), "int")
    _divisible("query_start_loc.shape[0]", query_start_loc.shape[0], DATA, data)
    qsl = _concrete(query_start_loc)
    if qsl is not None:
        for i, local in enumerate(np.split(qsl, data)):
            if local[0] != 0 or np.any(np.diff(local) < 0) or local[-1] > t // data:
                raise ValueError(
                    f"query_start_loc of data shard {i} must rise from 0 to at most {t // data} (the shard's "
                    f"rows), got {local.tolist()}"
                )
    context = None
    if all(given):
        s = query_start_loc.shape[0] - data
        check_array("context_key", context_key, (s, None, hk, d), "float")
        check_array("context_value", context_value, context_key.shape, "float")
        check_array("context_lens", context_lens, (s,), "int")
        context = (context_key, context_value, context_lens)
    return _prefill(
        query, key, value, query_start_loc, context, mesh=mesh, scale=scale, softcap=softcap, causal=bool(causal)
    )


def collectives_in(hlo_text: str) -> list[str]:
    """The cross-device collective instructions (all-gather, all-to-all, collective-permute,
    all-reduce, reduce-scatter) in compiled HLO text, one line each."""
    return [line.strip() for line in hlo_text.splitlines() if _COLLECTIVE.search(line)]


class AttentionOps(NamedTuple):
    """The four attention ops with the signatures of :func:`tqjax.store`, :func:`tqjax.paged_decode`,
    :func:`tqjax.dequantize` and :func:`tqjax.prefill_attention`."""

    store: Callable[..., KVCache]
    paged_decode: Callable[..., jax.Array]
    dequantize: Callable[..., tuple[jax.Array, jax.Array]]
    prefill_attention: Callable[..., jax.Array]


def attention_ops(mesh: Mesh | None) -> AttentionOps:
    """The single-device ops (``mesh=None``) or the sharded ops bound to ``mesh``."""
    if mesh is None:
        return AttentionOps(ops.store, ops.paged_decode, ops.dequantize, ops.prefill_attention)
    return AttentionOps(
        *(
            functools.partial(f, mesh=mesh)
            for f in (sharded_store, sharded_paged_decode, sharded_dequantize, sharded_prefill_attention)
        )
    )
