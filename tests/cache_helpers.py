"""Test helpers shared by the store tests: caches filled with garbage instead of zeros, and the float64
numpy twin of the key grid of exact Hadamard codes."""

from __future__ import annotations

import jax
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


def residual_length_np(n2: np.ndarray, dim: int) -> np.ndarray:
    """numpy twin of ``tqjax.quantizers.residual_length``, from its definition: numpy's IEEE float32 square root of
    ``f32(n2) * dim`` rounded to 13 significant bits, to nearest with ties to even (by frexp, not bit tricks)."""
    length = np.sqrt(np.asarray(n2).astype(np.float32) * np.float32(dim)).astype(np.float64)
    m, e = np.frexp(length)
    return np.ldexp(np.rint(m * 2.0**13), e - 13).astype(np.float32)


def residual_length_inputs(rng: np.random.Generator) -> np.ndarray:
    """``||n||**2`` values for ``tqjax.quantizers.residual_length``: every integer below 2**22, 2**20 random ones
    up to the largest (``dim 4**11`` at dim 256: 2**30), and those whose root (at dims 64, 128, 256) lies next to
    a tie of the 13-bit rounding, with their neighbours."""
    ties = []
    for dim in (64, 128, 256):  # n2 whose f32(n2) dim has a sqrt near a tie: (k + 1/2) units of the 13th bit
        k = np.arange(2**12, 2**13, dtype=np.float64) + 0.5
        for e in range(-2, 20):
            root = np.ldexp(k, e - 12)
            n2 = np.rint(root**2 / dim).astype(np.int64)
            ties.append(n2[(n2 > 0) & (n2 < 2**30)])
    ties = np.concatenate(ties)
    ties = np.concatenate([ties - 1, ties, ties + 1])
    rand = rng.integers(2**22, 2**30, 2**20)
    return np.concatenate([np.arange(2**22), rand, ties]).astype(np.int32)


def on_cpu(fn, *args):
    """``fn(*args)`` jitted on the CPU: the reference with IEEE float32 square roots and divisions (XLA's GPU
    backend lowers both to approximations, which move a rare norm by an ulp and a QJL key's scale ``L``)."""
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        return jax.jit(fn)(*jax.device_put(args, cpu))
