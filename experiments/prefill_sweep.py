"""Prefill attention sweep: tqjax's block-sparse Pallas kernel against JAX's peers, and time vs sparsity.

    python -m experiments.prefill_sweep [--seq-lens 1024 4096 ...] [--quick] [--out results/prefill_sweep]

On a GPU, for each T (default 1k..32k; Hq=32, Hk=8, D=128, bf16):

* forward, causal, one sequence and T packed into ``--packed`` sequences of random lengths: time,
  TFLOP/s counting only the visible (non-masked) pairs (``4 * D * Hq * T^2 / 2`` for one causal
  sequence, the sum over the sequences when packed), and the output's relative error against float32
  dense attention (for T <= ``--max-err-len``);
* the same for JAX's Pallas GPU flash attention ``jax.experimental.pallas.ops.gpu.attention.mha``
  (``[B, T, H, D]``, K/V repeated to Hq heads, ``causal=True``; packed: with ``segment_ids``) and
  cuDNN (``jax.nn.dot_product_attention(implementation="cudnn")``, one sequence only), where they run;
* forward + backward (``jax.grad`` of a weighted sum w.r.t. q, k, v), with TFLOP/s at 3.5x the forward
  count (forward 2 products, backward 5);
* time vs mask sparsity at T = ``--sparsity-len`` (8k): causal sliding windows of several sizes; the
  fraction of (q, kv) blocks the kernel visits (of the whole T x T grid, from
  :func:`tqjax.pallas.prefill.visited_blocks`) against time, normalised to the causal mask, to show
  time falls in proportion to the non-empty blocks.

Kernel launch parameters come from :func:`tqjax.pallas.tuning.prefill_params`. On a machine without a
GPU it runs a tiny configuration of the kernel in interpret mode (correctness only; the timings are
NOT GPU timings) in well under a minute. Results: a table on stdout, CSV + JSON (+ PNG when matplotlib
is installed) under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.timing import device_description, time_fn
from tqjax.masks import CausalMask, LocalMask
from tqjax.pallas.prefill import (
    dense_masked_attention_reference,
    prefill_attention,
    visited_blocks,
)
from tqjax.pallas.tuning import prefill_params
from tqjax.reference import prefill_attention_jit

ON_GPU = jax.default_backend() == "gpu"


@dataclasses.dataclass
class Row:
    section: str  # "causal" | "packed" | "sparsity"
    system: str
    pass_: str  # "fwd" | "fwd+bwd"
    seq_len: int
    num_seqs: int
    window: int | None
    block_frac: float | None  # fraction of the T x T block grid visited (tqjax only)
    time_ms: float | None
    tflops: float | None
    rel_err: float | None
    note: str = ""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", nargs="+", type=int, default=None)
    p.add_argument("--hq", type=int, default=32 if ON_GPU else 4)
    p.add_argument("--hk", type=int, default=8 if ON_GPU else 1)
    p.add_argument("--head-dim", type=int, default=128 if ON_GPU else 64)
    p.add_argument("--packed", type=int, default=8, help="sequences packed into T for the packed rows")
    p.add_argument("--sparsity-len", type=int, default=None)
    p.add_argument("--windows", nargs="+", type=int, default=None)
    p.add_argument("--max-err-len", type=int, default=4096, help="check the error against dense f32 up to this T")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--no-bwd", action="store_true")
    p.add_argument("--quick", action="store_true", help="a few sizes only")
    p.add_argument("--out", default="results/prefill_sweep")
    a = p.parse_args(argv)
    if a.seq_lens is None:
        if ON_GPU:
            a.seq_lens = [1024, 4096] if a.quick else [1024, 2048, 4096, 8192, 16384, 32768]
        else:
            a.seq_lens = [128]
    if a.sparsity_len is None:
        a.sparsity_len = 8192 if ON_GPU else 256
    if a.windows is None:
        if ON_GPU:
            a.windows = [512, 2048] if a.quick else [128, 256, 512, 1024, 2048, 4096]
        else:
            a.windows = [32] if a.quick else [16, 64]
    return a


def causal_flops(lengths, hq, d, window=None):
    """4 * D * Hq * (visible pairs); one causal sequence of length L counts L^2 / 2 pairs, a causal
    window of w keys back (w + 1 keys with the diagonal) about L * (w + 1) - w (w + 1) / 2."""
    pairs = 0.0
    for n in lengths:
        if window is None or window >= n:
            pairs += n * n / 2
        else:
            pairs += n * (window + 1) - window * (window + 1) / 2
    return 4.0 * d * hq * pairs


def packed_qsl(rng, t, n):
    cuts = np.sort(rng.choice(np.arange(1, t), size=n - 1, replace=False))
    return np.concatenate([[0], cuts, [t]]).astype(np.int32)


def inputs(rng, t, a, count=2):
    dt = jnp.bfloat16
    sets = []
    for _ in range(count):
        q = rng.standard_normal((t, a.hq, a.head_dim), np.float32)
        k = rng.standard_normal((t, a.hk, a.head_dim), np.float32)
        v = rng.standard_normal((t, a.hk, a.head_dim), np.float32)
        sets.append((jnp.asarray(q, dt), jnp.asarray(k, dt), jnp.asarray(v, dt)))
    return sets


def rel_err(out, ref):
    out = out.astype(jnp.float32)
    ref = ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


# ---- systems: fn(q, k, v) -> out [T, Hq, D] -----------------------------------------------------------


def tq_fn(qsl, window=None):
    kw = {"interpret": not ON_GPU}
    if window is not None:
        kw["window"] = (window, 0)

    @jax.jit
    def f(q, k, v):
        return prefill_attention(q, k, v, qsl, **kw)

    return f


def mha_fn(a, qsl=None):
    from jax.experimental.pallas.ops.gpu.attention import mha

    group = a.hq // a.hk
    scale = 1.0 / math.sqrt(a.head_dim)
    seg = None
    if qsl is not None:
        t = int(qsl[-1])
        seg = jnp.asarray(np.searchsorted(qsl, np.arange(t), side="right")[None].astype(np.int32))

    @jax.jit
    def f(q, k, v):
        kk, vv = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
        return mha(q[None], kk[None], vv[None], seg, sm_scale=scale, causal=True)[0]

    return f


def cudnn_fn():
    @jax.jit
    def f(q, k, v):
        return jax.nn.dot_product_attention(q[None], k[None], v[None], is_causal=True, implementation="cudnn")[0]

    return f


def with_grad(f):
    """q, k, v -> (dq, dk, dv) of sum(out * w) with a fixed w (out's shape)."""

    @jax.jit
    def g(q, k, v):
        def loss(q, k, v):
            out = f(q, k, v).astype(jnp.float32)
            return jnp.sum(out * jnp.cos(jnp.arange(out.shape[-1], dtype=jnp.float32)))

        return jax.grad(loss, (0, 1, 2))(q, k, v)

    return g


def dense_reference(q, k, v, qsl, window=None):
    """float32 dense attention over the same bf16 inputs (XLA)."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    if window is not None:
        mask = CausalMask() & LocalMask(window, 0)
        return jax.jit(dense_masked_attention_reference, static_argnames="mask")(q, k, v, jnp.asarray(qsl), mask=mask)
    if len(qsl) == 2:
        g = q.shape[1] // k.shape[1]
        return jax.nn.dot_product_attention(q[None], jnp.repeat(k, g, 1)[None], jnp.repeat(v, g, 1)[None],
                                            is_causal=True, implementation="xla")[0]
    return prefill_attention_jit(q, k, v, jnp.asarray(qsl))


# ---- the sweep ----------------------------------------------------------------------------------------


def measure(rows, section, system, pass_, fn, sets, t, nseq, flops, *, window=None, frac=None, ref=None,
            iters=10, reps=5):
    try:
        tm = time_fn(fn, sets, iters=iters, reps=reps, warmup=2 if ON_GPU else 1)
        err = None if ref is None else rel_err(fn(*sets[0]), ref)
        rows.append(Row(section, system, pass_, t, nseq, window, frac, tm * 1e3, flops / tm / 1e12, err))
    except Exception as e:  # noqa: BLE001 - a peer that does not run here is reported, not fatal
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
        rows.append(Row(section, system, pass_, t, nseq, window, frac, None, None, None, msg))
    r = rows[-1]
    tms = "failed" if r.time_ms is None else f"{r.time_ms:9.3f} ms {r.tflops:8.3g} TFLOP/s"
    print(f"  {section:8s} {system:14s} {pass_:7s} T={t:<6d} seqs={nseq:<3d} "
          f"{'' if window is None else f'w={window:<5d} '}{tms} {r.note}", flush=True)


def main(argv=None) -> None:
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(0)
    dev = device_description()
    params = prefill_params(a.head_dim)
    print(f"tqjax prefill sweep on {dev}; Hq={a.hq} Hk={a.hk} D={a.head_dim} bf16; kernel params {params}")
    if not ON_GPU:
        print("NOTE: no GPU here: the Pallas kernel runs in interpret mode on the CPU, on tiny shapes, for "
              "correctness only. These are NOT GPU timings; peers are skipped.")
    iters, reps = (10, 5) if ON_GPU else (1, 1)
    rows: list[Row] = []
    t_start = time.time()
    peers = ON_GPU and not a.no_peers
    for t in a.seq_lens:
        sets = inputs(rng, t, a)
        for section, qsl in (("causal", np.array([0, t], np.int32)), ("packed", packed_qsl(rng, t, a.packed))):
            nseq = len(qsl) - 1
            flops = causal_flops(np.diff(qsl), a.hq, a.head_dim)
            ref = dense_reference(*sets[0], qsl) if t <= a.max_err_len else None
            frac = float(visited_blocks(qsl, t, mask=CausalMask(), num_heads=a.hq, block_q=params["block_q"],
                                        block_k=params["block_k"]).mean())
            systems = [("tqjax", tq_fn(jnp.asarray(qsl)))]
            if peers:
                systems.append(("jax_pallas_mha", mha_fn(a, None if section == "causal" else qsl)))
                if section == "causal":
                    systems.append(("cudnn", cudnn_fn()))
            for name, f in systems:
                measure(rows, section, name, "fwd", f, sets, t, nseq, flops, frac=frac if name == "tqjax" else None,
                        ref=ref, iters=iters, reps=reps)
                if not a.no_bwd and (ON_GPU or t == a.seq_lens[0]):
                    measure(rows, section, name, "fwd+bwd", with_grad(f), sets, t, nseq, 3.5 * flops,
                            iters=iters, reps=reps)
            del ref
            if not ON_GPU and t != a.seq_lens[0]:
                break  # on the CPU packed rows only for the first T: interpret-mode compiles are slow
        print(f"[{time.time() - t_start:6.0f}s] T={t} done", flush=True)
    sweep_sparsity(a, rng, params, rows, iters, reps)
    report(a, rows, dev, params)


def sweep_sparsity(a, rng, params, rows, iters, reps):
    t = a.sparsity_len
    sets = inputs(rng, t, a)
    qsl = np.array([0, t], np.int32)
    for w in [*sorted(a.windows), None]:
        mask = CausalMask() if w is None else CausalMask() & LocalMask(w, 0)
        frac = float(visited_blocks(qsl, t, mask=mask, num_heads=a.hq, block_q=params["block_q"],
                                    block_k=params["block_k"]).mean())
        flops = causal_flops([t], a.hq, a.head_dim, w)
        ref = dense_reference(*sets[0], qsl, w) if (t <= a.max_err_len and w is not None) else None
        measure(rows, "sparsity", "tqjax", "fwd", tq_fn(jnp.asarray(qsl), w), sets, t, 1, flops, window=w,
                frac=frac, ref=ref, iters=iters, reps=reps)


def write(a, rows, dev, params):
    with open(os.path.join(a.out, "prefill.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(Row.__dataclass_fields__))
        w.writeheader()
        w.writerows(dataclasses.asdict(r) for r in rows)
    meta = {"device": dev, "jax": jax.__version__, "argv": sys.argv[1:], "hq": a.hq, "hk": a.hk,
            "head_dim": a.head_dim, "dtype": "bfloat16", "kernel_params": params, "gpu_timings": ON_GPU}
    with open(os.path.join(a.out, "prefill.json"), "w") as f:
        json.dump({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)


def report(a, rows, dev, params):
    write(a, rows, dev, params)
    print(f"\n== prefill attention: {dev}, Hq={a.hq} Hk={a.hk} D={a.head_dim} bf16"
          + ("" if ON_GPU else "  [CPU interpret mode: NOT GPU timings]"))
    print(f"{'section':9s} {'system':15s} {'pass':8s} {'T':>6s} {'seqs':>4s} {'window':>6s} {'blocks':>7s} "
          f"{'time ms':>10s} {'TFLOP/s':>8s} {'rel err':>8s}")
    for r in rows:
        print(f"{r.section:9s} {r.system:15s} {r.pass_:8s} {r.seq_len:6d} {r.num_seqs:4d} "
              f"{'' if r.window is None else r.window:>6} {'' if r.block_frac is None else f'{r.block_frac:.3f}':>7s} "
              f"{'' if r.time_ms is None else f'{r.time_ms:.3f}':>10s} {'' if r.tflops is None else f'{r.tflops:.3g}':>8s} "
              f"{'' if r.rel_err is None else f'{r.rel_err:.1e}':>8s} {r.note}")
    sp = [r for r in rows if r.section == "sparsity" and r.time_ms is not None]
    base = next((r for r in sp if r.window is None), None)
    if base:
        print(f"\n== time vs sparsity at T={a.sparsity_len} (relative to the causal mask)")
        print(f"{'window':>7s} {'blocks':>7s} {'frac/causal':>12s} {'time/causal':>12s}")
        for r in sp:
            print(f"{'causal' if r.window is None else r.window:>7} {r.block_frac:7.3f} "
                  f"{r.block_frac / base.block_frac:12.3f} {r.time_ms / base.time_ms:12.3f}")
    speed = []
    for r in rows:
        if r.system == "tqjax" or r.time_ms is None or r.section == "sparsity":
            continue
        mine = next((x for x in rows if x.system == "tqjax" and x.section == r.section and x.pass_ == r.pass_
                     and x.seq_len == r.seq_len and x.time_ms is not None), None)
        if mine:
            speed.append(f"{r.section:7s} {r.pass_:8s} T={r.seq_len:<6d} vs {r.system:15s}: "
                         f"{r.time_ms / mine.time_ms:5.2f}x")
    if speed:
        print("\n== tqjax speed-up (peer time / tqjax time)")
        print("\n".join(speed))
    plot(a, rows, dev)
    print(f"\nresults: {a.out}/prefill.csv, prefill.json" + (", prefill.png" if _has_mpl() else ""))


def _has_mpl() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(a, rows, dev):
    if not _has_mpl():
        print("(matplotlib not installed: no plot)")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for (section, system, pass_) in sorted({(r.section, r.system, r.pass_) for r in rows if r.section != "sparsity"}):
        pts = sorted((r.seq_len, r.tflops) for r in rows if (r.section, r.system, r.pass_) == (section, system, pass_)
                     and r.tflops is not None)
        if pts:
            x, y = zip(*pts)
            ax = axes[0] if pass_ == "fwd" else axes[1]
            ax.plot(x, y, "-" if system == "tqjax" else "--", marker="o", label=f"{system} {section}")
    for ax, title in zip(axes[:2], ("forward", "forward + backward")):
        ax.set(title=title, xscale="log", xlabel="T", ylabel="TFLOP/s (visible pairs)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    sp = [r for r in rows if r.section == "sparsity" and r.time_ms is not None]
    if sp:
        axes[2].plot([r.block_frac for r in sp], [r.time_ms for r in sp], "o-")
        for r in sp:
            axes[2].annotate("causal" if r.window is None else f"w={r.window}", (r.block_frac, r.time_ms), fontsize=7)
        axes[2].set(title=f"time vs visited blocks, T={a.sparsity_len}", xlabel="fraction of blocks visited",
                    ylabel="forward time (ms)")
    fig.suptitle(f"tqjax prefill sweep: {dev}" + ("" if ON_GPU else " (CPU interpret: not GPU timings)"))
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "prefill.png"), dpi=110)


if __name__ == "__main__":
    main()
