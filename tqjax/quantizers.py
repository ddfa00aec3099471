"""The paper's two vector quantizers, the value quantizer and fp8 keys, on any ``[..., d]`` array.

* :class:`TurboQuantMSE` -- Alg. 1 of Zandieh et al. (arXiv 2504.19874): random rotation, then a
  per-coordinate Lloyd--Max code. The vector norm is kept separately (the algorithm is defined on the
  unit sphere), optionally with vLLM's norm correction.
* :class:`TurboQuantProd` -- Alg. 2: a (b-1)-bit TurboQuantMSE plus a 1-bit QJL sign sketch
  ``sign(S r)`` of the rotated residual ``r`` and its norm; the inner-product estimate is unbiased.
* :func:`quantize_values` -- asymmetric uniform per-vector quantization (b bits, fp16 scale and zero),
  guarded against values outside the fp16 range.
* :func:`quantize_fp8` -- float8 e4m3 keys (vLLM's ``k8v4``), saturating at +-448.

Everything is jnp and jit-able; arithmetic is float32 with float matmuls at HIGHEST precision (the
integer rotation below is exact on float16 operands), so the Pallas store kernel can reproduce the
codes bit for bit. One exception, :data:`PROD_ENCODE_PRECISION`: the two products of
:class:`TurboQuantProd`'s float path (rotations other than Hadamard's), whose codes only XLA computes.

Exact Hadamard codes. With a Hadamard-kind rotation (``"hadamard"``, ``"random_hadamard"``: every
power-of-two dim), :meth:`TurboQuantMSE.quantize` first snaps each vector onto a fixed-point grid
(:func:`snap_to_grid`: integers ``|n| <= 2**g``, ``g = grid_bits(dim)``, a step of ``2**(1-g)`` of the
vector's largest power of two, rounded to the nearest step, so at most half a step per element: below
half a bf16 ulp of the largest element, far below any code's error), rotates the integers with the unnormalised +-1 matrix (every
partial sum an integer below ``2**24``: exact in float32 in any order, on tensor cores too) and compares
``z |z|`` with ``||n||**2 b |b| dim`` (:func:`exact_bucketize`) instead of ``y = z / (sqrt(dim) ||n||)``
with ``b``. Every operation there is exact or one IEEE-rounded product, so XLA (any backend) and the
Pallas store kernel (which rotates inside the kernel) get the same codes bit for bit, without a float
sum whose bits depend on the summation order. The norms (``||n||`` times the grid step, and with norm
correction over ``||c[codes]||``) stay XLA float32 (:func:`grid_norm`,
:meth:`TurboQuantMSE.stored_norm`) on integer inputs that both paths share.

Exact QJL signs. :class:`TurboQuantProd` with a Hadamard kind codes its (b-1)-bit MSE stage as above (``n``,
``z``, ``n2``, codes) and then sketches the residual on integers, so that a kernel's sums in any order give the
reference's signs bit for bit (the paper's sketch ``sign(S r)`` with Gaussian ``S`` and float ``r`` flips the
signs of projections near zero with the summation order)::

    L     = round13(sqrt(f32(n2) dim))          (residual_length: y = z / L)
    w     = z - c[codes] L                      (= L r; c L exact, one rounded difference)
    w_int = snap_to_grid(w, G)                  (|w_int| <= 2**G, G = qjl_grid_bits(dim))
    signs = S_int w_int >= 0                    (S_int = clip(round(4 N(0, 1)), +-31): sums below 2**24, exact)
    gamma = sqrt(f32(||w_int||**2)) step_w / L   (||r||, of the residual on its grid)
    norm  = sqrt(f32(n2)) step                  (||x||, of the vector on its grid)

``S = S_int / (4 sqrt(v))`` (unit-variance entries) is what the query meets. Against the paper's Gaussian
``S`` on the float residual this is as unbiased and as accurate to the precision measured
(``experiments/qjl_sketch.py``, its ``library`` kind: bias within 2.0 standard errors and D_prod within -0.8% /
+0.7% over 16 configurations of 32768 vectors; docs/PERFORMANCE.md, "QJL keys in the Mosaic store").
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tqjax.codebooks import lloyd_max_codebook
from tqjax.rotation import default_rotation_kind, rotation

FP16_MAX = 65504.0
FP8_E4M3_MAX = 448.0
HIGHEST = jax.lax.Precision.HIGHEST
#: Precision of the rotation and sketch products of :class:`TurboQuantProd`'s float path (rotations other than
#: Hadamard's; float32 in, float32 out):
#: ``HIGH`` is three bf16 passes on an NVIDIA GPU (a ~2**-17 relative error per product term; float32 on
#: a CPU, where every precision is float32), against six for HIGHEST. On the H200 at 4096 tokens x 8
#: heads the sketch took 24.6 us instead of 44.3 and 9.5e-5 of its signs differed (projections within
#: ~1e-5 of zero, whose sign says nothing about the residual's direction); ``experiments.store_probe``
#: and ``experiments.distortion`` measure the codes, signs and estimator errors of both precisions.
#: Only XLA computes these codes (the Pallas stores copy XLA's words), so no kernel reproduces them.
PROD_ENCODE_PRECISION = jax.lax.Precision.HIGH
_TINY = 1e-30  # norms below this are treated as zero vectors


def _norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=-1))


def tf32_table(values: np.ndarray) -> np.ndarray:
    """float32, same shape: float64 ``values`` rounded to the nearest number with 11 significant bits
    (ties to even), i.e. exactly representable in tf32 (and in fp16 within its range).

    The decode table of every Lloyd--Max codebook is rounded so: a relative change of at most 2**-11 per
    centroid (the distortion grows by ``E[(c' - c)**2] <= 2**-22 E[c**2]``: by 4e-6 of itself at 4 bits
    and d=128, 2e-5 at 5 bits, 0.1% at 8 bits), which makes a decoded key exact in a tf32 tensor-core
    operand. The Pallas decode then needs only the query split into tf32 high and low parts (two
    products) for float32-accurate scores, where TF32x3 splits both operands (three products).
    """
    m, e = np.frexp(np.asarray(values, np.float64))
    return np.ldexp(np.rint(m * 2.0**11), e - 11).astype(np.float32)


def _fixed_point_squares(centroids: np.ndarray, dim: int) -> tuple[int, np.ndarray]:
    """``(s, round(c**2 * 2**s))`` as int32, with the largest ``s`` for which a sum of ``dim`` of them
    stays below 2**31 (at D=128, 4 bits: s = 27, each square to ~5e-7 relative)."""
    squares = np.asarray(centroids, np.float64) ** 2
    shift = int(np.floor(np.log2(2.0**30 / (dim * max(squares.max(), 1e-300)))))
    return shift, np.round(squares * 2.0**shift).astype(np.int32)


def bucketize(u: jax.Array, boundaries: np.ndarray) -> jax.Array:
    """Index of the Lloyd--Max cell of each element: number of boundaries strictly below it. uint8."""
    return jnp.sum(u[..., None] > jnp.asarray(boundaries), axis=-1, dtype=jnp.int32).astype(jnp.uint8)


def round_half_up(t: jax.Array) -> jax.Array:
    """``floor(t) + (t - floor(t) >= 1/2)``, exactly: ``round(t, AWAY_FROM_ZERO)`` for ``0 <= t < 2**23``.

    Exact in any compiler (also the Pallas store kernel's, whose Triton lowering has no rule for
    ``jax.lax.round``): ``floor``, ``r + 0.5`` and ``r + 1`` for an integer ``|r| < 2**23``, and the
    comparison, which reads the rounded ``t`` itself. (``floor(t + 0.5)`` is not a substitute, its
    addition rounds: ``0.49999997 + 0.5 == 1.0`` in float32; nor is ``t - r >= 0.5``, whose subtraction
    a compiler may fuse with the product that forms ``t`` into an FMA.) For ``t < 0`` halves round up
    instead of away; from ``2**23`` on ``r + 0.5`` rounds.
    """
    r = jnp.floor(t)
    return jnp.where(t >= r + 0.5, r + 1.0, r)


def grid_bits(dim: int) -> int:
    """``g`` of the fixed-point grid of :func:`snap_to_grid` for vectors of ``dim`` elements: the largest
    ``g <= 11`` with ``dim * 4**g <= 2**30``, so that ``|n| <= 2**g`` is exact in float16, the rotated
    integers ``|z| <= dim * 2**g`` in float32, and ``||n||**2`` in int32 (11 up to dim 256, 10 up to 1024)."""
    return min(11, (30 - int(math.log2(dim))) // 2)


def snap_to_grid(x: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """``(n, field)``: ``x`` [..., d] float32 on a per-vector grid of integers ``|n| <= 2**bits``.

    ``n = floor(x * 2**(bits - 1 - E) + 1/2)`` with ``2**E <= max|x| < 2**(E + 1)``, float32 integers
    [..., d]; ``field`` int32 [...] is the float32 exponent field of that power of two (clamped to
    1..254: vectors below ``2**(bits - 128)`` get a coarser grid, zero vectors ``n = 0``). Integer bit
    arithmetic, an exact product by a power of two, one float32 addition rounded to nearest (exact for
    bf16 and fp16 keys, which have few significant bits; for a float32 key it can round up an element
    a hair below a half, ``2**-24`` relative: still a deterministic result) and a floor: the same bits
    in every compiler (an FMA of the product and the addition rounds the same, the product being exact).
    """
    magnitude = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32) & 0x7FFFFFFF
    top = jnp.max(magnitude, axis=-1) >> 23  # biased exponent of max|x| (NaN, inf: 255)
    field = jnp.clip(254 + bits - 1 - top, 1, 254)
    scale = jax.lax.bitcast_convert_type(field << 23, jnp.float32)
    return jnp.floor(x * scale[..., None] + 0.5), field


def grid_step(field: jax.Array) -> jax.Array:
    """The grid step ``2**(127 - field)`` of :func:`snap_to_grid` as float32 (0 for field 254)."""
    return jax.lax.bitcast_convert_type((254 - field) << 23, jnp.float32)


def exact_bucketize(z: jax.Array, n2: jax.Array, thresholds: np.ndarray) -> jax.Array:
    """Codes of the rotated grid vectors: ``sum_j [z |z| > f32(n2) * t_j]``, uint8 [..., d].

    ``z`` [..., d] float32 integers (``n @ M^T`` with the +-1 matrix M), ``n2`` [...] int32 ``||n||**2``,
    ``thresholds`` ``t_j = f32(b_j |b_j| dim)`` for the boundaries ``b_j``: the comparison
    ``y_j > b_j`` of ``y = z / (sqrt(dim) ||n||)``, squared, with two correctly rounded products.
    """
    signed_square = z * jnp.abs(z)
    limits = n2.astype(jnp.float32)[..., None, None] * jnp.asarray(thresholds)
    return jnp.sum(signed_square[..., None] > limits, axis=-1, dtype=jnp.int32).astype(jnp.uint8)


def pm1_matrix(rot) -> np.ndarray:
    """The unnormalised +-1 matrix ``sqrt(dim) Pi`` of a Hadamard-kind rotation, float32 [dim, dim]."""
    return np.rint(rot.matrix.astype(np.float64) * math.sqrt(rot.matrix.shape[-1])).astype(np.float32)


def exact_rotation(x: jax.Array, bits: int, matrix_t) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(z, n2, field)``: ``x`` [..., d] snapped to its grid (:func:`snap_to_grid`, ``n``), rotated in integers
    ``z = n @ M^T`` (float32 [..., d]), ``n2 = ||n||**2`` (int32 [...]) and the grid's field (int32 [...]).

    ``matrix_t``: ``M^T`` [d, d], the transposed +-1 matrix (:func:`pm1_matrix`), numpy or a jax array (the Pallas
    store passes its float16 ref's block). float16 operands, float32 accumulation: ``|n| <= 2**11`` and +-1 are exact
    in float16, every partial sum an integer below 2**24, exact in any order (one tensor-core pass on a GPU, not
    HIGHEST's six)."""
    n, field = snap_to_grid(x.astype(jnp.float32), bits)
    z = jnp.matmul(n.astype(jnp.float16), jnp.asarray(matrix_t, jnp.float16), preferred_element_type=jnp.float32)
    n2 = jnp.sum(jnp.square(n.astype(jnp.int32)), axis=-1, dtype=jnp.int32)
    return z, n2, field


def grid_norm(n2: jax.Array, field: jax.Array) -> jax.Array:
    """``||x||`` of a vector on the grid: ``sqrt(||n||**2)`` times the step, float32 [...]."""
    return jnp.sqrt(n2.astype(jnp.float32)) * grid_step(field)


class MSECode(NamedTuple):
    codes: jax.Array  # uint8 [..., d] in [0, 2**bits)
    norm: jax.Array  # float32 [...]


class ProdCode(NamedTuple):
    codes: jax.Array  # uint8 [..., d], (bits-1)-bit MSE codes (all 0 when bits == 1)
    signs: jax.Array  # uint8 [..., d], 1 where (S r)_i >= 0 else 0
    norm: jax.Array  # float32 [...], ||x||
    residual_norm: jax.Array  # float32 [...], ||r|| of the unit vector's rotated residual


class ProdFeatures(NamedTuple):
    """The float32 intermediates of :meth:`TurboQuantProd.float_features` (the codes are ``bucketize(rotated)``)."""

    rotated: jax.Array  # [..., d], y = Pi x / ||x||
    codes: jax.Array  # uint8 [..., d], (bits-1)-bit MSE codes of y (all 0 when bits == 1)
    residual: jax.Array  # [..., d], r = y - c[codes]
    norm: jax.Array  # [...], ||x||
    residual_norm: jax.Array  # [...], ||r||


class TurboQuantMSE:
    """TurboQuant_mse over the last axis of ``[..., dim]`` arrays.

    ``quantize(x)`` stores ``||x||`` and the codes of ``Pi x / ||x||``; ``dequantize`` returns
    ``||x|| Pi^T c[codes]`` (with ``norm_correction``: ``||x|| Pi^T c / ||c||``, computed as
    ``Pi^T c * stored_norm``, the norm a cache stores: see :meth:`stored_norm`).
    """

    def __init__(
        self,
        dim: int,
        bits: int,
        *,
        rotation_kind: str | None = None,
        seed: int = 0,
        distribution: str = "beta",
        norm_correction: bool = False,
    ) -> None:
        self.dim = dim
        self.bits = bits
        self.norm_correction = norm_correction
        self.rotation = rotation(rotation_kind or default_rotation_kind(dim), dim, seed)
        self.codebook = lloyd_max_codebook(bits, dim, distribution)
        # numpy constants (not jax arrays: a quantizer may first be built inside a trace). The decode table
        # is the codebook rounded to 11 significant bits (see tf32_table); the codes come from the exact
        # codebook's boundaries.
        self.centroids = tf32_table(self.codebook.centroids)
        self.boundaries = self.codebook.boundaries.astype(np.float32)
        self._square_shift, self._squares = _fixed_point_squares(self.centroids, dim)
        # Exact codes for the Hadamard kinds (module docstring): the +-1 matrix sqrt(dim) * Pi and the
        # squared boundaries t_j = b_j |b_j| dim (products of float32 numbers, exact in float64).
        self.exact = self.rotation.kind in ("hadamard", "random_hadamard")
        self.grid_bits = self.pm1 = self.thresholds = None
        if self.exact:
            self.grid_bits = grid_bits(dim)
            self.pm1 = pm1_matrix(self.rotation)
            b = self.boundaries.astype(np.float64)
            self.thresholds = (b * np.abs(b) * dim).astype(np.float32)

    def _check(self, x: jax.Array, name: str) -> None:
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"{name} must have shape [..., {self.dim}], got {x.shape}")

    def rotate(self, x: jax.Array) -> jax.Array:
        """``x @ Pi^T`` in float32, [..., dim]."""
        return self.rotation.apply(x.astype(jnp.float32))

    def rotate_unit(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(Pi x / ||x||, ||x||)`` in float32, ``[..., dim]`` and ``[...]``: what :meth:`quantize` buckets
        for a Haar rotation (the Hadamard kinds take the exact path, :meth:`quantize`).

        A vector of norm below 1e-30 is treated as the zero vector (its rotated unit vector is ~0).
        """
        self._check(x, "x")
        x = x.astype(jnp.float32)
        norm = _norm(x)
        return self.rotate(x / jnp.maximum(norm, _TINY)[..., None]), norm

    def quantize(self, x: jax.Array) -> MSECode:
        """Codes of ``Pi x / ||x||`` and ``||x||``. Hadamard kinds: of the vector snapped to the grid
        (:func:`snap_to_grid`), with exact integer rotation and comparisons (module docstring)."""
        if not self.exact:
            return self.code_of(*self.rotate_unit(x))
        self._check(x, "x")
        z, n2, field = exact_rotation(x, self.grid_bits, self.pm1.T)
        return MSECode(exact_bucketize(z, n2, self.thresholds), grid_norm(n2, field))

    def code_of(self, y: jax.Array, norm: jax.Array) -> MSECode:
        """The code of a rotated unit vector ``y`` ``[..., dim]`` (from :meth:`rotate_unit`) and its norm."""
        return MSECode(bucketize(y, self.boundaries), norm)

    def centroid_vectors(self, codes: jax.Array) -> jax.Array:
        """The codebook's centroids ``c[codes]``, float32 ``[..., dim]`` (never normalised)."""
        return jnp.asarray(self.centroids)[codes.astype(jnp.int32)]

    def stored_norm(self, code: MSECode) -> jax.Array:
        """The scale that multiplies ``c[codes]``, float32 ``[...]``: ``||x||``, or with
        ``norm_correction`` ``||x|| / ||c[codes]||`` (the reconstruction gets the input's norm).

        A cache stores this (rounded to fp16), so that decoding is one multiply per vector and the
        attention kernels never sum ``c**2`` (measured 27-30% of a decode step on the H200).
        """
        if not self.norm_correction:
            return code.norm
        # ||c||^2 as an integer sum of fixed-point squares: exact in any summation order, so every XLA
        # program that stores keys (the reference, the Pallas store) gets the same bits.
        total = jnp.sum(jnp.asarray(self._squares)[code.codes.astype(jnp.int32)], axis=-1, dtype=jnp.int32)
        length = jnp.sqrt(total.astype(jnp.float32) * np.float32(2.0**-self._square_shift))
        return code.norm / jnp.maximum(length, _TINY)

    def dequantize_rotated(self, code: MSECode) -> jax.Array:
        return self.centroid_vectors(code.codes) * self.stored_norm(code)[..., None]

    def dequantize(self, code: MSECode) -> jax.Array:
        return self.rotation.apply_inverse(self.dequantize_rotated(code))


#: The QJL sketch matrix is ``S_int / QJL_STEPS``: normals rounded to quarters (module docstring, "Exact QJL signs").
QJL_STEPS = 4
#: ``|S_int| <= QJL_CLIP``, a normal beyond 7.75 standard deviations (never met at these sizes: the bound makes the
#: sketch's exactness a property of the construction, not of the seed).
QJL_CLIP = 31


def qjl_grid_bits(dim: int) -> int:
    """``G`` of the residual's grid (:func:`snap_to_grid`, ``|w_int| <= 2**G``): the largest ``G <= 11`` with
    ``dim * QJL_CLIP * 2**G < 2**24``, so that every partial sum of ``S_int w_int`` is an integer exact in float32
    (11 up to dim 256, 10 at 512)."""
    g = 11
    while dim * QJL_CLIP * 2**g >= 2**24:
        g -= 1
    return g


@functools.lru_cache(maxsize=None)
def qjl_sketch_matrix(dim: int, seed: int) -> np.ndarray:
    """``S_int``: float32 integers [dim, dim], ``clip(round(QJL_STEPS z), +-QJL_CLIP)`` for i.i.d. N(0, 1) ``z``,
    deterministic per seed (a stream of its own, independent of the rotation's)."""
    rng = np.random.default_rng([seed, 0x514A4C])
    s = np.clip(np.rint(QJL_STEPS * rng.standard_normal((dim, dim))), -QJL_CLIP, QJL_CLIP).astype(np.float32)
    s.flags.writeable = False
    return s


@functools.lru_cache(maxsize=None)
def qjl_entry_variance() -> float:
    """``E[(S_int / QJL_STEPS)**2]`` over the normal's distribution (float64): ``1 + 1/192`` nearly (the rounding's
    ``1 / (12 QJL_STEPS**2)``)."""
    edges = [(k + 0.5) / QJL_STEPS for k in range(-QJL_CLIP - 1, QJL_CLIP + 1)]
    cdf = [0.0] + [0.5 * (1.0 + math.erf(e / math.sqrt(2.0))) for e in edges[1:-1]] + [1.0]
    return sum((k / QJL_STEPS) ** 2 * (cdf[i + 1] - cdf[i]) for i, k in enumerate(range(-QJL_CLIP, QJL_CLIP + 1)))


@functools.lru_cache(maxsize=None)
def qjl_matrix(dim: int, seed: int) -> np.ndarray:
    """The QJL projection ``S`` the query meets: :func:`qjl_sketch_matrix` over ``QJL_STEPS sqrt(v)`` (v:
    :func:`qjl_entry_variance`), float32 [dim, dim] of unit-variance entries, so the estimator keeps the paper's
    ``sqrt(pi/2) / d`` scale. Its rows have the signs' directions: ``sign(S r) = sign(S_int r)``."""
    s = (qjl_sketch_matrix(dim, seed).astype(np.float64) / (QJL_STEPS * math.sqrt(qjl_entry_variance())))
    s = s.astype(np.float32)
    s.flags.writeable = False
    return s


def _square_exceeds(high: jax.Array, low: jax.Array, a: jax.Array) -> jax.Array:
    """``high 2**26 + low > a**2`` for int32 ``0 <= low < 2**26``, ``0 < a < 2**25 + 2**13``, in int32 arithmetic:
    ``a = ah 2**13 + al``, so ``a**2 = ah**2 2**26 + 2 ah al 2**13 + al**2`` in digits of base ``2**26`` (every
    partial result below ``2**27``)."""
    ah, al = a >> 13, a & 0x1FFF
    cross = 2 * ah * al
    sq_low = al * al + ((cross & 0x1FFF) << 13)
    sq_high = ah * ah + (cross >> 13) + (sq_low >> 26)
    sq_low = sq_low & 0x3FFFFFF
    return (high > sq_high) | ((high == sq_high) & (low > sq_low))


def correctly_rounded_sqrt(x: jax.Array, root=jnp.sqrt, ulps: int = 3) -> jax.Array:
    """IEEE's square root of float32 ``x`` [...] (each zero or a positive normal number), correctly rounded, from
    ``root(x)``, any float32 within ``ulps`` units in the last place of it (OpenCL allows a single-precision root 3;
    a compiled Triton ``jnp.sqrt`` was off by one for 0.08% of :func:`residual_length`'s inputs on the H200).

    Integer arithmetic only (int32: no float64, no fused multiply-add), so the same on every backend: with
    ``x = mant 4**k``, ``mant`` an integer in ``[2**24, 2**26)``, the root is ``S 2**(k - 11)`` for the integer
    ``S`` with ``(2S - 1)**2 < mant 2**24 < (2S + 1)**2`` (never equal: an odd square against an even number). ``S``
    starts from ``root(x)`` and each step moves it by one towards that interval (:func:`_square_exceeds`: 50-bit
    squares in digits of ``2**26``); past a power of two an ulp is two units of ``S``, so ``2 ulps`` steps."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    p = ((bits >> 23) & 0xFF) - 150  # x = m 2**p, m = the 24-bit significand
    m = (bits & 0x7FFFFF) | 0x800000
    odd = (p & 1) == 1
    mant = jnp.where(odd, m << 1, m << 2)  # in [2**24, 2**26)
    k = jnp.where(odd, p - 1, p - 2) >> 1  # x = mant 4**k
    high, low = mant >> 2, (mant & 3) << 24  # mant 2**24 in digits of 2**26

    def pow2(e: jax.Array) -> jax.Array:
        return jax.lax.bitcast_convert_type((e + 127) << 23, jnp.float32)

    s = (root(x) * pow2(11 - k)).astype(jnp.int32)  # an integer-valued float: its root's S
    for _ in range(2 * ulps):
        up = _square_exceeds(high, low, 2 * s + 1)
        down = ~_square_exceeds(high, low, 2 * s - 1)
        s = s + up.astype(jnp.int32) - down.astype(jnp.int32)
    return jnp.where(x == 0, np.float32(0), s.astype(jnp.float32) * pow2(k - 11))


def residual_length(n2: jax.Array, dim: int, sqrt=jnp.sqrt) -> jax.Array:
    """``L = sqrt(dim ||n||**2)`` rounded to 13 significant bits (to nearest, ties to even), float32 [...]: the
    scale of the rotated grid vector, ``y = z / L``. With 13 bits, ``c L`` is exact in float32 for every centroid
    ``c`` (11 significant bits, :func:`tf32_table`); the rounding scales ``y`` by at most ``1 +- 2**-13``, to
    nearest, so by a factor whose mean over vectors is 1. The square root is IEEE's, correctly rounded (XLA's on a
    CPU; ``sqrt``: a kernel's own, e.g. the Pallas store's ``sqrt.rn``: a compiled Triton kernel's ``jnp.sqrt``
    is not, and moved ``L`` for 0.08% of inputs on the H200)."""
    length = sqrt(n2.astype(jnp.float32) * np.float32(dim))
    bits = jax.lax.bitcast_convert_type(length, jnp.int32)
    bits = (bits + 0x3FF + ((bits >> 11) & 1)) & ~0x7FF
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def exact_sketch(w: jax.Array, bits: int, sketch_t) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(positive, w2, field)``: the residual ``w`` [..., d] float32 snapped to its grid (:func:`snap_to_grid`,
    ``w_int``, ``bits`` = :func:`qjl_grid_bits`), the signs ``S_int w_int >= 0`` (bool [..., d]), ``||w_int||**2``
    (int32 [...]) and the grid's field (int32 [...]).

    ``sketch_t``: ``S_int^T`` [d, d] (:func:`qjl_sketch_matrix`), numpy or a jax array. float16 operands (integers
    up to ``2**bits`` and :data:`QJL_CLIP`), float32 accumulation: every partial sum an integer below 2**24, exact in
    any order."""
    w_int, field = snap_to_grid(w, bits)
    sketch_t = jnp.asarray(sketch_t, jnp.float16)
    sketch = jnp.matmul(w_int.astype(jnp.float16), sketch_t, preferred_element_type=jnp.float32)
    w2 = jnp.sum(jnp.square(w_int.astype(jnp.int32)), axis=-1, dtype=jnp.int32)
    return sketch >= 0, w2, field


def residual_grid_norm(w2: jax.Array, field: jax.Array, length: jax.Array) -> jax.Array:
    """``gamma = ||r||``, float32 [...], of a residual on its grid: ``sqrt(f32(||w_int||**2))`` times the step, over
    ``max(L, 1)`` (:func:`residual_length`; ``w = L r``)."""
    return jnp.sqrt(w2.astype(jnp.float32)) * grid_step(field) / jnp.maximum(length, 1.0)


class TurboQuantProd:
    """TurboQuant_prod over ``[..., dim]``: (bits-1)-bit MSE + 1-bit QJL on the residual (bits >= 1).

    With ``x = ||x|| u``, rotated unit vector ``y = Pi u``, MSE reconstruction ``m = c[codes]``, residual
    ``r = y - m``: store codes, ``sign(S r)``, ``||x||`` and ``gamma = ||r||``. The estimate of
    ``<q, x>`` is ``||x|| (<Pi q, m> + sqrt(pi/2)/d * gamma * <S Pi q, sign(S r)>)``, unbiased.

    ``S`` has normals rounded to quarters (:func:`qjl_matrix`), not the paper's normals. Hadamard kinds code exactly
    (module docstring, "Exact QJL signs"), the others with float32 products at :data:`PROD_ENCODE_PRECISION`.
    """

    def __init__(
        self,
        dim: int,
        bits: int,
        *,
        rotation_kind: str | None = None,
        seed: int = 0,
        distribution: str = "beta",
    ) -> None:
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {bits}")
        self.dim = dim
        self.bits = bits
        self.rotation = rotation(rotation_kind or default_rotation_kind(dim), dim, seed)
        self.mse = (
            TurboQuantMSE(dim, bits - 1, rotation_kind=self.rotation.kind, seed=seed, distribution=distribution)
            if bits > 1
            else None
        )
        self.projection = qjl_matrix(dim, seed)  # numpy float32 [dim, dim]
        self.sketch_matrix = qjl_sketch_matrix(dim, seed)  # numpy float32 integers [dim, dim]
        self.qjl_scale = math.sqrt(math.pi / 2) / dim
        self.exact = self.rotation.kind in ("hadamard", "random_hadamard")
        self.grid_bits = self.pm1 = None
        self.sketch_grid_bits = qjl_grid_bits(dim)
        if self.exact:
            self.grid_bits = grid_bits(dim)
            self.pm1 = pm1_matrix(self.rotation)

    def _mse_part(self, codes: jax.Array) -> jax.Array:
        if self.mse is None:
            return jnp.zeros(codes.shape, jnp.float32)
        return self.mse.centroid_vectors(codes)

    def float_features(self, x: jax.Array, precision: jax.lax.Precision = PROD_ENCODE_PRECISION) -> ProdFeatures:
        """The float path's intermediates (every rotation kind; :meth:`quantize` takes it for non-Hadamard kinds):
        ``y = Pi x / ||x||`` at ``precision``, its MSE codes and residual ``r = y - c[codes]``, the norms."""
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"x must have shape [..., {self.dim}], got {x.shape}")
        x = x.astype(jnp.float32)
        norm = _norm(x)
        y = self.rotation.apply(x / jnp.maximum(norm, _TINY)[..., None], precision=precision)
        codes = jnp.zeros(y.shape, jnp.uint8) if self.mse is None else bucketize(y, self.mse.boundaries)
        r = y - self._mse_part(codes)
        return ProdFeatures(y, codes, r, norm, _norm(r))

    def quantize(self, x: jax.Array) -> ProdCode:
        """Codes, sketch signs and norms of ``x`` [..., dim]: exactly for Hadamard kinds (module docstring),
        otherwise from :meth:`float_features` and a float32 sketch at :data:`PROD_ENCODE_PRECISION`."""
        if not self.exact:
            f = self.float_features(x)
            sketch = jnp.matmul(f.residual, self.projection.T, precision=PROD_ENCODE_PRECISION)
            return ProdCode(f.codes, (sketch >= 0).astype(jnp.uint8), f.norm, f.residual_norm)
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"x must have shape [..., {self.dim}], got {x.shape}")
        z, n2, field = exact_rotation(x, self.grid_bits, self.pm1.T)
        if self.mse is None:
            codes = jnp.zeros(z.shape, jnp.uint8)
        else:
            codes = exact_bucketize(z, n2, self.mse.thresholds)
        length = residual_length(n2, self.dim)
        # w = L r: an exact product (11 x 13 significant bits) and one rounded difference, the same in any compiler
        w = z - self._mse_part(codes) * length[..., None]
        positive, w2, w_field = exact_sketch(w, self.sketch_grid_bits, self.sketch_matrix.T)
        gamma = residual_grid_norm(w2, w_field, length)
        return ProdCode(codes, positive.astype(jnp.uint8), grid_norm(n2, field), gamma)

    def qjl_vectors(self, signs: jax.Array, residual_norm: jax.Array) -> jax.Array:
        """``sqrt(pi/2)/d * gamma * (2 signs - 1)``: the sign sketch as the vector the projected query meets."""
        pm = signs.astype(jnp.float32) * 2.0 - 1.0
        return pm * (self.qjl_scale * residual_norm)[..., None]

    def dequantize_rotated(self, code: ProdCode) -> jax.Array:
        qjl = jnp.matmul(self.qjl_vectors(code.signs, code.residual_norm), self.projection, precision=HIGHEST)
        return (self._mse_part(code.codes) + qjl) * code.norm[..., None]

    def dequantize(self, code: ProdCode) -> jax.Array:
        return self.rotation.apply_inverse(self.dequantize_rotated(code))

    def prepare_query(self, q: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Rotate and project the query once: ``(Pi q, S Pi q)``, each float32 [..., dim]."""
        q_rot = self.rotation.apply(q.astype(jnp.float32))
        return q_rot, jnp.matmul(q_rot, self.projection.T, precision=HIGHEST)

    def inner_product(self, prepared: tuple[jax.Array, jax.Array], code: ProdCode) -> jax.Array:
        """Unbiased estimate of ``<q, x>`` without dequantizing; broadcasts ``prepared`` against ``code``."""
        q_rot, q_proj = prepared
        mse = jnp.sum(q_rot * self._mse_part(code.codes), axis=-1)
        qjl = jnp.sum(q_proj * self.qjl_vectors(code.signs, code.residual_norm), axis=-1)
        return code.norm * (mse + qjl)


# ---- values --------------------------------------------------------------------------------------


class ValueCode(NamedTuple):
    codes: jax.Array  # uint8 [..., d]
    scale: jax.Array  # float16 [...]
    zero: jax.Array  # float16 [...]


def quantize_values(v: jax.Array, bits: int) -> ValueCode:
    """Asymmetric uniform per-vector quantization of ``v [..., d]`` to ``bits`` (2..8) bits.

    Elements are first clamped to the fp16 range (+-65504), so scale = (max - min) / (2**bits - 1) and
    zero = min are finite fp16 numbers for every input (vLLM issue #53334: |v| > 65504 in real models).
    Codes use the fp16-rounded scale and zero. Each element of the clamped vector is reconstructed
    within ``scale / 2`` plus fp16 rounding of scale and zero, so an out-of-range element only widens
    its own vector's step.

    The arithmetic is spelled so that no compiler can rewrite it (every value below is one IEEE
    operation on already-rounded operands; no multiply is followed by an add that could fuse into an
    FMA, no division by a constant is left for a compiler to turn into a reciprocal multiply), which is
    what lets the Pallas store kernel reproduce the codes bit for bit::

        scale = f16((max - min) * f32(1 / levels));  zero = f16(min)
        inv   = fp16_reciprocals()[bits(scale)]         (correctly rounded 1 / scale; 1 where scale == 0)
        code  = clip(round_half_away((v - zero) * inv), 0, levels)

    The reciprocal comes from a 65536-entry table indexed by the fp16 bits of the scale rather than a
    division, because compilers disagree on float32 division (XLA's GPU backend and Triton both emit
    an approximate division on CUDA): a table lookup is the same on every platform and in every kernel.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"value bits must be in 2..8, got {bits}")
    levels = (1 << bits) - 1
    v = jnp.clip(v.astype(jnp.float32), -FP16_MAX, FP16_MAX)
    lo = jnp.min(v, axis=-1)
    hi = jnp.max(v, axis=-1)
    scale = ((hi - lo) * np.float32(1.0 / levels)).astype(jnp.float16)
    zero = lo.astype(jnp.float16)
    inv = jnp.asarray(fp16_reciprocals())[jax.lax.bitcast_convert_type(scale, jnp.uint16).astype(jnp.int32)]
    t = (v - zero.astype(jnp.float32)[..., None]) * inv[..., None]
    q = jax.lax.round(t, jax.lax.RoundingMethod.AWAY_FROM_ZERO)
    return ValueCode(jnp.clip(q, 0, levels).astype(jnp.uint8), scale, zero)


@functools.lru_cache(maxsize=None)
def fp16_reciprocals() -> np.ndarray:
    """float32 [65536]: entry ``i`` is ``1 / x`` correctly rounded to float32, where ``x`` is the fp16
    number with bit pattern ``i``; 1.0 where ``x`` is not a positive finite number (scale 0).

    Computed in float64 and rounded once more to float32; 1 / x = 2**-e / m with an odd 11-bit m never
    lies on a float32 rounding tie, and ``tests/test_quantizers.py`` checks every entry exactly.
    """
    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)
    ok = np.isfinite(x) & (x > 0)
    out = np.ones(1 << 16, np.float32)
    out[ok] = (1.0 / x[ok]).astype(np.float32)
    out.flags.writeable = False
    return out


def dequantize_values(code: ValueCode) -> jax.Array:
    """``codes * scale + zero`` in float32, [..., d]."""
    return code.codes.astype(jnp.float32) * code.scale.astype(jnp.float32)[..., None] + code.zero.astype(
        jnp.float32
    )[..., None]


# ---- fp8 keys ------------------------------------------------------------------------------------


def quantize_fp8(x: jax.Array) -> jax.Array:
    """float8 e4m3fn, saturating at +-448 (e4m3fn has no inf)."""
    return jnp.clip(x.astype(jnp.float32), -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(jnp.float8_e4m3fn)
