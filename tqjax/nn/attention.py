"""Grouped-query self-attention whose KV cache is a paged TurboQuant cache (Flax NNX).

A layer may instead keep an unquantized cache (``kv_cache_dtype`` "auto", "bfloat16" or "float16": a
:class:`tqjax.layout.NativePagedKVCache`, e.g. the boundary layers of
:func:`tqjax.backends.boundary_layer_dtypes`); it is served by the same code path, the registry routing
its ops to the FLASH backend on GPUs and to the reference elsewhere. Below, "quantized" then means
"rounded to the cache dtype".

Serving (:meth:`TurboQuantAttention.__call__`) follows vLLM's split (request kinds: see
:mod:`tqjax.nn.metadata`; ``c`` tokens cached before the step, ``n`` new):

* every new token's K/V is quantized into the paged cache with :func:`tqjax.store` first;
* decode requests (``c > 0``, ``n <= SHORT_CHUNK_TOKENS``: one-token decodes, short continuation
  chunks, speculative verify) run :func:`tqjax.paged_decode` with one query row per new token: row i
  gets the request's block table and context length ``c + i + 1``, so it reads the quantized prefix
  and the quantized new tokens up to itself;
* first-chunk prefill rows (``c == 0``) attend over the EXACT K/V of the chunk with
  :func:`tqjax.prefill_attention` (the quantized copy is only read by later steps);
* long continuation chunks (``c > 0``, ``n > SHORT_CHUNK_TOKENS``) dequantize the first ``c`` cached
  tokens with :func:`tqjax.dequantize` and attend over [dequantized prefix; exact K/V of the chunk],
  row i seeing prefix tokens ``0 .. c - 1`` and chunk tokens ``0 .. i``.

Training (:meth:`TurboQuantAttention.attend`) is full causal attention over packed sequences with no
cache, differentiable end to end.

Several devices (``mesh``, a :func:`tqjax.sharding.make_mesh` mesh whose "data" axis has size 1):
tensor parallelism over heads. The q/k/v projections are column parallel (their kernels and biases
split by heads over "model"), the cache is allocated sharded (:func:`tqjax.sharding.allocate_sharded`),
every attention op runs per device through :mod:`tqjax.sharding` with no cross-device traffic, and
the row-parallel o_proj (kernel split by input rows over "model") sums the devices' partial outputs:
the layer's only collective, an all-reduce that XLA inserts.

RoPE uses the half-split ("rotate_half", GPT-NeoX / Llama) convention: channel i < D/2 is paired with
channel i + D/2 and rotated by ``position * base ** (-2i / D)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tqjax import sharding
from tqjax.config import cache_config
from tqjax.layout import KVCache, NativePagedKVCache, PagedKVCache, allocate_cache
from tqjax.nn.metadata import AttentionMetadata, token_requests


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary embedding of ``x`` [T, H, D] (D even) at ``positions`` [T] int; same shape and dtype.

    Computed in float32: ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)`` with ``x1 = x[..., :D/2]``,
    ``x2 = x[..., D/2:]`` and angle ``positions * base ** (-2i / D)`` for pair i.
    """
    d = x.shape[-1]
    inv_freq = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [D/2]
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def place(variable: nnx.Variable, mesh: Mesh, spec: P) -> None:
    """Put a parameter's array on ``mesh`` laid out as ``spec`` (in place)."""
    variable.set_value(jax.device_put(variable.get_value(), NamedSharding(mesh, spec)))


def check_model_mesh(mesh: Mesh, **sizes: int) -> None:
    """Raise ValueError unless ``mesh`` is a ("data", "model") mesh with data size 1 whose "model" size
    divides every ``sizes`` value (named by its keyword)."""
    data, model = sharding.mesh_sizes(mesh)
    if data != 1:
        raise ValueError(
            f"tqjax.nn shards over the mesh's 'model' axis only; its 'data' axis must have size 1, got {data}"
        )
    for name, n in sizes.items():
        if n % model:
            raise ValueError(f"{name} ({n}) must be divisible by the mesh's 'model' axis size ({model})")


def packed_positions(query_start_loc: jax.Array, num_tokens: int) -> jax.Array:
    """Position of each row inside its packed sequence: int32 [num_tokens] (padding rows: 0).

    ``query_start_loc`` [S + 1] int32: sequence s is rows ``query_start_loc[s]:query_start_loc[s+1]``.
    """
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seg = token_requests(query_start_loc, num_tokens)
    num_seqs = query_start_loc.shape[0] - 1
    start = query_start_loc[jnp.minimum(seg, num_seqs - 1)]
    return jnp.where(seg < num_seqs, t - start, 0).astype(jnp.int32)


class TurboQuantAttention(nnx.Module):
    """GQA self-attention with RoPE, optional qk-norm and logit softcap, over a TurboQuant paged cache.

    Args:
        d_model: model width.
        num_heads: query heads Hq.
        num_kv_heads: key/value heads Hk (Hq a multiple of Hk; query head h reads KV head h // (Hq/Hk)).
        head_dim: D, a head dimension the cache supports (TurboQuant: multiples of 32, 32..512; native:
            any even D, the FLASH kernel taking powers of two in 16..256).
        kv_cache_dtype: this layer's KV-cache dtype: a TurboQuant preset (a key of :data:`tqjax.PRESETS`)
            or a native dtype, "auto" (bfloat16), "bfloat16" or "float16" (see
            :func:`tqjax.config.cache_config`).
        rope_base: RoPE frequency base.
        qk_norm: RMSNorm (learned scale over D, shared by the heads) on q and k before RoPE.
        softcap: if set, logits become ``softcap * tanh(logits / softcap)``.
        use_bias: biases on the q/k/v/o projections.
        norm_eps: epsilon of the qk RMSNorms.
        dtype: computation dtype of projections and activations (parameters stay float32).
        rngs: parameter initialisation.
        mesh: None (one device), or a ("data", "model") mesh with data size 1 and a "model" size that
            divides ``num_kv_heads``: heads are split over "model" (see the module docstring).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        kv_cache_dtype: str,
        rope_base: float = 10000.0,
        qk_norm: bool = False,
        softcap: float | None = None,
        use_bias: bool = False,
        norm_eps: float = 1e-6,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
        mesh: Mesh | None = None,
    ) -> None:
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        if softcap is not None and softcap <= 0:
            raise ValueError(f"softcap must be positive or None, got {softcap}")
        if mesh is not None:
            check_model_mesh(mesh, num_kv_heads=num_kv_heads)
        self.cache_config = cache_config(kv_cache_dtype, head_dim)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.rope_base = float(rope_base)
        self.softcap = None if softcap is None else float(softcap)
        self.dtype = dtype
        self.mesh = mesh

        def linear(n_in: int, n_out: int) -> nnx.Linear:
            return nnx.Linear(n_in, n_out, use_bias=use_bias, dtype=dtype, rngs=rngs)

        self.q_proj = linear(d_model, num_heads * head_dim)
        self.k_proj = linear(d_model, num_kv_heads * head_dim)
        self.v_proj = linear(d_model, num_kv_heads * head_dim)
        self.o_proj = linear(num_heads * head_dim, d_model)
        self.q_norm = nnx.RMSNorm(head_dim, epsilon=norm_eps, dtype=dtype, rngs=rngs) if qk_norm else None
        self.k_norm = nnx.RMSNorm(head_dim, epsilon=norm_eps, dtype=dtype, rngs=rngs) if qk_norm else None
        if mesh is not None:
            for proj in (self.q_proj, self.k_proj, self.v_proj):  # column parallel: output features = heads
                place(proj.kernel, mesh, P(None, sharding.MODEL))
                if use_bias:
                    place(proj.bias, mesh, P(sharding.MODEL))
            place(self.o_proj.kernel, mesh, P(sharding.MODEL, None))  # row parallel: input features = heads
            rest = [self.o_proj.bias] if use_bias else []
            rest += [n.scale for n in (self.q_norm, self.k_norm) if n is not None]
            for variable in rest:
                place(variable, mesh, P())

    @property
    def kv_cache_dtype(self) -> str:
        return self.cache_config.name

    def allocate_cache(self, num_blocks: int, block_size: int) -> KVCache:
        """A zeroed cache for this layer (a :class:`PagedKVCache`, or a :class:`NativePagedKVCache` for a
        native dtype): ``num_blocks`` blocks of ``block_size`` token slots per KV head (with a mesh:
        created sharded, each device holding its KV heads of every block)."""
        if self.mesh is None:
            return allocate_cache(self.cache_config, num_blocks, block_size, self.num_kv_heads)
        return sharding.allocate_sharded(self.cache_config, num_blocks, block_size, self.num_kv_heads, self.mesh)

    def _project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [T, d_model], positions [T] -> q [T, Hq, D], k [T, Hk, D], v [T, Hk, D] (RoPE applied)."""
        t = x.shape[0]
        q = self.q_proj(x).reshape(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, positions, self.rope_base), apply_rope(k, positions, self.rope_base), v

    def _output(self, o: jax.Array) -> jax.Array:
        """o [T, Hq, D] -> [T, d_model]."""
        return self.o_proj(o.reshape(o.shape[0], self.num_heads * self.head_dim).astype(self.dtype))

    def _check_cache(self, cache: KVCache) -> None:
        if not isinstance(cache, (PagedKVCache, NativePagedKVCache)):
            raise TypeError(
                f"kv_cache must be a tqjax.PagedKVCache or tqjax.NativePagedKVCache, got {type(cache).__name__}"
            )
        cfg = cache.config
        if cfg.name != self.kv_cache_dtype or cfg.head_dim != self.head_dim or cache.num_kv_heads != self.num_kv_heads:
            raise ValueError(
                f"kv_cache is {cfg.name} with head_dim {cfg.head_dim} and {cache.num_kv_heads} KV heads; this layer "
                f"needs {self.kv_cache_dtype} with head_dim {self.head_dim} and {self.num_kv_heads} KV heads"
            )

    def __call__(
        self, x: jax.Array, kv_cache: KVCache, metadata: AttentionMetadata
    ) -> tuple[jax.Array, KVCache]:
        """One serving step: x [T, d_model] -> (out [T, d_model] in ``dtype``, updated cache).

        ``kv_cache`` is donated to :func:`tqjax.store`: use only the returned cache afterwards. Rows
        past ``metadata.query_start_loc[-1]`` are padding and come out as ``o_proj(0)``.

        Metadata that cannot be checked inside jit (traced values) is trusted, except that without
        ``metadata.has_prefill_context`` the rows of a prefill chunk with cached context come out NaN
        rather than silently wrong.
        """
        self._check_cache(kv_cache)
        metadata.validate(num_tokens=x.shape[0], block_size=kv_cache.block_size)
        q, k, v = self._project(x, metadata.positions())
        ops = sharding.attention_ops(self.mesh)
        kv_cache = ops.store(kv_cache, k, v, metadata.slot_mapping)
        nd = metadata.num_decode_tokens
        parts = []
        if nd:
            row_tables, row_lens = metadata.decode_rows()
            parts.append(ops.paged_decode(q[:nd], kv_cache, row_tables, row_lens, softcap=self.softcap))
        if nd < x.shape[0]:
            parts.append(self._prefill(q[nd:], k[nd:], v[nd:], kv_cache, metadata))
        return self._output(jnp.concatenate(parts, axis=0)), kv_cache

    def _prefill(
        self, q: jax.Array, k: jax.Array, v: jax.Array, kv_cache: KVCache, metadata: AttentionMetadata
    ) -> jax.Array:
        """Prefill rows (and padding) after the decode rows: q [P_T, Hq, D], k/v [P_T, Hk, D] -> [P_T, Hq, D].

        Causal attention over the chunk's exact K/V, after the dequantized cached prefix of each
        continuation chunk when ``metadata.has_prefill_context``; float32 context buffers
        [num_prefills, max_blocks * block_size, Hk, D].
        """
        ops = sharding.attention_ops(self.mesh)
        nd = metadata.num_decode_tokens
        qsl = metadata.query_start_loc[metadata.num_decodes :] - nd  # [P + 1], relative to row nd
        if metadata.num_prefills == 0:
            return ops.prefill_attention(q, k, v, qsl, softcap=self.softcap)  # only padding rows: zeros
        context_lens = metadata.prefill_context_lens()
        if metadata.has_prefill_context:
            k_ctx, v_ctx = ops.dequantize(kv_cache, metadata.block_tables[metadata.num_decodes :], context_lens)
            return ops.prefill_attention(
                q, k, v, qsl, softcap=self.softcap, context_key=k_ctx, context_value=v_ctx, context_lens=context_lens
            )
        out = ops.prefill_attention(q, k, v, qsl, softcap=self.softcap)
        seg = token_requests(qsl, q.shape[0])
        continuation = (context_lens > 0)[jnp.minimum(seg, metadata.num_prefills - 1)] & (seg < metadata.num_prefills)
        return jnp.where(continuation[:, None, None], jnp.nan, out)

    def attend(self, x: jax.Array, query_start_loc: jax.Array) -> jax.Array:
        """Training-mode attention, no cache: x [T, d_model] -> [T, d_model] in ``dtype``.

        ``query_start_loc`` [S + 1] int32 packs S sequences (sequence s is rows
        ``query_start_loc[s]:query_start_loc[s+1]``, positions restart at 0 in each); rows past
        ``query_start_loc[-1]`` are padding. Full causal attention within each sequence over exact K/V;
        differentiable.
        """
        q, k, v = self._project(x, packed_positions(query_start_loc, x.shape[0]))
        prefill = sharding.attention_ops(self.mesh).prefill_attention
        return self._output(prefill(q, k, v, query_start_loc, softcap=self.softcap))
