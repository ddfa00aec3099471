"""Dequantize the cached prefix of paged sequences, in Pallas (Triton lowering: CUDA and ROCm).

Chunked prefill needs a continuation chunk's cached context as dense K/V: the chunk then runs the
prefill kernel over [context; chunk] with the right causal offset (see :mod:`tqjax.nn.attention`).
One program per (sequence b, KV head h, chunk of ``block_tokens`` tokens) gathers its pages through
the block table (masked: no block-table entry at or past the sequence's last used block is read),
unpacks the key codes, looks the centroids up and applies the stored (norm-corrected) norms, exactly as
the decode kernel does, and writes the keys in the rotated *score domain* together with the
dequantized values. The inverse rotations (and, for the QJL presets, the sketch projection) are dense
matrix products that XLA runs after the kernel on the tensor cores, like the query rotation of the
decode. :func:`dequantize_reference` sits beside it as the pure-jnp ground truth.

Index arithmetic: cache refs are indexed per dimension (head, block id, token, word) as in the decode
kernel, so caches of any supported size are safe (see :mod:`tqjax.layout`).
"""

from __future__ import annotations

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
from tqjax.pallas.decode import CentroidLookup, _lookup, _unpack, centroid_lookup
from tqjax.pallas.tuning import dequant_params
from tqjax.reference import check_cache, check_sequence_inputs, dequantize_reference

__all__ = ["dequantize", "dequantize_reference"]


def _dequant_kernel(
    block_tables_ref,  # [B, max_blocks] int32 (padded to a multiple of pages_per_chunk)
    seq_lens_ref,  # [B] int32
    key_codes_ref,  # [NB, BS, Wk] uint32 (this KV head)
    key_scales_ref,  # [NB, BS, nk] float16 (None for fp8)
    value_codes_ref,  # [NB, BS, Wv] uint32
    value_scales_ref,  # [NB, BS, 2] float16
    k_ref,  # [T, Dq] float32: score-domain key vectors of every segment, side by side
    v_ref,  # [T, D] float32
    *,
    config: TurboQuantConfig,
    segments: tuple[KeySegment, ...],
    offsets: tuple[int, ...],
    lookups: tuple[CentroidLookup | None, ...],
    pages_per_chunk: int,
):
    b = pl.program_id(0)
    c = pl.program_id(2)
    block_size = key_codes_ref.shape[1]
    t = pages_per_chunk * block_size
    d = config.head_dim

    seq_len = seq_lens_ref[b]
    used_pages = (seq_len + block_size - 1) // block_size
    page0 = c * pages_per_chunk
    page_ok = page0 + jnp.arange(pages_per_chunk, dtype=jnp.int32) < used_pages
    pages = pltriton.load(block_tables_ref.at[b, pl.ds(page0, pages_per_chunk)], mask=page_ok, other=0)
    valid = (page0 * block_size + jnp.arange(t, dtype=jnp.int32) < seq_len)[:, None]  # [T, 1]

    def column(ref, i):  # one fp16 scalar per token -> float32 [T, 1]
        return ref[pages, :, i].astype(jnp.float32).reshape(t, 1)

    for si, seg in enumerate(segments):

        def load_words(start, count, seg=seg):
            return key_codes_ref[pages, :, pl.ds(seg.word_start + start, count)].reshape(t, count)

        if seg.kind == "fp8":
            w = load_words(0, seg.num_words)
            byte = jax.lax.broadcasted_iota(jnp.uint32, (t, seg.num_words, 4), 2) * np.uint32(8)
            raw = (jax.lax.broadcast_in_dim(w, (t, seg.num_words, 4), (0, 1)) >> byte) & np.uint32(0xFF)
            vec = jax.lax.bitcast_convert_type(raw.astype(jnp.uint8), jnp.float8_e4m3fn).reshape(t, d)
            vec = vec.astype(jnp.float32)
        elif seg.kind == "qjl":
            signs = _unpack(load_words, 1, seg.dim, t).astype(jnp.float32) * 2.0 - 1.0
            qjl_scale = np.float32(math.sqrt(math.pi / 2) / seg.dim)
            vec = signs * (column(key_scales_ref, 0) * column(key_scales_ref, 1) * qjl_scale)
        else:
            cvec = _lookup(_unpack(load_words, seg.bits, seg.dim, t), lookups[si])
            vec = cvec * column(key_scales_ref, si if config.key_format == "split" else 0)  # norm-corrected
        k_ref[:, pl.ds(offsets[si], seg.dim)] = jnp.where(valid, vec, 0.0)

    def load_value_words(start, count):
        return value_codes_ref[pages, :, pl.ds(start, count)].reshape(t, count)

    vcodes = _unpack(load_value_words, config.value_bits, d, t).astype(jnp.float32)
    v = vcodes * column(value_scales_ref, 0) + column(value_scales_ref, 1)
    v_ref[...] = jnp.where(valid, v, 0.0)


@functools.partial(jax.jit, static_argnames=("block_tokens", "num_warps", "num_stages", "interpret"))
def _dequantize(cache, block_tables, seq_lens, *, block_tokens, num_warps, num_stages, interpret):
    cfg = cache.config
    b, max_blocks = block_tables.shape
    hk, bs, d = cache.num_kv_heads, cache.block_size, cfg.head_dim
    ppc = max(1, min(block_tokens // bs, pl.next_power_of_2(max_blocks)))
    n_chunks = -(-max_blocks // ppc)
    tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, n_chunks * ppc - max_blocks)))
    t = ppc * bs
    padded_len = n_chunks * t

    segments = cfg.key_segments
    codec = key_codec(cfg)
    offsets = tuple(int(x) for x in np.cumsum([0] + [seg.dim for seg in segments])[:-1])
    dq = sum(seg.dim for seg in segments)
    lookups = tuple(
        centroid_lookup(codec.quantizers[i].codebook.centroids, "poly") if seg.kind == "mse" else None
        for i, seg in enumerate(segments)
    )
    kernel = functools.partial(
        _dequant_kernel, config=cfg, segments=segments, offsets=offsets, lookups=lookups, pages_per_chunk=ppc
    )
    whole = lambda shape: pl.BlockSpec(shape, lambda i, j, k: (0,) * len(shape))  # noqa: E731
    per_head = lambda a: pl.BlockSpec((None,) + a.shape[1:], lambda i, j, k: (j, 0, 0, 0))  # noqa: E731
    k_rot, v = pl.pallas_call(
        kernel,
        grid=(b, hk, n_chunks),
        in_specs=[
            whole(tables.shape),
            whole(seq_lens.shape),
            per_head(cache.key_codes),
            None if cache.key_scales is None else per_head(cache.key_scales),
            per_head(cache.value_codes),
            per_head(cache.value_scales),
        ],
        out_specs=[
            pl.BlockSpec((None, None, t, dq), lambda i, j, k: (i, j, k, 0)),
            pl.BlockSpec((None, None, t, d), lambda i, j, k: (i, j, k, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hk, padded_len, dq), jnp.float32),
            jax.ShapeDtypeStruct((b, hk, padded_len, d), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name=f"tq_dequant_{cfg.name}",
    )(tables, seq_lens.astype(jnp.int32), cache.key_codes, cache.key_scales, cache.value_codes, cache.value_scales)
    length = max_blocks * bs
    k_rot, v = k_rot[:, :, :length], v[:, :, :length]
    parts = [k_rot[..., off : off + seg.dim] for off, seg in zip(offsets, segments)]
    k = codec.keys_from_score_vectors(parts, k_rot.shape[:-1])  # zero vectors stay zero (linear maps)
    return jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))


def dequantize(
    cache: PagedKVCache,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    *,
    block_tokens: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Pallas dequantization; same contract as :func:`tqjax.reference.dequantize_reference`.

    block_tables [B, max_blocks] int32, seq_lens [B] int32 -> (K, V) float32 [B, max_blocks *
    block_size, Hk, D] each, zero at and past ``seq_lens[b]``. Tuning (static; None takes
    :func:`tqjax.pallas.tuning.dequant_params`): ``block_tokens`` (tokens per program, at least one
    block), ``num_warps``, ``num_stages``.
    """
    check_cache(cache, "cache", "turboquant")
    check_sequence_inputs(cache, None, block_tables, seq_lens)
    tuned = dequant_params()
    return _dequantize(
        cache, block_tables, seq_lens,
        block_tokens=max(tuned["block_tokens"] if block_tokens is None else block_tokens, cache.block_size),
        num_warps=tuned["num_warps"] if num_warps is None else num_warps,
        num_stages=tuned["num_stages"] if num_stages is None else num_stages,
        interpret=interpret,
    )
