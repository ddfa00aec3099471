"""tqjax: TurboQuant KV-cache quantization for JAX, with Pallas kernels.

Public functional API (stable): :class:`TurboQuantConfig`, :data:`PRESETS`, :class:`TurboQuantMSE`,
:class:`TurboQuantProd`, :func:`lloyd_max_codebook`, :func:`rotation`, :class:`PagedKVCache`,
:func:`store`, :func:`paged_decode`, :func:`dequantize`, :func:`prefill_attention`.
"""

from tqjax.codebooks import Codebook, lloyd_max_codebook
from tqjax.config import PRESETS, TurboQuantConfig
from tqjax.layout import PagedKVCache, tokens_in_budget
from tqjax.ops import dequantize, paged_decode, prefill_attention, store
from tqjax.quantizers import TurboQuantMSE, TurboQuantProd, dequantize_values, quantize_values
from tqjax.rotation import Rotation, rotation

__version__ = "0.1.0"

__all__ = [
    "Codebook",
    "PRESETS",
    "PagedKVCache",
    "Rotation",
    "TurboQuantConfig",
    "TurboQuantMSE",
    "TurboQuantProd",
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
