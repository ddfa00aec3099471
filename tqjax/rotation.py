"""Random orthogonal rotations applied to key vectors before scalar quantization.

Kinds (``ROTATION_KINDS``):

* ``"hadamard"``        -- the normalised Sylvester--Hadamard matrix H (dim a power of 2); no randomness.
* ``"random_hadamard"`` -- H @ diag(s) with seeded random signs s (dim a power of 2).
* ``"haar"``            -- a Haar-distributed (uniformly random) orthogonal matrix, any dim.

A :class:`Rotation` maps a row vector x to ``x @ matrix.T`` (i.e. ``matrix @ x`` for a column vector),
computed as a dense float32 matmul, or, for the Hadamard kinds and at most ``FWHT_MAX_ROWS`` rows, with
:func:`fwht` (faster there; see ``FWHT_MAX_ROWS``). The two agree to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

ROTATION_KINDS = ("hadamard", "random_hadamard", "haar")
_HADAMARD_KINDS = ("hadamard", "random_hadamard")

# Largest number of rows (product of the leading dims) for which Rotation.apply/apply_inverse of the
# Hadamard kinds use fwht instead of the dense matmul. experiments/rotation_bench.py (jit, 2-core CPU,
# median of 100 calls, three runs, d in {64, 128, 256}) measured fwht/matmul time ratios of 0.14-1.00
# at 1 row and 0.41-1.09 at 16 rows (e.g. d=256, 16 rows: ~20 us vs ~40 us), 0.89-1.60 at 256 rows,
# 1.0-3.2 at 4096 rows and 1.95-11.5 at 65536 rows (d=128: ~14 ms matmul vs ~31 ms fwht).
FWHT_MAX_ROWS = 16


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_int(name: str, value: object, low: int) -> int:
    """Returns ``value`` as an int if it is an integer (not a bool) >= low; else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_hadamard_dim(dim: int, what: str) -> None:
    if not _is_power_of_two(dim):
        raise ValueError(
            f"{what} supports only dims that are a power of 2 (Sylvester construction), got dim={dim}; "
            f"use rotation kind 'haar' for other dims"
        )


def hadamard_matrix(dim: int) -> np.ndarray:
    """Normalised Sylvester--Hadamard matrix.

    Args:
        dim: Size, a power of 2 (1, 2, 4, ...).

    Returns:
        float64 [dim, dim] with entries +-1/sqrt(dim), symmetric and orthogonal (H @ H = I);
        ``H[i, j] = (-1)^popcount(i & j) / sqrt(dim)``.
    """
    dim = _check_int("dim", dim, 1)
    _check_hadamard_dim(dim, "hadamard_matrix")
    h = np.ones((1, 1))
    while h.shape[0] < dim:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(dim)


@jax.jit
def fwht(x: jax.Array) -> jax.Array:
    """Normalised fast Walsh--Hadamard transform over the last axis (jitted, O(d log d)).

    Args:
        x: Floating array [..., d], d a power of 2.

    Returns:
        ``x @ hadamard_matrix(d)`` (H is symmetric, so also H applied to column vectors), same shape and
        dtype as ``x``. Computed with log2(d) add/subtract butterfly stages and one final scaling by
        1/sqrt(d).
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim == 0:
        raise ValueError(f"fwht expects a floating array [..., d], got {x.dtype} {x.shape}")
    d = x.shape[-1]
    _check_hadamard_dim(d, "fwht")
    y = x.reshape(-1, d)
    half = 1
    while half < d:
        # Stage: within blocks of 2*half, (a, b) -> (a + b, a - b) for a = block[:half], b = block[half:].
        y = y.reshape(-1, d // (2 * half), 2, half)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = jnp.stack([a + b, a - b], axis=2)
        half *= 2
    return y.reshape(x.shape) * jnp.asarray(1.0 / math.sqrt(d), x.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class Rotation:
    """An orthogonal rotation of R^dim (build it with :func:`rotation`).

    Attributes:
        kind: One of ``ROTATION_KINDS``.
        dim: Vector dimension.
        seed: Seed it was built from (``"hadamard"`` ignores it).
        matrix: float32 [dim, dim], orthogonal, read-only; the rotation maps x -> ``x @ matrix.T``.
        signs: float32 [dim] of +-1, read-only, for ``"random_hadamard"`` (``matrix == H @ diag(signs)``);
            None otherwise.
    """

    kind: str
    dim: int
    seed: int
    matrix: np.ndarray
    signs: np.ndarray | None

    def _check(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"expected an array [..., {self.dim}], got shape {x.shape}")
        return x

    def _use_fwht(self, x: jax.Array) -> bool:
        return self.kind in _HADAMARD_KINDS and math.prod(x.shape[:-1]) <= FWHT_MAX_ROWS

    def apply(self, x: jax.Array, precision: jax.lax.Precision = jax.lax.Precision.HIGHEST) -> jax.Array:
        """Rotates rows: [..., dim] -> float32 [..., dim], ``x @ matrix.T`` computed in float32 (the matmul at
        ``precision``; up to ``FWHT_MAX_ROWS`` rows of a Hadamard kind: the exact-order float32 FWHT)."""
        x = self._check(x)
        if self._use_fwht(x):
            return fwht(x if self.signs is None else x * self.signs)  # x diag(s) H = x (H diag(s))^T
        return jnp.matmul(x, jnp.asarray(self.matrix).T, precision=precision)

    def apply_inverse(self, y: jax.Array) -> jax.Array:
        """Undoes :meth:`apply`: [..., dim] -> float32 [..., dim], ``y @ matrix`` computed in float32."""
        y = self._check(y)
        if self._use_fwht(y):
            rotated = fwht(y)  # y H diag(s)
            return rotated if self.signs is None else rotated * self.signs
        return jnp.matmul(y, jnp.asarray(self.matrix), precision=jax.lax.Precision.HIGHEST)


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@functools.lru_cache(maxsize=None)
def _build(kind: str, dim: int, seed: int) -> Rotation:
    if kind == "haar":
        gaussian = np.random.default_rng(seed).standard_normal((dim, dim))
        q, r = np.linalg.qr(gaussian)
        # Fix the column signs so that R has a positive diagonal: the unique such QR of a Gaussian
        # matrix gives a Haar-distributed Q (plain LAPACK QR is biased by its sign convention).
        q = q * np.sign(np.diag(r))
        return Rotation(kind, dim, seed, _read_only(q.astype(np.float32)), None)
    h = hadamard_matrix(dim)
    if kind == "hadamard":
        return Rotation(kind, dim, seed, _read_only(h.astype(np.float32)), None)
    signs = np.where(np.random.default_rng(seed).integers(0, 2, size=dim) == 1, -1.0, 1.0)
    matrix = (h * signs).astype(np.float32)  # H @ diag(signs)
    return Rotation(kind, dim, seed, _read_only(matrix), _read_only(signs.astype(np.float32)))


def rotation(kind: str, dim: int, seed: int = 0) -> Rotation:
    """Returns the (cached) rotation of the given kind, dimension and seed.

    Args:
        kind: One of ``ROTATION_KINDS``.
        dim: Dimension, an int >= 1 (a power of 2 for the Hadamard kinds).
        seed: Non-negative int seed of ``np.random.default_rng``; deterministic per seed.

    Returns:
        A :class:`Rotation`, the same object for the same arguments.

    Raises:
        ValueError: Unknown kind, bad dim or seed, or a Hadamard kind with a dim that is not a power of 2.
    """
    if kind not in ROTATION_KINDS:
        raise ValueError(f"rotation kind must be one of {ROTATION_KINDS}, got {kind!r}")
    dim = _check_int("dim", dim, 1)
    seed = _check_int("seed", seed, 0)
    if kind in _HADAMARD_KINDS:
        _check_hadamard_dim(dim, f"rotation kind {kind!r}")
    return _build(kind, dim, seed)


def default_rotation_kind(dim: int) -> str:
    """``"random_hadamard"`` if ``dim`` is a power of 2, else ``"haar"``."""
    dim = _check_int("dim", dim, 1)
    return "random_hadamard" if _is_power_of_two(dim) else "haar"
