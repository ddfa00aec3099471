"""One device call: check the Pallas decode kernel against the reference on the GPU, and time it.

python -m experiments.device_check   (prints a short table last)
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import tqjax
from experiments.timing import device_description
from tqjax.pallas.decode import paged_decode
from tqjax.reference import paged_decode_reference, store_jit


def random_cache(cfg: tqjax.TurboQuantConfig, pages: int, block_size: int, hk: int, seed: int) -> tqjax.PagedKVCache:
    """A cache of ``pages`` blocks, every slot holding random normal K/V (bfloat16, made on the device 65536 tokens at
    a time, chunk i from key ``seed + i``) stored through the reference store. Made on the device: host random
    numbers for the 70001-page caches of a wide table took most of a 600 s device call (twenty-third session)."""
    cache = tqjax.PagedKVCache.allocate(cfg, pages, block_size, hk)
    chunk = 65536
    for i, start in enumerate(range(0, pages * block_size, chunk)):
        n = min(chunk, pages * block_size - start)
        k1, k2 = jax.random.split(jax.random.key(seed + i))
        k = jax.random.normal(k1, (n, hk, cfg.head_dim), jnp.bfloat16)
        v = jax.random.normal(k2, (n, hk, cfg.head_dim), jnp.bfloat16)
        cache = store_jit(cache, k, v, jnp.arange(start, start + n, dtype=jnp.int32))
    return cache


def build(name, b, ctx, hq, hk, d, bs, rng, pages=None):
    """A cache of ``pages`` blocks (default: B x ceil(ctx / bs)) filled with random K/V (:func:`random_cache`, its
    seed drawn from ``rng``), block tables [B, ceil(ctx / bs)] of distinct random pages, seq_lens all ``ctx``."""
    cfg = tqjax.TurboQuantConfig.from_cache_dtype(name, d)
    mb = -(-ctx // bs)
    nb = b * mb if pages is None else pages
    if nb < b * mb:
        raise ValueError(f"pages={pages}: fewer than the B x ceil(ctx / bs) = {b * mb} the block tables need")
    cache = random_cache(cfg, nb, bs, hk, seed=int(rng.integers(1 << 30)))
    bt = jnp.asarray(rng.permutation(nb)[:b * mb].reshape(b, mb).astype(np.int32))
    lens = jnp.full((b,), ctx, jnp.int32)
    return cfg, cache, bt, lens


def main() -> None:
    """Every preset x lookup x dot mode on a small ragged batch, against the reference."""
    print(device_description(), flush=True)
    rng = np.random.default_rng(0)
    presets = sys.argv[1:] or list(tqjax.PRESETS)
    b, ctx, hq, hk, d, bs = 6, 700, 16, 2, 128, 16
    rows = []
    for name in presets:
        _, cache, bt, lens = build(name, b, ctx, hq, hk, d, bs, rng)
        lens = jnp.asarray([0, 1, 15, 16, 333, 700], jnp.int32)
        q = jnp.asarray(rng.standard_normal((b, hq, d)), jnp.float32)
        ref = paged_decode_reference(q, cache, bt, lens)
        for lookup in ("poly", "select"):
            for dot_mode in ("mma", "fma"):
                out = paged_decode(q, cache, bt, lens, lookup=lookup, dot_mode=dot_mode)
                err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
                ok = bool(jnp.all(jnp.isfinite(out))) and err < 1e-4 and float(jnp.abs(out[0]).max()) == 0.0
                rows.append((name, lookup, dot_mode, f"{err:.1e}", "PASS" if ok else "FAIL"))
                print(rows[-1], flush=True)
    print(f"\n{device_description()}: decode kernel vs reference, B={b} lens=[0,1,15,16,333,700] Hq={hq} Hk={hk}")
    for r in rows:
        print(" ".join(r))


if __name__ == "__main__":
    main()
