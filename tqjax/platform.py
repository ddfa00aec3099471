"""Which accelerator tqjax runs on (used by the backend registry and the kernels' tuning).

:func:`detect_platform` reads ``jax.devices()[0]`` (or a device passed in) into a small, hashable
:class:`Platform`; every routing function also accepts an explicit ``platform=``, so tests and
ahead-of-time planning can simulate hardware that is not present (``Platform("rocm", "gfx942")``).

How a JAX device is classified:

* ``device.platform == "cpu"`` / ``"tpu"``: cpu / tpu.
* ``device.platform == "gpu"`` (or ``"cuda"`` / ``"rocm"`` on some jaxlib builds): rocm when the
  client's ``platform_version`` mentions "rocm" (the test JAX itself uses), else cuda.
* arch: on CUDA ``device.compute_capability`` ("9.0") becomes ``"sm90"``; on ROCm the first
  ``gfx...`` token of ``compute_capability`` (jaxlib reports the gfx target there) or of
  ``device_kind``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Literal

import jax

PlatformKind = Literal["cuda", "rocm", "cpu", "tpu"]
PLATFORM_KINDS: tuple[PlatformKind, ...] = ("cuda", "rocm", "cpu", "tpu")

#: AMD targets whose fp8 is the e4m3fnuz variant (CDNA3: MI300A/X, MI325X).
_FNUZ_ARCHS = frozenset({"gfx940", "gfx941", "gfx942"})
#: Oldest CUDA arch for which the Pallas Triton lowering casts float8_e4m3fn (Ada, sm89).
_MIN_FP8_SM = 89


@dataclasses.dataclass(frozen=True)
class Platform:
    """One accelerator: ``kind`` ("cuda" | "rocm" | "cpu" | "tpu"), ``arch`` ("sm90", "gfx942", or
    None where unknown / not meaningful) and the device's ``device_kind`` string (informational)."""

    kind: PlatformKind
    arch: str | None = None
    device_kind: str = ""

    def __post_init__(self) -> None:
        if self.kind not in PLATFORM_KINDS:
            raise ValueError(f"platform kind must be one of {PLATFORM_KINDS}, got {self.kind!r}")

    def __str__(self) -> str:
        return self.kind if self.arch is None else f"{self.kind} {self.arch}"

    @property
    def is_gpu(self) -> bool:
        return self.kind in ("cuda", "rocm")

    @property
    def fp8_e4m3(self) -> Literal["fn", "fnuz"] | None:
        """The float8 e4m3 variant Triton kernels can convert on this GPU.

        "fn" (OCP e4m3fn: NVIDIA sm89+, AMD gfx950 and RDNA4 gfx12), "fnuz" (AMD CDNA3 gfx94x), or None
        (no fp8 conversions, or an arch tqjax cannot place).
        """
        if self.kind == "cuda" and self.arch is not None and re.fullmatch(r"sm\d+", self.arch):
            return "fn" if int(self.arch[2:]) >= _MIN_FP8_SM else None
        if self.kind == "rocm" and self.arch is not None:
            if self.arch in _FNUZ_ARCHS:
                return "fnuz"
            if self.arch == "gfx950" or self.arch.startswith("gfx12"):
                return "fn"
        return None


    @property
    def shared_memory_per_block(self) -> int | None:
        """Bytes of shared memory (LDS on AMD) one kernel program may use, None off GPUs.

        From the vendors' tables (CUDA programming guide, "maximum shared memory per thread block",
        opt-in; AMD CDNA ISA guides): sm80/sm87 163 KiB, sm86/sm89/sm12x 99 KiB, sm90/sm10x 227 KiB;
        gfx950 160 KiB, other AMD GPUs 64 KiB. An arch not in the table gets the smallest value of its
        vendor's recent GPUs (99 KiB / 64 KiB), so tiles sized by it fit everywhere.
        """
        if self.kind == "cuda":
            sm = int(self.arch[2:]) if self.arch and re.fullmatch(r"sm\d+", self.arch) else 0
            if sm in (80, 87):
                return 163 * 1024
            if sm == 90 or 100 <= sm < 120:
                return 227 * 1024
            return 99 * 1024
        if self.kind == "rocm":
            return 160 * 1024 if self.arch == "gfx950" else 64 * 1024
        return None


def _cuda_arch(compute_capability: object) -> str | None:
    match = re.fullmatch(r"(\d+)\.(\d+)", str(compute_capability or ""))
    return f"sm{match.group(1)}{match.group(2)}" if match else None


def _gfx_arch(*texts: object) -> str | None:
    for text in texts:
        match = re.search(r"gfx[0-9a-f]+", str(text or "").lower())
        if match:
            return match.group(0)
    return None


def platform_of(device: Any) -> Platform:
    """Classify a JAX device (or any object with ``platform``, ``device_kind``, ``client`` and,
    on GPUs, ``compute_capability`` attributes)."""
    name = str(device.platform).lower()
    device_kind = str(getattr(device, "device_kind", ""))
    if name in ("cpu", "tpu"):
        return Platform(name, None, device_kind)
    if name not in ("gpu", "cuda", "rocm"):
        raise ValueError(f"unrecognised JAX device platform {device.platform!r}")
    version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
    compute_capability = getattr(device, "compute_capability", None)
    if name == "rocm" or "rocm" in version:
        return Platform("rocm", _gfx_arch(compute_capability, device_kind), device_kind)
    return Platform("cuda", _cuda_arch(compute_capability), device_kind)


@functools.cache
def _default_platform(device: Any) -> Platform:
    return platform_of(device)


def detect_platform(device: Any = None) -> Platform:
    """The :class:`Platform` of ``device`` (default: ``jax.devices()[0]``, cached per device)."""
    return _default_platform(jax.devices()[0]) if device is None else platform_of(device)
