"""Per-step attention metadata for a mixed decode + prefill batch over a paged TurboQuant cache.

One serving step processes a flattened batch of ``T`` new tokens from ``B`` requests. As in vLLM, the
requests are ordered decodes first, then prefills (rows past ``query_start_loc[-1]`` are padding,
slot -1). With ``c`` tokens of a request cached before the step and ``n`` new tokens in it:

* a request is a DECODE iff ``c > 0`` and ``n <= SHORT_CHUNK_TOKENS``: a one-token decode, a short
  continuation chunk of a prompt, or a multi-token decode (speculative verify). Its rows are run as
  ``n`` decode queries over the quantized cache (row i with context length ``c + i + 1``);
* every other request is a PREFILL: a first chunk (``c == 0``, attention over its exact K/V) or a
  long continuation chunk (``c > 0``, ``n > SHORT_CHUNK_TOKENS``: attention over the dequantized
  cached prefix followed by the chunk's exact K/V).

Requests ``0 .. num_decodes - 1`` are the decodes (rows ``0 .. num_decode_tokens - 1``), the remaining
``num_prefills`` requests the prefills; the static flag ``has_prefill_context`` says whether any
prefill has cached context (so steps without one never build a dequantized prefix).

Conventions (shared with :mod:`tqjax.reference`):

* ``slot_mapping[t]``: cache slot of new token t (``block * block_size + offset``), -1 for padding;
* ``block_tables[b, j]``: the j-th cache block of request b; entries at or past
  ``ceil(seq_lens[b] / block_size)`` are never read (:func:`build_metadata` pads them with -1);
* ``seq_lens[b]``: context length of request b INCLUDING its new tokens of this step;
* ``query_start_loc[b]:query_start_loc[b + 1]``: rows of request b's new tokens.

The new token i of request b therefore sits at position ``seq_lens[b] - num_new[b] + i``.

Why ``SHORT_CHUNK_TOKENS = 16``: the decode path reads the compressed prefix once per query row and
needs no float buffer; the prefill path dequantizes the prefix once into float32 K/V (written and read
back again by the attention) and amortises that over the chunk's ``n`` queries. Per cached token and
KV head at head_dim 128 and 4 bits (134 bytes compressed), the decode path moves ``134 n`` bytes and
the prefill path ``134 + 2 * 2 * 128 * 4 = 2182`` bytes, which break even at ``n ~ 16``. Shorter
chunks (and speculative-decoding verify steps, typically well under 16 tokens) are cheaper as decode
rows, longer ones as a prefill. This is a memory-traffic estimate, not a measurement.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SHORT_CHUNK_TOKENS = 16
"""A request with cached context and at most this many new tokens is run as decode rows (see above)."""


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["slot_mapping", "block_tables", "seq_lens", "query_start_loc"],
    meta_fields=["num_decodes", "num_prefills", "num_decode_tokens", "has_prefill_context"],
)
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where the new tokens of one step go and what they attend to (a pytree; counts are static).

    Attributes:
        slot_mapping: int32 [T], cache slot of each new token (-1: padding).
        block_tables: int32 [B, max_blocks], cache blocks of each request.
        seq_lens: int32 [B], context length of each request including its new tokens.
        query_start_loc: int32 [B + 1], request b owns rows ``query_start_loc[b]:query_start_loc[b+1]``.
        num_decodes: static, number of leading decode requests (cached context and 1 to
            ``SHORT_CHUNK_TOKENS`` new tokens each).
        num_prefills: static, number of prefill requests after them (B = num_decodes + num_prefills).
        num_decode_tokens: static, rows belonging to decodes (``query_start_loc[num_decodes]``).
        has_prefill_context: static, whether some prefill request is a continuation chunk (has
            cached context). False skips the dequantized prefix; the layer then turns the rows of a
            continuation chunk (only possible with metadata that fails :meth:`validate`) into NaN.
    """

    slot_mapping: jax.Array
    block_tables: jax.Array
    seq_lens: jax.Array
    query_start_loc: jax.Array
    num_decodes: int
    num_prefills: int
    num_decode_tokens: int
    has_prefill_context: bool = False

    @property
    def num_requests(self) -> int:
        """B, the number of requests (static)."""
        return self.num_decodes + self.num_prefills

    def positions(self) -> jax.Array:
        """Position of every new token in its sequence: int32 [T] (padding rows get 0).

        Row t of request b sits at ``seq_lens[b] - num_new[b] + (t - query_start_loc[b])``, which
        simplifies to ``seq_lens[b] - query_start_loc[b + 1] + t``.
        """
        t = jnp.arange(self.slot_mapping.shape[0], dtype=jnp.int32)
        seg = token_requests(self.query_start_loc, self.slot_mapping.shape[0])
        valid = seg < self.num_requests
        seg = jnp.minimum(seg, self.num_requests - 1)
        pos = self.seq_lens[seg] - self.query_start_loc[seg + 1] + t
        return jnp.where(valid, pos, 0).astype(jnp.int32)

    def decode_rows(self) -> tuple[jax.Array, jax.Array]:
        """Each decode row as its own decode query: (block_tables int32 [num_decode_tokens, max_blocks],
        seq_lens int32 [num_decode_tokens]).

        Row t (of decode request b, at position p) gets b's block table and context length ``p + 1``,
        so it sees the cached context and the new tokens up to itself (causality from the lengths).
        """
        nt = self.num_decode_tokens
        req = token_requests(self.query_start_loc, nt)
        return self.block_tables[req], self.positions()[:nt] + 1

    def prefill_context_lens(self) -> jax.Array:
        """Tokens already cached before this step's chunk, per prefill request: int32 [num_prefills].

        Non-zero entries mark long continuation chunks (chunked prefill), which attend over the
        dequantized cached context as well as the chunk.
        """
        nd = self.num_decodes
        num_new = self.query_start_loc[nd + 1 :] - self.query_start_loc[nd:-1]
        return (self.seq_lens[nd:] - num_new).astype(jnp.int32)

    def validate(self, num_tokens: int | None = None, block_size: int | None = None) -> None:
        """Raise ValueError/TypeError describing the first inconsistency found.

        Shapes, dtypes and the static counts are always checked; the values (query_start_loc
        monotone and starting at 0, decodes one token each, seq_lens covering the new tokens and
        within the block tables, padding rows at slot -1, and, with ``block_size``, every slot being
        the one its block table assigns to its position) only when the arrays are concrete, i.e. not
        inside jit. ``num_tokens``: the expected T.
        """
        for name in ("num_decodes", "num_prefills", "num_decode_tokens"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if not isinstance(self.has_prefill_context, (bool, np.bool_)):
            raise TypeError(f"has_prefill_context must be a bool, got {self.has_prefill_context!r}")
        if not self.num_decodes <= self.num_decode_tokens <= self.num_decodes * SHORT_CHUNK_TOKENS:
            raise ValueError(
                f"num_decode_tokens ({self.num_decode_tokens}) must lie in [num_decodes, num_decodes * "
                f"{SHORT_CHUNK_TOKENS}] = [{self.num_decodes}, {self.num_decodes * SHORT_CHUNK_TOKENS}]: each "
                f"decode request contributes 1 to {SHORT_CHUNK_TOKENS} tokens"
            )
        b = self.num_requests
        if b == 0:
            raise ValueError("metadata describes no request (num_decodes + num_prefills == 0)")
        _check_int_array("slot_mapping", self.slot_mapping, 1)
        _check_int_array("block_tables", self.block_tables, 2)
        _check_int_array("seq_lens", self.seq_lens, 1)
        _check_int_array("query_start_loc", self.query_start_loc, 1)
        t = self.slot_mapping.shape[0]
        if num_tokens is not None and t != num_tokens:
            raise ValueError(f"slot_mapping has {t} entries but the batch has {num_tokens} tokens")
        if self.block_tables.shape[0] != b:
            raise ValueError(
                f"block_tables has {self.block_tables.shape[0]} rows, expected num_decodes + num_prefills = {b}"
            )
        if self.seq_lens.shape != (b,):
            raise ValueError(f"seq_lens must have shape [{b}], got {tuple(self.seq_lens.shape)}")
        if self.query_start_loc.shape != (b + 1,):
            raise ValueError(f"query_start_loc must have shape [{b + 1}], got {tuple(self.query_start_loc.shape)}")
        if self.num_decode_tokens > t:
            raise ValueError(f"num_decode_tokens ({self.num_decode_tokens}) exceeds the batch ({t} tokens)")
        if any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(self)):
            return
        self._validate_values(block_size)

    def _validate_values(self, block_size: int | None) -> None:
        qsl = np.asarray(self.query_start_loc, np.int64)
        lens = np.asarray(self.seq_lens, np.int64)
        slots = np.asarray(self.slot_mapping, np.int64)
        t = slots.shape[0]
        num_new = np.diff(qsl)
        if qsl[0] != 0:
            raise ValueError(f"query_start_loc must start at 0, got {qsl[0]}")
        if np.any(num_new < 1):
            raise ValueError(f"every request needs at least one new token; query_start_loc = {qsl.tolist()}")
        if qsl[-1] > t:
            raise ValueError(f"query_start_loc[-1] = {qsl[-1]} exceeds the batch ({t} tokens)")
        if np.any(lens < num_new):
            raise ValueError(f"seq_lens {lens.tolist()} must include the new tokens {num_new.tolist()}")
        if np.any(slots[qsl[-1] :] >= 0):
            raise ValueError(f"padding rows (from {qsl[-1]}) must have slot_mapping -1")
        if block_size is not None:
            self._validate_slots(block_size, qsl, lens, slots)
        self._validate_kinds(num_new, lens - num_new)

    def _validate_slots(self, block_size: int, qsl: np.ndarray, lens: np.ndarray, slots: np.ndarray) -> None:
        """Every new token's slot is the one its block table assigns to its position."""
        tables = np.asarray(self.block_tables, np.int64)
        cap = tables.shape[1] * block_size
        if lens.max() > cap:
            raise ValueError(f"seq_lens {lens.tolist()} exceed block_tables.shape[1] * block_size = {cap}")
        pos = np.asarray(self.positions(), np.int64)[: qsl[-1]]
        req = np.repeat(np.arange(self.num_requests), np.diff(qsl))
        expected = tables[req, pos // block_size] * block_size + pos % block_size
        bad = np.flatnonzero((slots[: qsl[-1]] != expected) | (tables[req, pos // block_size] < 0))
        if bad.size:
            r = bad[0]
            raise ValueError(
                f"slot_mapping[{r}] = {slots[r]} but request {req[r]} position {pos[r]} lives at slot "
                f"{expected[r]} according to its block table"
            )

    def _validate_kinds(self, num_new: np.ndarray, context: np.ndarray) -> None:
        """The decode/prefill split follows the rule of the module docstring and matches the static counts."""
        nd = self.num_decodes
        if num_new[:nd].sum() != self.num_decode_tokens:
            raise ValueError(
                f"num_decode_tokens ({self.num_decode_tokens}) must equal the rows of the {nd} decode "
                f"requests, {num_new[:nd].sum()}"
            )
        is_decode = (context > 0) & (num_new <= SHORT_CHUNK_TOKENS)
        wrong = np.flatnonzero(is_decode != (np.arange(self.num_requests) < nd))
        if wrong.size:
            r = wrong[0]
            raise ValueError(
                f"request {r} ({context[r]} cached + {num_new[r]} new tokens) is a "
                f"{'decode' if is_decode[r] else 'prefill'} (decodes: cached context and at most "
                f"{SHORT_CHUNK_TOKENS} new tokens), but num_decodes = {nd} makes it a "
                f"{'prefill' if is_decode[r] else 'decode'}: order decodes first"
            )
        if not self.has_prefill_context and np.any(context[nd:] > 0):
            r = nd + int(np.flatnonzero(context[nd:] > 0)[0])
            raise ValueError(
                f"prefill request {r} has {context[r]} cached tokens (a continuation chunk) but "
                "has_prefill_context is False"
            )


def _check_int_array(name: str, x: object, ndim: int) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if len(x.shape) != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be int32, got {x.dtype}")


def token_requests(query_start_loc: jax.Array, num_tokens: int) -> jax.Array:
    """Request index of every row: int32 [num_tokens]; padding rows get B = len(query_start_loc) - 1."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    # "scan_unrolled": no while loop in the serving step (XLA's GPU runtime may sync with the host every trip)
    return (jnp.searchsorted(query_start_loc, t, side="right", method="scan_unrolled") - 1).astype(jnp.int32)


def build_metadata(
    slots: Sequence[Sequence[int]],
    block_tables: Sequence[Sequence[int]],
    seq_lens: Sequence[int],
    num_decodes: int,
    *,
    max_blocks: int | None = None,
    num_tokens: int | None = None,
    block_size: int | None = None,
) -> AttentionMetadata:
    """Host-side builder: per-request lists in, validated int32 device metadata out.

    ``has_prefill_context`` is derived from the lengths; the decode/prefill split must follow the
    rule of the module docstring (a ValueError says which request breaks it).

    Args:
        slots: per request, the cache slots of its new tokens (decodes first).
        block_tables: per request, its cache block ids (at least ``ceil(seq_len / block_size)``).
        seq_lens: per request, context length including the new tokens.
        num_decodes: how many leading requests are decodes (cached context, at most
            ``SHORT_CHUNK_TOKENS`` new tokens).
        max_blocks: width of the padded block table (default: the longest table); -1 pads.
        num_tokens: T, the padded batch size (default: the number of new tokens); -1 slots pad.
        block_size: if given, each slot is checked against its request's block table.
    """
    b = len(slots)
    if len(block_tables) != b or len(seq_lens) != b:
        raise ValueError(f"slots, block_tables and seq_lens must describe the same {b} requests")
    if not 0 <= num_decodes <= b:
        raise ValueError(f"num_decodes must lie in [0, {b}], got {num_decodes}")
    counts = [len(s) for s in slots]
    total = sum(counts)
    num_tokens = total if num_tokens is None else num_tokens
    if num_tokens < total:
        raise ValueError(f"num_tokens ({num_tokens}) is below the {total} new tokens")
    width = max((len(bt) for bt in block_tables), default=0) if max_blocks is None else max_blocks
    if any(len(bt) > width for bt in block_tables):
        raise ValueError(f"a block table is longer than max_blocks = {width}")
    slot_mapping = np.full((num_tokens,), -1, np.int32)
    slot_mapping[:total] = np.concatenate([np.asarray(s, np.int64) for s in slots]) if total else []
    tables = np.full((b, max(width, 1)), -1, np.int32)
    for i, bt in enumerate(block_tables):
        tables[i, : len(bt)] = bt
    context = np.asarray(seq_lens, np.int64) - np.asarray(counts, np.int64)
    md = AttentionMetadata(
        slot_mapping=jnp.asarray(slot_mapping),
        block_tables=jnp.asarray(tables),
        seq_lens=jnp.asarray(np.asarray(seq_lens, np.int32)),
        query_start_loc=jnp.asarray(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)),
        num_decodes=int(num_decodes),
        num_prefills=b - int(num_decodes),
        num_decode_tokens=int(sum(counts[:num_decodes])),
        has_prefill_context=bool(np.any(context[num_decodes:] > 0)),
    )
    md.validate(num_tokens=num_tokens, block_size=block_size)
    return md
