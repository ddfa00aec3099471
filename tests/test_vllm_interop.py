"""Tests for tqjax.vllm_interop: byte-exact conversion to and from vLLM's TurboQuant slot layout."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from tqjax.config import PRESETS, TurboQuantConfig
from tqjax.layout import PagedKVCache
from tqjax.packing import pack_codes
from tqjax.vllm_interop import (
    codes_to_vllm_stream,
    from_vllm,
    to_vllm,
    vllm_slot_bytes,
    vllm_stream_to_codes,
)

VLLM_PRESETS = sorted(name for name, p in PRESETS.items() if p.vllm)
OTHER_PRESETS = sorted(name for name, p in PRESETS.items() if not p.vllm)
GEOMETRY = dict(num_blocks=3, block_size=8, num_kv_heads=2)


def _key_code_bytes(config: TurboQuantConfig) -> int:
    return math.ceil(config.head_dim * config.key_bits / 8)


def _random_norms(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Positive fp16 norms over 12 binades of the normal range (what a store writes)."""
    return np.exp2(rng.uniform(-6.0, 6.0, size=shape)).astype(np.float16)


def _random_vllm_bytes(config: TurboQuantConfig, rng: np.random.Generator) -> np.ndarray:
    """Random slots: every code, value and value-scale byte pattern is valid; the key norm (MSE
    presets) is a positive fp16 norm, as vLLM's store writes; pad bytes, if any, are 0."""
    shape = (GEOMETRY["num_blocks"], GEOMETRY["block_size"], GEOMETRY["num_kv_heads"], vllm_slot_bytes(config))
    data = rng.integers(0, 256, size=shape, dtype=np.uint8)
    d = config.head_dim
    key = d if config.key_format == "fp8" else _key_code_bytes(config) + 2
    if config.key_format != "fp8":
        data[..., key - 2 : key] = _random_norms(rng, shape[:-1] + (1,)).view(np.uint8)
    used = key + math.ceil(d * config.value_bits / 8) + 4
    data[..., used:] = 0
    return data


def _random_cache(config: TurboQuantConfig, rng: np.random.Generator) -> PagedKVCache:
    """A cache of the test geometry filled with random words, positive fp16 key norms and finite random
    fp16 value scalars."""
    empty = PagedKVCache.allocate(config, **GEOMETRY)

    def words(a: jnp.ndarray) -> jnp.ndarray:
        return jnp.asarray(rng.integers(0, 2**32, size=a.shape, dtype=np.uint32))

    def halves(a: jnp.ndarray) -> jnp.ndarray:
        return jnp.asarray((rng.standard_normal(a.shape) * 10).astype(np.float16))

    return PagedKVCache(
        key_codes=words(empty.key_codes),
        key_scales=None if empty.key_scales is None else jnp.asarray(_random_norms(rng, empty.key_scales.shape)),
        value_codes=words(empty.value_codes),
        value_scales=halves(empty.value_scales),
        config=config,
    )


def _bits_of(a: jnp.ndarray) -> np.ndarray:
    """Raw bits of an array (uint16 for fp16, the words themselves for uint32)."""
    a = np.asarray(a)
    return a.view(np.uint16) if a.dtype == np.float16 else a


def _centroid_lengths(config: TurboQuantConfig, codes: np.ndarray) -> np.ndarray:
    """||c[codes]|| in float64, [..., 1], from the codebook tqjax's quantizer uses."""
    from tqjax.codec import key_codec

    c = key_codec(config).quantizers[0].centroids.astype(np.float64)
    return np.linalg.norm(c[codes], axis=-1, keepdims=True)


def _assert_within_one_ulp(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Positive fp16 arrays equal up to one unit in the last place (adjacent bit patterns)."""
    diff = np.abs(_bits_of(got).astype(np.int32) - _bits_of(want).astype(np.int32))
    assert diff.max() <= 1, f"{what}: {int((diff > 1).sum())} values differ by more than one fp16 ulp"


# ---- slot sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [("turboquant_k8v4", 196), ("turboquant_4bit_nc", 134), ("turboquant_k3v4_nc", 118), ("turboquant_3bit_nc", 102)],
)
def test_vllm_slot_bytes_head_dim_128(name: str, expected: int) -> None:
    assert vllm_slot_bytes(TurboQuantConfig.from_cache_dtype(name, 128)) == expected


@pytest.mark.parametrize("name", VLLM_PRESETS)
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_tqjax_spends_what_vllm_spends(name: str, head_dim: int) -> None:
    config = TurboQuantConfig.from_cache_dtype(name, head_dim)
    assert vllm_slot_bytes(config) == config.slot_bytes
    assert vllm_slot_bytes(config) % 2 == 0


# ---- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VLLM_PRESETS)
@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_vllm_to_tqjax_to_vllm_is_byte_exact(name: str, head_dim: int) -> None:
    config = TurboQuantConfig.from_cache_dtype(name, head_dim)
    data = _random_vllm_bytes(config, np.random.default_rng(head_dim + len(name)))
    cache = from_vllm(data, config)
    assert cache.config == config
    assert cache.num_blocks == GEOMETRY["num_blocks"]
    assert cache.block_size == GEOMETRY["block_size"]
    assert cache.num_kv_heads == GEOMETRY["num_kv_heads"]
    back = to_vllm(cache)
    assert back.dtype == np.uint8
    if config.key_format == "fp8":
        np.testing.assert_array_equal(back, data)
        return
    # Every byte but the key norm's is copied exactly. The norm is divided by ||c[codes]|| into tqjax's
    # convention and multiplied back, each result rounded once to fp16 (relative error <= 2**-11 each),
    # so the norm comes back within one fp16 ulp.
    k = _key_code_bytes(config)
    keep = np.ones(data.shape[-1], bool)
    keep[k : k + 2] = False
    np.testing.assert_array_equal(back[..., keep], data[..., keep])
    norm_of = lambda x: np.ascontiguousarray(x[..., k : k + 2]).view("<f2")
    _assert_within_one_ulp(norm_of(back), norm_of(data), "vLLM key norms after a round trip")
    # tqjax's stored value is the norm over ||c[codes]||, computed independently here in float64.
    codes = vllm_stream_to_codes(data[..., :k], config.key_bits, config.head_dim).transpose(2, 0, 1, 3)
    want = (norm_of(data).transpose(2, 0, 1, 3).astype(np.float64) / _centroid_lengths(config, codes))
    np.testing.assert_array_equal(_bits_of(cache.key_scales), _bits_of(want.astype(np.float16)))
    assert np.mean(_bits_of(norm_of(back)) == _bits_of(norm_of(data))) > 0.5


@pytest.mark.parametrize("name", VLLM_PRESETS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_tqjax_to_vllm_to_tqjax_is_exact(name: str, head_dim: int) -> None:
    config = TurboQuantConfig.from_cache_dtype(name, head_dim)
    cache = _random_cache(config, np.random.default_rng(7 * head_dim + len(name)))
    data = to_vllm(cache)
    assert data.shape == (
        GEOMETRY["num_blocks"], GEOMETRY["block_size"], GEOMETRY["num_kv_heads"], vllm_slot_bytes(config)
    )
    back = from_vllm(data, config)
    for field in ("key_codes", "key_scales", "value_codes", "value_scales"):
        ours, theirs = getattr(cache, field), getattr(back, field)
        if ours is None:
            assert theirs is None
            continue
        assert theirs.dtype == ours.dtype and theirs.shape == ours.shape, field
        if field == "key_scales":  # norm-corrected norms: two fp16 roundings, see the test above
            _assert_within_one_ulp(theirs, ours, field)
        else:
            np.testing.assert_array_equal(_bits_of(theirs), _bits_of(ours), err_msg=field)


def test_slot_fields_land_at_the_documented_bytes() -> None:
    """4bit_nc at D=64: key codes 0..31, key norm 32..33, value codes 34..65, scale 66..67, zero 68..69.

    The key norm slot holds vLLM's convention, ``||k||``: tqjax's stored ``||k|| / ||c[codes]||`` times
    ``||c[codes]||`` (float64), rounded once to fp16."""
    config = TurboQuantConfig.from_cache_dtype("turboquant_4bit_nc", 64)
    rng = np.random.default_rng(3)
    hk, nb, bs = GEOMETRY["num_kv_heads"], GEOMETRY["num_blocks"], GEOMETRY["block_size"]
    key_codes = rng.integers(0, 16, size=(hk, nb, bs, 64))
    value_codes = rng.integers(0, 16, size=(hk, nb, bs, 64))
    key_norm = rng.uniform(0.5, 4.0, size=(hk, nb, bs, 1)).astype(np.float16)
    value_scales = rng.uniform(-4.0, 4.0, size=(hk, nb, bs, 2)).astype(np.float16)
    cache = PagedKVCache(
        key_codes=jnp.asarray(pack_codes(key_codes, 4, xp=np)),
        key_scales=jnp.asarray(key_norm),
        value_codes=jnp.asarray(pack_codes(value_codes, 4, xp=np)),
        value_scales=jnp.asarray(value_scales),
        config=config,
    )
    data = to_vllm(cache)
    assert data.shape == (nb, bs, hk, 70)
    vllm_norm = (key_norm.astype(np.float64) * _centroid_lengths(config, key_codes)).astype(np.float16)
    for h, b, o in [(0, 0, 0), (1, 2, 7), (0, 1, 5), (1, 0, 3)]:
        slot = data[b, o, h]
        for j in range(32):
            assert slot[j] == key_codes[h, b, o, 2 * j] | key_codes[h, b, o, 2 * j + 1] << 4
            assert slot[34 + j] == value_codes[h, b, o, 2 * j] | value_codes[h, b, o, 2 * j + 1] << 4
        assert int(slot[32]) | int(slot[33]) << 8 == int(vllm_norm[h, b, o, 0].view(np.uint16))
        assert int(slot[66]) | int(slot[67]) << 8 == int(value_scales[h, b, o, 0].view(np.uint16))
        assert int(slot[68]) | int(slot[69]) << 8 == int(value_scales[h, b, o, 1].view(np.uint16))


def test_fp8_keys_are_raw_bytes_without_norm() -> None:
    config = TurboQuantConfig.from_cache_dtype("turboquant_k8v4", 64)
    data = _random_vllm_bytes(config, np.random.default_rng(11))
    cache = from_vllm(data, config)
    assert cache.key_scales is None
    # key word j of a slot holds slot bytes 4j..4j+3, little-endian.
    slot = data[2, 5, 1].astype(np.uint64)
    words = np.asarray(cache.key_codes[1, 2, 5])
    for j in range(16):
        expected = slot[4 * j] | slot[4 * j + 1] << 8 | slot[4 * j + 2] << 16 | slot[4 * j + 3] << 24
        assert int(words[j]) == int(expected)


# ---- the bit stream ------------------------------------------------------------------------------


def test_4bit_stream_by_hand() -> None:
    codes = np.array([1, 2, 3, 4, 15, 0, 7, 9], dtype=np.uint8)
    stream = codes_to_vllm_stream(codes, 4)
    np.testing.assert_array_equal(stream, np.array([0x21, 0x43, 0x0F, 0x97], dtype=np.uint8))
    np.testing.assert_array_equal(vllm_stream_to_codes(stream, 4, 8), codes)


def test_3bit_stream_by_hand() -> None:
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 8, size=(2, 16), dtype=np.uint8)
    stream = codes_to_vllm_stream(codes, 3)
    assert stream.shape == (2, 6) and stream.dtype == np.uint8
    for row in range(2):
        expected = b""
        for group in range(2):
            word = sum(int(codes[row, 8 * group + i]) << (3 * i) for i in range(8))
            expected += word.to_bytes(3, "little")
        assert bytes(stream[row]) == expected
    np.testing.assert_array_equal(vllm_stream_to_codes(stream, 3, 16), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [5, 32, 37, 128])
def test_stream_round_trip_and_reference(bits: int, n: int) -> None:
    rng = np.random.default_rng(100 * bits + n)
    codes = rng.integers(0, 2**bits, size=(3, n), dtype=np.uint32)
    stream = codes_to_vllm_stream(codes, bits)
    assert stream.shape == (3, math.ceil(n * bits / 8))
    for row in range(3):
        big = sum(int(c) << (bits * i) for i, c in enumerate(codes[row]))
        assert bytes(stream[row]) == big.to_bytes(stream.shape[-1], "little")
    np.testing.assert_array_equal(vllm_stream_to_codes(stream, bits, n), codes)


def test_stream_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="codes must lie"):
        codes_to_vllm_stream(np.array([0, 8, 1]), 3)
    with pytest.raises(ValueError, match="integer"):
        codes_to_vllm_stream(np.array([0.5, 1.0]), 3)
    with pytest.raises(ValueError, match="bits"):
        codes_to_vllm_stream(np.array([0, 1]), 9)
    with pytest.raises(ValueError, match="stream must have 3 bytes"):
        vllm_stream_to_codes(np.zeros(4, np.uint8), 3, 8)
    with pytest.raises(ValueError, match="uint8"):
        vllm_stream_to_codes(np.zeros(3, np.int32), 3, 8)


# ---- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OTHER_PRESETS)
def test_non_vllm_presets_raise(name: str) -> None:
    config = TurboQuantConfig.from_cache_dtype(name, 128)
    with pytest.raises(ValueError, match="no vLLM equivalent"):
        vllm_slot_bytes(config)
    with pytest.raises(ValueError, match="no vLLM equivalent"):
        to_vllm(PagedKVCache.allocate(config, **GEOMETRY))
    with pytest.raises(ValueError, match="no vLLM equivalent"):
        from_vllm(np.ones((3, 8, 2, config.slot_bytes), np.uint8), config)


def test_from_vllm_validates_data() -> None:
    config = TurboQuantConfig.from_cache_dtype("turboquant_4bit_nc", 128)
    good = _random_vllm_bytes(config, np.random.default_rng(1))
    with pytest.raises(ValueError, match="data must be a uint8"):
        from_vllm(good.astype(np.int16), config)
    with pytest.raises(ValueError, match="data must have rank 4"):
        from_vllm(good[0], config)
    with pytest.raises(ValueError, match="data has 133 bytes per slot"):
        from_vllm(good[..., :133], config)
    with pytest.raises(ValueError, match="data of shape .*block_size"):
        from_vllm(np.ones((3, 6, 2, 134), np.uint8), config)
