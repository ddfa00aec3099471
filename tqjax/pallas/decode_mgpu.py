"""Paged TurboQuant decode as a Mosaic GPU kernel (Pallas ``plgpu``): NVIDIA Hopper (sm_90a) only.

Why a second decode kernel. :mod:`tqjax.pallas.decode` (Triton lowering, CUDA and ROCm) is bound by
instructions per cache element: Pallas cannot ask Triton for a register layout in which a thread holds
whole packed words, so each 4-bit code is unpacked, looked up and staged for the tensor cores on its
own (``docs/PERFORMANCE.md``, "What would fix it", item 1). Mosaic GPU lets the kernel pick layouts:

- keys: each thread loads whole uint32 words of its two token rows (16-byte loads; 8 four-bit codes or
  4 float8 values a word) and one PTX block turns 8 codes into 8 float16 values (byte permutes of the
  float16 centroids: 18 instructions for the presets' odd tables, 8 entries and a sign; float8:
  ``cvt.rn.f16x2.e4m3x2``). The float16 pairs are the registers
  of the score product's left operand in Mosaic's WGMMA layout: the channels are taken in the order
  :func:`key_channel_order` in which a thread's columns are its words' channels, and the query in the
  same order (the product sums over the channels), so the key tile never goes through shared memory;
- values: thread t converts half of token row t // 2 (one value scale), ``(code - 7.5) * 2**e`` (11
  instructions per word; ``2**e`` is the token's value scale's power of two, the rest of the scale goes
  with the probabilities; the channels in :func:`value_channel_order`, undone on the output), and stores
  it into the float16 tile with 16-byte stores in an order (:func:`value_tile_plan`) that meets no
  shared-memory bank conflict, after the score product is waited for (so the keys' registers are free:
  at most 128 registers a thread, 4 programs a multiprocessor at D=128); two value tiles alternate (float8
  keys, whose words take twice the shared memory: one tile), one probability tile; the single tiles are
  stored once every warp is done with the previous step's value product (with the lazy maximum below, an
  mbarrier each thread arrives on after its warp's wait; else the maximum's barrier); one barrier a step, two
  without the lazy maximum;
- the products are ``wgmma`` with the tokens as the M dimension (64 per step): logits^T [64, 16] =
  K [64, D] @ q^T, out^T [D, 16] = V^T [D, 64] @ p^T. The 16 columns are the GQA group (at most 8 query
  heads) twice: the float16 high parts of the (power-of-2 scaled) query and its low parts, and after the
  softmax the high and low float16 parts of the probabilities; the halves are added in registers
  (fp32-accurate products from float16 operands, as the Triton kernel's split products), so the softmax
  and the output accumulate on 8 columns; groups of at most 4 query heads (:func:`narrow`: the GQA ratio 4 of the
  sweeps' Hq=32, Hk=8) take 8 columns instead, each head's high and low parts side by side (:func:`query_row`), so
  that a thread's pair of columns is one head's: their sum is that head's logit (:func:`_fold_pairs`) and the
  softmax and the output run on one value a row, every lane a real head's, where the 8 folded columns were half
  padding (7-11% fewer loop instructions in ptxas's code, 5-12% faster on the H200);
- the softmax statistics reduce across the warpgroup only for the maximum, and that lazily: the probabilities
  are taken against the running maximum unless a logit exceeds it by more than :data:`LAZY_MAX_BITS` (the
  barrier that commits the probability tile votes on it, ``bar.red.or``); only then (the first step, and
  where the logits climb) does the step take the maximum (:func:`lazy_maximum`: not for 3-bit values in 16
  columns, which take it every step). The
  denominators and the value zero-point terms accumulate per thread (its two token rows' sum) and are summed
  across the warpgroup once at the end;
- the output and log-sum-exps are written through the value tiles' shared memory after the loop;
- pages come by TMA, issued from one warp, ``stages`` 64-token steps ahead; the per-token scalars and the
  next pages' ids are loaded from global memory a step ahead;
- the grid is ``(Hk, pieces)``: the work is cut by the sequences' lengths on the device (:mod:`tqjax.pallas.pieces`:
  a piece of a sequence a program, its partial output merged with the others' by their log-sum-exps; programs past
  the last piece skip the body);
- the query's operands (rotated, in the key tiles' column order, split into float16 high and low parts of
  power-of-2 scaled rows, and the inverse powers) and the piece table come from one small Triton kernel before
  the decode (:func:`decode_prologue`, a program per sequence and KV head; XLA took five kernels for the query; for
  Hadamard rotations from 64 pairs on, :func:`hadamard_form`, the transform itself instead of the matrix's products).

Contract: the same as :func:`tqjax.reference.paged_decode_reference` (block tables, ragged and empty
sequences, split-KV with a log-sum-exp merge, logit softcap). Supported caches: :func:`unsupported`
says why not (then :func:`tqjax.pallas.decode.paged_decode` runs the Triton kernel): 3- or 4-bit MSE
keys of one segment (3-bit: :mod:`tqjax.packing`'s two fields, :func:`key3_word_asm`), 2- or 3-bit MSE keys
with a QJL sign sketch (the sketch times the token's residual norm, :func:`qjl_word_asm`, a second score
product with the projected query into the same sums), split keys of 4+3 or 3+2 bits (two segments of D/2
channels with their own tables and norms: two key tiles, two score products into their own sums) or float8
keys (``cvt.rn.f16x2.e4m3x2``, no norms), and 3- or 4-bit values (3-bit: :func:`value3_word_asm`, codes centred
on 3.5): every preset (``turboquant_4bit_nc``, ``turboquant_k8v4``, ``turboquant_k3v4_nc``,
``turboquant_3bit_nc``, ``turboquant_kqjl4v4``, ``turboquant_kqjl3v4``, ``turboquant_k3p5v4``,
``turboquant_k2p5v4``); head_dim 64, 128 or 256 (rows not a multiple of 16 bytes, 3-bit codes at 64 and split
keys at 128, are copied as whole pages: :func:`copy_shape`; split keys not at 64), at most 8 query heads per KV
head, block_size 16, 32 or 64. There is no interpret mode: the CPU tests check that the kernel lowers
(``jax.export`` for "cuda") and that its PTX computes the right values (an emulator);
``tests/test_decode_mgpu.py -m gpu`` runs it against the reference on a Hopper GPU.

Index arithmetic: the cache arrays are indexed per dimension (KV head, page, row, word), each index far
below 2**31 for any cache that fits a GPU; the TMA descriptors take 64-bit strides.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as pltriton

from tqjax.codec import key_codec
from tqjax.config import TurboQuantConfig
from tqjax.layout import PagedKVCache
from tqjax.pallas.pieces import (
    FILL,
    WAVES,
    decode_waves,
    grid_size,
    merge_pieces,
    piece_table_reference,
    table_program,
)

__all__ = [
    "HADAMARD_PAIRS", "LAZY_MAX_BITS", "NARROW", "PROGRAMS_PER_CORE", "VALUE_EXP_MAX", "copy_shape",
    "decode_prologue", "decode_prologue_reference", "flat_pages", "fp8_words_asm", "hadamard_form", "key2_word_asm",
    "key3_channel_order", "key3_word_asm", "key_channel_order", "key_tables", "key_word_asm", "lazy_maximum",
    "merge_kernel_pieces", "narrow", "odd_table", "on_hopper", "paged_decode_mgpu", "paged_decode_mgpu_unchecked",
    "programs_per_core", "prologue_defaults", "qjl_channel_order", "qjl_word_asm", "qjl_word_plan", "query_bound",
    "query_columns", "query_matrix", "query_row", "resident_programs", "smem_load", "table_words", "tile_order",
    "tile_query", "tile_unit", "unsupported", "value3_channel_order", "value3_word_asm", "value_channel_order",
    "value_constants", "value_tile_plan", "value_word_asm",
]

TOKENS = 64  # tokens per step: the wgmma M of the score product, its K in the value product
HALF = 8  # query heads per KV head, at most (one 8-column block of a wgmma N)
COLS = 2 * HALF  # high and low float16 parts
#: Groups of at most this many query heads take the products' narrow form: 8 columns, head r's high and low parts in
#: columns 2r and 2r + 1, which a thread's register pair holds (:func:`query_row`), so that every lane's softmax work is
#: a query head's, not half of it padding (:func:`_fold_pairs`).
NARROW = HALF // 2
BLOCK_SIZES = (16, 32, 64)
HEAD_DIMS = (64, 128, 256)
_LOG2E = math.log2(math.e)
_F16_TILE = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
_F16_TOP = 14  # the query rows are scaled by 2**(14 - e), their bound in [2**13, 2**14) (:func:`_bound_exponent`)
#: The value tile's power of two is at most 2**9 (-71.5 * 2**e is a float16 value); a larger value scale's
#: excess goes with the probabilities, whose factor stays below 2**15 for scales below 2**14 (the store's 4-bit
#: value scales are at most 2 * 65504 / 15 = 8734: it clamps values to float16's range).
VALUE_EXP_MAX = 9
_P_TOP = 10  # the probabilities' factor: value scale / 2**e * 2**10, in [2**10, 2**15) for scales below 2**14
#: With a lazy maximum (:func:`lazy_maximum`) the running maximum is raised only when a logit exceeds it by more
#: than this many powers of 2 (log2 units): the probabilities stay below 2**LAZY_MAX_BITS, and their factor is
#: 2**LAZY_MAX_BITS smaller (times a probability, still below 2**15, float16's largest power of 2).
LAZY_MAX_BITS = 3


def narrow(group: int) -> bool:
    """Whether a group of ``group`` query heads (per KV head) takes the products' narrow form (:data:`NARROW`)."""
    return group <= NARROW


def query_row(r: int, part: int, group: int) -> int:
    """The score product's column (the query operand's row, :func:`decode_prologue`) of query head ``r``'s float16
    high (``part`` 0) or low (1) part: 2 r + part in the narrow form (:func:`narrow`: 8 columns), else r + 8 part (16
    columns: the 8 rows' high parts, then their low parts)."""
    return 2 * r + part if narrow(group) else r + HALF * part


def value_constants(bits: int, lazy: bool = False) -> tuple[float, int, int]:
    """(centre, probability factor's power of 2, mantissa bits of the tile offset's float16) of ``bits``-bit value
    codes: the codes are centred on (2**bits - 1) / 2, the tile offset is -(64 + centre) * 2**e (0x078: 71.5,
    0x038: 67.5), and 3-bit scales reach 2 * 65504 / 7 = 18715, so their probability factor is scale / 2**e
    * 2**9 (below 2**15 for scales below 2**15). ``lazy``: a lazy maximum's probabilities (at most
    2**:data:`LAZY_MAX_BITS`), the factor that much smaller."""
    top = _P_TOP - (LAZY_MAX_BITS if lazy else 0)
    if bits == 4:
        return 7.5, top, 0x078
    if bits == 3:
        return 3.5, top - 1, 0x038
    raise ValueError(f"value bits must be 3 or 4, got {bits}")


def lazy_maximum(config: TurboQuantConfig, group: int = HALF) -> bool:
    """Whether the kernel takes the softmax maximum lazily for ``config`` and groups of ``group`` query heads (raised
    only where a logit exceeds the running maximum by more than :data:`LAZY_MAX_BITS`; else the maximum across the
    warpgroup every step): for 4-bit values, split keys included since their scales are carried as words (128
    registers; H200, B=32, 16k tokens on 32776 pages, kernels in turns: k3p5v4 325.1 against 336.4 us eager), and
    3-bit values in the narrow form (:func:`narrow`, 127-128 registers at every shape compiled,
    docs/data/static_sass_narrow_cpu_2026-12-03_s43.log; H200, in turns:
    B=32, 16k 300.2 against 305.8 us, B=8, 128k 586.5 against 596.4, B=128, 4k 320.7 against 325.3;
    docs/data/decode_mgpu_lazy3_h200_2026-12-03_s43.log). Not 3-bit values in 16 columns: 332.0 against 343.9 us,
    but ptxas then gives 142-152 registers at B=1 on caches of 2048-8192 pages (3 programs a multiprocessor;
    docs/data/decode_mgpu_lazy_all_h200_2026-11-30_s23.log)."""
    return config.value_bits == 4 or narrow(group)


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.0), where this kernel runs."""
    if jax.default_backend() != "gpu":
        return False
    return str(getattr(jax.devices()[0], "compute_capability", "")) == "9.0"


def unsupported(config: TurboQuantConfig, group: int, block_size: int) -> str | None:
    """Why this kernel cannot decode ``config`` (None if it can)."""
    segs = config.key_segments
    fp8 = config.key_format == "fp8"
    mse = config.key_format == "mse" and len(segs) == 1 and segs[0].bits in (3, 4)
    qjl = config.key_format == "prod" and [s.bits for s in segs] in ([3, 1], [2, 1])
    split = config.key_format == "split" and [s.bits for s in segs] in ([4, 3], [3, 2])
    if not (fp8 or mse or qjl or split):
        return (f"keys are {config.key_format} {[s.bits for s in segs]}-bit, this kernel reads 3- and 4-bit MSE "
                "keys, 2- and 3-bit MSE keys with a QJL sign sketch, 4+3- and 3+2-bit split keys and fp8 keys only")
    if config.value_bits not in (3, 4):
        return f"values are {config.value_bits}-bit, this kernel reads 3- and 4-bit values only"
    if config.head_dim not in HEAD_DIMS:
        return f"head_dim {config.head_dim} not in {HEAD_DIMS}"
    if split and config.head_dim == 64:
        return "split keys at head_dim 64 are two segments of 32 channels, this kernel's key tiles take 64 or more"
    if group > HALF:
        return f"{group} query heads per KV head, this kernel takes at most {HALF}"
    if block_size not in BLOCK_SIZES:
        return f"block_size {block_size} not in {BLOCK_SIZES}"
    from tqjax.pallas.decode import _exact_in_f16

    if not all(_exact_in_f16(table) for table in key_tables(config)):
        return "the key table is not exact in float16"
    return None


def key_tables(config: TurboQuantConfig) -> list[np.ndarray]:
    """float32 [2**bits] each: the MSE key tables (codebooks) of ``config``'s key tiles: one, split keys two
    (one per segment), float8 keys none."""
    if config.key_format == "fp8":
        return []
    quantizers = key_codec(config).quantizers  # {segment: its MSE quantizer}
    return [np.asarray(quantizers[i].centroids, np.float32) for i in range(2 if config.key_format == "split" else 1)]


def _imm(x: int) -> str:
    return f"0x{x & 0xFFFFFFFF:08X}"


def odd_table(table: np.ndarray) -> bool:
    """Whether a 16-entry table is odd in float16 (entry 15 - k is minus entry k, as the Lloyd-Max tables of
    the symmetric coordinate distributions): then 8 entries and a sign make it (:func:`key_word_asm`)."""
    f16 = np.asarray(table, np.float32).astype(np.float16)
    return f16.shape == (16,) and bool(np.array_equal(f16[::-1], -f16))


def key_word_asm(table: np.ndarray) -> str:
    """PTX: a uint32 word of 8 four-bit key codes (``$4``, code k in bits 4k..4k+3) -> the 8 table
    values as float16 pairs ``$0..$3`` (codes 2i, 2i+1; the first in the low half).

    ``table``: 16 values exact in float16. Per 4 codes, each code's low 3 bits select (``prmt``) a byte of
    an 8-entry table in each byte plane (low, high), and two ``prmt`` pair low and high bytes. An odd table
    (:func:`odd_table`, 18 instructions a word): the selector of code k >= 8 is 15 - k (the code XOR 15:
    three integer instructions for all 8 codes and a ``lop3``) and a ``lop3`` flips the high byte's sign bit
    where a sign-replicating ``prmt`` marked the code's top bit. Any other table (21 instructions): the upper
    half-table is looked up too and the top-bit mask picks per byte (``lop3``).
    """
    f16 = np.asarray(table, np.float32).astype(np.float16).view(np.uint16).astype(np.uint32)
    if f16.shape != (16,):
        raise ValueError(f"a 4-bit table has 16 entries, got {f16.shape}")
    odd = odd_table(table)

    def plane(vals) -> list[str]:  # 8 bytes -> two b32 immediates, entry k in byte k
        return [_imm(sum(int(vals[4 * r + i]) << (8 * i) for i in range(4))) for r in range(2)]

    tables = {"nl": plane(f16[:8] & 0xFF), "nh": plane(f16[:8] >> 8)}
    if not odd:
        tables |= {"pl": plane(f16[8:] & 0xFF), "ph": plane(f16[8:] >> 8)}
    regs = ", ".join(f"{k}{r}" for k in tables for r in range(2))
    lines = ["{", f".reg .b32 w, j, jh, a, m0, m1, u, v, lo, hi, y, z, {regs};"]
    operands = {("nl", 0): "$5", ("nh", 0): "$6"} if odd else {}  # held in registers by the caller
    lines += [f"mov.b32 {k}{r}, {operands.get((k, r), val)};"
              for k, pair in tables.items() for r, val in enumerate(pair)]
    lines += ["mov.b32 w, $4;"]
    if odd:  # j: code k, or 15 - k where its top bit is set (the low 3 bits of k XOR 7; bit 3 cleared)
        lines += [
            "and.b32 y, w, 0x88888888;",
            "shr.b32 z, y, 3;",
            "sub.u32 z, y, z;",  # 7 in the nibbles with the top bit set
            "lop3.b32 j, w, z, 0x77777777, 0x28;",  # (w ^ z) & 0x77777777
        ]
    else:
        lines += ["and.b32 j, w, 0x77777777;"]  # prmt reads selector nibbles 0..3 (bit 3 would replicate signs)
    lines += [
        "shr.b32 jh, j, 16;",
        "shl.b32 a, w, 4;",
        "prmt.b32 m0, a, w, 0xD9C8;",  # code k's top bit -> 0xFF/0x00 in byte k (codes 0..3)
        "prmt.b32 m1, a, w, 0xFBEA;",  # codes 4..7
    ]
    for sel, m, out0, out1 in (("j", "m0", "$0", "$1"), ("jh", "m1", "$2", "$3")):
        if odd:
            lines += [
                f"prmt.b32 lo, nl0, nl1, {sel};",
                f"prmt.b32 hi, nh0, nh1, {sel};",
                f"lop3.b32 hi, hi, {m}, 0x80808080, 0x78;",  # hi ^ (m & 0x80): minus the entry 15 - k
            ]
        else:
            lines += [
                f"prmt.b32 u, nl0, nl1, {sel};",
                f"prmt.b32 v, pl0, pl1, {sel};",
                f"lop3.b32 lo, v, u, {m}, 0xE4;",  # m ? v : u
                f"prmt.b32 u, nh0, nh1, {sel};",
                f"prmt.b32 v, ph0, ph1, {sel};",
                f"lop3.b32 hi, v, u, {m}, 0xE4;",
            ]
        lines += [f"prmt.b32 {out0}, lo, hi, 0x5140;", f"prmt.b32 {out1}, lo, hi, 0x7362;"]
    return "\n".join(lines + ["}"])


def fp8_words_asm() -> str:
    """PTX: two uint32 words of 4 float8 e4m3 keys each (``$4``, ``$5``; channel k in byte k) -> the 8
    values as float16 pairs ``$0..$3`` (channels 2i, 2i+1; the first in the low half): one
    ``cvt.rn.f16x2.e4m3x2`` per pair (exact: e4m3 values are float16 values)."""
    lines = ["{", ".reg .b16 a, b, c, d;", "mov.b32 {a, b}, $4;", "mov.b32 {c, d}, $5;"]
    lines += [f"cvt.rn.f16x2.e4m3x2 ${i}, {r};" for i, r in enumerate("abcd")]
    return "\n".join(lines + ["}"])


def qjl_word_asm(first: int) -> str:
    """PTX: a QJL sign word (``$4``: bit i the sign of sketch coordinate i of the word's 32) and ``$5`` = (g, g),
    float16 (the token's residual norm, >= 0) -> 4 float16 pairs ``$0..$3``: pair i holds (2 s - 1) g for the
    bits ``first + i`` (low half) and ``first + i + 16`` (high half), ``first`` in 0, 4, 8, 12. One shift puts
    both bits at their halves' sign bits, one ``lop3`` inverts them (a set bit is +g) and sets g. 8
    instructions."""
    if first not in (0, 4, 8, 12):
        raise ValueError(f"first in 0, 4, 8, 12, got {first}")
    lines = ["{", ".reg .b32 t;"]
    for i in range(4):
        lines += [f"shl.b32 t, $4, {15 - first - i};", f"lop3.b32 ${i}, t, 0x80008000, $5, 0xAE;"]  # ~a & b | c
    return "\n".join(lines + ["}"])


def qjl_word_plan(lane4, block, dim: int):
    """Thread lane ``lane4`` (lane % 4) and the key tile's column block ``block`` (0..dim/8 - 1, its register
    :func:`_keys_wgmma` index) -> (the row's sign word, first bit): the block's pair of columns takes bits
    ``first`` and ``first + 16`` of that word (:func:`qjl_word_asm`). Plain ints or :class:`_I32` values."""
    g = lane4 * (dim // 8) + block  # the thread's blocks in a row of 16 a word
    return g // 16, g % 16


def qjl_channel_order(dim: int) -> np.ndarray:
    """int [dim]: the sketch coordinate that column c of the sign tile in registers holds (the projected
    query's coordinates are taken in this order; the product sums over them): column 8 j + 2 l + k, of lane
    l % 4 = l's register j, is bit first + 16 k of sign word w, (w, first) = :func:`qjl_word_plan` (l, j)."""
    col = np.arange(dim)
    word, first = qjl_word_plan(col % 8 // 2, col // 8, dim)
    return 32 * word + first + 16 * (col % 2)


def key2_word_asm(table: np.ndarray, parity: int) -> str:
    """PTX: a word of 16 two-bit key codes (``$4``, channel c at bits 2c..2c+1) -> the table values of its
    channels 2n + ``parity`` (n = 0..7) as float16 pairs ``$0..$3`` (codes 2i, 2i+1 of the 8; the first in the
    low half), :func:`key3_channel_order`'s spans and parities. ``$5``, ``$6``: the table's byte planes (its 4
    entries), held in registers by the caller. One shift and a mask put code n in nibble n (bits 2, 3 clear),
    ``prmt`` looks it up in each plane. 11 instructions (parity 0: 10)."""
    f16 = np.asarray(table, np.float32).astype(np.float16).view(np.uint16).astype(np.uint32)
    if f16.shape != (4,):
        raise ValueError(f"a 2-bit table has 4 entries, got {f16.shape}")
    if parity not in range(2):
        raise ValueError(f"parity in 0..1, got {parity}")
    lines = ["{", ".reg .b32 t, j, jh, lo, hi;",
             f"shr.b32 t, $4, {2 * parity};", "and.b32 j, t, 0x33333333;", "shr.b32 jh, j, 16;"]
    for sel, out0, out1 in (("j", "$0", "$1"), ("jh", "$2", "$3")):
        lines += [f"prmt.b32 lo, $5, $5, {sel};", f"prmt.b32 hi, $6, $6, {sel};",
                  f"prmt.b32 {out0}, lo, hi, 0x5140;", f"prmt.b32 {out1}, lo, hi, 0x7362;"]
    return "\n".join(lines + ["}"])


def _code3_nibbles_asm(half: int, parity: int) -> list[str]:
    """PTX lines: the 8 three-bit codes of channels 2n + ``parity`` (n = 0..7) of a 16-channel span in
    :mod:`tqjax.packing`'s fields -> register ``j``, code n in nibble n (bit 3 clear). ``$4``: the 1-bit
    field's word, 16-bit half ``half`` the span's bit 0 (one ``prmt``, a byte a half, and two shift-and-mask
    rounds); ``$5``: the 2-bit field's word of the span (channel c at bits 2c..2c+1: one shift and a masked
    merge). Uses registers z (zero), y, t."""
    lines = [f"prmt.b32 y, $4, z, {_imm(0x4040 | (2 * half + 1) << 8 | 2 * half)};"]  # a byte of bits a half
    if parity:
        lines += ["shr.b32 y, y, 1;"]
    return lines + [
        "shl.b32 t, y, 4;", "lop3.b32 y, y, t, 0x05050505, 0xA8;",  # (y | t) & mask: bits 2m -> 0, 2, 8, 10
        "shl.b32 t, y, 2;", "lop3.b32 y, y, t, 0x11111111, 0xA8;",  # -> 0, 4, 8, 12: bit 0 of nibble n
        f"{'shr' if parity else 'shl'}.b32 t, $5, 1;",
        "lop3.b32 j, t, 0x66666666, y, 0xEA;",  # (t & mask) | y: nibble n is the code
    ]


def key3_word_asm(table: np.ndarray, half: int, parity: int) -> str:
    """PTX: 8 three-bit key codes in :mod:`tqjax.packing`'s fields -> the 8 table values as float16 pairs
    ``$0..$3`` (codes 2i, 2i+1 of the 8; the first in the low half). The 8 are the channels of one parity of a
    16-channel span (:func:`key3_channel_order`): ``$4``: the 1-bit field's word (code bit 0 of 32 channels),
    whose 16-bit half ``half`` holds the span's; ``$5``: the 2-bit field's word (bits 1-2 of the span's 16
    channels, channel c at bits 2c..2c+1); the 8 are channels 2n + ``parity``, n = 0..7; ``$6``, ``$7``: the
    low words of the table's byte planes (entries 0..3), held in registers by the caller (ptxas would
    rematerialise a constant before each ``prmt``).

    ``table``: 8 values exact in float16, looked up by ``prmt`` in each byte plane with 4-bit selectors
    (the code, bit 3 clear). Selector nibble n = code of channel 2n + parity: its bits 1-2 are the 2-bit
    field's bits 4n + 2 parity.. shifted by one (one shift, one masked merge), its bit 0 one ``prmt`` (a byte
    a half) and two shift-and-mask rounds away (16 instructions, parity 1: 17; was 25 with 8 consecutive
    channels, whose two fields have different strides)."""
    f16 = np.asarray(table, np.float32).astype(np.float16).view(np.uint16).astype(np.uint32)
    if f16.shape != (8,):
        raise ValueError(f"a 3-bit table has 8 entries, got {f16.shape}")
    if half not in range(2) or parity not in range(2):
        raise ValueError(f"half and parity in 0..1, got {half}, {parity}")
    planes = {"nl": f16 & 0xFF, "nh": f16 >> 8}
    lines = ["{", ".reg .b32 z, y, t, j, jh, lo, hi, nl0, nl1, nh0, nh1;", "mov.b32 z, 0;"]
    operands = {("nl", 0): "$6", ("nh", 0): "$7"}
    lines += [f"mov.b32 {k}{r}, {operands.get((k, r)) or _imm(sum(int(v[4 * r + i]) << (8 * i) for i in range(4)))};"
              for k, v in planes.items() for r in range(2)]
    lines += _code3_nibbles_asm(half, parity) + ["shr.b32 jh, j, 16;"]
    for sel, out0, out1 in (("j", "$0", "$1"), ("jh", "$2", "$3")):
        lines += [f"prmt.b32 lo, nl0, nl1, {sel};", f"prmt.b32 hi, nh0, nh1, {sel};",
                  f"prmt.b32 {out0}, lo, hi, 0x5140;", f"prmt.b32 {out1}, lo, hi, 0x7362;"]
    return "\n".join(lines + ["}"])


def value_word_asm() -> str:
    """PTX: a uint32 word of 8 four-bit value codes (``$4``, code k in bits 4k..4k+3), a float16 pair ``$5`` =
    (2**e, 2**e) and ``$6`` = (-71.5 * 2**e, -71.5 * 2**e) -> the centred codes ``(code - 7.5) * 2**e`` as
    float16 pairs ``$0..$3``, pair i holding codes i (low half) and i + 4 (high half)
    (:func:`value_channel_order`); exact for 2**-14 <= 2**e <= 2**:data:`VALUE_EXP_MAX`.

    Three shifts put codes i and i + 4 in bits 4..7 of the two halves, ``lop3`` sets float16 64's exponent
    over them (bits 4..7 of 64's mantissa count whole units: 64 + code) and one ``fma.rn.f16x2`` gives
    ``(64 + code) * 2**e - 71.5 * 2**e`` rounded once: exact (at most 5 significant bits). 11 instructions.
    Centred, the codes' products with the probabilities and the zero points' (the value zero plus 7.5
    scales) no longer are two large sums that cancel.
    """
    lines = ["{", ".reg .b32 a, b, c, q;", "shl.b32 a, $4, 4;", "shr.b32 b, $4, 4;", "shr.b32 c, $4, 8;"]
    for i, src in enumerate(("a", "$4", "b", "c")):
        lines += [f"lop3.b32 q, {src}, 0x00F000F0, 0x54005400, 0xEA;",  # (src & mask) | 64.0's bits
                  f"fma.rn.f16x2 ${i}, q, $5, $6;"]
    return "\n".join(lines + ["}"])


def value3_word_asm(half: int, parity: int) -> str:
    """PTX: 8 three-bit value codes in :mod:`tqjax.packing`'s fields, the channels 2n + ``parity`` (n = 0..7) of
    a 16-channel span (``$4``: the 1-bit field's word, half ``half`` the span's bit 0; ``$5``: the 2-bit field's
    word of the span), ``$6`` = (2**e, 2**e) and ``$7`` = (-67.5 * 2**e, -67.5 * 2**e) -> the centred codes
    ``(code - 3.5) * 2**e`` as float16 pairs ``$0..$3``, pair i holding codes n = i and i + 4
    (:func:`value3_channel_order`). The codes are gathered one a nibble as :func:`key3_word_asm` does, then
    :func:`value_word_asm`'s conversion (64 + code, one ``fma.rn.f16x2``, exact). 17 instructions (parity 1:
    18; was 25 with 8 consecutive channels)."""
    if half not in range(2) or parity not in range(2):
        raise ValueError(f"half and parity in 0..1, got {half}, {parity}")
    lines = ["{", ".reg .b32 z, y, t, j, a, b, c, q;", "mov.b32 z, 0;", *_code3_nibbles_asm(half, parity),
             "shl.b32 a, j, 4;", "shr.b32 b, j, 4;", "shr.b32 c, j, 8;"]
    for i, src in enumerate(("a", "j", "b", "c")):
        lines += [f"lop3.b32 q, {src}, 0x00F000F0, 0x54005400, 0xEA;", f"fma.rn.f16x2 ${i}, q, $6, $7;"]
    return "\n".join(lines + ["}"])


def value_channel_order(dim: int) -> np.ndarray:
    """int [dim]: the value channel that column c of the float16 value tile holds, and so row c of the
    kernel's output (:func:`value_word_asm` pairs codes i and i + 4 of each 8-channel word)."""
    col = np.arange(dim)
    return 8 * (col // 8) + (col % 8) // 2 + 4 * (col % 2)


def value3_channel_order(dim: int) -> np.ndarray:
    """int [dim]: the value channel that column c of the 3-bit values' float16 tile holds, and so row c of the
    kernel's output: 8-column unit u holds the channels of parity u % 2 of span u // 2 (16 channels), in
    :func:`value3_word_asm`'s pair order (codes n and n + 4 of the 8 in each pair)."""
    col = np.arange(dim)
    u, p = col // 8, col % 8
    return 16 * (u // 2) + u % 2 + 2 * (p // 2 + 4 * (p % 2))


# --------------------------------------------------------------------------------------------------
# Mosaic GPU helpers (inside ``plgpu.inline_mgpu``). Register maps, from Mosaic's layouts:
#  WGMMA_LAYOUT on [64, D] (16-bit): register (0, j, 0, 0, r, ...) of a thread holds the float16 pair of
#    columns 8j + 2 * (lane % 4) + 0..1 of token row 16 * warp + 8r + lane // 4;
#  WGMMA_ROW_LAYOUT on [64]: register (0, 0, r, 0, 0) holds row 16 * warp + 8r + lane // 4;
#  WGMMA_LAYOUT on [M, 16]: register index 1 is the 8-column block (0: high parts, 1: low parts).


def smem_load(ref, layout) -> jax.Array:
    """``plgpu.load`` of a whole (already indexed) shared-memory ref in ``layout``: jax 0.11 deprecates the index
    argument that jax 0.10 requires."""
    if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:  # jax 0.10
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def _ir():
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, memref, vector

    return ir, arith, llvm, memref, vector


def _thread_rows():
    """(lane % 4, token row of register r=0) of this thread, as i32 values."""
    ir, arith, *_ = _ir()
    i32 = ir.IntegerType.get_signless(32)
    c = functools.partial(mgpu.utils.c, ty=i32)
    tid = arith.remui(mgpu.utils.thread_idx(), c(128))
    lane = arith.remui(tid, c(32))
    row = arith.addi(arith.muli(arith.divui(tid, c(32)), c(16)), arith.divui(lane, c(4)))
    return arith.remui(lane, c(4)), row


class _I32:
    """An i32 MLIR value with Python's integer operators (non-negative operands), so that one index formula
    serves the kernel and the host-side tests (:func:`value_tile_plan` on plain ints)."""

    def __init__(self, v):
        self.v = v

    @staticmethod
    def _of(x):
        ir, *_ = _ir()
        return x.v if isinstance(x, _I32) else mgpu.utils.c(int(x), ir.IntegerType.get_signless(32))

    def _op(self, name, other):
        _, arith, *_ = _ir()
        return _I32(getattr(arith, name)(self.v, self._of(other)))

    def __add__(self, o):
        return self._op("addi", o)

    def __mul__(self, o):
        return self._op("muli", o)

    def __floordiv__(self, o):
        return self._op("divui", o)

    def __mod__(self, o):
        return self._op("remui", o)

    def __xor__(self, o):
        return self._op("xori", o)

    __radd__, __rmul__, __rxor__ = __add__, __mul__, __xor__


def key_channel_order(dim: int) -> np.ndarray:
    """int [dim]: the channel that column c of the key tile in registers holds (the query's channels are
    taken in this order too; the score product sums over the channels, so their order is free).

    In Mosaic's WGMMA layout, register (0, j, 0, 0, r) of a thread holds columns 8j + 2(lane % 4) + 0..1 of
    token row 16 * warp + 8r + lane // 4. With this order, thread lane % 4 = l converts the dim/32 words
    l * dim/32 .. (l + 1) * dim/32 - 1 of its rows (8 channels each, contiguous: 16-byte loads), word g's
    channel pair i going to register j = 4g + i."""
    g = dim // 32
    col = np.arange(dim)
    j, lane4, e = col // 8, (col % 8) // 2, col % 2
    return 8 * (lane4 * g + j // 4) + 2 * (j % 4) + e


def key3_channel_order(dim: int) -> np.ndarray:
    """int [dim]: the channel that column c of the 3-bit key tile in registers holds (:func:`key_channel_order`'s
    role for 3-bit codes). Thread lane % 4 = l converts the dim/64 16-channel spans l * dim/64 .. of its rows,
    each as two groups of 8 (its even channels, then its odd ones, :func:`key3_word_asm`): group g = 2 s + k
    of span s, code n of the group (channel 16 (l dim/64 + s) + 2n + k) into register j = 4g + n // 2,
    half n % 2."""
    col = np.arange(dim)
    j, lane4, e = col // 8, (col % 8) // 2, col % 2
    g, n = j // 4, 2 * (j % 4) + e
    return 16 * (lane4 * (dim // 64) + g // 2) + 2 * n + g % 2


def value_tile_plan(t, j, i, dim: int):
    """Thread ``t`` (0..127) of the value tile's conversion, its 16-byte load ``j`` (0..dim/64 - 1) and the
    load's word ``i`` (0..3) -> (token row, word of the row) it converts and stores. Plain ints or
    :class:`_I32` values.

    Thread t takes the row's half t % 2 (dim/16 words) of row t // 2 (so one row's value scale), 4 words at a
    time in an order staggered by thread, so that each quarter-warp's 16-byte loads (of the page words) and
    16-byte stores (into the 128-byte-swizzled float16 tile) meet 8 different 16-byte bank groups."""
    n = dim // 64  # 16-byte loads per thread
    c = j if n == 1 else j ^ ((t // (8 // n)) % n) ^ (t % 2)
    return t // 2, (t % 2) * (dim // 16) + 4 * c + i


def tile_unit(row, col_word, dim: int):
    """16-byte unit of (token row, 8-channel group) in a float16 [64, dim] tile stored with (8, 64) tiles and
    the 128-byte swizzle (the unit's index within its 128-byte line XORed with the line's row % 8)."""
    return ((row // 8) * (dim // 64) + col_word // 8) * 64 + (row % 8) * 8 + ((col_word % 8) ^ (row % 8))


def _convert(words: list, asm: str, extra: list) -> list:
    """One PTX block: i32 words (+ extra i32 operands) -> 4 i32 results (float16 pairs)."""
    ir, _, llvm, _, _ = _ir()
    i32 = ir.IntegerType.get_signless(32)
    struct = ir.Type.parse("!llvm.struct<(i32, i32, i32, i32)>")
    operands = list(words) + list(extra)
    out = llvm.inline_asm(struct, operands, asm, "=r,=r,=r,=r" + ",r" * len(operands))
    return [llvm.extractvalue(i32, out, [k]) for k in range(4)]


def _load_words(ptr, offset, count: int) -> list:
    """``count`` consecutive i32 words at word ``offset`` (an i32 value) of shared memory ``ptr``, in 16-byte
    loads (or one of 8 bytes for two words; the offset must be aligned to the load)."""
    ir, arith, llvm, _, vector = _ir()
    i32 = ir.IntegerType.get_signless(32)
    width = min(count, 4)
    words = []
    for k in range(count // width):
        at = mgpu.utils.getelementptr(ptr, [arith.addi(offset, mgpu.utils.c(k * width, i32))], i32)
        vec = llvm.load(ir.VectorType.get((width,), i32), at)
        words += [vector.extract(vec, [], [x]) for x in range(width)]
    return words


def _keys_wgmma(words_ref, dim: int, groups_of_row, word0: int = 0) -> mgpu.FragmentedArray:
    """SMEM key words uint32 [64, words a row] -> float16 [64, dim] in registers (WGMMA layout, channels in
    :func:`key_channel_order`), the score product's left operand. ``groups_of_row(ptr, row, lane4, r)``: the
    float16 pairs (i32) of this thread's dim/32 groups of 8 channels of token ``row`` (its register row r), 4 a
    group, from the words at ``ptr`` (the row's word ``word0``: a split key's second segment)."""
    ir, arith, _, _, vector = _ir()
    i32, f16 = ir.IntegerType.get_signless(32), ir.F16Type.get()
    layout = mgpu.WGMMA_LAYOUT
    regs = np.empty(layout.registers_shape((TOKENS, dim)), dtype=object)
    lane4, row0 = _thread_rows()
    ptr = mgpu.utils.memref_ptr(words_ref)
    if word0:
        ptr = mgpu.utils.getelementptr(ptr, [mgpu.utils.c(word0, i32)], i32)
    for r in range(2):
        row = arith.addi(row0, mgpu.utils.c(8 * r, i32))
        for g, parts in enumerate(groups_of_row(ptr, row, lane4, r)):
            for i, part in enumerate(parts):
                idx = (0, 4 * g + i, 0, 0, r) + (0,) * (regs.ndim - 5)
                regs[idx] = vector.bitcast(ir.VectorType.get((2,), f16),
                                           vector.from_elements(ir.VectorType.get((1,), i32), [part]))
    return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=None)


def _word_groups(dim: int, asm: str, words_per_group: int, extra=(), row_words: int | None = None):
    """:func:`_keys_wgmma`'s ``groups_of_row`` for keys of ``words_per_group`` whole words per 8 channels (1 of
    4-bit codes, 2 of float8 keys): the thread's words of the row in 16-byte loads, one PTX block a group.
    ``row_words``: the row's stride (None: these words only; split keys: both segments')."""
    ir, arith, *_ = _ir()
    c = functools.partial(mgpu.utils.c, ty=ir.IntegerType.get_signless(32))
    groups = dim // 32
    count = groups * words_per_group
    row_words = dim // 8 * words_per_group if row_words is None else row_words

    def groups_of_row(ptr, row, lane4, r):
        del r
        words = _load_words(ptr, arith.addi(arith.muli(row, c(row_words)), arith.muli(lane4, c(count))), count)
        return [_convert(words[g * words_per_group:(g + 1) * words_per_group], asm, list(extra))
                for g in range(groups)]

    return groups_of_row


def _key2_groups(dim: int, table: np.ndarray, extra, row_words: int):
    """:func:`_keys_wgmma`'s ``groups_of_row`` for 2-bit keys (a row's dim/16 words, then the QJL sign words;
    ``row_words``: the row's stride): the thread's span s (16 channels, groups 2s and 2s + 1,
    :func:`key3_channel_order`) is its word s (:func:`key2_word_asm`)."""
    ir, arith, *_ = _ir()
    c = functools.partial(mgpu.utils.c, ty=ir.IntegerType.get_signless(32))
    groups = dim // 32
    asms = [key2_word_asm(table, g % 2) for g in range(groups)]

    def groups_of_row(ptr, row, lane4, r):
        del r
        n2 = groups // 2  # the thread's words
        words = _load_words(ptr, arith.addi(arith.muli(row, c(row_words)), arith.muli(lane4, c(n2))), n2)
        return [_convert([words[g // 2]], asms[g], list(extra)) for g in range(groups)]

    return groups_of_row


def _key3_groups(dim: int, table: np.ndarray, extra, row_words: int):
    """:func:`_keys_wgmma`'s ``groups_of_row`` for 3-bit keys (:mod:`tqjax.packing`'s fields: a row's dim/32
    words of bit 0, then its dim/16 words of bits 1-2): the thread's span s (16 channels, two groups: g = 2s
    and 2s + 1, :func:`key3_channel_order`) takes half s % 2 of its bit-0 words' word s // 2 (dim 64: two
    threads share a word, the upper one shifted down) and its two-bit words' word s (:func:`key3_word_asm`).
    ``row_words``: the row's stride (QJL keys: the sign words follow)."""
    ir, arith, *_ = _ir()
    c = functools.partial(mgpu.utils.c, ty=ir.IntegerType.get_signless(32))
    groups = dim // 32
    asms = [key3_word_asm(table, g // 2 % 2, g % 2) for g in range(groups)]

    def groups_of_row(ptr, row, lane4, r):
        del r
        base = arith.muli(row, c(row_words))
        n0 = max(1, groups // 4)  # bit-0 words of the thread
        at0 = arith.divui(lane4, c(2)) if dim == 64 else arith.muli(lane4, c(n0))
        bit0 = _load_words(ptr, arith.addi(base, at0), n0)
        if dim == 64:  # channels 16 l .. 16 l + 15: half l % 2 of word l // 2
            bit0 = [arith.shrui(bit0[0], arith.muli(arith.remui(lane4, c(2)), c(16)))]
        n2 = groups // 2  # two-bit words of the thread
        two = _load_words(ptr, arith.addi(base, arith.addi(c(dim // 32), arith.muli(lane4, c(n2)))), n2)
        return [_convert([bit0[g // 4], two[g // 2]], asms[g], list(extra)) for g in range(groups)]

    return groups_of_row


def _sign_groups(dim: int, word0: int, row_words: int, gammas):
    """:func:`_keys_wgmma`'s ``groups_of_row`` for the QJL sign sketch: the row's sign words from word ``word0``
    of its ``row_words``; thread lane l's column blocks as :func:`qjl_word_plan` says (dim 64: two threads share
    a word, the upper one's half shifted down), ``gammas[r]``: the (g, g) float16 pair (i32) of its register row
    r's token."""
    ir, arith, *_ = _ir()
    c = functools.partial(mgpu.utils.c, ty=ir.IntegerType.get_signless(32))
    n = max(1, dim // 128)  # sign words of the thread

    def groups_of_row(ptr, row, lane4, r):
        at = arith.divui(lane4, c(2)) if dim == 64 else arith.muli(lane4, c(n))
        words = _load_words(ptr, arith.addi(arith.muli(row, c(row_words)), arith.addi(c(word0), at)), n)
        if dim == 64:
            words = [arith.shrui(words[0], arith.muli(arith.remui(lane4, c(2)), c(8)))]
        out = []
        for g in range(dim // 32):  # blocks 4 g .. 4 g + 3: word (4 g) // 16 of the thread's, bits from 4 g % 16
            out.append(_convert([words[4 * g // 16]], qjl_word_asm(4 * g % 16), [gammas[r]]))
        return out

    return groups_of_row


def _store_values(words_ref, tile_ref, dim: int, pow2: mgpu.FragmentedArray, centre: mgpu.FragmentedArray) -> None:
    """SMEM value words uint32 [64, dim / 8] -> ``(code - 7.5) * 2**e`` into the float16 tile ``tile_ref``
    ([64, dim], (8, 64) tiles, 128-byte swizzle), each thread as :func:`value_tile_plan` says; ``pow2``
    and ``centre``: the float16 pairs of the thread's row (WG_STRIDED [128] int32)."""
    ir, arith, llvm, _, vector = _ir()
    i32 = ir.IntegerType.get_signless(32)
    t = _I32(arith.remui(mgpu.utils.thread_idx(), mgpu.utils.c(128, i32)))
    extra = [vector.extract(x.registers.item(), [], [0]) for x in (pow2, centre)]
    words_ptr, tile_ptr = mgpu.utils.memref_ptr(words_ref), mgpu.utils.memref_ptr(tile_ref)
    unit_ty = ir.VectorType.get((4,), i32)
    asm = value_word_asm()
    for j in range(dim // 64):
        row, word0 = value_tile_plan(t, j, 0, dim)
        words = _load_words(words_ptr, (row * (dim // 8) + word0).v, 4)
        for i, word in enumerate(words):
            parts = _convert([word], asm, extra)
            unit = tile_unit(row, word0 + i, dim)
            llvm.store(vector.from_elements(unit_ty, parts), mgpu.utils.getelementptr(tile_ptr, [unit.v], unit_ty))


def _store_values3(words_ref, tile_ref, dim: int, pow2: mgpu.FragmentedArray, centre: mgpu.FragmentedArray) -> None:
    """SMEM 3-bit value words uint32 [64, 3 dim / 32] (:mod:`tqjax.packing`'s fields: a row's dim/32 words of bit 0,
    then its dim/16 words of bits 1-2) -> ``(code - 3.5) * 2**e`` into the float16 tile (as :func:`_store_values`).
    Thread t converts half t % 2 of row t // 2 (one value scale), its 8-channel units in the order
    g = i ^ 4 (t % 2), so that a quarter-warp's 16-byte stores meet 8 bank groups (the halves' units of a row
    otherwise share theirs; dim 64: g = i, a half row's 4 units); unit g holds parity g % 2 of span g // 2
    (:func:`value3_channel_order`), its words are loaded in that order (the bit-0 word of g // 4, the two-bit
    word of g // 2), so each group's half and parity stay static (:func:`value3_word_asm`)."""
    ir, arith, llvm, _, vector = _ir()
    i32 = ir.IntegerType.get_signless(32)
    t = _I32(arith.remui(mgpu.utils.thread_idx(), mgpu.utils.c(128, i32)))
    row, h = t // 2, t % 2
    extra = [vector.extract(x.registers.item(), [], [0]) for x in (pow2, centre)]
    words_ptr, tile_ptr = mgpu.utils.memref_ptr(words_ref), mgpu.utils.memref_ptr(tile_ref)
    unit_ty = ir.VectorType.get((4,), i32)
    groups, n0, n2 = dim // 16, dim // 64, dim // 32  # a half row's groups, bit-0 words, two-bit words
    base = row * (3 * dim // 32)
    if dim == 64:  # a half row is 4 units, one bit-0 word, two two-bit words: no stagger
        bit0 = _load_words(words_ptr, (base + h).v, 1)
        two = _load_words(words_ptr, (base + 2 + h * 2).v, 2)
    else:
        bit0 = [_load_words(words_ptr, (base + h * n0 + (h ^ k)).v, 1)[0] for k in range(n0)]
        two = [w for k in range(0, n2, 2)
               for w in _load_words(words_ptr, (base + dim // 32 + h * n2 + ((h * 2) ^ k)).v, 2)]
    for i in range(groups):
        parts = _convert([bit0[i // 4], two[i // 2]], value3_word_asm(i // 2 % 2, i % 2), extra)
        unit = tile_unit(row, h * groups + (i if dim == 64 else (h * 4) ^ i), dim)
        llvm.store(vector.from_elements(unit_ty, parts), mgpu.utils.getelementptr(tile_ptr, [unit.v], unit_ty))


def _fold_halves(x: mgpu.FragmentedArray) -> mgpu.FragmentedArray:
    """[M, 16] (WGMMA layout) -> [M, 8]: the sum of the two 8-column blocks (high part + low part)."""
    regs = np.array(x.registers, dtype=object)
    assert regs.shape[1] == 2, regs.shape
    out = regs[:, :1].copy()
    for idx in np.ndindex(*out.shape):
        out[idx] = mgpu.fragmented_array.addf(regs[idx], regs[(idx[0], 1, *idx[2:])])
    return mgpu.FragmentedArray(_registers=out, _layout=x.layout, _is_signed=x.is_signed)


def _split_halves(x: mgpu.FragmentedArray) -> mgpu.FragmentedArray:
    """float32 [M, 8] (WGMMA layout) -> float16 [M, 16]: block 0 = hi = f16(x), block 1 = lo = f16(x - hi)
    (x ~= hi + lo to about 2**-22 |x|, plus float16's subnormal spacing)."""
    ir, arith, *_ = _ir()
    regs = np.array(x.registers, dtype=object)
    assert regs.shape[1] == 1, regs.shape
    out = np.concatenate([regs, regs], axis=1)
    vf16 = ir.VectorType.get((2,), ir.F16Type.get())
    vf32 = ir.VectorType.get((2,), ir.F32Type.get())
    for idx in np.ndindex(*regs.shape):
        v = regs[idx]
        hi = arith.truncf(vf16, v)
        out[idx] = hi
        out[(idx[0], 1, *idx[2:])] = arith.truncf(vf16, arith.subf(v, arith.extf(vf32, hi)))
    return mgpu.FragmentedArray(_registers=out, _layout=x.layout, _is_signed=None)


def _fold_pairs(x: mgpu.FragmentedArray) -> mgpu.FragmentedArray:
    """float32 [M, 8] (WGMMA layout) in the narrow form (columns 2c and 2c + 1: query head c's high and low parts,
    :func:`query_row`) -> float32 [M] in WGMMA_ROW_LAYOUT holding, in each thread, the sum of its two columns: query
    head lane % 4's value of each of the thread's rows ("per-lane rows"). The layout replicates a row across those 4
    lanes and these values differ across them: only elementwise operations, with per-lane rows, rows and per-lane
    scalars (WG_SPLAT, :func:`_lane_head`), and this module's functions that say so take them."""
    ir, arith, _, _, vector = _ir()
    f32 = ir.F32Type.get()
    regs = np.array(x.registers, dtype=object)
    assert regs.shape[1] == 1, regs.shape  # one 8-column block
    out = np.empty(mgpu.WGMMA_ROW_LAYOUT.registers_shape(x.shape[:1]), dtype=object)
    # a row register's index is the WGMMA register's without the column block (the order Mosaic's broadcast keeps)
    for k, reg in enumerate(regs.flat):
        total = arith.addf(vector.extract(reg, [], [0]), vector.extract(reg, [], [1]))
        out.flat[k] = vector.from_elements(ir.VectorType.get((1,), f32), [total])
    return mgpu.FragmentedArray(_registers=out, _layout=mgpu.WGMMA_ROW_LAYOUT, _is_signed=None)


def _split_pairs(x: mgpu.FragmentedArray) -> mgpu.FragmentedArray:
    """float32 per-lane rows [M] (:func:`_fold_pairs`) -> float16 [M, 8] (WGMMA layout) in the narrow form: the
    thread's two columns (query head lane % 4's) hold hi = f16(x) and lo = f16(x - hi)."""
    ir, arith, _, _, vector = _ir()
    f16 = ir.F16Type.get()
    regs = np.array(x.registers, dtype=object)
    out = np.empty(mgpu.WGMMA_LAYOUT.registers_shape((x.shape[0], 2 * NARROW)), dtype=object)
    for k, reg in enumerate(regs.flat):
        v = vector.extract(reg, [], [0])
        hi = arith.truncf(f16, v)
        lo = arith.truncf(f16, arith.subf(v, arith.extf(ir.F32Type.get(), hi)))
        out.flat[k] = vector.from_elements(ir.VectorType.get((2,), f16), [hi, lo])
    return mgpu.FragmentedArray(_registers=out, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)


def _lane_head(ref) -> mgpu.FragmentedArray:
    """float32 SMEM [>= 4] -> its entry lane % 4 (query head lane % 4's, the narrow form's), a per-lane scalar
    (WG_SPLAT: the values differ across the lanes, :func:`_fold_pairs`)."""
    ir, _, llvm, _, _ = _ir()
    f32 = ir.F32Type.get()
    lane4, _ = _thread_rows()
    val = llvm.load(f32, mgpu.utils.getelementptr(mgpu.utils.memref_ptr(ref), [lane4], f32))
    return mgpu.FragmentedArray.splat(val, (), is_signed=None)


def _store_heads(o_ref, lse_ref, out: mgpu.FragmentedArray, lse: mgpu.FragmentedArray) -> None:
    """The narrow form's results into the kernel's output tiles: ``out`` float32 per-lane rows [D] (query head
    lane % 4's value of the thread's rows) into column lane % 4 of ``o_ref`` (float32 SMEM [D, 8], row-major), and
    the per-lane scalar ``lse`` into column lane % 4 of ``lse_ref`` (float32 SMEM [64, 8]) at the thread's first row
    (rows 0..7 from warp 0); columns 4..7 zero."""
    ir, arith, llvm, _, vector = _ir()
    i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
    c = functools.partial(mgpu.utils.c, ty=i32)
    lane4, row0 = _thread_rows()
    zero = arith.constant(f32, 0.0)

    def put(ref, row, val):
        at = arith.addi(arith.muli(row, c(HALF)), lane4)
        ptr = mgpu.utils.memref_ptr(ref)
        llvm.store(val, mgpu.utils.getelementptr(ptr, [at], f32))
        llvm.store(zero, mgpu.utils.getelementptr(ptr, [arith.addi(at, c(NARROW))], f32))

    regs = np.array(out.registers, dtype=object)
    for idx in np.ndindex(*regs.shape):  # row register (m, 0, r): row 64 m + 8 r of the thread's rows
        put(o_ref, arith.addi(row0, c(64 * idx[0] + 8 * idx[2])), vector.extract(regs[idx], [], [0]))
    put(lse_ref, row0, np.array(lse.registers, dtype=object).item())


def _warp_page(bt_ref, b, first_page, last_page, block_size: int):
    """i32: the page (block-table entry) of this warp's 16 token rows 16 * warp .. 16 * warp + 15 of a step
    starting at page index ``first_page`` (one page: block_size >= 16), clamped to the sequence's last page
    ``last_page`` (-1 for an empty sequence, whose table is never followed)."""
    ir, arith, _, memref, _ = _ir()
    i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
    c = functools.partial(mgpu.utils.c, ty=i32)
    warp = arith.divui(arith.remui(mgpu.utils.thread_idx(), c(128)), c(32))
    page_i = arith.minsi(arith.addi(first_page, arith.divui(arith.muli(warp, c(16)), c(block_size))),
                         arith.maxsi(last_page, c(0)))
    page = memref.load(bt_ref, [arith.index_cast(index, b), arith.index_cast(index, page_i)])
    return arith.select(arith.cmpi(arith.CmpIPredicate.slt, last_page, c(0)), c(0), page)  # empty: never follow


def _row_at(h, page, row, block_size: int) -> list:
    """Indices of token ``row`` (of this warp's page ``page``) into the [Hk, NB, BS, ...] scale arrays."""
    ir, arith, *_ = _ir()
    index = ir.IndexType.get()
    rem = arith.remui(row, mgpu.utils.c(block_size, ir.IntegerType.get_signless(32)))
    return [arith.index_cast(index, h), arith.index_cast(index, page), arith.index_cast(index, rem)]


def _tile_exponent(scale):
    """float16 value scale -> i32: the exponent field E of the value tile's power of two 2**e, the scale's
    own (subnormal scales: 2**-14, the scale's m = scale / 2**e < 1), at most 2**:data:`VALUE_EXP_MAX`."""
    ir, arith, *_ = _ir()
    i16 = ir.IntegerType.get_signless(16)
    c16 = functools.partial(mgpu.utils.c, ty=i16)
    ebits = arith.maxui(arith.andi(arith.bitcast(i16, scale), c16(0x7C00)), c16(0x0400))
    ebits = arith.minui(ebits, c16((VALUE_EXP_MAX + 15) << 10))
    return arith.extui(ir.IntegerType.get_signless(32), arith.shrui(ebits, c16(10)))


def _step_words(refs, b, h, first_page, last_page, block_size: int, norm_words: int):
    """A step's per-token scales as they are stored (``refs``: key scales [Hk, NB, BS, n] f16, value scales [Hk, NB,
    BS, 2] f16, block tables; all the rows lie in the warp's page, :func:`_warp_page`, one block-table load): in
    the score tile's rows (WGMMA_ROW_LAYOUT [64] int32 each) the key norms' float16 bits (``norm_words`` of them:
    0 for float8 keys, 1, or 2 packed with the first in the low half: split keys' second segment, QJL's residual
    norm) and the value (scale, zero) float16 pair; for the row t // 2 that thread t converts
    (:func:`value_tile_plan`; WG_STRIDED [128] int32) its value scale's bits. They are loaded a step ahead and
    converted where they are used (:func:`_row_scalars`, :func:`_tile_pairs`): carried as the stored words, a
    step's scalars take 5 registers across the loop instead of 8-10, and ptxas's count no longer crosses 128 with
    the cache's page count (docs/PERFORMANCE.md, "The decode's registers move with the cache's page count")."""
    ir, arith, _, memref, vector = _ir()
    i32, i16, index = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(16), ir.IndexType.get()
    ks_ref, vs_ref, bt_ref = refs
    b, h, first_page, last_page = (x.registers.item() for x in (b, h, first_page, last_page))
    page = _warp_page(bt_ref, b, first_page, last_page, block_size)
    _, row0 = _thread_rows()
    layout = mgpu.WGMMA_ROW_LAYOUT
    reg_shape = layout.registers_shape((TOKENS,))

    def bits(ref, at, k):
        return arith.extui(i32, arith.bitcast(i16, memref.load(ref, [*at, arith.constant(index, k)])))

    def pair(ref, at):
        return arith.ori(bits(ref, at, 0), arith.shli(bits(ref, at, 1), mgpu.utils.c(16, i32)))

    kw, vw = np.empty(reg_shape, dtype=object), np.empty(reg_shape, dtype=object)
    for idx in np.ndindex(*reg_shape):
        at = _row_at(h, page, arith.addi(row0, mgpu.utils.c(8 * idx[2], i32)), block_size)
        k = (mgpu.utils.c(0, i32) if norm_words == 0 else bits(ks_ref, at, 0) if norm_words == 1
             else pair(ks_ref, at))
        kw[idx] = vector.from_elements(ir.VectorType.get((1,), i32), [k])
        vw[idx] = vector.from_elements(ir.VectorType.get((1,), i32), [pair(vs_ref, at)])
    out = [mgpu.FragmentedArray(_registers=r, _layout=layout, _is_signed=False) for r in (kw, vw)]
    tile_row = arith.divui(arith.remui(mgpu.utils.thread_idx(), mgpu.utils.c(128, i32)), mgpu.utils.c(2, i32))
    t = bits(vs_ref, _row_at(h, page, tile_row, block_size), 0)
    strided = mgpu.WGStridedFragLayout(shape=(128,), vec_size=1)
    out.append(mgpu.FragmentedArray(_registers=np.array([vector.from_elements(ir.VectorType.get((1,), i32), [t])],
                                                         dtype=object), _layout=strided, _is_signed=False))
    return tuple(out)


def _row_scalars(kw, vw, norm_words: int, value_bits: int, lazy: bool, qjl: bool):
    """:func:`_step_words`' rows -> the softmax's rows (WGMMA_ROW_LAYOUT [64] float32 each): key norm (1.0 for
    float8 keys), value scale over the tile's power of two 2**e times 2**p_top (:func:`value_constants`; in
    [2**p_top, 2**(p_top + 1)), up to 2**(p_top + 5) for scales of 2**10 .. 2**14 whose 2**e stops at
    2**:data:`VALUE_EXP_MAX`: the probabilities' float16 split stays in range), float32 zero point of the centred
    codes (the value zero plus the centre, 7.5 or 3.5, times the value scale); with two norm words then the second
    norm (float32; QJL: the float16 pair (g, g) in int32)."""
    ir, arith, _, _, vector = _ir()
    i32, f32, f16, i16 = (ir.IntegerType.get_signless(32), ir.F32Type.get(), ir.F16Type.get(),
                          ir.IntegerType.get_signless(16))
    layout = mgpu.WGMMA_ROW_LAYOUT
    regs_k, regs_v = np.array(kw.registers, dtype=object), np.array(vw.registers, dtype=object)
    rows = [np.empty(regs_v.shape, dtype=object) for _ in range(3 + (norm_words == 2))]
    centre, p_top, _ = value_constants(value_bits, lazy)

    def half(word, k):
        return arith.bitcast(f16, arith.trunci(i16, arith.shrui(word, mgpu.utils.c(16, i32)) if k else word))

    for idx in np.ndindex(*regs_v.shape):
        k = vector.extract(regs_k[idx], [], [0])
        v = vector.extract(regs_v[idx], [], [0])
        norm = arith.extf(f32, half(k, 0)) if norm_words else arith.constant(f32, 1.0)
        scale16 = half(v, 0)
        scale = arith.extf(f32, scale16)
        zero = arith.extf(f32, half(v, 1))
        inv_bits = arith.shli(arith.subi(mgpu.utils.c(142 + p_top, i32), _tile_exponent(scale16)),
                              mgpu.utils.c(23, i32))  # 2**p_top / 2**e in float32
        vals = [norm, arith.mulf(scale, arith.bitcast(f32, inv_bits)),  # exact
                arith.addf(zero, arith.mulf(scale, arith.constant(f32, centre)))]
        if norm_words == 2:
            g = arith.shrui(k, mgpu.utils.c(16, i32))
            vals.append(arith.ori(g, arith.shli(g, mgpu.utils.c(16, i32))) if qjl else arith.extf(f32, half(k, 1)))
        for r, x in zip(rows, vals):
            r[idx] = vector.from_elements(ir.VectorType.get((1,), x.type), [x])
    out = [mgpu.FragmentedArray(_registers=r, _layout=layout, _is_signed=None) for r in rows[:3]]
    if norm_words == 2:
        out.append(mgpu.FragmentedArray(_registers=rows[3], _layout=layout, _is_signed=False if qjl else None))
    return tuple(out)


def _tile_pairs(tw, value_bits: int):
    """:func:`_step_words`' tile word -> the value tile's factor and offset, float16 pairs in int32 (WG_STRIDED
    [128] each): (2**e, 2**e) and (-71.5 * 2**e, -71.5 * 2**e) (:func:`value_word_asm`)."""
    ir, arith, _, _, vector = _ir()
    i32, i16, f16 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(16), ir.F16Type.get()
    c = functools.partial(mgpu.utils.c, ty=i32)
    word = vector.extract(np.array(tw.registers, dtype=object).item(), [], [0])
    scale = arith.bitcast(f16, arith.trunci(i16, word))
    e = arith.shli(_tile_exponent(scale), c(10))  # 2**e's float16 bits
    n = arith.ori(arith.addi(e, c(6 << 10)), c(0x8000 | value_constants(value_bits)[2]))  # -(64 + centre) * 2**e
    strided = mgpu.WGStridedFragLayout(shape=(128,), vec_size=1)
    return tuple(mgpu.FragmentedArray(_registers=np.array([vector.from_elements(ir.VectorType.get((1,), i32), [x])],
                                                          dtype=object), _layout=strided, _is_signed=False)
                 for x in (arith.ori(y, arith.shli(y, c(16))) for y in (e, n)))


def _column_max(x: mgpu.FragmentedArray, scratch_ref, buf, op: str = "max.NaN") -> mgpu.FragmentedArray:
    """float32 [64, 8] (WGMMA layout) -> its column maxima [8] (WGMMA column layout; ``op="add.rn"``: sums; or
    float32 [8], WGMMA column layout, of per-thread partials as :func:`_thread_total` makes them), with one warpgroup
    barrier: shuffles within each warp, then each warp's maxima through ``scratch_ref``
    (float32 [2 * 32], half ``buf``: the next writes to it come two steps later, after other barriers).
    Scalar maxima (a vector maximum lowers to compares and selects). The narrow form (:func:`_fold_pairs`): per-lane
    rows [64] (or a per-lane scalar of partials) -> query head lane % 4's maximum, a per-lane scalar (WG_SPLAT)."""
    ir, arith, llvm, _, vector = _ir()
    i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
    c = functools.partial(mgpu.utils.c, ty=i32)

    def fmax(a, b):  # one instruction (arith.maximumf lowers to a compare and selects)
        return llvm.inline_asm(f32, [a, b], f"{op}.f32 $0, $1, $2;", "=f,f,f")

    vals = None
    for reg in np.array(x.registers, dtype=object).flat:  # [64, 8]: the thread's rows; [8]: its one pair
        parts = _elements(reg)
        vals = parts if vals is None else [fmax(a, b) for a, b in zip(vals, parts)]
    for dist in (4, 8, 16):  # lanes with the same lane % 4 hold the same columns
        vals = [fmax(v, mgpu.utils.shfl_bfly(v, dist)) for v in vals]
    tid = arith.remui(mgpu.utils.thread_idx(), c(128))
    warp, lane4 = arith.divui(tid, c(32)), arith.remui(tid, c(4))
    base = arith.addi(arith.muli(buf.registers.item(), c(32)), arith.muli(lane4, c(8)))  # [buf, lane4, warp, 2]
    ptr = mgpu.utils.memref_ptr(scratch_ref)
    llvm.store(vector.from_elements(ir.VectorType.get((len(vals),), f32), vals),
               mgpu.utils.getelementptr(ptr, [arith.addi(base, arith.muli(warp, c(2)))], f32))
    mgpu.utils.warpgroup_barrier()
    out = None
    for half in range(2):  # two 16-byte loads: the 4 warps' pairs
        at = mgpu.utils.getelementptr(ptr, [arith.addi(base, c(4 * half))], f32)
        quad = llvm.load(ir.VectorType.get((4,), f32), at)
        for w in range(2):
            parts = [vector.extract(quad, [], [2 * w + k]) for k in range(len(vals))]
            out = parts if out is None else [fmax(a, b) for a, b in zip(out, parts)]
    if len(vals) == 1:  # the narrow form: query head lane % 4's
        return mgpu.FragmentedArray.splat(out[0], (), is_signed=None)
    vty = ir.VectorType.get((2,), f32)
    layout = mgpu.WGMMA_COL_LAYOUT
    regs = np.array([vector.from_elements(vty, out)], dtype=object).reshape(layout.registers_shape((HALF,)))
    return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=None)


def _elements(reg) -> list:
    """A register of a FragmentedArray -> its scalars (a vector's elements; a splat's register is its scalar)."""
    ir, *_, vector = _ir()
    if not isinstance(reg.type, ir.VectorType):
        return [reg]
    return [vector.extract(reg, [], [k]) for k in range(reg.type.shape[0])]


def _thread_total(x: mgpu.FragmentedArray) -> mgpu.FragmentedArray:
    """float32 [64, 8] (WGMMA layout) -> float32 [8] in the WGMMA column layout holding, in each thread, the sum of
    the thread's own rows of its two columns (rows r and r + 8): a partial sum, not the column's; :func:`_column_max`
    with ``op="add.rn"`` completes it across the warpgroup. The narrow form: per-lane rows [64] -> a per-lane scalar
    (WG_SPLAT), the sum of the thread's rows of query head lane % 4."""
    _, arith, *_ = _ir()
    total = None
    for reg in np.array(x.registers, dtype=object).flat:
        total = reg if total is None else arith.addf(total, reg)
    if x.layout == mgpu.WGMMA_ROW_LAYOUT:
        return mgpu.FragmentedArray.splat(_elements(total)[0], (), is_signed=None)
    layout = mgpu.WGMMA_COL_LAYOUT
    regs = np.array([total], dtype=object).reshape(layout.registers_shape((HALF,)))
    return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=None)


def _commit_and_vote(s: mgpu.FragmentedArray, m: mgpu.FragmentedArray, bits: int) -> mgpu.FragmentedArray:
    """``plgpu.commit_smem`` (the shared-memory stores fenced for the tensor cores, a warpgroup barrier) whose
    barrier also votes: int32 1 in every thread if any thread's logit of ``s`` (float32 [64, 8], WGMMA layout)
    exceeds its column's ``m`` (float32 [8], WGMMA column layout) plus ``bits``, else 0 (``bar.red.or``). The narrow
    form: ``s`` per-lane rows [64], ``m`` a per-lane scalar (:func:`_fold_pairs`)."""
    ir, arith, llvm, *_ = _ir()
    i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
    (m_reg,) = np.array(m.registers, dtype=object).flat  # the thread's two columns (narrow: its query head)
    tops = [arith.addf(x, arith.constant(f32, float(bits))) for x in _elements(m_reg)]
    over = None
    for reg in np.array(s.registers, dtype=object).flat:  # rows r and r + 8, the same columns
        for x, top in zip(_elements(reg), tops, strict=True):
            gt = arith.cmpf(arith.CmpFPredicate.OGT, x, top)
            over = gt if over is None else arith.ori(over, gt)
    bar = arith.addi(mgpu.utils.warpgroup_idx(sync=False), mgpu.utils.c(1, i32))  # warpgroup_barrier's
    vote = llvm.inline_asm(
        i32, [arith.extui(i32, over), bar],
        "{ .reg .pred over, any; setp.ne.u32 over, $1, 0; fence.proxy.async.shared::cta;"
        " bar.red.or.pred any, $2, 128, over; selp.u32 $0, 1, 0, any; }",
        "=r,r,r", has_side_effects=True)
    return mgpu.FragmentedArray.splat(vote, (), is_signed=False)


# --------------------------------------------------------------------------------------------------


def copy_shape(block_size: int, row_words: int) -> tuple[int, int]:
    """(rows, words a row) of one page's copy into shared memory. A page copy (TMA) needs 16-byte strides, so a
    page of rows whose length is not a multiple of 4 words (3-bit codes at head_dim 64: 24 bytes; split keys at
    128: 56 and 40) is copied flat, as [block_size * row_words / 16, 16] (the cache array reshaped so by
    :func:`flat_pages`); shared memory holds the same row-major words either way."""
    if row_words % 4 == 0:
        return block_size, row_words
    if block_size * row_words % 16:
        raise ValueError(f"a page of {block_size} rows of {row_words} words is not a whole number of 64-byte rows")
    return block_size * row_words // 16, 16


def flat_pages(words: jax.Array) -> jax.Array:
    """A cache array uint32 [Hk, num_blocks, block_size, row_words] as its page copies read it
    (:func:`copy_shape`: itself, or [Hk, num_blocks, block_size * row_words / 16, 16]; a free reshape)."""
    hk, blocks, block_size, row_words = words.shape
    return words.reshape(hk, blocks, *copy_shape(block_size, row_words))


def _build_call(cfg: TurboQuantConfig, hk: int, block_size: int, pieces: int, stages: int, softcap: float | None,
                waves: int = 1, group: int = HALF):
    d = cfg.head_dim
    # groups of at most 4 query heads: the products' 8 columns are each head's high and low parts side by side, the
    # softmax runs on per-lane rows (_fold_pairs: a thread's rows of one head), not on 8 columns half padding
    narrow_form = narrow(group)
    cols = 2 * NARROW if narrow_form else COLS
    fp8 = cfg.key_format == "fp8"
    qjl = cfg.key_format == "prod"  # 3-bit MSE codes, then the sign sketch's words; a second score product
    # split keys: two segments of d / 2 channels (4+3 or 3+2 bits), each with its table and norm: two key tiles,
    # two score products into their own sums (scaled by their norms), K = d / 2 each
    split_keys = cfg.key_format == "split"
    lazy_max = lazy_maximum(cfg, group)
    kd = d // 2 if split_keys else d  # channels of a key tile
    words = d // 8  # 4-bit codes: one word per 8 channels
    value_words = 3 * d // 32 if cfg.value_bits == 3 else words
    key_words = cfg.key_words  # 3-bit: packing's two fields (QJL keys: then d / 32 sign words); fp8: 2 words
    pps = TOKENS // block_size  # pages per step
    k_rows, k_width = copy_shape(block_size, key_words)
    v_rows, v_width = copy_shape(block_size, value_words)
    # one value tile for float8 keys (their words take twice the shared memory; its stores then wait for the
    # maximum's barrier, which costs registers the other keys cannot spare under 128) and for QJL keys at
    # D=256 (2 programs a multiprocessor instead of 1), two for the others
    single_tile = fp8 or (qjl and d == 256)
    tables = key_tables(cfg)
    ktab_words = [int(w) for w in table_words(cfg)] + [0] * (4 - len(table_words(cfg)))  # two a table, split: four
    row = plgpu.Layout.WGMMA.reduce(1)
    col = plgpu.Layout.WGMMA.reduce(0)
    splat = plgpu.Layout.WG_SPLAT(())
    per_thread = plgpu.Layout.WG_STRIDED((128,), vec_size=1)
    s_folded = (plgpu.ShapeDtypeStruct((TOKENS,), jnp.float32, layout=row) if narrow_form
                else plgpu.ShapeDtypeStruct((TOKENS, HALF), jnp.float32, layout=plgpu.Layout.WGMMA))
    head_ty = (plgpu.ShapeDtypeStruct((), jnp.float32, layout=splat) if narrow_form  # a query head's (per-lane)
               else plgpu.ShapeDtypeStruct((HALF,), jnp.float32, layout=col))
    s_layout, head_layout = (row, splat) if narrow_form else (plgpu.Layout.WGMMA, col)

    def key_tile(seg: int):  # the key tile of segment seg (its words from the row's word_start)
        bits, word0 = cfg.key_segments[seg].bits, cfg.key_segments[seg].word_start

        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), splat, splat),
                           return_type=plgpu.ShapeDtypeStruct((TOKENS, kd), jnp.float16, layout=plgpu.Layout.WGMMA))
        def keys_f16(ctx, words_ref, t0, t1):
            del ctx
            low = (t0.registers.item(), t1.registers.item())
            if fp8:
                groups = _word_groups(kd, fp8_words_asm(), 2)
            elif bits == 3:
                groups = _key3_groups(kd, tables[seg], low, key_words)
            elif bits == 2:
                groups = _key2_groups(kd, tables[seg], low, key_words)
            else:
                groups = _word_groups(kd, key_word_asm(tables[seg]), 1, low, key_words)
            return _keys_wgmma(words_ref, kd, groups, word0)

        return keys_f16

    keys_f16 = key_tile(0)
    keys2_f16 = key_tile(1) if split_keys else None

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), row),
                       return_type=plgpu.ShapeDtypeStruct((TOKENS, d), jnp.float16, layout=plgpu.Layout.WGMMA))
    def signs_f16(ctx, words_ref, gamma):
        del ctx
        *_, vector = _ir()
        regs = np.array(gamma.registers, dtype=object)
        pairs = [vector.extract(regs[idx], [], [0]) for idx in sorted(np.ndindex(*regs.shape), key=lambda i: i[2])]
        return _keys_wgmma(words_ref, d, _sign_groups(d, key_words - d // 32, key_words, pairs))

    rows_ty = plgpu.ShapeDtypeStruct((TOKENS,), jnp.float32, layout=row)
    pair_ty = plgpu.ShapeDtypeStruct((128,), jnp.int32, layout=per_thread)
    gamma_ty = plgpu.ShapeDtypeStruct((TOKENS,), jnp.int32, layout=row)
    scalar_args = (plgpu.RefType(), plgpu.RefType(), plgpu.RefType(), splat, splat, splat, splat)

    norm_words = 0 if fp8 else len(cfg.key_segments) if (qjl or split_keys) else 1
    words_ty = plgpu.ShapeDtypeStruct((TOKENS,), jnp.int32, layout=row)

    @plgpu.inline_mgpu(arg_types=scalar_args, return_type=(words_ty, words_ty, pair_ty))
    def step_words(ctx, ks_ref, vs_ref, bt_ref, b, h, first_page, last_page):
        del ctx
        return _step_words((ks_ref, vs_ref, bt_ref), b, h, first_page, last_page, block_size, norm_words)

    @plgpu.inline_mgpu(arg_types=(row, row),
                       return_type=(rows_ty, rows_ty, rows_ty) + ((gamma_ty,) if qjl else ())
                       + ((rows_ty,) if split_keys else ()))
    def row_scalars(ctx, kw, vw):
        del ctx
        return _row_scalars(kw, vw, norm_words, cfg.value_bits, lazy_max, qjl)

    @plgpu.inline_mgpu(arg_types=(per_thread,), return_type=(pair_ty, pair_ty))
    def tile_pairs(ctx, tw):
        del ctx
        return _tile_pairs(tw, cfg.value_bits)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(_F16_TILE), per_thread, per_thread))
    def store_values(ctx, words_ref, tile_ref, pow2, centre):
        del ctx
        (_store_values3 if cfg.value_bits == 3 else _store_values)(words_ref, tile_ref, d, pow2, centre)

    @plgpu.inline_mgpu(arg_types=(s_layout, plgpu.RefType(), splat), return_type=head_ty)
    def column_max(ctx, x, scratch_ref, buf):
        del ctx
        return _column_max(x, scratch_ref, buf)

    @plgpu.inline_mgpu(arg_types=(s_layout, head_layout),
                       return_type=plgpu.ShapeDtypeStruct((), jnp.int32, layout=splat))
    def commit_and_vote(ctx, s, m):
        del ctx
        return _commit_and_vote(s, m, LAZY_MAX_BITS)

    @plgpu.inline_mgpu(arg_types=(head_layout, plgpu.RefType(), splat), return_type=head_ty)
    def column_sum(ctx, x, scratch_ref, buf):  # thread_total's partial sums summed (no Mosaic reduction: its 2 KB
        # of scratch stay unreserved)
        del ctx
        return _column_max(x, scratch_ref, buf, op="add.rn")

    @plgpu.inline_mgpu(arg_types=(s_layout,), return_type=head_ty)
    def thread_total(ctx, x):
        del ctx
        return _thread_total(x)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,), return_type=s_folded)
    def fold(ctx, x):
        del ctx
        return _fold_pairs(x) if narrow_form else _fold_halves(x)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,),
                       return_type=plgpu.ShapeDtypeStruct((d,), jnp.float32, layout=row) if narrow_form
                       else plgpu.ShapeDtypeStruct((d, HALF), jnp.float32, layout=plgpu.Layout.WGMMA))
    def fold_out(ctx, x):
        del ctx
        return _fold_pairs(x) if narrow_form else _fold_halves(x)

    @plgpu.inline_mgpu(arg_types=(s_layout,),
                       return_type=plgpu.ShapeDtypeStruct((TOKENS, cols), jnp.float16, layout=plgpu.Layout.WGMMA))
    def split(ctx, x):
        del ctx
        return _split_pairs(x) if narrow_form else _split_halves(x)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=head_ty)
    def lane_head(ctx, ref):
        del ctx
        return _lane_head(ref)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), row, splat))
    def store_heads(ctx, o_ref, lse_ref, out, lse):
        del ctx
        _store_heads(o_ref, lse_ref, out, lse)

    def head_full(value: float):  # a float32 scalar as the narrow form's loop carries a query head's
        @plgpu.inline_mgpu(return_type=head_ty)
        def full(ctx):
            del ctx
            ir, arith, *_ = _ir()
            return mgpu.FragmentedArray.splat(arith.constant(ir.F32Type.get(), value), (), is_signed=None)

        return full()

    def by_row(x, shape):  # a row's value to each of its columns (the narrow form: rows are per-lane already)
        return x if narrow_form else lax.broadcast_in_dim(x, shape, [0])

    def by_head(x, shape):  # a query head's value to each of its rows
        return x if narrow_form else lax.broadcast_in_dim(x, shape, [1])

    def tq_decode_mgpu(work_ref, bt_ref, lens_ref, q_ref, qinv_ref, kc_ref, ks_ref, vc_ref, vs_ref, o_ref,
                       lse_ref, q_smem, small_smem, kw_smem, vw_smem, tiles_or_out, p_smem, q_bar, kw_bar, vw_bar,
                       *pv_bar):  # pv_bar: the lazy maximum's (every warp done with the value product)
        # the value tiles, and after the loop the output and the log-sum-exps in the same shared memory; the
        # reductions' scratch (64 float32) and the query's inverse powers (32) in one 384-byte buffer
        v16_smem, (o_smem, lse_smem) = tiles_or_out
        red_smem, qinv_smem = small_smem.at[pl.ds(0, 64)], small_smem.at[pl.ds(64, 4 * HALF)]
        # KV head h of piece j (tqjax.pallas.pieces.piece_table): pages [first_page, end_page) of sequence b's block
        # table, the partial output to slot work_ref[3, j] * hk + h (a piece index past the pieces: no page)
        h, j = lax.axis_index("h"), lax.axis_index("j")

        def piece():
            b, first_page = work_ref[0, j], work_ref[1, j]
            seq_len = lens_ref[b]
            # the piece's last page (not the sequence's, from its length: the table's entries then load without
            # waiting for the length, one round trip less before the first copy); a piece ends where its steps do,
            # but for the sequence's last piece, which ends at its used pages
            last_page = work_ref[2, j] - 1
            n_steps = jnp.maximum(work_ref[2, j] - first_page + pps - 1, 0) // pps

            plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, q_bar.at[0])
            plgpu.copy_gmem_to_smem(qinv_ref.at[b, h], qinv_smem, q_bar.at[0])

            def pages_of(step):  # the block-table entries of a step's pages (clamped to the piece's last page)
                idx = [jnp.minimum(first_page + step * pps + k, jnp.maximum(last_page, 0)) for k in range(pps)]
                return tuple(jnp.where(last_page < 0, 0, bt_ref[b, i]) for i in idx)

            def issue(pages, slot):  # every thread is done with the slot (the callers' barriers)
                # one warp takes the branch: the other three skip the copies' address and predicate arithmetic
                # (about 150 instructions a step; the copies come from one thread either way)
                @plgpu.warp_map
                def _(warp):
                    @pl.when(warp == 0)
                    def _():
                        for k, page in enumerate(pages):
                            plgpu.copy_gmem_to_smem(kc_ref.at[h, page], kw_smem.at[slot, pl.ds(k * k_rows, k_rows)],
                                                    kw_bar.at[slot])
                            plgpu.copy_gmem_to_smem(vc_ref.at[h, page], vw_smem.at[slot, pl.ds(k * v_rows, v_rows)],
                                                    vw_bar.at[slot])

            for s in range(stages):
                @pl.when(s < n_steps)
                def _(s=s):
                    issue(pages_of(s), s)

            plgpu.barrier_wait(q_bar.at[0])
            if narrow_form:
                qinv = lane_head(qinv_smem)
                tok_iota = plgpu.broadcasted_iota(jnp.int32, (TOKENS,), 0, layout=row)
            else:
                qinv = smem_load(qinv_smem.at[pl.ds(0, HALF)], col)
                tok_iota = plgpu.broadcasted_iota(jnp.int32, (TOKENS, HALF), 0, layout=plgpu.Layout.WGMMA)

            # the key tables' words, held in registers across the loop. As constants, ptxas moved a word into a
            # register before every byte permute that reads it (27-35 instructions a step, 4% of the loop); xor-ed
            # with seq_len >>> 31, which is 0 for every length (a negative one masks every token, whatever the table),
            # they are values it cannot fold, and it holds them (docs/PERFORMANCE.md, "The key tables held"). Held
            # as loads, they cost 3-bit keys 8-16 registers, 3 programs a multiprocessor, until the row sums below
            # took 2-4 fewer (loaded from global memory every step instead, the decode took 10% longer)
            ktab0, ktab1, ktab2, ktab3 = (jnp.int32(w) ^ lax.shift_right_logical(seq_len, 31) for w in ktab_words)

            def step_fn(i, carry):
                # the step's scales (as stored: converted where used) and the page ids of step i + stages were loaded
                # a step ahead
                acc, m_i, l_i, z_i, (step_norms, step_values, step_tile), pages = carry
                slot = lax.rem(i, stages)
                buf = lax.rem(i, 2)  # the maximum's scratch halves alternate
                vbuf = 0 if single_tile else buf  # two value tiles: step i - 1's product may still read the other
                page0 = first_page + i * pps
                prefetched = step_words(ks_ref, vs_ref, bt_ref, b, h, page0 + pps, last_page)
                next_pages = pages_of(i + stages + 1)
                plgpu.barrier_wait(kw_bar.at[slot])
                keys = keys_f16(kw_smem.at[slot], ktab0, ktab1)
                # extra: the QJL residual norms' float16 pairs, or a split key's second norms
                kn, vm, vz, *extra = row_scalars(step_norms, step_values)

                def qk(acc_ref, *acc2_ref):
                    plgpu.wgmma(acc_ref, keys, q_smem.at[:, pl.ds(0, kd)].T)
                    if split_keys:  # the second segment's tile, into its own sums (converted once the first tile's
                        # registers are free: overlapping them cost 13-18 registers, 3 programs a multiprocessor)
                        plgpu.wgmma_wait(0)
                        keys2 = keys2_f16(kw_smem.at[slot], ktab2, ktab3)
                        plgpu.wgmma(acc2_ref[0], keys2, q_smem.at[:, pl.ds(kd, kd)].T)
                        return acc_ref[...], acc2_ref[0][...]
                    if qjl:  # the sign sketch times the projected query, into the same sums (the key tile's registers
                        # are free once its product is done)
                        plgpu.wgmma_wait(0)
                        signs = signs_f16(kw_smem.at[slot], extra[0])
                        plgpu.wgmma(acc_ref, signs, q_smem.at[:, pl.ds(d, d)].T)
                    return acc_ref[...]

                # the score product waited for before the value words are converted: the keys' registers are free
                # by then (overlapping them cost 30 registers a thread: 3 programs a multiprocessor instead of 4)
                s = pl.run_scoped(qk, *[plgpu.ACC((TOKENS, cols), jnp.float32)] * (2 if split_keys else 1))

                def values():
                    plgpu.barrier_wait(vw_bar.at[slot])
                    pow2, centre = tile_pairs(step_tile)
                    store_values(vw_smem.at[slot], v16_smem.at[vbuf], pow2, centre)

                if not single_tile:
                    values()
                if split_keys:  # each segment's sums times its norm
                    s1, s2 = fold(s[0]), fold(s[1])
                    s = (s1 * by_row(kn, s1.shape) + s2 * by_row(extra[0], s2.shape)) * by_head(qinv, s1.shape)
                else:
                    s = fold(s)
                    # the query's inverse powers of 2 carry the logit scale (and log2(e) without a softcap)
                    s = s * by_head(qinv, s.shape) * by_row(kn, s.shape)
                if softcap is not None:  # softcap * tanh(s), from exp2 (tanh.approx is only 2**-11 accurate)
                    s = (softcap * _LOG2E) * (1.0 - 2.0 / (jnp.exp2(s * (2 * _LOG2E)) + 1.0))
                s = jnp.where(tok_iota + page0 * block_size < seq_len, s, -jnp.inf)

                def probabilities(m):  # p (at most 2**LAZY_MAX_BITS)
                    return jnp.exp2(s - by_head(m, s.shape))

                def store_probabilities(p):  # as p * scale / 2**e * 2**p_top, high and low parts
                    pw = split(p * by_row(vm, s.shape))
                    p_smem.T[...] = plgpu.layout_cast(pw, plgpu.Layout.WGMMA_TRANSPOSED)

                if lazy_max:
                    # the probabilities against the running maximum m_i, unless a logit exceeds it by more than
                    # LAZY_MAX_BITS (log2 units: the first step, and wherever the logits climb); then the step takes
                    # the maximum (two barriers more) and stores its probabilities again. Every warp has waited for
                    # step i - 1's value product: the probability tile (and a single value tile) may be overwritten
                    plgpu.barrier_wait(pv_bar[0].at[0])
                    if single_tile:
                        values()
                    store_probabilities(probabilities(m_i))
                    # every thread's value and probability tiles are stored (and fenced for the tensor cores), and
                    # every thread is done with the slot's words (the next copies may overwrite them); the barrier
                    # votes
                    raise_max = commit_and_vote(s, m_i)

                    def raised():
                        m_new = jnp.maximum(m_i, column_max(s, red_smem, buf))
                        store_probabilities(probabilities(m_new))
                        plgpu.commit_smem()
                        return m_new

                    m_new = lax.cond(raise_max != 0, raised, lambda: m_i)
                    p = probabilities(m_new)
                    alpha = jnp.exp2(m_i - m_new)
                else:
                    # the maximum's barrier follows every warp's wait for step i - 1's value product: from here the
                    # probability tile (and a single value tile) may be overwritten
                    m_new = jnp.maximum(m_i, column_max(s, red_smem, buf))
                    if single_tile:
                        values()
                    alpha = jnp.exp2(m_i - m_new)
                    p = probabilities(m_new)
                    store_probabilities(p)
                    plgpu.commit_smem()  # as above
                l_i = l_i * alpha + thread_total(p)
                z_i = z_i * alpha + thread_total(p * by_row(vz, s.shape))

                @pl.when(i + stages < n_steps)
                def _():
                    issue(pages, slot)  # from one warp

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, v16_smem.at[vbuf].T, p_smem.T)

                # this step's product in its own accumulator, added in float32: accumulating the steps in the
                # wgmma's accumulator lost 8e-4 of max|out| over 16k tokens (the tensor cores' sums do not
                # round to nearest; tests/test_decode_mgpu.py::test_long_split)
                step_pv = fold_out(pl.run_state(pv)(plgpu.ACC.init(zeros_wide)))  # high + low parts
                if lazy_max:
                    # each thread after its warp's wait: complete once every warp's product is
                    plgpu.barrier_arrive(pv_bar[0].at[0])
                acc = acc * by_head(alpha, acc.shape) + step_pv  # times 2**p_top
                return acc, m_new, l_i, z_i, prefetched, next_pages

            zeros_wide = plgpu.layout_cast(jnp.zeros((d, cols), jnp.float32), plgpu.Layout.WGMMA)
            if narrow_form:
                zeros_out = plgpu.layout_cast(jnp.zeros((d,), jnp.float32), row)
                m0, l0 = head_full(-math.inf), head_full(0.0)
            else:
                zeros_out = plgpu.layout_cast(jnp.zeros((d, HALF), jnp.float32), plgpu.Layout.WGMMA)
                m0 = plgpu.layout_cast(jnp.full((HALF,), -jnp.inf, jnp.float32), col)
                l0 = plgpu.layout_cast(jnp.zeros((HALF,), jnp.float32), col)
            first_words = step_words(ks_ref, vs_ref, bt_ref, b, h, first_page, last_page)
            if lazy_max:
                plgpu.barrier_arrive(pv_bar[0].at[0])  # for step -1's product
            carry = (zeros_out, m0, l0, l0, first_words, pages_of(stages))
            acc, m_i, l_i, z_i, _, _ = lax.fori_loop(0, n_steps, step_fn, carry)
            # the sums' barriers also order every warp's last value product before the output overwrites the tiles
            # (a warp's wait for it covers only the warp's own rows)
            l_sum = column_sum(l_i, red_smem, n_steps % 2)
            z_sum = column_sum(z_i, red_smem, (n_steps + 1) % 2)
            acc = acc * 2.0**-value_constants(cfg.value_bits, lazy_max)[1] + by_head(z_sum, acc.shape)
            l_safe = jnp.where(l_sum > 0, l_sum, 1.0)
            lse = jnp.where(l_sum > 0, m_i + jnp.log2(l_safe), -jnp.inf)
            if narrow_form:
                store_heads(o_smem, lse_smem, acc / l_safe, lse)
            else:
                o_smem[...] = acc / lax.broadcast_in_dim(l_safe, acc.shape, [1])
                lse_smem[...] = lax.broadcast_in_dim(lse, (TOKENS, HALF), [1])
            plgpu.commit_smem()
            out_slot = work_ref[3, j] * hk + h
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[out_slot])
            plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, 8)], lse_ref.at[out_slot])
            plgpu.wait_smem_to_gmem(0)

        if waves == 1:  # a piece index past the last piece: no page, the output to the spare slot
            piece()
        else:  # several waves of programs: those past the last piece (often most) skip it all
            # (the pieces in a loop over a wave of programs held 16-36 registers more, 3 programs a multiprocessor)
            pl.when(work_ref[3, j] < pieces)(piece)

    scratch = [
        plgpu.SMEM((cols, 2 * d if qjl else d), jnp.float16, transforms=_F16_TILE),  # QJL: then the projected
        plgpu.SMEM((64 + 4 * HALF,), jnp.float32),
        plgpu.SMEM((stages, pps * k_rows, k_width), jnp.uint32),  # [TOKENS, key_words] row-major either way
        plgpu.SMEM((stages, pps * v_rows, v_width), jnp.uint32),
        plgpu.RefUnion(plgpu.SMEM((1 if single_tile else 2, TOKENS, d), jnp.float16, transforms=_F16_TILE),
                       (plgpu.SMEM((d, HALF), jnp.float32), plgpu.SMEM((TOKENS, HALF), jnp.float32))),
        plgpu.SMEM((cols, TOKENS), jnp.float16, transforms=_F16_TILE),  # p^T, stored transposed
        plgpu.Barrier(num_arrivals=2, num_barriers=1),
        plgpu.Barrier(num_arrivals=pps, num_barriers=stages),
        plgpu.Barrier(num_arrivals=pps, num_barriers=stages),
    ] + ([plgpu.Barrier(num_arrivals=1, num_barriers=1)] if lazy_max else [])
    return plgpu.kernel(
        tq_decode_mgpu,
        out_type=(jax.ShapeDtypeStruct(((pieces + 1) * hk, d, HALF), jnp.float32),  # the last hk: no piece's
                  jax.ShapeDtypeStruct(((pieces + 1) * hk, 8, HALF), jnp.float32)),
        grid=(hk, pieces),  # the heads of a piece launched together, the pieces in the table's order
        grid_names=("h", "j"),
        scratch_types=scratch,
        # barriers are explicit (commit_smem) where a copy or a product follows other threads' shared-memory
        # accesses; automatic ones would add a warpgroup barrier before each of the step's page copies
        compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True),
    )


def _split_query(x: jax.Array, top: jax.Array, bound: float) -> tuple[jax.Array, jax.Array]:
    """float32 [B, Hk, G, D'] (the tiled queries) and [B, Hk, G] (the largest magnitudes of the queries before the
    matrix) -> (float16 [B, Hk, 16, D'] (G <= 4, :func:`narrow`: [B, Hk, 8, D']): the high and low parts of the
    group's rows scaled by powers of 2 (:func:`_bound_exponent`) in the rows :func:`query_row` says, the others zero;
    float32 [B, Hk, 32]: the inverse powers, four times (a copy of at least 128 bytes))."""
    g = x.shape[2]
    x = jnp.pad(x, ((0, 0), (0, 0), (0, HALF - g), (0, 0)))
    ex = _bound_exponent(jnp.pad(top, ((0, 0), (0, 0), (0, HALF - g))), bound)[..., None]
    x = x * _pow2(_F16_TOP - ex)
    hi = lax.optimization_barrier(x.astype(jnp.float16))  # keep XLA from dropping the rounding
    lo = (x - hi.astype(jnp.float32)).astype(jnp.float16)
    inv = _pow2(ex - _F16_TOP)[..., 0]
    heads = NARROW if narrow(g) else HALF
    src = [0] * (2 * heads)  # q16 row query_row(r, part) is row part * heads + r of the parts stacked
    for part in range(2):
        for r in range(heads):
            src[query_row(r, part, g)] = part * heads + r
    q16 = jnp.concatenate([hi[:, :, :heads], lo[:, :, :heads]], axis=2)[:, :, np.array(src)]
    return q16, jnp.concatenate([inv] * 4, axis=2)


@functools.cache
def query_matrix(config: TurboQuantConfig) -> np.ndarray:
    """float32 [D, D'] with ``tile_query(config, q) == q @ query_matrix(config)`` (up to float32 rounding):
    :func:`tile_query` is linear (rotations, column orders, the QJL projection and its scale), so it is its
    value on the identity. D' = D, QJL keys 2 D."""
    with jax.ensure_compile_time_eval():
        return np.asarray(tile_query(config, jnp.eye(config.head_dim, dtype=jnp.float32)))


@functools.cache
def hadamard_form(config: TurboQuantConfig) -> tuple[np.ndarray, int] | None:
    """The structure of :func:`query_matrix` where it is a signed gather of the query's channels followed by
    Hadamard blocks: ``(codes, width)``, ``codes`` int32 [D'] = ``2 g + (s < 0)`` (g a permutation of the channels,
    s = +-1), such that column block k (``width`` columns) of ``q @ query_matrix(config)`` is
    ``(s * q[g])[k * width:(k + 1) * width] @ H / sqrt(width)``, H the +-1 Sylvester matrix of order ``width``
    (checked: the structure rebuilds the matrix within 1e-6). MSE keys with a Hadamard rotation: width D (the key
    tiles' column orders permute the bits of the channel index, and a Hadamard matrix's rows so permuted are its
    columns so permuted: the order becomes the gather); split keys: D/2; float8 keys: 1 (a permutation). None where no
    such structure exists (QJL keys: the projection is dense; ``"haar"`` rotations)."""
    from tqjax.rotation import hadamard_matrix

    w = np.asarray(query_matrix(config), np.float64)
    d, width_all = w.shape
    for width in (d, d // 2, 1):
        if width < 1 or width_all % width:
            continue
        h = np.round(hadamard_matrix(width) * math.sqrt(width)) if width > 1 else np.ones((1, 1))
        codes = np.full(width_all, -1, np.int64)
        ok = True
        for k in range(width_all // width):
            block = w[:, k * width:(k + 1) * width] * math.sqrt(width)
            for i in np.flatnonzero(np.abs(block).max(axis=1) > 0.5):
                match = np.flatnonzero(np.abs(np.abs(h @ block[i]) - width) < 1e-3 * width)  # +-row i' of h
                if len(match) != 1 or codes[k * width + match[0]] >= 0:
                    ok = False
                    break
                sign = float(np.sign(h[match[0]] @ block[i]))
                codes[k * width + match[0]] = 2 * i + (sign < 0)
            if not ok:
                break
        if not ok or (codes < 0).any():
            continue
        g, s = codes >> 1, 1.0 - 2.0 * (codes & 1)
        rebuilt = np.zeros_like(w)
        for k in range(width_all // width):
            cols = slice(k * width, (k + 1) * width)
            np.add.at(rebuilt[:, cols], g[cols], s[cols, None] * h / math.sqrt(width))
        if np.abs(rebuilt - w).max() <= 1e-6 and np.array_equal(np.sort(g), np.arange(d)):
            return codes.astype(np.int32), width
    return None


def _sign_pattern(n: int) -> jax.Array:
    """float32 [n, n]: the +-1 Sylvester--Hadamard matrix of order n (a power of 2 up to 2**8), from iotas:
    ``(-1)**popcount(i & j)``."""
    v = lax.broadcasted_iota(jnp.int32, (n, n), 0) & lax.broadcasted_iota(jnp.int32, (n, n), 1)
    parity = v
    for shift in (1, 2, 4):
        parity = parity ^ (parity >> shift)
    return (1 - 2 * (parity & 1)).astype(jnp.float32)


def _hadamard_rows(x: jax.Array, width: int) -> jax.Array:
    """float32 [..., D'] (gathered, signed query rows) -> the same shape: each ``width`` block times the +-1
    Hadamard matrix of that order over sqrt(width), as two contractions (H of order w1 w2 is H_w1 (x) H_w2: the block
    as [w1, w2] times H_w2 on its last axis, then H_w1 on its first), products and sums in float32 (exact signs; the
    sums in another order than a matrix product's)."""
    if width == 1:
        return x
    w2 = 1 << ((width.bit_length()) // 2)  # width = w1 * w2, w2 >= w1
    w1 = width // w2
    y = x.reshape(x.size // width, w1, w2)
    y = jnp.sum(y[:, :, None, :] * _sign_pattern(w2)[None, None, :, :], axis=3)  # [blocks, w1, w2]
    if w1 > 1:
        y = jnp.sum(y[:, None, :, :] * _sign_pattern(w1)[None, :, :, None], axis=2)
    return y.reshape(x.shape) * jnp.float32(1.0 / math.sqrt(width))


def _pow2(k: jax.Array) -> jax.Array:
    """float32 2**k for int32 k in [-126, 127] (the exponent field, no multiplication)."""
    return lax.bitcast_convert_type((k + 127) << 23, jnp.float32)


@functools.cache
def query_bound(config: TurboQuantConfig) -> float:
    """C with ``|tile_query(config, q)| <= max|q| * C`` for every query row q: sqrt(D) times the largest column
    2-norm of :func:`query_matrix` (Cauchy-Schwarz), a float32 rounded up."""
    w = np.asarray(query_matrix(config), np.float64)
    c = math.sqrt(w.shape[0]) * float(np.sqrt((w * w).sum(axis=0)).max())
    c32 = np.float32(c)
    return float(c32) if float(c32) >= c else float(np.nextafter(c32, np.float32(np.inf)))


def _bound_exponent(top: jax.Array, bound: float) -> jax.Array:
    """int32 exponents of the query rows' scales: frexp's exponent of ``top * bound`` (float32, the rows' largest
    magnitudes before the matrix times :func:`query_bound`; 0 for a zero row), clipped to [-100, 100]. A row times
    2**(14 - e) then has magnitudes below 2**14 (the bound in [2**13, 2**14); the row's largest entry at least
    2**13 / (C sqrt(D')) with C = ``bound`` where the matrix holds a rotation, as every preset's does: 2**6 at
    D = D' = 128): the high and low float16 parts keep ~22 bits of each entry. Formed from ``top``, not the product's
    largest entry, so that a program can make some of a row's columns."""
    t = top * jnp.float32(bound)
    ex = jnp.where(t == 0, 0, (lax.bitcast_convert_type(t, jnp.int32) >> 23 & 0xFF) - 126)
    return jnp.clip(ex, -100, 100)


def _query_kernel(q_ref, w_ref, q16_ref, qinv_ref, pid, *, group: int, factor: float, bound: float, columns: int,
                  form: str, width: int = 0):
    """Program ``pid``'s share of the query's operands: (sequence, KV head) pair ``pid // columns`` (b * Hk + h), its
    columns ``[c * cw, (c + 1) * cw)`` with c = ``pid % columns`` and cw = D' / ``columns``. ``w_ref``: the matrix
    float32 [D, D'], or with ``form="hadamard"`` :func:`hadamard_form`'s int32 codes [D'] (``width``: its block
    width; one column block)."""
    hk = q16_ref.shape[1]
    bh, c = pid // columns, pid % columns
    b, h = bh // hk, bh % hk
    if form == "hadamard":
        _hadamard_query(q_ref, w_ref, q16_ref, qinv_ref, b, h, group=group, factor=factor, bound=bound, width=width)
        return
    d, cw = w_ref.shape[0], w_ref.shape[1] // columns
    cols = pl.ds(c * cw, cw)
    q_rows = [q_ref[b, h * group + r, :].astype(jnp.float32) for r in range(group)]
    if form == "chunks":
        # the group's rows times the matrix's rows [i * chunk, (i + 1) * chunk), float32 FMAs, summed over the chunk
        # after (a sum across threads a row, not one a row and step); the loads of up to 64 KB of the matrix's share
        # (all of it at D' / columns <= 128, D = 128) issued before their products, so that their latencies overlap
        # (H200, B=1: 6.1 us against 6.9 with each chunk's loads before its products,
        # docs/data/prologue_h200_2026-12-01_s30.log)
        chunk = min(d, max(1, 2048 // cw))  # a row's [chunk, cw] float32 sums: 2048 floats
        per_batch = max(1, (64 * 1024) // (4 * chunk * cw))
        rows = [jnp.zeros((chunk, cw), jnp.float32) for _ in range(group)]
        for i0 in range(0, d // chunk, per_batch):
            span = range(i0, min(d // chunk, i0 + per_batch))
            ws = [w_ref[pl.ds(i * chunk, chunk), cols] for i in span]
            qs = [[q_ref[b, h * group + r, pl.ds(i * chunk, chunk)].astype(jnp.float32) for i in span]
                  for r in range(group)]
            for k, w in enumerate(ws):
                rows = [x + qs[r][k][:, None] * w for r, x in enumerate(rows)]
        rows = [jnp.sum(x, axis=0) for x in rows]
    elif form == "outer":  # a matrix row at a time times the rows' scalars, summed in order (no sum across threads)
        rows = [jnp.zeros((cw,), jnp.float32) for _ in range(group)]
        for k in range(d):
            w = w_ref[k, cols]
            rows = [x + q_ref[b, h * group + r, k].astype(jnp.float32) * w for r, x in enumerate(rows)]
    lane = lax.broadcasted_iota(jnp.int32, (4 * HALF,), 0) % HALF
    inv = jnp.full((4 * HALF,), 2.0 ** -_F16_TOP * factor, jnp.float32)  # padding rows: zeros, exponent 0
    for r, x in enumerate(rows):
        ex = _bound_exponent(jnp.max(jnp.abs(q_rows[r])), bound)
        x = x * _pow2(_F16_TOP - ex)
        hi = x.astype(jnp.float16)
        q16_ref[b, h, query_row(r, 0, group), cols] = hi
        q16_ref[b, h, query_row(r, 1, group), cols] = (x - hi.astype(jnp.float32)).astype(jnp.float16)
        inv = jnp.where(lane == r, _pow2(ex - _F16_TOP) * factor, inv)
    for r in range(group, q16_ref.shape[2] // 2):
        q16_ref[b, h, query_row(r, 0, group), cols] = jnp.zeros((cw,), jnp.float16)
        q16_ref[b, h, query_row(r, 1, group), cols] = jnp.zeros((cw,), jnp.float16)
    qinv_ref[b, h, :] = inv  # every column's program writes the same


#: Elements of the largest product :func:`_hadamard_rows` forms at once in the prologue (rows x D' x w2): the group's
#: rows go through it in tiles of at most this many (D=128: 4 rows, 8192, the size timed; D=256: 2; D=64: 16).
_HADAMARD_TILE = 8192


def _hadamard_query(q_ref, codes_ref, q16_ref, qinv_ref, b, h, *, group: int, factor: float, bound: float,
                    width: int):
    """:func:`_query_kernel`'s Hadamard form for pair (b, h): the group's rows (padded to G', the power of 2 at or
    above the group; rows past it zero) in tiles of R rows (R x D' x w2 <= :data:`_HADAMARD_TILE`), each gathered by
    :func:`hadamard_form`'s codes, signed, transformed (:func:`_hadamard_rows`), scaled, split and stored by row
    index."""
    codes = codes_ref[...]
    gather, sign = codes >> 1, (1 - 2 * (codes & 1)).astype(jnp.float32)
    dp = codes.shape[0]
    gp = pl.next_power_of_2(group)
    w2 = 1 << (width.bit_length() // 2)
    rows = max(1, min(gp, _HADAMARD_TILE // (dp * w2)))
    heads = q16_ref.shape[2] // 2
    lane = lax.broadcasted_iota(jnp.int32, (4 * HALF,), 0) % HALF
    ex_lane = jnp.zeros((4 * HALF,), jnp.int32)
    for r0 in range(0, gp, rows):
        r = r0 + lax.broadcasted_iota(jnp.int32, (rows,), 0)
        x = q_ref[b, (h * group + jnp.minimum(r, group - 1))[:, None], gather[None, :]].astype(jnp.float32) * sign
        ex = _bound_exponent(jnp.max(jnp.abs(x), axis=1), bound)  # [R] (the gather holds every channel once)
        x = _hadamard_rows(x, width) * _pow2(_F16_TOP - ex)[:, None]
        x = jnp.where((r < group)[:, None], x, 0.0)
        hi = x.astype(jnp.float16)
        lo = (x - hi.astype(jnp.float32)).astype(jnp.float16)
        for part, val in ((0, hi), (1, lo)):
            q16_ref[b, h, 2 * r + part if heads == NARROW else r + HALF * part, :] = val  # query_row, by vector
        ex_lane += jnp.sum(jnp.where(lane[:, None] == r[None, :], ex[None, :], 0), axis=1)
    for part in (0, 1):
        for rr in range(gp, heads):
            q16_ref[b, h, query_row(rr, part, group), :] = jnp.zeros((dp,), jnp.float16)
    qinv_ref[b, h, :] = jnp.where(lane < group, _pow2(ex_lane - _F16_TOP) * factor,
                                  2.0 ** -_F16_TOP * factor)  # padding rows: zeros, exponent 0


def _prologue_kernel(q_ref, w_ref, lens_ref, q16_ref, qinv_ref, table_ref, info_ref, *, table, table_apart: bool,
                     **query):
    batch, hk = q16_ref.shape[0], q16_ref.shape[1]
    pid = pl.program_id(0)  # read outside the branches (interpret mode cannot lower it inside)
    n_query = batch * hk * query["columns"]
    if table_apart:  # programs n_query + b make the table's share of sequence b, the others the query's operands
        pl.when(pid >= n_query)(lambda: table(lens_ref, table_ref, info_ref, pid - n_query))
        pl.when(pid < n_query)(lambda: _query_kernel(q_ref, w_ref, q16_ref, qinv_ref, pid, **query))
    else:  # KV head 0's programs make the table's shares too
        seq = pid // hk
        pl.when(pid % hk == 0)(lambda: table(lens_ref, table_ref, info_ref, seq))
        _query_kernel(q_ref, w_ref, q16_ref, qinv_ref, pid, **query)


_QUERY_COLUMNS = 8  # column blocks a (sequence, KV head) pair's query is cut in, at most
#: (sequence, KV head) pairs from which the prologue takes the Hadamard form by default (:func:`decode_prologue`)
HADAMARD_PAIRS = 64


def prologue_defaults(config: TurboQuantConfig, pairs: int) -> tuple[str, int]:
    """:func:`decode_prologue`'s default (form, num_warps) for ``pairs`` (sequence, KV head) pairs: the Hadamard form
    where :func:`hadamard_form` finds one and there are at least :data:`HADAMARD_PAIRS` pairs, with 2 warps (1 from
    1024 pairs on), else the matrix's products in chunks with 4 warps, 2 from 64 to 1023 pairs (QJL keys, H200, under
    ncu: B=8, Hk=8 6.5 us against 7.2, B=32 11.2 against 13.4, B=128 36.2 against 30.3;
    docs/data/prologue_qjl_warps_h200_2026-12-03_s45.log)."""
    if hadamard_form(config) is not None and pairs >= HADAMARD_PAIRS:
        return "hadamard", 2 if pairs < 1024 else 1
    return "chunks", 2 if 64 <= pairs < 1024 else 4


def query_columns(pairs: int, width: int, resident: int) -> int:
    """The prologue's column blocks a (sequence, KV head) pair: the most (a power of 2 up to :data:`_QUERY_COLUMNS`,
    leaving at least 16 of the ``width`` columns a program) whose programs, ``pairs`` times as many, the device
    holds at once (``resident``); 1 where none does. H200 (528 resident): B=1 8, B=32 2, B=128 1."""
    columns = 1
    while 2 * columns <= _QUERY_COLUMNS and width // (2 * columns) >= 16 and pairs * 2 * columns <= resident:
        columns *= 2
    return columns


@functools.partial(jax.jit, static_argnames=("config", "num_kv_heads", "factor", "block_size", "max_blocks",
                                             "step_pages", "resident", "num_splits", "waves", "fill", "table_apart",
                                             "form", "columns", "num_warps", "interpret"))
def decode_prologue(query: jax.Array, seq_lens: jax.Array, config: TurboQuantConfig, *, num_kv_heads: int,
                    factor: float, block_size: int, max_blocks: int, step_pages: int, resident: int,
                    num_splits: int | None, waves: int = WAVES, fill: float = FILL, table_apart: bool = True,
                    form: str | None = None, columns: int | None = None, num_warps: int | None = None,
                    interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """What the decode needs before its kernel, in one launch of a Triton kernel (CUDA, ROCm, interpret mode), one
    program per (sequence, KV head) and block of columns: query [B, Hq, D] (any float dtype), seq_lens [B] int32 ->
    (q16, qinv, table, info). The query's operands, what :func:`decode_prologue_reference` makes in XLA's five
    kernels: float16 [B, Hk, 16, D'] (groups of at most 4, :func:`narrow`: [B, Hk, 8, D']; the high and low parts of
    :func:`tile_query` of the group's rows, scaled by powers of 2, :func:`_bound_exponent`, to magnitudes below
    2**14, in the rows :func:`query_row` says; rows past the group zero) and float32 [B, Hk, 32] (the inverse powers
    times ``factor``, four times); the products are float32 FMAs with :func:`query_matrix`. B programs of their own,
    after the query programs, make the piece table, (table, info) as :func:`tqjax.pallas.pieces.piece_table` makes
    them (its arguments) in a launch of its own, each its
    sequence's share (H200, under ncu: B=1, 4k 6.9 us against 9.0 with KV head 0's programs making the shares too;
    B=32, 16k 9.9 against 11.2; docs/data/merge_h200_2026-12-01_s29.log).

    ``columns``: the query programs a (sequence, KV head) pair has, each making D' / ``columns`` of the columns (a
    power of 2 leaving at least 16); default :func:`query_columns`. A program then reads that share of the matrix,
    not all of it: H200, under ncu, B=1, 4k: 4.0 us with 8 column blocks against 6.6 for the whole rows (8 warps, the
    loads issued chunk by chunk); B=32, 16k 7.6 with 2 against 9.8; B=128, 16k 22.4 with 2, 22.7 with 1, 22.9 before
    (docs/data/prologue_h200_2026-12-01_s30.log). Variants (``experiments.prologue_probe`` times them; the defaults
    are the fastest timed): ``table_apart=False``, KV head 0's programs make the table's shares too;
    ``form="outer"``, the products a matrix row at a time times the rows' scalars (no sum across threads;
    ``"chunks"``: in [chunk, D'] tiles summed after; outer 19 us at B=1); ``num_warps`` a program's warps (4: B=1
    5.0 us against 5.4 for 8 with 4 column blocks, B=128 22.7 against 36.5 with whole rows).

    ``form="hadamard"`` (:func:`hadamard_form`: MSE, split and float8 keys) makes no products with the matrix: a
    program per pair gathers its group's rows by the codes, signs them and runs each block's Hadamard transform as
    two small contractions (:func:`_hadamard_rows`), reading 2 D' bytes of codes where the matrix is 4 D D'. The
    default form where the structure exists and the batch has at least :data:`HADAMARD_PAIRS` pairs (fewer pairs
    take the matrix's column blocks, whose programs' chains are shorter); its default warps 2, 1 from 1024 pairs on.
    H200, ``4bit_nc``, Hk=8, under ncu (docs/data/prologue_hadamard_h200_2026-12-03_s45.log), chunks/4 against
    hadamard at its default warps: B=1 3.7 against 5.3 us (4 warps: 4.6), B=4 4.7 against 5.7 (4.9), B=8 7.0 against
    5.5, B=16 6.2 against 5.4, B=32 7.3 against 6.0, B=64 14.2 against 7.5, B=128 20.4 against 9.8 (1k tokens; 22.3
    against 10.5 at 16k)."""
    structure = hadamard_form(config)
    default_form, default_warps = prologue_defaults(config, query.shape[0] * num_kv_heads)
    form = default_form if form is None else form
    if num_warps is None:
        num_warps = default_warps if form == default_form else 4 if form != "hadamard" else 2
    if form not in ("chunks", "outer", "hadamard"):
        raise ValueError(f"form must be 'chunks', 'outer' or 'hadamard', got {form!r}")
    if form == "hadamard" and structure is None:
        raise ValueError(f"form='hadamard' needs a query matrix of Hadamard blocks; {config} has none (hadamard_form)")
    b, hq, _ = query.shape
    if form == "hadamard":
        w, block = jnp.asarray(structure[0]), structure[1]
        width = w.shape[0]
        if columns is None:
            columns = 1
    else:
        w, block = jnp.asarray(query_matrix(config)), 0
        width = w.shape[1]
        if columns is None:
            columns = query_columns(b * num_kv_heads, width, resident) if table_apart else 1
    if columns < 1 or columns & (columns - 1) or width // columns < 16 or (columns > 1 and not table_apart):
        raise ValueError(f"columns={columns} must be a power of 2 leaving >= 16 of the {width} columns a program "
                         "(and needs table_apart)")
    if form == "hadamard" and columns != 1:
        raise ValueError(f"form='hadamard' makes a pair's columns in one program, got columns={columns}")
    table, table_shapes = table_program(b, num_kv_heads=num_kv_heads, block_size=block_size, max_blocks=max_blocks,
                                        step_pages=step_pages, resident=resident, num_splits=num_splits,
                                        waves=waves, fill=fill)
    kernel = functools.partial(_prologue_kernel, table=table, table_apart=table_apart, group=hq // num_kv_heads,
                               factor=factor, bound=query_bound(config), columns=columns, form=form, width=block)
    return pl.pallas_call(
        kernel,
        grid=(b * num_kv_heads * columns + (b if table_apart else 0),),
        out_shape=(jax.ShapeDtypeStruct((b, num_kv_heads, 2 * (NARROW if narrow(hq // num_kv_heads) else HALF), width),
                                        jnp.float16),
                   jax.ShapeDtypeStruct((b, num_kv_heads, 4 * HALF), jnp.float32), *table_shapes),
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        name="tq_decode_prologue",
    )(query, w, seq_lens.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("config", "num_kv_heads", "factor", "block_size", "max_blocks",
                                             "step_pages", "resident", "num_splits", "waves", "fill"))
def decode_prologue_reference(query: jax.Array, seq_lens: jax.Array, config: TurboQuantConfig, *, num_kv_heads: int,
                              factor: float, block_size: int, max_blocks: int, step_pages: int, resident: int,
                              num_splits: int | None, waves: int = WAVES,
                              fill: float = FILL) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """:func:`decode_prologue` in jnp: :func:`tile_query` and :func:`_split_query` (the query's operands in XLA,
    as before the prologue kernel), :func:`tqjax.pallas.pieces.piece_table_reference`."""
    b, hq, d = query.shape
    q = query.astype(jnp.float32).reshape(b, num_kv_heads, hq // num_kv_heads, d)
    q16, qinv = _split_query(tile_query(config, q), jnp.max(jnp.abs(q), axis=-1), query_bound(config))
    table, info = piece_table_reference(seq_lens, num_kv_heads=num_kv_heads, block_size=block_size,
                                        max_blocks=max_blocks, step_pages=step_pages, resident=resident,
                                        num_splits=num_splits, waves=waves, fill=fill)
    return q16, qinv * factor, table, info


#: Programs (one per KV head and piece of a sequence) resident per multiprocessor, by head_dim (2 page-copy
#: stages): ptxas registers per thread and the kernel's shared memory, from ``python -m
#: experiments.mgpu_static_sass`` (docs/data/decode_mgpu_static_sass_cpu_2026-11-30_s16.log, "four programs"):
#: D=64: 95-112 registers, 25-32 KB: 4 (float8 keys 5); D=128: 112-128 registers, 47-56 KB: 4 (QJL keys, whose
#: projected query takes 4 KB more: 59 KB, 3; split keys 128 registers, 53-55 KB: 4,
#: docs/data/decode_mgpu_static_sass_split_cpu_2026-11-30_s17.log); D=256: 168-215 registers, 83-108 KB: 2. Not
#: yet timed: the 3-program kernel's splits were (H200, Hk=8, docs/data/decode_mgpu_splits_h200_2026-11-30_s14.log:
#: B=8, 32k tokens: 4 splits 259 us, 6 (384 <= 396 = 3 x 132, one wave) 239 us, 8 249 us).
#: :func:`programs_per_core` makes exceptions to it: D=128 with QJL keys, D=64 in the narrow form.
PROGRAMS_PER_CORE = {64: 4, 128: 4, 256: 2}


def programs_per_core(config: TurboQuantConfig, group: int = HALF) -> int:
    """Programs of this kernel resident per multiprocessor for ``config`` and ``group`` query heads a KV head
    (:data:`PROGRAMS_PER_CORE`), but 3 for QJL keys at D=128 (141-161 registers), and 5 at D=64 in the narrow form
    (groups of at most 4; ptxas: 93-96 registers, the most 5 programs of 128 threads can have, and 24-29 KB, at 4
    shapes each of 5 presets, docs/data/static_sass_d64_cpu_2026-12-03_s44.log), for every preset but ``kqjl3v4`` (109).
    Five programs took the time of four at B=32, 16k tokens and 15-16% less at B=8, 128k (H200,
    docs/data/decode_mgpu_d64_programs_h200_2026-12-03_s44.log)."""
    if config.key_format == "prod" and config.head_dim == 128:
        return 3
    if config.head_dim == 64 and narrow(group) and not (config.key_format == "prod" and config.key_bits == 3):
        return 5
    return PROGRAMS_PER_CORE[config.head_dim]


def resident_programs(config: TurboQuantConfig, group: int = HALF, num_cores: int | None = None) -> int:
    """Programs of this kernel the device holds at once: :func:`programs_per_core` times the multiprocessors
    (``num_cores``, default the first device's)."""
    from tqjax.pallas.decode import _device_cores

    return programs_per_core(config, group) * (num_cores or _device_cores())


def paged_decode_mgpu(
    query: jax.Array,
    cache: PagedKVCache,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    stages: int = 2,
) -> jax.Array:
    """query [B, Hq, D] -> [B, Hq, D] (query's dtype); the cache, block tables [B, max_blocks] int32 and
    seq_lens [B] int32 as :func:`tqjax.pallas.decode.paged_decode` takes them; ``scale`` (default
    1/sqrt(D)) and ``softcap`` as the reference's. The work is cut into pieces by the sequences' lengths
    (:mod:`tqjax.pallas.pieces`: one program a piece, up to two waves of the programs the device holds, merged by
    their log-sum-exps); ``num_splits`` instead cuts each sequence's block table into that many equal parts.
    ``stages``: 64-token steps of page copies in flight.

    Raises NotImplementedError for a cache this kernel does not read (:func:`unsupported`) and
    RuntimeError off a Hopper GPU; the inputs are checked as for the reference."""
    from tqjax.reference import check_decode_inputs

    check_decode_inputs(query, cache, block_tables, seq_lens, kind="turboquant")
    return paged_decode_mgpu_unchecked(query, cache, block_tables, seq_lens, scale=scale, softcap=softcap,
                                     num_splits=num_splits, stages=stages)


def paged_decode_mgpu_unchecked(query: jax.Array, cache: PagedKVCache, block_tables: jax.Array, seq_lens: jax.Array,
                              *, scale: float | None = None, softcap: float | None = None,
                              num_splits: int | None = None, stages: int = 2) -> jax.Array:
    """:func:`paged_decode_mgpu` on inputs already checked (``tqjax.reference.check_decode_inputs``: it reads
    ``seq_lens`` back to the host, once is enough; :func:`tqjax.pallas.decode.paged_decode` checks them first)."""
    group = query.shape[1] // cache.num_kv_heads
    if (why := unsupported(cache.config, group, cache.block_size)) is not None:
        raise NotImplementedError(f"the Mosaic GPU decode cannot read this cache: {why}")
    if not on_hopper():
        raise RuntimeError(f"the Mosaic GPU decode needs a Hopper GPU (sm_90), not {jax.devices()[0].device_kind}")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    return paged_decode_mgpu_jit(query, cache, block_tables, seq_lens, scale=scale, softcap=softcap,
                                 num_splits=None if num_splits is None else int(num_splits), stages=int(stages),
                                 resident=resident_programs(cache.config, group))


def tile_order(config: TurboQuantConfig, seg: int) -> np.ndarray:
    """int [segment dim]: the channel of key segment ``seg`` (of its rotated query) in each column of its key
    tile: :func:`key3_channel_order` (spans and parities) for 2- and 3-bit codes, :func:`key_channel_order` for
    4-bit codes and float8 keys."""
    segment = config.key_segments[seg]
    spans = config.key_format != "fp8" and segment.bits in (2, 3)
    return (key3_channel_order if spans else key_channel_order)(segment.dim)


@functools.partial(jax.jit, static_argnums=0)
def tile_query(config: TurboQuantConfig, q: jax.Array) -> jax.Array:
    """float32 [..., D] queries -> the score products' right operands, float32 [..., D] (QJL keys: [..., 2 D]):
    each key tile's query (the segment's rotated query) in that tile's column order (:func:`tile_order`; split
    keys: both segments', concatenated), and for QJL keys then the projected query in the sign tile's order
    (:func:`qjl_channel_order`) times the QJL scale."""
    codec = key_codec(config)
    q_segs = codec.prepare_query(q)
    if config.key_format == "split":
        return jnp.concatenate([q_segs[i][..., tile_order(config, i)] for i in range(2)], axis=-1)
    q_cat = q_segs[0][..., tile_order(config, 0)]
    if config.key_format == "prod":
        proj = q_segs[1][..., qjl_channel_order(config.head_dim)] * codec.prod.qjl_scale
        q_cat = jnp.concatenate([q_cat, proj], axis=-1)
    return q_cat


def table_words(config: TurboQuantConfig) -> np.ndarray:
    """int32 [2 per MSE key table]: the low words (entries 0-3) of a table's float16 low-byte and high-byte
    planes, the kernel's table operands (:func:`key_word_asm`'s ``$5, $6``, :func:`key3_word_asm`'s ``$6, $7``,
    :func:`key2_word_asm`'s ``$5, $6``); split keys: the second segment's after the first's. Float8 keys: zeros
    (no table)."""
    if config.key_format == "fp8":
        return np.zeros(2, np.int32)
    words = []
    for table in key_tables(config):
        f16 = table.astype(np.float16).view(np.uint16)
        words += [sum(int(f16[k] >> shift & 0xFF) << (8 * k) for k in range(4)) for shift in (0, 8)]
    return np.array(words, np.uint32).view(np.int32)


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "num_splits", "stages", "resident", "waves", "fill"))
def paged_decode_mgpu_jit(
    query: jax.Array,
    cache: PagedKVCache,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    *,
    scale: float,
    softcap: float | None,
    num_splits: int | None,
    stages: int,
    resident: int = 528,
    waves: int | None = None,
    fill: float = FILL,
) -> jax.Array:
    """The jitted kernel call behind :func:`paged_decode_mgpu` (no checks; static tuning arguments; ``resident``:
    :func:`resident_programs`, 528 on the H100 and H200; ``waves``, ``fill``: :func:`tqjax.pallas.pieces.piece_table`'s,
    with ``waves > 1`` the programs past the last piece skip the body; default waves:
    :func:`tqjax.pallas.pieces.decode_waves`)."""
    cfg = cache.config
    b, hq, d = query.shape
    hk = cache.num_kv_heads
    g = hq // hk
    step_pages, max_blocks = TOKENS // cache.block_size, block_tables.shape[1]
    max_steps = -(-max_blocks // step_pages)
    if num_splits is not None:
        waves = 1
    elif waves is None:
        waves = decode_waves(b, hk, resident, max_steps)
    # the logits' scale (in base 2 without a softcap: the softmax runs on exp2) goes with the query's inverse
    # powers of 2, a product the kernel makes anyway
    factor = scale * _LOG2E if softcap is None else scale / softcap
    q16, qinv, work, info = decode_prologue(query, seq_lens, cfg, num_kv_heads=hk, factor=factor,
                                            block_size=cache.block_size, max_blocks=max_blocks, step_pages=step_pages,
                                            resident=resident, num_splits=num_splits, waves=waves, fill=fill)
    pieces = grid_size(b, hk, resident, num_splits, waves, max_steps)
    call = _build_call(cfg, hk, cache.block_size, pieces, stages, softcap, waves, group=g)
    key_scales = cache.key_scales
    if key_scales is None:  # fp8 keys carry no norms; the kernel does not read this placeholder
        key_scales = jnp.zeros((1, 1, 1, 1), jnp.float16)
    o, lse = call(work, block_tables, seq_lens, q16, qinv, flat_pages(cache.key_codes),
                  key_scales, flat_pages(cache.value_codes), cache.value_scales)
    # the merge keeps a power of 2 of the kernel's 8 rows (the narrow form's are 4)
    rows = g if g & (g - 1) == 0 else NARROW if narrow(g) else HALF
    out = merge_kernel_pieces(o, lse, info, cfg.value_bits, batch=b, rows=rows, dtype=query.dtype)
    return out.reshape(b, hk, rows, d)[:, :, :g].reshape(b, hq, d)


def merge_kernel_pieces(o: jax.Array, lse: jax.Array, info: jax.Array, value_bits: int = 4, *, batch: int,
                        rows: int = HALF, dtype: Any = jnp.float32, interpret: bool = False) -> jax.Array:
    """The kernel's outputs -> [B * Hk, rows, D] ``dtype``, channels in order: ``o`` [slots, D, 8] (each piece's
    output for the 8 query rows, normalised within the piece, its D rows in :func:`value_channel_order`, 3-bit
    values :func:`value3_channel_order`), ``lse`` [slots, 8, 8] (row 0: the pieces' log-sum-exps in base 2),
    ``info`` [2, Hk, >= B] (:func:`tqjax.pallas.pieces.piece_table`: KV head h's pieces at slots ``first + i *
    Hk``), merged by :func:`tqjax.pallas.pieces.merge_pieces` (which writes the channels in order and the first
    ``rows`` query rows, a power of 2); a (sequence, KV head) without pieces gets zeros."""
    order = (value3_channel_order if value_bits == 3 else value_channel_order)(o.shape[1])
    return merge_pieces(o, lse, info, batch=batch, rows=rows, channels=tuple(int(c) for c in order), dtype=dtype,
                        interpret=interpret)
