"""The backend registry: platform detection, capability validation, routing, registration, boundary
layers, per-vendor kernel parameters and the public ops' dispatch through it (CPU only: simulated
platforms stand in for CUDA, ROCm and TPU)."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tqjax
from tqjax.pallas import decode as pallas_decode
from tqjax.pallas import flash_decode as pallas_flash_decode
from tqjax.pallas.tuning import store_params
from tqjax import PRESETS, PagedKVCache, TurboQuantConfig, reference
from tqjax.backends import (
    AttentionBackend,
    BackendOps,
    BackendSpec,
    Platform,
    backend_ops,
    boundary_layer_dtypes,
    detect_platform,
    get_valid_backends,
    layer_backends,
    platform_of,
    priority,
    register_backend,
    registered_backends,
    select_backend,
    unregister_backend,
)

TQ, FLASH, REF = AttentionBackend.TURBOQUANT, AttentionBackend.FLASH, AttentionBackend.REFERENCE
CUDA = Platform("cuda", "sm90")
MI300 = Platform("rocm", "gfx942")
MI350 = Platform("rocm", "gfx950")
CPU = Platform("cpu")
TPU = Platform("tpu")
PRESET_NAMES = sorted(PRESETS)


def _expected_valid(platform: Platform, kv_cache_dtype: str) -> list[AttentionBackend]:
    if kv_cache_dtype == "auto":
        return [FLASH, REF] if platform.is_gpu else [REF]
    if platform.is_gpu and not (platform == MI300 and kv_cache_dtype == "turboquant_k8v4"):
        return [TQ, REF]
    return [REF]


# ---- routing over simulated platforms -------------------------------------------------------------------


@pytest.mark.parametrize("kv_cache_dtype", PRESET_NAMES + ["auto"])
@pytest.mark.parametrize("platform", [CUDA, MI300, MI350, CPU, TPU], ids=str)
def test_routing_of_every_dtype(platform: Platform, kv_cache_dtype: str) -> None:
    valid, rejected = get_valid_backends(kv_cache_dtype, 128, 16, platform=platform)
    assert valid == _expected_valid(platform, kv_cache_dtype)
    assert set(valid) | set(rejected) == set(registered_backends())
    assert not set(valid) & set(rejected)
    assert all(rejected.values()), "every rejected backend says why"
    if valid:
        assert select_backend(kv_cache_dtype, 128, 16, platform=platform) == valid[0]
    else:
        with pytest.raises(ValueError, match="no attention backend can serve") as info:
            select_backend(kv_cache_dtype, 128, 16, platform=platform)
        for key in rejected:
            assert f"\n  {key}: " in str(info.value)


@pytest.mark.parametrize("platform", [CUDA, MI300, MI350], ids=str)
def test_turboquant_dtypes_select_the_kernels_on_both_gpu_vendors(platform: Platform) -> None:
    for name in PRESET_NAMES:
        if platform == MI300 and name == "turboquant_k8v4":
            continue
        assert select_backend(name, 128, 16, platform=platform) is TQ
    assert select_backend("auto", 128, 16, platform=platform) is FLASH
    assert select_backend("bfloat16", 64, 32, platform=platform) is FLASH


def test_rejection_reasons_are_specific() -> None:
    _, rejected = get_valid_backends("turboquant_4bit_nc", 128, 16, platform=CUDA)
    assert rejected[FLASH] == ["kv_cache_dtype 'turboquant_4bit_nc' not supported (supported: auto, bfloat16, float16)"]
    _, rejected = get_valid_backends("turboquant_4bit_nc", 96, 16, platform=CUDA)
    assert rejected[TQ] == [
        (
            "head_dim 96 not supported: the Pallas store needs a power of two (its in-kernel tiles are "
            "power-of-two shapes)"
        )
    ]
    _, rejected = get_valid_backends("turboquant_k8v4", 128, 16, platform=MI300)
    (why,) = rejected[TQ]
    assert "gfx942" in why and "e4m3fnuz" in why and "Pallas Triton lowering refuses to cast" in why
    _, rejected = get_valid_backends("turboquant_4bit_nc", 128, 16, platform=CPU)
    (why,) = rejected[TQ]
    assert why.startswith("platform cpu not supported (supported: cuda, rocm)") and "interpret=True" in why
    _, rejected = get_valid_backends("turboquant_4bit_nc", 128, 16, platform=TPU)
    assert "Mosaic TPU" in rejected[TQ][0]
    # fp8 keys below sm89: the lowering has no e4m3fn casts there
    valid, rejected = get_valid_backends("turboquant_k8v4", 128, 16, platform=Platform("cuda", "sm80"))
    assert valid == [REF] and "sm89" in rejected[TQ][0]


def test_every_capability_is_checked_without_early_return() -> None:
    _, rejected = get_valid_backends("auto", 96, 4, platform=CPU, need_grad=True)
    reasons = rejected[TQ]
    assert len(reasons) == 5, reasons
    for fragment in ("platform cpu", "kv_cache_dtype 'auto'", "head_dim 96", "block_size 4", "no gradients"):
        assert any(fragment in r for r in reasons), fragment


def test_head_dim_and_block_size_limits() -> None:
    # split keys: each half is packed separately, so every TurboQuant backend needs head_dim % 64 == 0
    valid, rejected = get_valid_backends("turboquant_k3p5v4", 96, 16, platform=CUDA)
    assert valid == [] and all("multiples of 64" in rejected[b][0] for b in (TQ, REF))
    assert get_valid_backends("turboquant_4bit_nc", 1024, 16, platform=CUDA)[0] == []
    assert get_valid_backends("turboquant_4bit_nc", 512, 256, platform=CUDA)[0] == [TQ, REF]
    for block_size in (4, 24, 512):
        valid, rejected = get_valid_backends("turboquant_4bit_nc", 128, block_size, platform=CUDA)
        assert valid == [] and all(f"block_size {block_size} not supported" in r[-1] for r in rejected.values())
    # native caches: the flash kernel takes power-of-two head dims in [16, 256], the reference any
    assert get_valid_backends("auto", 64, 8, platform=CUDA)[0] == [FLASH, REF]
    assert get_valid_backends("float16", 256, 8, platform=CUDA)[0] == [FLASH, REF]
    for head_dim in (8, 72, 512):
        valid, rejected = get_valid_backends("auto", head_dim, 8, platform=CUDA)
        assert valid == [REF] and "power of two in [16, 256]" in rejected[FLASH][0]


def test_need_grad_routes_to_the_reference() -> None:
    valid, rejected = get_valid_backends("turboquant_4bit_nc", 128, 16, platform=CUDA, need_grad=True)
    assert valid == [REF]
    assert rejected[TQ] == ["no gradients (need_grad=True): it is inference-only"]


def test_explicit_backend() -> None:
    assert select_backend("turboquant_4bit_nc", 128, 16, platform=CPU, backend="reference") is REF
    assert select_backend("turboquant_4bit_nc", 128, 16, platform=CUDA, backend="pallas") is TQ
    assert select_backend("turboquant_4bit_nc", 128, 16, platform=CUDA, backend="REFERENCE") is REF
    assert select_backend("turboquant_4bit_nc", 128, 16, platform=CUDA, backend=REF) is REF
    with pytest.raises(ValueError, match=r"backend 'pallas' \(turboquant\) cannot serve .* on cpu: .*interpret"):
        select_backend("turboquant_4bit_nc", 128, 16, platform=CPU, backend="pallas")
    with pytest.raises(ValueError, match=r"'turboquant' cannot serve .*gfx942.*e4m3fnuz"):
        select_backend("turboquant_k8v4", 128, 16, platform=MI300, backend="turboquant")
    with pytest.raises(ValueError, match=r"head_dim 96 not supported.*; block_size 4 not supported"):
        select_backend("turboquant_4bit_nc", 96, 4, platform=CUDA, backend="turboquant")
    with pytest.raises(ValueError, match=r"unknown backend 'nope'; registered backends: turboquant \(alias: pallas\)"):
        select_backend("turboquant_4bit_nc", 128, 16, platform=CUDA, backend="nope")


def test_priority_lists() -> None:
    assert priority("cuda") == priority("rocm") == [TQ, FLASH, REF]
    assert priority("cpu") == priority("tpu") == [REF]
    with pytest.raises(ValueError, match="unknown platform kind"):
        priority("metal")


# ---- out-of-tree backends -----------------------------------------------------------------------------


def _spec(platforms: set[str], ops=None, dtypes: set[str] | None = None) -> BackendSpec:
    return BackendSpec(
        description="test backend",
        kv_cache_dtypes=frozenset(dtypes or PRESETS),
        head_dim_rule=lambda dtype, head_dim: None if head_dim == 64 else f"head_dim {head_dim} not supported: 64 only",
        block_sizes=frozenset({16}),
        platforms=frozenset(platforms),
        differentiable=False,
        ops=ops,
    )


@pytest.fixture
def unregister() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        unregister_backend(name)


def test_register_backend_joins_priority_and_selection(unregister: list[str]) -> None:
    unregister.append(register_backend("MyKernels", _spec({"cuda", "cpu"}), before="turboquant"))
    assert unregister == ["mykernels"]
    assert priority("cuda") == ["mykernels", TQ, FLASH, REF]
    assert priority("cpu") == [REF, "mykernels"]  # no TURBOQUANT in cpu's list: appended
    assert priority("rocm") == [TQ, FLASH, REF]
    assert select_backend("turboquant_4bit_nc", 64, 16, platform=CUDA) == "mykernels"
    assert select_backend("turboquant_4bit_nc", 64, 16, platform=CPU) is REF
    assert select_backend("turboquant_4bit_nc", 64, 16, platform=CPU, backend="MYKERNELS") == "mykernels"
    valid, rejected = get_valid_backends("turboquant_4bit_nc", 128, 16, platform=MI300)
    assert valid == [TQ, REF]
    assert rejected["mykernels"] == [
        "platform rocm not supported (supported: cpu, cuda)",
        "head_dim 128 not supported: 64 only",
    ]
    with pytest.raises(ValueError, match="already taken"):
        register_backend("mykernels", _spec({"cpu"}))
    for taken in ("pallas", "Reference"):
        with pytest.raises(ValueError, match="already taken"):
            register_backend(taken, _spec({"cpu"}))
    with pytest.raises(ValueError, match="cannot be unregistered"):
        unregister_backend("pallas")
    with pytest.raises(ValueError, match="unknown platform kinds"):
        _spec({"metal"})


def test_registered_backend_serves_the_public_ops(unregister: list[str]) -> None:
    calls: list[str] = []

    def counted(name: str, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    def ops(platform: Platform) -> BackendOps:
        return BackendOps(
            store=counted("store", reference.store_jit),
            paged_decode=counted("paged_decode", reference.paged_decode_jit),
            dequantize=counted("dequantize", reference.dequantize_jit),
        )

    unregister.append(register_backend("counted", _spec({"cpu"}, ops), before="reference"))
    cache, key, value, slots, query, tables, lens = _small_problem()
    cache = tqjax.store(cache, key, value, slots)
    tqjax.paged_decode(query, cache, tables, lens)
    tqjax.dequantize(cache, tables, lens)
    assert calls == ["store", "paged_decode", "dequantize"]


# ---- boundary layers ------------------------------------------------------------------------------------


def test_boundary_layer_dtypes() -> None:
    q = "turboquant_3bit_nc"
    assert boundary_layer_dtypes(q, 12, 3) == ["auto"] * 3 + [q] * 6 + ["auto"] * 3
    assert boundary_layer_dtypes(q, 4, 1) == ["auto", q, q, "auto"]
    assert boundary_layer_dtypes(q, 5, 0) == [q] * 5
    assert boundary_layer_dtypes(q, 1, 0) == [q]
    with pytest.raises(ValueError, match=r"keep 8 of 12 layers .* at most half .* num_boundary_layers <= 3"):
        boundary_layer_dtypes(q, 12, 4)
    with pytest.raises(ValueError, match=r"num_boundary_layers <= 0 for 3 layers"):
        boundary_layer_dtypes(q, 3, 1)
    for layers, n in ((0, 0), (12, -1), (12, 1.0), (True, 0)):
        with pytest.raises(ValueError, match="must be"):
            boundary_layer_dtypes(q, layers, n)


def test_boundary_layers_route_to_the_unquantized_backend() -> None:
    assert layer_backends("turboquant_4bit_nc", 128, 16, 8, 2, platform=MI300) == [FLASH] * 2 + [TQ] * 4 + [FLASH] * 2
    assert layer_backends("turboquant_k8v4", 128, 16, 4, 1, platform=MI300) == [FLASH, REF, REF, FLASH]
    assert layer_backends("turboquant_4bit_nc", 128, 16, 4, platform=CPU) == [REF] * 4
    assert layer_backends("turboquant_4bit_nc", 128, 16, 4, 1, platform=CPU) == [REF] * 4
    with pytest.raises(ValueError, match="no attention backend can serve kv_cache_dtype='auto'"):
        layer_backends("turboquant_4bit_nc", 128, 4, 4, 1, platform=CPU)  # block size 4: nobody


# ---- platforms and per-vendor parameters ----------------------------------------------------------------


def _device(platform: str, device_kind: str, compute_capability: str | None, version: str) -> SimpleNamespace:
    return SimpleNamespace(
        platform=platform,
        device_kind=device_kind,
        compute_capability=compute_capability,
        client=SimpleNamespace(platform_version=version),
    )


def test_detection_on_this_machine_is_cpu() -> None:
    assert jax.default_backend() == "cpu", "this suite runs on a CPU machine"
    assert detect_platform() == Platform("cpu", None, jax.devices()[0].device_kind)
    assert detect_platform(jax.devices()[0]).kind == "cpu"


@pytest.mark.parametrize(
    "device, expected",
    [
        (_device("gpu", "NVIDIA H100 80GB HBM3", "9.0", "PJRT C API\ncuda 12080"), ("cuda", "sm90")),
        (_device("gpu", "NVIDIA B200", "10.0", "PJRT C API\ncuda 13000"), ("cuda", "sm100")),
        (_device("gpu", "AMD Instinct MI300X", "gfx942:sramecc+:xnack-", "PJRT C API\nrocm 70000"), ("rocm", "gfx942")),
        (_device("gpu", "AMD Instinct MI355X gfx950", None, "rocm 7.0"), ("rocm", "gfx950")),
        (_device("rocm", "AMD Radeon", None, ""), ("rocm", None)),
        (_device("tpu", "TPU v5 lite", None, "TPU"), ("tpu", None)),
    ],
)
def test_detection_of_simulated_devices(device: SimpleNamespace, expected: tuple[str, str | None]) -> None:
    platform = platform_of(device)
    assert (platform.kind, platform.arch) == expected
    assert platform.device_kind == device.device_kind
    assert detect_platform(device) == platform


def test_platform_validation_and_fp8_variants() -> None:
    with pytest.raises(ValueError, match="unrecognised JAX device platform"):
        platform_of(_device("metal", "Apple M3", None, ""))
    with pytest.raises(ValueError, match="platform kind must be one of"):
        Platform("metal")
    variants = {
        Platform("cuda", "sm80"): None,
        Platform("cuda", "sm89"): "fn",
        CUDA: "fn",
        Platform("cuda"): None,
        Platform("rocm", "gfx90a"): None,
        MI300: "fnuz",
        MI350: "fn",
        Platform("rocm", "gfx1201"): "fn",
        CPU: None,
        TPU: None,
    }
    for platform, variant in variants.items():
        assert platform.fp8_e4m3 == variant, platform
    assert str(MI300) == "rocm gfx942" and str(CPU) == "cpu"


def test_turboquant_ops_launch_with_the_vendor_parameters() -> None:
    """The TURBOQUANT store is launched with tqjax.pallas.tuning's per-vendor parameters; the decode
    kernel picks its own (measured per device kind and preset) when called."""
    for platform in (CUDA, MI300):
        ops = backend_ops("pallas", platform)
        assert ops.store.keywords == store_params(platform)
        assert ops.paged_decode is pallas_decode.paged_decode
    flash = backend_ops(FLASH, CUDA)
    assert flash.paged_decode is pallas_flash_decode.paged_decode
    assert flash.store is reference.store_jit and flash.dequantize is reference.dequantize_jit


# ---- the public ops dispatch through the registry ----------------------------------------------------


def _small_problem() -> tuple[PagedKVCache, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """A turboquant_4bit_nc cache (head_dim 64, 4 blocks of 16, 2 KV heads), 5 new tokens, 2 sequences."""
    rng = np.random.default_rng(5)
    cfg = TurboQuantConfig.from_cache_dtype("turboquant_4bit_nc", 64)
    cache = PagedKVCache.allocate(cfg, num_blocks=4, block_size=16, num_kv_heads=2)
    key, value = (jnp.asarray(rng.standard_normal((5, 2, 64)), jnp.float32) for _ in range(2))
    slots = jnp.asarray([0, 1, 2, 17, 18], jnp.int32)
    query = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
    tables = jnp.asarray([[0, 3], [1, 2]], jnp.int32)
    lens = jnp.asarray([3, 19], jnp.int32)
    return cache, key, value, slots, query, tables, lens


def test_public_ops_dispatch_to_the_reference_on_cpu() -> None:
    cache, key, value, slots, query, tables, lens = _small_problem()

    def fresh() -> PagedKVCache:
        return PagedKVCache.allocate(cache.config, 4, 16, 2)

    expected = reference.store_jit(fresh(), key, value, slots)
    chosen = tqjax.store(cache, key, value, slots)
    explicit = tqjax.store(fresh(), key, value, slots, backend="reference")
    for got in (chosen, explicit):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    out = tqjax.paged_decode(query, chosen, tables, lens)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference.paged_decode_jit(query, chosen, tables, lens)))
    np.testing.assert_array_equal(
        np.asarray(tqjax.paged_decode(query, chosen, tables, lens, backend="reference")), np.asarray(out)
    )
    k, v = tqjax.dequantize(chosen, tables, lens)
    k_ref, v_ref = reference.dequantize_jit(chosen, tables, lens)
    assert k.shape == v.shape == (2, 32, 2, 64)
    np.testing.assert_array_equal(np.asarray(k), np.asarray(k_ref))
    np.testing.assert_array_equal(np.asarray(v), np.asarray(v_ref))


def test_public_ops_refuse_pallas_and_flash_on_cpu() -> None:
    cache, key, value, slots, query, tables, lens = _small_problem()
    with pytest.raises(ValueError, match=r"backend 'pallas' \(turboquant\) cannot serve .*interpret mode"):
        tqjax.store(cache, key, value, slots, backend="pallas")
    assert not cache.key_codes.is_deleted()  # refused before anything was donated
    with pytest.raises(ValueError, match=r"backend 'pallas' \(turboquant\) cannot serve .*interpret mode"):
        tqjax.paged_decode(query, cache, tables, lens, backend="pallas")
    with pytest.raises(ValueError, match=r"backend 'flash' cannot serve .*'turboquant_4bit_nc' not supported"):
        tqjax.dequantize(cache, tables, lens, backend="flash")
