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
    """float64 numpy twin of ``tqjax.quantizers.snap_to_grid``, from its definition: each vector of
    ``x`` [..., d] rounded half up to a multiple of ``2**(E + 1 - bits)`` (``2**E <= max|x| < 2**(E + 1)``),
    returned in x's units. Zero vectors stay zero."""
    x = np.asarray(x, np.float64)
    _, e = np.frexp(np.max(np.abs(x), axis=-1, keepdims=True))  # max|x| = m 2**e, m in [0.5, 1)
    scale = np.ldexp(1.0, bits - e)  # 2**(bits - 1 - E) with E = e - 1
    t = x * scale
    n = np.floor(t) + (t - np.floor(t) >= 0.5)
    return n / scale
