"""A small decoder-only Transformer LM whose attention layers serve from TurboQuant paged caches.

``TransformerLM`` = token embedding, ``num_layers`` pre-norm blocks (RMSNorm -> :class:`TurboQuantAttention`
-> residual, RMSNorm -> SwiGLU MLP -> residual), a final RMSNorm and a tied or untied output head.
Each layer has its own ``kv_cache_dtype``, e.g. unquantized "auto" first and last layers
(:func:`tqjax.backends.boundary_layer_dtypes`) around TurboQuant layers.

Two entry points share the weights:

* :meth:`TransformerLM.train_logits`: packed sequences, no cache, differentiable;
* :meth:`TransformerLM.serve_step`: one step of a paged-cache serving batch (see
  :mod:`tqjax.nn.metadata`), returning the updated caches.

Given a ``mesh`` (a :func:`tqjax.sharding.make_mesh` mesh with "data" size 1), the model is tensor
parallel over "model": attention as in :class:`TurboQuantAttention`, the MLP Megatron-style (gate/up
column parallel, down row parallel), every other parameter (embedding, norms, head) replicated. Each
block then needs two all-reduces (after o_proj and after down), inserted by XLA.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tqjax.layout import KVCache
from tqjax.nn.attention import TurboQuantAttention, check_model_mesh, place
from tqjax.nn.metadata import AttentionMetadata
from tqjax.sharding import MODEL


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))``: [T, d_model] -> [T, d_model], no biases.

    With a ``mesh``: gate/up split by hidden units over "model" (column parallel), down by its input
    rows (row parallel); ``hidden_dim`` must be divisible by the "model" size.
    """

    def __init__(
        self, d_model: int, hidden_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs, mesh: Mesh | None = None
    ) -> None:
        if mesh is not None:
            check_model_mesh(mesh, mlp_dim=hidden_dim)
        self.gate = nnx.Linear(d_model, hidden_dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.up = nnx.Linear(d_model, hidden_dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(hidden_dim, d_model, use_bias=False, dtype=dtype, rngs=rngs)
        if mesh is not None:
            place(self.gate.kernel, mesh, P(None, MODEL))
            place(self.up.kernel, mesh, P(None, MODEL))
            place(self.down.kernel, mesh, P(MODEL, None))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class DecoderBlock(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``h + mlp(norm(h))``; [T, d_model] -> [T, d_model]."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        mlp_dim: int,
        *,
        kv_cache_dtype: str,
        rope_base: float,
        qk_norm: bool,
        softcap: float | None,
        norm_eps: float,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        mesh: Mesh | None = None,
    ) -> None:
        self.attn_norm = nnx.RMSNorm(d_model, epsilon=norm_eps, dtype=dtype, rngs=rngs)
        self.attn = TurboQuantAttention(
            d_model,
            num_heads,
            num_kv_heads,
            head_dim,
            kv_cache_dtype=kv_cache_dtype,
            rope_base=rope_base,
            qk_norm=qk_norm,
            softcap=softcap,
            norm_eps=norm_eps,
            dtype=dtype,
            rngs=rngs,
            mesh=mesh,
        )
        self.mlp_norm = nnx.RMSNorm(d_model, epsilon=norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = SwiGLU(d_model, mlp_dim, dtype=dtype, rngs=rngs, mesh=mesh)

    def train(self, x: jax.Array, query_start_loc: jax.Array) -> jax.Array:
        """No-cache forward over packed sequences (see :meth:`TurboQuantAttention.attend`)."""
        h = x + self.attn.attend(self.attn_norm(x), query_start_loc)
        return h + self.mlp(self.mlp_norm(h))

    def serve(
        self, x: jax.Array, kv_cache: KVCache, metadata: AttentionMetadata
    ) -> tuple[jax.Array, KVCache]:
        """Paged-cache forward of one serving step; returns the output and the updated cache."""
        a, kv_cache = self.attn(self.attn_norm(x), kv_cache, metadata)
        h = x + a
        return h + self.mlp(self.mlp_norm(h)), kv_cache


class TransformerLM(nnx.Module):
    """Decoder-only LM with TurboQuant-cached attention.

    Args:
        vocab_size: V.
        d_model: model width.
        num_layers: number of blocks.
        num_heads / num_kv_heads / head_dim: attention geometry (GQA; head_dim a multiple of 32).
        mlp_dim: SwiGLU hidden width.
        kv_cache_dtypes: one KV-cache dtype for every layer, or a list with one per layer: TurboQuant
            presets or native dtypes ("auto", "bfloat16", "float16"; see :class:`TurboQuantAttention`).
        rope_base, qk_norm, softcap: see :class:`TurboQuantAttention`.
        tie_embeddings: the head reuses the embedding matrix (``logits = h @ E^T``).
        norm_eps: RMSNorm epsilon.
        dtype: computation dtype (parameters stay float32; logits are float32).
        rngs: parameter initialisation.
        mesh: None (one device) or a ("data", "model") mesh with data size 1: tensor parallel over
            "model" (see the module docstring); ``num_kv_heads`` and ``mlp_dim`` must be divisible by
            its "model" size. ``allocate_caches`` then returns sharded caches.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        mlp_dim: int,
        *,
        kv_cache_dtypes: str | Sequence[str],
        rope_base: float = 10000.0,
        qk_norm: bool = False,
        softcap: float | None = None,
        tie_embeddings: bool = True,
        norm_eps: float = 1e-6,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
        mesh: Mesh | None = None,
    ) -> None:
        dtypes = [kv_cache_dtypes] * num_layers if isinstance(kv_cache_dtypes, str) else list(kv_cache_dtypes)
        if len(dtypes) != num_layers:
            raise ValueError(f"kv_cache_dtypes has {len(dtypes)} entries for {num_layers} layers")
        if mesh is not None:  # before building anything
            check_model_mesh(mesh, num_kv_heads=num_kv_heads, mlp_dim=mlp_dim)
        self.vocab_size = vocab_size
        self.embed = nnx.Embed(vocab_size, d_model, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List(
            DecoderBlock(
                d_model,
                num_heads,
                num_kv_heads,
                head_dim,
                mlp_dim,
                kv_cache_dtype=name,
                rope_base=rope_base,
                qk_norm=qk_norm,
                softcap=softcap,
                norm_eps=norm_eps,
                dtype=dtype,
                rngs=rngs,
                mesh=mesh,
            )
            for name in dtypes
        )
        self.final_norm = nnx.RMSNorm(d_model, epsilon=norm_eps, dtype=dtype, rngs=rngs)
        self.head = None if tie_embeddings else nnx.Linear(d_model, vocab_size, use_bias=False, dtype=dtype, rngs=rngs)
        if mesh is not None:  # replicate whatever the blocks did not shard
            for _, node in nnx.iter_graph(self):
                if isinstance(node, nnx.Param) and not isinstance(node.get_value().sharding, NamedSharding):
                    place(node, mesh, P())

    @property
    def kv_cache_dtypes(self) -> list[str]:
        """The per-layer KV-cache dtypes."""
        return [block.attn.kv_cache_dtype for block in self.blocks]

    def allocate_caches(self, num_blocks: int, block_size: int) -> list[KVCache]:
        """One zeroed paged cache per layer (of the layer's kind: TurboQuant or native), each
        ``num_blocks`` x ``block_size`` slots per KV head."""
        return [block.attn.allocate_cache(num_blocks, block_size) for block in self.blocks]

    def _logits(self, h: jax.Array) -> jax.Array:
        h = self.final_norm(h)
        logits = self.embed.attend(h) if self.head is None else self.head(h)
        return logits.astype(jnp.float32)

    def _check_tokens(self, tokens: jax.Array) -> None:
        if tokens.ndim != 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array of shape [T], got {tokens.dtype}{list(tokens.shape)}")

    def train_logits(self, tokens: jax.Array, query_start_loc: jax.Array) -> jax.Array:
        """tokens [T] int32 (packed sequences), query_start_loc [S + 1] int32 -> logits float32 [T, V].

        No cache; every sequence attends causally to itself only. Differentiable.
        """
        self._check_tokens(tokens)
        h = self.embed(tokens)
        for block in self.blocks:
            h = block.train(h, query_start_loc)
        return self._logits(h)

    def serve_step(
        self, tokens: jax.Array, kv_caches: Sequence[KVCache], metadata: AttentionMetadata
    ) -> tuple[jax.Array, list[KVCache]]:
        """One serving step: tokens [T] int32 -> (logits float32 [T, V], updated per-layer caches).

        ``kv_caches`` (one per layer) are donated: use only the returned list afterwards.
        """
        self._check_tokens(tokens)
        if len(kv_caches) != len(self.blocks):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(self.blocks)} layers")
        h = self.embed(tokens)
        new_caches = []
        for block, cache in zip(self.blocks, kv_caches):
            h, cache = block.serve(h, cache, metadata)
            new_caches.append(cache)
        return self._logits(h), new_caches
