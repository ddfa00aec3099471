"""Test helpers shared by the store tests: caches filled with garbage instead of zeros, and the float64
numpy twin of the key grid of exact Hadamard codes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tqjax import PagedKVCache, TurboQuantConfig
from tqjax.layout import array_specs


def random_cache(
    cfg: TurboQuantConfig, num_blocks: int, block_size: int, num_kv_heads: int, rng: np.random.Generator,
    scale_std: float = 1.0,
) -> PagedKVCache:
    """A cache whose every word is random and every scale a random finite fp16 (never zeros), so a
    test can check that slots it did not write are untouched."""
    arrays = {}
    for name, (shape, dtype) in array_specs(cfg, num_blocks, block_size, num_kv_heads).items():
        if dtype == np.uint32:
            arrays[name] = jnp.asarray(rng.integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32))
        else:
            arrays[name] = jnp.asarray((rng.standard_normal(shape) * scale_std).astype(np.float16))
    return PagedKVCache(
        key_codes=arrays["key_codes"], key_scales=arrays.get("key_scales"), value_codes=arrays["value_codes"],
        value_scales=arrays["value_scales"], config=cfg,
    )


def snap_to_grid_np(x: np.ndarray, bits: int) -> np.ndarray:
    """numpy twin of ``tqjax.quantizers.snap_to_grid``, from its definition: each vector of float32 ``x``
    [..., d] as ``floor(t + 1/2)`` multiples of ``2**(E + 1 - bits)`` (``2**E <= max|x| < 2**(E + 1)``,
    ``t`` the exact float32 quotient, the addition rounded to float32 as the definition says), returned in
    x's units as float64. Zero vectors stay zero."""
    x = np.asarray(x, np.float32)
    _, e = np.frexp(np.max(np.abs(x), axis=-1, keepdims=True))  # max|x| = m 2**e, m in [0.5, 1)
    scale = np.ldexp(np.float32(1.0), bits - e).astype(np.float32)  # 2**(bits - 1 - E) with E = e - 1
    n = np.floor((x * scale).astype(np.float32) + np.float32(0.5))
    return n.astype(np.float64) / scale.astype(np.float64)
