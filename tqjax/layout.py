"""The paged KV-cache formats (TurboQuant and native), their memory accounting and int64-exact index helpers.

Layout (one layer): structure-of-arrays pages, head-major, ``num_blocks x block_size`` token slots per
KV head::

    key_codes    uint32  [Hk, num_blocks, block_size, key_words]     packed codes (tqjax.packing)
    key_scales   float16 [Hk, num_blocks, block_size, key_scales]    norms, norm-corrected (None for fp8 keys)
    value_codes  uint32  [Hk, num_blocks, block_size, value_words]   packed value codes
    value_scales float16 [Hk, num_blocks, block_size, 2]             [scale, zero] per vector

Token slot ``s`` lives at block ``s // block_size``, offset ``s % block_size`` (the vLLM convention for
``slot_mapping``); ``slot < 0`` is padding.

Why this layout:

* Every array has 2- or 4-byte elements. The Pallas Triton lowering computes pointer offsets in int32
  elements for arrays up to 4 GiB, so a 1-byte array of 2-4 GiB overflows at element 2**31 (the JAX
  twin of vLLM's int32 cache-offset overflow). With >= 2-byte elements an array of <= 4 GiB has at
  most 2**31 elements (largest index 2**31 - 1), and larger arrays get int64 offsets from the lowering; kernels index each
  dimension separately (never a flat offset computed in int32 by hand).
* Head-major pages make one KV head's block a contiguous ``block_size * words`` run, the unit a decode
  program reads for a whole GQA group, and give tensor parallelism over KV heads a free axis.
* Separate arrays keep every block load a power-of-two, word-aligned tile for Pallas.

Native (unquantized) caches, :class:`NativePagedKVCache` (kv_cache_dtype "auto", "bfloat16",
"float16"; :class:`tqjax.config.NativeConfig`), use the same paging and head-major layout::

    key    bfloat16 / float16  [Hk, num_blocks, block_size, head_dim]
    value  bfloat16 / float16  [Hk, num_blocks, block_size, head_dim]

("auto" and "bfloat16" store bfloat16, "float16" float16.) Their elements are 2 bytes as well, so the
same argument holds: an array of <= 4 GiB has < 2**31 elements and int32 offsets, a larger one gets
int64 offsets from the lowering. :func:`allocate_kv_cache` builds the right kind for any dtype name.

Allocation refuses configurations the kernels cannot address (see :func:`check_addressable`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tqjax.config import (
    CacheConfig,
    NativeConfig,
    TurboQuantConfig,
    cache_config,
    is_power_of_two,
)

INT32_MAX = 2**31 - 1
TWO_GIB = 2**31
FOUR_GIB = 2**32
MIN_BLOCK_SIZE = 8
MAX_BLOCK_SIZE = 256
ARRAY_NAMES = ("key_codes", "key_scales", "value_codes", "value_scales")
NATIVE_ARRAY_NAMES = ("key", "value")


def array_specs(
    config: CacheConfig, num_blocks: int, block_size: int, num_kv_heads: int
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every cache array (``key_scales`` omitted for fp8 keys; ``key`` and ``value``
    for a native cache)."""
    lead = (num_kv_heads, num_blocks, block_size)
    if isinstance(config, NativeConfig):
        return {name: (lead + (config.head_dim,), config.dtype) for name in NATIVE_ARRAY_NAMES}
    specs = {
        "key_codes": (lead + (config.key_words,), np.dtype(np.uint32)),
        "key_scales": (lead + (config.key_scale_count,), np.dtype(np.float16)),
        "value_codes": (lead + (config.value_words,), np.dtype(np.uint32)),
        "value_scales": (lead + (config.value_scale_count,), np.dtype(np.float16)),
    }
    if config.key_scale_count == 0:
        del specs["key_scales"]
    return specs


def array_nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Exact byte size (Python ints, no overflow)."""
    n = 1
    for s in shape:
        n *= int(s)
    return n * np.dtype(dtype).itemsize


def check_addressable(
    config: CacheConfig, num_blocks: int, block_size: int, num_kv_heads: int
) -> None:
    """Raise ValueError if the kernels cannot address a cache of this geometry safely.

    * ``block_size`` must be a power of two in [8, 256] (Pallas block loads are power-of-two tiles).
    * ``num_blocks * block_size`` must fit int32: slot ids and block tables are int32 device arrays.
    * No array may use 1-byte elements at 2..4 GiB (int32 element offsets in the Triton lowering
      overflow past 2**31). tqjax's own arrays never do; the check guards future formats.
    """
    for arg, value in (("num_blocks", num_blocks), ("block_size", block_size), ("num_kv_heads", num_kv_heads)):
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if not is_power_of_two(block_size) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(
            f"block_size must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}] "
            f"(kernels load whole blocks as power-of-two tiles), got {block_size}"
        )
    if int(num_blocks) * int(block_size) > INT32_MAX:
        raise ValueError(
            f"num_blocks * block_size = {int(num_blocks) * int(block_size)} token slots per KV head exceeds "
            f"2**31 - 1: slot_mapping and block tables are int32"
        )
    for name, (shape, dtype) in array_specs(config, num_blocks, block_size, num_kv_heads).items():
        nbytes = array_nbytes(shape, dtype)
        if dtype.itemsize == 1 and TWO_GIB < nbytes <= FOUR_GIB:
            raise ValueError(
                f"{name}: a 1-byte array of {nbytes} bytes (2-4 GiB) overflows the int32 element offsets "
                f"of the Pallas Triton lowering"
            )


class _PagedArrays:
    """Sizes shared by both paged cache kinds, derived from their ``[Hk, num_blocks, block_size, W]``
    arrays (:meth:`arrays`) and ``config.slot_bytes``."""

    def arrays(self) -> dict[str, jax.Array]:
        raise NotImplementedError

    @property
    def _first(self) -> jax.Array:
        return next(iter(self.arrays().values()))

    @property
    def num_kv_heads(self) -> int:
        return self._first.shape[0]

    @property
    def num_blocks(self) -> int:
        return self._first.shape[1]

    @property
    def block_size(self) -> int:
        return self._first.shape[2]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(array_nbytes(a.shape, a.dtype) for a in self.arrays().values())

    @property
    def bytes_per_token(self) -> int:
        """Bytes per token slot over all KV heads of the layer (``config.slot_bytes * Hk``)."""
        return self.config.slot_bytes * self.num_kv_heads


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache(_PagedArrays):
    """One layer's paged TurboQuant KV cache (a pytree; ``config`` is static metadata).

    Shapes: see the module docstring. Build with :meth:`allocate`.
    """

    key_codes: jax.Array
    key_scales: jax.Array | None
    value_codes: jax.Array
    value_scales: jax.Array
    config: TurboQuantConfig = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def allocate(
        cls,
        config: TurboQuantConfig,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        *,
        device: Any = None,
    ) -> PagedKVCache:
        """Zero-filled cache (zeros, never ``jnp.empty``: jax >= 0.11 leaves that uninitialised)."""
        if not isinstance(config, TurboQuantConfig):
            raise TypeError(
                f"config must be a tqjax.TurboQuantConfig, got {type(config).__name__} (native caches: "
                f"NativePagedKVCache.allocate or allocate_kv_cache)"
            )
        check_addressable(config, num_blocks, block_size, num_kv_heads)
        specs = array_specs(config, num_blocks, block_size, num_kv_heads)
        arrays = {name: jnp.zeros(shape, dtype, device=device) for name, (shape, dtype) in specs.items()}
        return cls(
            key_codes=arrays["key_codes"],
            key_scales=arrays.get("key_scales"),
            value_codes=arrays["value_codes"],
            value_scales=arrays["value_scales"],
            config=config,
        )

    def arrays(self) -> dict[str, jax.Array]:
        """The cache arrays by name (``key_scales`` absent for fp8 keys)."""
        out = {name: getattr(self, name) for name in ARRAY_NAMES}
        return {k: v for k, v in out.items() if v is not None}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NativePagedKVCache(_PagedArrays):
    """One layer's paged unquantized KV cache (a pytree; ``config`` is static metadata).

    ``key`` / ``value``: ``[Hk, num_blocks, block_size, head_dim]`` bfloat16 ("auto", "bfloat16") or
    float16 ("float16"); see the module docstring. Build with :meth:`allocate` or
    :func:`allocate_kv_cache`. Same properties as :class:`PagedKVCache`.
    """

    key: jax.Array
    value: jax.Array
    config: NativeConfig = dataclasses.field(metadata={"static": True})

    @classmethod
    def allocate(
        cls,
        config: NativeConfig,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        *,
        device: Any = None,
    ) -> NativePagedKVCache:
        """Zero-filled cache (zeros, never ``jnp.empty``: jax >= 0.11 leaves that uninitialised)."""
        if not isinstance(config, NativeConfig):
            raise TypeError(f"config must be a tqjax.config.NativeConfig, got {type(config).__name__}")
        check_addressable(config, num_blocks, block_size, num_kv_heads)
        specs = array_specs(config, num_blocks, block_size, num_kv_heads)
        arrays = {name: jnp.zeros(shape, dtype, device=device) for name, (shape, dtype) in specs.items()}
        return cls(key=arrays["key"], value=arrays["value"], config=config)

    def arrays(self) -> dict[str, jax.Array]:
        """The cache arrays by name."""
        return {"key": self.key, "value": self.value}


#: Either kind of paged cache.
KVCache = PagedKVCache | NativePagedKVCache


def cache_class(config: CacheConfig) -> type[PagedKVCache | NativePagedKVCache]:
    """The cache type that holds a layer of ``config``."""
    return NativePagedKVCache if isinstance(config, NativeConfig) else PagedKVCache


def allocate_cache(
    config: CacheConfig, num_blocks: int, block_size: int, num_kv_heads: int, *, device: Any = None
) -> KVCache:
    """A zero-filled cache of the kind ``config`` describes."""
    return cache_class(config).allocate(config, num_blocks, block_size, num_kv_heads, device=device)


def allocate_kv_cache(
    kv_cache_dtype: str, head_dim: int, num_blocks: int, block_size: int, num_kv_heads: int, *, device: Any = None
) -> KVCache:
    """A zero-filled cache for any ``kv_cache_dtype``: a :class:`NativePagedKVCache` for "auto",
    "bfloat16" and "float16", a :class:`PagedKVCache` for a TurboQuant preset (default options).

    Raises ValueError for an unknown dtype name (listing the valid ones) or an unsupported geometry.
    """
    return allocate_cache(cache_config(kv_cache_dtype, head_dim), num_blocks, block_size, num_kv_heads, device=device)


# ---- memory accounting ---------------------------------------------------------------------------


def cache_nbytes(config: CacheConfig, num_blocks: int, block_size: int, num_kv_heads: int) -> int:
    """Bytes of a cache of this geometry (exact; equals ``PagedKVCache.allocate(...).nbytes``)."""
    specs = array_specs(config, num_blocks, block_size, num_kv_heads)
    return sum(array_nbytes(s, d) for s, d in specs.values())


def blocks_in_budget(
    config: CacheConfig, budget_bytes: int, block_size: int, num_kv_heads: int, num_layers: int = 1
) -> int:
    """Largest number of blocks per layer whose caches for ``num_layers`` layers fit ``budget_bytes``."""
    per_block = config.slot_bytes * block_size * num_kv_heads * num_layers
    return int(budget_bytes) // per_block


def tokens_in_budget(
    config: CacheConfig, budget_bytes: int, block_size: int, num_kv_heads: int, num_layers: int = 1
) -> int:
    """Tokens (whole blocks) that fit ``budget_bytes`` over ``num_layers`` layers."""
    return blocks_in_budget(config, budget_bytes, block_size, num_kv_heads, num_layers) * block_size


# ---- int64-exact index helpers (host side, numpy int64) ------------------------------------------
#
# Inside traced code tqjax never forms a flat offset: kernels index (head, block, offset, word)
# per dimension and the lowering multiplies by the strides (int64 for arrays > 4 GiB). Traced code
# only forms ``slot = block * block_size + offset`` and ``slot // block_size``, which int32 holds
# provably because check_addressable bounds num_blocks * block_size by 2**31 - 1.


def slot_to_block_offset(slot: Any, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 ``(block, offset)`` of token slots; padding slots (< 0) map to ``(-1, -1)``."""
    slot = np.asarray(slot, dtype=np.int64)
    valid = slot >= 0
    block = np.where(valid, slot // block_size, -1)
    offset = np.where(valid, slot % block_size, -1)
    return block, offset


def block_offset_to_slot(block: Any, offset: Any, block_size: int) -> np.ndarray:
    return np.asarray(block, dtype=np.int64) * np.int64(block_size) + np.asarray(offset, dtype=np.int64)


def flat_element_offset(shape: tuple[int, ...], index: tuple[Any, ...]) -> np.ndarray:
    """Row-major flat element offset of ``index`` in an array of ``shape``, in int64 (no overflow)."""
    if len(index) != len(shape):
        raise ValueError(f"index has {len(index)} dims, shape has {len(shape)}")
    offset = np.zeros(np.broadcast(*[np.asarray(i) for i in index]).shape, dtype=np.int64)
    for size, i in zip(shape, index):
        i = np.asarray(i, dtype=np.int64)
        if np.any((i < 0) | (i >= size)):
            raise IndexError(f"index {i} out of range for dimension of size {size}")
        offset = offset * np.int64(size) + i
    return offset


def slot_element_offset(
    config: CacheConfig,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    array: str,
    head: Any,
    slot: Any,
    item: Any = 0,
) -> np.ndarray:
    """int64 element offset of ``array[head, slot // bs, slot % bs, item]`` in a cache of this geometry."""
    shape, _ = array_specs(config, num_blocks, block_size, num_kv_heads)[array]
    block, offset = slot_to_block_offset(slot, block_size)
    return flat_element_offset(shape, (head, block, offset, item))


def slot_byte_offset(
    config: CacheConfig,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    array: str,
    head: Any,
    slot: Any,
    item: Any = 0,
) -> np.ndarray:
    """int64 byte offset of one element (see :func:`slot_element_offset`)."""
    _, dtype = array_specs(config, num_blocks, block_size, num_kv_heads)[array]
    elements = slot_element_offset(config, num_blocks, block_size, num_kv_heads, array, head, slot, item)
    return elements * np.int64(dtype.itemsize)


def needs_int64_offsets(config: CacheConfig, num_blocks: int, block_size: int, num_kv_heads: int) -> bool:
    """Whether any array of this geometry has 2**31 or more elements (its offsets need int64)."""
    for shape, _ in array_specs(config, num_blocks, block_size, num_kv_heads).values():
        if array_nbytes(shape, np.uint8) > INT32_MAX:
            return True
    return False
