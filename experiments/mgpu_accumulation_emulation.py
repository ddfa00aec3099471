"""Host emulation of tqjax.pallas.decode_mgpu's arithmetic for one long split, against float64 attention.

Why: on the H200 the Mosaic decode's error against float64 grew with the tokens of a split (9.0e-5 of
max|out| for 32k tokens in one split; docs/data/decode_mgpu_paged_f64_h200_2026-11-30_s12.log). This
script replays the kernel's sequence of roundings on the host, with exact products (the tensor cores'
float16 x float16 products are exact) and round-to-nearest float32 sums, step by 64-token step: the
float16 hi/lo query split, the online softmax in base 2, the per-row (lazy) sums of the probabilities and
of ``p * zero``, the float16 hi/lo split of ``p * scale / 2**e * 2**14``, the value tile ``code * 2**e``,
each step's product added to a float32 accumulator. Variants replace one part by float64, or center the
value codes (``(code - 7.5) * 2**e`` in the tile, ``zero + 7.5 * scale`` in the zero-point sum), to show
which rounding the error comes from. Random 4-bit codes, a float16-exact table, float16 scales as the
store writes them (zero ~ -7.5 * scale: values centred on 0, so the output is a small difference of the
code and zero-point sums).

    python -m experiments.mgpu_accumulation_emulation [--tokens 32768]
"""

from __future__ import annotations

import argparse

import numpy as np

F16, F32 = np.float16, np.float32
T = 64  # tokens per step


def make_case(tokens: int, dim: int = 128, group: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    table = (np.sort(rng.standard_normal(16)) * 0.1).astype(F16).astype(F32)  # exact in float16
    codes_k = rng.integers(0, 16, (tokens, dim))
    norms = rng.uniform(8, 14, tokens).astype(F16).astype(F32)
    codes_v = rng.integers(0, 16, (tokens, dim))
    vs = rng.uniform(0.2, 0.5, tokens).astype(F16)
    vz = (-7.5 * vs.astype(F32) + rng.normal(0, 0.05, tokens)).astype(F16)
    q = rng.standard_normal((group, dim)).astype(F32)
    return table, codes_k, norms, codes_v, vs, vz, q


def float64_attention(table, codes_k, norms, codes_v, vs, vz, q) -> np.ndarray:
    k = table[codes_k].astype(np.float64) * norms[:, None]
    v = codes_v * vs.astype(np.float64)[:, None] + vz.astype(np.float64)[:, None]
    s = q.astype(np.float64) @ k.T / np.sqrt(q.shape[1])
    p = np.exp(s - s.max(1, keepdims=True))
    return p @ v / p.sum(1, keepdims=True)


def emulate(table, codes_k, norms, codes_v, vs, vz, q, *, acc_t=F32, sums_t=F32, center: bool = False):
    """The kernel's arithmetic for one split (all tokens): out [G, D]."""
    group, dim = q.shape
    scale = F32(1 / np.sqrt(dim))
    log2e = F32(np.log2(np.e))
    ex = np.frexp(np.abs(q).max(1, keepdims=True))[1]
    x = np.ldexp(q, 14 - ex).astype(F32)
    q_hi = x.astype(F16)
    q_lo = (x - q_hi.astype(F32)).astype(F16)
    q_inv = np.ldexp(F32(1), ex - 14).astype(F32)
    vs32, vz32 = vs.astype(F32), vz.astype(F32)
    zero = (vz32 + F32(7.5) * vs32).astype(F32) if center else vz32
    acc = np.zeros((group, dim), acc_t)
    m = np.full(group, -np.inf, F32)
    lsum = np.zeros((T, group), sums_t)
    zsum = np.zeros((T, group), sums_t)
    for step in range(codes_k.shape[0] // T):
        r = slice(step * T, (step + 1) * T)
        k16 = table[codes_k[r]].astype(np.float64)
        s_hi = (k16 @ q_hi.astype(np.float64).T).astype(F32)
        s_lo = (k16 @ q_lo.astype(np.float64).T).astype(F32)
        s = (s_hi + s_lo) * q_inv.T * (norms[r] * scale)[:, None] * log2e
        m_new = np.maximum(m, s.max(0))
        alpha = np.exp2(m - m_new).astype(F32)
        p = np.exp2(s - m_new).astype(F32)
        lsum = (lsum * alpha + p).astype(sums_t)
        zsum = (zsum * alpha + p * zero[r][:, None]).astype(sums_t)
        e = np.maximum(np.frexp(vs[r].astype(np.float64))[1] - 1, -14)  # vs = m * 2**e, m in [1, 2)
        vm = (vs32[r] * np.ldexp(1.0, 14 - e)).astype(F32)
        pw = p * vm[:, None]
        hi = pw.astype(F16)
        lo = (pw - hi.astype(F32)).astype(F16)
        tile = (codes_v[r] - (7.5 if center else 0.0)) * np.ldexp(1.0, e)[:, None]
        assert np.array_equal(tile.astype(F16).astype(np.float64), tile)  # the float16 tile is exact
        prod = (hi.astype(np.float64).T @ tile).astype(F32) + (lo.astype(np.float64).T @ tile).astype(F32)
        acc = (acc * alpha[:, None] + prod * F32(2.0**-14)).astype(acc_t)
        m = m_new
    return (acc + zsum.sum(0)[:, None]) / lsum.sum(0)[:, None]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    args = ap.parse_args(argv)
    case = make_case(args.tokens)
    ref = float64_attention(*case)
    print(f"one split of {args.tokens} tokens, max|out| {np.abs(ref).max():.3g}; error = max|emulated - float64| / max|out|")
    for name, kw in [
        ("the kernel's arithmetic (float32 accumulator and row sums)", {}),
        ("  with a float64 accumulator", {"acc_t": np.float64}),
        ("  with float64 row sums", {"sums_t": np.float64}),
        ("  with both in float64", {"acc_t": np.float64, "sums_t": np.float64}),
        ("centred value codes (code - 7.5), float32 as the kernel", {"center": True}),
    ]:
        err = np.abs(emulate(*case, **kw) - ref).max() / np.abs(ref).max()
        print(f"{name}: {err:.2e}")


if __name__ == "__main__":
    main()
