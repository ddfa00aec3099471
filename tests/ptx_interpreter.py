"""A numpy interpreter of the PTX subset the kernels' inline blocks use, from the PTX ISA's definitions.

``run_ptx(asm, args)``: ``args`` maps operand names (``"$2"``) to uint32 arrays of one shape; returns
every register (uint32 arrays) after running the block's instructions in order. Supported: mov.b32
(also the unpacking ``mov.b32 {lo, hi}, x``: 16-bit registers), mad.lo.u32, sub.u32, or.b32, and.b32,
shl.b32, shr.b32, prmt.b32 (default mode), lop3.b32, fma.rn.f16x2, mul.rn.f16x2, cvt.rn.f16x2.e4m3x2.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np


def _f16x2(x: np.ndarray) -> np.ndarray:
    """uint32 [...] -> float64 [..., 2] (low half first)."""
    halves = np.stack([x & 0xFFFF, x >> 16], -1).astype(np.uint16)
    return halves.view(np.float16).astype(np.float64)


def _pack_f16x2(v: np.ndarray) -> np.ndarray:
    """float64 [..., 2] -> uint32 [...], each half rounded to nearest float16 once (as ``.rn``)."""
    h = v.astype(np.float16).view(np.uint16).astype(np.uint32)
    return h[..., 0] | (h[..., 1] << 16)


def run_ptx(asm: str, args: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    regs = {k: np.asarray(v).astype(np.uint32) for k, v in args.items()}
    shape = next(iter(regs.values())).shape

    def val(x: str) -> np.ndarray:
        x = x.strip()
        return regs[x] if x in regs else np.full(shape, int(x, 0), np.uint32)

    for line in asm.splitlines():
        line = line.split("//")[0].strip().rstrip(";")
        if line in ("", "{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):  # {lo, hi}, x: the halves of a 32-bit value
            halves, x = rest[1:].split("}")
            lo, hi = (r.strip() for r in halves.split(","))
            v = val(x.strip(" ,"))
            regs[lo], regs[hi] = v & 0xFFFF, v >> 16
            continue
        d, *src = [x.strip() for x in rest.split(",")]
        a = [val(x) for x in src]
        if op == "mov.b32":
            out = a[0]
        elif op == "mad.lo.u32":
            out = a[0] * a[1] + a[2]
        elif op == "or.b32":
            out = a[0] | a[1]
        elif op == "and.b32":
            out = a[0] & a[1]
        elif op == "shl.b32":
            out = a[0] << a[1]
        elif op == "sub.u32":
            out = a[0] - a[1]
        elif op == "shr.b32":
            out = a[0] >> a[1]
        elif op == "prmt.b32":  # default mode: selector nibble k picks byte (nibble & 7) of {b, a}, bit 3 replicates its msb
            pool = [(a[0] >> (8 * i)) & 0xFF for i in range(4)] + [(a[1] >> (8 * i)) & 0xFF for i in range(4)]
            out = np.zeros(shape, np.uint32)
            for k in range(4):
                nib = (a[2] >> (4 * k)) & 0xF
                byte = np.choose(nib & 7, pool)
                byte = np.where(nib & 8, np.where(byte & 0x80, 0xFF, 0), byte).astype(np.uint32)
                out = out | (byte << (8 * k))
        elif op == "lop3.b32":  # bit i of the result: bit (4 a_i + 2 b_i + c_i) of the LUT
            lut = int(np.asarray(a[3]).flat[0])
            out = np.zeros(shape, np.uint32)
            for bit in range(32):
                idx = ((a[0] >> bit) & 1) * 4 + ((a[1] >> bit) & 1) * 2 + ((a[2] >> bit) & 1)
                out = out | (((np.uint32(lut) >> idx) & 1) << bit)
        elif op == "fma.rn.f16x2":  # a * b + c exactly (float64 holds it here), rounded once
            out = _pack_f16x2(_f16x2(a[0]) * _f16x2(a[1]) + _f16x2(a[2]))
        elif op == "cvt.rn.f16x2.e4m3x2":  # the two e4m3 bytes of a 16-bit value, the upper one to the upper half
            e4m3 = np.stack([a[0] & 0xFF, (a[0] >> 8) & 0xFF], -1).astype(np.uint8).view(ml_dtypes.float8_e4m3fn)
            out = _pack_f16x2(e4m3.astype(np.float64))
        elif op == "mul.rn.f16x2":
            out = _pack_f16x2(_f16x2(a[0]) * _f16x2(a[1]))
        else:
            raise NotImplementedError(op)
        regs[d] = np.asarray(out).astype(np.uint32)
    return regs
