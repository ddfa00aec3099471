"""Split-KV paged decode over a TurboQuant cache, in Pallas (Triton lowering: CUDA and ROCm).

One program per (sequence b, KV head h, split s) handles the whole GQA group of query heads that share
KV head h, so every cache byte is read once per step. The program walks its split's pages of the
sequence ``block_tokens`` tokens at a time: it gathers the pages through the block table (masked
loads: no block-table entry at or past the sequence's last used block is ever read), unpacks the key
codes field by field, looks the centroids up, applies the stored (norm-corrected) norm, scores the
pre-rotated query against them with one matrix product per key segment, dequantizes the values
(folding scale and zero into the probabilities) and runs an fp32 online softmax. No dequantized K/V
buffer is ever materialised. The splits are merged by their log-sum-exp in XLA.

The query is rotated once outside the kernel by :meth:`tqjax.codec.KeyCodec.prepare_query`, exactly
as the reference does; :func:`paged_decode_reference` (the pure-jnp ground truth) sits beside the
kernel.

Index arithmetic: the kernel never forms a flat offset. Cache refs are indexed per dimension
(head, block id, token, word); the lowering multiplies by the strides, in int64 for any array over
4 GiB. All cache arrays have 2- or 4-byte elements, so arrays of up to 4 GiB have at most 2**31 elements and
their int32 offsets cannot overflow (see tqjax.layout).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from tqjax.codec import key_codec
from tqjax.config import KeySegment, TurboQuantConfig
from tqjax.layout import PagedKVCache
from tqjax.packing import WORD_BITS, bit_fields
from tqjax.pallas.pieces import WAVES, grid_size, merge_pieces, piece_table
from tqjax.pallas.tuning import decode_params
from tqjax.platform import detect_platform
from tqjax.quantizers import tf32_table
from tqjax.reference import check_decode_inputs, paged_decode_reference

__all__ = [
    "IMPLEMENTATIONS", "paged_decode", "paged_decode_reference", "choose_implementation", "choose_num_splits",
    "centroid_lookup", "merge_splits",
]

_MIN_DOT_ROWS = 16  # tl.dot needs M >= 16: the GQA group is padded to this many rows ("mma")
_MIN_DOT_COLS = 8  # and N >= 8 (mma.m16n8k16): the group is padded to this many columns ("mma_t")
_LOG2E = math.log2(math.e)


def _unpack(load_words, bits: int, n: int, t: int) -> jax.Array:
    """In-kernel unpack of tqjax.packing fields into int32 codes [T, n].

    ``load_words(start, count)`` loads words ``[start, start+count)`` of the packed vector as uint32
    [T, count]; each field is loaded separately (the Triton lowering has no in-register slicing).
    """
    codes = None
    start = 0
    for width, shift in bit_fields(bits):
        per_word = WORD_BITS // width
        nw = n // per_word
        w = load_words(start, nw)
        start += nw
        lanes = jax.lax.broadcasted_iota(jnp.uint32, (t, nw, per_word), 2) * np.uint32(width)
        f = (jax.lax.broadcast_in_dim(w, (t, nw, per_word), (0, 1)) >> lanes) & np.uint32((1 << width) - 1)
        f = f.reshape(t, n)
        if shift:
            f = f << np.uint32(shift)
        codes = f if codes is None else codes | f
    return codes.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class CentroidLookup:
    """How the kernel turns b-bit codes into centroid values (static, hashable).

    Every lookup returns the decode table's values exactly: the table (``TurboQuantMSE.centroids``) is
    exact in tf32 (11 significant bits, :func:`tqjax.quantizers.tf32_table`), so a result within a few
    float32 ulps of it rounds back onto it, and the decoded keys enter tensor-core products unrounded.

    ``"poly"``: Lloyd--Max codebooks are odd and sorted, so with ``x = 2 * code - (2**b - 1)`` (an odd
    integer, exact) the centroid is ``x * Q(x * x)`` for a polynomial Q fitted to the positive half: the
    lowest degree (at most ``2**(b-1) - 1``, which interpolates) whose values, evaluated by Horner in
    float32 and rounded to the nearest tf32 value (ties away from zero, two integer operations), are
    every table entry exactly in both forms below (checked on the host, else ``"select"`` is used).
    Degrees (d=128): 1 at 2 bits, 3 at 3 bits, 5 at 4 bits, 7 at 5 bits (interpolation: 1, 3, 7, 15).
    Q takes ``x * x`` itself, not an affine map of it onto [-1, 1]: the same degrees came out exact for
    every codebook checked (1-5 bits, d 32-512, both distributions), one operation fewer per element.
    Against 2 * 2**b operations per element for a compare/select chain.
    ``"poly_fma"``: the same polynomial with the code's conversion and every Horner step fused
    multiply-adds and the rounding one ``cvt.rna.tf32.f32`` (or ``cvt.rn.f16.f32`` for a float16
    result), written as one inline PTX block (CUDA GPUs only, sm_80 and later: Pallas' Triton lowering
    emits a separate multiply and add for ``a * u + c``, and offers no FMA otherwise); measured 10-12%
    faster decode on the H200 than "poly" (``4bit_nc`` and ``3bit_nc``, B=32, 16k). Checked on the host
    the same way, with the FMAs emulated exactly.
    ``"prmt"``: byte permutes over the float16 table (CUDA only; tables of at most 16 entries exact in
    float16, else "poly_fma"): one PTX block takes four codes, splits each into its top bit and the
    rest ``j``, picks the low and the high byte of ``table[j]`` and of ``table[n/2 + j]`` for all four
    at once (four ``prmt`` over the half-tables held as byte planes of two registers), chooses between
    the halves by the top bit (a byte mask from one sign-replicating ``prmt``, one ``lop3`` per plane)
    and interleaves the bytes into two float16 pairs: 15 instructions per four codes, against about
    ten per code for "poly_fma". Exact by construction (the table's own float16 bits).
    ``"select"``: a compare/select chain over the table (any codebook).
    """

    method: str
    centroids: tuple[float, ...]
    coefs: tuple[float, ...] = ()  # of Q, lowest degree first (the kernel evaluates x * Q(x * x))
    f16_direct: bool = False  # "poly_fma" only: rounding the FMA result to float16 (cvt.rn) gives the table too


_POLY_MAX_BITS = 5
_PRMT_MAX_BITS = 4  # a half-table of at most 8 float16 entries: two registers per byte plane


def centroid_lookup(centroids: np.ndarray, method: str) -> CentroidLookup:
    """Build the static lookup for a Lloyd--Max codebook (float64 [2**b], odd and ascending); its decode
    table is :func:`tqjax.quantizers.tf32_table` of it (``TurboQuantMSE.centroids``). The polynomial
    is fitted to the exact codebook (a smooth function of the code); ``method`` "poly" or "poly_fma"
    falls back to "select" when the rounded polynomial would not give every table entry exactly (more
    than 5 bits, or too inexact)."""
    c64 = np.asarray(centroids, np.float64)
    table = tf32_table(c64)
    entries = tuple(float(x) for x in table)
    n = c64.size
    if method == "prmt":
        if 2 <= n <= 1 << _PRMT_MAX_BITS and _exact_in_f16(table):
            return CentroidLookup("prmt", entries)
        method = "poly_fma"
    if method == "select" or n > 1 << _POLY_MAX_BITS or n < 2:
        return CentroidLookup("select", entries)
    half = n // 2
    x = 2 * np.arange(half, n) - (n - 1)  # positive odd integers
    y = c64[half:] / x
    for degree in range(half):  # the lowest degree whose rounded values are the table, both forms
        coefs = np.polynomial.polynomial.polyfit((x * x).astype(np.float64), y, degree, w=1 / np.abs(y))
        coefs = coefs.astype(np.float32)
        if np.array_equal(_poly_eval_f32(np.arange(n), n, coefs), table) and np.array_equal(
            _poly_fma_host(np.arange(n), n, coefs), table
        ):
            break
    else:
        return CentroidLookup("select", entries)
    raw = _poly_fma_raw(np.arange(n), n, coefs)
    f16_direct = method == "poly_fma" and _exact_in_f16(table) and np.array_equal(raw.astype(np.float16), table)
    return CentroidLookup(method, entries, tuple(float(x) for x in coefs), f16_direct)


def _round_tf32_host(x: np.ndarray) -> np.ndarray:
    """float32 ``x`` rounded to the nearest tf32 value, ties away from zero (``cvt.rna.tf32.f32``)."""
    bits = np.asarray(x, np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def _round_tf32(x: jax.Array) -> jax.Array:
    """:func:`_round_tf32_host` in jnp (two integer operations per element)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000), jnp.float32)


def _poly_eval_f32(codes, n: int, coefs) -> np.ndarray:
    """The "poly" lookup on the host: ``x * Q(x * x)`` with ``x = 2 * code - (n - 1)`` (``coefs`` of Q),
    float32 Horner, rounded to tf32."""
    return _round_tf32_host(_poly_eval_x(_code_x(codes, n), coefs))


def _poly_fma_host(codes, n: int, coefs) -> np.ndarray:
    """:func:`_poly_ptx`'s arithmetic on the host, rounded to tf32 like the PTX block."""
    return _round_tf32_host(_poly_fma_raw(codes, n, coefs))


def _code_x(codes, n: int) -> np.ndarray:
    """``2 * code - (n - 1)`` as float32 (odd integers below 2**6: exact)."""
    return (2 * np.asarray(codes) - (n - 1)).astype(np.float32)


def _poly_fma_raw(codes, n: int, coefs) -> np.ndarray:
    """:func:`_poly_ptx`'s float32 arithmetic before its final rounding, on the host: each
    ``fma.rn.f32`` as an exact float64 product and sum rounded once to float32 (a product of two
    float32 values is exact in float64; the sum's double rounding is below half a tf32 ulp, which the
    final rounding absorbs: the host checks compare the rounded results exactly)."""
    f32 = np.float32

    def fma(a, b, c):
        return (np.float64(a) * np.float64(b) + np.float64(c)).astype(f32)

    x = _code_x(codes, n)
    u = x * x
    acc = np.full_like(u, coefs[-1])
    for cf in coefs[-2::-1]:
        acc = fma(acc, u, cf)
    return x * acc


def _poly_eval_x(x, coefs):
    """``x * Q(x * x)`` (``coefs`` of Q), the float32 operations of the "poly" lookup before its
    rounding (numpy or jnp)."""
    u = x * x
    if len(coefs) == 1:
        return x * (coefs[0] + 0 * u)
    acc = coefs[-1] * u + coefs[-2]  # the first Horner step on the constant leading coefficient
    for cf in coefs[-3::-1]:
        acc = acc * u + cf
    return x * acc


def _f32_hex(x: float) -> str:
    return f"0f{int(np.float32(x).view(np.uint32)):08X}"


def _poly_ptx(codes: jax.Array, lk: CentroidLookup, f16_out: bool = False) -> jax.Array:
    """The "poly_fma" lookup of int32 ``codes`` as one PTX block: ``x = 2 * code - (n - 1)`` (exact),
    then :func:`_poly_eval_x` with each Horner step one ``fma.rn.f32``, then ``cvt.rna.tf32.f32``
    (CUDA only, sm_80 and later); with ``f16_out`` (needs ``lk.f16_direct``) ``cvt.rn.f16.f32`` to a
    float16 result instead."""
    lines = [
        "{", ".reg .f32 x, u, a;", ".reg .b32 r;", ".reg .b16 h;",
        "cvt.rn.f32.s32 x, $1;",
        f"fma.rn.f32 x, x, 0f40000000, {_f32_hex(1 - len(lk.centroids))};",
        "mul.rn.f32 u, x, x;",
        f"mov.f32 a, {_f32_hex(lk.coefs[-1])};",
    ]
    lines += [f"fma.rn.f32 a, a, u, {_f32_hex(c)};" for c in lk.coefs[-2::-1]]
    lines.append("mul.rn.f32 a, x, a;")
    if f16_out:
        lines += ["cvt.rn.f16.f32 h, a;", "mov.b16 $0, h;", "}"]
    else:
        lines += ["cvt.rna.tf32.f32 r, a;", "mov.b32 $0, r;", "}"]
    dtype = jnp.float16 if f16_out else jnp.float32
    (out,) = pltriton.elementwise_inline_asm(
        "\n".join(lines), args=[codes], constraints="=h,r" if f16_out else "=f,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(codes.shape, dtype)],
    )
    return out


def _prmt_ptx(codes: jax.Array, lk: CentroidLookup) -> jax.Array:
    """The "prmt" lookup of int32 ``codes`` (<= 16 entries, a table exact in float16), float16, as one PTX
    block (:func:`prmt_asm`) per four codes (``pack=4``: Triton passes four codes in four registers and
    takes the four float16 results back as two pairs; which four elements share a block does not
    matter, every result depends on its own code only)."""
    (out,) = pltriton.elementwise_inline_asm(
        prmt_asm(lk), args=[codes], constraints="=r,=r,r,r,r,r", pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(codes.shape, jnp.float16)],
    )
    return out


def prmt_asm(lk: CentroidLookup) -> str:
    """PTX of the "prmt" lookup: codes in ``$2..$5``, float16 pairs ``(code $2, code $3)`` in ``$0`` and
    ``(code $4, code $5)`` in ``$1`` (first in the low half).

    ``w`` holds the four codes as nibbles; ``j = code & (n/2 - 1)`` (at most 7: a ``prmt`` selector
    nibble without its sign-replicate bit) selects, in each byte plane, from the negative half-table
    ``table[j]`` and the positive one ``table[n/2 + j]``; the byte mask ``m`` (0xFF where the code's top
    bit is set) is a sign-replicating ``prmt`` of ``w`` shifted so that code k's top bit is the top bit
    of the byte it reads; ``lop3`` (``m ? pos : neg``, LUT 0xE4) picks per byte, and two ``prmt`` pair
    the low and high bytes into float16 values.
    """
    n = len(lk.centroids)
    bits = n.bit_length() - 1
    half = n // 2
    f16 = np.asarray(lk.centroids, np.float64).astype(np.float16).view(np.uint16)

    def plane(values: np.ndarray) -> tuple[str, str]:  # 8 bytes as two b32 immediates (entry k in byte k)
        b = np.zeros(8, np.uint32)
        b[: len(values)] = values
        return tuple(f"0x{int(sum(int(b[4 * r + i]) << (8 * i) for i in range(4))):08X}" for r in range(2))

    neg_lo, neg_hi = f16[:half] & 0xFF, f16[:half] >> 8
    pos_lo, pos_hi = f16[half:] & 0xFF, f16[half:] >> 8
    tables = {"nl": plane(neg_lo), "pl": plane(pos_lo), "nh": plane(neg_hi), "ph": plane(pos_hi)}
    lines = [
        "{",
        ".reg .b32 w, j, a, b, m, lo, hi, u, v, nl0, nl1, pl0, pl1, nh0, nh1, ph0, ph1;",
        *(f"mov.b32 {name}{r}, {val};" for name, pair in tables.items() for r, val in enumerate(pair)),
        "mad.lo.u32 w, $3, 16, $2;",
        "mad.lo.u32 w, $4, 256, w;",
        "mad.lo.u32 w, $5, 4096, w;",
        f"and.b32 j, w, 0x{0x1111 * (half - 1):04X};",
        # code k's top bit (nibble bit bits-1) to the top of a byte: codes 0, 2 from a, codes 1, 3 from b
        f"shl.b32 a, w, {8 - bits};",
        f"shl.b32 b, w, {4 - bits};",
        "prmt.b32 m, a, b, 0xD9C8;",
        "prmt.b32 u, nl0, nl1, j;",
        "prmt.b32 v, pl0, pl1, j;",
        "lop3.b32 lo, v, u, m, 0xE4;",
        "prmt.b32 u, nh0, nh1, j;",
        "prmt.b32 v, ph0, ph1, j;",
        "lop3.b32 hi, v, u, m, 0xE4;",
        "prmt.b32 $0, lo, hi, 0x5140;",
        "prmt.b32 $1, lo, hi, 0x7362;",
        "}",
    ]
    return "\n".join(lines)


def _lookup(codes: jax.Array, lk: CentroidLookup, dtype=jnp.float32) -> jax.Array:
    """Centroid values (exact table entries; ``dtype`` float32, or float16 for a table exact in it)
    of int32 ``codes``."""
    if lk.method == "prmt":
        return _prmt_ptx(codes, lk).astype(dtype)
    if lk.method == "poly_fma":
        if dtype == jnp.float16 and lk.f16_direct:
            return _poly_ptx(codes, lk, f16_out=True)
        return _poly_ptx(codes, lk).astype(dtype)
    if lk.method == "poly":
        x = codes.astype(jnp.float32) * 2.0 - np.float32(len(lk.centroids) - 1)  # exact
        return _round_tf32(_poly_eval_x(x, [np.float32(c) for c in lk.coefs])).astype(dtype)
    out = jnp.full(codes.shape, np.float32(lk.centroids[0]))
    for k in range(1, len(lk.centroids)):
        out = jnp.where(codes == k, np.float32(lk.centroids[k]), out)
    return out.astype(dtype)


def _split_tf32(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x = hi + lo`` with ``hi`` exactly representable in tf32 (10-bit mantissa) and ``lo`` the
    exact float32 remainder."""
    hi = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(x, jnp.uint32) & np.uint32(0xFFFFE000), jnp.float32
    )
    return hi, x - hi


_F16_TOP = 15  # split operands are scaled by powers of 2 to |x| < 2**15 (float16's largest finite value is 65504)


def _split_f16_rows(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 ``x`` [..., n] -> (hi, lo, inv): float16 ``hi + lo = x * 2**e`` per row (last axis) to
    about 2**-23 of the row's max|x| (``2**e`` puts the row's max in [2**14, 2**15): hi carries 11
    significant bits, lo the next 11), and ``inv = 2**-e`` [..., 1] float32 to undo the scaling."""
    _, ex = jnp.frexp(jnp.max(jnp.abs(x), axis=-1, keepdims=True))  # max|x| < 2**ex
    ex = jnp.clip(ex, -100, 100)
    hi, lo = split_hi_lo(jnp.ldexp(x, _F16_TOP - ex), jnp.float16, in_xla=True)
    return hi, lo, jnp.ldexp(jnp.ones_like(x[..., :1]), ex - _F16_TOP)


def split_hi_lo(x: jax.Array, dtype, *, in_xla: bool = False) -> tuple[jax.Array, jax.Array]:
    """float32 ``x ~= hi + lo`` with ``hi = x`` rounded to ``dtype`` and ``lo`` the remainder rounded
    to ``dtype`` (float16: within about 2**-22 |x|, plus float16's subnormal spacing 2**-24, for
    |x| < 65504; bfloat16: about 2**-16 |x|).

    ``in_xla``: for a split computed by XLA rather than in a kernel. On GPUs XLA drops float32 ->
    ``dtype`` -> float32 conversion pairs by default ("excess precision"), which would make ``lo``
    zero (measured: a float16 query split gave 3e-4 errors on the H200); an optimization barrier on
    ``hi`` keeps the rounding. Triton keeps it as written."""
    hi = x.astype(dtype)
    if in_xla:
        hi = jax.lax.optimization_barrier(hi)
    return hi, (x - hi.astype(jnp.float32)).astype(dtype)


def _exact_in_f16(values) -> bool:
    """Every value exactly representable in float16 (then a float16 tensor-core operand holds it unrounded)."""
    v = np.asarray(values, np.float64)
    return bool(np.all(v.astype(np.float16).astype(np.float64) == v))


def _decode_kernel(
    # scalar-ish inputs
    block_tables_ref,  # [B, max_blocks] int32
    seq_lens_ref,  # [B] int32
    # the query refs are transposed with dot_mode "mma_t": [Dq, Gp] and [1, Gp]
    q_ref,  # [Gp, Dq] prepared query of this (b, h): float32 (its tf32 high part with SPLIT_QUERY) or, with
    #         SPLIT_F16, the float16 high part of the query scaled per row by a power of 2
    q_lo_ref,  # [Gp, Dq]: the remainder q - q_hi with SPLIT_QUERY (float32) and SPLIT_F16 (float16), else None
    q_inv_ref,  # [Gp, 1] float32: per-row 2**-e undoing SPLIT_F16's scaling of the query, else None
    # cache (this KV head)
    key_codes_ref,  # [NB, BS, Wk] uint32
    key_scales_ref,  # [NB, BS, nk] float16 (None for fp8)
    value_codes_ref,  # [NB, BS, Wv] uint32
    value_scales_ref,  # [NB, BS, 2] float16
    # outputs
    o_ref,  # [Gp, D] float32, normalised within the split
    lse_ref,  # [Gp] float32, log-sum-exp of the split (-inf if empty)
    *,
    b,  # the sequence
    first_page,  # this program's pages of its block-table row: [first_page, end_page), end_page <= its used pages
    end_page,
    q_lead: tuple = (),  # indices before the (b, h) slice's in the query refs (whole refs: (b, h))
    o_lead: tuple = (),  # and in the output refs (whole refs: the program's slot)
    config: TurboQuantConfig,
    segments: tuple[KeySegment, ...],
    q_offsets: tuple[int, ...],
    lookups: tuple[CentroidLookup | None, ...],
    pages_per_chunk: int,
    scale: float,
    softcap: float | None,
    num_heads: int,
    dot_mode: str,
    precision,
    interpret: bool,
):
    block_size = key_codes_ref.shape[1]
    gp = o_ref.shape[len(o_lead)]
    d = config.head_dim
    t = pages_per_chunk * block_size
    qjl_scale = math.sqrt(math.pi / 2) / d
    f16 = precision == SPLIT_F16 and dot_mode != "fma"
    opd = jnp.float16 if f16 else jnp.float32  # operand dtype of the key and value tiles

    seq_len = seq_lens_ref[b]
    n_chunks = jnp.maximum(end_page - first_page + pages_per_chunk - 1, 0) // pages_per_chunk

    def score_terms(pages, valid):
        """Per key segment: (query column offset, key vectors [T, dim] float32, per-token factor [T])."""

        def column(ref, i):  # one fp16 scalar per token -> float32 [T], zero where invalid
            x = ref[pages, :, i].astype(jnp.float32).reshape(t)
            return jnp.where(valid, x, 0.0)

        terms = []
        for si, seg in enumerate(segments):

            def load_words(start, count, seg=seg):
                w = key_codes_ref[pages, :, pl.ds(seg.word_start + start, count)]
                return w.reshape(t, count)

            if seg.kind == "fp8":
                w = load_words(0, seg.num_words)
                byte = jax.lax.broadcasted_iota(jnp.uint32, (t, seg.num_words, 4), 2) * np.uint32(8)
                raw = (jax.lax.broadcast_in_dim(w, (t, seg.num_words, 4), (0, 1)) >> byte) & np.uint32(0xFF)
                kv = jax.lax.bitcast_convert_type(raw.astype(jnp.uint8), jnp.float8_e4m3fn)
                kv = jnp.where(valid[:, None], kv.reshape(t, d).astype(opd), 0.0)
                terms.append((q_offsets[si], kv, None))
            elif seg.kind == "qjl":
                signs = _unpack(load_words, 1, seg.dim, t).astype(opd) * 2.0 - 1.0
                factor = column(key_scales_ref, 0) * column(key_scales_ref, 1) * qjl_scale
                terms.append((q_offsets[si], signs, factor))
            else:
                c = _lookup(_unpack(load_words, seg.bits, seg.dim, t), lookups[si], opd)
                factor = column(key_scales_ref, si if config.key_format == "split" else 0)  # norm-corrected
                terms.append((q_offsets[si], c, factor))

        def load_value_words(start, count):
            return value_codes_ref[pages, :, pl.ds(start, count)].reshape(t, count)

        vcodes = _unpack(load_value_words, config.value_bits, d, t).astype(opd)  # [T, D], exact
        return terms, column(value_scales_ref, 0), column(value_scales_ref, 1), vcodes

    def finish_logits(logits, valid):
        logits = logits * scale
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        return jnp.where(valid, logits, -jnp.inf)

    def softmax_step(logits, m_prev, l_prev, axis=-1):
        """Online softmax over the token axis (base 2); stats keep that axis with size 1."""
        m_next = jnp.maximum(m_prev, jnp.max(logits, axis=axis, keepdims=True))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        alpha = jnp.exp2((m_prev - m_safe) * _LOG2E)
        p = jnp.exp2((logits - m_safe) * _LOG2E)  # exactly 0 where invalid
        return p, alpha, m_next, alpha * l_prev + jnp.sum(p, axis=axis, keepdims=True)

    def chunk(i):
        page0 = first_page + i * pages_per_chunk
        page_ok = page0 + jnp.arange(pages_per_chunk, dtype=jnp.int32) < end_page
        # Masked load: block-table entries at or past the sequence's last used page are never read.
        pages = pltriton.load(block_tables_ref.at[b, pl.ds(page0, pages_per_chunk)], mask=page_ok, other=0)
        tok = page0 * block_size + jnp.arange(t, dtype=jnp.int32)
        valid = (tok < seq_len) & (tok < end_page * block_size)  # [T]: this split's tokens only
        return pages, valid

    if dot_mode in ("mma", "mma_t"):
        # "mma": the GQA group as the rows of tensor-core products (padded to gp >= 16 rows), tokens
        # as the columns: logits [Gp, T], accumulator [Gp, D]. "mma_t": the transposed products
        # (logits^T = K @ q^T, out^T = V^T @ p^T): tokens as the rows, the group as the columns (padded
        # to gp >= 8, the n8 of mma.m16n8k16): logits [T, Gp], accumulator [D, Gp]. Scores: with
        # SPLIT_QUERY, q_hi @ k + q_lo @ k, two TF32 products against the tf32-exact key tile (decode
        # tables, fp8 values and QJL signs all are), as accurate as TF32x3, which also splits the keys;
        # with SPLIT_F16 the same two products in float16 (the key tile is exact in float16 too, and
        # the query was scaled per row by a power of 2 into float16's range); else one product at
        # ``precision``. Values: p' @ codes with p' = p * scale split into hi + lo (tf32, or float16
        # after scaling the step's p' by a power of 2 into float16's range) and exact integer codes.
        tf32 = jax.lax.Precision.HIGHEST if interpret else jax.lax.DotAlgorithmPreset.TF32_TF32_F32
        half = jax.lax.Precision.HIGHEST if interpret else jax.lax.DotAlgorithmPreset.F16_F16_F32
        split_prec = half if f16 else tf32
        tr = dot_mode == "mma_t"
        tok_axis = 0 if tr else 1  # the token axis of logits and probabilities
        q_inv = q_inv_ref[(*q_lead, ...)] if f16 else None  # [Gp, 1] ([1, Gp] with "mma_t")

        def per_token(x):  # [T] -> broadcastable along the token axis
            return x[:, None] if tr else x[None, :]

        def mm(a, bmat, contract, prec):
            return jax.lax.dot_general(a, bmat, (contract, ((), ())), precision=prec,
                                       preferred_element_type=jnp.float32)

        def score(off, kvec):
            """The query's columns [off, off + dim) against the key tile kvec [T, dim]."""
            cols = pl.ds(off, kvec.shape[1])

            def times(qref, prec):
                if tr:  # kvec @ q^T: the query part is stored transposed, [Dq, Gp]
                    return mm(kvec, qref[(*q_lead, cols, pl.ds(0, gp))], ((1,), (0,)), prec)
                return mm(qref[(*q_lead, pl.ds(0, gp), cols)], kvec, ((1,), (1,)), prec)

            if q_lo_ref is None:
                return times(q_ref, precision)
            return times(q_ref, split_prec) + times(q_lo_ref, split_prec)

        def pv_mm(pw, vcodes, prec):  # [Gp, T] @ [T, D] (or vcodes^T @ pw^T for "mma_t")
            return mm(vcodes, pw, ((0,), (0,)), prec) if tr else mm(pw, vcodes, ((1,), (0,)), prec)

        def value_product(p, vscale, vcodes):
            """(p * vscale) @ vcodes (p [Gp, T], vscale [T], vcodes [T, D] exact small integers in the
            operand dtype; transposed with "mma_t"), fp32-accurate (0 <= p <= 1, vscale >= 0)."""
            pw = p * per_token(vscale)
            if interpret and not f16:
                return pv_mm(pw, vcodes, tf32)
            if not f16:
                hi, lo = _split_tf32(pw)
                return pv_mm(hi, vcodes, tf32) + pv_mm(lo, vcodes, tf32)
            # pw <= vmax = max(vscale). With vmax in [2**k, 2**(k+1)), pw * 2**(14 - k) < 2**15 fits
            # float16; both powers of 2 are built from exponent bits (clipped: normal float32 values).
            vbits = jax.lax.bitcast_convert_type(jnp.max(vscale), jnp.int32) >> 23  # biased exponent k + 127
            vbits = jnp.clip(vbits, 15, 254)
            up = jax.lax.bitcast_convert_type((268 - vbits) << 23, jnp.float32)  # 2**(141 - vbits)
            down = jax.lax.bitcast_convert_type((vbits - 14) << 23, jnp.float32)  # its inverse
            hi, lo = split_hi_lo(pw * up, jnp.float16)
            return (pv_mm(hi, vcodes, half) + pv_mm(lo, vcodes, half)) * down

        def body(i, carry):
            acc, m_prev, l_prev = carry
            pages, valid = chunk(i)
            terms, vscale, vzero, vcodes = score_terms(pages, valid)
            logits = jnp.zeros((t, gp) if tr else (gp, t), jnp.float32)
            for off, kvec, factor in terms:
                sc = score(off, kvec)
                logits += sc if factor is None else sc * per_token(factor)
            if f16:
                logits = logits * q_inv
            p, alpha, m_next, l_next = softmax_step(
                finish_logits(logits, per_token(valid)), m_prev, l_prev, axis=tok_axis)
            pv = value_product(p, vscale, vcodes)
            acc = acc * alpha + pv + jnp.sum(p * per_token(vzero), axis=tok_axis, keepdims=True)
            return acc, m_next, l_next

        stat_shape = (1, gp) if tr else (gp, 1)
        init = (
            jnp.zeros((d, gp) if tr else (gp, d), jnp.float32),
            jnp.full(stat_shape, -jnp.inf, jnp.float32),
            jnp.zeros(stat_shape, jnp.float32),
        )
        acc, m, l = jax.lax.fori_loop(0, n_chunks, body, init)
        l_safe = jnp.where(l > 0, l, 1.0)
        o_ref[(*o_lead, ...)] = (acc / l_safe).T if tr else acc / l_safe
        lse_ref[(*o_lead, ...)] = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf).reshape(gp)
    else:
        # CUDA-core float32: each query head of the group keeps its own row of state.
        def body(i, carry):
            pages, valid = chunk(i)
            terms, vscale, vzero, vcodes = score_terms(pages, valid)
            out = []
            for g, (acc, m_prev, l_prev) in enumerate(carry):
                logits = jnp.zeros((t,), jnp.float32)
                for off, kvec, factor in terms:
                    qg = q_ref[(*q_lead, g, pl.ds(off, kvec.shape[1]))]
                    sc = jnp.sum(qg[None, :] * kvec, axis=1)
                    logits += sc if factor is None else sc * factor
                p, alpha, m_next, l_next = softmax_step(finish_logits(logits, valid), m_prev, l_prev)
                pv = jnp.sum((p * vscale)[:, None] * vcodes, axis=0)
                out.append((acc * alpha + pv + jnp.sum(p * vzero, keepdims=True), m_next, l_next))
            return tuple(out)

        init = tuple(
            (jnp.zeros((d,), jnp.float32), jnp.full((1,), -jnp.inf, jnp.float32), jnp.zeros((1,), jnp.float32))
            for _ in range(num_heads)
        )
        for g, (acc, m, l) in enumerate(jax.lax.fori_loop(0, n_chunks, body, init)):
            l_safe = jnp.where(l > 0, l, 1.0)
            o_ref[(*o_lead, g, slice(None))] = acc / l_safe
            lse_ref[(*o_lead, pl.ds(g, 1))] = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)


def split_program(kernel, *, n_queries: int, pages_per_split: int):
    """``kernel`` as program (b, h, split) of :func:`split_kv_call`: pages ``[split * pages_per_split, ...)`` of
    sequence b (its block table's width cut in equal splits). ``kernel(block_tables_ref, seq_lens_ref, *refs, b=,
    first_page=, end_page=)`` gets the ``n_queries`` query refs, the cache refs (the first [NB, BS, ...]) and the
    two output refs, all the (b, h) slices."""

    def program(block_tables_ref, seq_lens_ref, *refs):
        b, split = pl.program_id(0), pl.program_id(2)
        block_size = refs[n_queries].shape[1]
        used_pages = (seq_lens_ref[b] + block_size - 1) // block_size
        first_page = split * pages_per_split
        kernel(block_tables_ref, seq_lens_ref, *refs, b=b, first_page=first_page,
               end_page=jnp.minimum(first_page + pages_per_split, used_pages))

    return program


def piece_program(kernel):
    """``kernel`` as program (h, j) of :func:`pieces_call`: KV head h of piece j of
    :func:`tqjax.pallas.pieces.piece_table` (pages ``[first, end)`` of sequence b, output slot ``slot * Hk + h``;
    a piece index past the last piece reads no page and writes the spare slot). ``kernel`` gets the query refs
    [B, Hk, ...] and the output refs [slots, ...] whole, with ``q_lead=(b, h)`` and ``o_lead=(slot,)`` to index
    them in each access (the Triton lowering refuses ref views with a second indexer: "No support for multiple
    indexers yet"), and head h's cache refs."""

    def program(work_ref, block_tables_ref, seq_lens_ref, *refs):
        h, j = pl.program_id(0), pl.program_id(1)
        b, hk = work_ref[0, j], refs[0].shape[1]
        kernel(block_tables_ref, seq_lens_ref, *refs, b=b, first_page=work_ref[1, j], end_page=work_ref[2, j],
               q_lead=(b, h), o_lead=(work_ref[3, j] * hk + h,))

    return program


def choose_num_splits(batch: int, num_kv_heads: int, max_blocks: int, pages_per_chunk: int, num_cores: int) -> int:
    """Splits per (sequence, KV head): enough programs for ~2 waves over the device's cores, never
    more splits than there are chunks of pages to give them."""
    programs = batch * num_kv_heads
    want = max(1, -(-2 * num_cores // programs))
    return int(max(1, min(want, -(-max_blocks // pages_per_chunk))))


def _device_cores() -> int:
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or 1)


def check_cut(cut: str | None, num_splits: int | None) -> None:
    """ValueError for a ``cut`` not in :data:`CUTS` (or None), or "lengths" beside a ``num_splits``."""
    if cut not in CUTS + (None,):
        raise ValueError(f"cut must be one of {CUTS} or None, got {cut!r}")
    if cut == "lengths" and num_splits is not None:
        raise ValueError(f"num_splits={num_splits} cuts the block tables' width: not with cut='lengths'")


def plan_cut(cut: str | None, num_splits: int | None, tuned_cut: str, *, batch: int, num_kv_heads: int,
             max_blocks: int, pages_per_chunk: int) -> tuple[int | None, int | None]:
    """(num_splits, resident) for a Triton decode: a split count with the width's cut (``num_splits``, else
    :func:`choose_num_splits`), or (None, a wave of programs) with the lengths' (:mod:`tqjax.pallas.pieces`; a wave is
    the ``2 * cores`` programs :func:`choose_num_splits` aims at). ``cut`` None: "width" where ``num_splits`` is
    given, else ``tuned_cut`` (:func:`check_cut` first)."""
    cut = ("width" if num_splits is not None else tuned_cut) if cut is None else cut
    if cut == "lengths":
        return None, 2 * _device_cores()
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, max_blocks, pages_per_chunk, _device_cores())
    return int(num_splits), None


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale", "softcap", "num_splits", "block_tokens", "num_warps", "num_stages", "lookup", "dot_mode",
        "interpret", "precision", "resident",
    ),
)
def _paged_decode(
    query, cache, block_tables, seq_lens, *, scale, softcap, num_splits, block_tokens, num_warps, num_stages,
    lookup, dot_mode, interpret, precision, resident=None,
):
    """``num_splits`` S: the table's width cut in S (:func:`split_kv_call`); None: the work cut by the lengths
    (:mod:`tqjax.pallas.pieces`, ``resident`` programs a wave); :func:`split_kv_decode`."""
    cfg = cache.config
    b, hq, d = query.shape
    hk = cache.num_kv_heads
    g = hq // hk
    min_rows = {"fma": 1, "mma": _MIN_DOT_ROWS, "mma_t": _MIN_DOT_COLS}[dot_mode]
    gp = max(min_rows, pl.next_power_of_2(g))
    pages_per_chunk = max(1, block_tokens // cache.block_size)

    codec = key_codec(cfg)
    segments = cfg.key_segments
    q = query.astype(jnp.float32).reshape(b, hk, g, d)
    q_parts = codec.prepare_query(q)
    q_offsets = tuple(int(x) for x in np.cumsum([0] + [p.shape[-1] for p in q_parts])[:-1])
    qcat = jnp.concatenate(q_parts, axis=-1)
    qcat = jnp.pad(qcat, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    lookups = tuple(
        centroid_lookup(codec.quantizers[i].codebook.centroids, lookup) if seg.kind == "mse" else None
        for i, seg in enumerate(segments)
    )
    if precision == SPLIT_F16 and not all(_exact_in_f16(lk.centroids) for lk in lookups if lk is not None):
        precision = SPLIT_QUERY  # a decode table outside float16's range: the tf32 split instead
    q_lo = q_inv = None
    if precision == SPLIT_QUERY and dot_mode != "fma":
        qcat, q_lo = _split_tf32(qcat)
    elif precision == SPLIT_F16 and dot_mode != "fma":
        qcat, q_lo, q_inv = _split_f16_rows(qcat)
    if dot_mode == "mma_t":  # the kernel reads the query parts transposed: [Dq, Gp] per (b, h)
        qcat, q_lo, q_inv = (None if x is None else jnp.swapaxes(x, -1, -2) for x in (qcat, q_lo, q_inv))

    static = {"config": cfg, "segments": segments, "q_offsets": q_offsets, "lookups": lookups,
              "pages_per_chunk": pages_per_chunk, "scale": scale, "softcap": softcap, "num_heads": g,
              "dot_mode": dot_mode, "precision": precision, "interpret": interpret}
    queries = [qcat, q_lo, q_inv]
    cache_arrays = [cache.key_codes, cache.key_scales, cache.value_codes, cache.value_scales]
    launch = {"out_dim": d, "num_warps": num_warps, "num_stages": num_stages, "interpret": interpret,
              "name": f"tq_decode_{cfg.name}", "rows": gp}
    out = split_kv_decode(functools.partial(_decode_kernel, **static), block_tables, seq_lens, queries, cache_arrays,
                          num_splits=num_splits, resident=resident, block_size=cache.block_size,
                          pages_per_chunk=pages_per_chunk, keep=g, **launch)
    return out[:, :, :g].reshape(b, hq, d).astype(query.dtype)


def split_kv_call(
    kernel, block_tables: jax.Array, seq_lens: jax.Array, queries: list, cache_arrays: list, *,
    num_splits: int, out_dim: int, num_warps: int, num_stages: int, interpret: bool, name: str,
    rows: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The launch shared by the split-KV decode kernels (this module's and :mod:`tqjax.pallas.flash_decode`):
    one program per (sequence b, KV head h, split s), the kernel's refs in the order block_tables
    [B, max_blocks] int32, seq_lens [B] int32 (whole), ``queries`` (each [B, Hk, ...]: the (b, h)
    slice, e.g. [Gp, Dq]; None entries stay None refs), ``cache_arrays`` (each [Hk, ...]: head h's
    slice). ``rows``: Gp, the output rows per program (default: ``queries[0].shape[2]``). Returns each
    split's output [S, B, Hk, Gp, out_dim] float32 (normalised within the split) and its log-sum-exp
    [S, B, Hk, Gp] float32, for :func:`merge_splits`."""
    b, hk = queries[0].shape[:2]
    gp = queries[0].shape[2] if rows is None else rows

    def whole(a):
        return pl.BlockSpec(a.shape, lambda i, j, k: (0,) * a.ndim)

    def per_query(q):
        return None if q is None else pl.BlockSpec((None, None) + q.shape[2:], lambda i, j, k: (i, j, 0, 0))

    def per_head(a):
        return None if a is None else pl.BlockSpec((None,) + a.shape[1:], lambda i, j, k: (j,) + (0,) * (a.ndim - 1))

    return pl.pallas_call(
        kernel,
        grid=(b, hk, num_splits),
        in_specs=[whole(block_tables), whole(seq_lens)] + [per_query(q) for q in queries]
        + [per_head(a) for a in cache_arrays],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, out_dim), lambda i, j, k: (k, i, j, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, j, k: (k, i, j, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_splits, b, hk, gp, out_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, b, hk, gp), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name=name,
    )(block_tables.astype(jnp.int32), seq_lens.astype(jnp.int32), *queries, *cache_arrays)


def pieces_call(
    kernel, work: jax.Array, block_tables: jax.Array, seq_lens: jax.Array, queries: list, cache_arrays: list, *,
    n_pieces: int, out_dim: int, num_warps: int, num_stages: int, interpret: bool, name: str, rows: int,
) -> tuple[jax.Array, jax.Array]:
    """:func:`split_kv_call`'s launch for work cut by the lengths: one program per (KV head h, piece j) of ``work``
    (:func:`tqjax.pallas.pieces.piece_table`'s table [4, >= n_pieces] int32), the kernel's refs in the order work,
    block_tables, seq_lens, ``queries`` (each [B, Hk, ...], whole: the program's sequence comes from the table;
    None entries stay None refs), ``cache_arrays`` (head h's slice). Returns each slot's output
    [(n_pieces + 1) * Hk, rows, out_dim] float32 (normalised within the piece; piece slot s of head h at
    ``s * Hk + h``, the last Hk rows the spare slot of piece indices past the last piece) and its natural
    log-sum-exp [(n_pieces + 1) * Hk, rows] float32, for :func:`tqjax.pallas.pieces.merge_pieces`."""
    hk = queries[0].shape[1]
    slots = (n_pieces + 1) * hk

    def whole(a):
        return None if a is None else pl.BlockSpec(a.shape, lambda i, j: (0,) * a.ndim)

    def per_head(a):
        return None if a is None else pl.BlockSpec((None,) + a.shape[1:], lambda i, j: (i,) + (0,) * (a.ndim - 1))

    o_shape, lse_shape = (slots, rows, out_dim), (slots, rows)
    return pl.pallas_call(
        kernel,
        grid=(hk, n_pieces),
        in_specs=[whole(work), whole(block_tables), whole(seq_lens)] + [whole(q) for q in queries]
        + [per_head(a) for a in cache_arrays],
        out_specs=[pl.BlockSpec(o_shape, lambda i, j: (0, 0, 0)), pl.BlockSpec(lse_shape, lambda i, j: (0, 0))],
        out_shape=[jax.ShapeDtypeStruct(o_shape, jnp.float32), jax.ShapeDtypeStruct(lse_shape, jnp.float32)],
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name=name,
    )(work, block_tables.astype(jnp.int32), seq_lens.astype(jnp.int32), *queries, *cache_arrays)


def split_kv_decode(kernel, block_tables: jax.Array, seq_lens: jax.Array, queries: list, cache_arrays: list, *,
                    num_splits: int | None, resident: int | None, block_size: int, pages_per_chunk: int, rows: int,
                    keep: int, out_dim: int, interpret: bool, **launch) -> jax.Array:
    """A split-KV decode kernel (this module's, :mod:`tqjax.pallas.flash_decode`'s) end to end, merged: with
    ``num_splits``, each block table's width cut in that many splits (:func:`split_program`, :func:`split_kv_call`,
    :func:`merge_splits`); without, the work cut by the lengths (:func:`tqjax.pallas.pieces.piece_table`, steps of
    ``pages_per_chunk`` pages, ``resident`` programs a wave; :func:`piece_program`, :func:`pieces_call`,
    :func:`tqjax.pallas.pieces.merge_pieces`, which merges only the first ``keep`` of the kernel's ``rows`` query
    rows, rounded up to a power of 2). ``launch``: the launches' other arguments. Returns [B, Hk, rows', out_dim]
    float32, ``keep <= rows' <= rows``, the first ``keep`` rows the queries' (zeros for an empty sequence)."""
    b, hk = queries[0].shape[:2]
    max_blocks = block_tables.shape[1]
    if num_splits is not None:
        program = split_program(kernel, n_queries=len(queries), pages_per_split=-(-max_blocks // num_splits))
        o, lse = split_kv_call(program, block_tables, seq_lens, queries, cache_arrays, num_splits=num_splits,
                               rows=rows, out_dim=out_dim, interpret=interpret, **launch)
        return merge_splits(o, lse)
    work, info = piece_table(seq_lens, num_kv_heads=hk, block_size=block_size, max_blocks=max_blocks,
                             step_pages=pages_per_chunk, resident=resident, interpret=interpret)
    n_pieces = grid_size(b, hk, resident, None, WAVES, -(-max_blocks // pages_per_chunk))
    o, lse = pieces_call(piece_program(kernel), work, block_tables, seq_lens, queries, cache_arrays,
                         n_pieces=n_pieces, rows=rows, out_dim=out_dim, interpret=interpret, **launch)
    # o [slots, R, D]; the log-sum-exps [slots, R] in base e
    kept = min(rows, pl.next_power_of_2(keep))
    # one warp a merge program: the few-program rule (pieces.merge_warps) was measured on the Mosaic decode's layout
    merged = merge_pieces(o, lse[:, None, :], info, batch=b, rows=kept, d_major=False, lse_scale=_LOG2E,
                          num_warps=1, interpret=interpret)
    return merged.reshape(b, hk, kept, out_dim)


def merge_splits(o: jax.Array, lse: jax.Array) -> jax.Array:
    """Log-sum-exp merge of split-KV partial results: ``o`` [S, ...rows, D] (each split's output,
    normalised within the split), ``lse`` [S, ...rows] (-inf for an empty split) -> [...rows, D]
    float32; a row whose splits are all empty (a sequence with no tokens) gets zeros."""
    m = jnp.max(lse, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m_safe[None])
    denom = jnp.sum(w, axis=0)
    return jnp.sum(w[..., None] * o, axis=0) / jnp.where(denom > 0, denom, 1.0)[..., None]


LOOKUPS = ("poly", "poly_fma", "prmt", "select")
_PTX_LOOKUPS = ("poly_fma", "prmt")  # inline PTX: compiled CUDA kernels only
SPLIT_QUERY = "split_query"  # tensor-core products on tf32 hi + lo operands (see paged_decode)
SPLIT_F16 = "split_f16"  # tensor-core products on float16 operands, the default (see paged_decode)
DOT_MODES = ("mma", "mma_t", "fma")
CUTS = ("lengths", "width")  # the work across programs: pieces by the sequences' lengths, or splits of the width


#: The kernels behind :func:`paged_decode`.
IMPLEMENTATIONS = ("mosaic", "triton")


def choose_implementation(cache: PagedKVCache, group: int, *, interpret: bool = False,
                          triton_args: bool = False) -> str:
    """The decode kernel :func:`paged_decode` runs by default: "mosaic" (the Mosaic GPU kernel, faster:
    docs/PERFORMANCE.md) on a Hopper GPU for a cache it reads (``group`` query heads per KV head), unless
    in interpret mode or given Triton tuning arguments (``triton_args``); "triton" otherwise."""
    from tqjax.pallas.decode_mgpu import on_hopper, unsupported

    if interpret or triton_args or not on_hopper():
        return "triton"
    return "mosaic" if unsupported(cache.config, group, cache.block_size) is None else "triton"


def paged_decode(
    query: jax.Array,
    cache: PagedKVCache,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    block_tokens: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    lookup: str | None = None,
    dot_mode: str | None = None,
    interpret: bool = False,
    precision=None,
    implementation: str | None = None,
    cut: str | None = None,
) -> jax.Array:
    """Pallas paged decode; same contract as :func:`tqjax.reference.paged_decode_reference`.

    query [B, Hq, D], block_tables [B, max_blocks] int32, seq_lens [B] int32 -> [B, Hq, D].
    ``implementation`` (:data:`IMPLEMENTATIONS`): "triton", this module's kernel (CUDA, ROCm, interpret
    mode); "mosaic", :func:`tqjax.pallas.decode_mgpu.paged_decode_mgpu` (Hopper GPUs; the caches of
    :func:`tqjax.pallas.decode_mgpu.unsupported`; it takes ``num_splits`` only); None:
    :func:`choose_implementation`, which takes "mosaic" where it runs and no Triton tuning argument
    is given, else "triton".
    ``cut`` (:data:`CUTS`) how the work is split across programs: "lengths", in pieces cut by the sequences'
    lengths on the device (:mod:`tqjax.pallas.pieces`; the Mosaic decode's only cut without ``num_splits``);
    "width", each sequence's block table cut in ``num_splits`` equal splits; None: "width" where ``num_splits`` is
    given, else the tuned cut ("lengths"; :data:`tqjax.pallas.tuning.DEFAULTS` says what it was measured against).
    Tuning (static; None takes :func:`tqjax.pallas.tuning.decode_params`, measured per device kind
    and preset): ``num_splits`` (None: from batch, heads and the device's core count),
    ``block_tokens`` (tokens per inner step; at least one block), ``num_warps``, ``num_stages``,
    ``lookup`` (:data:`LOOKUPS`, see :class:`CentroidLookup`; "prmt", the CUDA default, and "poly_fma"
    need compiled PTX: with ``interpret=True`` the tuned default becomes "poly", an explicit "prmt" or
    "poly_fma" is refused, as it is on ROCm), ``dot_mode`` ("mma": tensor-core products, fp32-accurate for scores
    and values, the GQA group as their rows, padded to 16, the ROCm default; "mma_t": the same products
    transposed, tokens as the rows and the group as the columns, padded to 8 only, which halves the
    per-step softmax and accumulator work of a group of <= 8, the CUDA and interpret-mode default;
    "fma": CUDA-core float32), ``precision`` of the tensor-core products ("mma", "mma_t"):
    :data:`SPLIT_F16` (the default) runs the score and value products on float16
    operands: the key tile (decode tables, fp8 keys, QJL signs) and the value codes are exact in
    float16, and the query rows and each step's probabilities are scaled by powers of 2 into
    float16's range and split into float16 hi + lo parts, two products each, fp32-accurate (a decode
    table not exact in float16 falls back to :data:`SPLIT_QUERY`); :data:`SPLIT_QUERY` does the same
    with tf32 hi + lo parts and TF32 products (the key tile is exact in tf32 too); in interpret mode
    the products of either run at HIGHEST. Any jax precision runs one score product at it (e.g.
    ``DotAlgorithmPreset.TF32_TF32_F32_X3``) and the tf32 split for the values.
    """
    check_decode_inputs(query, cache, block_tables, seq_lens, kind="turboquant")
    check_cut(cut, num_splits)
    triton_args = {"block_tokens": block_tokens, "num_warps": num_warps, "num_stages": num_stages, "lookup": lookup,
                   "dot_mode": dot_mode, "precision": precision}
    if implementation is None:
        implementation = choose_implementation(cache, query.shape[1] // cache.num_kv_heads, interpret=interpret,
                                               triton_args=any(v is not None for v in triton_args.values()))
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
    if implementation == "mosaic":
        given = [k for k, v in triton_args.items() if v is not None] + (["interpret"] if interpret else [])
        if given:
            raise ValueError(f"the Mosaic GPU decode takes num_splits only, not {given}")
        if cut == "width" and num_splits is None:
            raise ValueError("the Mosaic GPU decode cuts the work by the lengths unless num_splits is given")
        from tqjax.pallas.decode_mgpu import paged_decode_mgpu_unchecked

        return paged_decode_mgpu_unchecked(query, cache, block_tables, seq_lens, scale=scale, softcap=softcap,
                                           num_splits=num_splits)
    platform = detect_platform()
    tuned = decode_params(cache.config.name, platform)
    block_tokens = tuned["block_tokens"] if block_tokens is None else block_tokens
    num_warps = tuned["num_warps"] if num_warps is None else num_warps
    num_stages = tuned["num_stages"] if num_stages is None else num_stages
    if lookup is None:
        lookup = "poly" if interpret and tuned["lookup"] in _PTX_LOOKUPS else tuned["lookup"]
    dot_mode = tuned["dot_mode"] if dot_mode is None else dot_mode
    if lookup not in LOOKUPS:
        raise ValueError(f"lookup must be one of {LOOKUPS}, got {lookup!r}")
    if lookup in _PTX_LOOKUPS and (interpret or platform.kind == "rocm"):
        raise ValueError(f"lookup {lookup!r} is inline PTX: compiled CUDA kernels only (not interpret mode, not "
                         "ROCm); use 'poly'")
    if dot_mode not in DOT_MODES:
        raise ValueError(f"dot_mode must be one of {DOT_MODES}, got {dot_mode!r}")
    block_tokens = max(block_tokens, cache.block_size)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    b, max_blocks = block_tables.shape
    pages_per_chunk = block_tokens // cache.block_size
    num_splits, resident = plan_cut(cut, num_splits, tuned["cut"], batch=b, num_kv_heads=cache.num_kv_heads,
                                    max_blocks=max_blocks, pages_per_chunk=pages_per_chunk)
    if precision is None:
        precision = SPLIT_F16
    return _paged_decode(
        query, cache, block_tables, seq_lens, scale=scale, softcap=softcap, num_splits=num_splits,
        block_tokens=block_tokens, num_warps=num_warps, num_stages=num_stages, lookup=lookup,
        dot_mode=dot_mode, interpret=interpret, precision=precision, resident=resident,
    )
