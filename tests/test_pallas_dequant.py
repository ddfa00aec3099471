"""Pallas dequantization vs the reference (interpret mode on CPU; the same tests on a GPU).

Tolerance: the kernel computes the score-domain vectors with the decode kernel's centroid lookup (the
table's exact entries) and XLA applies the same inverse rotations as the reference,
so K agrees to float32 rounding of a D-term product (checked at 1e-5 of max|K|); V is the same
``code * scale + zero`` (checked at 1e-6 of max|V|). Past each sequence's length both are exactly 0.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tqjax
from tqjax.pallas.dequant import dequantize
from tqjax.reference import dequantize_jit
from test_pallas_decode import make_case

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU


def check(cache, tables, lens, **kw):
    k_ref, v_ref = dequantize_jit(cache, tables, lens)
    k, v = dequantize(cache, tables, lens, interpret=INTERPRET, **kw)
    chex.assert_equal_shape([k, v, k_ref, v_ref])
    chex.assert_trees_all_close(k, k_ref, atol=1e-5 * float(jnp.max(jnp.abs(k_ref))), rtol=0)
    chex.assert_trees_all_close(v, v_ref, atol=1e-6 * float(jnp.max(jnp.abs(v_ref))), rtol=0)
    past = np.arange(k.shape[1])[None, :] >= np.asarray(lens)[:, None]
    assert float(jnp.max(jnp.abs(k[past]), initial=0.0)) == 0.0
    assert float(jnp.max(jnp.abs(v[past]), initial=0.0)) == 0.0


@pytest.mark.parametrize("name", list(tqjax.PRESETS))
def test_every_preset(name):
    _, cache, tables, lens = make_case(name, head_dim=128, block_size=16, hk=2, group=1, lens=[0, 1, 37, 90], seed=4)
    check(cache, tables, lens)


@pytest.mark.parametrize("head_dim,block_size,block_tokens", [(64, 32, 32), (256, 16, 64), (128, 64, 16)])
def test_shapes_and_chunks(head_dim, block_size, block_tokens):
    """max_blocks not a multiple of the chunk (tables padded inside), chunk smaller than a block."""
    _, cache, tables, lens = make_case("turboquant_4bit_nc", head_dim=head_dim, block_size=block_size, hk=1, group=1,
                                       lens=[block_size + 5, 0], seed=head_dim)
    check(cache, tables, lens, block_tokens=block_tokens)


def test_dispatch_and_errors():
    _, cache, tables, lens = make_case("turboquant_4bit_nc", head_dim=64, block_size=16, hk=1, group=1, lens=[20],
                                       seed=5)
    with pytest.raises(ValueError, match="seq_lens"):
        dequantize(cache, tables, lens + 1000, interpret=INTERPRET)
    with pytest.raises(ValueError, match="block_tables"):
        dequantize(cache, tables[0], lens, interpret=INTERPRET)


def test_no_retrace():
    from tqjax.pallas import dequant

    _, cache, tables, lens = make_case("turboquant_3bit_nc", head_dim=64, block_size=16, hk=1, group=1, lens=[20, 7],
                                       seed=6)
    traced = chex.assert_max_traces(dequant._dequantize.__wrapped__, n=1)
    f = jax.jit(traced, static_argnames=("block_tokens", "num_warps", "num_stages", "interpret"))
    for step in range(3):
        f(cache, tables, lens + step, block_tokens=32, num_warps=4, num_stages=1, interpret=INTERPRET)


@functools.lru_cache(maxsize=None)
def _lowering_case(name):
    cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, 128)
    return tqjax.PagedKVCache.allocate(cfg, 32, 16, 2), jnp.zeros((2, 8), jnp.int32), jnp.full((2,), 100, jnp.int32)


@pytest.mark.parametrize("name", list(tqjax.PRESETS))
def test_lowers_to_triton_for_cuda(name):
    """The kernel passes the Pallas Triton lowering for CUDA (runs on CPU: export, no GPU needed)."""
    from tqjax.pallas import dequant

    def f(cache, tables, lens):
        return dequant._dequantize(cache, tables, lens, block_tokens=64, num_warps=4, num_stages=1, interpret=False)

    exported = jax.export.export(
        jax.jit(f), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*_lowering_case(name))
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()
