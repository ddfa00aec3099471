"""Does TurboQuant keep a real model's quality? Train a byte-level LM from scratch, then serve it.

    python -m experiments.train_to_serve [--size cpu|gpu] [--steps N] [--load DIR] [--seed 0]
                                         [--budget-gib 1] [--out results/train_to_serve]

1. Data (:mod:`experiments.corpus`): the running interpreter's standard library source, bytes as
   tokens, split into train / held-out by file; rows pack code chunks and synthetic key=value
   needle examples (causal attention within each segment, through ``query_start_loc``).
2. Training: :class:`tqjax.nn.TransformerLM` in training mode (``train_logits``, no cache), a
   hand-written Adam (global-norm clipping at 1, linear warmup then cosine decay to 10%). The
   objective is next-byte cross-entropy with the needle query and answer weighted ``answer_weight`` times
   (see :mod:`experiments.corpus` for why); the loss curve also tracks plain held-out code
   cross-entropy.
3. Checkpoint, written to ``--out``/checkpoint and read back before serving:

   * ``model.npz``: ``numpy.savez`` (uncompressed zip of ``.npy`` files), one float32 array per
     parameter, named by its "/"-joined path in the NNX state (``embed/embedding``,
     ``blocks/0/attn/q_proj/kernel``, ``blocks/0/mlp/gate/kernel``, ``final_norm/scale``, ...);
   * ``config.json``: ``{"format": "tqjax-lm/1", "model": <TransformerLM keyword arguments except
     the KV-cache dtypes, which are a serving choice>, "context": <trained length>,
     "tokenizer": <byte-level + special token ids>, "training": <steps, final loss, corpus>}``.

   The reloaded model's logits must equal the trained model's bit for bit (checked; a mismatch aborts).
4. Serving, per KV-cache configuration (every preset in :data:`tqjax.PRESETS` on all layers, and
   "boundary" variants of the low-bit presets, those with at most 3 key bits per channel: the first
   and last layer unquantized, kv_cache_dtype "auto" (a bfloat16
   :class:`tqjax.layout.NativePagedKVCache`, :func:`tqjax.backends.boundary_layer_dtypes` with one
   boundary layer at each end; needs at least 4 layers), the preset in between):

   * perplexity on held-out windows of the trained length: the first half is prefilled (attention
     over the exact K/V, which are stored quantized), the second half is scored token by token with
     paged decode under teacher forcing (the true token is fed at each step), as vLLM serves;
     reference: exact attention (``train_logits`` over the whole window) on the same targets. Also
     the top-1 agreement with the exact next-token prediction at every scored position;
   * greedy generation (:func:`tqjax.nn.generate`) from held-out prompts against exact-attention
     greedy decoding: the fraction of identical tokens position by position, and the first
     divergence;
   * needle in a haystack: a ``NEEDLE_OPEN key NEEDLE_SEP value NEEDLE_CLOSE`` needle (key=value
     with a special "=", a 4-digit value) at 5 depths of held-out contexts of 4 lengths up to the
     trained one; the context is prefilled, the query ``QUERY key NEEDLE_SEP`` is fed by decode
     steps (so retrieval reads the quantized cache, as a question asked after a cached document
     does), then the value is decoded greedily; exact match of all 4 digits;
   * memory: bytes per token per layer (``slot_bytes`` x KV heads; an "auto" layer: the bf16 K and V,
     ``2 * 2 * head_dim`` x KV heads), per token over all layers, and the tokens that fit
     ``--budget-gib`` (:func:`tqjax.layout.tokens_in_budget`; for the mixed boundary configurations
     the same whole-block formula over the per-layer sum).

   The "auto" boundary layers run through the same registry as the others: the FLASH backend (Pallas
   decode over the bf16 cache) on a GPU, the reference elsewhere.

Sizes (``--size``; the default ``cpu`` finishes in a few minutes on 2 CPU cores):

============  =======  ======  ==============  ========  =======  =======  ==================
size          d_model  layers  heads (q / kv)  head_dim  mlp      context  training
============  =======  ======  ==============  ========  =======  =======  ==================
``cpu``       128      4       4 / 2           64        384      256      600 x 8 rows (1.2M tokens)
``gpu``       512      8       8 / 2           128       1536     1024     2000 x 16 rows (33M tokens)
============  =======  ======  ==============  ========  =======  =======  ==================

``cpu``: 1.0M parameters; 64 held-out windows (8,192 scored tokens per configuration), 80 needles
(4 per length x depth cell), 8 generation prompts x 64 tokens. ``gpu``: 29.5M parameters, 32.8M training
tokens (1.1 to 3.7 epochs: the stdlib's size depends on the Python build); 128 windows of 1024 (65,536
scored tokens), 160 needles, 16 prompts x 256 tokens. Measured on one H200 (docs/RESULTS.md):
training 1.3 minutes (0.04 s/step through the Pallas prefill kernels, one TF32 pass per product; 3.2
minutes with the earlier XLA attention), then 31-65 s per serving configuration, so all 13
configurations take longer than one 10-minute device call: split them with ``--configs``.
``--steps`` overrides the training steps; ``--load DIR`` serves a saved checkpoint without training
(e.g. to train and serve in separate jobs).

Outputs under ``--out``: ``results.json``, ``configs.csv`` (one row per KV-cache configuration; the
first row is exact attention, whose memory columns are those of an unquantized bf16 cache),
``needle.csv``, ``loss.csv``, ``loss.png``, ``ppl.png``, ``needle.png`` and the checkpoint.

How a tiny model may differ from a large one (read the numbers with this in mind):

* It is undertrained and its perplexity is high, so its next-byte distributions are broad; a small
  perturbation of attention moves broad distributions less (in ratio) than the peaked ones of a
  strong model, which can make quantization look cheaper than it is.
* Large trained models grow outlier key channels, attention sinks and very peaked attention heads;
  a few hundred steps do not. TurboQuant's rotation exists to spread outliers, so its benefit (and
  the gap between presets, e.g. the outlier-split keys) may be smaller here than on a real model.
* head_dim 64 (cpu) vs 128 in most real models: the quantization error of the attention logits
  depends on the dimension (the paper's bounds scale like 1/d for unit vectors), so per-logit errors
  differ.
* Contexts are 256 (cpu) or 1024 tokens; errors that grow with the number of cached tokens (softmax
  over tens of thousands of slightly wrong logits) are not probed.
* The needle skill is learned from synthetic examples and appears abruptly (a phase change), so at
  600 steps it depends on the seed and on the corpus (the stdlib differs between Python builds).
  Measured on the ``cpu`` size under exact attention (Python 3.11.7 stdlib): seed 0 reached 100%
  exact match at every length, seed 2 25-40% (40-75% after 800 steps). A model near that threshold
  has small margins that quantization noise flips easily; a saturated one may hide errors that a
  larger model with less redundant retrieval would show. Compare every configuration with the exact
  row of the same run.
* Everything runs in float32; real deployments compute K/V in bf16 before quantizing them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
import functools
import json
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import tqjax
from experiments import corpus as corpus_lib
from tqjax.backends import NATIVE_DTYPE, boundary_layer_dtypes
from tqjax.nn import PagedScheduler, ScheduledBatch, TransformerLM, generate

CHECKPOINT_FORMAT = "tqjax-lm/1"
HIGH_PRECISION = "turboquant_k8v4"  # the KV-cache dtype the model is built with (training uses no cache)
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
EXACT_BATCH = 16  # rows per exact-attention (train_logits) call


def needle_lengths(context: int) -> list[int]:
    """Context lengths for the needle test: 1/4, 1/2, 3/4 of the trained length and the longest
    context whose query and answer still fit it."""
    longest = context - corpus_lib.QUERY_LEN - corpus_lib.VALUE_LEN + 1
    return sorted({context // 4, context // 2, 3 * context // 4, longest})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the LM (saved in the checkpoint's config.json)."""

    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    context: int
    vocab_size: int = corpus_lib.VOCAB_SIZE
    rope_base: float = 10000.0
    qk_norm: bool = False
    tie_embeddings: bool = True


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Training and evaluation settings of one size."""

    model: ModelConfig
    steps: int
    batch: int  # packed rows per step
    lr: float
    warmup: int
    max_segments: int  # segments per packed row
    needle_prob: float  # probability that a packed segment is a needle example
    answer_weight: float  # loss weight of the tokens after QUERY in needle examples (key, separator, answer)
    eval_every: int  # steps between held-out loss evaluations
    eval_windows: int  # held-out windows for perplexity, served together
    prefill_group: int  # prompts prefilled together in one step
    needle_trials: int  # needles per (length, depth) cell; all needles are served together
    gen_prompts: int
    gen_tokens: int
    block_size: int

    def __post_init__(self) -> None:
        cells = len(needle_lengths(self.model.context)) * len(NEEDLE_DEPTHS)
        if self.eval_windows % self.prefill_group or cells * self.needle_trials % self.prefill_group:
            raise ValueError("eval_windows and the needle count must be multiples of prefill_group")
        if self.model.context // 2 + self.gen_tokens > self.model.context:
            raise ValueError("generation prompts (half the context) plus gen_tokens must fit the context")


SIZES = {
    "cpu": RunConfig(
        ModelConfig(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=384, context=256),
        steps=600, batch=8, lr=3e-3, warmup=30, max_segments=8, needle_prob=0.8, answer_weight=10.0, eval_every=100,
        eval_windows=64, prefill_group=4, needle_trials=4, gen_prompts=8, gen_tokens=64, block_size=16,
    ),
    "gpu": RunConfig(
        ModelConfig(d_model=512, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=128, mlp_dim=1536, context=1024),
        steps=2000, batch=16, lr=1e-3, warmup=100, max_segments=16, needle_prob=0.6, answer_weight=10.0, eval_every=200,
        eval_windows=128, prefill_group=2, needle_trials=8, gen_prompts=16, gen_tokens=256, block_size=16,
    ),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- model, loss, optimizer ------------------------------------------------------------------------


def build_model(cfg: ModelConfig, kv_cache_dtypes: str | list[str], seed: int = 0) -> TransformerLM:
    return TransformerLM(
        cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim,
        kv_cache_dtypes=kv_cache_dtypes, rope_base=cfg.rope_base, qk_norm=cfg.qk_norm,
        tie_embeddings=cfg.tie_embeddings, rngs=nnx.Rngs(seed),
    )


def with_cache_dtypes(model: TransformerLM, cfg: ModelConfig, kv_cache_dtypes: str | list[str]) -> TransformerLM:
    """The same weights behind other per-layer KV-cache dtypes."""
    out = build_model(cfg, kv_cache_dtypes)
    nnx.update(out, nnx.state(model, nnx.Param))
    return out


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[..., target]: logits [..., V], targets [...] int -> float32 [...]."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]


def perplexity(logprobs: np.ndarray) -> float:
    """exp(-mean log-probability) of the scored tokens."""
    return float(np.exp(-np.mean(np.asarray(logprobs, np.float64))))


def batch_logits(model: TransformerLM, tokens: jax.Array, query_start_loc: jax.Array) -> jax.Array:
    """``train_logits`` of every row: tokens [B, L], query_start_loc [B, S + 1] -> [B, L, V]."""
    return jax.vmap(model.train_logits)(tokens, query_start_loc)


def packed_loss(model: TransformerLM, tokens: jax.Array, query_start_loc: jax.Array, weight: jax.Array) -> jax.Array:
    """Next-token cross-entropy averaged with ``weight`` [B, L - 1] (weight of predicting column t + 1)."""
    lp = token_logprobs(batch_logits(model, tokens, query_start_loc)[:, :-1], tokens[:, 1:])
    return -(lp * weight).sum() / weight.sum()


@dataclasses.dataclass(frozen=True)
class AdamState:
    step: jax.Array
    mu: nnx.State
    nu: nnx.State


jax.tree_util.register_dataclass(AdamState, data_fields=["step", "mu", "nu"], meta_fields=[])


def adam_init(params: nnx.State) -> AdamState:
    zeros = jax.tree.map(jnp.zeros_like, params)
    return AdamState(jnp.zeros((), jnp.int32), zeros, zeros)


def adam_update(
    params: nnx.State, grads: nnx.State, opt: AdamState, lr: jax.Array,
    b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, clip: float = 1.0,
) -> tuple[nnx.State, AdamState]:
    """One Adam step (Kingma & Ba, bias-corrected) on gradients clipped to global norm ``clip``."""
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, clip / (norm + 1e-12)), grads)
    step = opt.step + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, opt.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, opt.nu, grads)
    c1, c2 = 1 - b1 ** step.astype(jnp.float32), 1 - b2 ** step.astype(jnp.float32)
    params = jax.tree.map(lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps), params, mu, nu)
    return params, AdamState(step, mu, nu)


def learning_rate(step: int, run: RunConfig) -> float:
    """Linear warmup over ``run.warmup`` steps, then cosine decay to 10% of ``run.lr`` at ``run.steps``."""
    if step < run.warmup:
        return run.lr * (step + 1) / run.warmup
    frac = (step - run.warmup) / max(1, run.steps - run.warmup)
    return run.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


@functools.partial(jax.jit, static_argnums=0)
def train_step(graphdef, params, opt, tokens, query_start_loc, weight, lr):
    """(params, opt state, loss before the step) after one Adam step on a packed batch."""

    def loss_fn(p):
        return packed_loss(nnx.merge(graphdef, p), tokens, query_start_loc, weight)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    params, opt = adam_update(params, grads, opt, lr)
    return params, opt, loss


@functools.partial(jax.jit, static_argnums=0)
def _eval_loss(graphdef, params, tokens, query_start_loc, weight):
    return packed_loss(nnx.merge(graphdef, params), tokens, query_start_loc, weight)


def train(model: TransformerLM, corpus: corpus_lib.Corpus, run: RunConfig, seed: int) -> list[dict]:
    """Train ``model`` in place; returns one record per step: lr, the training objective on that step's
    batch (needle query and answer weighted), and every ``eval_every`` steps the held-out code cross-entropy
    (nats per byte, unweighted, on a fixed batch of held-out code without needles).

    Runs under ``jax.default_matmul_precision("tensorfloat32")``: XLA's float32 matmuls on NVIDIA GPUs
    are TF32 by default anyway (only "highest" turns that off), and the setting gives the Pallas prefill
    kernels the same precision (one TF32 pass; they default to float32-accurate TF32x3, 3x the
    products). On a CPU nothing changes. Serving (perplexity, needles) runs at the default precision."""
    rng = np.random.default_rng(seed)
    graphdef, params = nnx.split(model)
    opt = adam_init(params)
    length = run.model.context
    held = corpus_lib.pack_batch(corpus.heldout, np.random.default_rng(seed + 1), run.batch, length, 1, 0.0)
    held_args = tuple(jnp.asarray(a) for a in (held.tokens, held.query_start_loc, held.target_weight))
    history, losses, t0 = [], [], time.time()
    with jax.default_matmul_precision("tensorfloat32"):
        for step in range(run.steps):
            b = corpus_lib.pack_batch(corpus.train, rng, run.batch, length, run.max_segments, run.needle_prob,
                                      run.answer_weight)
            lr = learning_rate(step, run)
            params, opt, loss = train_step(graphdef, params, opt, jnp.asarray(b.tokens),
                                           jnp.asarray(b.query_start_loc), jnp.asarray(b.target_weight), jnp.float32(lr))
            losses.append(loss)
            history.append(dict(step=step, lr=lr))
            if (step + 1) % run.eval_every == 0 or step + 1 == run.steps:
                history[-1]["heldout_loss"] = float(_eval_loss(graphdef, params, *held_args))
                log(f"step {step + 1}/{run.steps}  objective {float(loss):.3f}  held-out code "
                    f"{history[-1]['heldout_loss']:.3f} nats/byte  ({(time.time() - t0) / (step + 1):.2f} s/step)")
    for rec, loss in zip(history, losses):
        rec["train_loss"] = float(loss)
    nnx.update(model, params)
    return history


# ---- checkpoint ------------------------------------------------------------------------------------


def _param_name(path: tuple) -> str:
    return "/".join(str(k.key) for k in path)


def _flat_params(model: TransformerLM) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    return {_param_name(path): np.asarray(leaf) for path, leaf in leaves}


def save_checkpoint(model: TransformerLM, cfg: ModelConfig, directory: str | os.PathLike, training: dict) -> None:
    """Write ``model.npz`` and ``config.json`` (format: see the module docstring)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / "model.npz", **_flat_params(model))
    arch = dataclasses.asdict(cfg)
    config = dict(
        format=CHECKPOINT_FORMAT,
        model={k: v for k, v in arch.items() if k != "context"},
        context=cfg.context,
        tokenizer=dict(kind="bytes", bytes=256, needle_open=corpus_lib.NEEDLE_OPEN,
                       needle_sep=corpus_lib.NEEDLE_SEP, needle_close=corpus_lib.NEEDLE_CLOSE, query=corpus_lib.QUERY),
        training=training,
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def load_checkpoint(
    directory: str | os.PathLike, kv_cache_dtypes: str | list[str]
) -> tuple[TransformerLM, ModelConfig]:
    """Rebuild the model written by :func:`save_checkpoint` with the given KV-cache dtypes."""
    directory = pathlib.Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory}: not a {CHECKPOINT_FORMAT} checkpoint (format {config.get('format')!r})")
    cfg = ModelConfig(context=config["context"], **config["model"])
    model = build_model(cfg, kv_cache_dtypes)
    with np.load(directory / "model.npz") as z:
        arrays = {name: z[name] for name in z.files}
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
    names = [_param_name(path) for path, _ in leaves]
    if set(names) != set(arrays):
        raise ValueError(f"{directory}: parameter names differ: {sorted(set(names) ^ set(arrays))}")
    for name, (_, leaf) in zip(names, leaves):
        if arrays[name].shape != leaf.shape or arrays[name].dtype != leaf.dtype:
            raise ValueError(f"{directory}: {name} is {arrays[name].dtype}{list(arrays[name].shape)}, "
                             f"expected {leaf.dtype}{list(leaf.shape)}")
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, [jnp.asarray(arrays[n]) for n in names]))
    nnx.update(model, state)
    return model, cfg


# ---- exact attention (no cache) --------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _window_logits(graphdef, params, tokens):
    n, length = tokens.shape
    qsl = jnp.tile(jnp.array([0, length], jnp.int32), (n, 1))
    return batch_logits(nnx.merge(graphdef, params), tokens, qsl)


def exact_logits(model: TransformerLM, windows: np.ndarray) -> np.ndarray:
    """Full-window causal logits with exact attention: windows [N, L] -> float32 [N, L, V]."""
    graphdef, params = nnx.split(model)
    return np.concatenate([np.asarray(_window_logits(graphdef, params, jnp.asarray(windows[i : i + EXACT_BATCH])))
                           for i in range(0, len(windows), EXACT_BATCH)])


@functools.partial(jax.jit, static_argnums=0)
def _exact_next(graphdef, params, buf, lens):
    qsl = jnp.stack([jnp.zeros_like(lens), lens], axis=1)
    logits = batch_logits(nnx.merge(graphdef, params), buf, qsl)
    return jnp.argmax(logits[jnp.arange(buf.shape[0]), lens - 1], axis=-1).astype(jnp.int32)


def exact_greedy(model: TransformerLM, prompts: list[np.ndarray], num_tokens: int, context: int) -> np.ndarray:
    """Greedy continuation with exact attention: ragged prompts -> int32 [len(prompts), num_tokens].

    Each step runs ``train_logits`` over [EXACT_BATCH, context] buffers (columns past a row's tokens
    are padding)."""
    if max(len(p) for p in prompts) + num_tokens - 1 > context:
        raise ValueError(f"a prompt plus {num_tokens} tokens exceeds the context {context}")
    graphdef, params = nnx.split(model)
    out = np.zeros((len(prompts), num_tokens), np.int32)
    for lo in range(0, len(prompts), EXACT_BATCH):
        rows = prompts[lo : lo + EXACT_BATCH]
        buf = np.zeros((len(rows), context), np.int32)
        lens = np.array([len(p) for p in rows])
        for r, p in enumerate(rows):
            buf[r, : len(p)] = p
        for i in range(num_tokens):
            tok = np.asarray(_exact_next(graphdef, params, jnp.asarray(buf), jnp.asarray(lens + i, jnp.int32)))
            out[lo : lo + len(rows), i] = tok
            if i + 1 < num_tokens:
                buf[np.arange(len(rows)), lens + i] = tok
    return out


# ---- paged serving -----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _serve(graphdef, params, tokens, caches, metadata):
    return nnx.merge(graphdef, params).serve_step(tokens, caches, metadata)


class PagedServer:
    """One model behind paged caches for ``batch`` sequences of at most ``context`` tokens each.

    Prefill steps take ``prefill_group`` prompts and are padded to ``prefill_group`` times the longest
    prompt of the call (padding rows have slot -1), so the prefill steps of a call share one shape and
    so do its decode steps: the step compiles once for each."""

    def __init__(self, model: TransformerLM, batch: int, context: int, block_size: int, prefill_group: int) -> None:
        if batch % prefill_group:
            raise ValueError(f"batch {batch} is not a multiple of prefill_group {prefill_group}")
        self.graphdef, self.params = nnx.split(model)
        self.batch, self.context, self.block_size, self.prefill_group = batch, context, block_size, prefill_group
        self.max_blocks = math.ceil(context / block_size)
        self.caches = model.allocate_caches(batch * self.max_blocks, block_size)

    def _step(self, sb: ScheduledBatch, num_tokens: int) -> jax.Array:
        """Run one scheduled step padded to ``num_tokens`` rows; logits of each request's last row [R, V]."""
        pad = num_tokens - sb.tokens.shape[0]
        slots = jnp.pad(sb.metadata.slot_mapping, (0, pad), constant_values=-1)
        md = dataclasses.replace(sb.metadata, slot_mapping=slots)
        logits, self.caches = _serve(self.graphdef, self.params, jnp.pad(sb.tokens, (0, pad)), self.caches, md)
        return logits[jnp.asarray(sb.last_rows)]

    def run(self, prompts: list[np.ndarray], forced: np.ndarray, num_greedy: int) -> tuple[np.ndarray, np.ndarray]:
        """Prefill the prompts (attention over their exact K/V, which are stored quantized), feed the
        ``forced`` tokens one decode step each (teacher forcing), then decode ``num_greedy`` tokens greedily.

        ``batch`` ragged prompts, forced [batch, F] -> (logits float32 [batch, F + 1, V]: after the
        prompt and after each forced token; greedy tokens int32 [batch, num_greedy], the first being the
        argmax of the last logits).
        """
        b, g, longest = len(prompts), self.prefill_group, max(len(p) for p in prompts)
        if b != self.batch or longest + forced.shape[1] + num_greedy - 1 > self.context:
            raise ValueError(f"server built for {self.batch} sequences of at most {self.context} tokens")
        sched = PagedScheduler(self.batch * self.max_blocks, self.block_size, self.max_blocks)
        ids = [sched.add(p.tolist()) for p in prompts]
        logits = [jnp.concatenate([self._step(sched.schedule(ids[k : k + g]), g * longest) for k in range(0, b, g)])]
        for t in range(forced.shape[1]):
            for i, tok in zip(ids, forced[:, t].tolist()):
                sched.append(i, tok)
            logits.append(self._step(sched.schedule(ids), b))  # all decodes: rows in ``ids`` order
        last, greedy = logits[-1], np.zeros((b, num_greedy), np.int32)
        for k in range(num_greedy):
            greedy[:, k] = np.asarray(jnp.argmax(last, axis=-1))
            if k + 1 < num_greedy:
                for i, tok in zip(ids, greedy[:, k].tolist()):
                    sched.append(i, tok)
                last = self._step(sched.schedule(ids), b)
        return np.asarray(jnp.stack(logits, axis=1)), greedy


# ---- evaluation --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalData:
    """Held-out material shared by every configuration, with its exact-attention results."""

    windows: np.ndarray  # [eval_windows, L]
    prompts: np.ndarray  # [gen_prompts, L/2] generation prompts
    needles: list[corpus_lib.NeedleExample]  # needle_trials per (length, depth) cell
    exact_logprobs: np.ndarray  # [eval_windows, L/2]: log-prob of windows[:, L/2:]
    exact_top1: np.ndarray  # [eval_windows, L/2]
    exact_generation: np.ndarray  # [gen_prompts, gen_tokens]
    exact_needle: np.ndarray  # [len(needles)] bool: value retrieved


def needle_retrieved(needles: list[corpus_lib.NeedleExample], values: np.ndarray) -> np.ndarray:
    return np.all(values == np.stack([e.value for e in needles]), axis=1)


def build_eval_data(model: TransformerLM, corpus: corpus_lib.Corpus, run: RunConfig, seed: int) -> EvalData:
    length, half = run.model.context, run.model.context // 2
    windows = corpus.heldout.windows(run.eval_windows, length, seed)
    prompts = corpus.heldout.windows(run.gen_prompts, half, seed + 1)
    rng = np.random.default_rng(seed + 2)
    needles = [corpus_lib.make_needle_example(corpus.heldout, rng, n, d)
               for n in needle_lengths(length) for d in NEEDLE_DEPTHS for _ in range(run.needle_trials)]
    logits = exact_logits(model, windows)[:, half - 1 : -1]
    found = exact_greedy(model, [np.concatenate([e.context, e.query]) for e in needles], corpus_lib.VALUE_LEN, length)
    return EvalData(
        windows=windows,
        prompts=prompts,
        needles=needles,
        exact_logprobs=np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(windows[:, half:]))),
        exact_top1=logits.argmax(-1),
        exact_generation=exact_greedy(model, list(prompts), run.gen_tokens, length),
        exact_needle=needle_retrieved(needles, found),
    )


def generation_agreement(generated: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(fraction of identical tokens position by position, mean index of the first difference; a
    sequence that never differs counts its length)."""
    same = generated == reference
    first = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    return float(same.mean()), float(first.mean())


def evaluate_config(model: TransformerLM, data: EvalData, run: RunConfig) -> dict:
    """Perplexity, top-1 / generation agreement and needle retrieval of one KV-cache configuration."""
    length, half, bs = run.model.context, run.model.context // 2, run.block_size
    w = data.windows
    logits, _ = PagedServer(model, len(w), length, bs, run.prefill_group).run(list(w[:, :half]), w[:, half:-1], 0)
    top1 = logits.argmax(-1)
    logprobs = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(w[:, half:])))
    _, values = PagedServer(model, len(data.needles), length, bs, run.prefill_group).run(
        [e.context for e in data.needles], np.stack([e.query for e in data.needles]), corpus_lib.VALUE_LEN)
    caches = model.allocate_caches(len(data.prompts) * math.ceil(length / bs), bs)
    generated, _ = generate(model, caches, data.prompts.tolist(), run.gen_tokens)
    agree, first = generation_agreement(np.asarray(generated), data.exact_generation)
    return dict(
        ppl=perplexity(logprobs),
        top1_agreement=float((top1 == data.exact_top1).mean()),
        generation_agreement=agree,
        first_divergence=first,
        needle=needle_retrieved(data.needles, values),
    )


def serving_configs(num_layers: int, head_dim: int) -> dict[str, list[str]]:
    """Per-layer KV-cache dtypes of every configuration: each preset on all layers, then each low-bit
    preset (at most 3 key bits per channel) between unquantized "auto" first and last layers
    (:func:`tqjax.backends.boundary_layer_dtypes`, one boundary layer at each end; only with at least 4
    layers, since at most half of the layers may stay native)."""
    configs = {name: [name] * num_layers for name in tqjax.PRESETS}
    for name in tqjax.PRESETS:
        if tqjax.TurboQuantConfig.from_cache_dtype(name, head_dim).key_bits_per_channel <= 3 and num_layers >= 4:
            configs[f"{name}+boundary"] = boundary_layer_dtypes(name, num_layers, 1)
    return configs


def select_configs(configs: dict[str, list[str]], patterns: str) -> dict[str, list[str]]:
    """The configurations whose name matches one of the comma-separated shell ``patterns``, in order;
    raises ValueError (listing the valid names) if a pattern matches none."""
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    for p in wanted:
        if not fnmatch.filter(configs, p):
            raise ValueError(f"--configs pattern {p!r} matches no configuration; valid: {', '.join(configs)}")
    return {k: v for k, v in configs.items() if any(fnmatch.fnmatchcase(k, p) for p in wanted)}


def memory_row(dtypes: list[str] | None, cfg: ModelConfig, block_size: int, budget: int) -> dict:
    """Bytes per token of each layer (``slot_bytes`` x KV heads: TurboQuant codes and scales, or the
    bf16 K and V of an "auto" layer) and over all layers, and the tokens (whole blocks) that fit
    ``budget`` bytes. ``dtypes=None``: an unquantized bf16 cache ("auto") on every layer."""
    dtypes = [NATIVE_DTYPE] * cfg.num_layers if dtypes is None else dtypes
    per_layer = [tqjax.cache_config(d, cfg.head_dim).slot_bytes * cfg.num_kv_heads for d in dtypes]
    if len(set(dtypes)) == 1:
        one = tqjax.cache_config(dtypes[0], cfg.head_dim)
        tokens = tqjax.tokens_in_budget(one, budget, block_size, cfg.num_kv_heads, cfg.num_layers)
    else:
        tokens = budget // (sum(per_layer) * block_size) * block_size
    return dict(bytes_per_token_per_layer=per_layer, bytes_per_token=sum(per_layer), max_tokens_in_budget=tokens)


# ---- report ----------------------------------------------------------------------------------------


def needle_cells(needles: list[corpus_lib.NeedleExample], retrieved: np.ndarray) -> list[dict]:
    """Retrieval accuracy per (context length, depth) cell."""
    keys = np.array([(len(e.context), e.depth) for e in needles])
    cells = []
    for n, d in sorted({(int(n), float(d)) for n, d in keys}):
        hits = retrieved[(keys[:, 0] == n) & (keys[:, 1] == d)]
        cells.append(dict(length=n, depth=d, trials=int(hits.size), correct=int(hits.sum()),
                          accuracy=float(hits.mean())))
    return cells


def format_table(rows: list[dict], budget_gib: float) -> str:
    lengths = sorted({c["length"] for c in rows[0]["needle_cells"]})
    head = (f"{'configuration':<30} {'ppl':>7} {'/exact':>7} {'top1':>6} {'gen':>6} {'1st-div':>7} "
            f"{'needle':>6} " + " ".join(f"{'n@' + str(n):>6}" for n in lengths)
            + f" {'B/tok/layer':>16} {'B/tok':>6} {f'tok@{budget_gib:g}GiB':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        by_len = [np.mean([c["accuracy"] for c in r["needle_cells"] if c["length"] == n]) for n in lengths]
        per_layer = r["bytes_per_token_per_layer"]
        layer = str(per_layer[0]) if len(set(per_layer)) == 1 else "/".join(map(str, per_layer))
        gen = "-" if r["generation_agreement"] is None else f"{r['generation_agreement']:.3f}"
        div = "-" if r["first_divergence"] is None else f"{r['first_divergence']:.1f}"
        lines.append(
            f"{r['name']:<30} {r['ppl']:>7.3f} {r['ppl_ratio']:>7.4f} {r['top1_agreement']:>6.3f} {gen:>6} {div:>7} "
            f"{r['needle_accuracy']:>6.3f} " + " ".join(f"{a:>6.2f}" for a in by_len)
            + f" {layer:>16} {r['bytes_per_token']:>6} {r['max_tokens_in_budget']:>12}"
        )
    lines += [
        "ppl: held-out perplexity of the second half of each window (paged decode, teacher forcing); "
        "top1: next-token argmax agreement with exact attention;",
        "gen: identical greedy tokens (generate vs exact attention); 1st-div: mean first differing token; "
        "needle: exact-match retrieval (n@L: context length L);",
        "B/tok: KV-cache bytes per token (exact row: an unquantized bf16 cache); tok@: tokens (whole blocks) "
        "that fit the budget.",
    ]
    return "\n".join(lines)


def write_outputs(out: pathlib.Path, results: dict, history: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    rows = results["configurations"]
    with open(out / "configs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "kv_cache_dtypes", "ppl", "ppl_ratio", "top1_agreement", "generation_agreement",
                    "first_divergence", "needle_accuracy", "bytes_per_token_per_layer", "bytes_per_token",
                    "max_tokens_in_budget"])
        for r in rows:
            w.writerow([r["name"], " ".join(r["kv_cache_dtypes"]) or "exact", r["ppl"], r["ppl_ratio"],
                        r["top1_agreement"], r["generation_agreement"], r["first_divergence"], r["needle_accuracy"],
                        " ".join(map(str, r["bytes_per_token_per_layer"])), r["bytes_per_token"],
                        r["max_tokens_in_budget"]])
    with open(out / "needle.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "length", "depth", "trials", "correct", "accuracy"])
        for r in rows:
            for c in r["needle_cells"]:
                w.writerow([r["name"], c["length"], c["depth"], c["trials"], c["correct"], c["accuracy"]])
    if history:
        with open(out / "loss.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "lr", "train_loss", "heldout_loss"])
            for h in history:
                w.writerow([h["step"], h["lr"], h["train_loss"], h.get("heldout_loss", "")])
    plot(out, rows, history)


def plot(out: pathlib.Path, rows: list[dict], history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if history:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([h["step"] for h in history], [h["train_loss"] for h in history], lw=0.8,
                label="training objective (needle query and answer weighted)")
        held = [h for h in history if "heldout_loss" in h]
        ax.plot([h["step"] for h in held], [h["heldout_loss"] for h in held], "o-", label="held-out code")
        ax.set(xlabel="step", ylabel="cross-entropy (nats / byte)", title="training loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=120)
        plt.close(fig)

    quant = rows[1:]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(quant) + 1.5))
    bars = ax.barh([r["name"] for r in quant][::-1], [r["ppl_ratio"] for r in quant][::-1])
    ax.bar_label(bars, fmt="%.4f", fontsize=7, padding=2)
    ax.axvline(1.0, color="k", lw=0.8)
    lo = min(r["ppl_ratio"] for r in quant)
    hi = max(r["ppl_ratio"] for r in quant)
    ax.set_xlim(min(0.999, lo - 0.001), hi + 0.15 * (hi - 1) + 0.002)
    ax.set(xlabel=f"held-out perplexity / exact (exact = {rows[0]['ppl']:.3f})", title="perplexity per KV-cache dtype")
    fig.tight_layout()
    fig.savefig(out / "ppl.png", dpi=120)
    plt.close(fig)

    lengths = sorted({c["length"] for c in rows[0]["needle_cells"]})
    ncol = 4
    nrow = math.ceil(len(rows) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), squeeze=False)
    for ax, r in zip(axes.flat, rows):
        grid = np.array([[next(c["accuracy"] for c in r["needle_cells"] if c["length"] == n and c["depth"] == d)
                          for n in lengths] for d in NEEDLE_DEPTHS])
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, j), a in np.ndenumerate(grid):
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=7, color="w" if a < 0.6 else "k")
        ax.set_xticks(range(len(lengths)), lengths, fontsize=7)
        ax.set_yticks(range(len(NEEDLE_DEPTHS)), NEEDLE_DEPTHS, fontsize=7)
        ax.set_title(r["name"], fontsize=8)
    for ax in axes.flat[len(rows) :]:
        ax.axis("off")
    fig.supxlabel("context length (tokens)")
    fig.supylabel("needle depth")
    fig.tight_layout()
    fig.savefig(out / "needle.png", dpi=120)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu", help="model and run size (see the module doc)")
    ap.add_argument("--steps", type=int, help="override the size's training steps (>= 1)")
    ap.add_argument("--load", help="serve this checkpoint directory instead of training (architecture from the "
                    "checkpoint, evaluation settings from --size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-gib", type=float, default=1.0, help="KV-cache budget for max tokens")
    ap.add_argument("--out", default="results/train_to_serve")
    ap.add_argument("--configs", default="*", help="comma-separated KV-cache configurations to serve, by name or "
                    "shell pattern (e.g. 'turboquant_4bit_nc,*+boundary'); default: all")
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be at least 1")
    run = SIZES[args.size] if args.steps is None else dataclasses.replace(SIZES[args.size], steps=args.steps)
    try:  # fail before training on a pattern that matches nothing
        select_configs(serving_configs(run.model.num_layers, run.model.head_dim), args.configs)
    except ValueError as e:
        ap.error(str(e))
    out = pathlib.Path(args.out)
    budget = int(args.budget_gib * 2**30)
    t_start = time.time()
    log(f"python {sys.version.split()[0]}, jax {jax.__version__} on {jax.devices()[0].platform}; size {args.size}")

    corpus = corpus_lib.load_corpus()
    log(f"corpus: {corpus.summary()}")
    history: list[dict] = []
    if args.load:
        model, arch = load_checkpoint(args.load, HIGH_PRECISION)
        run = dataclasses.replace(run, model=arch)
        checkpoint = dict(path=args.load, reloaded_logits_identical=None)
        log(f"loaded {args.load}")
    else:
        model = build_model(run.model, HIGH_PRECISION, args.seed)
        n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
        log(f"training {n_params} parameters: {run.steps} steps x {run.batch} rows x {run.model.context} tokens")
        history = train(model, corpus, run, args.seed)
        ckpt = out / "checkpoint"
        save_checkpoint(model, run.model, ckpt, dict(steps=run.steps, batch=run.batch, seed=args.seed,
                                                     final_train_loss=history[-1]["train_loss"],
                                                     final_heldout_loss=history[-1]["heldout_loss"],
                                                     corpus=corpus.summary()))
        reloaded, _ = load_checkpoint(ckpt, HIGH_PRECISION)
        probe = corpus.heldout.windows(4, run.model.context, args.seed + 3)
        if not np.array_equal(exact_logits(model, probe), exact_logits(reloaded, probe)):
            raise RuntimeError(f"the checkpoint in {ckpt} does not reproduce the trained model's logits")
        model = reloaded
        checkpoint = dict(path=str(ckpt), reloaded_logits_identical=True)
        log(f"checkpoint written to {ckpt} and reloaded: logits identical")

    cfg = run.model
    data = build_eval_data(model, corpus, run, args.seed)
    exact_needle = needle_cells(data.needles, data.exact_needle)
    rows = [dict(
        name="exact attention", kv_cache_dtypes=[], ppl=perplexity(data.exact_logprobs), ppl_ratio=1.0,
        top1_agreement=1.0, generation_agreement=None, first_divergence=None,
        needle_accuracy=float(np.mean([c["accuracy"] for c in exact_needle])), needle_cells=exact_needle,
        **memory_row(None, cfg, run.block_size, budget),
    )]
    log(f"exact attention: ppl {rows[0]['ppl']:.3f}, needle {rows[0]['needle_accuracy']:.3f}")
    configs = select_configs(serving_configs(cfg.num_layers, cfg.head_dim), args.configs)
    for name, dtypes in configs.items():
        t0 = time.time()
        res = evaluate_config(with_cache_dtypes(model, cfg, dtypes), data, run)
        cells = needle_cells(data.needles, res.pop("needle"))
        rows.append(dict(name=name, kv_cache_dtypes=dtypes, ppl_ratio=res["ppl"] / rows[0]["ppl"], **res,
                         needle_accuracy=float(np.mean([c["accuracy"] for c in cells])), needle_cells=cells,
                         **memory_row(dtypes, cfg, run.block_size, budget)))
        r = rows[-1]
        log(f"{name}: ppl {r['ppl']:.3f} (x{r['ppl_ratio']:.4f}), top1 {r['top1_agreement']:.3f}, "
            f"gen {r['generation_agreement']:.3f}, needle {r['needle_accuracy']:.3f} ({time.time() - t0:.1f} s)")
        out.mkdir(parents=True, exist_ok=True)  # rows so far, in case the run is cut short
        (out / "configs.partial.json").write_text(json.dumps(rows, indent=1))

    table = format_table(rows, args.budget_gib)
    print(table)
    results = dict(
        meta=dict(python=sys.version.split()[0], jax=jax.__version__, platform=jax.devices()[0].platform,
                  size=args.size, seed=args.seed, budget_bytes=budget, seconds=time.time() - t_start,
                  run=dataclasses.asdict(run), corpus=corpus.summary(), checkpoint=checkpoint,
                  scored_tokens=int(data.exact_logprobs.size), needle_depths=list(NEEDLE_DEPTHS),
                  boundary_note="'+boundary' configurations keep the first and last layer unquantized "
                                "(kv_cache_dtype 'auto': bf16 K/V, FLASH backend on GPUs, reference "
                                "elsewhere) and the named preset in between"),
        configurations=rows,
        table=table,
    )
    write_outputs(out, results, history)
    log(f"done in {time.time() - t_start:.0f} s; results in {out}")
    return results


if __name__ == "__main__":
    main()
