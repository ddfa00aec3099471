"""Host-side paging for :class:`tqjax.nn.TransformerLM`: a block allocator, a scheduler and ``generate``.

The scheduler owns the mapping from sequences to cache blocks (one block table per sequence, shared by
every layer) and turns "run these sequences one step" into the token batch and
:class:`~tqjax.nn.metadata.AttentionMetadata` of :meth:`TransformerLM.serve_step`: decodes first, then
prefills. Block tables are padded with -1 to a fixed width, so decode steps of a fixed batch keep
their shapes and the jitted step is not retraced.

Chunked prefill: with ``max_prefill_chunk`` a sequence runs at most that many of its uncached tokens
per step, so a long prompt is split across steps; its later chunks are continuation chunks (short ones
run as decode rows, long ones as a prefill over the dequantized prefix, see :mod:`tqjax.nn.metadata`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tqjax.layout import KVCache
from tqjax.nn.metadata import SHORT_CHUNK_TOKENS, AttentionMetadata, build_metadata
from tqjax.nn.model import TransformerLM


class BlockAllocator:
    """Free list of the cache block ids ``0 .. num_blocks - 1`` (lowest ids handed out first)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks; RuntimeError (nothing taken) if fewer are free."""
        if n > len(self._free):
            raise RuntimeError(f"out of KV-cache blocks: need {n}, {len(self._free)} of {self.num_blocks} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: Sequence[int]) -> None:
        """Return ``blocks`` to the free list; ValueError on a block that is not allocated."""
        free = set(self._free)
        for blk in blocks:
            if not 0 <= blk < self.num_blocks or blk in free:
                raise ValueError(f"block {blk} is not an allocated block")
            free.add(blk)
        self._free.extend(sorted(blocks, reverse=True))


@dataclasses.dataclass
class SequenceState:
    """A sequence being served: its tokens, its blocks and how many of its tokens are cached."""

    tokens: list[int]
    blocks: list[int] = dataclasses.field(default_factory=list)
    num_cached: int = 0


@dataclasses.dataclass(frozen=True)
class ScheduledBatch:
    """One step's inputs: ``tokens`` int32 [T], ``metadata``, and per request (in batch order) its
    sequence id, the row of its last new token (``last_rows`` int [B]) and whether that token is the
    sequence's last known one (``complete`` bool [B]: then its logits predict the next token; False for
    a prompt chunk that more chunks follow)."""

    tokens: jax.Array
    metadata: AttentionMetadata
    seq_ids: tuple[int, ...]
    last_rows: np.ndarray
    complete: np.ndarray


class PagedScheduler:
    """Allocates cache blocks to sequences and builds each step's batch.

    Args:
        num_blocks / block_size: geometry of the caches (every layer shares the block tables).
        max_blocks_per_seq: width of the block tables (the longest sequence is
            ``max_blocks_per_seq * block_size`` tokens).
        max_prefill_chunk: if set, a sequence runs at most this many uncached tokens per step
            (chunked prefill); None runs all of them.
    """

    def __init__(
        self, num_blocks: int, block_size: int, max_blocks_per_seq: int, max_prefill_chunk: int | None = None
    ) -> None:
        if max_prefill_chunk is not None and max_prefill_chunk < 1:
            raise ValueError(f"max_prefill_chunk must be >= 1 or None, got {max_prefill_chunk}")
        self.allocator = BlockAllocator(num_blocks)
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_prefill_chunk = max_prefill_chunk
        self.seqs: dict[int, SequenceState] = {}
        self._next_id = 0

    def add(self, prompt: Sequence[int]) -> int:
        """Register a prompt (a non-empty list of token ids); returns its sequence id."""
        if len(prompt) == 0:
            raise ValueError("prompts must contain at least one token")
        seq_id = self._next_id
        self._next_id += 1
        self.seqs[seq_id] = SequenceState(tokens=[int(t) for t in prompt])
        return seq_id

    def append(self, seq_id: int, token: int) -> None:
        """Append a generated token (it is cached by the next step that schedules ``seq_id``)."""
        self.seqs[seq_id].tokens.append(int(token))

    def free(self, seq_id: int) -> None:
        """Forget a finished sequence and return its blocks."""
        self.allocator.free(self.seqs.pop(seq_id).blocks)

    def schedule(self, seq_ids: Sequence[int]) -> ScheduledBatch:
        """Batch the uncached tokens of ``seq_ids`` (at most ``max_prefill_chunk`` each) into one step
        and mark them cached.

        A sequence with cached tokens and at most ``SHORT_CHUNK_TOKENS`` new ones is a decode; any
        other is a prefill (a first chunk, or a long continuation chunk). Decodes go first (otherwise
        in the given order). Blocks are allocated as needed (RuntimeError, with nothing allocated, when
        the cache is full).
        """
        if not seq_ids:
            raise ValueError("schedule needs at least one sequence")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"duplicate sequence ids in {list(seq_ids)}")
        seqs = [self.seqs[i] for i in seq_ids]
        bs = self.block_size
        ends = []  # per sequence: how many of its tokens are cached after this step
        for i, s in zip(seq_ids, seqs):
            new = len(s.tokens) - s.num_cached
            if new == 0:
                raise ValueError(f"sequence {i} has no uncached token to run")
            if math.ceil(len(s.tokens) / bs) > self.max_blocks_per_seq:
                raise ValueError(
                    f"sequence {i} ({len(s.tokens)} tokens) exceeds max_blocks_per_seq * block_size "
                    f"= {self.max_blocks_per_seq * bs}"
                )
            ends.append(s.num_cached + (new if self.max_prefill_chunk is None else min(new, self.max_prefill_chunk)))
        is_decode = [s.num_cached > 0 and e - s.num_cached <= SHORT_CHUNK_TOKENS for s, e in zip(seqs, ends)]
        order = sorted(range(len(seqs)), key=lambda j: not is_decode[j])  # decodes first (stable)
        needed = [math.ceil(ends[j] / bs) - len(seqs[j].blocks) for j in order]
        if sum(needed) > self.allocator.num_free:
            raise RuntimeError(f"out of KV-cache blocks: need {sum(needed)}, {self.allocator.num_free} free")
        slots, tables, lens, tokens = [], [], [], []
        for j, n in zip(order, needed):
            s = seqs[j]
            s.blocks.extend(self.allocator.allocate(n))
            pos = np.arange(s.num_cached, ends[j])
            slots.append((np.asarray(s.blocks)[pos // bs] * bs + pos % bs).tolist())
            tables.append(list(s.blocks))
            lens.append(ends[j])
            tokens.extend(s.tokens[s.num_cached : ends[j]])
            s.num_cached = ends[j]
        metadata = build_metadata(
            slots,
            tables,
            lens,
            num_decodes=sum(is_decode),
            max_blocks=self.max_blocks_per_seq,
            block_size=bs,
        )
        return ScheduledBatch(
            tokens=jnp.asarray(np.asarray(tokens, np.int32)),
            metadata=metadata,
            seq_ids=tuple(seq_ids[j] for j in order),
            last_rows=np.asarray(metadata.query_start_loc[1:]) - 1,
            complete=np.asarray([seqs[j].num_cached == len(seqs[j].tokens) for j in order]),
        )


_serve_step = nnx.jit(TransformerLM.serve_step, donate_argnames="kv_caches")


def generate(
    model: TransformerLM,
    caches: list[KVCache],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    greedy: bool = True,
    *,
    key: jax.Array | None = None,
    eos_id: int | None = None,
    max_prefill_chunk: int | None = None,
) -> tuple[list[list[int]], list[KVCache]]:
    """Prefill every prompt (in one step, or in chunks), then decode them together one token per step.

    Args:
        model: the LM; ``caches`` its per-layer caches (empty or not: blocks are allocated afresh
            from all of them, so anything cached before is overwritten). They are donated.
        prompts: ragged lists of token ids.
        max_new_tokens: tokens to generate per prompt (fewer if ``eos_id`` comes first; the eos token
            is included in the output).
        greedy: argmax decoding; otherwise sampling from softmax(logits) with ``key``.
        eos_id: a sequence that emits it stops and frees its blocks at once.
        max_prefill_chunk: chunked prefill: a prompt runs at most this many tokens per step (the
            sequences whose prompts are done decode meanwhile, in the same steps); None: one chunk.

    Returns:
        (generated token ids per prompt, the updated caches).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and key is None:
        raise ValueError("sampling (greedy=False) needs a PRNG key")
    geometry = {(c.num_blocks, c.block_size) for c in caches}
    if len(geometry) != 1:
        raise ValueError(f"every layer's cache must have the same (num_blocks, block_size), got {sorted(geometry)}")
    num_blocks, block_size = geometry.pop()
    longest = max(len(p) for p in prompts) + max_new_tokens
    sched = PagedScheduler(num_blocks, block_size, math.ceil(longest / block_size), max_prefill_chunk)
    ids = [sched.add(p) for p in prompts]
    out: dict[int, list[int]] = {i: [] for i in ids}
    active = list(ids)
    while active:
        batch = sched.schedule(active)
        logits, caches = _serve_step(model, batch.tokens, caches, batch.metadata)
        last = logits[jnp.asarray(batch.last_rows)]  # [B, V]
        if greedy:
            next_tokens = jnp.argmax(last, axis=-1)
        else:
            key, sub = jax.random.split(key)
            next_tokens = jax.random.categorical(sub, last, axis=-1)
        for seq_id, complete, tok in zip(batch.seq_ids, batch.complete, np.asarray(next_tokens).tolist()):
            if not complete:
                continue  # a prompt chunk with more to come: its logits predict a prompt token
            out[seq_id].append(tok)
            if tok == eos_id or len(out[seq_id]) == max_new_tokens:
                active.remove(seq_id)
                sched.free(seq_id)
            else:
                sched.append(seq_id, tok)
    return [out[i] for i in ids], caches
