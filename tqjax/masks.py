"""Static attention masks (causal, local window, AND / OR, per head) and their block tables.

A mask says which key j a query i may attend to. Every mask here depends only on the difference
``d = j - i`` and is a finite union of diagonal *bands* ``lo <= d <= hi`` (``lo``/``hi`` may be
unbounded):

* :class:`CausalMask` (offset o): ``j <= i + o``, the band ``(-inf, o]``;
* :class:`LocalMask` (left L, right R, offset o): ``i - L + o <= j <= i + R + o`` (either side may
  be None = unbounded), the band ``[o - L, o + R]``. This is the convention of splash attention and
  of ``jax.nn.dot_product_attention(local_window_size=(L, R))``: ``LocalMask(L, 0)`` lets a query
  see itself and the L keys before it;
* :class:`FullMask`: everything; :class:`EmptyMask`: nothing;
* ``a & b`` (:class:`AndMask`) and ``a | b`` (:class:`OrMask`): intersection / union of band sets
  (AND distributes over the unions);
* :class:`MultiHeadMask`: one mask per query head.

Masks are frozen dataclasses: hashable and comparable, so a jitted function can take one as a
static argument. Inside a kernel a mask is evaluated as ``OR_b (lo_b <= d <= hi_b)`` over its
normalised bands (:meth:`Mask.bands`), with ``d`` the difference of the query's and key's positions.

:func:`block_table` compiles a mask on the host (numpy) into a ``[H, nq, nk]`` int8 table of
:data:`EMPTY` / :data:`PARTIAL` / :data:`FULL` blocks for given block sizes: a block is FULL when
every (query, key) pair of it that lies inside ``[0, q_len) x [0, kv_len)`` is allowed, EMPTY when
none is. Since all pairs of a rectangular block of rows ``[r0, r1)`` and columns ``[c0, c1)`` cover
exactly the integer differences ``[c0 - r1 + 1, c1 - 1 - r0]``, the table follows from interval
arithmetic on the bands, without forming the dense mask.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

__all__ = [
    "EMPTY", "FULL", "INF", "PARTIAL", "AndMask", "CausalMask", "EmptyMask", "FullMask", "LocalMask", "Mask",
    "MultiHeadMask", "OrMask", "block_table", "compact_table", "dense_mask", "head_bands",
]

EMPTY, PARTIAL, FULL = 0, 1, 2
#: Stands for an unbounded band side; positions and differences must stay below this in magnitude.
INF = 1 << 30

Band = tuple[int, int]


def _normalise(bands: Sequence[Band]) -> tuple[Band, ...]:
    """Sorted, merged, non-empty integer bands clipped to [-INF, INF] (adjacent bands merge)."""
    bs = sorted((max(lo, -INF), min(hi, INF)) for lo, hi in bands if max(lo, -INF) <= min(hi, INF))
    out: list[list[int]] = []
    for lo, hi in bs:
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


class Mask:
    """Base class: a static mask on (query position i, key position j)."""

    def bands(self) -> tuple[Band, ...]:
        """The mask as a normalised union of bands ``lo <= j - i <= hi`` (sorted, disjoint)."""
        raise NotImplementedError

    def evaluate(self, q, kv):
        """Elementwise allowed(q, kv) on broadcastable integer arrays (numpy or jnp), computed
        directly from the definition (not from :meth:`bands`): the brute-force ground truth."""
        raise NotImplementedError

    def __and__(self, other: Mask) -> Mask:
        return AndMask((self, other))

    def __or__(self, other: Mask) -> Mask:
        return OrMask((self, other))

    @property
    def num_heads(self) -> int | None:
        """Heads of a :class:`MultiHeadMask`; None for a mask shared by all heads."""
        return None


@dataclasses.dataclass(frozen=True)
class FullMask(Mask):
    def bands(self):
        return ((-INF, INF),)

    def evaluate(self, q, kv):
        return (q - q) == (kv - kv)


@dataclasses.dataclass(frozen=True)
class EmptyMask(Mask):
    def bands(self):
        return ()

    def evaluate(self, q, kv):
        return (q - q) != (kv - kv)


@dataclasses.dataclass(frozen=True)
class CausalMask(Mask):
    """Key j is visible to query i iff ``j <= i + offset``."""

    offset: int = 0

    def bands(self):
        return _normalise([(-INF, self.offset)])

    def evaluate(self, q, kv):
        return kv <= q + self.offset


@dataclasses.dataclass(frozen=True)
class LocalMask(Mask):
    """Key j is visible to query i iff ``i - left + offset <= j <= i + right + offset``; a side that
    is None is unbounded. ``LocalMask(w - 1, 0)`` is a causal sliding window of w keys."""

    left: int | None
    right: int | None = 0
    offset: int = 0

    def __post_init__(self):
        for name in ("left", "right"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, np.integer)) or v < 0):
                raise ValueError(f"LocalMask {name} must be a non-negative int or None, got {v!r}")

    def bands(self):
        lo = -INF if self.left is None else self.offset - int(self.left)
        hi = INF if self.right is None else self.offset + int(self.right)
        return _normalise([(lo, hi)])

    def evaluate(self, q, kv):
        ok = FullMask().evaluate(q, kv)
        if self.left is not None:
            ok = ok & (kv >= q - self.left + self.offset)
        if self.right is not None:
            ok = ok & (kv <= q + self.right + self.offset)
        return ok


@dataclasses.dataclass(frozen=True)
class AndMask(Mask):
    masks: tuple[Mask, ...]

    def __post_init__(self):
        _check_shared(self.masks, "AndMask")

    def bands(self):
        acc: tuple[Band, ...] = ((-INF, INF),)
        for m in self.masks:
            acc = _normalise([(max(a, c), min(b, d)) for a, b in acc for c, d in m.bands()])
        return acc

    def evaluate(self, q, kv):
        ok = FullMask().evaluate(q, kv)
        for m in self.masks:
            ok = ok & m.evaluate(q, kv)
        return ok


@dataclasses.dataclass(frozen=True)
class OrMask(Mask):
    masks: tuple[Mask, ...]

    def __post_init__(self):
        _check_shared(self.masks, "OrMask")

    def bands(self):
        return _normalise([b for m in self.masks for b in m.bands()])

    def evaluate(self, q, kv):
        ok = EmptyMask().evaluate(q, kv)
        for m in self.masks:
            ok = ok | m.evaluate(q, kv)
        return ok


@dataclasses.dataclass(frozen=True)
class MultiHeadMask(Mask):
    """One shared-form mask per query head (``masks[h]`` applies to query head h)."""

    masks: tuple[Mask, ...]

    def __post_init__(self):
        if not self.masks:
            raise ValueError("MultiHeadMask needs at least one mask")
        _check_shared(self.masks, "MultiHeadMask")

    @property
    def num_heads(self) -> int:
        return len(self.masks)

    def bands(self):
        raise TypeError("a MultiHeadMask has bands per head: use head_bands(mask, num_heads)")

    def evaluate(self, q, kv):
        raise TypeError("a MultiHeadMask is evaluated per head: use mask.masks[h].evaluate")

    def __and__(self, other):
        raise TypeError("combine the per-head masks before building the MultiHeadMask")

    __or__ = __and__


def _check_shared(masks, what):
    for m in masks:
        if not isinstance(m, Mask):
            raise TypeError(f"{what} takes Mask objects, got {type(m).__name__}")
        if isinstance(m, MultiHeadMask):
            raise TypeError(f"{what} cannot contain a MultiHeadMask")


def head_bands(mask: Mask, num_heads: int) -> tuple[tuple[Band, ...], ...]:
    """Bands of every query head: ``num_heads`` entries, or one entry when all heads share them."""
    if isinstance(mask, MultiHeadMask):
        if mask.num_heads != num_heads:
            raise ValueError(f"MultiHeadMask has {mask.num_heads} masks for {num_heads} query heads")
        per = tuple(m.bands() for m in mask.masks)
        return per[:1] if all(b == per[0] for b in per) else per
    return (mask.bands(),)


def dense_mask(mask: Mask, q_len: int, kv_len: int, num_heads: int | None = None) -> np.ndarray:
    """Brute-force bool mask ``[H, q_len, kv_len]`` from :meth:`Mask.evaluate` (H = ``num_heads``
    for a MultiHeadMask, else 1)."""
    q = np.arange(q_len)[:, None]
    kv = np.arange(kv_len)[None, :]
    masks = mask.masks if isinstance(mask, MultiHeadMask) else (mask,)
    return np.stack([np.broadcast_to(m.evaluate(q, kv), (q_len, kv_len)) for m in masks])


def _classify(bands: tuple[Band, ...], dmin: np.ndarray, dmax: np.ndarray) -> np.ndarray:
    """EMPTY / PARTIAL / FULL for blocks whose differences cover the integer ranges [dmin, dmax]."""
    any_hit = np.zeros(dmin.shape, bool)
    covered = np.zeros(dmin.shape, bool)
    for lo, hi in bands:  # disjoint and sorted, not adjacent: [dmin, dmax] is covered by one band or none
        any_hit |= np.maximum(lo, dmin) <= np.minimum(hi, dmax)
        covered |= (lo <= dmin) & (dmax <= hi)
    out = np.where(any_hit, PARTIAL, EMPTY).astype(np.int8)
    out[covered] = FULL
    out[dmin > dmax] = EMPTY  # blocks entirely outside [0, q_len) x [0, kv_len)
    return out


@functools.lru_cache(maxsize=256)
def block_table(mask: Mask, q_len: int, kv_len: int, block_q: int, block_k: int, num_heads: int | None = None):
    """int8 ``[H, ceil(q_len / block_q), ceil(kv_len / block_k)]`` of EMPTY / PARTIAL / FULL.

    H is 1 when every head shares the mask (including a MultiHeadMask whose heads are all equal),
    else the number of query heads. Only pairs inside ``[0, q_len) x [0, kv_len)`` count. The result
    is read-only (cached).
    """
    nh = num_heads if num_heads is not None else mask.num_heads
    per_head = head_bands(mask, nh) if isinstance(mask, MultiHeadMask) else (mask.bands(),)
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    r0 = np.arange(nq)[:, None] * block_q
    r1 = np.minimum(r0 + block_q, q_len)
    c0 = np.arange(nk)[None, :] * block_k
    c1 = np.minimum(c0 + block_k, kv_len)
    dmin = c0 - (r1 - 1)
    dmax = (c1 - 1) - r0
    table = np.stack([_classify(b, dmin, dmax) for b in per_head])
    table.setflags(write=False)
    return table


def compact_table(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a ``[H, n_rows, n_cols]`` block table: the non-empty column indices in ascending
    order, padded to the longest row with ``n_cols`` (a sentinel above every index), their FULL
    flags (int32 0/1, 0 in the padding) and the counts. Shapes ``[H, n_rows, max(1, max count)]``
    and ``[H, n_rows]``, int32."""
    nc = table.shape[-1]
    nonempty = table != EMPTY
    count = nonempty.sum(-1).astype(np.int32)
    width = max(1, int(count.max(initial=0)))
    order = np.argsort(~nonempty, axis=-1, kind="stable")[..., :width]
    used = np.arange(width)[None, None, :] < count[..., None]
    index = np.where(used, order, nc).astype(np.int32)
    full = (used & (np.take_along_axis(table, order, -1) == FULL)).astype(np.int32)
    return index, full, count
