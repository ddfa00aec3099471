"""Fused TurboQuant quantize + paged store: one Pallas kernel per layer step.

``store(cache, key, value, slot_mapping)`` writes the same words and fp16 scalars as
:func:`tqjax.reference.store_reference` (bit for bit, tested) and updates the cache **in place**: the
jitted entry point donates the cache and the ``pallas_call`` aliases every cache array input to its
output, so XLA reuses the old buffers and never copies a cache.

Two kernels sit behind :func:`store` (``implementation``, :func:`choose_implementation`): this module's (Triton
lowering: CUDA, ROCm, interpret mode; every preset) and, on Hopper GPUs, :mod:`tqjax.pallas.store_mgpu`'s
(Mosaic GPU: MSE, split and QJL keys at head_dim 128, and at 64 all but the split ones, bf16 inputs; at 16k
tokens on the H200 1.4-1.7x faster than this kernel for MSE and split keys, 2.6-2.7x for QJL keys,
docs/PERFORMANCE.md), which is the default where it runs.

What runs where
---------------

* **MSE, split and QJL keys with a Hadamard rotation that fits shared memory: all in the kernel.**
  :meth:`tqjax.quantizers.TurboQuantMSE.quantize` and :meth:`tqjax.quantizers.TurboQuantProd.quantize` code these
  exactly (the quantizers' module docstring): the kernel reads the bf16 key, snaps each vector to its fixed-point
  grid, rotates the integers with one float16 tensor-core product against the +-1 matrix (float32 accumulation
  of integers below ``2**24``: exact in any order; :func:`tqjax.quantizers.exact_rotation`), and buckets
  ``z |z|`` against ``||n||**2 b |b| dim`` (correctly rounded products; a binary search over these sorted
  limits, ``_search_codes``): the reference's codes, bit for bit, with no XLA op before the kernel (split keys
  read each segment's run of channels from the raw key; calibrated outlier channels that are not one run are
  gathered by XLA first, one feature per segment). QJL keys go on (``_qjl_codes``): the residual
  ``w = z - c[codes] L`` (``L``, :func:`tqjax.quantizers.residual_length`, a correctly rounded square root
  rounded to 13 bits; ``c L`` exact), snapped to its grid and sketched by a second float16 product against
  ``S_int`` (:func:`tqjax.quantizers.exact_sketch`: integers again, exact), its signs packed as a 1-bit field.
  The square root is IEEE's (``_sqrt_rn``: ``arithmetic="cuda"``, PTX ``sqrt.rn``; the portable arithmetic,
  ROCm's, corrects ``jnp.sqrt`` by integer steps, :func:`tqjax.quantizers.correctly_rounded_sqrt`: a compiled
  Triton ``jnp.sqrt`` is not correctly rounded, and moved ``L`` for 0.08% of inputs on the H200).
  The kernel also writes int32 statistics per vector (``||n||**2`` and the grid's exponent field per segment;
  for QJL keys also ``||w_int||**2`` and the residual grid's field) and, for MSE and split keys, the packed key
  words once more, row by row; after the kernel XLA turns them into the fp16 key norms (and QJL's ``gamma``)
  with the quantizers' own functions (``grid_norm``, ``stored_norm`` of the unpacked codes,
  ``residual_grid_norm``: the reference's float32 ops on the same integers) and scatters them into
  ``key_scales`` (a few bytes per vector, in place).

  "Fits": one part's float16 ``[dim, dim]`` matrix and a ``[T, dim]`` operand, :func:`rotation_shared_memory`,
  within the GPU's shared memory per program (:attr:`tqjax.platform.Platform.shared_memory_per_block`; a QJL
  key's two matrices are read one after the other). So head_dim 128 runs in the kernel on every GPU (49 KB at
  most, AMD's 64 KB included), 256 on Hopper and A100 (147 KB) but not on GPUs of 99 KB (sm86, sm89) or AMD's
  64 KB, and 512 nowhere but as the split presets' two 256-dim segments. Interpret mode plans as a Hopper GPU.
* **Wider Hadamard segments and Haar rotations: XLA encodes the key before the kernel** with
  the reference's own function (``KeyCodec.encode``: the rotation, a QJL residual and its sketch, the
  codes, the packing and the fp16 norms), so the words are the reference's bits; the kernel copies the
  packed words (``Wk / 32`` of the bytes a float32 feature would take) into the pages. (A Haar rotation's float
  codes and sketch depend on how a compiler orders its sums, so only XLA computes them.)
* **The kernel, in every case:** float8 e4m3 conversion of raw keys (``arithmetic``: the hardware's,
  or integer bit arithmetic; both round to nearest even, bit-exact with XLA's convert), the complete
  value quantization (fp16 clamp, min/max, fp16 scale and zero, reciprocal, rounded codes, clip), bit
  packing of every field it computes into uint32 words, and the scatter of words and scales into the
  pages ``[h, slot // block_size, slot % block_size, word]`` with per-dimension ref indexing (the
  Triton lowering multiplies by the strides, in int64 for arrays over 4 GiB; no flat offset is formed
  here). Inputs are read once; only the packed cache words (and, for exact keys, the statistics and, for
  MSE and split keys, a row-major copy of the key words) are written.

Grid: ``(cdiv(N, T), Hk)``, one program per tile of ``T`` tokens and one KV head
----------------------------------------------------------------------------------

``T = min(block_tokens, next_pow2(N))`` (default ``block_tokens = 32``; at least 16 with an in-kernel
rotation, whose tensor-core product needs 16 rows). A program loads ``[T, D]``
tiles (contiguous rows of ``D`` elements, strided by ``Hk * D``), so a prefill store
(``N >= 4096``) has thousands of programs of a few tens of KB each, enough to fill an H100's 132 SMs
several times over with wide coalesced loads, while a decode store (``N`` = batch, tiny) still gets
``Hk`` programs and a tile shrunk to the batch (no wasted lanes for ``N = 1``). The token axis is the
fastest-varying grid axis, so consecutive programs write consecutive slots of one head's pages when
the slots are contiguous (prefill), and every store is a row of ``words`` consecutive uint32.

Padding and the tail tile. Token ``n`` is stored iff ``n < N`` and ``0 <= slot < num_slots`` (slots
outside the cache are dropped, like the reference inside jit). Rows of a tile that are not stored
are *redirected to the first stored row of the tile* (same source row, same destination), so every
load and store is in bounds and unmasked, and a redirected row rewrites exactly the bytes of the row
it copies (benign, identical values); a tile with no stored row does nothing (``pl.when``). This also
keeps the interpret mode exact, whose scatter with duplicate indices is only deterministic when the
duplicates carry equal values.

Power-of-two shapes. All in-kernel arrays are ``[T, 2^k]``: head_dim must be a power of two (64, 128,
256, ...; other head dims raise ``NotImplementedError`` here, use the reference backend), and each
bit field of a power-of-two vector is a power-of-two number of words, so a 3-bit key (12 words at
D = 128) is stored as its 2-bit field (8 words) and its 1-bit field (4 words).

Rounding-exact value arithmetic
-------------------------------

:func:`tqjax.quantizers.quantize_values` is written so that every value is one IEEE-rounded operation
on already-rounded operands (no multiply feeding an add, no division by a constant), so no compiler
can rewrite it; the kernel performs the same operations::

    scale = f16((hi - lo) * f32(1 / levels));  zero = f16(lo)
    inv   = 1 / where(scale > 0, scale, 1)
    code  = clip(round_half_away((v - zero) * inv), 0, levels)

``inv`` is read from :func:`tqjax.quantizers.fp16_reciprocals` (indexed by the fp16 bits of the
scale), never divided: Triton and XLA's GPU backend both lower a float32 division to an approximate
one on CUDA, a table is the same everywhere (CUDA, ROCm, interpret). ``round_half_away``: Pallas'
Triton lowering has no rule for
``jax.lax.round``, so the kernel uses :func:`round_half_up`, computed exactly (or, with
``arithmetic="cuda"``, the same function in one PTX block: ``_value_codes``), which gives the same
code for every ``t`` (the two differ only where the clip maps both to 0 or ``levels``). Conversions
to fp16 are round-to-nearest-even in both compilers.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from tqjax import reference
from tqjax.codec import fp16_norm, key_codec, take_channels
from tqjax.config import TurboQuantConfig, is_power_of_two
from tqjax.layout import PagedKVCache
from tqjax.packing import WORD_BITS, bit_fields
from tqjax.platform import Platform, detect_platform
from tqjax.quantizers import (
    FP8_E4M3_MAX,
    FP16_MAX,
    MSECode,
    correctly_rounded_sqrt,
    exact_rotation,
    exact_sketch,
    fp16_reciprocals,
    grid_norm,
    residual_grid_norm,
    residual_length,
    round_half_up,
)
from tqjax.reference import _slot_writer, check_store_inputs

__all__ = [
    "ARITHMETIC",
    "DEFAULT_BLOCK_TOKENS",
    "IMPLEMENTATIONS",
    "check_kernel_config",
    "choose_implementation",
    "fp8_e4m3fn_bits",
    "round_half_up",
    "store",
    "store_arithmetic",
    "store_jit",
    "store_reference",
]

#: The ground truth, beside the kernel (JAX ops style): same signature, pure jnp.
store_reference = reference.store_reference

DEFAULT_BLOCK_TOKENS = 32

#: How the kernel converts: "portable" (integer and float32 operations every Triton target and the
#: interpreter lower alike) or "cuda" (NVIDIA sm_89 and later, compiled only: the hardware's float8
#: e4m3 conversion for fp8 keys and one inline PTX block for the value codes' rounding). Same bits.
ARITHMETIC = ("portable", "cuda")


def store_arithmetic(interpret: bool, platform: Platform | None = None) -> str:
    """The kernel's :data:`ARITHMETIC` for this platform: "cuda" for compiled kernels on NVIDIA GPUs
    that convert float8 e4m3fn in hardware (sm_89 and later), else "portable"."""
    platform = platform or detect_platform()
    return "cuda" if not interpret and platform.kind == "cuda" and platform.fp8_e4m3 == "fn" else "portable"


# ---- in-kernel helpers ---------------------------------------------------------------------------


def fp8_e4m3fn_bits(x: jax.Array) -> jax.Array:
    """uint32 holding the float8 e4m3fn byte of float32 ``x`` (already clipped to +-448), RNE.

    Integer bit arithmetic only (no fp8 types), so it lowers anywhere and matches XLA's
    ``astype(float8_e4m3fn)`` bit for bit for every non-NaN input (tested exhaustively over bf16/f16
    inputs and on random float32). NaN gives ``0x7F | sign``; XLA's byte for a NaN depends on how it
    fuses the converts, so NaN keys are not part of the bit-exactness contract.
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    # Normal results (|x| >= 2^-6): round the 23-bit mantissa to 3 bits, nearest-even (a carry
    # propagates into the exponent), then rebias the exponent from 127 to 7.
    rounded = mag + 0x7FFFF + ((mag >> 20) & 1)
    normal = (rounded >> 20) - (120 << 3)
    # Subnormal results (|x| < 2^-6): |x| * 2^9 rounded to an integer (8 is the smallest normal, 0x08).
    # Scaling by 2^9 is exact and adding 2^23 rounds to an integer, nearest-even, in float32.
    magnitude = jax.lax.bitcast_convert_type(mag, jnp.float32)
    shifted = magnitude * 512.0 + 8388608.0
    subnormal = jax.lax.bitcast_convert_type(shifted, jnp.uint32) - 0x4B000000
    byte = jnp.where(mag >= 0x3C800000, normal, subnormal)
    byte = jnp.where(mag > 0x7F800000, jnp.uint32(0x7F), byte)  # NaN
    return byte | sign


def _pack_field(codes: jax.Array, width: int, shift: int) -> jax.Array:
    """Field ``(width, shift)`` of uint32 codes [T, n] packed into words [T, n * width / 32]."""
    t, n = codes.shape
    per_word = WORD_BITS // width
    field = codes >> shift if shift else codes
    if width < WORD_BITS:
        field = field & ((1 << width) - 1)
    field = field.reshape(t, n // per_word, per_word)
    lanes = jax.lax.broadcasted_iota(jnp.int32, (1, 1, per_word), 2).astype(jnp.uint32) * width
    # The lanes occupy disjoint bits, so the sum is a bitwise OR.
    return jnp.sum(field << lanes, axis=2, dtype=jnp.uint32)


def _value_codes(t: jax.Array, levels: int, arithmetic: str) -> jax.Array:
    """``clip(round_half_up(t), 0, levels)`` as uint32 (``tqjax.quantizers.quantize_values``).

    "cuda": ``floor(t + 1/2)`` with the addition rounded toward minus infinity (``add.rm``) and the
    floor a saturating conversion (``cvt.rmi.s32``), in one PTX block, then an integer clip. Exact:
    ``k + 1`` is a float32 for every integer code, so rounding ``t + 1/2`` down never crosses it, and
    ``floor`` of the rounded sum is ``floor`` of the exact one, i.e. ``round_half_up(t)``. Four
    instructions per element against ten for the portable form (``floor``, the tie test, the clip,
    and the guards Pallas adds around a float-to-unsigned conversion). An explicit rounding mode also
    keeps ptxas from fusing the addition with the product that formed ``t``.
    """
    if arithmetic == "cuda":
        (r,) = pltriton.elementwise_inline_asm(
            "{ .reg .f32 s; add.rm.f32 s, $1, 0f3F000000; cvt.rmi.s32.f32 $0, s; }",
            args=[t], constraints="=r,f", pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(t.shape, jnp.int32)],
        )
        return jnp.clip(r, 0, levels).astype(jnp.uint32)
    return jnp.clip(round_half_up(t), 0, levels).astype(jnp.uint32)


def _fp8_codes(x: jax.Array, arithmetic: str) -> jax.Array:
    """uint32 float8 e4m3fn bytes of key elements ``x`` (XLA's ``clip(x, +-448).astype(float8_e4m3fn)``).

    "cuda": the hardware conversion (sm_89+: ``F2FP.SATFINITE.E4M3``, round-to-nearest-even, as XLA's
    convert); "portable": :func:`fp8_e4m3fn_bits`, integer bit arithmetic."""
    x = jnp.clip(x.astype(jnp.float32), -FP8_E4M3_MAX, FP8_E4M3_MAX)
    if arithmetic == "cuda":
        return jax.lax.bitcast_convert_type(x.astype(jnp.float8_e4m3fn), jnp.uint8).astype(jnp.uint32)
    return fp8_e4m3fn_bits(x)


# ---- the static plan of one configuration ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _KeyPart:
    """One run of a key's packed words. ``kind``: "fp8" (the raw key, converted in the kernel), "grid"
    (exact Hadamard codes of one segment, rotated and bucketized in the kernel, ``dim`` channels,
    ``bits`` per code), "qjl" (exact QJL keys: the ``bits``-bit MSE codes from ``word_start`` and the
    sketch's signs from ``sign_word_start``, all in the kernel) or "words" (``dim`` words packed by XLA,
    copied by the kernel); read from feature ``feature``."""

    kind: str
    feature: int
    dim: int
    bits: int
    word_start: int
    # "grid" and "qjl" parts (exact Hadamard codes, tqjax.quantizers): grid bits and squared boundaries t_j
    grid_bits: int = 0
    thresholds: tuple[float, ...] = ()
    segment: int = 0  # "grid": the key segment (its quantizer)
    column: int = 0  # "grid": the segment's first channel in its feature (the raw key, when contiguous)
    sign_word_start: int = 0  # "qjl": the signs' first word
    sketch_grid_bits: int = 0  # "qjl": the residual's grid (tqjax.quantizers.qjl_grid_bits)

    @property
    def num_stats(self) -> int:
        """int32 statistics a row of this part leaves for XLA's norms: (||n||**2, field), and for "qjl"
        also (||w_int||**2, the residual's field)."""
        return {"grid": 2, "qjl": 4}.get(self.kind, 0)

    @property
    def num_tables(self) -> int:
        """Constant inputs of this part: the rotation's ``M^T``; for "qjl" also ``S_int^T`` and, with MSE
        codes, the centroids."""
        return {"grid": 1, "qjl": 2 + (self.bits > 0)}.get(self.kind, 0)


def _key_parts(config: TurboQuantConfig, tile: int, shared_memory: int) -> tuple[_KeyPart, ...]:
    """The kernel's plan for ``config``'s keys: exact Hadamard codes ("grid", "qjl") in the kernel where every
    quantizer is exact and its rotation fits ``shared_memory`` bytes at ``tile`` rows
    (:func:`rotation_shared_memory`); otherwise fp8 or XLA's packed words."""
    codec = key_codec(config)
    if config.key_format == "fp8":
        return (_KeyPart("fp8", 0, config.head_dim, 8, 0),)
    exact = _exact_parts(config)
    if exact and max(rotation_shared_memory(part.dim, tile) for part in exact) <= shared_memory:
        return exact
    # XLA's packed words (KeyCodec.encode), in runs of power-of-two lengths (the kernel's tiles)
    parts, start = [], 0
    for k in reversed(range(config.key_words.bit_length())):
        if config.key_words & (1 << k):
            parts.append(_KeyPart("words", 0, 1 << k, 32, start))
            start += 1 << k
    return tuple(parts)


def _exact_parts(config: TurboQuantConfig) -> tuple[_KeyPart, ...]:
    """MSE, split and QJL keys whose every quantizer takes the exact Hadamard path: their "grid" or "qjl" parts
    (read from the raw key, or from XLA's gather of each segment's channels: :func:`_reads_raw_key`); else ()."""
    codec = key_codec(config)
    if config.key_format == "prod":
        p = codec.prod
        if not p.exact:
            return ()
        return (_KeyPart(
            "qjl", 0, p.dim, p.bits - 1, 0, grid_bits=p.grid_bits,
            thresholds=tuple(map(float, p.mse.thresholds)) if p.mse is not None else (),
            sign_word_start=codec.segments[-1].word_start, sketch_grid_bits=p.sketch_grid_bits,
        ),)
    if config.key_format not in ("mse", "split") or not all(q.exact for q in codec.quantizers.values()):
        return ()
    raw = _reads_raw_key(config)
    return tuple(
        _KeyPart(
            "grid", 0 if raw else i, seg.dim, seg.bits, seg.word_start, grid_bits=codec.quantizers[i].grid_bits,
            thresholds=tuple(map(float, codec.quantizers[i].thresholds)), segment=i,
            column=seg.channel_run if raw else 0,
        )
        for i, seg in enumerate(codec.segments)
    )


def _part_tables(config: TurboQuantConfig, part: _KeyPart) -> list[jax.Array]:
    """The constant inputs of ``part`` (:attr:`_KeyPart.num_tables`): float16 ``M^T`` [dim, dim]; for "qjl"
    also float16 ``S_int^T`` [dim, dim] and the float32 centroids [2**bits]."""
    codec = key_codec(config)
    if part.kind == "grid":
        return [jnp.asarray(codec.quantizers[part.segment].pm1.T, jnp.float16)]
    if part.kind == "qjl":
        p = codec.prod
        tables = [jnp.asarray(p.pm1.T, jnp.float16), jnp.asarray(p.sketch_matrix.T, jnp.float16)]
        return tables + ([jnp.asarray(p.mse.centroids)] if part.bits else [])
    return []


#: The shared memory per program the kernel plans for where no GPU says how much it has (interpret mode, lowering
#: ahead of time): an H100's or H200's (:attr:`tqjax.platform.Platform.shared_memory_per_block`).
PLANNING_SHARED_MEMORY = 227 * 1024


def rotation_shared_memory(dim: int, tile: int) -> int:
    """Bytes of shared memory the kernel's products of one part take: its float16 [dim, dim] matrix and a
    [tile, dim] operand, as float32 to be safe. An upper bound of the sm_90 static counts
    (``experiments.static_sass``: 40960 B at dim 128 and 32 rows, 139264 at 256 and 16 rows, every exact preset,
    the QJL keys' two matrices in turn); the parts of a split key run one after the other and reuse it. At dim
    512, 1 MB: such keys take XLA's words everywhere; at 256, 147 KB: in the kernel on Hopper and A100, not on
    GPUs with 99 KB (sm86, sm89) or AMD's 64 KB."""
    return 2 * dim * dim + 4 * tile * dim


def _reads_raw_key(config: TurboQuantConfig) -> bool:
    """Exact Hadamard keys whose every segment is a contiguous run of channels (the default split and all
    MSE presets): the kernel reads them from the raw key, so XLA copies nothing before it. Calibrated
    outlier channels (any set) are gathered by XLA into one feature per segment instead."""
    return all(seg.channel_run is not None for seg in key_codec(config).segments)


def _key_features(
    config: TurboQuantConfig, parts: tuple[_KeyPart, ...], key: jax.Array
) -> tuple[list[jax.Array], jax.Array | None]:
    """The XLA half of the key encoding: what the kernel does not compute of ``KeyCodec.encode``:
    ``(features, new_key_scales)``. fp8 and exact keys (``parts`` of :func:`_key_parts`): the raw key channels,
    no scales (the kernel's statistics give them); other keys: ``KeyCodec.encode`` itself (words and fp16
    scales), on the same shapes as the reference, so every value here has the reference's bits."""
    codec = key_codec(config)
    if parts[0].kind == "fp8":
        return [key], None  # converted to fp8 in the kernel
    if parts[0].kind in ("grid", "qjl"):  # snapped, rotated, bucketized (and sketched) in the kernel; norms after it
        if _reads_raw_key(config):
            return [key], None
        return [take_channels(key, seg) for seg in codec.segments], None
    words, scales = codec.encode(key)  # wide segments, Haar rotations: the reference's words
    return [words], scales


def _tile(n: int, block_tokens: int, rotates: bool) -> int:
    """Tokens per program: ``block_tokens`` or the batch's next power of two, at least 16 for an in-kernel rotation
    (its tensor-core product needs 16 rows)."""
    tile = min(block_tokens, pl.next_power_of_2(n))
    return max(tile, 16) if rotates else tile


def _plan(config: TurboQuantConfig, n: int, block_tokens: int, shared_memory: int) -> tuple[_KeyPart, ...]:
    """:func:`_key_parts` for ``n`` tokens, at the tile an in-kernel rotation would have."""
    return _key_parts(config, _tile(n, block_tokens, rotates=True), shared_memory)


def _sqrt_rn(x: jax.Array, arithmetic: str) -> jax.Array:
    """IEEE's correctly rounded float32 square root in the kernel: "cuda", ``sqrt.rn.f32`` in PTX; otherwise
    :func:`tqjax.quantizers.correctly_rounded_sqrt` of ``jnp.sqrt`` (integer steps that correct a root within 3
    ulps: a compiled Triton ``jnp.sqrt`` is not correctly rounded, and moved
    :func:`tqjax.quantizers.residual_length` for 0.08% of inputs on the H200)."""
    if arithmetic == "cuda":
        (r,) = pltriton.elementwise_inline_asm(
            "sqrt.rn.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
        )
        return r
    return correctly_rounded_sqrt(x)


# ---- the kernel ------------------------------------------------------------------------------------


def _store_kernel(
    *refs,
    parts: tuple[_KeyPart, ...],
    num_features: int,
    has_new_key_scales: bool,
    num_cache: int,
    num_tokens: int,
    tile: int,
    block_size: int,
    num_slots: int,
    head_dim: int,
    value_bits: int,
    arithmetic: str,
):
    num_tables = sum(part.num_tables for part in parts)
    has_stats = any(part.num_stats for part in parts)
    has_words_copy = any(part.kind == "grid" for part in parts)
    slot_ref, reciprocals_ref, *rest = refs
    table_refs, rest = rest[:num_tables], rest[num_tables:]
    feature_refs, rest = rest[:num_features], rest[num_features:]
    if has_new_key_scales:
        new_key_scales_ref, value_ref, *rest = rest
    else:
        new_key_scales_ref = None
        value_ref, *rest = rest
    outs = rest[num_cache:]  # aliased to the inputs rest[:num_cache]; only the outputs are written
    words_ref = outs.pop() if has_words_copy else None
    stats_ref = outs.pop() if has_stats else None
    if num_cache == 4:
        key_codes_ref, key_scales_ref, value_codes_ref, value_scales_ref = outs
    else:
        key_codes_ref, value_codes_ref, value_scales_ref = outs
        key_scales_ref = None

    tile_start = pl.program_id(0) * tile
    head = pl.program_id(1)
    lane = jax.lax.broadcasted_iota(jnp.int32, (tile,), 0)
    rows = tile_start + lane
    slots = slot_ref[jnp.minimum(rows, num_tokens - 1)]
    valid = (rows < num_tokens) & (slots >= 0) & (slots < num_slots)

    @pl.when(jnp.max(valid.astype(jnp.int32)) > 0)
    def _():
        # Rows not stored copy the first stored row of the tile (source and destination alike).
        first = jnp.min(jnp.where(valid, lane, tile))
        src = tile_start + jnp.where(valid, lane, first)
        slot = slot_ref[src]
        block = slot // block_size
        offset = slot % block_size

        def rows(start: int, width: int) -> tuple[jax.Array, ...]:  # index of [src, head, start:+width]
            shape = (tile, width)
            cols = start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
            return jnp.broadcast_to(src[:, None], shape), jnp.broadcast_to(head, shape), cols

        def load(ref, width: int, start: int = 0) -> jax.Array:  # ref[src, head, start:+width] -> [tile, width]
            return ref[rows(start, width)]

        def put(ref, start: int, val: jax.Array) -> None:  # ref[head, block, offset, start:+W] = val
            shape = val.shape
            cols = start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
            idx = (
                jnp.broadcast_to(head, shape),
                jnp.broadcast_to(block[:, None], shape),
                jnp.broadcast_to(offset[:, None], shape),
                cols,
            )
            ref[idx] = val.astype(ref.dtype)

        def put_row(ref, start: int, val: jax.Array) -> None:  # ref[src, head, start:+W] = val
            ref[rows(start, val.shape[1])] = val

        def put_fields(ref, word_start: int, codes: jax.Array, bits: int, copy_ref=None) -> None:
            start = word_start
            for width, shift in bit_fields(bits):
                words = _pack_field(codes, width, shift)
                put(ref, start, words)
                if copy_ref is not None:  # the packed words once more, row by row, for XLA after the kernel
                    put_row(copy_ref, start, words)
                start += words.shape[1]

        # ---- keys
        tables = iter(table_refs)
        stats_column = 0
        for part in parts:
            if part.kind == "words":  # packed by XLA
                put(key_codes_ref, part.word_start, feature_refs[part.feature][rows(part.word_start, part.dim)])
                continue
            x = load(feature_refs[part.feature], part.dim, part.column)
            if part.kind == "fp8":
                put_fields(key_codes_ref, part.word_start, _fp8_codes(x, arithmetic), part.bits)
                continue
            if part.kind == "grid":
                codes, stats = _grid_codes(x, next(tables)[...], part)
                put_fields(key_codes_ref, part.word_start, codes, part.bits, words_ref)
            else:  # "qjl"
                matrix_ref, sketch_ref = next(tables), next(tables)
                centroids_ref = next(tables) if part.bits else None
                codes, signs, stats = _qjl_codes(x, matrix_ref, sketch_ref, centroids_ref, part, arithmetic)
                if part.bits:
                    put_fields(key_codes_ref, part.word_start, codes, part.bits)
                put_fields(key_codes_ref, part.sign_word_start, signs, 1)
            put_row(stats_ref, stats_column, stats)
            stats_column += part.num_stats
        if has_new_key_scales:
            put(key_scales_ref, 0, load(new_key_scales_ref, key_scales_ref.shape[-1]))

        # ---- values: tqjax.quantizers.quantize_values, one IEEE-rounded operation at a time
        levels = (1 << value_bits) - 1
        v = jnp.clip(load(value_ref, head_dim).astype(jnp.float32), -FP16_MAX, FP16_MAX)
        lo = jnp.min(v, axis=1)
        hi = jnp.max(v, axis=1)
        scale = ((hi - lo) * np.float32(1.0 / levels)).astype(jnp.float16)
        zero = lo.astype(jnp.float16)
        inv = reciprocals_ref[jax.lax.bitcast_convert_type(scale, jnp.uint16).astype(jnp.int32)]
        t = (v - zero.astype(jnp.float32)[:, None]) * inv[:, None]
        codes = _value_codes(t, levels, arithmetic)
        put_fields(value_codes_ref, 0, codes, value_bits)
        pair = jax.lax.broadcasted_iota(jnp.int32, (tile, 2), 1)
        put(value_scales_ref, 0, jnp.where(pair == 0, scale[:, None], zero[:, None]))


def _columns(*values: jax.Array) -> jax.Array:
    """int32 [T] vectors side by side as [T, len(values)] (a power of two: the kernel's row stores)."""
    col = jax.lax.broadcasted_iota(jnp.int32, (values[0].shape[0], len(values)), 1)
    out = values[-1][:, None]
    for i in reversed(range(len(values) - 1)):
        out = jnp.where(col == i, values[i][:, None], out)
    return out


def _grid_codes(x: jax.Array, matrix_t: jax.Array, part: _KeyPart) -> tuple[jax.Array, jax.Array]:
    """The exact Hadamard code of key rows ``x`` [T, dim] (``TurboQuantMSE.quantize``, in the kernel).

    ``matrix_t`` is ``M^T`` [dim, dim] float16 (+-1). Returns the codes [T, dim] uint32 and int32 [T, 2]
    rows ``(||n||**2, grid field)`` for the norms XLA forms after the kernel. The rotation
    (:func:`tqjax.quantizers.exact_rotation`) is one float16 tensor-core product of integers, exact; the
    search compares correctly rounded products (``tqjax.quantizers.exact_bucketize``).
    """
    z, n2, field = exact_rotation(x, part.grid_bits, matrix_t)
    codes = _search_codes(z * jnp.abs(z), n2.astype(jnp.float32)[:, None], part.thresholds)
    return codes, _columns(n2, field)


def _qjl_codes(
    x: jax.Array, matrix_ref, sketch_ref, centroids_ref, part: _KeyPart, arithmetic: str
) -> tuple[jax.Array | None, jax.Array, jax.Array]:
    """The exact QJL code of key rows ``x`` [T, dim] (``TurboQuantProd.quantize``, in the kernel).

    ``matrix_ref`` ``M^T`` and ``sketch_ref`` ``S_int^T`` are float16 [dim, dim] (each read where its product needs
    it: one matrix in shared memory at a time); ``centroids_ref`` the MSE stage's
    float32 centroids [2**bits] (None without MSE codes). Returns the MSE codes [T, dim] uint32 (None without),
    the signs [T, dim] uint32 and int32 [T, 4] rows ``(||n||**2, field, ||w_int||**2, the residual's field)``
    for the norm and ``gamma`` XLA forms after the kernel. Both products are float16 tensor-core products of
    integers (exact); ``L`` is a correctly rounded square root (:func:`_sqrt_rn`) rounded to 13
    bits, ``c L`` exact, ``w = z - c L`` one rounded difference: the reference's ``w``, bit for bit.
    """
    z, n2, field = exact_rotation(x, part.grid_bits, matrix_ref[...])
    length = residual_length(n2, part.dim, functools.partial(_sqrt_rn, arithmetic=arithmetic))
    codes = None
    w = z
    if part.bits:
        codes = _search_codes(z * jnp.abs(z), n2.astype(jnp.float32)[:, None], part.thresholds)
        w = z - centroids_ref[codes.astype(jnp.int32)] * length[:, None]
    positive, w2, w_field = exact_sketch(w, part.sketch_grid_bits, sketch_ref[...])
    return codes, positive.astype(jnp.uint32), _columns(n2, field, w2, w_field)


def _search_codes(signed_square: jax.Array, scale: jax.Array, thresholds: tuple[float, ...]) -> jax.Array:
    """``sum_j [signed_square > scale * t_j]`` (``exact_bucketize``) by binary search, uint32.

    ``scale`` >= 0, so the limits ``scale * t_j`` (each one correctly rounded product, as in the
    reference) are sorted like the thresholds, and the count of limits below an element is found in
    ``bits`` comparisons instead of ``2**bits - 1`` (:func:`_count_below`). Lloyd--Max thresholds are
    odd (``t_j = -t_{2h-2-j}``, the middle one 0; every preset's, checked on the host): then the sign
    of the element gives the top bit and one search over the ``h - 1`` positive limits ``A_k`` of
    ``u = |s|`` the rest, ``h + #{A_k < u}`` for ``s > 0`` and ``h - 1 - #{A_k <= u}`` otherwise
    (``s > -A_k`` iff ``u < A_k``; rounding is odd, so ``scale * (-t) = -(scale * t)`` exactly). The
    two comparisons are one on the bit patterns of these non-negative floats (ordered as integers):
    ``bits(u) + [s <= 0] > bits(A_k)``.
    """
    n = len(thresholds) + 1
    t = np.asarray(thresholds, np.float32)
    if n < 2 or not (np.array_equal(t, -t[::-1]) and t[n // 2 - 1] == 0):
        return _count_below(signed_square, lambda limit: signed_square > scale * limit, thresholds)
    half = np.uint32(n // 2)
    up = signed_square > 0
    magnitude = jax.lax.bitcast_convert_type(signed_square, jnp.int32) & np.int32(0x7FFFFFFF)
    key = magnitude + jnp.where(up, 0, 1)

    def above(limit: np.float32) -> jax.Array:
        return key > jax.lax.bitcast_convert_type(scale * limit, jnp.int32)

    count = _count_below(signed_square, above, thresholds[n // 2:])
    return jnp.where(up, half + count, half - np.uint32(1) - count)


def _count_below(like: jax.Array, above, limits: tuple[float, ...]) -> jax.Array:
    """``sum_j above(limits[j])`` for ascending ``limits`` (``2**m - 1`` of them; ``above`` monotone:
    true for a prefix of them), in ``m`` calls: level k adds ``2**(m-1-k)`` where the element is above
    the middle limit of its current range, chosen from the constants by a select tree on the bits
    found so far (``2**k - 1`` selects), uint32 shaped like ``like``."""
    bits = (len(limits) + 1).bit_length() - 1
    codes = jnp.zeros(like.shape, jnp.uint32)
    for level in range(bits):
        step = 1 << (bits - 1 - level)
        # the range [code, code + 2 step) has middle limit t[code + step - 1]; code = k * 2 step
        options = [np.float32(limits[k * 2 * step + step - 1]) for k in range(1 << level)]
        selector = 2 * step
        while len(options) > 1:  # select on the bits of k, lowest first
            bit = (codes & selector) != 0
            options = [jnp.where(bit, hi, lo) for lo, hi in zip(options[0::2], options[1::2])]
            selector *= 2
        codes = codes + jnp.where(above(options[0]), np.uint32(step), np.uint32(0))
    return codes


def _store_impl(
    cache: PagedKVCache,
    key: jax.Array,
    value: jax.Array,
    slot_mapping: jax.Array,
    *,
    interpret: bool = False,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    num_warps: int = 4,
    num_stages: int = 1,
    arithmetic: str = "portable",
    shared_memory: int = PLANNING_SHARED_MEMORY,
) -> PagedKVCache:
    if key.shape[0] == 0:
        return cache
    parts = _plan(cache.config, key.shape[0], block_tokens, shared_memory)
    features, new_key_scales = _key_features(cache.config, parts, key)
    return _store_call(
        cache,
        parts,
        features,
        new_key_scales,
        value,
        slot_mapping,
        interpret=interpret,
        block_tokens=block_tokens,
        num_warps=num_warps,
        num_stages=num_stages,
        arithmetic=arithmetic,
    )


def _store_call(
    cache: PagedKVCache,
    parts: tuple[_KeyPart, ...],
    features: list[jax.Array],
    new_key_scales: jax.Array | None,
    value: jax.Array,
    slot_mapping: jax.Array,
    *,
    interpret: bool,
    block_tokens: int,
    num_warps: int,
    num_stages: int,
    arithmetic: str = "portable",
) -> PagedKVCache:
    """The kernel half of ``parts`` (:func:`_key_parts`): ``pallas_call`` on the XLA half's ``features``
    (``[N, Hk, dim]``: the raw key channels for fp8 and exact keys, packed key words uint32 ``[N, Hk, Wk]``
    otherwise) and ``new_key_scales`` ``[N, Hk, nk]`` fp16 (None where the kernel's statistics give them, or
    without key scales). Exact keys get their fp16 norms after the kernel, from its integer statistics, by the
    quantizers' own XLA functions (so bit for bit the reference's)."""
    cfg = cache.config
    n = value.shape[0]
    num_stats = sum(part.num_stats for part in parts)
    has_words_copy = any(part.kind == "grid" for part in parts)
    tile = _tile(n, block_tokens, rotates=num_stats > 0)
    cache_in = [cache.key_codes] + ([cache.key_scales] if cache.key_scales is not None else []) + [
        cache.value_codes,
        cache.value_scales,
    ]
    tables = [table for part in parts for table in _part_tables(cfg, part)]
    inputs = [slot_mapping.astype(jnp.int32), jnp.asarray(fp16_reciprocals()), *tables, *features]
    if new_key_scales is not None:
        inputs.append(new_key_scales)
    inputs.append(value)
    first_cache = len(inputs)
    inputs += cache_in
    out_shape = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in cache_in]
    if num_stats:  # per token and head: the integer statistics of every rotated part (_KeyPart.num_stats)
        out_shape.append(jax.ShapeDtypeStruct((n, cache.num_kv_heads, num_stats), jnp.int32))
    if has_words_copy:  # and the packed key words, row by row (the norm correction's codes)
        out_shape.append(jax.ShapeDtypeStruct((n, cache.num_kv_heads, cfg.key_words), jnp.uint32))
    kernel = functools.partial(
        _store_kernel,
        parts=parts,
        num_features=len(features),
        has_new_key_scales=new_key_scales is not None,
        num_cache=len(cache_in),
        num_tokens=n,
        tile=tile,
        block_size=cache.block_size,
        num_slots=cache.num_slots,
        head_dim=cfg.head_dim,
        value_bits=cfg.value_bits,
        arithmetic=arithmetic,
    )
    out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, tile), cache.num_kv_heads),
        out_shape=out_shape,
        input_output_aliases={first_cache + i: i for i in range(len(cache_in))},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"tqjax_store_{cfg.name}_d{cfg.head_dim}_t{tile}",
    )(*inputs)
    out = list(out)
    words = out.pop() if has_words_copy else None
    stats = out.pop() if num_stats else None
    if cache.key_scales is not None:
        key_codes, key_scales, value_codes, value_scales = out
    else:
        (key_codes, value_codes, value_scales), key_scales = out, None
    if num_stats:
        key_scales = _kernel_key_scales(cache, parts, key_scales, stats, words, slot_mapping)
    return PagedKVCache(
        key_codes=key_codes, key_scales=key_scales, value_codes=value_codes, value_scales=value_scales, config=cfg
    )


def _kernel_key_scales(
    cache: PagedKVCache,
    parts: tuple[_KeyPart, ...],
    key_scales: jax.Array,
    stats: jax.Array,
    words: jax.Array | None,
    slot_mapping: jax.Array,
) -> jax.Array:
    """XLA after the kernel, for exact (MSE, split and QJL) ``parts``: their fp16 norms from the kernel's integer
    ``stats`` [N, Hk, sum of num_stats] int32 (and, for MSE keys, the row-major packed ``words`` [N, Hk, Wk]
    uint32), by the quantizers' own functions (bit for bit the reference's), scattered into ``key_scales`` at
    ``slot_mapping`` in place."""
    cfg = cache.config
    codec = key_codec(cfg)
    scales, column = [], 0
    for part in parts:
        if not part.num_stats:
            continue
        n2, field = stats[..., column], stats[..., column + 1]
        if part.kind == "grid":
            q = codec.quantizers[part.segment]
            code = MSECode(codec.segment_codes(words, cfg.key_segments[part.segment]), grid_norm(n2, field))
            scales.append(fp16_norm(q.stored_norm(code)))  # as KeyCodec.encode: the reference's ops
        else:  # "qjl": (norm, gamma), as TurboQuantProd.quantize and KeyCodec.encode
            gamma = residual_grid_norm(stats[..., column + 2], stats[..., column + 3], residual_length(n2, part.dim))
            scales += [fp16_norm(grid_norm(n2, field)), fp16_norm(gamma)]
        column += part.num_stats
    return _slot_writer(cache, slot_mapping)(key_scales, jnp.stack(scales, axis=-1))


_STATIC = ("interpret", "block_tokens", "num_warps", "num_stages", "arithmetic", "shared_memory")

#: Jitted kernel entry point; donates (and updates in place) the cache. Prefer :func:`store`, which
#: validates the inputs first.
store_jit = jax.jit(_store_impl, donate_argnums=0, static_argnames=_STATIC)


#: The kernels behind :func:`store`.
IMPLEMENTATIONS = ("mosaic", "triton")


def _mosaic_refusal(cache: PagedKVCache, key: jax.Array, value: jax.Array, interpret: bool) -> str | None:
    """Why :func:`tqjax.pallas.store_mgpu.store_mgpu` cannot run this store here (None if it can)."""
    if interpret:
        return "interpret mode (the Mosaic GPU store has none)"
    from tqjax.pallas.store_mgpu import refusal

    return refusal(cache, key, value)


def choose_implementation(cache: PagedKVCache, key: jax.Array, value: jax.Array, *, interpret: bool = False) -> str:
    """The kernel :func:`store` runs by default: "mosaic" (:mod:`tqjax.pallas.store_mgpu`, faster:
    docs/PERFORMANCE.md) on a Hopper GPU for bf16 keys and values into a cache it takes, "triton" otherwise."""
    return "mosaic" if _mosaic_refusal(cache, key, value, interpret) is None else "triton"


def check_kernel_config(config: TurboQuantConfig, block_tokens: int, num_warps: int, num_stages: int) -> None:
    """Raise unless the kernel supports ``config`` and the tuning arguments are valid."""
    if not is_power_of_two(config.head_dim):
        raise NotImplementedError(
            f"the Pallas store kernel needs a power-of-two head_dim (in-kernel tiles are power-of-two), "
            f"got {config.head_dim}; use the reference backend for this head_dim"
        )
    for name, value in (("block_tokens", block_tokens), ("num_warps", num_warps)):
        if isinstance(value, bool) or not isinstance(value, int) or not is_power_of_two(value):
            raise ValueError(f"{name} must be a power-of-two int, got {value!r}")
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")


def store(
    cache: PagedKVCache,
    key: jax.Array,
    value: jax.Array,
    slot_mapping: jax.Array,
    *,
    interpret: bool = False,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    num_warps: int = 4,
    num_stages: int = 1,
    arithmetic: str | None = None,
    implementation: str | None = None,
) -> PagedKVCache:
    """Quantize key/value ``[N, Hk, D]`` and write them into ``cache`` at ``slot_mapping`` ``[N]`` int32.

    ``slot < 0`` is padding (skipped); slots must be distinct and below ``cache.num_slots`` (checked
    when concrete; inside jit an out-of-range slot is dropped). Bit-exact with
    :func:`store_reference`. The cache is donated and updated in place: do not use it after the call.
    ``interpret=True`` runs the kernel through the Pallas interpreter (the CPU path). ``block_tokens``
    (tokens per program), ``num_warps`` and ``num_stages`` tune the Triton kernel. ``arithmetic``
    (:data:`ARITHMETIC`; None: :func:`store_arithmetic` of this platform) picks the kernel's conversions;
    "cuda" needs a compiled kernel on an NVIDIA GPU of sm_89 or later. These tune the Triton kernel.
    ``implementation`` (:data:`IMPLEMENTATIONS`): "triton", this module's kernel (CUDA, ROCm, interpret mode);
    "mosaic", :func:`tqjax.pallas.store_mgpu.store_mgpu` (Hopper GPUs, bf16 inputs, the caches of
    :func:`tqjax.pallas.store_mgpu.unsupported`); None: :func:`choose_implementation`, "mosaic" where it runs.
    """
    check_store_inputs(cache, key, value, slot_mapping, kind="turboquant")
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
    why = None if implementation == "triton" else _mosaic_refusal(cache, key, value, bool(interpret))
    if implementation is None:  # choose_implementation's choice
        implementation = "triton" if why is not None else "mosaic"
    if implementation == "mosaic":
        if why is not None:
            raise NotImplementedError(f"the Mosaic GPU store does not take {why}; use implementation='triton'")
        from tqjax.pallas.store_mgpu import store_mgpu_jit

        return store_mgpu_jit(cache, key, value, slot_mapping)
    check_kernel_config(cache.config, block_tokens, num_warps, num_stages)
    if arithmetic is None:
        arithmetic = store_arithmetic(bool(interpret))
    if arithmetic not in ARITHMETIC:
        raise ValueError(f"arithmetic must be one of {ARITHMETIC}, got {arithmetic!r}")
    if arithmetic == "cuda" and interpret:
        raise ValueError("arithmetic 'cuda' is inline PTX: compiled CUDA kernels only, not interpret mode")
    if not interpret and jax.default_backend() != "gpu":
        raise RuntimeError(
            f"the Pallas store kernel compiles with Triton and needs a GPU (default backend is "
            f"{jax.default_backend()!r}); pass interpret=True to run it on CPU"
        )
    return store_jit(
        cache,
        key,
        value,
        slot_mapping,
        interpret=bool(interpret),
        block_tokens=block_tokens,
        num_warps=num_warps,
        num_stages=num_stages,
        arithmetic=arithmetic,
        shared_memory=detect_platform().shared_memory_per_block or PLANNING_SHARED_MEMORY,
    )
