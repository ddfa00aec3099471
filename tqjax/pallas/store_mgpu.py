"""Fused TurboQuant quantize + paged store as a Mosaic GPU kernel (Pallas ``plgpu``): NVIDIA Hopper (sm_90a) only.

Why a second store kernel. :mod:`tqjax.pallas.store` (Triton lowering, CUDA and ROCm) spends most of an MSE
key's store in instructions Triton's layouts impose (per-row scalars replicated across a row's threads, codes
packed through reshapes) and leaves the fp16 key norms to XLA after it (a reduction over the packed words and a
scatter: 22 of 90 us at 16k tokens on the H200). Here every thread owns whole words:

- work item = 64 tokens of one KV head; persistent warpgroups, each taking every ``workers``-th item (heads
  fastest): at head_dim 128 one program a multiprocessor of 4 warpgroups (:data:`WARPGROUPS`) that share one copy
  of the +-1 matrix (32 KB, copied once per program), at 64 five programs of one; once an item's
  key and value rows are in registers, the next item's copies fill the same shared memory while this item's keys
  are rotated and stored (one buffer each a warpgroup: 32.5 KB at head_dim 128, 162 KB a program with the matrix).
  Copies (TMA) alone read the inputs: the slots, the bf16 key rows and value rows ``[64, D]`` of the item;
- thread ``(warp w, lane l)`` handles token rows ``16 w + l // 4`` and ``+ 8`` (Mosaic's WGMMA register rows)
  and, of each, channels ``32 c .. 32 c + 31`` with ``c = l % 4`` (head_dim 128; ``16 c ..`` at 64): four
  (two) 16-byte shared-memory loads a row of the key and of the value;
- keys (exact Hadamard codes, :meth:`tqjax.quantizers.TurboQuantMSE.quantize`): the row's largest magnitude
  (``max.u16x2`` on the bf16 pairs, then the quad's shuffles), the grid exponent, ``n = floor(x 2**s + 1/2)``,
  ``||n||**2`` (float32 sums of four squares, exact below 2**24, one conversion a group); the integers are the
  rotation's left operand **in registers** (float16 pairs in the WGMMA layout, the channels in
  :func:`tqjax.pallas.decode_mgpu.key_channel_order`) and the +-1 matrix, permuted the same way on both sides
  (:func:`rotation_operand`), the right one in shared memory: one ``wgmma`` gives ``z`` in the accumulator
  layout, where the thread again holds its channels of each row. Each ``z |z|`` is bucketized against
  ``||n||**2 t_j`` by a binary search over the positive limits (the sign gives the top bit:
  :func:`tqjax.pallas.store._search_codes`, same comparisons, on the bits of ``z z`` plus ``[z <= 0]``; the
  sign kept as an integer mask, ``set.gt``, the code formed by one xor; four elements at a time, chained so
  that ptxas does not interleave them all), the codes packed into the thread's words (4-bit: 4; 3-bit: one word
  of the low bits, two of the high pairs) and stored (16-, 8- and 4-byte stores); the fixed-point squares of
  the codes' centroids summed (:func:`square_table` in shared memory, the quad's shuffles), and the fp16 key
  norm formed with IEEE float32 operations (``sqrt.rn``, ``div.rn``) and stored by the quad's first thread;
- QJL keys (exact QJL signs, :meth:`tqjax.quantizers.TurboQuantProd.quantize`): the MSE stage's codes as above
  (one segment of b - 1 bits, no norm correction), then in the same registers ``w = z - c L`` (the centroid's
  magnitude from :func:`centroid_table` times :func:`tqjax.quantizers.residual_length`, an exact product, signed
  by ``z``'s sign; one ``sub.rn``), the row's largest ``|w|`` (the quad's shuffles) and its grid, the integers
  ``w_int`` as the left operand of a second ``wgmma`` against the integer sketch matrix (:func:`sketch_operand`,
  32 KB more shared memory at head_dim 128): the sums are integers below 2**24, exact in any order, and their
  signs are packed and stored as a 1-bit segment; the row's fp16 (norm, gamma) in one 4-byte store;
- values (:func:`tqjax.quantizers.quantize_values`): min/max on the bf16 pairs (``min.bf16x2``), the quad's
  shuffles, the fp16 scale and zero, the reciprocal ``rcp.rn`` (correctly rounded: the entry of
  :func:`tqjax.quantizers.fp16_reciprocals`), then per element ``(v - zero) * inv`` and ``floor(t + 1/2)``
  with ``add.rm`` + ``cvt.rmi.u32`` (which saturates at 0) and a ``min``
  (:func:`tqjax.pallas.store._value_codes`), packed and stored like the keys. Elements are not clipped to
  float16's range before the codes: a clipped element is the row's minimum or maximum, whose code (0 or the
  top) the unclipped one gets too.

Contract: bit for bit :func:`tqjax.reference.store_reference` computed with IEEE float32 arithmetic (on a CPU):
codes, fp16 norms and value scales. XLA's own reference on the GPU gives the same codes and value scales but
about 1 in 10**4 key norms one fp16 ulp away (H200: 6 of 131072 at 16k tokens; its float32 division is
``div.full``, ``-nvptx-prec-divf32=1``, and ``div.full`` here did not reproduce its bits either: some other of
its float32 operations differs too); ``tests/test_store_mgpu.py`` checks both. The cache is updated in place
(its arrays are GMEM refs, ``jax.new_ref``, that only the kernel writes; the jit donates the cache); ``slot <
0`` and ``slot >= num_slots`` are skipped; keys and values without NaN. :func:`unsupported` says which caches it
takes (head_dim 128: MSE keys of one 3- or 4-bit segment, the split presets or 3- and 4-bit QJL keys, with a
Hadamard rotation, 3- or 4-bit values; head_dim 64: the same presets, a thread holding 16 codes of a row: the
one-bit fields of 3-bit codes are half a word, shared by a lane pair through a shuffle);
:func:`tqjax.pallas.store.store` runs the Triton kernel for the others and is the entry point. There is no
interpret mode: ``tests/test_store_mgpu.py`` lowers the kernel on the CPU and compares it with the reference
on a Hopper GPU (``-m gpu``).

Index arithmetic: every cache address is formed in 64-bit integers from (KV head, page, row, word); the
copies' descriptors take 64-bit strides. Caches of any size are addressed correctly.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu

from tqjax.codec import key_codec
from tqjax.config import TurboQuantConfig
from tqjax.layout import PagedKVCache
from tqjax.packing import bit_fields
from tqjax.pallas.decode_mgpu import (
    _F16_TILE,
    _ir,
    _thread_rows,
    key_channel_order,
    on_hopper,
)
from tqjax.quantizers import _TINY, FP16_MAX
from tqjax.reference import check_store_inputs

__all__ = ["HEAD_DIMS", "PROGRAMS_PER_CORE", "TOKENS", "WARPGROUPS", "centroid_table", "field_runs", "on_hopper",
           "programs_per_core", "refusal", "sketch_operand",
           "rotation_operand", "square_table", "store_mgpu", "store_mgpu_jit", "unsupported"]

TOKENS = 64  # tokens per program: the rotation product's M
HEAD_DIMS = (64, 128)  # a thread holds head_dim / 4 channels of a row: 32 (whole words of every field) or 16
#: Programs resident a multiprocessor, by head_dim: at 128 one of 4 warpgroups (<= 128 registers a thread, 162 KB
#: of shared memory); at 64 five of one (<= 96 registers: 84-96 by preset, static count with jax 0.11.2's lowering
#: and ptxas 13.0; 26.7 KB each; 1-3% faster than four at 16k tokens on the H200, six do not fit).
PROGRAMS_PER_CORE = {64: 5, 128: 1}
#: Warpgroups a program, by head_dim: each takes its own work items; a program's warpgroups share the +-1 matrix
#: (32 KB at head_dim 128: with 3 programs of one warpgroup, each held its own copy; 4 did not fit).
WARPGROUPS = {64: 1, 128: 4}


def programs_per_core(config: TurboQuantConfig) -> int:
    """Programs resident a multiprocessor for ``config``: :data:`PROGRAMS_PER_CORE`, but 4 for QJL keys at head_dim
    64 (101 registers, static count with jax 0.11.2's lowering and ptxas 13.0: five need <= 96)."""
    if config.key_format == "prod" and config.head_dim == 64:
        return 4
    return PROGRAMS_PER_CORE[config.head_dim]


_CHAIN = 2  # register pairs (4 elements) of a row bucketized at once (:func:`_keys_out`)


def unsupported(config: TurboQuantConfig) -> str | None:
    """Why this kernel cannot store ``config`` (None if it can)."""
    if config.head_dim not in HEAD_DIMS:
        return f"head_dim {config.head_dim} (the Mosaic store takes {HEAD_DIMS})"
    if config.key_format == "prod":
        if config.key_bits not in (3, 4):
            return f"{config.key_bits}-bit QJL keys (the Mosaic store takes 3 and 4: 2- or 3-bit MSE codes)"
        if not key_codec(config).prod.exact:
            return f"a {config.rotation} rotation (the Mosaic store codes Hadamard rotations exactly)"
        if config.value_bits not in (3, 4):
            return f"{config.value_bits}-bit values (the Mosaic store takes 3 or 4)"
        return None
    segs = config.key_segments
    bits = [s.bits for s in segs]
    if bits not in {"mse": ([3], [4]), "split": ([4, 3], [3, 2])}.get(config.key_format, ()):
        return (f"{config.key_format} keys of {bits} bits (the Mosaic store takes 3- or 4-bit MSE keys and the "
                "3.5- and 2.5-bit split keys)")
    if not all(key_codec(config).quantizers[i].exact for i in range(len(segs))):
        return f"a {config.rotation} rotation (the Mosaic store codes Hadamard rotations exactly)"
    if [s.channel_run for s in segs] != [i * config.head_dim // len(segs) for i in range(len(segs))]:
        return "calibrated key channels (the Mosaic store takes the outliers as the first half)"
    if not config.norm_correction:
        return "keys without norm correction (the Mosaic store forms corrected norms)"
    if config.value_bits not in (3, 4):
        return f"{config.value_bits}-bit values (the Mosaic store takes 3 or 4)"
    return None


def rotation_operand(config: TurboQuantConfig) -> np.ndarray:
    """float16 [D, D]: the rotation's right operand, stored transposed (``B^T``) in shared memory: the +-1
    matrix ``M`` (``z = n M^T``; block diagonal for split keys, one block a segment) with its rows and columns in
    :func:`key_channel_order`, so that the left operand's column k is channel ``order[k]`` of ``n`` and the
    product's column j is channel ``order[j]`` of ``z`` (each thread holds its own channels on both sides)."""
    codec = key_codec(config)
    m = np.zeros((config.head_dim, config.head_dim), np.float32)
    if config.key_format == "prod":  # one rotation of every channel, the MSE stage's and the residual's
        m[...] = codec.prod.pm1
    else:
        for i, seg in enumerate(config.key_segments):
            at = np.asarray(seg.channels)
            m[np.ix_(at, at)] = codec.quantizers[i].pm1
    order = key_channel_order(config.head_dim)
    return m.astype(np.float16)[np.ix_(order, order)]


def sketch_operand(config: TurboQuantConfig) -> np.ndarray:
    """float16 [D, D]: the QJL sketch's right operand (``s = w_int S_int^T``), the integer matrix
    :func:`tqjax.quantizers.qjl_sketch_matrix` (entries up to 31: exact in float16) with its rows and columns in
    :func:`key_channel_order`, as :func:`rotation_operand` (QJL keys only)."""
    order = key_channel_order(config.head_dim)
    return np.asarray(key_codec(config).prod.sketch_matrix)[np.ix_(order, order)].astype(np.float16)


def centroid_table(config: TurboQuantConfig) -> np.ndarray:
    """int32 [32] (QJL keys, in the place of :func:`square_table`): entry ``m`` (``m < 2**(b - 2)``) the float32 bits
    of the MSE stage's centroid ``c[half + m] = -c[half - 1 - m]`` (odd codebooks), the rest 0."""
    c = np.asarray(key_codec(config).prod.mse.centroids, np.float32)
    half = len(c) // 2
    if not np.array_equal(c[half:], -c[:half][::-1]):
        raise ValueError("the Mosaic store needs an odd codebook")
    out = np.zeros(32, np.int32)
    out[:half] = c[half:].view(np.int32)
    return out


def square_table(config: TurboQuantConfig) -> np.ndarray:
    """int32 [32] (a copy of at least 128 bytes): entry ``16 s + m`` (``m < 2**(bits - 1)``) the fixed-point
    square of segment s's centroids ``half + m`` and ``half - 1 - m`` (equal: the codebooks are odd), the rest 0;
    ``m`` is the search's count of positive limits below the element
    (``tqjax.quantizers.TurboQuantMSE.stored_norm`` sums these)."""
    out = np.zeros(32, np.int32)
    for i in range(len(config.key_segments)):
        squares = np.asarray(key_codec(config).quantizers[i]._squares, np.int64)
        half = len(squares) // 2
        if not np.array_equal(squares, squares[::-1]):
            raise ValueError("the Mosaic store needs an odd codebook (symmetric squares)")
        out[16 * i:16 * i + half] = squares[half:]
    return out


# ---- MLIR helpers (inside plgpu.inline_mgpu) -------------------------------------------------------


def _types():
    ir, *_ = _ir()
    return ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64), ir.F32Type.get()


def _ci(v: int):
    return mgpu.utils.c(int(np.int64(v).astype(np.int32)), _types()[0])


def _asm(out_ty, operands: list, text: str, constraints: str):
    _, _, llvm, _, _ = _ir()
    return llvm.inline_asm(out_ty, operands, text, constraints)


def _op2(name: str, a, b):
    """One PTX instruction on two 32-bit registers (e.g. ``max.u16x2``, ``min.bf16x2``)."""
    return _asm(_types()[0], [a, b], f"{name} $0, $1, $2;", "=r,r,r")


def _global_ptr(ref, offset, dtype):
    """Global-memory pointer to element ``offset`` (i64) of GMEM ``ref`` (its flat, row-major index)."""
    _, _, llvm, _, _ = _ir()
    ptr = llvm.addrspacecast(llvm.PointerType.get(1), mgpu.utils.memref_ptr(ref))
    return mgpu.utils.getelementptr(ptr, [offset], dtype)


def _i64(x):
    ir, arith, *_ = _ir()
    return arith.extsi(ir.IntegerType.get_signless(64), x)


def _store_words(ref, offset, words: list, chunk: int) -> None:
    """``words`` (i32) at i32 word ``offset`` (i64) of GMEM ``ref``, in stores of ``chunk`` (1, 2 or 4) words
    (``offset`` a multiple of ``chunk`` words)."""
    ir, arith, llvm, _, vector = _ir()
    i32, i64, _ = _types()
    for k in range(0, len(words), chunk):
        ptr = _global_ptr(ref, arith.addi(offset, mgpu.utils.c(k, i64)) if k else offset, i32)
        part = words[k:k + chunk]
        if len(part) == 1:
            llvm.store(part[0], ptr)
        else:
            llvm.store(vector.from_elements(ir.VectorType.get((len(part),), i32), part), ptr)


def _chunk(*word_counts: int) -> int:
    """The widest store (1, 2 or 4 words) that every count divides into: the rows', fields' and runs' lengths."""
    return next(c for c in (4, 2, 1) if all(n % c == 0 for n in word_counts))


def _quad(x, op: str, lanes: int = 4):
    """``op`` (a two-operand PTX instruction on 32-bit registers) across ``lanes`` (4: this lane's quad; 2: its
    half of the quad, a key segment's lanes for split keys)."""
    for dist in (1, 2)[:lanes.bit_length() - 1]:
        x = _op2(op, x, mgpu.utils.shfl_bfly(x, dist))
    return x


def _bits_f32(x):
    ir, arith, *_ = _ir()
    return arith.bitcast(ir.F32Type.get(), x)


def _bits_i32(x):
    _, arith, *_ = _ir()
    return arith.bitcast(_types()[0], x)


class _Row:
    """One of this thread's two token rows of a program: its row of the program's tiles, whether it is stored,
    and its cache position (``page``, ``offset``; i64)."""

    def __init__(self, r: int, tile, start, slots_smem, num_tokens: int, num_slots: int, block_size: int):
        _, arith, llvm, _, _ = _ir()
        i32, i64, _ = _types()
        self.lane4, row0 = _thread_rows()
        self.row = arith.addi(row0, _ci(8 * r))  # of the tiles, which start at token ``start``
        token = arith.addi(start, self.row)
        # slots_smem holds the slots of tokens tile * 64 .. + 63 (rows before tile * 64 are not stored)
        at = arith.maxsi(arith.subi(token, arith.muli(tile, _ci(TOKENS))), _ci(0))
        slot = llvm.load(i32, mgpu.utils.getelementptr(mgpu.utils.memref_ptr(slots_smem), [at], i32))
        lt, ge = arith.CmpIPredicate.slt, arith.CmpIPredicate.sge
        # the last tile starts early when N is not a multiple of 64: the rows before ``tile * 64`` are the
        # previous program's
        stored = arith.andi(arith.cmpi(ge, token, arith.muli(tile, _ci(TOKENS))),
                            arith.cmpi(lt, token, _ci(num_tokens)))
        self.valid = arith.andi(stored, arith.andi(arith.cmpi(ge, slot, _ci(0)), arith.cmpi(lt, slot, _ci(num_slots))))
        slot = _i64(arith.maxsi(slot, _ci(0)))
        self.page = arith.divui(slot, mgpu.utils.c(block_size, i64))
        self.offset = arith.remui(slot, mgpu.utils.c(block_size, i64))
        self.first = arith.cmpi(arith.CmpIPredicate.eq, self.lane4, _ci(0))

    def segment(self, segments: int) -> tuple:
        """(this thread's key segment (i32), its lane among the segment's ``4 // segments``, whether it is the
        segment's first lane): lane c of a quad holds channels D/4 c .. D/4 (c + 1) - 1, a segment D // segments."""
        _, arith, *_ = _ir()
        if segments == 1:
            return _ci(0), self.lane4, self.first
        lanes = 4 // segments
        lane = arith.remui(self.lane4, _ci(lanes))
        return arith.divui(self.lane4, _ci(lanes)), lane, arith.cmpi(arith.CmpIPredicate.eq, lane, _ci(0))

    def input_words(self, tile_smem, dim: int) -> list:
        """The thread's 16 words (bf16 pairs: channels 32c + 2i, + 1 in word i) of its row of a row-major bf16
        [64, D] tile in shared memory, in 16-byte loads."""
        ir, arith, llvm, _, vector = _ir()
        i32 = _types()[0]
        ptr = mgpu.utils.memref_ptr(tile_smem)
        base = arith.addi(arith.muli(self.row, _ci(dim // 2)), arith.muli(self.lane4, _ci(dim // 8)))
        words = []
        for k in range(dim // 32):
            at = mgpu.utils.getelementptr(ptr, [arith.addi(base, _ci(4 * k))], i32)
            vec = llvm.load(ir.VectorType.get((4,), i32), at)
            words += [vector.extract(vec, [], [x]) for x in range(4)]
        return words

    def cache_at(self, h, num_pages: int, block_size: int, row_len: int, start):
        """i64 element index of (head h, this row's page and offset, element ``start`` (i32 or int)) of a
        [Hk, pages, block_size, row_len] cache array."""
        _, arith, *_ = _ir()
        i64 = _types()[1]
        c = functools.partial(mgpu.utils.c, ty=i64)
        at = arith.addi(arith.muli(_i64(h), c(num_pages)), self.page)
        at = arith.addi(arith.muli(at, c(block_size)), self.offset)
        start = c(start) if isinstance(start, int) else _i64(start)
        return arith.addi(arith.muli(at, c(row_len)), start)


class FieldRun(NamedTuple):
    """Where a thread's words of one bit field of a key segment (or of the value) go in the cache row."""

    width: int  # bits of each code the field holds (tqjax.packing.bit_fields)
    shift: int  # of the code's lowest bit in the field
    start: int  # the field's first word in the row
    words: int  # the thread's words of the field, at start + lane * words; 0: half a word, the lane pair 2k, 2k + 1
    #             sharing word start + k (16 channels of a 1-bit field: head_dim 64, 3-bit codes)
    chunk: int  # words a store: the widest every row, field and run start is aligned to


def field_runs(bits: int, seg_dim: int, word_start: int, row_words: int,
               thread_channels: int = 32) -> list[FieldRun]:
    """Where a thread's words of one key segment (or of the value) go in the cache row, host-side: one
    :class:`FieldRun` per :func:`tqjax.packing.bit_fields` of ``bits``; the field's ``seg_dim * width / 32`` words
    start at word ``start`` of the ``row_words``-word row, the thread's codes being channels ``thread_channels *
    lane ..`` of the segment."""
    out = []
    start = word_start
    for width, shift in bit_fields(bits):
        words, rest = divmod(thread_channels * width, 32)
        assert rest == 0 or (words, rest) == (0, 16), (thread_channels, width)  # whole words, or half of one
        out.append(FieldRun(width, shift, start, words, _chunk(row_words, start, max(words, 1))))
        start += seg_dim * width // 32
    return out


def _pack(codes: list, bits: int, width: int, shift: int, masks: bool = False) -> list:
    """The thread's codes (``codes[i]``: channel ``len(codes) * lane + i`` of its segment, i32) -> its words of the
    field ``(width, shift)`` (:func:`tqjax.packing.pack_codes`: code bits ``shift .. shift + width - 1``, ``32 /
    width`` codes a word, the first in the low bits; fewer codes than a word takes fill its low bits). ``masks``:
    one-bit codes given as 0 or -1, each taken as ``code & bit`` (one ``lop3`` with the OR)."""
    _, arith, *_ = _ir()
    per_word = 32 // width
    words = []
    for w in range(-(-len(codes) // per_word)):
        word = None
        for i in range(min(per_word, len(codes) - w * per_word)):
            code = codes[w * per_word + i]
            if masks:
                assert bits == width == 1
                code = arith.andi(code, _ci(1 << i))
                word = code if word is None else arith.ori(word, code)
                continue
            if shift:
                code = arith.shrui(code, _ci(shift))
            if bits - shift > width:
                code = arith.andi(code, _ci((1 << width) - 1))
            if i:
                code = arith.shli(code, _ci(width * i))
            word = code if word is None else arith.ori(word, code)
        words.append(word)
    return words


def _store_codes(ref, codes: list, bits: int, lane, seg_dim: int, word_start: int, row_words: int, row: _Row, h,
                 num_pages: int, block_size: int, where, masks: bool = False) -> None:
    """Pack the thread's codes of a segment (:func:`_pack`) and store them into its cache row (:func:`field_runs`)
    where ``where`` (i1). Whole words: all under one condition. A half-word field's two halves meet by a shuffle
    (every lane takes part, so it runs before the condition) and the pair's even lane stores the word."""
    _, arith, *_ = _ir()
    runs = field_runs(bits, seg_dim, word_start, row_words, len(codes))
    if all(run.words for run in runs):
        with mgpu.utils.when(where):
            for run in runs:
                at = arith.addi(_ci(run.start), arith.muli(lane, _ci(run.words)))
                _store_words(ref, row.cache_at(h, num_pages, block_size, row_words, at),
                             _pack(codes, bits, run.width, run.shift, masks), run.chunk)
        return
    for run in runs:
        words = _pack(codes, bits, run.width, run.shift, masks)
        if run.words:
            at, store = arith.addi(_ci(run.start), arith.muli(lane, _ci(run.words))), where
        else:  # lanes 2k and 2k + 1 (lane ^ 1 in the warp too): the even one's codes in the low half
            words = [arith.ori(words[0], arith.shli(mgpu.utils.shfl_bfly(words[0], 1), _ci(16)))]
            at = arith.addi(_ci(run.start), arith.shrui(lane, _ci(1)))
            store = arith.andi(where, arith.cmpi(arith.CmpIPredicate.eq, arith.andi(lane, _ci(1)), _ci(0)))
        with mgpu.utils.when(store):
            _store_words(ref, row.cache_at(h, num_pages, block_size, row_words, at), words, run.chunk)


def _signed_code(zz, limits: list, firsts: list, mask):
    """``(up, at, code)`` of a rotated element ``zz`` (f32 integer): ``up`` -1 where ``zz > 0`` else 0, ``at``
    :func:`_search`'s ``half + count`` on the bits of ``zz * zz`` plus ``[zz <= 0]``, and the code ``at ^ (~up &
    mask)`` (``half - 1 - count = (half + count) ^ (2 half - 1)`` for ``zz <= 0``)."""
    _, arith, *_ = _ir()
    # up: -1 where z > 0, else 0; z * z is |z| z's magnitude (z an integer: no underflow)
    up = _asm(_types()[0], [zz], "set.gt.s32.f32 $0, $1, 0f00000000;", "=r,f")
    s_bits = arith.addi(_bits_i32(arith.mulf(zz, zz)), arith.addi(up, _ci(1)))
    at = _search(s_bits, limits, firsts)
    return up, at, arith.xori(at, arith.andi(arith.xori(up, _ci(-1)), mask))


def _search(s_bits, limits: list, firsts: list):
    """``half + count`` for elements with ``s_bits`` = the bits of ``z * z`` plus ``[z <= 0]``, against the row's
    ascending positive limits (bit patterns, ``2**m - 1`` of them; a segment of fewer bits has its list padded
    with ``0x7FFFFFFF``, above every element): count = #{limits below}, by binary search
    (:func:`tqjax.pallas.store._count_below`, its select tree driven by the levels' comparisons); ``half`` =
    2**(bits - 1) of the thread's segment enters with the first level's outcome, ``firsts`` = (``half + 2**(m -
    1)``, ``half``) (i32). The code is ``half + count`` for ``z > 0`` and ``half - 1 - count`` otherwise."""
    _, arith, *_ = _ir()
    m = (len(limits) + 1).bit_length() - 1
    aboves, count = [], None
    for level in range(m):
        step = 1 << (m - 1 - level)
        options = [limits[k * 2 * step + step - 1] for k in range(1 << level)]
        for bit in reversed(aboves):  # the latest level picks among neighbours
            options = [arith.select(bit, hi, lo) for lo, hi in zip(options[0::2], options[1::2])]
        above = arith.cmpi(arith.CmpIPredicate.sgt, s_bits, options[0])
        aboves.append(above)
        if count is None:
            count = arith.select(above, firsts[0], firsts[1])
        else:
            count = arith.addi(count, arith.select(above, _ci(step), _ci(0)))
    return count


# ---- the kernel's three parts -----------------------------------------------------------------------


def _grid_field(top, grid_bits: int):
    """:func:`tqjax.quantizers.snap_to_grid`'s field from ``top``, the float32 exponent field of the largest
    magnitude (i32)."""
    _, arith, *_ = _ir()
    return arith.minsi(arith.maxsi(arith.subi(_ci(254 + grid_bits - 1), top), _ci(1)), _ci(254))


def _snap(x, scale):
    """``floor(x scale + 1/2)`` (f32; ``scale`` a power of two: the product is exact, so the FMA rounds as the
    reference's product and addition)."""
    return _asm(_types()[2], [x, scale], "{ .reg .f32 t; fma.rn.f32 t, $1, $2, 0f3F000000; cvt.rmi.f32.f32 $0, t; }",
                "=f,f,f")


def _four_squares(xs: list):
    """i32: the sum of the squares of four float32 integers ``|x| <= 2**11`` (exact in float32: <= 2**24)."""
    return _asm(_types()[0], xs, "{ .reg .f32 t; mul.rn.f32 t, $1, $1; fma.rn.f32 t, $2, $2, t;"
                " fma.rn.f32 t, $3, $3, t; fma.rn.f32 t, $4, $4, t; cvt.rzi.s32.f32 $0, t; }", "=r,f,f,f,f")


def _f16_pair(lo, hi):
    """A WGMMA-layout register: float32 integers ``lo``, ``hi`` (exact in float16) as vector<2xf16>."""
    ir, _, _, _, vector = _ir()
    i32 = _types()[0]
    packed = _asm(i32, [hi, lo], "cvt.rn.f16x2.f32 $0, $1, $2;", "=r,f,f")
    return vector.bitcast(ir.VectorType.get((2,), ir.F16Type.get()),
                          vector.from_elements(ir.VectorType.get((1,), i32), [packed]))


def _keys_in(rows: list, key_smem, cfg: TurboQuantConfig, grid_bits: int):
    """Snap this thread's key elements to the grid: (float16 [64, D] WGMMA-layout registers of ``n``, for each
    row (``||n||**2`` i32, grid field i32) of the thread's key segment)."""
    ir, arith, _, _, vector = _ir()
    i32, _, f32 = _types()
    d = cfg.head_dim
    lanes = 4 if cfg.key_format == "prod" else 4 // len(cfg.key_segments)  # a key segment's lanes (QJL: one rotation)
    regs = np.empty(mgpu.WGMMA_LAYOUT.registers_shape((TOKENS, d)), dtype=object)
    stats = []
    for r, row in enumerate(rows):
        words = row.input_words(key_smem, d)
        top = None
        for w in words:
            mag = arith.andi(w, _ci(0x7FFF7FFF))
            top = mag if top is None else _op2("max.u16x2", top, mag)
        top = arith.maxui(arith.andi(top, _ci(0xFFFF)), arith.shrui(top, _ci(16)))
        top = arith.shrui(_quad(top, "max.u32", lanes), _ci(7))  # the float32 exponent field of max |x|
        field = _grid_field(top, grid_bits)
        scale = _bits_f32(arith.shli(field, _ci(23)))
        n2, group = _ci(0), []
        for j, w in enumerate(words):
            pair = [_snap(_bits_f32(x), scale) for x in (arith.shli(w, _ci(16)), arith.andi(w, _ci(0xFFFF0000)))]
            group += pair
            if len(group) == 4:  # |n| <= 2**grid_bits = 2**11
                n2 = arith.addi(n2, _four_squares(group))
                group = []
            regs[(0, j, 0, 0, r) + (0,) * (regs.ndim - 5)] = _f16_pair(*pair)
        stats.append((_quad(n2, "add.u32", lanes), field))
    n_f16 = mgpu.FragmentedArray(_registers=regs, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)
    return n_f16, stats


def _rows_array(values: list):
    """Per-row i32 values (this thread's rows 0 and 1) as a WGMMA_ROW_LAYOUT [64] int32 array."""
    ir, _, _, _, vector = _ir()
    layout = mgpu.WGMMA_ROW_LAYOUT
    regs = np.empty(layout.registers_shape((TOKENS,)), dtype=object)
    for idx in np.ndindex(*regs.shape):
        regs[idx] = vector.from_elements(ir.VectorType.get((1,), _types()[0]), [values[idx[2]]])
    return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=True)


def _row_values(x: mgpu.FragmentedArray) -> list:
    """Inverse of :func:`_rows_array`: the thread's two row values."""
    *_, vector = _ir()
    regs = np.array(x.registers, dtype=object)
    return [vector.extract(regs[idx], [], [0]) for idx in sorted(np.ndindex(*regs.shape), key=lambda i: i[2])]


def _after(x, dep):
    """``x`` (f32), made to depend on ``dep`` (i32) in PTX (``prmt`` picks x's own four bytes): ptxas then
    computes what uses ``x`` after ``dep``."""
    return _bits_f32(_asm(_types()[0], [_bits_i32(x), dep], "prmt.b32 $0, $1, $2, 0x3210;", "=r,r,r"))


def _keys_out(rows: list, z: mgpu.FragmentedArray, n2s: list, fields: list, squares_ref, kc_ref, ks_ref, h,
              cfg: TurboQuantConfig, num_pages: int, block_size: int) -> None:
    """Bucketize, pack and store the rotated keys ``z`` (float32 [64, D], WGMMA layout, channels in
    :func:`key_channel_order`) and their fp16 norms, one a key segment (split keys: lanes ``c < 2`` hold the
    outliers, ``c >= 2`` the rest; their limits, halves and squares picked per lane, the search as deep as the
    wider segment's). Every ``_CHAIN`` register pairs of a row are bucketized after the previous ones
    (:func:`_after` on the running squares' sum): left alone, ptxas interleaves all 32 searches of a row (217
    registers with the sign as a predicate, 2 programs a multiprocessor for 4-bit keys). The sign is an integer
    mask (``set.gt``): the search's count starts at the segment's half and the code is ``count ^ mask``
    (``half - 1 - c = (half + c) ^ (2 half - 1)``), 8-11% fewer instructions than predicates and selects, 128
    registers with ptxas 13.0 (128-168 on the H200's, depending on N; docs/PERFORMANCE.md)."""
    ir, arith, llvm, _, vector = _ir()
    i32, _, f32 = _types()
    i16 = ir.IntegerType.get_signless(16)
    segs = cfg.key_segments
    qs = [key_codec(cfg).quantizers[i] for i in range(len(segs))]
    lanes = 4 // len(segs)
    # per segment: the positive limits t_j (those above the middle one, 0), padded to the widest segment's
    positive = [np.asarray(q.thresholds, np.float32)[1 << (seg.bits - 1):] for q, seg in zip(qs, segs)]
    num_limits = max(len(p) for p in positive)
    regs = np.array(z.registers, dtype=object)
    key_words = cfg.key_words
    for r, row in enumerate(rows):
        seg, lane, seg_first = row.segment(len(segs))
        other = arith.cmpi(arith.CmpIPredicate.ne, seg, _ci(0)) if len(segs) > 1 else None

        def per_lane(values, ty=f32, other=other):  # segment 0's value, or segment 1's where this lane is there
            make = (lambda v: arith.constant(ty, v)) if ty is f32 else _ci
            return make(values[0]) if other is None or values[0] == values[1] else arith.select(
                other, make(values[1]), make(values[0]))

        n2f = arith.sitofp(f32, n2s[r])
        limits = []
        for j in range(num_limits):
            ts = [float(p[j]) if j < len(p) else None for p in positive]
            assert ts[0] is not None  # segment 0 (the outliers) is the wider
            bits_j = _bits_i32(arith.mulf(n2f, per_lane([t if t is not None else ts[0] for t in ts])))
            if None in ts:  # the narrower segment's list ends: its lanes compare with 0x7FFFFFFF
                bits_j = arith.select(other, _ci(0x7FFFFFFF), bits_j)
            limits.append(bits_j)
        halves = [1 << (seg_.bits - 1) for seg_ in segs]
        top = 1 << ((num_limits + 1).bit_length() - 2)  # the first level's step
        half = per_lane(halves, i32)
        firsts = [per_lane([h_ + top for h_ in halves], i32), half]
        mask = per_lane([2 * h_ - 1 for h_ in halves], i32)  # half + count ^ mask = half - 1 - count
        # the squares' table at -half: entry half + count is square_table's entry count
        sq_ptr = mgpu.utils.getelementptr(mgpu.utils.memref_ptr(squares_ref), [
            arith.subi(arith.muli(seg, _ci(16)), half) if len(segs) > 1 else _ci(-halves[0])], i32)
        codes, total = [], _ci(0)  # the squares' sum
        for j in range(regs.shape[1]):
            pair = regs[(0, j, 0, 0, r) + (0,) * (regs.ndim - 5)]
            for e in range(2):
                zz = vector.extract(pair, [], [e])
                if j and j % _CHAIN == 0:
                    zz = _after(zz, total)
                _, at, code = _signed_code(zz, limits, firsts, mask)
                codes.append(code)
                sq = llvm.load(i32, mgpu.utils.getelementptr(sq_ptr, [at], i32))
                total = arith.addi(total, sq)
        total = _quad(total, "add.u32", lanes)
        for k, seg_ in enumerate(segs):
            here = row.valid if other is None else arith.andi(
                row.valid, arith.cmpi(arith.CmpIPredicate.eq, seg, _ci(k)))
            _store_codes(kc_ref, codes, seg_.bits, lane, seg_.dim, seg_.word_start, key_words, row, h, num_pages,
                         block_size, here)
        with mgpu.utils.when(arith.andi(row.valid, seg_first)):
            # stored_norm: sqrt(n2) * step / max(sqrt(total * 2**-s), tiny), min(FP16_MAX), to fp16
            step = _bits_f32(arith.shli(arith.subi(_ci(254), fields[r]), _ci(23)))
            length = arith.mulf(arith.sitofp(f32, total), per_lane([2.0 ** -q._square_shift for q in qs]))
            norm16 = _asm(
                i32, [n2f, step, length, arith.constant(f32, float(np.float32(_TINY))),
                      arith.constant(f32, float(FP16_MAX))],
                "{ .reg .f32 a, b; .reg .b16 h; sqrt.rn.f32 a, $1; mul.rn.f32 a, a, $2; sqrt.rn.f32 b, $3;"
                " max.f32 b, b, $4; div.rn.f32 a, a, b; min.NaN.f32 a, a, $5; cvt.rn.f16.f32 h, a;"
                " cvt.u32.u16 $0, h; }",
                "=r,f,f,f,f,f")
            at = row.cache_at(h, num_pages, block_size, len(segs), seg if other is not None else 0)
            ptr = _global_ptr(ks_ref, at, i16)
            llvm.store(arith.trunci(i16, norm16), ptr)


def _residual_length(n2f, dim: int):
    """:func:`tqjax.quantizers.residual_length` of ``n2f`` (``f32(||n||**2)``): f32."""
    _, arith, *_ = _ir()
    length = _bits_i32(_asm(_types()[2], [n2f, arith.constant(_types()[2], float(dim))],
                            "{ .reg .f32 t; mul.rn.f32 t, $1, $2; sqrt.rn.f32 $0, t; }", "=f,f,f"))
    odd = arith.andi(arith.shrui(length, _ci(11)), _ci(1))
    return _bits_f32(arith.andi(arith.addi(length, arith.addi(odd, _ci(0x3FF))), _ci(~0x7FF)))


def _prod_residual(rows: list, z: mgpu.FragmentedArray, n2s: list, cent_ref, kc_ref, h, cfg: TurboQuantConfig,
                   num_pages: int, block_size: int):
    """QJL keys, the MSE stage and the residual on its grid (:meth:`tqjax.quantizers.TurboQuantProd.quantize`): codes
    of the rotated keys ``z`` (as :func:`_keys_out`, one segment of ``b - 1`` bits) packed and stored, ``w = z - c L``
    (``c L`` exact, ``L`` :func:`_residual_length`), its grid integers as the sketch product's float16 left operand
    (WGMMA layout, the channels as in ``z``), and for each row (``||w_int||**2`` i32, grid field i32)."""
    ir, arith, llvm, _, vector = _ir()
    i32, _, f32 = _types()
    prod = key_codec(cfg).prod
    seg = cfg.key_segments[0]
    bits, d = seg.bits, cfg.head_dim
    positive = np.asarray(prod.mse.thresholds, np.float32)[1 << (bits - 1):]
    half = 1 << (bits - 1)
    top_step = 1 << ((len(positive) + 1).bit_length() - 2)
    regs = np.array(z.registers, dtype=object)
    out = np.empty(mgpu.WGMMA_LAYOUT.registers_shape((TOKENS, d)), dtype=object)
    stats = []
    for r, row in enumerate(rows):
        n2f = arith.sitofp(f32, n2s[r])
        limits = [_bits_i32(arith.mulf(n2f, arith.constant(f32, float(t)))) for t in positive]
        length = _residual_length(n2f, d)
        cent_ptr = mgpu.utils.getelementptr(mgpu.utils.memref_ptr(cent_ref), [_ci(-half)], i32)
        codes, ws, top = [], [], arith.constant(f32, 0.0)  # top: the running largest |w|
        for j in range(regs.shape[1]):
            pair = regs[(0, j, 0, 0, r) + (0,) * (regs.ndim - 5)]
            for e in range(2):
                zz = vector.extract(pair, [], [e])
                if j and j % _CHAIN == 0:  # after the previous elements (as in _keys_out): fewer live registers
                    zz = _after(zz, _bits_i32(top))
                up, at, code = _signed_code(zz, limits, [_ci(half + top_step), _ci(half)], _ci(2 * half - 1))
                codes.append(code)
                mag = llvm.load(i32, mgpu.utils.getelementptr(cent_ptr, [at], i32))
                # c L with c's sign (+ where z > 0), then w = z - c L: an exact product, one rounded difference
                cl = arith.xori(_bits_i32(_asm(f32, [_bits_f32(mag), length], "mul.rn.f32 $0, $1, $2;", "=f,f,f")),
                                arith.andi(arith.xori(up, _ci(-1)), _ci(-0x80000000)))
                ws.append(_asm(f32, [zz, _bits_f32(cl)], "sub.rn.f32 $0, $1, $2;", "=f,f,f"))
                top = _asm(f32, [top, ws[-1]], "{ .reg .f32 t; abs.f32 t, $2; max.f32 $0, $1, t; }", "=f,f,f")
        _store_codes(kc_ref, codes, bits, row.lane4, d, 0, cfg.key_words, row, h, num_pages, block_size, row.valid)
        field = _grid_field(arith.shrui(_quad(_bits_i32(top), "max.u32"), _ci(23)), prod.sketch_grid_bits)
        scale = _bits_f32(arith.shli(field, _ci(23)))
        ints = [_snap(w, scale) for w in ws]
        w2 = _ci(0)
        for j in range(len(ints) // 2):
            out[(0, j, 0, 0, r) + (0,) * (out.ndim - 5)] = _f16_pair(ints[2 * j], ints[2 * j + 1])
        for k in range(0, len(ints), 4):  # |w_int| <= 2**11
            w2 = arith.addi(w2, _four_squares(ints[k:k + 4]))
        stats.append((_quad(w2, "add.u32"), field))
    w_f16 = mgpu.FragmentedArray(_registers=out, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)
    return w_f16, stats


def _prod_signs(rows: list, sketch: mgpu.FragmentedArray, n2s: list, fields: list, w2s: list, w_fields: list,
                kc_ref, ks_ref, h, cfg: TurboQuantConfig, num_pages: int, block_size: int) -> None:
    """QJL keys, the rest: the signs ``sketch >= 0`` (float32 [64, D], WGMMA layout, exact integers) packed and
    stored, and the row's fp16 (norm, gamma): ``sqrt(n2) step`` and ``sqrt(||w_int||**2) step_w / max(L, 1)``."""
    _, arith, llvm, _, vector = _ir()
    i32, _, f32 = _types()
    seg = cfg.key_segments[-1]
    d = cfg.head_dim
    regs = np.array(sketch.registers, dtype=object)
    for r, row in enumerate(rows):
        signs = []
        for j in range(regs.shape[1]):
            pair = regs[(0, j, 0, 0, r) + (0,) * (regs.ndim - 5)]
            for e in range(2):
                signs.append(_asm(i32, [vector.extract(pair, [], [e])], "set.ge.u32.f32 $0, $1, 0f00000000;", "=r,f"))
        _store_codes(kc_ref, signs, 1, row.lane4, d, seg.word_start, cfg.key_words, row, h, num_pages, block_size,
                     row.valid, masks=True)
        with mgpu.utils.when(row.valid), mgpu.utils.when(row.first):
            n2f, w2f = arith.sitofp(f32, n2s[r]), arith.sitofp(f32, w2s[r])
            step = _bits_f32(arith.shli(arith.subi(_ci(254), fields[r]), _ci(23)))
            w_step = _bits_f32(arith.shli(arith.subi(_ci(254), w_fields[r]), _ci(23)))
            pair = _asm(i32, [n2f, step, w2f, w_step, _residual_length(n2f, d), arith.constant(f32, float(FP16_MAX))],
                        "{ .reg .f32 a, g; .reg .b16 x, y; sqrt.rn.f32 a, $1; mul.rn.f32 a, a, $2;"
                        " min.NaN.f32 a, a, $6; cvt.rn.f16.f32 x, a; sqrt.rn.f32 g, $3; mul.rn.f32 g, g, $4;"
                        " max.f32 a, $5, 0f3F800000; div.rn.f32 g, g, a; min.NaN.f32 g, g, $6; cvt.rn.f16.f32 y, g;"
                        " mov.b32 $0, {x, y}; }", "=r,f,f,f,f,f,f")
            llvm.store(pair, _global_ptr(ks_ref, row.cache_at(h, num_pages, block_size, 1, 0), i32))


def _values(rows: list, value_smem, vc_ref, vs_ref, h, cfg: TurboQuantConfig, num_pages: int,
            block_size: int) -> None:
    """Quantize, pack and store this thread's value elements and its rows' (scale, zero)."""
    _, arith, llvm, _, _ = _ir()
    i32, _, f32 = _types()
    d = cfg.head_dim
    levels = (1 << cfg.value_bits) - 1
    value_words = cfg.value_words
    for row in rows:
        words = row.input_words(value_smem, d)
        lo = hi = None
        for w in words:
            lo = w if lo is None else _op2("min.bf16x2", lo, w)
            hi = w if hi is None else _op2("max.bf16x2", hi, w)
        lo = _op2("min.bf16x2", lo, arith.shrui(lo, _ci(16)))  # the low half holds the minimum
        hi = _op2("max.bf16x2", hi, arith.shrui(hi, _ci(16)))
        lo = _quad(arith.shli(lo, _ci(16)), "min.f32")  # float32 bits of the bf16 minimum
        hi = _quad(arith.shli(hi, _ci(16)), "max.f32")
        lo = arith.maximumf(_bits_f32(lo), arith.constant(f32, -FP16_MAX))
        hi = arith.minimumf(_bits_f32(hi), arith.constant(f32, FP16_MAX))
        # scale = f16((hi - lo) * f32(1 / levels)), zero = f16(lo): their fp16 bits, and zero as float32
        scale16, zero16, zero = _value_scalars(hi, lo, levels)
        # 1 / scale correctly rounded (fp16_reciprocals' entry), 1 for a zero scale
        inv = _asm(f32, [scale16], "{ .reg .pred z; .reg .b16 h; .reg .f32 x; cvt.u16.u32 h, $1; cvt.f32.f16 x, h;"
                   " setp.eq.f32 z, x, 0f00000000; rcp.rn.f32 $0, x; @z mov.f32 $0, 0f3F800000; }", "=f,r")
        codes = []
        for w in words:
            for x in (arith.shli(w, _ci(16)), arith.andi(w, _ci(0xFFFF0000))):
                t = arith.mulf(arith.subf(_bits_f32(x), zero), inv)
                # cvt to u32 clamps below at 0 (PTX float-to-integer conversions saturate)
                codes.append(_asm(i32, [t], "{ .reg .f32 s; add.rm.f32 s, $1, 0f3F000000;"
                                            f" cvt.rmi.u32.f32 $0, s; min.u32 $0, $0, {levels}; }}", "=r,f"))
        _store_codes(vc_ref, codes, cfg.value_bits, row.lane4, d, 0, value_words, row, h, num_pages, block_size,
                     row.valid)
        with mgpu.utils.when(row.valid), mgpu.utils.when(row.first):
            pair = arith.ori(scale16, arith.shli(zero16, _ci(16)))
            llvm.store(pair, _global_ptr(vs_ref, row.cache_at(h, num_pages, block_size, 1, 0), i32))


def _value_scalars(hi, lo, levels: int):
    """(scale's fp16 bits, zero's fp16 bits, zero as float32), i32/i32/f32."""
    i32, _, f32 = _types()
    _, arith, llvm, _, _ = _ir()
    out = llvm.inline_asm(
        _ir()[0].Type.parse("!llvm.struct<(i32, i32, f32)>"),
        [hi, lo, arith.constant(f32, float(np.float32(1.0 / levels)))],
        "{ .reg .f32 d; .reg .b16 s, z; sub.rn.f32 d, $3, $4; mul.rn.f32 d, d, $5; cvt.rn.f16.f32 s, d;"
        " cvt.rn.f16.f32 z, $4; cvt.u32.u16 $0, s; cvt.u32.u16 $1, z; cvt.f32.f16 $2, z; }",
        "=r,=r,=f,f,f,f")
    return tuple(llvm.extractvalue(ty, out, [k]) for k, ty in enumerate((i32, i32, f32)))


# ---- the call ----------------------------------------------------------------------------------------


def _build_call(cfg: TurboQuantConfig, n: int, hk: int, num_pages: int, block_size: int):
    """``call(slots, matrix, squares, key, value, *cache_refs)``: arrays, then the cache arrays as GMEM refs (slots padded to whole tiles, key and
    value of at least 64 tokens: :func:`_store_impl` pads them). Persistent programs, up to
    :data:`PROGRAMS_PER_CORE` a multiprocessor, of :data:`WARPGROUPS` warpgroups (by head_dim); each warpgroup
    stores every ``workers``-th (tile, head) with its own buffers and barriers, the program's first copies the
    matrix and the squares that all of them read; an item's key and value are read from shared memory first, then
    the next item's copies are issued into the same buffers while this item's keys are rotated and stored."""
    d = cfg.head_dim
    prod = cfg.key_format == "prod"
    if prod:
        grid_bits = key_codec(cfg).prod.grid_bits
    else:
        grid = {key_codec(cfg).quantizers[i].grid_bits for i in range(len(cfg.key_segments))}
        assert len(grid) == 1, grid  # one grid for every segment (grid_bits(64) == grid_bits(128) == 11)
        grid_bits = grid.pop()
    num_slots = num_pages * block_size
    rows_len = max(n, TOKENS)  # the inputs' tokens (padded)
    splat = plgpu.Layout.WG_SPLAT(())
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    rows_ty = plgpu.ShapeDtypeStruct((TOKENS,), jnp.int32, layout=row_layout)

    def rows_of(tile, start, slots_smem):
        tile, start = tile.registers.item(), start.registers.item()
        return [_Row(r, tile, start, slots_smem, n, num_slots, block_size) for r in range(2)]

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), splat, splat),
                       return_type=(plgpu.ShapeDtypeStruct((TOKENS, d), jnp.float16, layout=plgpu.Layout.WGMMA),
                                    rows_ty, rows_ty))
    def keys_in(ctx, key_smem, slots_smem, tile, start):
        del ctx
        n_f16, stats = _keys_in(rows_of(tile, start, slots_smem), key_smem, cfg, grid_bits)
        return n_f16, _rows_array([s[0] for s in stats]), _rows_array([s[1] for s in stats])

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * 4 + (splat,) * 3)
    def values(ctx, value_smem, slots_smem, vc_ref, vs_ref, tile, start, h):
        del ctx
        _values(rows_of(tile, start, slots_smem), value_smem, vc_ref, vs_ref, h.registers.item(), cfg, num_pages,
                block_size)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, row_layout, row_layout) + (plgpu.RefType(),) * 4
                       + (splat,) * 3)
    def keys_out(ctx, z, n2, field, slots_smem, squares_smem, kc_ref, ks_ref, tile, start, h):
        del ctx
        _keys_out(rows_of(tile, start, slots_smem), z, _row_values(n2), _row_values(field), squares_smem, kc_ref,
                  ks_ref, h.registers.item(), cfg, num_pages, block_size)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, row_layout) + (plgpu.RefType(),) * 3 + (splat,) * 3,
                       return_type=(plgpu.ShapeDtypeStruct((TOKENS, d), jnp.float16, layout=plgpu.Layout.WGMMA),
                                    rows_ty, rows_ty))
    def prod_residual(ctx, z, n2, slots_smem, cent_smem, kc_ref, tile, start, h):
        del ctx
        w_f16, stats = _prod_residual(rows_of(tile, start, slots_smem), z, _row_values(n2), cent_smem, kc_ref,
                                      h.registers.item(), cfg, num_pages, block_size)
        return w_f16, _rows_array([s[0] for s in stats]), _rows_array([s[1] for s in stats])

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,) + (row_layout,) * 4 + (plgpu.RefType(),) * 3 + (splat,) * 3)
    def prod_signs(ctx, sketch, n2, field, w2, w_field, slots_smem, kc_ref, ks_ref, tile, start, h):
        del ctx
        _prod_signs(rows_of(tile, start, slots_smem), sketch, _row_values(n2), _row_values(field), _row_values(w2),
                    _row_values(w_field), kc_ref, ks_ref, h.registers.item(), cfg, num_pages, block_size)

    @plgpu.inline_mgpu()
    def sync(ctx):  # every thread's shared-memory reads done (and fenced) before a copy overwrites them
        del ctx
        _asm(_ir()[0].Type.parse("!llvm.void"), [], "fence.proxy.async.shared::cta;", "")
        mgpu.utils.warpgroup_barrier()

    total = pl.cdiv(n, TOKENS) * hk  # work items: (tile, head), heads fastest
    wgs = WARPGROUPS[d]
    programs = min(pl.cdiv(total, wgs), programs_per_core(cfg) * _num_cores())
    workers = programs * wgs  # warpgroups, each its own items

    def kernel(slot_ref, mat_ref, sq_ref, key_ref, value_ref, *refs):
        if prod:  # the sketch's matrix after the inputs, in shared memory after the squares' (here centroids') table
            sk_ref, kc_ref, ks_ref, vc_ref, vs_ref, key_smem, value_smem, slots_smem, mat_smem, sq_smem, sk_smem, \
                key_bar, value_bar, mat_bar = refs
        else:
            kc_ref, ks_ref, vc_ref, vs_ref, key_smem, value_smem, slots_smem, mat_smem, sq_smem, \
                key_bar, value_bar, mat_bar = refs
        mat_bar = mat_bar if mat_bar.shape == () else mat_bar.at[0]  # jax 0.10: shape (1,); 0.11: a scalar's
        wg = lax.axis_index("wg")
        worker = lax.axis_index("p") * wgs + wg
        count = (total - worker + workers - 1) // workers  # this warpgroup's work items worker, + workers, ...
        key_smem, value_smem, slots_smem = key_smem.at[wg], value_smem.at[wg], slots_smem.at[wg]

        def item(i):  # (tile, head, first token of the tiles): the last tile ends at the last token (it overlaps
            # the previous one when N % 64 != 0: _Row skips those rows)
            w = worker + i * workers
            tile = w // hk
            return tile, w % hk, jnp.minimum(tile * TOKENS, rows_len - TOKENS)

        def issue(i, buf):  # only copies read the inputs (so XLA need not copy them: the cache refs alone are written)
            tile, h, start = item(i)
            bar = 2 * wg + buf
            # the slots from tile * 64 (a copy's source is 16-byte aligned; the slots are padded to whole tiles)
            plgpu.copy_gmem_to_smem(slot_ref.at[pl.ds(tile * TOKENS, TOKENS)], slots_smem.at[buf], key_bar.at[bar])
            plgpu.copy_gmem_to_smem(key_ref.at[pl.ds(start, TOKENS), h], key_smem, key_bar.at[bar])
            plgpu.copy_gmem_to_smem(value_ref.at[pl.ds(start, TOKENS), h], value_smem, value_bar.at[bar])

        @pl.when(wg == 0)
        def _():  # once per program: its warpgroups share the matrix and the squares
            plgpu.copy_gmem_to_smem(mat_ref, mat_smem, mat_bar)
            plgpu.copy_gmem_to_smem(sq_ref, sq_smem, mat_bar)
            if prod:
                plgpu.copy_gmem_to_smem(sk_ref, sk_smem, mat_bar)

        @pl.when(count > 0)
        def _():
            issue(0, 0)

        plgpu.barrier_wait(mat_bar)

        def step(i, carry):
            buf = lax.rem(i, 2)
            tile, h, start = item(i)
            slots = slots_smem.at[buf]
            plgpu.barrier_wait(key_bar.at[2 * wg + buf])
            n_f16, n2, field = keys_in(key_smem, slots, tile, start)
            plgpu.barrier_wait(value_bar.at[2 * wg + buf])
            values(value_smem, slots, vc_ref, vs_ref, tile, start, h)
            sync()  # key and value read: the next item's copies overwrite them while this item's keys finish

            @pl.when(i + 1 < count)
            def _():
                issue(i + 1, 1 - buf)  # its slots into the other buffer (this item's keys_out reads these)

            def rotate(acc_ref):
                plgpu.wgmma(acc_ref, n_f16, mat_smem.T)
                return acc_ref[...]

            z = pl.run_scoped(rotate, plgpu.ACC((TOKENS, d), jnp.float32))
            if prod:
                w_f16, w2, w_field = prod_residual(z, n2, slots, sq_smem, kc_ref, tile, start, h)

                def sketch(acc_ref):
                    plgpu.wgmma(acc_ref, w_f16, sk_smem.T)
                    return acc_ref[...]

                signs = pl.run_scoped(sketch, plgpu.ACC((TOKENS, d), jnp.float32))
                prod_signs(signs, n2, field, w2, w_field, slots, kc_ref, ks_ref, tile, start, h)
            else:
                keys_out(z, n2, field, slots, sq_smem, kc_ref, ks_ref, tile, start, h)

            return carry

        lax.fori_loop(0, count, step, 0)

    scratch = (plgpu.SMEM((wgs, TOKENS, d), jnp.bfloat16), plgpu.SMEM((wgs, TOKENS, d), jnp.bfloat16),
               plgpu.SMEM((wgs, 2, TOKENS), jnp.int32), plgpu.SMEM((d, d), jnp.float16, transforms=_F16_TILE),
               plgpu.SMEM((32,), jnp.int32),
               *([plgpu.SMEM((d, d), jnp.float16, transforms=_F16_TILE)] if prod else []),
               plgpu.Barrier(num_arrivals=2, num_barriers=2 * wgs), plgpu.Barrier(num_arrivals=1, num_barriers=2 * wgs),
               plgpu.Barrier(num_arrivals=3 if prod else 2))  # arrivals: the copies on each
    mesh = plgpu.Mesh(grid=(programs,), grid_names=("p",), num_threads=wgs, thread_name="wg")

    def tq_store_mgpu(*refs) -> None:  # GMEM refs: the inputs, then the cache arrays (written in place)
        pl.run_scoped(functools.partial(kernel, *refs), *scratch, collective_axes="wg")

    # pl.kernel, not plgpu.kernel: the latter's batching wrapper (custom_vmap) does not take refs as operands
    return pl.kernel(tq_store_mgpu, out_type=(), mesh=mesh,  # the function's name is the kernel's (in a profiler)
                     compiler_params=plgpu.CompilerParams(unsafe_no_auto_barriers=True))


def _num_cores() -> int:
    """The default GPU's multiprocessors (132 where there is none: an H100/H200, for lowering on a CPU)."""
    if jax.default_backend() != "gpu":
        return 132
    return getattr(jax.devices()[0], "core_count", 0) or 132


def _store_impl(cache: PagedKVCache, key: jax.Array, value: jax.Array, slot_mapping: jax.Array) -> PagedKVCache:
    cfg = cache.config
    n, hk = key.shape[0], cache.num_kv_heads
    if n == 0:
        return cache
    slots = slot_mapping.astype(jnp.int32)
    if n % TOKENS:  # whole tiles of slots (padding: -1)
        slots = jnp.pad(slots, (0, -n % TOKENS), constant_values=-1)
    if n < TOKENS:  # one whole tile of keys and values to copy
        key, value = (jnp.pad(x, ((0, TOKENS - n), (0, 0), (0, 0))) for x in (key, value))
    if cfg.key_format == "prod":
        inputs = (slots, jnp.asarray(rotation_operand(cfg)), jnp.asarray(centroid_table(cfg)), key, value,
                  jnp.asarray(sketch_operand(cfg)))
    else:
        inputs = (slots, jnp.asarray(rotation_operand(cfg)), jnp.asarray(square_table(cfg)), key, value)
    # the cache arrays as GMEM refs, which only the kernel writes and XLA aliases to its outputs (in place: the jit
    # donates the cache); the inputs as arrays, which are neither aliased nor copied
    cache_refs = [jax.new_ref(a, memory_space=plgpu.GMEM)
                  for a in (cache.key_codes, cache.key_scales, cache.value_codes, cache.value_scales)]
    _build_call(cfg, n, hk, cache.num_blocks, cache.block_size)(*inputs, *cache_refs)
    kc, ks, vc, vs = (jax.freeze(r) for r in cache_refs)
    return PagedKVCache(key_codes=kc, key_scales=ks, value_codes=vc, value_scales=vs, config=cfg)


#: Jitted entry point; donates (and updates in place) the cache. Prefer :func:`store_mgpu`, which checks inputs.
store_mgpu_jit = jax.jit(_store_impl, donate_argnums=0)


def refusal(cache: PagedKVCache, key: jax.Array, value: jax.Array) -> str | None:
    """Why this kernel cannot run this store here (None if it can): the device, the inputs' dtypes, the cache."""
    if not on_hopper():
        return "this device (the Mosaic GPU store needs a Hopper GPU, sm_90a)"
    if key.dtype != jnp.bfloat16 or value.dtype != jnp.bfloat16:
        return f"{key.dtype} keys / {value.dtype} values (the Mosaic GPU store reads bf16)"
    return unsupported(cache.config)


def store_mgpu(cache: PagedKVCache, key: jax.Array, value: jax.Array, slot_mapping: jax.Array) -> PagedKVCache:
    """Quantize bf16 key/value ``[N, Hk, D]`` into ``cache`` at ``slot_mapping`` ``[N]`` int32, in place, on a
    Hopper GPU; bit for bit :func:`tqjax.reference.store_reference` (module docstring). Raises ``RuntimeError``
    off Hopper and ``NotImplementedError`` for inputs or caches this kernel does not take (:func:`refusal`)."""
    check_store_inputs(cache, key, value, slot_mapping, kind="turboquant")
    why = refusal(cache, key, value)
    if why is not None:
        raise (NotImplementedError if on_hopper() else RuntimeError)(
            f"the Mosaic GPU store does not take {why}; tqjax.pallas.store.store runs the Triton kernel")
    return store_mgpu_jit(cache, key, value, slot_mapping)
