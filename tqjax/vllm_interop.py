"""Conversion between a tqjax :class:`~tqjax.layout.PagedKVCache` and vLLM's TurboQuant cache (byte-exact but for key norms).

vLLM stores one layer's TurboQuant KV cache as a single uint8 tensor
``[num_blocks, block_size, num_kv_heads, slot_bytes]``: one **slot** of ``slot_bytes`` bytes per token
per KV head, laid out as::

    [ key codes | fp16 key norm | value codes | fp16 value scale | fp16 value zero | pad ]

* key codes, MSE presets (``turboquant_4bit_nc``, ``turboquant_k3v4_nc``, ``turboquant_3bit_nc``):
  ``ceil(D * b / 8)`` bytes holding the D ``b``-bit codes as a little-endian bit stream: code ``i``
  occupies stream bits ``b*i .. b*i + b - 1`` and stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``.
  For 4-bit codes element ``2j`` is the low nibble of byte ``j`` (``2j + 1`` the high nibble); for
  3-bit codes each group of 8 codes is one little-endian 24-bit word with code ``i`` of the group at
  bits ``3i .. 3i + 2``, the groups concatenated.
* key codes, ``turboquant_k8v4``: the D raw float8 e4m3 bytes, and no key norm.
* fp16 scalars are little-endian IEEE half precision.
* value codes use the same bit stream at ``value_bits`` (``ceil(D * value_bits / 8)`` bytes).
* ``slot_bytes`` is the sum of the fields rounded up to an even number; a pad byte, if any, is 0.

tqjax keeps the same information in structure-of-arrays pages (see :mod:`tqjax.layout`) with codes
packed by :mod:`tqjax.packing`, whose field decomposition differs from the stream for 3-bit codes,
so conversion unpacks to codes and repacks. For every supported head dimension tqjax spends exactly
``vllm_slot_bytes(config)`` bytes per slot, too.

Key norms follow two conventions of norm correction: vLLM stores ``||k||`` and renormalises the
centroid vector at decode time; tqjax stores ``||k|| / ||c[codes]||`` (computed once by the store, so
no attention kernel sums ``c**2``; see :mod:`tqjax.config`). The conversion rescales them by
``||c[codes]||`` (float64, tqjax's codebook) and rounds once to fp16.

Everything else converts exactly in both directions: ``to_vllm(from_vllm(data, cfg))`` reproduces every
byte of ``data`` except the key norms (pad bytes excepted, which vLLM writes as 0), and
``from_vllm(to_vllm(cache), cache.config)`` every code, scale and zero bit for bit; a key norm comes
back within one fp16 ulp (two roundings of relative error <= 2**-11). Only the four presets vLLM ships
convert.

A converted cache is bit-identical but only *meaningful* in the other system if both encode with the
same rotation and the same codebook: tqjax's random rotation (``config.rotation``, ``config.seed``)
and Lloyd--Max centroids (``config.codebook``) need not match vLLM's, in which case the codes decode
to different vectors. fp8 keys and uniform values do not depend on either.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tqjax.codec import key_codec
from tqjax.config import PRESETS, TurboQuantConfig
from tqjax.layout import PagedKVCache, check_addressable
from tqjax.packing import pack_bytes_le, pack_codes, unpack_bytes_le, unpack_codes
from tqjax.quantizers import FP16_MAX

_FP16_BYTES = 2


def _check_vllm_config(config: TurboQuantConfig) -> None:
    """Raise ValueError unless ``config`` is one of the presets vLLM ships."""
    if not PRESETS[config.name].vllm:
        vllm_names = ", ".join(sorted(n for n, p in PRESETS.items() if p.vllm))
        raise ValueError(
            f"{config.name!r} has no vLLM equivalent; only these presets convert to vLLM's cache layout: "
            f"{vllm_names}"
        )


def _stream_bytes(n: int, bits: int) -> int:
    return -(-n * bits // 8)


def _field_sizes(config: TurboQuantConfig) -> tuple[int, int, int, int]:
    """Byte sizes of ``(key codes, key norm, value codes, value scale + zero)`` of one vLLM slot."""
    _check_vllm_config(config)
    d = config.head_dim
    if config.key_format == "fp8":
        key_codes, key_norm = d, 0
    else:
        key_codes, key_norm = _stream_bytes(d, config.key_bits), _FP16_BYTES
    return key_codes, key_norm, _stream_bytes(d, config.value_bits), 2 * _FP16_BYTES


def vllm_slot_bytes(config: TurboQuantConfig) -> int:
    """Bytes of one vLLM TurboQuant slot (one token, one KV head) for ``config``, rounded up to even.

    Raises ValueError for presets vLLM does not ship.
    """
    used = sum(_field_sizes(config))
    return used + used % 2


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def codes_to_vllm_stream(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[..., n]`` (unsigned ints in [0, 2**bits)) -> vLLM's little-endian bit stream.

    Returns uint8 ``[..., ceil(n * bits / 8)]``; code ``i`` sits at stream bits ``bits*i ..``, unused
    high bits of the last byte are 0.
    """
    _check_bits(bits)
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be an integer array, got dtype {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit codes")
    n = codes.shape[-1]
    shifts = np.arange(bits, dtype=np.uint8)
    # [..., n, bits] -> [..., n * bits], least significant bit of each code first.
    stream_bits = ((codes.astype(np.uint8)[..., None] >> shifts) & 1).reshape(*codes.shape[:-1], n * bits)
    return np.packbits(stream_bits, axis=-1, bitorder="little")


def vllm_stream_to_codes(stream: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`codes_to_vllm_stream`: uint8 ``[..., ceil(n * bits / 8)]`` -> uint8 codes ``[..., n]``.

    Bits of the last byte beyond ``n * bits`` are ignored.
    """
    _check_bits(bits)
    stream = np.asarray(stream)
    if stream.dtype != np.uint8:
        raise ValueError(f"stream must be uint8, got dtype {stream.dtype}")
    expected = _stream_bytes(n, bits)
    if stream.ndim == 0 or stream.shape[-1] != expected:
        raise ValueError(
            f"stream must have {expected} bytes in its last axis for {n} {bits}-bit codes, got shape {stream.shape}"
        )
    stream_bits = np.unpackbits(stream, axis=-1, count=n * bits, bitorder="little")
    stream_bits = stream_bits.reshape(*stream.shape[:-1], n, bits)
    weights = (1 << np.arange(bits)).astype(np.uint8)
    return (stream_bits * weights).sum(axis=-1, dtype=np.uint8)


def _fp16_to_bytes(x: np.ndarray) -> np.ndarray:
    """float16 ``[..., k]`` -> uint8 ``[..., 2k]`` (little-endian, bit-exact)."""
    return np.ascontiguousarray(x, dtype="<f2").view(np.uint8)


def _bytes_to_fp16(b: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 2k]`` -> float16 ``[..., k]`` (little-endian, bit-exact)."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float16)


def _rescale_norms(norms: np.ndarray, codes: np.ndarray, config: TurboQuantConfig, *, to_vllm: bool) -> np.ndarray:
    """Key norms between the two conventions of norm correction, float16 ``[..., 1]`` -> float16.

    vLLM stores ``||k||`` and renormalises ``c[codes]`` at decode time; tqjax stores
    ``||k|| / ||c[codes]||`` (see :mod:`tqjax.config`). The factor ``||c[codes]||`` (tqjax's codebook)
    is computed in float64 and the result rounded once to fp16 (saturating like the store).
    """
    if not config.norm_correction:
        return norms
    centroids = key_codec(config).quantizers[0].centroids.astype(np.float64)
    length = np.maximum(np.linalg.norm(centroids[codes], axis=-1, keepdims=True), 1e-30)
    x = norms.astype(np.float64) * length if to_vllm else norms.astype(np.float64) / length
    return np.minimum(x, FP16_MAX).astype(np.float16)


def to_vllm(cache: PagedKVCache) -> np.ndarray:
    """tqjax cache -> vLLM slot tensor, uint8 ``[num_blocks, block_size, num_kv_heads, slot_bytes]``.

    Raises ValueError if ``cache.config`` is not a preset vLLM ships.
    """
    config = cache.config
    slot_bytes = vllm_slot_bytes(config)
    d = config.head_dim
    key_words = np.asarray(cache.key_codes)  # uint32 [Hk, NB, BS, key_words]
    if config.key_format == "fp8":
        parts = [unpack_bytes_le(key_words)]
    else:
        (segment,) = config.key_segments
        key_codes = unpack_codes(key_words, segment.bits, segment.dim, xp=np)
        key_norm = _rescale_norms(np.asarray(cache.key_scales)[..., :1], key_codes, config, to_vllm=True)
        parts = [codes_to_vllm_stream(key_codes, segment.bits), _fp16_to_bytes(key_norm)]
    value_codes = unpack_codes(np.asarray(cache.value_codes), config.value_bits, d, xp=np)
    value_scale_zero = np.asarray(cache.value_scales)  # float16 [Hk, NB, BS, 2]
    parts += [codes_to_vllm_stream(value_codes, config.value_bits), _fp16_to_bytes(value_scale_zero)]
    used = sum(p.shape[-1] for p in parts)
    parts.append(np.zeros(value_codes.shape[:-1] + (slot_bytes - used,), np.uint8))  # pad: 0 or 1 zero byte
    slots = np.concatenate(parts, axis=-1)  # [Hk, NB, BS, slot_bytes]
    return np.ascontiguousarray(slots.transpose(1, 2, 0, 3))


def from_vllm(data: np.ndarray, config: TurboQuantConfig) -> PagedKVCache:
    """vLLM slot tensor uint8 ``[num_blocks, block_size, num_kv_heads, slot_bytes]`` -> tqjax cache.

    Raises ValueError if ``config`` is not a preset vLLM ships, or if ``data`` has the wrong dtype,
    rank or slot size, or a geometry tqjax cannot address (see :func:`tqjax.layout.check_addressable`).
    Pad bytes are ignored.
    """
    slot_bytes = vllm_slot_bytes(config)
    data = np.asarray(data)
    if data.dtype != np.uint8:
        raise ValueError(f"data must be a uint8 array (vLLM's raw slot bytes), got dtype {data.dtype}")
    if data.ndim != 4:
        raise ValueError(
            f"data must have rank 4 [num_blocks, block_size, num_kv_heads, slot_bytes], got shape {data.shape}"
        )
    if data.shape[-1] != slot_bytes:
        raise ValueError(
            f"data has {data.shape[-1]} bytes per slot, but {config.name} at head_dim {config.head_dim} "
            f"needs {slot_bytes} (shape {data.shape})"
        )
    num_blocks, block_size, num_kv_heads, _ = data.shape
    try:
        check_addressable(config, num_blocks, block_size, num_kv_heads)
    except ValueError as err:
        raise ValueError(f"data of shape {data.shape} is not a valid tqjax cache geometry: {err}") from err

    slots = data.transpose(2, 0, 1, 3)  # [Hk, NB, BS, slot_bytes]
    key_code_bytes, key_norm_bytes, value_code_bytes, value_scale_bytes = _field_sizes(config)
    bounds = np.cumsum([key_code_bytes, key_norm_bytes, value_code_bytes, value_scale_bytes])
    key_part, key_norm, value_part, value_scales, _ = np.split(slots, bounds, axis=-1)
    d = config.head_dim
    if config.key_format == "fp8":
        key_codes, key_scales = pack_bytes_le(key_part), None
    else:
        (segment,) = config.key_segments
        codes = vllm_stream_to_codes(key_part, segment.bits, segment.dim)
        key_codes = pack_codes(codes, segment.bits, xp=np)
        key_scales = jnp.asarray(_rescale_norms(_bytes_to_fp16(key_norm), codes, config, to_vllm=False))
    value_codes = pack_codes(vllm_stream_to_codes(value_part, config.value_bits, d), config.value_bits, xp=np)
    return PagedKVCache(
        key_codes=jnp.asarray(key_codes),
        key_scales=key_scales,
        value_codes=jnp.asarray(value_codes),
        value_scales=jnp.asarray(_bytes_to_fp16(value_scales)),
        config=config,
    )
