"""Large single-layer caches on a real GPU: the store and decode kernels read and write the LAST blocks
of caches of 3, 6 and 7.5 GiB (every array of the cache is touched there), with both decode kernels
where both run (tqjax.pallas.decode's Triton kernel; the Mosaic GPU one on Hopper).

Why these sizes: the Pallas Triton lowering computes pointer offsets in int32 elements for arrays of
at most 4 GiB and in int64 above that. tqjax's arrays have 2- or 4-byte elements, so a 2-4 GiB array
stays below 2**31 elements (int32-safe), and a > 4 GiB array gets int64 offsets. The 3 GiB cache has
arrays of ~1.4 GiB, the 6 GiB one a 3.9 GiB key array (int32 offsets up to ~2**30 elements), the
7.5 GiB one a 4.9 GiB key array (> 4 GiB: int64 offsets). A 1-byte layout would break the 3 and 6 GiB
cases (offsets past 2**31 elements in int32), which is what vLLM's ROCm int64 fix was about.

Interpret mode truncates indices to int32, so this can only be proven on a device: run with
``python -m pytest -m gpu tests/test_large_cache_gpu.py`` on a GPU (skipped elsewhere).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tqjax
from tqjax.codec import key_codec, value_codec
from tqjax.layout import cache_nbytes
from tqjax.pallas.decode import choose_implementation, paged_decode
from tqjax.pallas.store import store as pallas_store
from tqjax.reference import paged_decode_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: interpret mode truncates to int32"),
]

GIB = 2**30


@pytest.mark.parametrize(
    "name,gib",
    # k3p5v4: rows of 56 bytes, which the Mosaic decode copies as whole pages (decode_mgpu.copy_shape)
    [("turboquant_4bit_nc", 3.0), ("turboquant_4bit_nc", 6.0), ("turboquant_k8v4", 6.0), ("turboquant_k8v4", 7.5),
     ("turboquant_k3p5v4", 6.0)],
)
def test_store_and_decode_touch_the_last_blocks(name, gib):
    hk, d, bs = 8, 128, 16
    cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, d)
    num_blocks = int(gib * GIB) // (cfg.slot_bytes * hk * bs)
    cache = tqjax.PagedKVCache.allocate(cfg, num_blocks, bs, hk)
    assert abs(cache.nbytes - gib * GIB) < 0.01 * GIB and cache.nbytes == cache_nbytes(cfg, num_blocks, bs, hk)

    rng = np.random.default_rng(int(gib * 10))
    blocks = np.array([num_blocks - 1, num_blocks - 2, num_blocks - 3, num_blocks - 4, 0, 1], np.int64)
    slots = (blocks[:, None] * bs + np.arange(bs)[None, :]).reshape(-1)
    n = slots.size
    key = jnp.asarray(rng.standard_normal((n, hk, d)), jnp.bfloat16)
    value = jnp.asarray(rng.standard_normal((n, hk, d)), jnp.bfloat16)
    cache = pallas_store(cache, key, value, jnp.asarray(slots, jnp.int32))

    # every array holds exactly the reference encoding at the written slots (incl. the very last one)
    kw, ks = key_codec(cfg).encode(key)
    vw, vs = value_codec(cfg).encode(value)
    expected = {"key_codes": kw, "key_scales": ks, "value_codes": vw, "value_scales": vs}
    idx_b = jnp.asarray(slots // bs, jnp.int32)
    idx_o = jnp.asarray(slots % bs, jnp.int32)
    for array_name, arr in cache.arrays().items():
        got = np.asarray(arr[:, idx_b, idx_o])  # [Hk, N, W]
        want = np.asarray(jnp.swapaxes(expected[array_name], 0, 1))
        bits = (np.int32 if got.itemsize == 2 else np.uint32)
        got, want = (x.view(np.int16 if x.itemsize == 2 else np.uint32).astype(bits) for x in (got, want))
        if array_name == "key_scales":  # XLA on the GPU forms a few norms one ulp away (tests/test_store_mgpu.py)
            assert np.abs(got - want).max() <= 1, array_name
        else:
            np.testing.assert_array_equal(got, want, err_msg=array_name)
        # an untouched block next to the written ones is still zero (no stray writes)
        assert not np.any(np.asarray(arr[:, num_blocks - 5])), array_name

    # decode two sequences living in the last blocks (and the first ones)
    tables = jnp.asarray([[num_blocks - 1, num_blocks - 3, num_blocks - 2, num_blocks - 4],
                          [0, num_blocks - 1, 1, 0]], jnp.int32)
    lens = jnp.asarray([4 * bs, 2 * bs + 5], jnp.int32)
    q = jnp.asarray(rng.standard_normal((2, hk * 4, d)), jnp.float32)
    ref = paged_decode_reference(q, cache, tables, lens)
    # both decode kernels where both run (the Mosaic GPU one: Hopper, the caches it reads)
    kernels = {"triton", choose_implementation(cache, 4)}
    for implementation in sorted(kernels):
        out = paged_decode(q, cache, tables, lens, implementation=implementation)
        assert bool(jnp.all(jnp.isfinite(out))), implementation
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5 * float(jnp.max(jnp.abs(ref))),
                                   rtol=0, err_msg=implementation)
