"""Tuning parameters of the Pallas kernels: decode per device kind and preset (from measured data),
store, dequantize, prefill and the native-cache (FLASH) decode per vendor.

``tuning.json`` beside this module holds entries measured on a device (each names its measurement);
anything not listed falls back to :data:`DEFAULTS` for the platform's vendor. On AMD GPUs Triton's
``num_warps`` counts 64-lane wavefronts, so the same ``num_warps`` means twice the lanes; the ROCm
default keeps 4 (256 lanes, the size of one CDNA compute unit's SIMD set) and uses a single pipeline
stage (the ROCm Triton default; the loads here are gathers that the software pipeliner cannot
prefetch far ahead anyway).
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

from tqjax.platform import Platform, detect_platform

# Decode: transposed products ("mma_t") on CUDA. H200, 4bit_nc, B=32, 16k, same calls: 849 us at
# 64/4/1 against 1318 us with "mma", equal (1054 / 1052 us) at 32/2/1, the best "mma" launch
# (docs/data/decode_probe_mma_t_h200_2026-11-29.log, decode_probe_mma_t_launch_h200_2026-11-29.log).
# Launch: 64 tokens, 2 warps, 1 stage, the best or second best of the launches timed for each preset
# probed on the H200 with transposed products (752-1303 us at B=32, 16k; the former default 32/4/2: 1143 and
# 1178 us for k2p5v4 and k3p5v4 against 906 and 960 us; decode_probe_mma_t_presets_h200_2026-11-29.log,
# decode_probe_mma_t_split_presets_h200_2026-11-29.log): other NVIDIA GPUs start from it.
# ROCm keeps "mma" (not measured there); interpret mode follows CUDA so the CPU tests cover its path.
# Lookup: "prmt" (byte permutes over the float16 table, the same values as "poly_fma"), H200, B=32, 16k,
# tuned launches, same call: 4bit_nc 732 us against 821 us with "poly_fma", 3bit_nc 915 against 967,
# k3v4_nc 895 against 941 (docs/data/decode_probe_prmt_h200_2026-11-30.log); kqjl4v4 1222 against 1299,
# kqjl3v4 1071 against 1090, k2p5v4 817 against 813 (decode_probe_prmt_rest_h200_2026-11-30.log); k3p5v4
# not compared (its 4- and 3-bit segments are as the ones above).
# Cut: "lengths" (the work cut in pieces by the sequences' lengths, tqjax.pallas.pieces, as the Mosaic decode does)
# rather than "width" (each block table cut in choose_num_splits equal splits). H200, 4bit_nc, B=32 unless said, us
# (docs/data/decode_cut_h200_2026-11-30_s26.log): 1k-32k lengths in 32k tables 951 against 1279; 0.5k-16k 530
# against 703; log-normal around 4k 255 against 1014; 16.8k in 32k tables 809 against 1182; 7.9k in 128k tables
# 410 against 599; 128k + 31 x 4k 425 against 3928; B=128, 1k-32k in random order 2996 against 4013; but uniform
# 16k in 16k tables 781 against 737 (B=128: 3003 against 2900). ROCm takes the same cut (not measured there; the
# pieces' rule only counts resident programs, 2 a compute unit).
DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": dict(block_tokens=64, num_warps=2, num_stages=1, lookup="prmt", dot_mode="mma_t", cut="lengths"),
    "rocm": dict(block_tokens=32, num_warps=4, num_stages=1, lookup="poly", dot_mode="mma", cut="lengths"),
    "cpu": dict(block_tokens=32, num_warps=4, num_stages=2, lookup="poly", dot_mode="mma_t", cut="lengths"),
}
# The store is straight-line code per tile (no loop to pipeline): one stage everywhere. Tiles of 32 tokens
# (tqjax.pallas.store.DEFAULT_BLOCK_TOKENS) with 4 warps were the fastest or tied of the four launches
# timed on the H200 at 16k tokens (store kernel alone, docs/data/store_probe_search_h200_2026-11-29.log:
# 4bit_nc 106.9 us against 116.5-136.0 us at 16/2, 64/4, 128/8; k3p5v4 99.5 against 104.3-118.9), except
# for k8v4, where all four are within the run-to-run spread (44.8-49.3 us in
# docs/data/store_probe_exact_v2_h200_2026-11-29.log, 49.4-51.3 and 75.8 at 16/2 in
# docs/data/store_probe_xla_rotation_h200_2026-11-29.log); again for k8v4 at 4096 and 16k tokens, eleven launches
# from 16/1 to 128/8, and 16/2, 64/8, 128/4 in five turns of one call: none beyond the turns' spread at 4096, 128/4
# slower at 16k (docs/data/store_kernel_time_h200_2026-11-30_s21.log).
STORE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": dict(num_warps=4, num_stages=1),
    "rocm": dict(num_warps=4, num_stages=1),
    "cpu": dict(num_warps=4, num_stages=1),
}

# Dequantization is one pass over the pages, straight-line code per program.
DEQUANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": dict(block_tokens=64, num_warps=4, num_stages=1),
    "rocm": dict(block_tokens=64, num_warps=4, num_stages=1),
    "cpu": dict(block_tokens=64, num_warps=4, num_stages=1),
}
# Block-sparse prefill attention (tqjax.pallas.prefill). Forward: one program per (q block, query
# head) with a [block_q, D] accumulator; at head_dim 256 the tiles are halved so q, k, v, the
# accumulator and the [block_q, block_k] scores still fit the registers of 4-8 warps. Backward: the
# dq and dk/dv kernels hold two [block, D] fp32 accumulators, so they use smaller tiles. ROCm: one
# pipeline stage (the ROCm Triton default). "cpu" is the interpret mode: small tiles keep it fast.
# CUDA forward tiles measured on the H200 (docs/data/prefill_tune_h200_2026-11-29.log, causal 8k,
# Hq=32, Hk=8, D=128 bf16): 128 x 128 with 8 warps, 3 stages: 1.48 ms, against 1.67 ms at 128 x 64
# and 1.63-2.26 ms for the other seven variants.
PREFILL_DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": {"block_q": 128, "block_k": 128, "num_warps": 8, "num_stages": 3,
             "bwd_block_q": 64, "bwd_block_k": 64, "bwd_num_warps": 4, "bwd_num_stages": 2},
    "rocm": {"block_q": 128, "block_k": 64, "num_warps": 8, "num_stages": 1,
             "bwd_block_q": 64, "bwd_block_k": 64, "bwd_num_warps": 4, "bwd_num_stages": 1},
    "cpu": {"block_q": 32, "block_k": 32, "num_warps": 4, "num_stages": 2,
            "bwd_block_q": 32, "bwd_block_k": 32, "bwd_num_warps": 4, "bwd_num_stages": 2},
}

# Paged decode over a native (bf16/fp16) cache (tqjax.pallas.flash_decode). Not measured yet: chosen by
# analogy with the TurboQuant decode (4 warps; 2 pipeline stages on CUDA, 1 on ROCm) with a larger
# chunk, since a bf16 page needs no unpacking (64 tokens x D bf16 per K and V tile; halved at
# head_dim 256 to keep the tiles in shared memory / registers). ``split_dots``: the fp32 query and the
# fp32 probabilities enter the tensor-core products as hi + lo pairs in the cache dtype (two products
# each, fp32-accurate to ~2**-16 relative) instead of being rounded to the cache dtype once. ``cut``:
# "lengths", as the TurboQuant decode's; H200, bf16 cache and queries, B=32 unless said, us
# (docs/data/decode_cut_h200_2026-11-30_s26.log): 1k-32k in 32k tables 896 against 1226 cut by the width;
# log-normal around 4k 242 against 767; 128k + 31 x 4k 388 against 3355; B=128, 1k-32k in random order 2782
# against 3783; uniform 16k 709 against 686.
FLASH_DECODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": {"block_tokens": 64, "num_warps": 4, "num_stages": 2, "split_dots": True, "cut": "lengths"},
    "rocm": {"block_tokens": 64, "num_warps": 4, "num_stages": 1, "split_dots": True, "cut": "lengths"},
    "cpu": {"block_tokens": 32, "num_warps": 4, "num_stages": 2, "split_dots": True, "cut": "lengths"},
}

_TUNING_FILE = pathlib.Path(__file__).with_name("tuning.json")


@functools.lru_cache(maxsize=None)
def _measured() -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(_TUNING_FILE.read_text())["decode"])


def _vendor(platform: Platform) -> str:
    return platform.kind if platform.kind in ("cuda", "rocm") else "cpu"


def store_params(platform: Platform | None = None) -> dict[str, Any]:
    """Launch parameters of the store kernel on ``platform`` (default: the detected one)."""
    return dict(STORE_DEFAULTS[_vendor(platform or detect_platform())])


def dequant_params(platform: Platform | None = None) -> dict[str, Any]:
    """Launch parameters of the dequantization kernel on ``platform`` (default: the detected one)."""
    return dict(DEQUANT_DEFAULTS[_vendor(platform or detect_platform())])


def decode_params(preset: str, platform: Platform | None = None) -> dict[str, Any]:
    """Decode kernel parameters for ``preset`` on ``platform`` (default: the detected one): the vendor
    defaults, updated by any measured entry for this device kind and preset."""
    platform = platform or detect_platform()
    params = dict(DEFAULTS[_vendor(platform)])
    for entry in _measured():
        if entry["device_kind"] == platform.device_kind and entry["preset"] == preset:
            params.update(entry["params"])
    return params


def prefill_smem_bytes(params: dict[str, Any], head_dim: int, itemsize: int) -> tuple[int, int]:
    """Shared memory the prefill kernels need with ``params``: (forward, backward) bytes, estimated.

    Forward: the software pipeline keeps ``num_stages`` K and V tiles ``[block_k, D]`` in flight
    beside the resident ``[block_q, D]`` query tile. Backward: the dq kernel holds q and dO
    ``[bwd_block_q, D]`` and pipelines K and V tiles, the dk/dv kernel the transpose (the larger of
    the two counts), plus the ``[bwd_block_q, bwd_block_k]`` probabilities and their gradient, which
    pass through shared memory as transposed operands. Float32 inputs go through TF32x3 products,
    which stage operands twice (their tf32 high and low parts): the forward's query tile and every
    backward tile (one TF32 pass, under a lower ``jax.default_matmul_precision``, needs less; the
    estimate keeps the TF32x3 figure for every float32 input). Fitted to what the compiler asked for
    on the H200 at D=128 in float32: forward 128 x 64, 2 stages: 256.5 KiB (estimate 256 KiB);
    backward 64 x 64, 1 stage: 288 KiB (estimate 288 KiB); bf16 forward 128 x 128, 3 stages: estimate
    224 KiB, compiles within 227 KiB.
    """
    d = head_dim * itemsize
    twice = 2 if itemsize == 4 else 1
    fwd = (params["num_stages"] * 2 * params["block_k"] + twice * params["block_q"]) * d
    bq, bk, st = params["bwd_block_q"], params["bwd_block_k"], params["bwd_num_stages"]
    tiles = max(st * 2 * bk + 2 * bq, st * 2 * bq + 2 * bk) * d
    bwd = twice * tiles + 2 * bq * bk * itemsize
    return fwd, bwd


#: Shared memory left free beside :func:`prefill_smem_bytes`' estimate (barriers, reduction scratch:
#: 0.5-1 KiB measured).
SMEM_MARGIN = 2048


def _fit_prefill(params: dict[str, Any], head_dim: int, itemsize: int, budget: int) -> dict[str, Any]:
    """Shrink the prefill tiles until both kernels fit ``budget`` bytes of shared memory: forward
    stages down to 2, then block_k down to 32, then one stage, then both blocks (>= 16); backward
    stages down to 1, then both blocks (>= 16)."""
    p = dict(params)
    budget -= SMEM_MARGIN

    def fits() -> tuple[int, int]:
        return prefill_smem_bytes(p, head_dim, itemsize)

    while fits()[0] > budget:
        if p["num_stages"] > 2:
            p["num_stages"] -= 1
        elif p["block_k"] > 32:
            p["block_k"] //= 2
        elif p["num_stages"] > 1:
            p["num_stages"] = 1
        elif p["block_q"] > 16 or p["block_k"] > 16:
            p["block_q"], p["block_k"] = max(16, p["block_q"] // 2), max(16, p["block_k"] // 2)
        else:
            break
    while fits()[1] > budget:
        if p["bwd_num_stages"] > 1:
            p["bwd_num_stages"] -= 1
        elif p["bwd_block_q"] > 16 or p["bwd_block_k"] > 16:
            p["bwd_block_q"], p["bwd_block_k"] = max(16, p["bwd_block_q"] // 2), max(16, p["bwd_block_k"] // 2)
        else:
            break
    return p


def prefill_params(head_dim: int = 128, platform: Platform | None = None, itemsize: int = 2) -> dict[str, Any]:
    """Prefill attention kernel parameters for ``head_dim`` and inputs of ``itemsize`` bytes (2 for
    bf16/fp16, 4 for float32) on ``platform`` (default: the detected one): the vendor defaults, with
    tiles shrunk for small / large head dims on GPUs (D <= 64: 4 warps in the forward; D >= 256:
    block_q 64, block_k 32, backward tiles 32), then until the kernels fit the GPU's shared memory
    (:attr:`tqjax.platform.Platform.shared_memory_per_block`, :func:`prefill_smem_bytes`)."""
    platform = platform or detect_platform()
    vendor = _vendor(platform)
    params = dict(PREFILL_DEFAULTS[vendor])
    if vendor != "cpu":
        if head_dim <= 64:
            params["num_warps"] = 4
        if head_dim >= 256:
            params.update(block_q=64, block_k=32, bwd_block_q=32, bwd_block_k=32, num_stages=min(params["num_stages"], 2))
        params = _fit_prefill(params, head_dim, itemsize, platform.shared_memory_per_block)
    return params


def prefill_problem(head_dim: int, itemsize: int, platform: Platform | None = None) -> str | None:
    """None if the prefill kernels' tiles (:func:`prefill_params`) fit the shared memory of
    ``platform`` (default: the detected one) at ``head_dim`` with ``itemsize``-byte inputs, else why
    not (e.g. float32 at head_dim >= 128 on a 64 KiB AMD GPU, even with 16 x 16 tiles)."""
    platform = platform or detect_platform()
    budget = platform.shared_memory_per_block
    if budget is None:
        return None
    need = max(prefill_smem_bytes(prefill_params(head_dim, platform, itemsize), head_dim, itemsize))
    if need <= budget - SMEM_MARGIN:
        return None
    return (f"the prefill kernels need about {need // 1024} KiB of shared memory at head_dim {head_dim} with "
            f"{itemsize}-byte inputs even with their smallest tiles; {platform} has {budget // 1024} KiB")


def flash_decode_params(head_dim: int = 128, platform: Platform | None = None) -> dict[str, Any]:
    """Launch parameters of the native-cache decode kernel for ``head_dim`` on ``platform`` (default:
    the detected one): the vendor defaults, with ``block_tokens`` halved at head_dim >= 256 on GPUs."""
    vendor = _vendor(platform or detect_platform())
    params = dict(FLASH_DECODE_DEFAULTS[vendor])
    if vendor != "cpu" and head_dim >= 256:
        params["block_tokens"] = params["block_tokens"] // 2
    return params
