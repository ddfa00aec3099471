"""Block-sparse (splash-style) prefill attention in Pallas, forward and backward (Triton lowering).

Same contract as :func:`tqjax.reference.prefill_attention_reference` (packed variable-length
sequences through ``query_start_loc``, GQA, scale, softcap, zeros for padding rows, optional cached
context per sequence), generalised from causal / full to any static :mod:`tqjax.masks` mask
(causal, sliding windows, AND / OR, one mask per query head). :func:`dense_masked_attention_reference`
beside the kernel is the dense ground truth for the general masks.

The KV stream and positions
---------------------------
The kernels see one packed KV *stream* and, for every query row and stream entry, a segment id and a
position. Without context the stream is the chunk's own K/V (entry t = token t). With context
(``context_key`` [S, C, Hk, D], ``context_lens`` [S]) the wrapper builds, inside jit, a stream where
sequence s occupies one contiguous *region*: its ``context_lens[s]`` context tokens (positions
``0 .. context_lens[s] - 1``) followed by its chunk tokens (positions ``context_lens[s] + i``); the
stream has the static length ``S * C + T`` and its unused tail is padding. In both cases the stream
index of an entry is ``region_start[s] + position``, and query row t's own token sits at stream index
``self(t)``, increasing in t. The mask of a (query, key) pair is::

    same segment  &  OR_b (lo_b <= kv_pos - q_pos <= hi_b)          (bands of the query's head)

so a causal mask gives the reference's context semantics (every context position precedes the chunk).
Padding query rows (t >= query_start_loc[-1]) have segment -1 and padding stream entries -2: they
match nothing, and rows without any visible key come out as zeros.

Block table and loop structure
------------------------------
Host side (numpy, at trace time, cached): :func:`tqjax.masks.block_table` classifies every
(head, q block, kv block) as EMPTY / PARTIAL / FULL on index differences (valid for positions too
when there is no context, since the two differences agree inside a segment); with context every
block is PARTIAL (positions are dynamic). :func:`tqjax.masks.compact_table` turns each (head, q
block) row into the ascending list of its non-empty kv blocks, padded to the longest row, with a FULL
flag per entry (one table when all heads share the mask, else one per query head). The dk/dv pass uses
the transposed table (per kv block: the list of its non-empty q blocks).

Device side (jnp, before the kernels, from the traced ``query_start_loc`` / ``context_lens``): for
every q block the range of stream indices it can possibly see, intersecting its segments' regions
with ``[self(first row) + min lo, self(last row) + max hi]``, as a kv-block range; turned into a range
``[e_lo, e_hi)`` of list entries by counting list entries below each end. Likewise for every kv block
the range of q blocks that can see it. Each program then runs ``fori_loop(e_lo, e_hi)`` over its list,
reading the kv block index from it: empty blocks are never loaded, and the work is proportional to
the number of non-empty blocks of the segments it touches. A FULL entry skips the elementwise mask
(a ``lax.cond``) when, in addition, the q block and the kv block each lie wholly inside the same
segment (per-block "uniform segment" ids computed in jnp).

Kernels (grid, one program each)
--------------------------------
* forward: ``(q block, query head)``; GQA without repeating K/V (the program reads kv head
  ``h // group``); scores in fp32 from ``dot(q, k^T)`` with fp32 accumulation; online softmax in base
  2 in fp32; ``p`` is cast to the input dtype for ``dot(p, v)`` (flash-attention 2). Outputs the
  output and the base-2 log-sum-exp per row (the natural one is returned to callers).
* dq: ``(q block, query head)``, recomputing ``p = exp2(s - lse)``; ``ds = p * (dp - delta)`` with
  ``delta = rowsum(o * do)`` from XLA (minus any lse cotangent), times ``1 - tanh^2`` under softcap.
* dk/dv: ``(kv block, kv head)``; loops over the heads of its GQA group and, per head, over the q
  blocks that see this kv block; accumulates in fp32.

Triton constraints honoured: every loaded / stored block is a power of two (head dims are padded to a
power of two >= 16 with zeros; T and the stream are padded to whole blocks); no in-register slicing;
blocks are at least 16 in each dot dimension.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from tqjax.masks import (
    EMPTY,
    INF,
    PARTIAL,
    CausalMask,
    FullMask,
    LocalMask,
    Mask,
    MultiHeadMask,
    block_table,
    compact_table,
    head_bands,
)
from tqjax.pallas.tuning import prefill_params, prefill_problem
from tqjax.reference import (
    _apply_softcap,
    _softmax_attend,
    check_array,
    prefill_attention_reference,
)

__all__ = [
    "dense_masked_attention_reference", "prefill_attention", "prefill_attention_reference", "resolve_mask",
    "visited_blocks",
]

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_MIN_BLOCK = 16  # tl.dot needs every dimension >= 16


# ---- static configuration ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
    mask: Mask
    num_heads: int
    num_kv_heads: int
    scale: float
    softcap: float | None
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int
    bwd_block_q: int
    bwd_block_k: int
    bwd_num_warps: int
    bwd_num_stages: int
    interpret: bool
    precision: Any
    has_context: bool
    num_tokens: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @functools.cached_property
    def bands(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        return head_bands(self.mask, self.num_heads)

    @property
    def extent(self) -> tuple[int, int]:
        """(min lo, max hi) over every head's bands: no pair outside this difference range is visible."""
        los = [b[0][0] for b in self.bands if b]
        his = [b[-1][1] for b in self.bands if b]
        return (min(los), max(his)) if los else (1, -1)


def _band_array(cfg: _Config) -> np.ndarray | None:
    """Per-head bands as int32 [Hq, nb, 2] (padding bands (1, 0) are empty), or None if shared."""
    if len(cfg.bands) == 1:
        return None
    nb = max(1, max(len(b) for b in cfg.bands))
    out = np.tile(np.array([1, 0], np.int32), (len(cfg.bands), nb, 1))
    for h, bs in enumerate(cfg.bands):
        for i, (lo, hi) in enumerate(bs):
            out[h, i] = (lo, hi)
    return out


@functools.lru_cache(maxsize=64)
def _tables(cfg: _Config, nq: int, nk: int, bq: int, bk: int, transposed: bool):
    """Compacted block lists (numpy int32): (index, full, count), rows = q blocks (or kv blocks if
    ``transposed``), per head or shared."""
    t = cfg.num_tokens
    if cfg.has_context:
        table = np.full((1, nq, nk), PARTIAL, np.int8)
    else:
        tab = block_table(cfg.mask, t, t, bq, bk, cfg.num_heads)
        table = np.full((tab.shape[0], nq, nk), EMPTY, np.int8)
        table[:, : tab.shape[1], : tab.shape[2]] = tab
    if transposed:
        table = np.ascontiguousarray(table.transpose(0, 2, 1))
    return compact_table(table)


# ---- stream layout and dynamic ranges (jnp, inside jit) ------------------------------------------------


def _layout(t, t_pad, kv_pad, qsl, context_lens):
    """Segment ids, positions and stream indices of the packed rows; see the module docstring."""
    s = qsl.shape[0] - 1
    qsl = jnp.clip(qsl.astype(jnp.int32), 0, t)
    ext_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), qsl])  # [S+2]: ext segment e = seq e-1
    ctx = jnp.zeros((s,), jnp.int32) if context_lens is None else context_lens.astype(jnp.int32)
    ctx_e = jnp.concatenate([jnp.zeros((1,), jnp.int32), ctx])  # [S+1]
    cum = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(ctx_e, dtype=jnp.int32)])  # [S+2]
    rows = jnp.arange(t, dtype=jnp.int32)
    valid = rows < qsl[s]
    # "scan_unrolled": same results, no while loop (XLA's GPU runtime may sync with the host every trip)
    e = jnp.minimum(jnp.searchsorted(qsl, rows, side="right", method="scan_unrolled").astype(jnp.int32), s)
    pos = ctx_e[e] + rows - ext_start[e]
    self_idx = jnp.where(valid, cum[e + 1] + rows, kv_pad + rows)  # increasing in t
    region_start = cum[:-1] + ext_start[:-1]  # [S+1]
    region_end = cum[1:] + ext_start[1:]
    pad = t_pad - t
    return {
        "s": s, "ext_start": ext_start, "e": e, "valid": valid, "self_idx": self_idx, "pos": pos,
        "region_start": region_start, "region_end": region_end, "used": region_end[s], "qsl": qsl,
        "q_seg": jnp.pad(jnp.where(valid, e, -1), (0, pad), constant_values=-1),
        "q_pos": jnp.pad(pos, (0, pad)),
    }


def _q_ranges(lay, cfg, t, nq, nk, bq, bk, index):
    """Per q block: list-entry range [e_lo, e_hi) [H', nq] and the uniform segment id [nq] (-1 if none)."""
    lo_min, hi_max = cfg.extent
    n_valid = lay["qsl"][lay["s"]]
    first = jnp.arange(nq, dtype=jnp.int32) * bq
    last = jnp.minimum(first + bq, n_valid) - 1
    any_valid = first < n_valid
    fi, la = jnp.clip(first, 0, t - 1), jnp.clip(last, 0, t - 1)
    e_first, e_last = lay["e"][fi], lay["e"][la]
    x_lo = jnp.maximum(lay["region_start"][e_first], lay["self_idx"][fi] + lo_min)
    x_hi = jnp.minimum(lay["region_end"][e_last] - 1, lay["self_idx"][la] + hi_max)
    ok = any_valid & (x_lo <= x_hi)
    kb_lo = jnp.where(ok, jnp.clip(x_lo // bk, 0, nk), 0)
    kb_hi = jnp.where(ok, jnp.clip(x_hi // bk + 1, 0, nk), 0)
    uniform = jnp.where(any_valid & (last == first + bq - 1) & (e_first == e_last), e_first, -1)
    e_lo = jnp.sum(index < kb_lo[None, :, None], axis=-1, dtype=jnp.int32)
    e_hi = jnp.sum(index < kb_hi[None, :, None], axis=-1, dtype=jnp.int32)
    return e_lo, e_hi, uniform.astype(jnp.int32)


def _kv_uniform(kv_seg, used, nk, bk):
    first = jnp.arange(nk, dtype=jnp.int32) * bk
    last = jnp.minimum(first + bk, used) - 1
    blk = kv_seg.reshape(nk, bk)
    same = (jnp.min(blk, axis=1) == jnp.max(blk, axis=1)) & (first < used) & (last == first + bk - 1)
    return jnp.where(same, blk[:, 0], -2).astype(jnp.int32)


def _kv_ranges(lay, kv_seg, cfg, nq, nk, bq, bk, index):
    """Per kv block: entry range [f_lo, f_hi) [H', nk] into its (transposed) list of q blocks."""
    lo_min, hi_max = cfg.extent
    used = lay["used"]
    kv_len = kv_seg.shape[0]
    first = jnp.arange(nk, dtype=jnp.int32) * bk
    last = jnp.minimum(first + bk, used) - 1
    any_valid = first < used
    fi, la = jnp.clip(first, 0, kv_len - 1), jnp.clip(last, 0, kv_len - 1)
    ke_first, ke_last = jnp.maximum(kv_seg[fi], 0), jnp.maximum(kv_seg[la], 0)
    self_idx = lay["self_idx"]
    t_lo = jnp.maximum(lay["ext_start"][ke_first],
                       jnp.searchsorted(self_idx, fi - hi_max, side="left", method="scan_unrolled"))
    t_hi = jnp.minimum(lay["ext_start"][ke_last + 1],
                       jnp.searchsorted(self_idx, la - lo_min, side="right", method="scan_unrolled"))
    ok = any_valid & (t_lo < t_hi)
    qb_lo = jnp.where(ok, t_lo // bq, 0).astype(jnp.int32)
    qb_hi = jnp.where(ok, (t_hi + bq - 1) // bq, 0).astype(jnp.int32)
    f_lo = jnp.sum(index < qb_lo[None, :, None], axis=-1, dtype=jnp.int32)
    f_hi = jnp.sum(index < qb_hi[None, :, None], axis=-1, dtype=jnp.int32)
    return f_lo, f_hi


# ---- in-kernel pieces ----------------------------------------------------------------------------------


#: ``jax_default_matmul_precision`` values that ask for full float32 products.
_FLOAT32_NAMES = frozenset({"float32", "highest", "f32_f32_f32", "tf32_tf32_f32_x3", "bf16_bf16_f32_x6"})


def float32_precision() -> jax.lax.DotAlgorithmPreset:
    """The product algorithm for float32 inputs on a GPU: TF32x3 (float32-accurate), unless
    ``jax.default_matmul_precision`` (context manager, flag or ``JAX_DEFAULT_MATMUL_PRECISION``) names
    a lower precision, then one TF32 pass (about 3x fewer tensor-core operations, 2**-11 relative
    input rounding; what XLA computes for float32 matmuls on Ampere and later by default). Read at
    trace time; jit caches key on the setting."""
    setting = jax.config.jax_default_matmul_precision
    if setting is None or str(setting).lower() in _FLOAT32_NAMES:
        return jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    return jax.lax.DotAlgorithmPreset.TF32_TF32_F32


def _dot(a, b, ca, cb, precision):
    return jax.lax.dot_general(
        a, b, (((ca,), (cb,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _scores(q, k, cfg):
    """Logits in the base-2 domain [bq, bk] fp32 (``c * log2(e)``, c the softcapped scaled logit) and
    ``tanh`` of the softcap (None without softcap)."""
    s = _dot(q, k, 1, 1, cfg.precision)
    if cfg.softcap is None:
        return s * np.float32(cfg.scale * _LOG2E), None
    th = jnp.tanh(s * np.float32(cfg.scale / cfg.softcap))
    return th * np.float32(cfg.softcap * _LOG2E), th


def _band_ok(d, cfg, bands_ref, hb):
    """Bands of the head as a bool [bq, bk] (None: no constraint)."""
    if bands_ref is None:
        ok = None
        (bands,) = cfg.bands
        if not bands:
            return jnp.zeros(d.shape, jnp.bool_)
        for lo, hi in bands:
            c = None
            if lo > -INF:
                c = d >= lo
            if hi < INF:
                c = (d <= hi) if c is None else c & (d <= hi)
            if c is None:
                return None
            ok = c if ok is None else ok | c
        return ok
    ok = None
    for i in range(bands_ref.shape[1]):
        c = (d >= bands_ref[hb, i, 0]) & (d <= bands_ref[hb, i, 1])
        ok = c if ok is None else ok | c
    return ok


def _apply_mask(s2, need, q_seg, q_pos, kv_seg, kv_pos, cfg, bands_ref, hb):
    def masked():
        ok = q_seg[:, None] == kv_seg[None, :]
        band = _band_ok(kv_pos[None, :] - q_pos[:, None], cfg, bands_ref, hb)
        if band is not None:
            ok = ok & band
        return jnp.where(ok, s2, -jnp.inf)

    return jax.lax.cond(need, masked, lambda: s2)


def _split_refs(refs, has_bands):
    if has_bands:
        return refs[0], refs[1:]
    return None, refs


def _fwd_kernel(*refs, cfg, table_per_head):
    bands_ref, refs = _split_refs(refs, len(cfg.bands) > 1)
    (index_ref, full_ref, lo_ref, hi_ref, q_uni_ref, kv_uni_ref, q_seg_ref, q_pos_ref, kv_seg_ref, kv_pos_ref,
     q_ref, k_ref, v_ref, o_ref, lse_ref) = refs
    bk = cfg.block_k
    qb, h = pl.program_id(0), pl.program_id(1)
    hh = h if table_per_head else 0
    q = q_ref[...]
    q_seg, q_pos = q_seg_ref[...], q_pos_ref[...]
    q_uni = q_uni_ref[qb]

    def body(e, carry):
        acc, m_prev, l_prev = carry
        kb = index_ref[hh, qb, e]
        start = pl.multiple_of(kb * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        s2, _ = _scores(q, k, cfg)
        need = (full_ref[hh, qb, e] == 0) | (q_uni < 0) | (q_uni != kv_uni_ref[kb])
        kv_seg, kv_pos = kv_seg_ref[pl.ds(start, bk)], kv_pos_ref[pl.ds(start, bk)]
        s2 = _apply_mask(s2, need, q_seg, q_pos, kv_seg, kv_pos, cfg, bands_ref, h)
        m_next = jnp.maximum(m_prev, jnp.max(s2, axis=1))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        alpha = jnp.exp2(m_prev - m_safe)
        p = jnp.exp2(s2 - m_safe[:, None])
        l_next = alpha * l_prev + jnp.sum(p, axis=1)
        v = v_ref[pl.ds(start, bk), :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, 1, 0, cfg.precision)
        return acc, m_next, l_next

    bq, d = q.shape
    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(lo_ref[hh, qb], hi_ref[hh, qb], body, init)
    l_safe = jnp.where(l > 0, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0, m + jnp.log2(l_safe), -jnp.inf)


def _dq_kernel(*refs, cfg, table_per_head):
    bands_ref, refs = _split_refs(refs, len(cfg.bands) > 1)
    (index_ref, full_ref, lo_ref, hi_ref, q_uni_ref, kv_uni_ref, q_seg_ref, q_pos_ref, kv_seg_ref, kv_pos_ref,
     q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref) = refs
    bk = cfg.bwd_block_k
    qb, h = pl.program_id(0), pl.program_id(1)
    hh = h if table_per_head else 0
    q, do = q_ref[...], do_ref[...]
    lse = lse_ref[...]
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # rows without keys: p = 0
    delta = delta_ref[...]
    q_seg, q_pos = q_seg_ref[...], q_pos_ref[...]
    q_uni = q_uni_ref[qb]

    def body(e, dq):
        kb = index_ref[hh, qb, e]
        start = pl.multiple_of(kb * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s2, th = _scores(q, k, cfg)
        need = (full_ref[hh, qb, e] == 0) | (q_uni < 0) | (q_uni != kv_uni_ref[kb])
        kv_seg, kv_pos = kv_seg_ref[pl.ds(start, bk)], kv_pos_ref[pl.ds(start, bk)]
        s2 = _apply_mask(s2, need, q_seg, q_pos, kv_seg, kv_pos, cfg, bands_ref, h)
        p = jnp.exp2(s2 - lse[:, None])
        dp = _dot(do, v, 1, 1, cfg.precision)
        ds = p * (dp - delta[:, None])
        if th is not None:
            ds = ds * (1.0 - th * th)
        return dq + _dot(ds.astype(k.dtype), k, 1, 0, cfg.precision)

    dq = jax.lax.fori_loop(lo_ref[hh, qb], hi_ref[hh, qb], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * np.float32(cfg.scale)).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, cfg, table_per_head):
    bands_ref, refs = _split_refs(refs, len(cfg.bands) > 1)
    (index_ref, full_ref, lo_ref, hi_ref, q_uni_ref, kv_uni_ref, q_seg_ref, q_pos_ref, kv_seg_ref, kv_pos_ref,
     q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref) = refs
    bq = cfg.bwd_block_q
    kb, kvh = pl.program_id(0), pl.program_id(1)
    k, v = k_ref[...], v_ref[...]
    kv_seg, kv_pos = kv_seg_ref[...], kv_pos_ref[...]
    kv_uni = kv_uni_ref[kb]

    def head(j, carry):
        h = kvh * cfg.group + j
        hh = h if table_per_head else 0

        def body(e, carry):
            dk, dv = carry
            qb = index_ref[hh, kb, e]
            start = pl.multiple_of(qb * bq, bq)
            q = q_ref[pl.ds(start, bq), h, :]
            do = do_ref[pl.ds(start, bq), h, :]
            lse = lse_ref[h, pl.ds(start, bq)]
            lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
            delta = delta_ref[h, pl.ds(start, bq)]
            q_seg, q_pos = q_seg_ref[pl.ds(start, bq)], q_pos_ref[pl.ds(start, bq)]
            q_uni = q_uni_ref[qb]
            s2, th = _scores(q, k, cfg)
            need = (full_ref[hh, kb, e] == 0) | (q_uni < 0) | (q_uni != kv_uni)
            s2 = _apply_mask(s2, need, q_seg, q_pos, kv_seg, kv_pos, cfg, bands_ref, h)
            p = jnp.exp2(s2 - lse[:, None])  # [bq, bk]
            dv = dv + _dot(p.astype(do.dtype), do, 0, 0, cfg.precision)
            dp = _dot(do, v, 1, 1, cfg.precision)
            ds = p * (dp - delta[:, None])
            if th is not None:
                ds = ds * (1.0 - th * th)
            dk = dk + _dot(ds.astype(q.dtype), q, 0, 0, cfg.precision)
            return dk, dv

        return jax.lax.fori_loop(lo_ref[hh, kb], hi_ref[hh, kb], body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, cfg.group, head, (zeros, zeros))
    dk_ref[...] = (dk * np.float32(cfg.scale)).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ---- pallas calls ---------------------------------------------------------------------------------------


def _whole(shape):
    n = len(shape)
    return pl.BlockSpec(tuple(shape), lambda i, j: (0,) * n)


def _table_inputs(cfg, index, full, lo, hi, q_uni, kv_uni):
    """The scalar-indexed inputs every kernel starts with (bands first when per head) and their specs."""
    bands = _band_array(cfg)
    arrays = [index, full, lo, hi, q_uni, kv_uni]
    if bands is not None:
        arrays = [bands] + arrays
    return arrays, [_whole(a.shape) for a in arrays]


def _q_major_specs(bq: int, dp: int, kvp: int, group: int, kv_seg, kv_pos) -> list:
    """BlockSpecs shared by the q-major kernels (forward, dq) on grid (q block i, query head j): the q
    block's segment ids and positions, the whole KV stream's, the q tile, and kv head j // group's
    whole K and V."""
    return [
        pl.BlockSpec((bq,), lambda i, j: (i,)),
        pl.BlockSpec((bq,), lambda i, j: (i,)),
        _whole(kv_seg.shape),
        _whole(kv_pos.shape),
        pl.BlockSpec((bq, None, dp), lambda i, j: (i, j, 0)),
        pl.BlockSpec((kvp, None, dp), lambda i, j: (0, jax.lax.div(j, group), 0)),
        pl.BlockSpec((kvp, None, dp), lambda i, j: (0, jax.lax.div(j, group), 0)),
    ]


def _forward(cfg: _Config, q, k, v, meta):
    """q [Tp, Hq, Dp], k/v [KVp, Hk, Dp] -> out [Tp, Hq, Dp] in q.dtype, lse2 [Hq, Tp] fp32 (base 2)."""
    tp, hq, dp = q.shape
    kvp = k.shape[0]
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = tp // bq, kvp // bk
    index, full, _ = _tables(cfg, nq, nk, bq, bk, False)
    lo, hi, q_uni, kv_uni = meta["fwd"]
    arrays, specs = _table_inputs(cfg, index, full, lo, hi, q_uni, kv_uni)
    q_seg, q_pos, kv_seg, kv_pos = meta["q_seg"], meta["q_pos"], meta["kv_seg"], meta["kv_pos"]
    specs += _q_major_specs(bq, dp, kvp, cfg.group, kv_seg, kv_pos)
    out, lse2 = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, table_per_head=index.shape[0] > 1),
        grid=(nq, hq),
        in_specs=specs,
        out_specs=[pl.BlockSpec((bq, None, dp), lambda i, j: (i, j, 0)), pl.BlockSpec((None, bq), lambda i, j: (j, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((hq, tp), jnp.float32)],
        interpret=cfg.interpret,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name="tq_prefill_fwd",
    )(*arrays, q_seg, q_pos, kv_seg, kv_pos, q, k, v)
    return out, lse2


def _backward(cfg: _Config, q, k, v, meta, out, lse2, do, dlse):
    tp, hq, dp = q.shape
    kvp, hk = k.shape[:2]
    bq, bk = cfg.bwd_block_q, cfg.bwd_block_k
    nq, nk = tp // bq, kvp // bk
    g = cfg.group
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).T  # [Hq, Tp]
    delta = delta - dlse.astype(jnp.float32)  # d lse / d logit = p: folds into delta
    do = do.astype(q.dtype)
    params = pltriton.CompilerParams(num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages)
    q_seg, q_pos, kv_seg, kv_pos = meta["q_seg"], meta["q_pos"], meta["kv_seg"], meta["kv_pos"]
    e_lo, e_hi, f_lo, f_hi, q_uni, kv_uni = meta["bwd"]

    index, full, _ = _tables(cfg, nq, nk, bq, bk, False)
    arrays, specs = _table_inputs(cfg, index, full, e_lo, e_hi, q_uni, kv_uni)
    specs += _q_major_specs(bq, dp, kvp, g, kv_seg, kv_pos) + [
        pl.BlockSpec((bq, None, dp), lambda i, j: (i, j, 0)),
        pl.BlockSpec((None, bq), lambda i, j: (j, i)),
        pl.BlockSpec((None, bq), lambda i, j: (j, i)),
    ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, table_per_head=index.shape[0] > 1),
        grid=(nq, hq),
        in_specs=specs,
        out_specs=pl.BlockSpec((bq, None, dp), lambda i, j: (i, j, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=cfg.interpret,
        compiler_params=params,
        name="tq_prefill_dq",
    )(*arrays, q_seg, q_pos, kv_seg, kv_pos, q, k, v, do, lse2, delta)

    index_t, full_t, _ = _tables(cfg, nq, nk, bq, bk, True)
    arrays, specs = _table_inputs(cfg, index_t, full_t, f_lo, f_hi, q_uni, kv_uni)
    specs += [
        _whole(q_seg.shape),
        _whole(q_pos.shape),
        pl.BlockSpec((bk,), lambda i, j: (i,)),
        pl.BlockSpec((bk,), lambda i, j: (i,)),
        _whole(q.shape),
        pl.BlockSpec((bk, None, dp), lambda i, j: (i, j, 0)),
        pl.BlockSpec((bk, None, dp), lambda i, j: (i, j, 0)),
        _whole(do.shape),
        _whole(lse2.shape),
        _whole(delta.shape),
    ]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, table_per_head=index_t.shape[0] > 1),
        grid=(nk, hk),
        in_specs=specs,
        out_specs=[pl.BlockSpec((bk, None, dp), lambda i, j: (i, j, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=cfg.interpret,
        compiler_params=params,
        name="tq_prefill_dkdv",
    )(*arrays, q_seg, q_pos, kv_seg, kv_pos, q, k, v, do, lse2, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, meta):
    out, lse2 = _forward(cfg, q, k, v, meta)
    return out, lse2 * np.float32(_LN2)


def _attention_fwd(cfg, q, k, v, meta):
    out, lse2 = _forward(cfg, q, k, v, meta)
    return (out, lse2 * np.float32(_LN2)), (q, k, v, meta, out, lse2)


def _attention_bwd(cfg, res, cts):
    q, k, v, meta, out, lse2 = res
    do, dlse = cts
    dq, dk, dv = _backward(cfg, q, k, v, meta, out, lse2, do, dlse)
    return dq, dk, dv, jax.tree.map(lambda x: None, meta)


_attention.defvjp(_attention_fwd, _attention_bwd)


# ---- the jitted wrapper ---------------------------------------------------------------------------------


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@functools.partial(jax.jit, static_argnames=("cfg", "return_lse"))
def _prefill(query, key, value, query_start_loc, context_key, context_value, context_lens, *, cfg, return_lse):
    t, _, d = query.shape
    hk = key.shape[1]
    dtype = jnp.result_type(*(x.dtype for x in (query, key, value, context_key, context_value) if x is not None))
    dp = max(_MIN_BLOCK, pl.next_power_of_2(d))
    qm = max(cfg.block_q, cfg.bwd_block_q)
    km = max(cfg.block_k, cfg.bwd_block_k)
    tp = _round_up(t, qm)
    if cfg.has_context:
        s, c = context_key.shape[:2]
        kvp = _round_up(s * c + t, km)
        lens = jnp.clip(context_lens.astype(jnp.int32), 0, c)
    else:
        kvp = _round_up(t, km)
        lens = None
    lay = _layout(t, tp, kvp, query_start_loc, lens)

    def pad_d(x):
        return jnp.pad(x.astype(dtype), ((0, 0), (0, 0), (0, dp - d)))

    q = jnp.pad(pad_d(query), ((0, tp - t), (0, 0), (0, 0)))
    if cfg.has_context:
        drop = jnp.int32(kvp)  # scatter index past the stream: dropped
        chunk_idx = jnp.where(lay["valid"], lay["self_idx"], drop)
        cidx = jnp.arange(c, dtype=jnp.int32)
        ctx_idx = jnp.where(cidx[None, :] < lens[:, None], lay["region_start"][1:, None] + cidx[None, :], drop).reshape(-1)
        seg_ctx = jnp.broadcast_to(jnp.arange(1, s + 1, dtype=jnp.int32)[:, None], (s, c)).reshape(-1)
        pos_ctx = jnp.broadcast_to(cidx[None, :], (s, c)).reshape(-1)

        def stream(x, xc):
            z = jnp.zeros((kvp, hk, dp), dtype)
            z = z.at[chunk_idx].set(pad_d(x), mode="drop")
            return z.at[ctx_idx].set(pad_d(xc.reshape(s * c, hk, d)), mode="drop")

        k, v = stream(key, context_key), stream(value, context_value)
        kv_seg = jnp.full((kvp,), -2, jnp.int32).at[chunk_idx].set(lay["e"], mode="drop")
        kv_seg = kv_seg.at[ctx_idx].set(seg_ctx, mode="drop")
        kv_pos = jnp.zeros((kvp,), jnp.int32).at[chunk_idx].set(lay["pos"], mode="drop")
        kv_pos = kv_pos.at[ctx_idx].set(pos_ctx, mode="drop")
    else:
        k = jnp.pad(pad_d(key), ((0, kvp - t), (0, 0), (0, 0)))
        v = jnp.pad(pad_d(value), ((0, kvp - t), (0, 0), (0, 0)))
        kv_seg = jnp.pad(jnp.where(lay["valid"], lay["e"], -2), (0, kvp - t), constant_values=-2)
        kv_pos = jnp.pad(lay["pos"], (0, kvp - t))

    meta = {"q_seg": lay["q_seg"], "q_pos": lay["q_pos"], "kv_seg": kv_seg, "kv_pos": kv_pos}
    nq, nk = tp // cfg.block_q, kvp // cfg.block_k
    index, _, _ = _tables(cfg, nq, nk, cfg.block_q, cfg.block_k, False)
    e_lo, e_hi, q_uni = _q_ranges(lay, cfg, t, nq, nk, cfg.block_q, cfg.block_k, index)
    meta["fwd"] = (e_lo, e_hi, q_uni, _kv_uniform(kv_seg, lay["used"], nk, cfg.block_k))
    bq, bk = cfg.bwd_block_q, cfg.bwd_block_k
    nq, nk = tp // bq, kvp // bk
    index, _, _ = _tables(cfg, nq, nk, bq, bk, False)
    index_t, _, _ = _tables(cfg, nq, nk, bq, bk, True)
    e_lo, e_hi, q_uni = _q_ranges(lay, cfg, t, nq, nk, bq, bk, index)
    f_lo, f_hi = _kv_ranges(lay, kv_seg, cfg, nq, nk, bq, bk, index_t)
    meta["bwd"] = (e_lo, e_hi, f_lo, f_hi, q_uni, _kv_uniform(kv_seg, lay["used"], nk, bk))
    out, lse = _attention(cfg, q, k, v, meta)
    out = out[:t, :, :d].astype(query.dtype)
    if return_lse:
        return out, lse[:, :t].T
    return out


def visited_blocks(
    query_start_loc,
    num_tokens: int,
    *,
    mask: Mask,
    num_heads: int,
    block_q: int,
    block_k: int,
    context_lens=None,
    context_len: int = 0,
) -> np.ndarray:
    """The kv blocks the forward kernel's loop visits: bool ``[H', nq, nk]`` (H' = 1 when every head
    shares the mask), from the same static lists and dynamic ranges the kernel uses (computed
    eagerly). For tests and the benchmark's sparsity column; nothing outside them is ever loaded."""
    qsl = jnp.asarray(query_start_loc, jnp.int32)
    has_context = context_lens is not None
    cfg = _Config(
        mask=mask, num_heads=num_heads, num_kv_heads=1, scale=1.0, softcap=None, block_q=block_q,
        block_k=block_k, num_warps=4, num_stages=1, bwd_block_q=block_q, bwd_block_k=block_k, bwd_num_warps=4,
        bwd_num_stages=1, interpret=True, precision=None, has_context=has_context, num_tokens=num_tokens,
    )
    s = qsl.shape[0] - 1
    tp = _round_up(num_tokens, block_q)
    kvp = _round_up(s * context_len + num_tokens if has_context else num_tokens, block_k)
    lens = jnp.asarray(context_lens, jnp.int32) if has_context else None
    lay = _layout(num_tokens, tp, kvp, qsl, lens)
    nq, nk = tp // block_q, kvp // block_k
    index, _, _ = _tables(cfg, nq, nk, block_q, block_k, False)
    e_lo, e_hi, _ = _q_ranges(lay, cfg, num_tokens, nq, nk, block_q, block_k, index)
    e_lo, e_hi = np.asarray(e_lo), np.asarray(e_hi)
    out = np.zeros((index.shape[0], nq, nk), bool)
    for h in range(index.shape[0]):
        for i in range(nq):
            out[h, i, index[h, i, e_lo[h, i] : e_hi[h, i]]] = True
    return out


# ---- public entry ---------------------------------------------------------------------------------------


def resolve_mask(causal: bool = True, window: int | tuple[int | None, int | None] | None = None,
                 mask: Mask | None = None) -> Mask:
    """The static mask of :func:`prefill_attention`'s ``causal`` / ``window`` / ``mask`` arguments."""
    if mask is not None:
        if not isinstance(mask, Mask):
            raise TypeError(f"mask must be a tqjax.masks.Mask, got {type(mask).__name__}")
        if window is not None or causal is not True:
            raise ValueError("give either mask= or causal=/window=, not both")
        return mask
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    base = CausalMask() if causal else FullMask()
    if window is None:
        return base
    if isinstance(window, (int, np.integer)) and not isinstance(window, bool):
        left, right = int(window), int(window)
    elif isinstance(window, tuple) and len(window) == 2:
        left, right = window
    else:
        raise TypeError(f"window must be an int or a (left, right) tuple, got {window!r}")
    local = LocalMask(left, right)
    return base & local if causal else local


def _check_block(name: str, value: int) -> int:
    if not isinstance(value, (int, np.integer)) or value < _MIN_BLOCK or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {_MIN_BLOCK}, got {value!r}")
    return int(value)


def prefill_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    query_start_loc: jax.Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    causal: bool = True,
    window: int | tuple[int | None, int | None] | None = None,
    mask: Mask | None = None,
    context_key: jax.Array | None = None,
    context_value: jax.Array | None = None,
    context_lens: jax.Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    bwd_block_q: int | None = None,
    bwd_block_k: int | None = None,
    bwd_num_warps: int | None = None,
    bwd_num_stages: int | None = None,
    interpret: bool = False,
    precision=None,
    return_lse: bool = False,
):
    """Block-sparse packed-varlen attention over exact K/V (Pallas); differentiable (custom VJP).

    Shapes and dtypes: ``query`` [T, Hq, D], ``key`` / ``value`` [T, Hk, D] (float32, bfloat16 or
    float16; Hq a multiple of Hk: query head h uses kv head ``h // (Hq // Hk)``, K/V are never
    repeated), ``query_start_loc`` [S + 1] int32 (sequence s is rows ``query_start_loc[s] :
    query_start_loc[s+1]``, non-decreasing, ``query_start_loc[-1] <= T``; rows past it are padding
    and get zeros) -> out [T, Hq, D] in ``query.dtype`` (and, with ``return_lse``, the natural
    log-sum-exp of each row's logits [T, Hq] float32, -inf for rows without keys).
    The computation runs in the promoted dtype of the inputs with fp32 scores and softmax.

    Mask: ``mask`` (a :class:`tqjax.masks.Mask`, e.g. ``MultiHeadMask`` for one per query head), or
    ``causal`` and ``window`` (an int w = (w, w) or a ``(left, right)`` pair: key j is visible to
    query i iff ``i - left <= j <= i + right``, as ``jax.nn.dot_product_attention``'s
    ``local_window_size``; ANDed with causal when ``causal``). The mask is applied on positions
    within each sequence, and keys never cross sequences.

    ``scale`` defaults to 1/sqrt(D); ``softcap`` applies ``softcap * tanh(logits / softcap)``.
    ``context_key`` / ``context_value`` [S, C, Hk, D] and ``context_lens`` [S] int32 (all or none):
    the cached context of each sequence, as in :func:`tqjax.reference.prefill_attention_reference`
    (sequence s's tokens sit at positions ``context_lens[s] + i`` after ``context_lens[s]`` context
    tokens at positions ``0 ..``).

    Tuning (static; None takes :func:`tqjax.pallas.tuning.prefill_params`): ``block_q`` / ``block_k``
    (powers of two >= 16) with ``num_warps`` / ``num_stages`` for the forward, ``bwd_*`` for the two
    backward kernels; ``precision`` of the products (default: HIGHEST for float32 in interpret mode;
    for float32 on a GPU, TF32x3 (float32-accurate) unless ``jax.default_matmul_precision`` is set to
    anything below float32 ("tensorfloat32", "bfloat16", "default", ...), which selects one TF32 pass,
    what XLA itself computes for float32 matmuls on these GPUs by default (:func:`float32_precision`);
    the input dtype's tensor-core product for 16-bit inputs).
    ``interpret`` runs the kernels in the Pallas interpreter (CPU).
    """
    check_array("query", query, (None, None, None), "float")
    t, hq, d = query.shape
    check_array("key", key, (t, None, d), "float")
    hk = key.shape[1]
    check_array("value", value, (t, hk, d), "float")
    check_array("query_start_loc", query_start_loc, (None,), "int")
    if t == 0:
        raise ValueError("query must have at least one token (T >= 1)")
    if hk == 0 or hq % hk:
        raise ValueError(f"query heads ({hq}) must be a positive multiple of the key/value heads ({hk})")
    if query_start_loc.shape[0] < 1:
        raise ValueError("query_start_loc must have shape [S + 1] with S >= 0, got shape (0,)")
    s = query_start_loc.shape[0] - 1
    if not isinstance(query_start_loc, jax.core.Tracer):
        qsl = np.asarray(query_start_loc)
        if np.any(np.diff(qsl) < 0) or qsl.min() < 0 or qsl.max() > t:
            raise ValueError(f"query_start_loc must be non-decreasing within [0, T={t}], got {qsl}")
    given = [x is not None for x in (context_key, context_value, context_lens)]
    if any(given) and not all(given):
        raise ValueError("context_key, context_value and context_lens must be given together")
    if all(given):
        check_array("context_key", context_key, (s, None, hk, d), "float")
        check_array("context_value", context_value, context_key.shape, "float")
        check_array("context_lens", context_lens, (s,), "int")
        if not isinstance(context_lens, jax.core.Tracer):
            lens = np.asarray(context_lens)
            if lens.size and (lens.min() < 0 or lens.max() > context_key.shape[1]):
                raise ValueError(f"context_lens must lie in [0, C={context_key.shape[1]}], got {lens}")
    if scale is not None and not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    if softcap is not None and (not isinstance(softcap, (int, float, np.floating, np.integer)) or softcap <= 0):
        raise ValueError(f"softcap must be a positive float or None, got {softcap!r}")
    the_mask = resolve_mask(causal, window, mask)
    if isinstance(the_mask, MultiHeadMask) and the_mask.num_heads != hq:
        raise ValueError(f"mask has {the_mask.num_heads} heads, query has {hq}")
    dtype = jnp.result_type(*(x.dtype for x in (query, key, value, context_key, context_value) if x is not None))
    itemsize = jnp.dtype(dtype).itemsize
    tuned = prefill_params(head_dim=d, itemsize=itemsize)
    if not interpret and block_q is None and block_k is None and bwd_block_q is None and bwd_block_k is None:
        why = prefill_problem(d, itemsize)
        if why is not None:
            raise ValueError(f"prefill_attention: {why}; pass smaller tiles or use the reference "
                             "(tqjax.prefill_attention(..., backend='reference'))")

    def pick(name, x):
        return _check_block(name, tuned[name] if x is None else x)

    if precision is None:
        if dtype == jnp.float32:
            precision = jax.lax.Precision.HIGHEST if interpret else float32_precision()
        else:
            precision = jax.lax.Precision.DEFAULT
    cfg = _Config(
        mask=the_mask, num_heads=hq, num_kv_heads=hk,
        scale=1.0 / math.sqrt(d) if scale is None else float(scale),
        softcap=None if softcap is None else float(softcap),
        block_q=pick("block_q", block_q), block_k=pick("block_k", block_k),
        num_warps=int(tuned["num_warps"] if num_warps is None else num_warps),
        num_stages=int(tuned["num_stages"] if num_stages is None else num_stages),
        bwd_block_q=pick("bwd_block_q", bwd_block_q), bwd_block_k=pick("bwd_block_k", bwd_block_k),
        bwd_num_warps=int(tuned["bwd_num_warps"] if bwd_num_warps is None else bwd_num_warps),
        bwd_num_stages=int(tuned["bwd_num_stages"] if bwd_num_stages is None else bwd_num_stages),
        interpret=bool(interpret), precision=precision, has_context=all(given), num_tokens=t,
    )
    return _prefill(query, key, value, query_start_loc, context_key, context_value, context_lens,
                    cfg=cfg, return_lse=bool(return_lse))


# ---- dense reference with a general mask -----------------------------------------------------------------


def dense_masked_attention_reference(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    query_start_loc: jax.Array,
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    context_key: jax.Array | None = None,
    context_value: jax.Array | None = None,
    context_lens: jax.Array | None = None,
) -> jax.Array:
    """Dense float32 ground truth of :func:`prefill_attention` for any :mod:`tqjax.masks` mask
    (default causal); with ``CausalMask()`` / ``FullMask()`` it is
    :func:`tqjax.reference.prefill_attention_reference` with ``causal=True`` / ``False``.

    The mask is evaluated on positions: row t of sequence s has position ``context_lens[s] + t -
    query_start_loc[s]``, context entry c position c; pairs of different sequences and padding rows
    never attend.
    """
    mask = CausalMask() if mask is None else mask
    t, hq, d = query.shape
    hk = key.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = query_start_loc.shape[0] - 1
    rows = jnp.arange(t)
    seg = jnp.searchsorted(query_start_loc, rows, side="right") - 1
    in_range = rows < query_start_loc[-1]
    own_seq = (seg >= 0) & (seg < s)
    segc = jnp.clip(seg, 0, max(s - 1, 0))
    start = jnp.where(seg >= 0, query_start_loc[jnp.clip(seg, 0, s)], 0)
    ctx_row = 0 if context_lens is None else jnp.where(own_seq, context_lens[segc], 0)
    qpos = ctx_row + rows - start
    masks = mask.masks if isinstance(mask, MultiHeadMask) else (mask,) * hq
    same = (seg[:, None] == seg[None, :]) & in_range[:, None] & in_range[None, :]
    allowed = jnp.stack([same & m.evaluate(qpos[:, None], qpos[None, :]) for m in masks])  # [Hq, T, T]
    key, value = key.astype(jnp.float32), value.astype(jnp.float32)
    if context_lens is not None:
        c = context_key.shape[1]
        cpos = jnp.arange(c)
        valid = cpos[None, :] < context_lens[:, None]  # [S, C]
        own = (seg[:, None] == jnp.arange(s)[None, :]) & in_range[:, None]  # [T, S]
        base = (own[:, :, None] & valid[None]).reshape(t, s * c)
        kpos = jnp.broadcast_to(cpos[None, :], (s, c)).reshape(s * c)
        ctx_allowed = jnp.stack([base & m.evaluate(qpos[:, None], kpos[None, :]) for m in masks])
        allowed = jnp.concatenate([ctx_allowed, allowed], axis=2)
        key = jnp.concatenate([context_key.astype(jnp.float32).reshape(s * c, hk, d), key])
        value = jnp.concatenate([context_value.astype(jnp.float32).reshape(s * c, hk, d), value])
    q = query.astype(jnp.float32).reshape(t, hk, hq // hk, d)
    logits = jnp.einsum("thgd,shd->hgts", q, key, precision=jax.lax.Precision.HIGHEST)
    logits = _apply_softcap(logits * scale, softcap)
    allowed = allowed.reshape(hk, hq // hk, t, -1)
    out = _softmax_attend(logits, allowed, value, "hgts,shd->thgd")
    return out.reshape(t, hq, d).astype(query.dtype)
