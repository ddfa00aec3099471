"""TurboQuant KV-cache presets and the static per-layer configuration.

A preset name (the ``--kv-cache-dtype`` string of vLLM, or one of tqjax's own) plus a head dimension
fully determines how one key and one value vector are encoded, and therefore the cache layout.

Key formats:

* ``fp8``   -- raw float8 e4m3 keys (no rotation, no norm), 4 per uint32 word. vLLM's ``k8v4``.
* ``mse``   -- TurboQuant_mse (paper Alg. 1): rotate the unit key, one Lloyd--Max code per coordinate,
  fp16 key norm. With norm correction (vLLM's ``_nc``) the decoded vector gets the key's norm: the
  cache stores ``||k|| / ||c[codes]||`` in place of ``||k||`` (computed once, when the key is stored),
  so decoding is ``c[codes] * stored`` everywhere. vLLM stores ``||k||`` and renormalises at decode
  time; :mod:`tqjax.vllm_interop` converts between the two.
* ``prod``  -- TurboQuant_prod (paper Alg. 2): (b-1)-bit ``mse`` codes plus a 1-bit QJL sign sketch of
  the rotated residual, fp16 key norm and fp16 residual norm. Inner products are unbiased.
* ``split`` -- the paper's outlier-channel split: half of the channels (``outlier_channels``) at b+1
  bits and the other half at b bits, each half an independent TurboQuant_mse (own rotation, own fp16
  norm, norm-corrected), so the key costs b + 0.5 bits per channel.

Values are always asymmetric uniform per vector (b bits, fp16 scale and zero), unrotated.

Native (unquantized) caches: :data:`NATIVE_KV_CACHE_DTYPES` ("auto", "bfloat16", "float16") keep K and
V as plain 2-byte floats, described by :class:`NativeConfig`; :func:`cache_config` maps any
``--kv-cache-dtype`` name (native or TurboQuant) to its config.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import ml_dtypes  # a jax dependency: numpy's bfloat16
import numpy as np

from tqjax.rotation import default_rotation_kind

KeyFormat = Literal["fp8", "mse", "prod", "split"]
SegmentKind = Literal["fp8", "mse", "qjl"]

MIN_HEAD_DIM = 32
MAX_HEAD_DIM = 512
WORD_BITS = 32


@dataclasses.dataclass(frozen=True)
class Preset:
    """Head-dimension independent description of a KV-cache dtype."""

    key_format: KeyFormat
    key_bits: int  # fp8: 8; mse: b; prod: b total ((b-1) MSE + 1 QJL); split: b (outliers at b+1)
    value_bits: int
    norm_correction: bool
    vllm: bool  # a preset vLLM ships under the same name (byte-compatible, see tqjax.vllm_interop)
    description: str


PRESETS: dict[str, Preset] = {
    "turboquant_k8v4": Preset("fp8", 8, 4, False, True, "fp8 e4m3 keys, 4-bit values"),
    "turboquant_4bit_nc": Preset("mse", 4, 4, True, True, "4-bit MSE keys (norm-corrected), 4-bit values"),
    "turboquant_k3v4_nc": Preset("mse", 3, 4, True, True, "3-bit MSE keys (norm-corrected), 4-bit values"),
    "turboquant_3bit_nc": Preset("mse", 3, 3, True, True, "3-bit MSE keys (norm-corrected), 3-bit values"),
    "turboquant_kqjl4v4": Preset(
        "prod", 4, 4, False, False, "TurboQuant_prod keys: 3-bit MSE + 1-bit QJL (unbiased), 4-bit values"
    ),
    "turboquant_kqjl3v4": Preset(
        "prod", 3, 4, False, False, "TurboQuant_prod keys: 2-bit MSE + 1-bit QJL (unbiased), 4-bit values"
    ),
    "turboquant_k3p5v4": Preset(
        "split", 3, 4, True, False, "outlier split keys: half the channels 4-bit, half 3-bit; 4-bit values"
    ),
    "turboquant_k2p5v4": Preset(
        "split", 2, 4, True, False, "outlier split keys: half the channels 3-bit, half 2-bit; 4-bit values"
    ),
}


@dataclasses.dataclass(frozen=True)
class KeySegment:
    """One independently encoded piece of a key vector, stored at ``words[word_start:word_start+num_words]``.

    ``channels`` are the original (unrotated) channels the segment covers; ``rotation_seed`` seeds its
    rotation (``dim = len(channels)``). A ``qjl`` segment sketches the residual of the ``mse`` segment
    before it and has no channels/rotation of its own.
    """

    kind: SegmentKind
    bits: int
    dim: int
    word_start: int
    num_words: int
    channels: tuple[int, ...]
    rotation_seed: int

    @property
    def channel_run(self) -> int | None:
        """The first channel when ``channels`` are one run of consecutive channels (read as a slice),
        else None (a gather)."""
        first = self.channels[0] if self.channels else 0
        return first if self.channels == tuple(range(first, first + len(self.channels))) else None


@dataclasses.dataclass(frozen=True)
class TurboQuantConfig:
    """Static description of one layer's quantized KV cache. Hashable: safe as a jit static argument.

    Build it with :meth:`from_cache_dtype`. ``outlier_channels`` (split presets only) are the channels
    stored at the higher precision; the default is the first half, :func:`calibrate_outlier_channels`
    picks them from data.
    """

    name: str
    head_dim: int
    key_format: KeyFormat
    key_bits: int
    value_bits: int
    norm_correction: bool
    rotation: str
    codebook: Literal["beta", "gaussian"] = "beta"
    seed: int = 0
    outlier_channels: tuple[int, ...] = ()

    @classmethod
    def from_cache_dtype(
        cls,
        name: str,
        head_dim: int,
        *,
        seed: int = 0,
        rotation: str | None = None,
        codebook: Literal["beta", "gaussian"] = "beta",
        outlier_channels: tuple[int, ...] | None = None,
    ) -> TurboQuantConfig:
        """Config for KV-cache dtype ``name`` (a key of :data:`PRESETS`) at ``head_dim``.

        Raises ValueError for an unknown name (listing the valid ones) or an unsupported head_dim.
        """
        if name not in PRESETS:
            raise ValueError(
                f"unknown kv_cache_dtype {name!r}; valid TurboQuant dtypes: {', '.join(sorted(PRESETS))}"
            )
        preset = PRESETS[name]
        check_head_dim(head_dim, preset.key_format)
        if preset.key_format == "split":
            if outlier_channels is None:
                outlier_channels = tuple(range(head_dim // 2))
            outlier_channels = tuple(int(c) for c in outlier_channels)
            if len(outlier_channels) != head_dim // 2 or len(set(outlier_channels)) != len(outlier_channels):
                raise ValueError(
                    f"outlier_channels must be {head_dim // 2} distinct channel indices (half of head_dim)"
                )
            if min(outlier_channels) < 0 or max(outlier_channels) >= head_dim:
                raise ValueError(f"outlier_channels must lie in [0, {head_dim})")
            outlier_channels = tuple(sorted(outlier_channels))
        elif outlier_channels:
            raise ValueError(f"outlier_channels only applies to split presets, not {name!r}")
        else:
            outlier_channels = ()
        if codebook not in ("beta", "gaussian"):
            raise ValueError(f"codebook must be 'beta' or 'gaussian', got {codebook!r}")
        seg_dim = head_dim // 2 if preset.key_format == "split" else head_dim
        return cls(
            name=name,
            head_dim=int(head_dim),
            key_format=preset.key_format,
            key_bits=preset.key_bits,
            value_bits=preset.value_bits,
            norm_correction=preset.norm_correction,
            rotation=rotation or default_rotation_kind(seg_dim),
            codebook=codebook,
            seed=seed,
            outlier_channels=outlier_channels,
        )

    # ---- key encoding layout -------------------------------------------------------------------

    @property
    def key_segments(self) -> tuple[KeySegment, ...]:
        d = self.head_dim
        every = tuple(range(d))
        if self.key_format == "fp8":
            return (KeySegment("fp8", 8, d, 0, d * 8 // WORD_BITS, every, self.seed),)
        if self.key_format == "mse":
            return (KeySegment("mse", self.key_bits, d, 0, d * self.key_bits // WORD_BITS, every, self.seed),)
        if self.key_format == "prod":
            b = self.key_bits - 1
            n_mse = d * b // WORD_BITS
            return (
                KeySegment("mse", b, d, 0, n_mse, every, self.seed),
                KeySegment("qjl", 1, d, n_mse, d // WORD_BITS, every, self.seed),
            )
        hi = self.outlier_channels
        lo = tuple(c for c in every if c not in set(hi))
        n_hi = len(hi) * (self.key_bits + 1) // WORD_BITS
        return (
            KeySegment("mse", self.key_bits + 1, len(hi), 0, n_hi, hi, self.seed),
            KeySegment("mse", self.key_bits, len(lo), n_hi, len(lo) * self.key_bits // WORD_BITS, lo, self.seed + 1),
        )

    @property
    def key_words(self) -> int:
        """uint32 words of packed key codes per token per KV head."""
        return sum(s.num_words for s in self.key_segments)

    @property
    def key_scale_count(self) -> int:
        """fp16 scalars per token per KV head stored beside the key codes.

        fp8: none; mse: [norm]; prod: [norm, residual_norm]; split: [norm_outliers, norm_rest].
        """
        return {"fp8": 0, "mse": 1, "prod": 2, "split": 2}[self.key_format]

    @property
    def value_words(self) -> int:
        return self.head_dim * self.value_bits // WORD_BITS

    value_scale_count = 2  # [scale, zero], fp16

    # ---- memory accounting -----------------------------------------------------------------------

    @property
    def key_bytes(self) -> int:
        return 4 * self.key_words + 2 * self.key_scale_count

    @property
    def value_bytes(self) -> int:
        return 4 * self.value_words + 2 * self.value_scale_count

    @property
    def slot_bytes(self) -> int:
        """Bytes per token per KV head, everything included (codes, norms, scales)."""
        return self.key_bytes + self.value_bytes

    @property
    def compression_vs_bf16(self) -> float:
        return 2 * 2 * self.head_dim / self.slot_bytes

    @property
    def key_bits_per_channel(self) -> float:
        return 32 * self.key_words / self.head_dim


def check_head_dim(head_dim: int, key_format: KeyFormat = "mse") -> None:
    """Raise ValueError unless ``head_dim`` is supported for ``key_format``.

    Codes are packed in whole uint32 words per vector with no waste, which needs head_dim % 32 == 0
    (each 1-, 2-, 4- or 8-bit field of a vector then fills whole words); the split format quantizes two
    halves separately, so each half must be a multiple of 32 as well.
    """
    multiple = 64 if key_format == "split" else 32
    if (
        not isinstance(head_dim, (int, np.integer))
        or head_dim % multiple
        or not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM
    ):
        why = (
            "codes are packed in whole uint32 words per vector (head_dim % 32 == 0)"
            + ("; the split format packs each half separately (head_dim % 64 == 0)" if multiple == 64 else "")
        )
        raise ValueError(
            f"unsupported head_dim {head_dim!r} for {key_format} keys: supported are multiples of {multiple} "
            f"in [{max(MIN_HEAD_DIM, multiple)}, {MAX_HEAD_DIM}], because {why}"
        )


def preset_table(head_dim: int = 128) -> list[dict[str, object]]:
    """Rows describing every preset at ``head_dim``: bytes per token per KV head and compression."""
    rows = []
    for name, preset in PRESETS.items():
        cfg = TurboQuantConfig.from_cache_dtype(name, head_dim)
        rows.append(
            dict(
                name=name,
                key_bytes=cfg.key_bytes,
                value_bytes=cfg.value_bytes,
                slot_bytes=cfg.slot_bytes,
                compression_vs_bf16=round(cfg.compression_vs_bf16, 2),
                vllm=preset.vllm,
                description=preset.description,
            )
        )
    return rows


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# ---- native (unquantized) caches ---------------------------------------------------------------------

#: Unquantized KV-cache dtypes and the element dtype they store. "auto" is vLLM's "the model's dtype";
#: tqjax stores it as bfloat16, the dtype real models are served in (a float32 cache would double the
#: memory and break the 2-byte element rule of :mod:`tqjax.layout`).
NATIVE_KV_CACHE_DTYPES: dict[str, str] = {"auto": "bfloat16", "bfloat16": "bfloat16", "float16": "float16"}


@dataclasses.dataclass(frozen=True)
class NativeConfig:
    """Static description of one layer's unquantized cache (K and V stored as 2-byte floats).

    Hashable (a jit static argument), with the accounting properties of :class:`TurboQuantConfig`
    (``slot_bytes`` etc.) so memory planning treats both kinds alike. Build it with
    :meth:`from_cache_dtype` or :func:`cache_config`.
    """

    name: str
    head_dim: int

    @classmethod
    def from_cache_dtype(cls, name: str, head_dim: int) -> NativeConfig:
        """Config for native dtype ``name`` (a key of :data:`NATIVE_KV_CACHE_DTYPES`) at ``head_dim`` (any
        positive int; backends add their own limits)."""
        if name not in NATIVE_KV_CACHE_DTYPES:
            raise ValueError(
                f"unknown native kv_cache_dtype {name!r}; valid native dtypes: {', '.join(NATIVE_KV_CACHE_DTYPES)}"
            )
        if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)) or head_dim <= 0:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        return cls(name=name, head_dim=int(head_dim))

    @property
    def dtype(self) -> np.dtype:
        """Element dtype of the K and V arrays (bfloat16 or float16)."""
        return np.dtype(ml_dtypes.bfloat16) if NATIVE_KV_CACHE_DTYPES[self.name] == "bfloat16" else np.dtype(np.float16)

    @property
    def key_bytes(self) -> int:
        return self.head_dim * self.dtype.itemsize

    @property
    def value_bytes(self) -> int:
        return self.head_dim * self.dtype.itemsize

    @property
    def slot_bytes(self) -> int:
        """Bytes per token per KV head (K and V): ``2 * 2 * head_dim``."""
        return self.key_bytes + self.value_bytes

    @property
    def compression_vs_bf16(self) -> float:
        return 2 * 2 * self.head_dim / self.slot_bytes


CacheConfig = TurboQuantConfig | NativeConfig


def kv_cache_dtype_names() -> list[str]:
    """Every valid ``kv_cache_dtype``: the native ones, then the TurboQuant presets."""
    return list(NATIVE_KV_CACHE_DTYPES) + list(PRESETS)


def cache_config(kv_cache_dtype: str, head_dim: int) -> CacheConfig:
    """The config of any ``kv_cache_dtype``: a :class:`NativeConfig` for "auto"/"bfloat16"/"float16", a
    :class:`TurboQuantConfig` (default options) for a TurboQuant preset.

    Raises ValueError for an unknown name (listing every valid one) or an unsupported head_dim.
    """
    if kv_cache_dtype in NATIVE_KV_CACHE_DTYPES:
        return NativeConfig.from_cache_dtype(kv_cache_dtype, head_dim)
    if kv_cache_dtype in PRESETS:
        return TurboQuantConfig.from_cache_dtype(kv_cache_dtype, head_dim)
    raise ValueError(
        f"unknown kv_cache_dtype {kv_cache_dtype!r}; valid: native {', '.join(NATIVE_KV_CACHE_DTYPES)}; "
        f"TurboQuant {', '.join(PRESETS)}"
    )
