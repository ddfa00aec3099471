"""Per-layer KV-cache dtypes: keep the first and last layers at the native dtype.

The first and last layers of a transformer are the most sensitive to KV-cache quantization, so a
serving stack may keep ``n`` boundary layers at each end at the model's native dtype ("auto", vLLM's
name for it; a bfloat16 :class:`tqjax.layout.NativePagedKVCache`) and quantize the rest. Those layers
then route to a non-quantized backend (FLASH on a GPU, REFERENCE elsewhere) through the same registry
as every other layer (:func:`layer_backends`); :class:`tqjax.nn.TransformerLM` takes the list of
:func:`boundary_layer_dtypes` as its ``kv_cache_dtypes``.

Cap: at most half of the layers may stay native (``4 * n <= num_layers``: ``n`` at each end).
Asking for more raises ValueError rather than clamping: the cache would silently be much larger than
the requested dtype promises, which breaks capacity planning; the error says the largest valid ``n``.
"""

from __future__ import annotations

from tqjax.platform import Platform, detect_platform
from tqjax.backends.registry import BackendId, select_backend

NATIVE_DTYPE = "auto"


def boundary_layer_dtypes(kv_cache_dtype: str, num_layers: int, num_boundary_layers: int) -> list[str]:
    """KV-cache dtype of each of ``num_layers`` layers: the first and the last ``num_boundary_layers``
    at :data:`NATIVE_DTYPE`, the others at ``kv_cache_dtype``.

    Raises ValueError for non-positive ``num_layers``, negative ``num_boundary_layers``, or boundary
    layers that would be more than half of the layers.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    n = num_boundary_layers
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"num_boundary_layers must be a non-negative int, got {n!r}")
    if 4 * n > num_layers:
        raise ValueError(
            f"num_boundary_layers={n} would keep {min(2 * n, num_layers)} of {num_layers} layers at the native "
            f"dtype; at most half of the layers may stay unquantized, i.e. num_boundary_layers <= "
            f"{num_layers // 4} for {num_layers} layers"
        )
    return [NATIVE_DTYPE if i < n or i >= num_layers - n else kv_cache_dtype for i in range(num_layers)]


def layer_backends(
    kv_cache_dtype: str,
    head_dim: int,
    block_size: int,
    num_layers: int,
    num_boundary_layers: int = 0,
    *,
    platform: Platform | None = None,
    need_grad: bool = False,
) -> list[BackendId]:
    """The selected backend of each layer (see :func:`boundary_layer_dtypes` and
    :func:`~tqjax.backends.registry.select_backend`); raises ValueError if some layer has none."""
    platform = detect_platform() if platform is None else platform
    dtypes = boundary_layer_dtypes(kv_cache_dtype, num_layers, num_boundary_layers)
    chosen = {
        dtype: select_backend(dtype, head_dim, block_size, platform=platform, need_grad=need_grad)
        for dtype in dict.fromkeys(dtypes)
    }
    return [chosen[dtype] for dtype in dtypes]
