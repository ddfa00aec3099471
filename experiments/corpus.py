"""An offline byte-level corpus (the running interpreter's standard library) and needle-in-a-haystack data.

Corpus: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (``site-packages``,
``dist-packages`` and ``__pycache__`` excluded, empty files skipped), in sorted order of their
POSIX relative paths. It exists on every machine that runs Python, with no download, but it is not
the same everywhere: it depends on the Python version and on what the distribution ships (Debian,
for instance, moves most of ``test/`` into a separate package), so results record the version, the
file counts and a digest of the file list.

Split: a file is held out iff the first 8 bytes of ``sha256(relative path)``, read as a big-endian
fraction of 2**64, fall below ``heldout_fraction`` (deterministic, independent of the file order and of
which other files exist; train and held-out are disjoint by construction).

Tokens: the file bytes, 0..255, plus four special tokens (:data:`NEEDLE_OPEN`, :data:`NEEDLE_SEP`,
:data:`NEEDLE_CLOSE`, :data:`QUERY`); :data:`VOCAB_SIZE` = 260.

Needle format (tokens; ``key`` is :data:`KEY_LEN` lowercase letters, ``value`` :data:`VALUE_LEN`
digits, both random)::

    needle = NEEDLE_OPEN key NEEDLE_SEP value NEEDLE_CLOSE   (inside the haystack, at a chosen depth)
    query  = QUERY key NEEDLE_SEP                            (right after the haystack)
    answer = value NEEDLE_CLOSE                              (what the model must produce)

The "=" of key=value is the special token NEEDLE_SEP rather than the byte "=", which Python code is
full of: the separator then occurs only in the needle and the query, so retrieval is "find the
earlier NEEDLE_SEP and copy what follows it" (an induction pattern). A tiny model still needs help to
learn it within a CPU budget: training rows are dense in needle examples, most of them short, and
the tokens copied from the needle (key, separator and answer after QUERY) weigh more in the loss
(:func:`pack_batch`). Measured on the ``cpu`` size: without
that help 1000 steps left retrieval at chance; with it 600 steps reach 80-95% exact match under exact
attention.

Training rows mix plain code chunks with such examples (the model learns to retrieve); evaluation
builds them from held-out files only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import string
import sysconfig

import numpy as np

NEEDLE_OPEN, NEEDLE_SEP, NEEDLE_CLOSE, QUERY = 256, 257, 258, 259
VOCAB_SIZE = 260
KEY_LEN, VALUE_LEN = 3, 4
NEEDLE_LEN = 1 + KEY_LEN + 1 + VALUE_LEN + 1
QUERY_LEN = 1 + KEY_LEN + 1
ANSWER_LEN = VALUE_LEN + 1
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
MIN_SEGMENT = 32  # shortest code segment in a packed training row
_KEY_ALPHABET = np.frombuffer(string.ascii_lowercase.encode(), np.uint8)
_VALUE_ALPHABET = np.frombuffer(string.digits.encode(), np.uint8)


def is_heldout(relpath: str, heldout_fraction: float) -> bool:
    """Whether the file at POSIX relative path ``relpath`` belongs to the held-out split."""
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big")
    return h < heldout_fraction * 2**64


@dataclasses.dataclass(frozen=True)
class Split:
    """The files of one split as one uint8 byte stream: file i is ``data[offsets[i]:offsets[i + 1]]``."""

    files: tuple[str, ...]
    data: np.ndarray
    offsets: np.ndarray  # int64 [len(files) + 1]

    @property
    def num_bytes(self) -> int:
        return int(self.data.size)

    def file_tokens(self, i: int) -> np.ndarray:
        return self.data[self.offsets[i] : self.offsets[i + 1]].astype(np.int32)

    def chunk(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` consecutive tokens from one file (int32 [n]); every start position of every file long
        enough is equally likely. ValueError if no file has ``n`` bytes."""
        room = np.maximum(np.diff(self.offsets) - n + 1, 0)
        if not room.any():
            raise ValueError(f"no file of this split has {n} bytes")
        cum = np.cumsum(room)
        start = int(rng.integers(cum[-1]))
        i = int(np.searchsorted(cum, start, side="right"))
        first = self.offsets[i] + start - (cum[i] - room[i])
        return self.data[first : first + n].astype(np.int32)

    def windows(self, n: int, length: int, seed: int) -> np.ndarray:
        """``n`` evaluation windows of ``length`` tokens (int32 [n, length]), drawn with ``seed``."""
        rng = np.random.default_rng(seed)
        return np.stack([self.chunk(rng, length) for _ in range(n)])


@dataclasses.dataclass(frozen=True)
class Corpus:
    root: str
    train: Split
    heldout: Split

    def summary(self) -> dict[str, object]:
        names = "\n".join(self.train.files + self.heldout.files).encode()
        return dict(
            root=self.root,
            train_files=len(self.train.files),
            train_bytes=self.train.num_bytes,
            heldout_files=len(self.heldout.files),
            heldout_bytes=self.heldout.num_bytes,
            file_list_sha256=hashlib.sha256(names).hexdigest()[:16],
        )


def stdlib_files(root: str | pathlib.Path) -> list[str]:
    """Sorted POSIX relative paths of the ``*.py`` files under ``root`` (excluded dirs skipped)."""
    root = pathlib.Path(root)
    rel = (p.relative_to(root) for p in root.rglob("*.py") if p.is_file())
    return sorted(r.as_posix() for r in rel if not EXCLUDED_DIRS.intersection(r.parts))


def load_corpus(root: str | pathlib.Path | None = None, heldout_fraction: float = 0.1) -> Corpus:
    """The corpus under ``root`` (default: the running interpreter's standard library), split by file."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    parts: dict[bool, list[tuple[str, bytes]]] = {False: [], True: []}
    for rel in stdlib_files(root):
        text = (root / rel).read_bytes()
        if text:
            parts[is_heldout(rel, heldout_fraction)].append((rel, text))

    def split(items: list[tuple[str, bytes]]) -> Split:
        if not items:
            raise ValueError(f"no non-empty *.py file for one of the splits under {root}")
        sizes = [len(t) for _, t in items]
        return Split(
            files=tuple(r for r, _ in items),
            data=np.frombuffer(b"".join(t for _, t in items), np.uint8),
            offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        )

    return Corpus(str(root), split(parts[False]), split(parts[True]))


# ---- needles ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NeedleExample:
    """``context`` (haystack with the needle at ``needle_start``) followed by ``query``; ``answer``
    is the expected continuation. All int32 token arrays."""

    context: np.ndarray
    query: np.ndarray
    answer: np.ndarray
    needle_start: int
    depth: float

    @property
    def value(self) -> np.ndarray:
        return self.answer[:VALUE_LEN]


def needle_position(context_len: int, depth: float) -> int:
    """Start of the needle in a context of ``context_len`` tokens: depth 0 puts it first, depth 1 makes
    it end where the context ends."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    if context_len < NEEDLE_LEN:
        raise ValueError(f"context_len {context_len} is shorter than the needle ({NEEDLE_LEN} tokens)")
    return round(depth * (context_len - NEEDLE_LEN))


def make_needle_example(split: Split, rng: np.random.Generator, context_len: int, depth: float) -> NeedleExample:
    """A haystack of ``split`` code with a random key=value needle at ``depth``; ``context_len`` tokens."""
    start = needle_position(context_len, depth)
    key = rng.choice(_KEY_ALPHABET, KEY_LEN).astype(np.int32)
    value = rng.choice(_VALUE_ALPHABET, VALUE_LEN).astype(np.int32)
    needle = np.concatenate([[NEEDLE_OPEN], key, [NEEDLE_SEP], value, [NEEDLE_CLOSE]]).astype(np.int32)
    hay = split.chunk(rng, context_len - NEEDLE_LEN)
    return NeedleExample(
        context=np.concatenate([hay[:start], needle, hay[start:]]),
        query=np.concatenate([[QUERY], key, [NEEDLE_SEP]]).astype(np.int32),
        answer=np.concatenate([value, [NEEDLE_CLOSE]]).astype(np.int32),
        needle_start=start,
        depth=float(depth),
    )


# ---- packed training rows --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """``tokens`` int32 [B, L]; ``query_start_loc`` int32 [B, S + 1] (segment s of row b is columns
    ``query_start_loc[b, s]:query_start_loc[b, s + 1]``; unused segments are empty at the end);
    ``target_weight`` float32 [B, L - 1]: the loss weight of predicting column t + 1 from column t:
    0 across segment boundaries, ``answer_weight`` for the tokens after QUERY in needle examples (key,
    separator, answer: all copied from the needle), else 1."""

    tokens: np.ndarray
    query_start_loc: np.ndarray
    target_weight: np.ndarray


def pack_row(
    split: Split, rng: np.random.Generator, length: int, max_segments: int, needle_prob: float
) -> list[tuple[np.ndarray, bool]]:
    """Segments filling exactly ``length`` tokens, as (tokens, is_needle_example) pairs: code chunks
    and, with probability ``needle_prob`` each, needle examples (context + query + answer) at a
    uniform depth whose total length is log-uniform (mostly short: retrieval is learned at short range
    first and then carries over to long contexts)."""
    segments: list[tuple[np.ndarray, bool]] = []
    remaining = length
    min_needle = NEEDLE_LEN + QUERY_LEN + ANSWER_LEN
    while remaining:
        room = len(segments) < max_segments - 1  # another segment may follow this one
        if room and remaining >= min_needle and rng.random() < needle_prob:
            n = min(int(np.exp(rng.uniform(np.log(min_needle), np.log(remaining + 1)))), remaining)
            ex = make_needle_example(split, rng, n - QUERY_LEN - ANSWER_LEN, float(rng.random()))
            segments.append((np.concatenate([ex.context, ex.query, ex.answer]), True))
        else:
            n = int(rng.integers(MIN_SEGMENT, remaining + 1)) if room and remaining >= 2 * MIN_SEGMENT else remaining
            segments.append((split.chunk(rng, n), False))
        remaining -= n
    return segments


def pack_batch(
    split: Split,
    rng: np.random.Generator,
    batch: int,
    length: int,
    max_segments: int,
    needle_prob: float,
    answer_weight: float = 1.0,
) -> PackedBatch:
    """``batch`` rows of ``length`` tokens, each packing at most ``max_segments`` segments."""
    tokens = np.zeros((batch, length), np.int32)
    qsl = np.full((batch, max_segments + 1), length, np.int32)
    weight = np.zeros((batch, length - 1), np.float32)
    for b in range(batch):
        segs = pack_row(split, rng, length, max_segments, needle_prob)
        tokens[b] = np.concatenate([seg for seg, _ in segs])
        bounds = np.concatenate([[0], np.cumsum([len(seg) for seg, _ in segs])])
        qsl[b, : len(bounds)] = bounds
        seg_id = np.searchsorted(bounds, np.arange(length), side="right")
        weight[b] = seg_id[1:] == seg_id[:-1]
        for (_, is_needle), end in zip(segs, bounds[1:]):
            if is_needle:  # the key after QUERY, NEEDLE_SEP and the answer: everything copied from the needle
                weight[b, end - QUERY_LEN - ANSWER_LEN : end - 1] = answer_weight
    return PackedBatch(tokens, qsl, weight)
