"""Probe: the decode's inner loop as a Mosaic GPU kernel (Pallas ``plgpu``, Hopper), 4-bit keys and values.

The Triton-lowered decode (``tqjax.pallas.decode``) is instruction-bound: Pallas cannot ask Triton for a
register layout in which a thread holds whole packed words, so every code is unpacked, looked up and
staged for the tensor cores one element at a time (about 13 instructions per cache element; see
``docs/PERFORMANCE.md``, "What would fix it", item 1). Mosaic GPU exposes the layouts: here each thread
loads whole 32-bit words (8 codes) in the layout that puts the 8 channels of a word in one register
vector (``WGMMA_LAYOUT_UPCAST_4X``), turns a word into 8 float16 values with one PTX block (keys: a
byte-permute table of 16 float16 centroids, about 2.6 instructions per code; values: the code itself,
1.5 instructions per code), and stores them to shared memory with 16-byte stores for the tensor cores.

The probes are speed experiments, not the product (which is ``tqjax.pallas.decode_mgpu``, grown from the
"tokens as M" probe): contiguous per-(batch, head) token arrays instead of pages, one preset shape (4-bit
keys and values, D=128), every sequence the same length (a multiple of 64), the query in float16 (one
rounding; the product splits it). They check their output against a float32 jnp computation of the same
attention; ``--compare`` also times ``tqjax.pallas.decode.paged_decode`` on a paged cache of the same
shape. ``--paged B/ctx,...`` times the product kernel against the Triton decode on one paged cache and
compares both, and the float32 reference, with float64 attention on the host.

    python -m experiments.mgpu_decode_probe --batch 32 --context 16384 --compare
    python -m experiments.mgpu_decode_probe --paged 32/16384,128/4096,8/32768

CUDA Hopper GPUs only (sm_90); the lowering (not the compile) also runs on a CPU with
``--lower-only`` (``jax.export`` for the "cuda" platform), which checks the kernel traces.
"""

from __future__ import annotations

import argparse
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu

from tqjax.pallas.decode_mgpu import (
    key_word_asm,  # the product's key block (the probe's was the same text)
    smem_load,
)

TOKENS = 64  # tokens per step: the N of the score product and the K of the value product
ROWS = 64  # query rows per program: the M of a wgmma (the GQA group, zero-padded)
DIM = 128
WORDS = DIM // 8  # 4-bit codes, 8 per uint32 word

_F16_TILING = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _u32(x: int) -> str:
    return f"0x{x & 0xFFFFFFFF:08X}"


def value_word_asm() -> str:
    """PTX: one uint32 word of 8 value codes ($4) -> the codes as float16, 4 pairs ($0..$3, first low).

    Byte j goes to both halves (``prmt``), ``lop3`` keeps the low nibble in the low half and the high
    nibble (times 16) in the high half under float16 1024.0's exponent, one ``fma.rn.f16x2`` takes
    1024 (and 64) away: exact.
    """
    lines = ["{", ".reg .b32 z, p, q, mul, add;", "mov.b32 z, 0;", "mov.b32 mul, 0x2C003C00;", "mov.b32 add, 0xD400E400;"]
    for j in range(4):
        lines += [
            f"prmt.b32 p, $4, z, {_u32(0x4040 | (j << 8) | j)};",  # byte j to bytes 0 and 2
            "lop3.b32 q, p, 0x00F0000F, 0x64006400, 0xEA;",
            f"fma.rn.f16x2 ${j}, q, mul, add;",
        ]
    return "\n".join(lines + ["}"])


def _words_to_f16(ctx, words_ref, asm: str):
    """Inside ``inline_mgpu``: SMEM words uint32 [64, 16] -> float16 [64, 128] in WGMMA_UPCAST_4X layout."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, memref, vector

    del ctx
    i32 = ir.IntegerType.get_signless(32)
    index = ir.IndexType.get()
    f16 = ir.F16Type.get()
    layout = mgpu.WGMMA_LAYOUT_UPCAST_4X
    shape = (TOKENS, DIM)
    reg_shape = layout.registers_shape(shape)
    lane_tid = arith.remui(mgpu.utils.thread_idx(), mgpu.utils.c(128, i32))
    warp = arith.divui(lane_tid, mgpu.utils.c(32, i32))
    lane = arith.remui(lane_tid, mgpu.utils.c(32, i32))
    lrow = arith.divui(lane, mgpu.utils.c(4, i32))
    lcol = arith.remui(lane, mgpu.utils.c(4, i32))
    base_row = arith.addi(arith.muli(warp, mgpu.utils.c(16, i32)), lrow)
    struct = ir.Type.parse("!llvm.struct<(i32, i32, i32, i32)>")
    regs = np.empty(reg_shape, dtype=object)
    # registers: dim 1 = column tile of 32 channels (4 words), dim 4 = row half (rows +8)
    for idx in np.ndindex(*reg_shape):
        ctile, half = idx[1], idx[4]
        row = arith.addi(base_row, mgpu.utils.c(8 * half, i32))
        col = arith.addi(lcol, mgpu.utils.c(4 * ctile, i32))
        w = memref.load(words_ref, [arith.index_cast(index, row), arith.index_cast(index, col)])
        out = llvm.inline_asm(struct, [w], asm, "=r,=r,=r,=r,r")
        parts = [llvm.extractvalue(i32, out, [k]) for k in range(4)]
        v = vector.from_elements(ir.VectorType.get((4,), i32), parts)
        regs[idx] = vector.bitcast(ir.VectorType.get((8,), f16), v)
    return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=None)


def _tile_fns(table: np.ndarray):
    """(keys_f16, values_f16): SMEM words [64, 16] -> float16 [64, 128] tiles (WGMMA_UPCAST_4X), in-kernel."""
    kasm, vasm = key_word_asm(table), value_word_asm()
    f16_out = plgpu.ShapeDtypeStruct((TOKENS, DIM), jnp.float16, layout=plgpu.Layout.WGMMA_UPCAST_4X)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=f16_out)
    def keys_f16(ctx, words_ref):
        return _words_to_f16(ctx, words_ref, kasm)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=f16_out)
    def values_f16(ctx, words_ref):
        return _words_to_f16(ctx, words_ref, vasm)

    return keys_f16, values_f16


def make_probe(batch: int, heads: int, context: int, table: np.ndarray, scale: float, stages: int = 3):
    """The probe kernel: (q [B, H, 64, 128] f16, key words [B, H, N, 16] u32, value words, key norms
    [B, H, N] f32, value scales, value zeros) -> out [B, H, 64, 128] f32 (normalised attention)."""
    assert context % TOKENS == 0
    steps = context // TOKENS
    stages = min(stages, steps)
    keys_f16, values_f16 = _tile_fns(table)

    col = plgpu.Layout.WGMMA.reduce(0)
    row = plgpu.Layout.WGMMA.reduce(1)

    def body(q_ref, kw_ref, vw_ref, kn_ref, vs_ref, vz_ref, o_ref,
             q_smem, kw_smem, vw_smem, kn_smem, vs_smem, vz_smem, k16_smem, v16_smem, o_smem,
             q_bar, kw_bar, vw_bar, kn_bar, vs_bar, vz_bar):
        b = lax.axis_index("b")
        h = lax.axis_index("h")
        plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, q_bar.at[0])

        def issue(step, slot):
            toks = pl.ds(step * TOKENS, TOKENS)
            plgpu.copy_gmem_to_smem(kw_ref.at[b, h, toks], kw_smem.at[slot], kw_bar.at[slot])
            plgpu.copy_gmem_to_smem(vw_ref.at[b, h, toks], vw_smem.at[slot], vw_bar.at[slot])
            plgpu.copy_gmem_to_smem(kn_ref.at[b, h, toks], kn_smem.at[slot], kn_bar.at[slot])
            plgpu.copy_gmem_to_smem(vs_ref.at[b, h, toks], vs_smem.at[slot], vs_bar.at[slot])
            plgpu.copy_gmem_to_smem(vz_ref.at[b, h, toks], vz_smem.at[slot], vz_bar.at[slot])

        for s in range(stages):
            issue(s, s)
        plgpu.barrier_wait(q_bar.at[0])

        def step_fn(i, carry):
            acc, m_i, l_i = carry
            slot = lax.rem(i, stages)
            par = lax.rem(i, 2)
            for bar in (kw_bar, vw_bar, kn_bar, vs_bar, vz_bar):
                plgpu.barrier_wait(bar.at[slot])
            k16_smem[par] = keys_f16(kw_smem.at[slot])
            v16_smem[par] = values_f16(vw_smem.at[slot])
            kn = smem_load(kn_smem.at[slot], col)
            vs = smem_load(vs_smem.at[slot], col)
            vz = smem_load(vz_smem.at[slot], col)
            plgpu.commit_smem()  # our stores visible to the tensor cores; every thread done with this slot

            @pl.when(i + stages < steps)
            def _():
                issue(i + stages, slot)

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k16_smem.at[par].T)
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((ROWS, TOKENS), jnp.float32))
            s = s * lax.broadcast_in_dim(kn * (scale * math.log2(math.e)), s.shape, [1])
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            zterm = (p * lax.broadcast_in_dim(vz, s.shape, [1])).sum(axis=1)
            pw = (p * lax.broadcast_in_dim(vs, s.shape, [1])).astype(jnp.float16)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + lax.broadcast_in_dim(zterm, acc.shape, [0])

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, pw, v16_smem.at[par])

            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            return acc, m_new, l_i

        acc0 = plgpu.layout_cast(jnp.zeros((ROWS, DIM), jnp.float32), plgpu.Layout.WGMMA)
        m0 = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), row)
        l0 = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row)
        acc, _, l_i = lax.fori_loop(0, steps, step_fn, (acc0, m0, l0))
        o_smem[...] = acc / lax.broadcast_in_dim(l_i, acc.shape, [0])
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h])
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        plgpu.SMEM((ROWS, DIM), jnp.float16, transforms=_F16_TILING),
        plgpu.SMEM((stages, TOKENS, WORDS), jnp.uint32),
        plgpu.SMEM((stages, TOKENS, WORDS), jnp.uint32),
        plgpu.SMEM((stages, TOKENS), jnp.float32),
        plgpu.SMEM((stages, TOKENS), jnp.float32),
        plgpu.SMEM((stages, TOKENS), jnp.float32),
        plgpu.SMEM((2, TOKENS, DIM), jnp.float16, transforms=_F16_TILING),
        plgpu.SMEM((2, TOKENS, DIM), jnp.float16, transforms=_F16_TILING),
        plgpu.SMEM((ROWS, DIM), jnp.float32),
        plgpu.Barrier(num_barriers=1),
        *(plgpu.Barrier(num_barriers=stages) for _ in range(5)),
    ]
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((batch, heads, ROWS, DIM), jnp.float32),
        grid=(batch, heads),
        grid_names=("b", "h"),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )


def make_probe_t(batch: int, heads: int, context: int, table: np.ndarray, scale: float, stages: int = 2,
                 splits: int = 1, buffers: int = 1, cols: int = 16, lazy_sums: bool = False,
                 overlap: bool = False):
    """Transposed products (tokens as the wgmma M): logits^T [64 tok, cols] = K [64, 128] @ q^T, the
    softmax over the token axis (across the warpgroup), out^T [128, cols] = V^T [128, 64] @ p^T.

    (q [B, H, cols, 128] f16, key words [B, H, N, 16] u32, value words, scalars [B, H, N/64, 4, 64] f32:
    key norm, value scale, value zero, unused) -> (out^T [B, H, splits, 128, cols] f32 normalised within
    the split, base-2 log-sum-exp [B, H, splits, cols] of the split's scaled logits). ``buffers``: 1 or 2
    copies of the float16 key/value tiles (one costs a warpgroup barrier per step, and half the shared
    memory: more programs per multiprocessor). ``lazy_sums``: the softmax denominators and the value
    zero-point terms accumulate per token row ([64, cols], rescaled like the output) and are summed over
    the tokens once at the end, so a step reduces across the warpgroup only for the maximum.
    ``overlap``: the value tile is unpacked while the score product runs."""
    assert context % (TOKENS * splits) == 0
    steps = context // (TOKENS * splits)
    stages = min(stages, steps)
    keys_f16, values_f16 = _tile_fns(table)

    col = plgpu.Layout.WGMMA.reduce(0)  # [cols]: one value per query column
    row = plgpu.Layout.WGMMA.reduce(1)  # [64]: one value per token row

    def tq_mgpu_probe(q_ref, kw_ref, vw_ref, sc_ref, o_ref, lse_ref,
             q_smem, kw_smem, vw_smem, sc_smem, k16_smem, v16_smem, p_smem, o_smem, lse_smem,
             q_bar, kw_bar, vw_bar, sc_bar):
        b = lax.axis_index("b")
        h = lax.axis_index("h")
        sp = lax.axis_index("s")
        first = sp * steps
        plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, q_bar.at[0])

        def issue(step, slot):
            toks = pl.ds((first + step) * TOKENS, TOKENS)
            plgpu.copy_gmem_to_smem(kw_ref.at[b, h, toks], kw_smem.at[slot], kw_bar.at[slot])
            plgpu.copy_gmem_to_smem(vw_ref.at[b, h, toks], vw_smem.at[slot], vw_bar.at[slot])
            plgpu.copy_gmem_to_smem(sc_ref.at[b, h, first + step], sc_smem.at[slot], sc_bar.at[slot])

        for s in range(stages):
            issue(s, s)
        plgpu.barrier_wait(q_bar.at[0])

        def step_fn(i, carry):
            acc, m_i, l_i, z_i = carry
            slot = lax.rem(i, stages)
            buf = lax.rem(i, buffers)
            for bar in (kw_bar, vw_bar, sc_bar):
                plgpu.barrier_wait(bar.at[slot])
            if buffers == 1:
                plgpu.commit_smem()  # every warp is done with the last step's products before we overwrite
            k16_smem[buf] = keys_f16(kw_smem.at[slot])

            def values_and_scalars():
                v16_smem[buf] = values_f16(vw_smem.at[slot])
                return tuple(smem_load(sc_smem.at[slot, j], row) for j in range(3))

            if not overlap:
                kn, vs, vz = values_and_scalars()
            plgpu.commit_smem()

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, k16_smem.at[buf], q_smem.T)
                extra = values_and_scalars() if overlap else ()
                return acc_ref[...], extra

            s, extra = pl.run_scoped(qk, plgpu.ACC((TOKENS, cols), jnp.float32))
            if overlap:
                kn, vs, vz = extra

            @pl.when(i + stages < steps)
            def _():
                issue(i + stages, slot)

            s = s * lax.broadcast_in_dim(kn * (scale * math.log2(math.e)), s.shape, [0])
            m_new = jnp.maximum(m_i, s.max(axis=0))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [1]))
            pz = p * lax.broadcast_in_dim(vz, s.shape, [0])
            if lazy_sums:  # [64, cols] partial sums per token row
                a2 = lax.broadcast_in_dim(alpha, s.shape, [1])
                l_i = l_i * a2 + p
                z_i = z_i * a2 + pz
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1])
            else:
                l_i = l_i * alpha + p.sum(axis=0)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1]) + lax.broadcast_in_dim(
                    pz.sum(axis=0), acc.shape, [1])
            pw = (p * lax.broadcast_in_dim(vs, s.shape, [0])).astype(jnp.float16)
            p_smem.at[buf].T[...] = plgpu.layout_cast(pw, plgpu.Layout.WGMMA_TRANSPOSED)
            plgpu.commit_smem()

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, v16_smem.at[buf].T, p_smem.at[buf].T)

            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            return acc, m_new, l_i, z_i

        acc0 = plgpu.layout_cast(jnp.zeros((DIM, cols), jnp.float32), plgpu.Layout.WGMMA)
        m0 = plgpu.layout_cast(jnp.full((cols,), -jnp.inf, jnp.float32), col)
        if lazy_sums:
            l0 = plgpu.layout_cast(jnp.zeros((TOKENS, cols), jnp.float32), plgpu.Layout.WGMMA)
        else:
            l0 = plgpu.layout_cast(jnp.zeros((cols,), jnp.float32), col)
        acc, m_i, l_i, z_i = lax.fori_loop(0, steps, step_fn, (acc0, m0, l0, l0))
        if lazy_sums:
            l_i = l_i.sum(axis=0)
            acc = acc + lax.broadcast_in_dim(z_i.sum(axis=0), acc.shape, [1])
        o_smem[...] = acc / lax.broadcast_in_dim(l_i, acc.shape, [1])
        lse_smem[...] = m_i + jnp.log2(l_i)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, sp])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, sp])
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        plgpu.SMEM((cols, DIM), jnp.float16, transforms=_F16_TILING),
        plgpu.SMEM((stages, TOKENS, WORDS), jnp.uint32),
        plgpu.SMEM((stages, TOKENS, WORDS), jnp.uint32),
        plgpu.SMEM((stages, 4, TOKENS), jnp.float32),
        plgpu.SMEM((buffers, TOKENS, DIM), jnp.float16, transforms=_F16_TILING),
        plgpu.SMEM((buffers, TOKENS, DIM), jnp.float16, transforms=_F16_TILING),
        plgpu.SMEM((buffers, cols, TOKENS), jnp.float16, transforms=_F16_TILING),  # p^T, stored transposed
        plgpu.SMEM((DIM, cols), jnp.float32),
        plgpu.SMEM((cols,), jnp.float32),
        plgpu.Barrier(num_barriers=1),
        *(plgpu.Barrier(num_barriers=stages) for _ in range(3)),
    ]
    call = plgpu.kernel(
        tq_mgpu_probe,
        out_type=(jax.ShapeDtypeStruct((batch, heads, splits, DIM, cols), jnp.float32),
                  jax.ShapeDtypeStruct((batch, heads, splits, cols), jnp.float32)),
        grid=(batch, heads, splits),
        grid_names=("b", "h", "s"),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )

    def run(q, kw, vw, sc):
        """-> out [B, H, cols, 128] f32: the splits merged by their log-sum-exps."""
        o, lse = call(q, kw, vw, sc)
        w = jnp.exp2(lse - jnp.max(lse, axis=2, keepdims=True))  # [B, H, S, cols]
        out = jnp.sum(o * w[:, :, :, None, :], axis=2) / jnp.sum(w, axis=2)[:, :, None, :]
        return jnp.swapaxes(out, 2, 3)

    return run


def pack_scalars(kn, vs, vz):
    """[B, H, N] x 3 -> [B, H, N/64, 4, 64] f32 (make_probe_t's scalar input)."""
    b, h, n = kn.shape
    x = jnp.stack([kn, vs, vz, jnp.zeros_like(kn)], axis=2)  # [B, H, 4, N]
    return jnp.swapaxes(x.reshape(b, h, 4, n // TOKENS, TOKENS), 2, 3)


def reference(q, kw, vw, kn, vs, vz, table, scale):
    """float32 jnp: the same attention from unpacked codes (q's rows as given)."""
    shifts = jnp.arange(8, dtype=jnp.uint32) * 4

    def unpack(w):  # [..., 16] u32 -> [..., 128] int32
        return ((w[..., None] >> shifts) & 15).reshape(*w.shape[:-1], DIM).astype(jnp.int32)

    k = jnp.asarray(table, jnp.float32)[unpack(kw)] * kn[..., None]
    v = unpack(vw).astype(jnp.float32) * vs[..., None] + vz[..., None]
    s = jnp.einsum("bhrd,bhnd->bhrn", q.astype(jnp.float32), k, precision="highest") * scale
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhrn,bhnd->bhrd", p, v, precision="highest")


def make_inputs(key, batch, heads, context, group, rows=ROWS):
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (batch, heads, rows, DIM), jnp.float32)
    q = jnp.where(jnp.arange(rows)[:, None] < group, q, 0.0).astype(jnp.float16)
    kw = jax.random.bits(ks[1], (batch, heads, context, WORDS), jnp.uint32)
    vw = jax.random.bits(ks[2], (batch, heads, context, WORDS), jnp.uint32)
    kn = jax.random.uniform(ks[3], (batch, heads, context), jnp.float32, 4.0, 12.0)
    vs = jax.random.uniform(ks[4], (batch, heads, context), jnp.float32, 0.05, 0.2)
    vz = jax.random.uniform(ks[5], (batch, heads, context), jnp.float32, -1.5, -0.5)
    return q, kw, vw, kn, vs, vz


def default_table() -> np.ndarray:
    """The 4-bit key table of ``turboquant_4bit_nc`` at D=128 (16 float32 centroids, exact in float16)."""
    from tqjax.codec import key_codec
    from tqjax.config import TurboQuantConfig

    cfg = TurboQuantConfig.from_cache_dtype("turboquant_4bit_nc", DIM)
    return np.asarray(key_codec(cfg).quantizers[0].centroids, np.float32)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--lower-only", action="store_true")
    ap.add_argument("--compare", action="store_true", help="also time tqjax's Triton decode on the same shape")
    ap.add_argument("--only", default="", help="';'-separated variant names to run (default: all)")
    ap.add_argument("--once", action="store_true", help="run the first (selected) variant once and exit")
    ap.add_argument("--paged", default="",
                    help="B/ctx points (e.g. 32/16384,8/4096): time tqjax.pallas.decode_mgpu.paged_decode_mgpu "
                         "against the Triton paged_decode on the same paged cache instead of the probes")
    args = ap.parse_args(argv)
    if args.paged:
        return paged_comparison(args)
    table = default_table()
    scale = 1 / math.sqrt(DIM)
    if args.lower_only:
        fn = jax.jit(make_probe(args.batch, args.heads, args.context, table, scale, args.stages))
        avals = [jax.ShapeDtypeStruct((args.batch, args.heads, ROWS, DIM), jnp.float16)] + [
            jax.ShapeDtypeStruct((args.batch, args.heads, args.context, WORDS), jnp.uint32)] * 2 + [
            jax.ShapeDtypeStruct((args.batch, args.heads, args.context), jnp.float32)] * 3
        exp = jax.export.export(fn, platforms=["cuda"])(*avals)
        print("lowered:", len(exp.mlir_module()), "characters of StableHLO with the Mosaic GPU kernel")
        return
    from experiments.timing import copy_bandwidth, device_description, on_cache, time_fn

    print(device_description(), flush=True)
    def prep(inputs, rows_q):  # make_inputs' arrays -> the kernel's arguments (scalars packed, not timed)
        return inputs if rows_q == ROWS else (*inputs[:3], pack_scalars(*inputs[3:]))

    def rows_variant(b, h, n, stages):
        return jax.jit(make_probe(b, h, n, table, scale, stages))

    def tokens_variant(splits, buffers, **kw):
        def build_fn(b, h, n, stages):
            return jax.jit(make_probe_t(b, h, n, table, scale, stages, splits=splits, buffers=buffers, **kw))
        return build_fn

    variants = {  # name -> (builder, query rows, stages to time)
        "rows as M": (rows_variant, ROWS, (2,)),
        "tokens as M, 1 buffer, 4 splits": (tokens_variant(4, 1), 16, (2,)),
        "tokens as M, 2 buffers, 4 splits": (tokens_variant(4, 2), 16, (2,)),
        "tokens as M, 2 buffers, 4 splits, lazy sums": (tokens_variant(4, 2, lazy_sums=True), 16, (2,)),
        "tokens as M, 2 buffers, 4 splits, overlap": (tokens_variant(4, 2, overlap=True), 16, (2,)),
        "tokens as M, 2 buffers, 4 splits, lazy sums, overlap": (
            tokens_variant(4, 2, lazy_sums=True, overlap=True), 16, (2, 3)),
        "tokens as M, 1 buffer, 4 splits, lazy sums, overlap": (
            tokens_variant(4, 1, lazy_sums=True, overlap=True), 16, (2,)),
    }
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(";")}
    if args.once:  # one call of the first variant (for a profiler), then exit
        builder, rows_q, _ = next(iter(variants.values()))
        inputs = prep(make_inputs(jax.random.key(0), args.batch, args.heads, args.context, args.group, rows_q), rows_q)
        jax.block_until_ready(builder(args.batch, args.heads, args.context, 2)(*inputs))
        return
    g = args.group
    ref_fn = jax.jit(functools.partial(reference, table=table, scale=scale))
    bw = copy_bandwidth()
    rows = []
    nbytes = args.batch * args.heads * args.context * (2 * WORDS * 4 + 3 * 4)
    for vname, (builder, rows_q, stage_list) in variants.items():
        try:
            for b, h, n in ((2, 2, 512), (args.batch, args.heads, args.context)):
                inputs = make_inputs(jax.random.key(b * 7 + n), b, h, n, g, rows_q)
                out = builder(b, h, n, 2)(*prep(inputs, rows_q))
                ref = ref_fn(*inputs)
                err = float(jnp.max(jnp.abs(out[:, :, :g] - ref[:, :, :g])) / jnp.max(jnp.abs(ref[:, :, :g])))
                print(f"{vname}: B={b} H={h} N={n}: max |probe - f32 reference| / max |reference| = {err:.2e}",
                      flush=True)
            sets = [prep(make_inputs(jax.random.key(i), args.batch, args.heads, args.context, g, rows_q), rows_q)
                    for i in range(3)]
            for stages in stage_list:
                t = time_fn(builder(args.batch, args.heads, args.context, stages), sets)
                rows.append((f"mosaic probe ({vname}), {stages} stages", t, nbytes))
                print(rows[-1], flush=True)
        except Exception as e:  # noqa: BLE001 (a probe: report and go on)
            print(f"{vname}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    if args.compare:
        from experiments.device_check import build
        from tqjax.pallas.decode import paged_decode

        rng = np.random.default_rng(0)
        hq = args.heads * args.group
        _, cache, bt, lens = build("turboquant_4bit_nc", args.batch, args.context, hq, args.heads, DIM, 16, rng)
        qs = [jnp.asarray(rng.standard_normal((args.batch, hq, DIM)), jnp.float32) for _ in range(3)]
        f = on_cache(paged_decode, cache, bt, lens)
        t = time_fn(f, [(q,) for q in qs])
        rows.append(("tqjax paged_decode (Triton), turboquant_4bit_nc", t, cache.nbytes))
        print(rows[-1], flush=True)
    print(f"\n{device_description()}; copy bw {bw / 1e9:.0f} GB/s; B={args.batch} Hk={args.heads} "
          f"G={args.group} ctx={args.context} D={DIM}")
    print("kernel | us | bytes read | GB/s | of copy bw")
    for name, t, nb in rows:
        print(f"{name} | {t * 1e6:.1f} | {nb / 1e6:.0f} MB | {nb / t / 1e9:.0f} | {nb / t / bw:.2f}")


def float64_attention(q, cache, bt, lens, seq: int) -> np.ndarray:
    """Sequence ``seq``'s decode in float64 on the host, from the cache's float32 key vectors (score
    domain, norms applied), float32 values and the float32 rotated query: [Hq, D]."""
    from tqjax.codec import key_codec, value_codec

    cfg = cache.config
    hk, bs = cache.num_kv_heads, cache.block_size
    n = int(lens[seq])
    pages = np.asarray(bt[seq, : -(-n // bs)])
    kw, ks = cache.key_codes[:, pages], cache.key_scales[:, pages]
    vw, vs = cache.value_codes[:, pages], cache.value_scales[:, pages]
    (k,) = key_codec(cfg).score_vectors(kw, ks)  # [Hk, P, BS, D]
    v = value_codec(cfg).decode(vw, vs)
    k = np.asarray(k, np.float64).reshape(hk, -1, DIM)[:, :n]
    v = np.asarray(v, np.float64).reshape(hk, -1, DIM)[:, :n]
    hq = q.shape[1]
    (qr,) = key_codec(cfg).prepare_query(q[seq].astype(jnp.float32).reshape(hk, hq // hk, DIM))
    qr = np.asarray(qr, np.float64)
    s = np.einsum("hgd,hnd->hgn", qr, k) / math.sqrt(DIM)
    p = np.exp(s - s.max(-1, keepdims=True))
    out = np.einsum("hgn,hnd->hgd", p, v) / p.sum(-1)[..., None]
    return out.reshape(hq, DIM)


def paged_comparison(args) -> None:
    """The product kernel (tqjax.pallas.decode_mgpu) vs the Triton decode, same cache, same timing."""
    from experiments.device_check import build
    from experiments.timing import copy_bandwidth, device_description, on_cache, time_fn
    from tqjax.pallas.decode import _device_cores, choose_num_splits, paged_decode
    from tqjax.pallas.decode_mgpu import paged_decode_mgpu
    from tqjax.reference import paged_decode_reference

    print(device_description(), flush=True)
    bw = copy_bandwidth()
    rows = []
    hk, g = args.heads, args.group
    for point in args.paged.split(","):
        b, ctx = (int(x) for x in point.split("/"))
        rng = np.random.default_rng(0)
        _, cache, bt, lens = build("turboquant_4bit_nc", b, ctx, hk * g, hk, DIM, 16, rng)
        qs = [jnp.asarray(rng.standard_normal((b, hk * g, DIM)), jnp.float32) for _ in range(3)]
        ref = paged_decode_reference(qs[0], cache, bt, lens)
        ref64 = float64_attention(qs[0], cache, bt, lens, seq=0)
        scale = 1 / math.sqrt(DIM)
        auto = choose_num_splits(b, hk, bt.shape[1], 4, _device_cores())
        systems = {"triton (tuned)": on_cache(paged_decode, cache, bt, lens, implementation="triton")}
        for splits in sorted({1, 2, 4, auto}):
            systems[f"mosaic, {splits} splits"] = on_cache(paged_decode_mgpu, cache, bt, lens, scale=scale,
                                                           num_splits=splits)
        for name, f in systems.items():
            try:
                out0 = f(qs[0])
                err = float(jnp.max(jnp.abs(out0 - ref)) / jnp.max(jnp.abs(ref)))
                e64 = float(np.max(np.abs(np.asarray(out0[0], np.float64) - ref64)) / np.max(np.abs(ref64)))
                print(f"{name}: sequence 0 vs float64: {e64:.2e} of max|out| (float32 reference: "
                      f"{float(np.max(np.abs(np.asarray(ref[0], np.float64) - ref64)) / np.max(np.abs(ref64))):.2e})",
                      flush=True)
                t = time_fn(f, [(q,) for q in qs])
                rows.append((f"B={b} ctx={ctx}", name, t, cache.nbytes * ctx * b // (cache.num_slots), err))
            except Exception as e:  # noqa: BLE001 (a probe: report and go on)
                rows.append((f"B={b} ctx={ctx}", f"{name}: FAILED {type(e).__name__}: {str(e)[:200]}", 0, 1, 0))
            print(rows[-1], flush=True)
    print(f"\n{device_description()}; copy bw {bw / 1e9:.0f} GB/s; Hk={hk} G={g} D={DIM} block 16, turboquant_4bit_nc")
    print("point | kernel | us | GB/s | of copy bw | max rel err vs reference")
    for point, name, t, nb, err in rows:
        if t:
            print(f"{point} | {name} | {t * 1e6:.1f} | {nb / t / 1e9:.0f} | {nb / t / bw:.2f} | {err:.1e}")
        else:
            print(f"{point} | {name}")


if __name__ == "__main__":
    main()
