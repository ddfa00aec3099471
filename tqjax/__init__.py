"""tqjax: TurboQuant KV-cache quantization for JAX, with Pallas kernels.

Public functional API (stable): :class:`TurboQuantConfig`, :data:`PRESETS`, :class:`TurboQuantMSE`,
:class:`TurboQuantProd`, :func:`lloyd_max_codebook`, :func:`rotation`, :class:`PagedKVCache`,
:func:`store`, :func:`paged_decode`, :func:`dequantize`, :func:`prefill_attention`. Unquantized
("auto"/"bfloat16"/"float16") caches: :class:`NativePagedKVCache`, :class:`NativeConfig`;
:func:`allocate_kv_cache` and :func:`cache_config` take any kv_cache_dtype name.
"""

from tqjax.codebooks import Codebook, lloyd_max_codebook
from tqjax.config import NATIVE_KV_CACHE_DTYPES, PRESETS, NativeConfig, TurboQuantConfig, cache_config
from tqjax.layout import NativePagedKVCache, PagedKVCache, allocate_kv_cache, tokens_in_budget
from tqjax.ops import dequantize, paged_decode, prefill_attention, store
from tqjax.quantizers import TurboQuantMSE, TurboQuantProd, dequantize_values, quantize_values
from tqjax.rotation import Rotation, rotation

__version__ = "0.1.0"

__all__ = [
    "Codebook",
    "NATIVE_KV_CACHE_DTYPES",
    "NativeConfig",
    "NativePagedKVCache",
    "PRESETS",
    "PagedKVCache",
    "Rotation",
    "TurboQuantConfig",
    "TurboQuantMSE",
    "TurboQuantProd",
    "allocate_kv_cache",
    "cache_config",
    "dequantize",
    "dequantize_values",
    "lloyd_max_codebook",
    "paged_decode",
    "prefill_attention",
    "quantize_values",
    "rotation",
    "store",
    "tokens_in_budget",
]
