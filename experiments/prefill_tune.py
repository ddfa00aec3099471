"""Device experiment: forward launch parameters of the Pallas prefill kernel (causal, one shape).

python -m experiments.prefill_tune [--seq-len 8192]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.timing import device_description, time_fn
from tqjax.pallas.prefill import prefill_attention

VARIANTS = [  # block_q, block_k, num_warps, num_stages
    (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 32, 4, 4),
    (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 4), (256, 64, 8, 3),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=8192)
    a = ap.parse_args()
    t, hq, hk, d = a.seq_len, 32, 8, 128
    rng = np.random.default_rng(0)
    sets = [tuple(jnp.asarray(rng.standard_normal((t, h, d)), jnp.bfloat16) for h in (hq, hk, hk)) for _ in range(2)]
    qsl = jnp.asarray([0, t], jnp.int32)
    flops = 4.0 * d * hq * t * t / 2
    print(f"{device_description()}; causal T={t} Hq={hq} Hk={hk} D={d} bf16", flush=True)
    for bq, bk, w, s in VARIANTS:
        try:
            f = jax.jit(functools.partial(prefill_attention, query_start_loc=qsl, block_q=bq, block_k=bk,
                                          num_warps=w, num_stages=s))
            sec = time_fn(lambda q, k, v, f=f: f(q, k, v), sets, iters=10, reps=5)
            print(f"block_q {bq:4d} block_k {bk:4d} warps {w} stages {s}: {sec*1e3:.3f} ms "
                  f"{flops / sec / 1e12:.0f} TFLOP/s", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"block_q {bq:4d} block_k {bk:4d} warps {w} stages {s}: ERR {str(e)[:100]}", flush=True)


if __name__ == "__main__":
    main()
