"""``experiments/qjl_sketch.py``: the sketch kinds' building blocks and the study end to end (small samples)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from experiments import qjl_sketch
from experiments.distortion import family_inputs
from tqjax import TurboQuantProd
from tqjax.quantizers import QJL_STEPS, qjl_entry_variance

D = 128


def test_sign_matrix_is_plus_minus_one_and_seeded() -> None:
    a, b, c = (qjl_sketch.sign_matrix(D, s) for s in (3, 3, 4))
    assert a.dtype == np.float32 and a.shape == (D, D)
    assert set(np.unique(a)) == {-1.0, 1.0}
    np.testing.assert_array_equal(a, b)
    assert np.mean(a != c) > 0.4  # another seed, another matrix
    assert abs(float(np.mean(a))) < 4 / D  # balanced: |mean| of D*D signs below 4 standard deviations


def test_library_sketch_matrix_and_its_variance() -> None:
    """The library's sketch matrix: the study's paper normals rounded to quarters (clipped at 31), integers, seeded;
    their variance is Sheppard's 1 + (1/4)**2 / 12 (for a normal its error is ~exp(-2 pi**2 * 16), far below
    float64's), which the sample's variance meets within 4 standard errors; the projection the query meets is the
    same matrix over 4 sqrt(v)."""
    q = TurboQuantProd(D, 3, seed=2)
    s_int = np.asarray(q.sketch_matrix)
    rounded = np.clip(np.rint(4 * qjl_sketch.paper_matrix(D, 2).astype(np.float64)), -31, 31)
    np.testing.assert_array_equal(s_int, rounded)
    assert np.all(s_int == np.rint(s_int)) and np.max(np.abs(s_int)) < 32
    v = qjl_entry_variance()
    assert abs(v - (1 + 1 / 192)) < 1e-12
    sample = np.var(s_int.astype(np.float64) / QJL_STEPS)
    assert abs(sample - v) < 4 * math.sqrt(2 / D**2)
    np.testing.assert_allclose(q.projection, s_int.astype(np.float64) / (4 * math.sqrt(v)), rtol=2**-24)


def test_grid_sketch_is_exact_in_any_summation_order() -> None:
    """Integers up to 2**11 times +-1, summed over 128 terms, stay below 2**18: float32 sums are exact in any order,
    where the float residual's sums are not (the reason for the grid)."""
    rng = np.random.default_rng(0)
    r = (rng.standard_normal((256, D)) * np.exp(rng.uniform(-8, 0, (256, D)))).astype(np.float32)
    r_int = qjl_sketch.grid_residual(r)
    assert np.all(np.abs(r_int) <= 2**11) and np.all(r_int == np.rint(r_int))
    top = np.max(np.abs(r_int), axis=1)
    assert np.all((top >= 2**10) & (top <= 2**11))  # each row's largest entry in the grid's top octave
    # float64 reference: the power of 2 from log2 of the row's largest magnitude, then round half to even
    e = np.floor(np.log2(np.max(np.abs(r.astype(np.float64)), axis=1, keepdims=True))) + 1
    np.testing.assert_array_equal(r_int, np.round(r.astype(np.float64) * 2.0 ** (11 - e)))
    s = qjl_sketch.sign_matrix(D, 1)
    sketch, inexact = qjl_sketch.exact_sketch(s, r_int)
    assert inexact == 0
    big = rng.integers(-2**22, 2**22, (256, D)).astype(np.float32)  # exact float32 integers, their sums not
    assert qjl_sketch.exact_sketch(s, big)[1] > 0  # sums past 2**24 lose bits: the count sees it
    perm = rng.permutation(D)
    forward = np.zeros((256, D), np.float32)
    backward = np.zeros((256, D), np.float32)
    for k in perm:  # one float32 accumulation per order, term by term
        forward += r_int[:, k:k + 1] * s[:, k][None, :]
    for k in perm[::-1]:
        backward += r_int[:, k:k + 1] * s[:, k][None, :]
    np.testing.assert_array_equal(forward, sketch)
    np.testing.assert_array_equal(backward, sketch)
    float_forward, float_backward = np.zeros_like(forward), np.zeros_like(forward)
    for k in perm:
        float_forward += r[:, k:k + 1] * s[:, k][None, :]
    for k in perm[::-1]:
        float_backward += r[:, k:k + 1] * s[:, k][None, :]
    assert np.any(float_forward != float_backward)  # the float residual's sketch depends on the order


def test_library_and_gaussian_kinds() -> None:
    """The study's library errors are TurboQuantProd.inner_product's estimates minus the float64 <y, x>; its Gaussian
    errors are the paper's estimator with the float residual, computed here in float64."""
    x, y = family_inputs("sphere", 1, 64, D)
    got = qjl_sketch.batch_estimates(3, 5, x[0], y[0])
    q = TurboQuantProd(D, 3, seed=5)
    est = np.asarray(q.inner_product(q.prepare_query(jnp.asarray(y[0])), q.quantize(jnp.asarray(x[0]))), np.float64)
    truth = np.sum(x[0].astype(np.float64) * y[0].astype(np.float64), axis=1)
    np.testing.assert_allclose(got["library"], est - truth, rtol=0, atol=1e-12)
    f = q.float_features(jnp.asarray(x[0]))
    s = qjl_sketch.paper_matrix(D, 5).astype(np.float64)
    r = np.asarray(f.residual, np.float64)
    q_rot = np.asarray(q.rotation.apply(jnp.asarray(y[0])), np.float64)
    m = r - np.asarray(f.rotated, np.float64)  # -c[codes]
    signs = np.where(np.asarray(f.residual, np.float32) @ s.T.astype(np.float32) >= 0, 1.0, -1.0)
    qjl = math.sqrt(math.pi / 2) / D * np.asarray(f.residual_norm, np.float64) * np.sum((q_rot @ s.T) * signs, axis=1)
    paper = np.asarray(f.norm, np.float64) * (np.sum(q_rot * -m, axis=1) + qjl) - truth
    np.testing.assert_allclose(got["gaussian"], paper, rtol=0, atol=2e-5)  # float32 sums of unit vectors
    assert got["inexact"] == {"signs_grid": 0, "gaussian_grid": 0} and 0 <= got["flips"] < 0.01


def test_study_rows_and_the_gaussian_kind_unbiased() -> None:
    """End to end on the sphere at b=3: a row a kind, the Gaussian kind's bias within 4 standard errors of 0 (the
    paper's unbiased estimator), every kind's D_prod within a factor 1.5 of the Gaussian one."""
    rows = qjl_sketch.main(["--bits", "3", "--families", "sphere", "--batches", "16", "--per-batch", "128"])
    assert [r["kind"] for r in rows] == list(qjl_sketch.KINDS)
    gaussian = rows[0]
    assert abs(gaussian["bias"]) < 4 * gaussian["bias_se"]
    assert gaussian["excess"] == 0.0
    for r in rows:
        assert 0 < r["d_prod"] < 1.5 * gaussian["d_prod"]
    assert [r["inexact"] for r in rows] == [None, None, 0, 0, None]
    library = rows[-1]
    assert abs(library["bias"]) < 4 * library["bias_se"]  # the library's exact sketch: unbiased too
