"""Attention backends behind tqjax's public ops, and how one is chosen.

* :mod:`tqjax.platform`: :func:`detect_platform` -> :class:`Platform` (cuda / rocm / cpu / tpu and
  the arch). Kernel launch parameters per vendor and device: :mod:`tqjax.pallas.tuning`.
* :mod:`tqjax.backends.registry`: :class:`AttentionBackend` (TURBOQUANT: the Pallas kernels, alias
  ``"pallas"``; FLASH: unquantized "auto"/bf16/fp16 caches, Pallas decode; REFERENCE: pure jnp, both
  kinds of cache), their
  declared capabilities (:class:`BackendSpec`), :func:`get_valid_backends` (valid backends in the
  platform's priority order plus every rejection reason), :func:`select_backend` and
  :func:`register_backend` for out-of-tree backends.
* :mod:`tqjax.backends.layers`: :func:`boundary_layer_dtypes` (first/last layers at the native dtype)
  and :func:`layer_backends`.

``tqjax.store`` / ``paged_decode`` / ``dequantize`` take ``backend=None`` (the best valid backend on
this platform for the cache's dtype, head_dim and block size) or a backend name; see
:func:`ops_for_cache`.
"""

from tqjax.backends.layers import NATIVE_DTYPE, boundary_layer_dtypes, layer_backends
from tqjax.backends.registry import (
    ALIASES,
    BLOCK_SIZES,
    AttentionBackend,
    BackendId,
    BackendOps,
    BackendSpec,
    backend_ops,
    get_valid_backends,
    ops_for_cache,
    priority,
    register_backend,
    registered_backends,
    resolve_backend,
    select_backend,
    unregister_backend,
)
from tqjax.platform import PLATFORM_KINDS, Platform, detect_platform, platform_of

__all__ = [
    "ALIASES",
    "BLOCK_SIZES",
    "NATIVE_DTYPE",
    "PLATFORM_KINDS",
    "AttentionBackend",
    "BackendId",
    "BackendOps",
    "BackendSpec",
    "Platform",
    "backend_ops",
    "boundary_layer_dtypes",
    "detect_platform",
    "get_valid_backends",
    "layer_backends",
    "ops_for_cache",
    "platform_of",
    "priority",
    "register_backend",
    "registered_backends",
    "resolve_backend",
    "select_backend",
    "unregister_backend",
]
