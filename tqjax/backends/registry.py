"""The attention-backend registry: declared capabilities, per-platform priorities, validation, selection.

A backend is a :class:`BackendSpec`: what it supports (KV-cache dtypes, head dims, block sizes,
platforms, gradients, plus an optional per-arch rule) and a factory of its functions
(:class:`BackendOps`). Selection never short-cuts on the dtype: :func:`get_valid_backends` walks the
platform's priority list, then every other registered backend, and validates each against *all* of
its declared capabilities, so every rejected backend comes back with every reason it was rejected.

Built-in backends (:class:`AttentionBackend`) and their priority per platform:

=========  ==================================  ==========================================
platform   priority                            note
=========  ==================================  ==========================================
cuda       TURBOQUANT, FLASH, REFERENCE        same list and validation on both vendors
rocm       TURBOQUANT, FLASH, REFERENCE        Triton lowering (ROCm has no Mosaic GPU)
cpu        REFERENCE                           TURBOQUANT is rejected: interpret mode only
tpu        REFERENCE                           the kernels target Triton, not Mosaic TPU
=========  ==================================  ==========================================

KV-cache dtypes: TURBOQUANT serves the TurboQuant presets (:class:`tqjax.layout.PagedKVCache`), FLASH
the native dtypes "auto" / "bfloat16" / "float16" (:class:`tqjax.layout.NativePagedKVCache`), REFERENCE
both. So on a GPU a model with native boundary layers runs them on FLASH and the others on TURBOQUANT;
on a CPU or TPU everything runs on REFERENCE.

Backend ids: a built-in is an :class:`AttentionBackend` member, an out-of-tree backend the name it was
registered under. ``AttentionBackend`` is a ``StrEnum``, so ``AttentionBackend.TURBOQUANT ==
"turboquant"``; lookups are case-insensitive and accept the alias ``"pallas"`` for TURBOQUANT.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax

from tqjax import reference
from tqjax.config import (
    NATIVE_KV_CACHE_DTYPES,
    PRESETS,
    KeyFormat,
    check_head_dim,
    is_power_of_two,
)
from tqjax.layout import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, KVCache
from tqjax.pallas import decode as pallas_decode
from tqjax.pallas import dequant as pallas_dequant
from tqjax.pallas import flash_decode as pallas_flash_decode
from tqjax.pallas import store as pallas_store
from tqjax.pallas.tuning import store_params
from tqjax.platform import PLATFORM_KINDS, Platform, detect_platform


class AttentionBackend(enum.StrEnum):
    """The built-in backends.

    * TURBOQUANT: the Pallas kernels (``tqjax.pallas.store.store``: fused quantize+store;
      ``tqjax.pallas.decode.paged_decode``: split-KV paged decode) over a TurboQuant cache; CUDA and
      ROCm. Dequantization uses the XLA path.
    * FLASH: plain attention over an unquantized ("auto"/bf16/fp16) cache
      (:class:`tqjax.layout.NativePagedKVCache`), the route of layers kept at the native dtype; CUDA
      and ROCm. Store: the XLA scatter of the reference (in place, the cache donated); decode:
      ``tqjax.pallas.flash_decode.paged_decode`` (split-KV, bf16/fp16 tensor-core products, fp32
      online softmax); dequantize: the reference (a gather and an upcast).
    * REFERENCE: the pure-jnp XLA path (``tqjax.reference``) for TurboQuant and native caches; every
      platform, differentiable, the ground truth.
    """

    TURBOQUANT = "turboquant"
    FLASH = "flash"
    REFERENCE = "reference"


BackendId = AttentionBackend | str

#: Other accepted names of built-in backends.
ALIASES: dict[str, AttentionBackend] = {"pallas": AttentionBackend.TURBOQUANT}

#: Block sizes the paged cache accepts (``tqjax.layout.check_addressable``): powers of two in [8, 256].
BLOCK_SIZES = frozenset(1 << k for k in range(MIN_BLOCK_SIZE.bit_length() - 1, MAX_BLOCK_SIZE.bit_length()))


class BackendOps(NamedTuple):
    """A backend's functions, with the signatures and semantics of :mod:`tqjax.reference`:

    * ``store(cache, key [N, Hk, D], value [N, Hk, D], slot_mapping [N] int32) -> cache`` (a
      :class:`~tqjax.layout.PagedKVCache` or :class:`~tqjax.layout.NativePagedKVCache`, as given)
      (the cache is donated);
    * ``paged_decode(query [B, Hq, D], cache, block_tables [B, max_blocks] int32, seq_lens [B] int32,
      *, scale, softcap) -> [B, Hq, D]`` in the query's dtype;
    * ``dequantize(cache, block_tables, seq_lens) -> (K, V)``, float32 ``[B, max_blocks * block_size,
      Hk, D]`` each.
    """

    store: Callable[..., KVCache]
    paged_decode: Callable[..., jax.Array]
    dequantize: Callable[..., tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """What a backend supports, and how to get its functions.

    * ``kv_cache_dtypes``: the ``--kv-cache-dtype`` names it serves.
    * ``head_dim_rule(kv_cache_dtype, head_dim)``: None if supported, else the reason (a sentence
      naming the head_dim).
    * ``block_sizes``, ``platforms`` (kinds of :class:`~tqjax.backends.platform.Platform`).
    * ``differentiable``: whether it has gradients (can be used for training, ``need_grad=True``).
    * ``ops(platform)``: its :class:`BackendOps` on ``platform``; None for a backend that is declared
      but not implemented yet (selecting it for execution raises NotImplementedError).
    * ``platform_rule(platform, kv_cache_dtype)``: an extra arch-specific constraint on a supported
      platform (None if fine, else the reason); ``platform_notes[kind]``: why an unsupported platform
      kind is unsupported, appended to that rejection.
    """

    description: str
    kv_cache_dtypes: frozenset[str]
    head_dim_rule: Callable[[str, int], str | None]
    block_sizes: frozenset[int]
    platforms: frozenset[str]
    differentiable: bool
    ops: Callable[[Platform], BackendOps] | None = None
    platform_rule: Callable[[Platform, str], str | None] | None = None
    platform_notes: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.platforms) - set(PLATFORM_KINDS)
        if unknown:
            raise ValueError(f"unknown platform kinds {sorted(unknown)}; known: {', '.join(PLATFORM_KINDS)}")

    def rejections(
        self, kv_cache_dtype: str, head_dim: int, block_size: int, platform: Platform, need_grad: bool
    ) -> list[str]:
        """Every reason this backend cannot serve the request (empty: it can)."""
        reasons: list[str | None] = []
        if platform.kind not in self.platforms:
            note = self.platform_notes.get(platform.kind)
            reasons.append(
                f"platform {platform.kind} not supported (supported: {', '.join(sorted(self.platforms))})"
                + (f": {note}" if note else "")
            )
        elif self.platform_rule is not None:
            reasons.append(self.platform_rule(platform, kv_cache_dtype))
        if kv_cache_dtype not in self.kv_cache_dtypes:
            reasons.append(
                f"kv_cache_dtype {kv_cache_dtype!r} not supported "
                f"(supported: {', '.join(sorted(self.kv_cache_dtypes))})"
            )
        reasons.append(self.head_dim_rule(kv_cache_dtype, head_dim))
        if block_size not in self.block_sizes:
            reasons.append(
                f"block_size {block_size!r} not supported (supported: {', '.join(map(str, sorted(self.block_sizes)))})"
            )
        if need_grad and not self.differentiable:
            reasons.append("no gradients (need_grad=True): it is inference-only")
        return [r for r in reasons if r is not None]


# ---- the built-in backends -----------------------------------------------------------------------------


def _key_format(kv_cache_dtype: str) -> KeyFormat:
    preset = PRESETS.get(kv_cache_dtype)
    return "mse" if preset is None else preset.key_format


def _packing_rule(kv_cache_dtype: str, head_dim: int) -> str | None:
    """The cache format's own head_dim rule (:func:`tqjax.config.check_head_dim`; a native cache takes
    any positive head_dim)."""
    if kv_cache_dtype in NATIVE_KV_CACHE_DTYPES:
        if isinstance(head_dim, int) and not isinstance(head_dim, bool) and head_dim > 0:
            return None
        return f"head_dim {head_dim!r} not supported: must be a positive int"
    try:
        check_head_dim(head_dim, _key_format(kv_cache_dtype))
    except ValueError as exc:
        return str(exc)
    return None


def _pallas_head_dim_rule(kv_cache_dtype: str, head_dim: int) -> str | None:
    why = _packing_rule(kv_cache_dtype, head_dim)
    if why is None and not is_power_of_two(head_dim):
        why = (
            f"head_dim {head_dim} not supported: the Pallas store needs a power of two "
            f"(its in-kernel tiles are power-of-two shapes)"
        )
    return why


def _flash_head_dim_rule(kv_cache_dtype: str, head_dim: int) -> str | None:
    return pallas_flash_decode.head_dim_problem(head_dim)


def _pallas_fp8_rule(platform: Platform, kv_cache_dtype: str) -> str | None:
    """fp8 keys (``turboquant_k8v4``) are OCP float8_e4m3fn bytes (vLLM's format) that the decode
    kernel converts in Triton: that needs a GPU whose fp8 is e4m3fn."""
    if _key_format(kv_cache_dtype) != "fp8" or platform.fp8_e4m3 == "fn":
        return None
    if platform.fp8_e4m3 == "fnuz":
        return (
            f"kv_cache_dtype {kv_cache_dtype!r} not supported on {platform.arch}: its keys are OCP "
            f"float8_e4m3fn, but {platform.arch}'s fp8 is e4m3fnuz, which the Pallas Triton lowering "
            f"refuses to cast (the reference backend decodes these keys in XLA)"
        )
    return (
        f"kv_cache_dtype {kv_cache_dtype!r} not supported on {platform}: the decode kernel casts "
        f"float8_e4m3fn keys, which the Pallas Triton lowering supports only on NVIDIA sm89+ and AMD "
        f"gfx950/gfx12"
    )


def _turboquant_ops(platform: Platform) -> BackendOps:
    # The decode kernel takes its launch parameters from tqjax.pallas.tuning (measured per device
    # kind and preset) when it is called; the store's depend only on the vendor.
    return BackendOps(
        store=functools.partial(pallas_store.store, **store_params(platform)),
        paged_decode=pallas_decode.paged_decode,
        dequantize=pallas_dequant.dequantize,
    )


def _flash_ops(platform: Platform) -> BackendOps:
    # The decode kernel takes its launch parameters from tqjax.pallas.tuning when it is called. The
    # store is a plain scatter (nothing to quantize): XLA's, jitted with the cache donated.
    return BackendOps(
        store=reference.store_jit,
        paged_decode=pallas_flash_decode.paged_decode,
        dequantize=reference.dequantize_jit,
    )


def _reference_ops(platform: Platform) -> BackendOps:
    return BackendOps(
        store=reference.store_jit, paged_decode=reference.paged_decode_jit, dequantize=reference.dequantize_jit
    )


_GPUS = frozenset({"cuda", "rocm"})

_REGISTRY: dict[BackendId, BackendSpec] = {
    AttentionBackend.TURBOQUANT: BackendSpec(
        description="TurboQuant Pallas kernels (tqjax.pallas.store.store, tqjax.pallas.decode.paged_decode, "
        "tqjax.pallas.dequant.dequantize)",
        kv_cache_dtypes=frozenset(PRESETS),
        head_dim_rule=_pallas_head_dim_rule,
        block_sizes=BLOCK_SIZES,
        platforms=_GPUS,
        differentiable=False,
        ops=_turboquant_ops,
        platform_rule=_pallas_fp8_rule,
        platform_notes={
            "cpu": "the Pallas kernels run on a CPU only in interpret mode (for tests, not speed); call "
            "tqjax.pallas.store.store / tqjax.pallas.decode.paged_decode with interpret=True",
            "tpu": "the kernels are written for Pallas' Triton lowering, not Mosaic TPU",
        },
    ),
    AttentionBackend.FLASH: BackendSpec(
        description="plain attention over an unquantized (auto/bf16/fp16) cache (XLA store, "
        "tqjax.pallas.flash_decode.paged_decode, reference dequantize)",
        kv_cache_dtypes=frozenset(NATIVE_KV_CACHE_DTYPES),
        head_dim_rule=_flash_head_dim_rule,
        block_sizes=BLOCK_SIZES,
        platforms=_GPUS,
        differentiable=False,
        ops=_flash_ops,
        platform_notes={
            "cpu": "the Pallas decode runs on a CPU only in interpret mode (for tests, not speed); call "
            "tqjax.pallas.flash_decode.paged_decode with interpret=True",
            "tpu": "the kernel is written for Pallas' Triton lowering, not Mosaic TPU",
        },
    ),
    AttentionBackend.REFERENCE: BackendSpec(
        description="pure-jnp XLA reference (tqjax.reference)",
        kv_cache_dtypes=frozenset(PRESETS) | frozenset(NATIVE_KV_CACHE_DTYPES),
        head_dim_rule=_packing_rule,
        block_sizes=BLOCK_SIZES,
        platforms=frozenset(PLATFORM_KINDS),
        differentiable=True,
        ops=_reference_ops,
    ),
}

_TQ, _FLASH, _REF = AttentionBackend.TURBOQUANT, AttentionBackend.FLASH, AttentionBackend.REFERENCE
_PRIORITY: dict[str, list[BackendId]] = {
    "cuda": [_TQ, _FLASH, _REF],
    "rocm": [_TQ, _FLASH, _REF],
    "cpu": [_REF],
    "tpu": [_REF],
}


# ---- registration --------------------------------------------------------------------------------------


def registered_backends() -> dict[BackendId, BackendSpec]:
    """A copy of the registry: backend id -> spec, in registration order."""
    return dict(_REGISTRY)


def priority(platform_kind: str) -> list[BackendId]:
    """The priority list of ``platform_kind`` (a copy); other registered backends are tried after it."""
    if platform_kind not in _PRIORITY:
        raise ValueError(f"unknown platform kind {platform_kind!r}; known: {', '.join(PLATFORM_KINDS)}")
    return list(_PRIORITY[platform_kind])


def resolve_backend(backend: str) -> BackendId:
    """The registered id named ``backend`` (case-insensitive; ``"pallas"`` is TURBOQUANT).

    Raises ValueError naming every registered backend if there is none.
    """
    name = str(backend).lower()
    if name in ALIASES:
        return ALIASES[name]
    for key in _REGISTRY:
        if key == name:
            return key
    names = ", ".join(
        f"{key} (alias: {', '.join(a for a, k in ALIASES.items() if k == key)})"
        if key in ALIASES.values()
        else str(key)
        for key in _REGISTRY
    )
    raise ValueError(f"unknown backend {backend!r}; registered backends: {names}")


def register_backend(name: str, spec: BackendSpec, *, before: str | None = None) -> str:
    """Register an out-of-tree backend under ``name`` (lower-cased; returned).

    It joins the priority list of every platform kind in ``spec.platforms``, just before ``before``
    (a registered backend; where that one is not in a platform's list, or ``before`` is None: at the
    end), and can be chosen explicitly by name everywhere. Raises ValueError if the name is taken.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty str, got {name!r}")
    if not isinstance(spec, BackendSpec):
        raise TypeError(f"spec must be a BackendSpec, got {type(spec).__name__}")
    key = name.lower()
    if key in ALIASES or key in _REGISTRY:
        raise ValueError(f"backend name {name!r} is already taken")
    anchor = None if before is None else resolve_backend(before)
    _REGISTRY[key] = spec
    for kind in PLATFORM_KINDS:
        if kind in spec.platforms:
            order = _PRIORITY[kind]
            order.insert(order.index(anchor) if anchor in order else len(order), key)
    return key


def unregister_backend(name: str) -> None:
    """Remove an out-of-tree backend (built-ins cannot be removed)."""
    key = resolve_backend(name)
    if key in frozenset(AttentionBackend):
        raise ValueError(f"built-in backend {str(key)!r} cannot be unregistered")
    del _REGISTRY[key]
    for order in _PRIORITY.values():
        if key in order:
            order.remove(key)


# ---- validation and selection --------------------------------------------------------------------------


def _request(kv_cache_dtype: str, head_dim: int, block_size: int, platform: Platform, need_grad: bool) -> str:
    grad = ", need_grad=True" if need_grad else ""
    return f"kv_cache_dtype={kv_cache_dtype!r}, head_dim={head_dim!r}, block_size={block_size!r}{grad} on {platform}"


def get_valid_backends(
    kv_cache_dtype: str,
    head_dim: int,
    block_size: int,
    *,
    platform: Platform | None = None,
    need_grad: bool = False,
) -> tuple[list[BackendId], dict[BackendId, list[str]]]:
    """(valid backends in priority order, {rejected backend: its reasons}) for one layer's cache.

    Walks ``platform``'s priority list (default: :func:`detect_platform`), then every other registered
    backend, validating each against all of its declared capabilities.
    """
    platform = detect_platform() if platform is None else platform
    order = _PRIORITY[platform.kind] + [key for key in _REGISTRY if key not in _PRIORITY[platform.kind]]
    valid: list[BackendId] = []
    rejected: dict[BackendId, list[str]] = {}
    for key in order:
        reasons = _REGISTRY[key].rejections(kv_cache_dtype, head_dim, block_size, platform, need_grad)
        if reasons:
            rejected[key] = reasons
        else:
            valid.append(key)
    return valid, rejected


def select_backend(
    kv_cache_dtype: str,
    head_dim: int,
    block_size: int,
    *,
    platform: Platform | None = None,
    need_grad: bool = False,
    backend: str | None = None,
) -> BackendId:
    """The backend to use: ``backend`` if given (validated), else the first valid one.

    Raises ValueError for an unknown name, for an explicit backend that cannot serve the request
    (listing its reasons) and when no backend can (listing every backend's reasons).
    """
    platform = detect_platform() if platform is None else platform
    request = _request(kv_cache_dtype, head_dim, block_size, platform, need_grad)
    if backend is not None:
        key = resolve_backend(backend)
        reasons = _REGISTRY[key].rejections(kv_cache_dtype, head_dim, block_size, platform, need_grad)
        if reasons:
            label = repr(str(backend)) + ("" if key == str(backend).lower() else f" ({key})")
            raise ValueError(f"backend {label} cannot serve {request}: " + "; ".join(reasons))
        return key
    valid, rejected = get_valid_backends(kv_cache_dtype, head_dim, block_size, platform=platform, need_grad=need_grad)
    if not valid:
        raise ValueError(
            f"no attention backend can serve {request}:"
            + "".join(f"\n  {key}: {'; '.join(reasons)}" for key, reasons in rejected.items())
        )
    return valid[0]


def backend_ops(backend: BackendId, platform: Platform | None = None) -> BackendOps:
    """The functions of ``backend`` on ``platform`` (default: this machine's).

    Raises NotImplementedError for a backend that is declared but not implemented (``ops=None``).
    """
    key = resolve_backend(backend)
    spec = _REGISTRY[key]
    if spec.ops is None:
        raise NotImplementedError(f"backend {str(key)!r} ({spec.description}) is not implemented yet")
    return spec.ops(detect_platform() if platform is None else platform)


def ops_for_cache(cache: KVCache, backend: str | None = None, *, platform: Platform | None = None) -> BackendOps:
    """Select (``backend=None``: the best valid) and return the functions that serve ``cache``."""
    platform = detect_platform() if platform is None else platform
    cfg = cache.config
    key = select_backend(cfg.name, cfg.head_dim, cache.block_size, platform=platform, backend=backend)
    return backend_ops(key, platform)
