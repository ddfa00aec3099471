"""experiments.timing.looped_store: the in-loop store timing keeps a key's encoding inside the loop.

XLA hoists loop-invariant work out of a ``while`` loop; a store whose key encoding runs in XLA (the QJL
presets: two matmuls) would then be timed without it. Changing a key element each step prevents that
but makes XLA copy the whole key every step. The compiled loop must contain the encoding's products
and no copy of the key.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tqjax
from experiments.timing import in_turns, looped_copy, looped_decode, looped_store, on_cache
from tqjax import reference


def _computations(hlo: str) -> dict[str, str]:
    out, name, lines = {}, None, []
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?(%[\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            name, lines = head.group(1), []
        elif line.startswith("}") and name:
            out[name], name = "\n".join(lines), None
        elif name:
            lines.append(line)
    return out


def _loop_bodies(hlo: str) -> str:
    """The text of every computation a ``while`` body reaches (fusions, calls, nested loops)."""
    comps = _computations(hlo)
    seen: set[str] = set()
    todo = [b for text in comps.values() for b in re.findall(r"body=(%[\w.\-]+)", text)]
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        todo += re.findall(r"(?:calls|body|condition|to_apply)=(%[\w.\-]+)", comps[name])
    return "\n".join(comps[name] for name in seen)


def test_looped_store_keeps_the_key_encoding_in_the_loop() -> None:
    cfg = tqjax.TurboQuantConfig.from_cache_dtype("turboquant_kqjl4v4", 128)
    n, hk = 64, 2
    key = jnp.asarray(np.random.default_rng(0).standard_normal((n, hk, 128)), jnp.bfloat16)
    slots = jnp.arange(n, dtype=jnp.int32)
    cache = tqjax.PagedKVCache.allocate(cfg, 8, 16, hk)

    def store(c, k):
        return reference.store_jit(c, k, key, slots)

    looped = looped_store(store, 4)
    body = _loop_bodies(looped.lower(cache, key).compile().as_text())
    assert body.count(" dot(") == 2  # the QJL rotation and sketch run every step
    assert not re.search(r"= bf16\[64,2,128\]\S* copy\(", body)  # and the key is not copied
    # the plain loop (the key a loop invariant) loses them: what the barrier is for
    plain = jax.jit(lambda c, k: jax.lax.fori_loop(0, 4, lambda i, c: store(c, k), c))
    assert _loop_bodies(plain.lower(cache, key).compile().as_text()).count(" dot(") == 0


def test_looped_copy_runs_one_pass_a_step() -> None:
    """The store's copy reference: a loop of ``steps`` multiplications over the array, none merged into another."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal(1000), jnp.float32)
    looped = looped_copy(5)
    want = np.asarray(x)
    for _ in range(5):
        want = want * np.float32(1.000001)
    np.testing.assert_array_equal(np.asarray(looped(x)), want)
    body = _loop_bodies(looped.lower(x).compile().as_text())
    assert body.count(" multiply(") == 1  # a loop (not unrolled), one pass over the array a step


def test_in_turns_interleaves_the_functions() -> None:
    calls = []
    times = in_turns({"a": "A", "b": "B"}, 3, lambda fn: calls.append(fn) or len(calls))
    assert calls == ["A", "B"] * 3  # turns, not one function's repeats in a row
    assert times == {"a": [1, 3, 5], "b": [2, 4, 6]}


def _small_cache(rng):
    """A 4bit_nc cache (6 pages of 16, Hk=2, D=64) of 96 random tokens, tables [2, 3] and lengths 40, 17."""
    cache = tqjax.PagedKVCache.allocate(tqjax.TurboQuantConfig.from_cache_dtype("turboquant_4bit_nc", 64), 6, 16, 2)
    k, v = (jnp.asarray(rng.standard_normal((96, 2, 64)), jnp.float32) for _ in range(2))
    cache = reference.store_jit(cache, k, v, jnp.arange(96, dtype=jnp.int32))
    return cache, jnp.asarray([[4, 1, 2], [0, 5, 3]], jnp.int32), jnp.asarray([40, 17], jnp.int32)


def test_on_cache_passes_the_cache_as_an_argument() -> None:
    """The decode sees the cache, tables and lengths as traced arguments (bound by functools.partial they would be
    concrete arrays, constants captured in the lowering), is traced once for several queries, and gives the
    reference's output for the same inputs."""
    rng = np.random.default_rng(5)
    cache, tables, lens = _small_cache(rng)
    traced = []

    def decode(q, c, t, n, *, scale):
        traced.append(all(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((c, t, n))))
        return reference.paged_decode_reference(q, c, t, n, scale=scale)

    f = on_cache(decode, cache, tables, lens, scale=0.25)
    for _ in range(2):
        q = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
        np.testing.assert_allclose(f(q), reference.paged_decode_jit(q, cache, tables, lens, scale=0.25), rtol=1e-6,
                                   atol=1e-6)
    assert traced == [True]


def test_looped_decode_runs_every_query_with_traced_arrays() -> None:
    """Each step decodes its own query (the outputs stacked in order, equal to a call each), the cache, tables and
    lengths are traced arguments of the one jitted loop, and a wrong number of queries is refused."""
    rng = np.random.default_rng(6)
    cache, tables, lens = _small_cache(rng)
    traced = []

    def decode(q, c, t, n):
        traced.append(all(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((c, t, n))))
        return reference.paged_decode_reference(q, c, t, n)

    queries = jnp.asarray(rng.standard_normal((3, 2, 4, 64)), jnp.float32)
    out = looped_decode(decode, 3)(queries, cache, tables, lens)
    for i in range(3):
        np.testing.assert_allclose(out[i], reference.paged_decode_jit(queries[i], cache, tables, lens), rtol=1e-6,
                                   atol=1e-6)
    assert traced and all(traced)
    with pytest.raises(ValueError, match="3 steps' queries"):
        looped_decode(decode, 3)(queries[:2], cache, tables, lens)
    with pytest.raises(ValueError, match="at least 1"):
        looped_decode(decode, 0)


@pytest.mark.parametrize("pattern", ["random", "blocks"])
def test_store_slots_are_distinct_and_in_the_cache(pattern: str) -> None:
    from experiments.timing import store_slots

    rng = np.random.default_rng(0)
    slots = store_slots(rng, 1000, 130, 16, pattern)
    assert slots.dtype == np.int32 and slots.shape == (1000,)
    assert len(np.unique(slots)) == 1000 and slots.min() >= 0 and slots.max() < 130 * 16
    if pattern == "blocks":  # whole blocks, tokens in order inside each, the blocks in no fixed order
        assert np.all(slots[:992].reshape(62, 16) % 16 == np.arange(16))
        assert np.all(np.diff(slots[:992].reshape(62, 16), axis=1) == 1)
        assert np.all(slots[992:] == slots[992] + np.arange(8)) and slots[992] % 16 == 0
        assert not np.all(np.diff(slots[::16]) > 0)
    else:  # neighbours apart: not one block's run
        assert np.mean(np.diff(slots) == 1) < 0.05
    with pytest.raises(ValueError, match="slot pattern 'seq'"):
        store_slots(rng, 10, 4, 16, "seq")
    with pytest.raises(ValueError, match="65 tokens: the cache has 64 slots"):
        store_slots(rng, 65, 4, 16, pattern)
