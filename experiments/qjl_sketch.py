"""CPU study: TurboQuant_prod's QJL sketch on integers (a matrix of signs or of rounded normals, the residual on an
integer grid) against the paper's Gaussian matrix, for the inner-product estimator's bias, variance and D_prod.

    python -m experiments.qjl_sketch [--dim 128] [--bits 2 3 4 5] [--families sphere outlier]
                                     [--batches 32] [--per-batch 256] [--grid-bits 11]

Why. A QJL store is almost all XLA encoding (docs/PERFORMANCE.md, "QJL encoding at Precision.HIGH": 8% of the copy
bandwidth, the MSE presets' Mosaic store 37-44%), because only XLA computes the sketch ``S r`` whose signs the
reference defines: a kernel's float32 sums, in another order, flip the signs of projections near zero. With ``S`` of
+-1 entries and the residual ``r`` snapped to integers ``r_int = round(r * 2**(G - e))`` (e: the exponent of max|r|;
``|r_int| <= 2**G``), every partial sum of ``S r_int`` is an integer below ``d * 2**G`` (2**18 at d = 128, G = 11),
exact in float32 in any order: a float16 tensor-core product (+-1 and ``|r_int| <= 2**11`` are exact float16) would
give the reference's signs bit for bit, as the MSE presets' grid product gives their codes. What that costs in
accuracy is what this measures.

Sketch kinds, each with its own matrix from the batch's seed (common random numbers otherwise: the same inputs,
queries, rotation and MSE stage):

* ``gaussian``: the paper's (S with i.i.d. N(0, 1) entries, the normals that :func:`tqjax.quantizers.qjl_sketch_matrix`
  rounds), on the float residual of :meth:`tqjax.TurboQuantProd.float_features`;
* ``signs``: S with i.i.d. +-1 entries, the float residual;
* ``signs_grid``: S with +-1 entries (the same as ``signs``), the residual on the integer grid above;
* ``gaussian_grid``: the same normals rounded to quarters (the library's ``S_int / 4``: integers up to 31 over 4, so
  ``4 S r_int`` stays below 2**24 at d = 128 and is exact in any order too), the float residual on the grid, the
  estimator's scale divided by the rounded normal's standard deviation (``sqrt(v)``, v = 1 + 1/192 nearly);
* ``library``: :meth:`tqjax.TurboQuantProd.quantize` and ``inner_product`` as they are (with a Hadamard rotation:
  ``gaussian_grid`` on the exact integer path, the grid vector's residual scaled by ``round13(L)``; module
  docstring of :mod:`tqjax.quantizers`).

The estimator is the library's for every kind, ``||x|| (<Pi q, m> + sqrt(pi/2) / d * gamma * <S Pi q, 2 signs - 1>)``
(``gamma = ||r||``, the float residual's norm). For Gaussian rows ``E[sign(<s, r>) <s, q>] = sqrt(2/pi) <r, q> /
||r||`` exactly (unbiased); for +-1 or rounded rows only as far as ``<s, r>`` is Gaussian (the central limit
theorem over d terms; a residual spread over the rotated coordinates), so those kinds' bias is the question. Inputs
and queries are :mod:`experiments.distortion`'s (unit vectors of a family, queries at correlation 0.5); batch i uses
seed i. The table reports, per (family, bits, kind): the bias and its standard error (of the batch means), the
variance, D_prod = E[e^2] and its ratio to the Gaussian kind's (with the paired change's standard error), for
``signs_grid`` the fraction of signs that differ from ``signs`` (the grid's rounding), and for the grid kinds the count
of sketch entries whose float32 sum differed from the exact integer one (expected 0). Output: the table on stdout.
"""

from __future__ import annotations

import argparse
import math

import jax.numpy as jnp
import numpy as np

from experiments.distortion import FAMILIES, batch_mean, family_inputs
from tqjax import TurboQuantProd
from tqjax.quantizers import QJL_STEPS, qjl_entry_variance

KINDS = ("gaussian", "signs", "signs_grid", "gaussian_grid", "library")
GRID_BITS = 11


def sign_matrix(dim: int, seed: int) -> np.ndarray:
    """float32 [dim, dim] of i.i.d. +-1 entries, deterministic per seed (a stream of its own)."""
    rng = np.random.default_rng([seed, 0x5167])
    return (2.0 * rng.integers(0, 2, (dim, dim)) - 1.0).astype(np.float32)


def paper_matrix(dim: int, seed: int) -> np.ndarray:
    """float32 [dim, dim] of i.i.d. N(0, 1) entries: the normals the library's sketch matrix rounds (its stream)."""
    return np.random.default_rng([seed, 0x514A4C]).standard_normal((dim, dim)).astype(np.float32)


def grid_residual(r: np.ndarray, grid_bits: int = GRID_BITS) -> np.ndarray:
    """``round(r * 2**(grid_bits - e))`` row-wise, e the exponent of the row's largest magnitude (``frexp``: max|r| in
    [2**(e-1), 2**e)): float32 [n, d] integers in [-2**grid_bits, 2**grid_bits], the largest at least
    2**(grid_bits-1) (a zero row stays zero). A power-of-2 scale and a round to nearest even: exact float32
    operations, the same integers wherever they are computed (a division by max|r| would not be, on every device)."""
    _, e = np.frexp(np.max(np.abs(r), axis=-1, keepdims=True))
    return np.rint(np.ldexp(r.astype(np.float32), (grid_bits - e).astype(np.int32))).astype(np.float32)


def exact_sketch(s: np.ndarray, r_int: np.ndarray) -> tuple[np.ndarray, int]:
    """``(S r_int`` in float32 as numpy sums it, the count of entries that differ from the exact int64 product)``
    for an integer-valued S."""
    f32 = r_int @ s.T
    exact = r_int.astype(np.int64) @ s.T.astype(np.int64)
    return f32, int(np.count_nonzero(f32.astype(np.int64) != exact))


def batch_estimates(bits: int, seed: int, x: np.ndarray, y: np.ndarray, grid_bits: int = GRID_BITS) -> dict:
    """One batch: {kind: est - <y, x> float64 [n]}, plus ``flips`` (signs_grid's signs that differ from signs') and
    ``inexact`` ({grid kind: its sketch entries whose float32 sum was not the integer one})."""
    dim = x.shape[1]
    q = TurboQuantProd(dim, bits, seed=seed)
    f = q.float_features(jnp.asarray(x))
    m = np.asarray(q.mse.centroid_vectors(f.codes) if q.mse is not None else jnp.zeros(x.shape), np.float64)
    r = np.asarray(f.residual, np.float32)
    gamma = np.asarray(f.residual_norm, np.float64)
    norm = np.asarray(f.norm, np.float64)
    q_rot = np.asarray(q.rotation.apply(jnp.asarray(y)), np.float64)
    truth = np.sum(x.astype(np.float64) * y.astype(np.float64), axis=1)
    mse_part = np.sum(q_rot * m, axis=1)
    scale = math.sqrt(math.pi / 2) / dim

    def error(s: np.ndarray, signs: np.ndarray, variance: float = 1.0) -> np.ndarray:
        # E[sign(<s, r>) <s, q>] = sqrt(2 / pi) sqrt(variance) <r, q> / ||r|| for normal rows of that variance
        pm = 2.0 * signs.astype(np.float64) - 1.0
        qjl = scale / math.sqrt(variance) * gamma * np.sum((q_rot @ s.T.astype(np.float64)) * pm, axis=1)
        return norm * (mse_part + qjl) - truth

    r_int = grid_residual(r, grid_bits)
    signs_matrix = sign_matrix(dim, seed)
    signs = (r @ signs_matrix.T) >= 0
    sketch, inexact = exact_sketch(signs_matrix, r_int)
    grid_signs = sketch >= 0
    s_int = np.asarray(q.sketch_matrix)
    g_sketch, g_inexact = exact_sketch(s_int, r_int)
    paper = paper_matrix(dim, seed)
    library = q.inner_product(q.prepare_query(jnp.asarray(y)), q.quantize(jnp.asarray(x)))
    return {
        "gaussian": error(paper, r @ paper.T >= 0),
        "signs": error(signs_matrix, signs),
        "signs_grid": error(signs_matrix, grid_signs),
        "gaussian_grid": error(s_int / QJL_STEPS, g_sketch >= 0, qjl_entry_variance()),
        "library": np.asarray(library, np.float64) - truth,
        "flips": float(np.mean(signs != grid_signs)),
        "inexact": {"signs_grid": inexact, "gaussian_grid": g_inexact},
    }


def measure(family: str, bits: int, x: np.ndarray, y: np.ndarray, grid_bits: int = GRID_BITS) -> list[dict]:
    """Rows {family, bits, kind, bias, bias_se, variance, d_prod, d_prod_se, excess, excess_se, flips, inexact} for
    every kind (excess: D_prod minus the Gaussian kind's, paired), from inputs and queries float32 [batches,
    per_batch, d] (batch i quantized with seed i)."""
    per = [batch_estimates(bits, i, x[i], y[i], grid_bits) for i in range(x.shape[0])]
    rows = []
    e_gaussian = np.stack([p["gaussian"] for p in per])
    for kind in KINDS:
        e = np.stack([p[kind] for p in per])
        bias, bias_se = batch_mean(e)
        d_prod, d_prod_se = batch_mean(e * e)
        # the change in D_prod against the Gaussian kind, paired (the same inputs and seeds), with its error
        excess, excess_se = batch_mean(e * e - e_gaussian * e_gaussian)
        rows.append({"family": family, "bits": bits, "kind": kind, "bias": bias, "bias_se": bias_se,
                     "variance": float(np.var(e, ddof=1)), "d_prod": d_prod, "d_prod_se": d_prod_se,
                     "excess": excess, "excess_se": excess_se,
                     "flips": float(np.mean([p["flips"] for p in per])) if kind == "signs_grid" else None,
                     "inexact": sum(p["inexact"][kind] for p in per) if kind.endswith("_grid") else None})
    return rows


def format_row(row: dict, gaussian_d_prod: float, dim: int) -> str:
    extra = "" if row["flips"] is None else f"  flips {row['flips']:.1e}"
    extra += "" if row["inexact"] is None else f"  inexact {row['inexact']}"
    return (f"{row['family']:10s} b={row['bits']}  {row['kind']:13s}  bias {row['bias']:+.2e} +- {row['bias_se']:.1e}"
            f"  ({row['bias'] / row['bias_se']:+.1f} se)  d*var {dim * row['variance']:.4e}"
            f"  d*D_prod {dim * row['d_prod']:.4e} +- {dim * row['d_prod_se']:.1e}"
            f"  / gaussian {row['d_prod'] / gaussian_d_prod:.4f} ({row['excess'] / gaussian_d_prod:+.4f}"
            f" +- {row['excess_se'] / gaussian_d_prod:.4f}){extra}")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5])
    ap.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    ap.add_argument("--batches", type=int, default=32, help="fresh quantizer seeds (rotation and matrices)")
    ap.add_argument("--per-batch", type=int, default=256)
    ap.add_argument("--grid-bits", type=int, default=GRID_BITS)
    a = ap.parse_args(argv)
    if a.batches < 2 or a.per_batch < 1 or min(a.bits) < 1 or not 1 <= a.grid_bits <= 16:
        ap.error("--batches >= 2, --per-batch >= 1, --bits >= 1, --grid-bits in 1..16")
    if a.dim * 2**a.grid_bits >= 2**24:
        ap.error(f"d * 2**grid_bits = {a.dim * 2**a.grid_bits} must stay below 2**24 (exact float32 sums)")
    print(f"QJL sketch kinds at d={a.dim}, {a.batches} seeds x {a.per_batch} vectors, grid 2**{a.grid_bits}; "
          "errors of the estimate of <y, x> (unit x and y, <y, x> = 0.5)", flush=True)
    rows = []
    for family in a.families:
        x, y = family_inputs(family, a.batches, a.per_batch, a.dim)
        for bits in a.bits:
            got = measure(family, bits, x, y, a.grid_bits)
            for row in got:
                print(format_row(row, got[0]["d_prod"], a.dim), flush=True)
            rows += got
    return rows


if __name__ == "__main__":
    main()
