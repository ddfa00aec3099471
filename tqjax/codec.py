"""Cache-level encoding of key and value vectors for a :class:`TurboQuantConfig`.

This is the one place that maps vectors to the words and fp16 scalars stored in a
:class:`tqjax.layout.PagedKVCache` slot, and back. The reference path and the tests use it; the Pallas
kernels reproduce it (and are tested against it).

Scores are computed **in the rotated domain**, as vLLM does: the query is rotated (and, for the QJL
segment, projected) once by :meth:`KeyCodec.prepare_query`; each key segment becomes a "score vector"
in the same domain (centroids times the norm factor, or signed QJL bits times their scale), and
``score = sum over segments <query segment, key segment>``. Keys are never inverse-rotated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tqjax.config import KeySegment, TurboQuantConfig
from tqjax.packing import pack_codes, unpack_codes
from tqjax.quantizers import (
    FP16_MAX,
    TurboQuantMSE,
    TurboQuantProd,
    ValueCode,
    dequantize_values,
    quantize_fp8,
    quantize_values,
)


def fp16_norm(norm: jax.Array) -> jax.Array:
    """A norm as stored in the cache: fp16, saturating at the fp16 maximum instead of becoming inf."""
    return jnp.minimum(norm, FP16_MAX).astype(jnp.float16)


class KeyCodec:
    """Encodes keys ``[..., D]`` into ``(words uint32 [..., key_words], scales f16 [..., n] | None)``."""

    def __init__(self, config: TurboQuantConfig) -> None:
        self.config = config
        self.segments = config.key_segments
        self.quantizers: dict[int, TurboQuantMSE] = {}
        self.prod: TurboQuantProd | None = None
        if config.key_format == "prod":
            self.prod = TurboQuantProd(
                config.head_dim,
                config.key_bits,
                rotation_kind=config.rotation,
                seed=config.seed,
                distribution=config.codebook,
            )
            if self.prod.mse is not None:
                self.quantizers[0] = self.prod.mse
        elif config.key_format in ("mse", "split"):
            for i, seg in enumerate(self.segments):
                self.quantizers[i] = TurboQuantMSE(
                    seg.dim,
                    seg.bits,
                    rotation_kind=config.rotation,
                    seed=seg.rotation_seed,
                    distribution=config.codebook,
                    norm_correction=config.norm_correction,
                )

    # ---- store side --------------------------------------------------------------------------------

    def encode(self, key: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        cfg = self.config
        key = key.astype(jnp.float32)
        if cfg.key_format == "fp8":
            raw = jax.lax.bitcast_convert_type(quantize_fp8(key), jnp.uint8)
            words = jax.lax.bitcast_convert_type(raw.reshape(*raw.shape[:-1], cfg.head_dim // 4, 4), jnp.uint32)
            return words, None
        if cfg.key_format == "prod":
            code = self.prod.quantize(key)
            parts = []
            if self.prod.mse is not None:
                parts.append(pack_codes(code.codes, self.segments[0].bits))
            parts.append(pack_codes(code.signs, 1))
            scales = jnp.stack([fp16_norm(code.norm), fp16_norm(code.residual_norm)], axis=-1)
            return jnp.concatenate(parts, axis=-1), scales
        codes, scales = self.mse_codes(key)
        parts = [pack_codes(c, seg.bits) for c, seg in zip(codes, self.segments)]
        words = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        return words, scales

    def mse_codes(self, key: jax.Array) -> tuple[list[jax.Array], jax.Array]:
        """MSE and split keys ``[..., D]`` float32: each segment's codes uint8 ``[..., seg.dim]`` and the
        stored norms fp16 ``[..., n]`` (with norm correction over ``||c[codes]||``), before packing."""
        codes, norms = [], []
        for i, seg in enumerate(self.segments):
            code = self.quantizers[i].quantize(take_channels(key, seg))
            codes.append(code.codes)
            norms.append(fp16_norm(self.quantizers[i].stored_norm(code)))
        return codes, jnp.stack(norms, axis=-1)

    # ---- decode side -------------------------------------------------------------------------------

    def segment_codes(self, words: jax.Array, seg: KeySegment) -> jax.Array:
        return unpack_codes(words[..., seg.word_start : seg.word_start + seg.num_words], seg.bits, seg.dim)

    def prepare_query(self, query: jax.Array) -> list[jax.Array]:
        """Per-segment query in the segment's score domain, float32 ``[..., seg.dim]`` each."""
        q = query.astype(jnp.float32)
        if self.config.key_format == "fp8":
            return [q]
        if self.config.key_format == "prod":
            q_rot, q_proj = self.prod.prepare_query(q)
            return [q_rot, q_proj] if self.prod.mse is not None else [q_proj]
        return [self.quantizers[i].rotate(take_channels(q, seg)) for i, seg in enumerate(self.segments)]

    def score_vectors(self, words: jax.Array, scales: jax.Array | None) -> list[jax.Array]:
        """Per-segment key vectors in the score domain, float32 ``[..., seg.dim]`` each (norms applied)."""
        cfg = self.config
        if cfg.key_format == "fp8":
            raw = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(*words.shape[:-1], cfg.head_dim)
            return [jax.lax.bitcast_convert_type(raw, jnp.float8_e4m3fn).astype(jnp.float32)]
        scales = scales.astype(jnp.float32)
        if cfg.key_format == "prod":
            norm, gamma = scales[..., 0:1], scales[..., 1]
            out = []
            if self.prod.mse is not None:
                out.append(self.prod.mse.centroid_vectors(self.segment_codes(words, self.segments[0])) * norm)
            signs = self.segment_codes(words, self.segments[-1])
            out.append(self.prod.qjl_vectors(signs, gamma) * norm)
            return out
        return [
            self.quantizers[i].centroid_vectors(self.segment_codes(words, seg)) * scales[..., i : i + 1]
            for i, seg in enumerate(self.segments)
        ]

    def decode(self, words: jax.Array, scales: jax.Array | None) -> jax.Array:
        """Dequantize keys to the original domain, float32 ``[..., D]``."""
        return self.keys_from_score_vectors(self.score_vectors(words, scales), words.shape[:-1])

    def keys_from_score_vectors(self, vecs: list[jax.Array], batch_shape: tuple[int, ...]) -> jax.Array:
        """Keys in the original domain, float32 ``[*batch_shape, D]``, from :meth:`score_vectors`'
        per-segment vectors (inverse rotations, QJL projection, channel placement)."""
        cfg = self.config
        if cfg.key_format == "fp8":
            return vecs[0]
        if cfg.key_format == "prod":
            rotated = jnp.matmul(vecs[-1], self.prod.projection, precision=jax.lax.Precision.HIGHEST)
            if self.prod.mse is not None:
                rotated = rotated + vecs[0]
            return self.prod.rotation.apply_inverse(rotated)
        out = jnp.zeros((*batch_shape, cfg.head_dim), jnp.float32)
        for i, seg in enumerate(self.segments):
            out = out.at[..., np.asarray(seg.channels)].set(self.quantizers[i].rotation.apply_inverse(vecs[i]))
        return out


def take_channels(x: jax.Array, seg: KeySegment) -> jax.Array:
    """The channels of ``x [..., D]`` that key segment ``seg`` quantizes, ``[..., seg.dim]``."""
    if len(seg.channels) == x.shape[-1]:
        return x
    first = seg.channel_run
    if first is not None:
        return x[..., first : first + len(seg.channels)]
    return x[..., np.asarray(seg.channels)]


class ValueCodec:
    """Encodes values ``[..., D]`` into ``(words uint32 [..., value_words], scales f16 [..., 2])``."""

    def __init__(self, config: TurboQuantConfig) -> None:
        self.config = config

    def encode(self, value: jax.Array) -> tuple[jax.Array, jax.Array]:
        code = quantize_values(value, self.config.value_bits)
        return pack_codes(code.codes, self.config.value_bits), jnp.stack([code.scale, code.zero], axis=-1)

    def decode(self, words: jax.Array, scales: jax.Array) -> jax.Array:
        codes = unpack_codes(words, self.config.value_bits, self.config.head_dim)
        return dequantize_values(ValueCode(codes, scales[..., 0], scales[..., 1]))


@functools.lru_cache(maxsize=None)
def key_codec(config: TurboQuantConfig) -> KeyCodec:
    return KeyCodec(config)


@functools.lru_cache(maxsize=None)
def value_codec(config: TurboQuantConfig) -> ValueCodec:
    return ValueCodec(config)
