"""``experiments/distortion.py``: its building blocks on small samples, and the CLI end to end.

Statistical tolerances follow ``tests/test_quantizers.py``: a Monte-Carlo mean is compared with its exact
value within 4 standard errors, here the SE of the mean of per-seed batch means that ``measure`` reports
(the inputs and seeds are fixed, so the tests are deterministic).
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from once_per_run import computed_once

from experiments import distortion as dist

D = 128
BATCHES, PER_BATCH = 16, 128  # 2048 samples per configuration, 16 quantizer seeds


@pytest.fixture(scope="module")
def sphere() -> tuple[np.ndarray, np.ndarray]:
    return dist.family_inputs("sphere", BATCHES, PER_BATCH, D)


@pytest.fixture(scope="module")
def haar_rows(sphere, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], dist.Row]:
    """TurboQuant_mse and _prod with fresh Haar rotations, b = 1..5, on uniform unit vectors."""
    return computed_once(
        tmp_path_factory, "haar_rows",
        lambda: {(m, b): dist.measure("sphere", "haar", m, b, *sphere) for m in dist.METHODS for b in range(1, 6)},
    )


def test_inputs_unit_and_queries_correlated() -> None:
    rng = np.random.default_rng(0)
    for family in dist.FAMILIES:
        x = dist.sample_inputs(family, 64, D, rng)
        y = dist.sample_queries(x, 0.5, rng)
        assert x.dtype == y.dtype == np.float32 and x.shape == y.shape == (64, D)
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(np.sum(x * y, axis=1), 0.5, atol=1e-6)
    # The outlier channels carry most of the energy (4 channels x 20^2 against ~124 others).
    x = dist.sample_inputs("outlier", 256, D, rng)
    assert np.mean(np.sum(x[:, dist.outlier_channels(D)] ** 2, axis=1)) > 0.8


def test_dmse_haar_matches_lloyd_max(haar_rows) -> None:
    r = haar_rows["mse", 2]
    exact = D * dist.lloyd_max_codebook(2, D).mse
    assert r.d_mse_exact == exact
    assert r.d_mse_se < 0.01 * exact, r  # the 4-SE check below resolves ~4% of the value or better
    assert abs(r.d_mse - exact) < 4 * r.d_mse_se, (r.d_mse, exact, r.d_mse_se)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_prod_dmse_matches_qjl_formula(haar_rows, bits: int) -> None:
    """D_mse of TurboQuant_prod = (pi/2 - 1/d) * D_mse of its (b-1)-bit stage (1 when b = 1)."""
    r = haar_rows["prod", bits]
    assert abs(r.d_mse - r.d_mse_exact) < 4 * r.d_mse_se, (r.d_mse, r.d_mse_exact, r.d_mse_se)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_prod_inner_product_unbiased(haar_rows, bits: int) -> None:
    r = haar_rows["prod", bits]
    assert r.bias_theory == 0.0
    assert abs(r.bias) < 4 * r.bias_se, (r.bias, r.bias_se)
    # Power: the same samples would resolve the MSE quantizer's shrinkage at the same b.
    assert abs(haar_rows["mse", bits].bias_theory) > 4 * r.bias_se


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_mse_inner_product_shrinks(haar_rows, bits: int) -> None:
    """E[<y, x~> - <y, x>] = -D_mse <y, x> < 0 for TurboQuant_mse: negative, and of the predicted size."""
    r = haar_rows["mse", bits]
    assert r.bias + 4 * r.bias_se < 0, (r.bias, r.bias_se)
    assert r.bias_theory == pytest.approx(-dist.QUERY_CORRELATION * r.d_mse_exact)
    assert abs(r.bias - r.bias_theory) < 4 * r.bias_se, (r.bias, r.bias_theory, r.bias_se)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_theorem_bounds_hold_on_unit_vectors(haar_rows, bits: int) -> None:
    mse, prod = haar_rows["mse", bits], haar_rows["prod", bits]
    lower_mse, lower_prod = 4.0**-bits, 4.0**-bits / D  # Thm 3, ||y|| = 1
    upper_mse = math.sqrt(3) * math.pi / 2 * 4.0**-bits  # Thm 1
    upper_prod = math.sqrt(3) * math.pi**2 / D * 4.0**-bits  # Thm 2
    assert (mse.d_mse_lower, mse.d_mse_upper, mse.d_prod_lower) == pytest.approx((lower_mse, upper_mse, lower_prod))
    assert (prod.d_prod_lower, prod.d_prod_upper) == pytest.approx((lower_prod, upper_prod))
    assert lower_mse <= mse.d_mse <= upper_mse
    assert lower_prod <= prod.d_prod <= upper_prod
    assert lower_mse <= prod.d_mse and lower_prod <= mse.d_prod  # Thm 3 binds every b-bit quantizer
    assert mse.within_bounds and prod.within_bounds
    # D_prod = bias^2 + variance (up to the n / (n - 1) of the unbiased variance).
    for r in (mse, prod):
        assert r.d_prod == pytest.approx(r.bias**2 + r.variance, rel=1e-3)


def test_plain_hadamard_fails_on_dc_offset_randomised_does_not() -> None:
    """N(2, 1) entries: plain H maps the all-ones direction onto one coordinate, far outside the codebook."""
    x, y = dist.family_inputs("dc_offset", 8, 64, D)
    plain = dist.measure("dc_offset", "hadamard", "mse", 3, x, y)
    randomised = dist.measure("dc_offset", "random_hadamard", "mse", 3, x, y)
    assert plain.d_mse > 5 * plain.d_mse_exact and plain.d_mse > plain.d_mse_upper and not plain.within_bounds
    assert abs(randomised.d_mse - randomised.d_mse_exact) < 4 * randomised.d_mse_se
    assert randomised.within_bounds


def test_cli_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "dist"
    rows = dist.main(
        ["--dim", "16", "--bits", "1", "2", "--samples", "40", "--batches", "4", "--out", str(out),
         "--families", "sphere", "outlier"]
    )  # fmt: skip
    n = 2 * len(dist.ROTATION_KINDS) * 2 * len(dist.METHODS)  # families x rotations x bits x methods
    assert len(rows) == n and all(r.samples == 40 and r.dim == 16 for r in rows)
    printed = capsys.readouterr().out
    assert f"[{n}/{n}]" in printed and "D_mse" in printed
    with open(out / "distortion.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == n and {"d_mse", "d_mse_se", "bias", "variance", "d_prod", "d_prod_upper"} <= set(table[0])
    report = json.loads((out / "distortion.json").read_text())
    assert report["config"]["dim"] == 16 and len(report["rows"]) == n
    assert (out / "distortion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_hadamard_on_non_power_of_two_dim() -> None:
    with pytest.raises(SystemExit):
        dist.main(["--dim", "96", "--rotations", "hadamard"])
