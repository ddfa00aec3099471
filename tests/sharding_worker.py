"""The multi-device checks of tests/test_sharding.py, run in a fresh process with 8 simulated CPU devices.

``python tests/sharding_worker.py OUT.json`` (with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
set by the caller, before jax starts) runs every check and writes ``{name: {"error": None or the
traceback, "seconds": float}}`` to OUT.json.

Ground truth is the single-device op on the whole cache: local block b (slot s) of data shard i is
global block ``i * blocks_per_shard + b`` (slot ``s + i * blocks_per_shard * block_size``) there, and
data shard i's requests are the i-th group of ``B / data`` rows. Shapes are tiny: 8 KV heads, 16 query
heads, head_dim 64, block size 8, 4 blocks per data shard.
"""

from __future__ import annotations

import functools
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from cache_helpers import random_cache
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tqjax
from tqjax import reference, sharding
from tqjax.backends import BLOCK_SIZES, BackendOps, BackendSpec, register_backend
from tqjax.config import PRESETS
from tqjax.nn import TransformerLM, TurboQuantAttention, generate
from tqjax.pallas import decode as pallas_decode
from tqjax.pallas import store as pallas_store

HK, HQ, D, BS, NBL = 8, 16, 64, 8, 4  # KV heads, query heads, head_dim, block size, blocks per data shard
N_LOCAL, B_LOCAL, T_LOCAL, CTX = 10, 2, 10, 16  # per data shard: stored tokens, decodes, prefill rows, context
PRESET = "turboquant_4bit_nc"
CFG = tqjax.TurboQuantConfig.from_cache_dtype(PRESET, D)
CHECKS: dict[str, Callable[[], None]] = {}


def check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS[fn.__name__] = fn
    return fn


class Scenario:
    """Random inputs for a data x model mesh, in local ids (sharded ops) and global ids (single device)."""

    def __init__(self, data: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.data = data
        local_slots = NBL * BS
        self.cache = random_cache(CFG, data * NBL, BS, HK, rng, scale_std=0.5)
        n = data * N_LOCAL
        self.key = jnp.asarray(rng.standard_normal((n, HK, D)), jnp.float32)
        self.value = jnp.asarray(rng.standard_normal((n, HK, D)), jnp.float32)
        slots = np.stack([rng.permutation(local_slots)[:N_LOCAL] for _ in range(data)])
        slots[:, -1] = -1  # one padding token per shard
        shard_slot0 = (np.arange(data) * local_slots)[:, None]
        self.slots = jnp.asarray(slots.reshape(-1), jnp.int32)
        self.global_slots = jnp.asarray(np.where(slots >= 0, slots + shard_slot0, -1).reshape(-1), jnp.int32)

        b = data * B_LOCAL
        self.query = jnp.asarray(rng.standard_normal((b, HQ, D)), jnp.float32)
        tables = np.stack([rng.permutation(NBL) for _ in range(b)]).astype(np.int32)
        lens = rng.integers(1, NBL * BS + 1, b)
        lens[0] = 0  # an empty sequence: zeros
        for r, n_used in enumerate(-(-lens // BS)):
            tables[r, n_used:] = -1  # never read
        shard_block0 = np.repeat(np.arange(data) * NBL, B_LOCAL)[:, None]
        self.tables = jnp.asarray(tables)
        self.global_tables = jnp.asarray(np.where(tables >= 0, tables + shard_block0, -1))
        self.lens = jnp.asarray(lens, jnp.int32)

        t = data * T_LOCAL
        self.pq = jnp.asarray(rng.standard_normal((t, HQ, D)), jnp.float32)
        self.pk = jnp.asarray(rng.standard_normal((t, HK, D)), jnp.float32)
        self.pv = jnp.asarray(rng.standard_normal((t, HK, D)), jnp.float32)
        self.qsl_local = [0, 4, T_LOCAL - 1]  # two sequences and a padding row per shard
        self.qsl = jnp.asarray(self.qsl_local * data, jnp.int32)
        self.ck = jnp.asarray(rng.standard_normal((2 * data, CTX, HK, D)), jnp.float32)
        self.cv = jnp.asarray(rng.standard_normal((2 * data, CTX, HK, D)), jnp.float32)
        self.cl = jnp.asarray(rng.integers(0, CTX + 1, 2 * data), jnp.int32)


def assert_cache_equal(got: tqjax.PagedKVCache, want: tqjax.PagedKVCache) -> None:
    for name, a in want.arrays().items():
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(a), err_msg=name)


def assert_shards(x: jax.Array, shard_shape: tuple[int, ...], devices: int) -> None:
    shapes = {s.data.shape for s in x.addressable_shards}
    assert shapes == {shard_shape} and len(x.addressable_shards) == devices, (shapes, len(x.addressable_shards))


def compiled_without_collectives(fn: Callable, *args: object, donate: bool = False) -> object:
    """Compile ``fn`` for ``args``, assert its HLO has no collective, run it."""
    compiled = jax.jit(fn, donate_argnums=(0,) if donate else ()).lower(*args).compile()
    hlo = compiled.as_text()
    assert "num_partitions" in hlo or "sharding=" in hlo, "not an SPMD program"
    found = sharding.collectives_in(hlo)
    assert not found, f"collectives in the compiled program: {found[:3]}"
    return compiled(*args)


def ops_match(data: int, model: int) -> None:
    """The four sharded ops on a data x model mesh == the single-device ops; outputs stay sharded by
    head (and by data shard); the compiled programs have no collective."""
    mesh = sharding.make_mesh(data, model)
    s = Scenario(data, seed=10 * data + model)
    sharded = sharding.shard_cache(s.cache, mesh)  # a copy: s.cache is donated to the single-device store
    single = tqjax.store(s.cache, s.key, s.value, s.global_slots)
    sharded = compiled_without_collectives(
        lambda c, k, v, sl: sharding.sharded_store(c, k, v, sl, mesh=mesh), sharded, s.key, s.value, s.slots,
        donate=True,
    )
    assert_cache_equal(sharded, single)
    for a in sharded.arrays().values():  # never gathered: every device keeps only its heads of its pages
        assert_shards(a, (HK // model, NBL) + a.shape[2:], data * model)
        assert a.sharding.is_equivalent_to(NamedSharding(mesh, sharding.CACHE_SPEC), a.ndim)

    want = tqjax.paged_decode(s.query, single, s.global_tables, s.lens, scale=0.2, softcap=5.0)
    got = compiled_without_collectives(
        lambda q, c, t, n: sharding.sharded_paged_decode(q, c, t, n, mesh=mesh, scale=0.2, softcap=5.0),
        s.query, sharded, s.tables, s.lens,
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert_shards(got, (B_LOCAL, HQ // model, D), data * model)
    assert not np.asarray(got)[0].any()  # seq_lens 0

    got = compiled_without_collectives(
        lambda c, t, n: sharding.sharded_dequantize(c, t, n, mesh=mesh), sharded, s.tables, s.lens
    )
    for g, w in zip(got, tqjax.dequantize(single, s.global_tables, s.lens)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        assert_shards(g, (B_LOCAL, NBL * BS, HK // model, D), data * model)

    got = compiled_without_collectives(
        lambda q, k, v, qsl, ck, cv, cl: sharding.sharded_prefill_attention(
            q, k, v, qsl, mesh=mesh, softcap=7.0, context_key=ck, context_value=cv, context_lens=cl
        ),
        s.pq, s.pk, s.pv, s.qsl, s.ck, s.cv, s.cl,
    )
    want = []
    for i in range(data):  # data shard i: its own packed batch of T_LOCAL rows and 2 sequences with context
        rows, seqs = slice(i * T_LOCAL, (i + 1) * T_LOCAL), slice(2 * i, 2 * i + 2)
        want.append(
            tqjax.prefill_attention(
                s.pq[rows], s.pk[rows], s.pv[rows], jnp.asarray(s.qsl_local, jnp.int32), softcap=7.0,
                context_key=s.ck[seqs], context_value=s.cv[seqs], context_lens=s.cl[seqs],
            )
        )
    np.testing.assert_allclose(np.asarray(got), np.concatenate(want), rtol=1e-6, atol=1e-6)
    assert_shards(got, (T_LOCAL, HQ // model, D), data * model)


for _data, _model in ((1, 2), (1, 4), (1, 8), (2, 4)):
    CHECKS[f"ops_match_single_device_data{_data}_model{_model}"] = functools.partial(ops_match, _data, _model)


@check
def native_cache_ops_match() -> None:
    """A native ("auto", bf16) cache sharded like a TurboQuant one: store / decode / dequantize on a 2 x 4
    mesh == the single-device ops, with no collective."""
    mesh = sharding.make_mesh(2, 4)
    s = Scenario(2, seed=77)
    cfg = tqjax.cache_config("auto", D)
    single = tqjax.allocate_kv_cache("auto", D, 2 * NBL, BS, HK)
    sharded = sharding.allocate_sharded(cfg, NBL, BS, HK, mesh)
    assert isinstance(sharded, tqjax.NativePagedKVCache) and sharded.num_blocks == 2 * NBL
    single = tqjax.store(single, s.key, s.value, s.global_slots)
    sharded = compiled_without_collectives(
        lambda c, k, v, sl: sharding.sharded_store(c, k, v, sl, mesh=mesh), sharded, s.key, s.value, s.slots,
        donate=True,
    )
    assert_cache_equal(sharded, single)
    for a in sharded.arrays().values():
        assert_shards(a, (HK // 4, NBL, BS, D), 8)
    want = tqjax.paged_decode(s.query, single, s.global_tables, s.lens, softcap=5.0)
    got = compiled_without_collectives(
        lambda q, c, t, n: sharding.sharded_paged_decode(q, c, t, n, mesh=mesh, softcap=5.0),
        s.query, sharded, s.tables, s.lens,
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    got = compiled_without_collectives(
        lambda c, t, n: sharding.sharded_dequantize(c, t, n, mesh=mesh), sharded, s.tables, s.lens
    )
    for g, w in zip(got, tqjax.dequantize(single, s.global_tables, s.lens)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@check
def collective_detector_sees_an_all_reduce() -> None:
    """The HLO scan used above does find a collective: a sum over a head-sharded array all-reduces."""
    x = jax.device_put(jnp.ones((8, 4)), NamedSharding(sharding.make_mesh(1, 8), P(sharding.MODEL)))
    assert sharding.collectives_in(jax.jit(jnp.sum).lower(x).compile().as_text())


@check
def store_donates_and_updates_in_place_per_shard() -> None:
    mesh = sharding.make_mesh(2, 4)
    s = Scenario(2, seed=4)
    cache = sharding.shard_cache(s.cache, mesh)
    before = {n: [sh.data.unsafe_buffer_pointer() for sh in a.addressable_shards] for n, a in cache.arrays().items()}
    out = sharding.sharded_store(cache, s.key, s.value, s.slots, mesh=mesh)
    for name, a in out.arrays().items():
        assert getattr(cache, name).is_deleted(), f"{name} was not donated"
        assert [sh.data.unsafe_buffer_pointer() for sh in a.addressable_shards] == before[name], f"{name} was copied"


@check
def pallas_interpret_backend_through_registry() -> None:
    """An out-of-tree backend (the Pallas kernels in interpret mode) chosen with backend=... per shard."""
    register_backend(
        "pallas-interpret",
        BackendSpec(
            description="Pallas kernels in interpret mode (test only)",
            kv_cache_dtypes=frozenset(PRESETS),
            head_dim_rule=lambda dtype, head_dim: None,
            block_sizes=BLOCK_SIZES,
            platforms=frozenset({"cpu"}),
            differentiable=False,
            ops=lambda platform: BackendOps(
                store=functools.partial(pallas_store.store, interpret=True),
                paged_decode=functools.partial(pallas_decode.paged_decode, interpret=True),
                dequantize=reference.dequantize_jit,
            ),
        ),
    )
    mesh = sharding.make_mesh(2, 4)
    s = Scenario(2, seed=5)
    cache = sharding.shard_cache(s.cache, mesh)
    single = tqjax.store(s.cache, s.key, s.value, s.global_slots, backend="reference")
    cache = sharding.sharded_store(cache, s.key, s.value, s.slots, mesh=mesh, backend="pallas-interpret")
    assert_cache_equal(cache, single)  # the kernel is bit-exact with the reference
    got = sharding.sharded_paged_decode(s.query, cache, s.tables, s.lens, mesh=mesh, backend="pallas-interpret")
    want = tqjax.paged_decode(s.query, single, s.global_tables, s.lens, backend="reference")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def expect_error(kind: type[Exception], match: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except kind as exc:
        assert match in str(exc), f"expected {match!r} in {exc!r}"
        return
    raise AssertionError(f"no {kind.__name__} matching {match!r}")


@check
def clear_errors_before_tracing() -> None:
    mesh = sharding.make_mesh(2, 4)
    s = Scenario(2, seed=6)
    cache = sharding.shard_cache(s.cache, mesh)
    expect_error(ValueError, "needs 16 devices", lambda: sharding.make_mesh(2, 8))
    expect_error(
        ValueError, "mesh axes must be", lambda: sharding.mesh_sizes(jax.make_mesh((2, 4), ("x", "y")))
    )
    expect_error(
        ValueError,
        "number of KV heads (6) must be divisible by the mesh's 'model' axis size (4)",
        lambda: sharding.allocate_sharded(CFG, NBL, BS, 6, mesh),
    )
    expect_error(
        ValueError,
        "batch (requests) (3) must be divisible by the mesh's 'data' axis size (2)",
        lambda: sharding.sharded_paged_decode(s.query[:3], cache, s.tables[:3], s.lens[:3], mesh=mesh),
    )
    expect_error(
        ValueError,
        "number of new tokens (key.shape[0]) (9) must be divisible",
        lambda: sharding.sharded_store(cache, s.key[:9], s.value[:9], s.slots[:9], mesh=mesh),
    )
    expect_error(
        ValueError,
        "is not a local block id",
        lambda: sharding.sharded_paged_decode(s.query, cache, s.tables + NBL, s.lens, mesh=mesh),
    )
    expect_error(
        ValueError,
        "slots are local to the data shard",
        lambda: sharding.sharded_store(cache, s.key, s.value, s.global_slots + NBL * BS, mesh=mesh),
    )
    expect_error(
        ValueError,
        "the sharded ops never move a cache",
        lambda: sharding.sharded_paged_decode(s.query, s.cache, s.tables, s.lens, mesh=mesh),
    )
    expect_error(
        ValueError,
        "query_start_loc of data shard 1",
        lambda: sharding.sharded_prefill_attention(
            s.pq, s.pk, s.pv, jnp.asarray([0, 4, 9, 1, 4, 9], jnp.int32), mesh=mesh
        ),
    )
    expect_error(
        ValueError,
        "'data' axis must have size 1",
        lambda: TurboQuantAttention(64, HQ, HK, D, kv_cache_dtype=PRESET, rngs=nnx.Rngs(0), mesh=mesh),
    )
    expect_error(
        ValueError,
        "mlp_dim (100) must be divisible",
        lambda: TransformerLM(
            50, 64, 1, HQ, HK, D, 100, kv_cache_dtypes=PRESET, rngs=nnx.Rngs(0), mesh=sharding.make_mesh(1, 8)
        ),
    )


@check
def lm_with_mesh_generates_same_tokens() -> None:
    """TransformerLM over a 1 x 4 mesh vs one device: same tokens (a prefill step, then decode steps)."""
    mesh = sharding.make_mesh(1, 4)

    def lm(mesh: jax.sharding.Mesh | None) -> TransformerLM:
        return TransformerLM(
            50, 64, 1, 8, 4, D, 128, kv_cache_dtypes=PRESET, qk_norm=True, softcap=20.0, rngs=nnx.Rngs(7), mesh=mesh
        )

    plain, tp = lm(None), lm(mesh)
    assert_shards(tp.blocks[0].attn.q_proj.kernel.get_value(), (64, 8 * D // 4), 4)
    assert_shards(tp.blocks[0].attn.o_proj.kernel.get_value(), (8 * D // 4, 64), 4)
    assert_shards(tp.blocks[0].mlp.down.kernel.get_value(), (128 // 4, 64), 4)
    assert_shards(tp.embed.embedding.get_value(), (50, 64), 4)  # replicated
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, 50, n).tolist() for n in (40, 5)]
    want, _ = generate(plain, plain.allocate_caches(12, BS), prompts, 3)
    got, caches = generate(tp, tp.allocate_caches(12, BS), prompts, 3)
    assert got == want, (got, want)
    for a in caches[0].arrays().values():
        assert_shards(a, (1, 12) + a.shape[2:], 4)


def main() -> None:
    assert jax.device_count() == 8, f"expected 8 simulated devices, got {jax.devices()}"
    results = {}
    for name, fn in CHECKS.items():
        t0 = time.perf_counter()
        try:
            fn()
            error = None
        except Exception:  # noqa: BLE001 - reported to the parent test, which fails with it
            error = traceback.format_exc()
        results[name] = {"error": error, "seconds": round(time.perf_counter() - t0, 2)}
    Path(sys.argv[1]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
