"""Decoder-only language model (Llama-style), pure-functional Flax Linen.

Block: pre-norm RMSNorm -> grouped-query causal attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual. No biases. Final RMSNorm and an LM head (or the
transposed embedding when `tie_embeddings`).

Conventions that make the weights map 1:1 onto Hugging Face `LlamaForCausalLM`
(see `fedjax_lm.export`): RoPE rotates the first half of each head against the
second half ("rotate_half"), not interleaved pairs; RMSNorm normalises in float32
and multiplies the scale after casting back to the compute dtype.

Every parameter carries logical axis names (`nn.with_logical_partitioning`), so
`nn.logical_axis_rules` + `nn.get_partition_spec` give its sharding; with
`scan_layers` the blocks are stacked under `params['layers']` with a leading
'layers' axis, otherwise they live under `params['layers_0']`, `params['layers_1']`...

Shape suffixes: B batch, L length, D d_model, H query heads, G key/value heads,
K head_dim, F d_ff, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

_DTYPES = ("float32", "bfloat16", "float16")
# What the backward pass keeps of each block's forward ("none": whatever autodiff keeps).
# "minimal": only the outputs of weight matmuls (projections, MLP); norms, RoPE, SwiGLU
# and the attention core are recomputed. "full": only the block input. Temp memory of a
# small-preset train step (batch 8x256, rolled scan): none 1025 MB, minimal 444 MB, full
# 256 MB; "minimal" was also a few % faster there. Unrolled or unscanned, XLA:CPU keeps
# most activations live anyway (~930 MB whatever the policy).
_REMAT_POLICIES = {"minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable, "full": None}
_REMAT = ("none", *_REMAT_POLICIES)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a `Decoder`. `head_dim=None` resolves to d_model // n_heads.

    Registered as a static pytree (no leaves), so it passes through `jax.jit` and
    `jax.eval_shape` as an ordinary argument: `jax.eval_shape(init_params, config, rng)`.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq_len: int = 2048
    head_dim: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: str = "float32"  # compute dtype ("bfloat16" on accelerators)
    param_dtype: str = "float32"  # storage dtype
    scan_layers: bool = True  # nn.scan over blocks: params stacked on a leading 'layers' axis
    # Unroll factor of that scan; a pure speed knob, the params are the same. n_layers
    # gives straight-line code: on CPU ~5% faster per train step (the loop copies every
    # layer's saved activations into stacked buffers) but compiles slower.
    scan_unroll: int = 1
    remat: str = "none"  # "none" | "minimal" | "full": see _REMAT_POLICIES

    def __post_init__(self):
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "d_ff",
            "max_seq_len",
            "scan_unroll",
        ):
            object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"ModelConfig: d_model ({self.d_model}) is not divisible by "
                    f"n_heads ({self.n_heads}); set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        object.__setattr__(self, "head_dim", _positive_int("head_dim", self.head_dim))
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head_dim ({self.head_dim}) must be even for RoPE")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
                raise ValueError(f"ModelConfig: {name} must be a positive number, got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("tie_embeddings", "scan_layers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig: {name} must be a bool, got {getattr(self, name)!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"ModelConfig: {name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
        if self.remat not in _REMAT:
            raise ValueError(f"ModelConfig: remat must be one of {_REMAT}, got {self.remat!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from a dict or `ml_collections.ConfigDict`; unknown keys fail."""
        if hasattr(d, "to_dict"):
            d = d.to_dict()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        missing = sorted(
            f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in d
        )
        if missing:
            raise ValueError(f"ModelConfig: missing required key(s) {missing}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive_int(name: str, value: Any) -> int:
    """value as a plain int (numpy ints from configs are fine); bools, floats, <= 0 fail."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"ModelConfig: {name} must be a positive int, got {value!r}")
    return int(value)


def _init(stddev: float, names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32 (as Hugging Face Llama does)."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        scale_D = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x_BxLxD.shape[-1],),
            self.param_dtype,
        )
        x_BxLxD = x_BxLxD.astype(jnp.float32)
        y_BxLxD = x_BxLxD * jax.lax.rsqrt(jnp.mean(x_BxLxD * x_BxLxD, -1, keepdims=True) + self.eps)
        return y_BxLxD.astype(self.dtype) * scale_D.astype(self.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of position * inv_freq, each L x K/2 (float32)."""
    inv_freq_K2 = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angle_LxK2 = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq_K2[None, :]
    return jnp.cos(angle_LxK2), jnp.sin(angle_LxK2)


def apply_rope(x_BxLxNxK: jax.Array, cos_LxK2: jax.Array, sin_LxK2: jax.Array) -> jax.Array:
    """HF "rotate_half" RoPE: pairs element i with element i + K/2 of each head."""
    half = x_BxLxNxK.shape[-1] // 2
    x1, x2 = x_BxLxNxK[..., :half], x_BxLxNxK[..., half:]
    cos = cos_LxK2[:, None, :].astype(x_BxLxNxK.dtype)
    sin = sin_LxK2[:, None, :].astype(x_BxLxNxK.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# The logit a masked position gets: jax.nn.dot_product_attention's, so outputs match it exactly.
_MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


def _query_blocks(L: int, n_blocks: int) -> list[tuple[int, int]]:
    """[start, end) of each query block: n_blocks halved until blocks divide L and hold >= 16 rows."""
    while n_blocks > 1 and (L % n_blocks or L // n_blocks < 16):
        n_blocks //= 2  # tiny blocks: per-op overhead outweighs the saving
    size = L // n_blocks
    return [(start, start + size) for start in range(0, L, size)]


def _block_logits(q_BxGxRxTxK: jax.Array, k_BxGxSxK: jax.Array, start: int) -> jax.Array:
    """Scaled, causally masked f32 logits of query rows start.. against keys [0, start + T)."""
    T, K = q_BxGxRxTxK.shape[3], q_BxGxRxTxK.shape[-1]
    end = start + T
    s_BxGxRxTxS = jnp.einsum(
        "bgrtk,bgsk->bgrts", q_BxGxRxTxK, k_BxGxSxK[:, :, :end], preferred_element_type=jnp.float32
    )
    s_BxGxRxTxS = s_BxGxRxTxS * jnp.float32(1 / math.sqrt(K))
    mask_TxS = (start + jnp.arange(T))[:, None] >= jnp.arange(end)[None, :]
    return jnp.where(mask_TxS, s_BxGxRxTxS, _MASKED_LOGIT)


def _heads_major(x_BxLxHxK: jax.Array, G: int) -> jax.Array:
    """B x L x H x K -> B x G x R x L x K (query head h = g * R + r reads kv head g)."""
    B, L, H, K = x_BxLxHxK.shape
    return x_BxLxHxK.reshape(B, L, G, H // G, K).transpose(0, 2, 3, 1, 4)


def _length_major(x_BxGxRxLxK: jax.Array) -> jax.Array:
    B, G, R, L, K = x_BxGxRxLxK.shape
    return x_BxGxRxLxK.transpose(0, 3, 1, 2, 4).reshape(B, L, G * R, K)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def causal_attention(
    q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array, n_blocks: int = 8
) -> jax.Array:
    """Causal GQA attention, `jax.nn.dot_product_attention(q, k, v, is_causal=True)` computed per query block.

    Query block i only attends keys [0, end of block i): the blocks above the diagonal, which
    the causal mask would zero, are never computed ((n + 1) / 2n of the full square: 56% for
    8 blocks). The forward pass is the library's arithmetic (f32 logits, scale after the dot,
    exp(s - max) / sum); the backward pass is flash-attention's: it keeps only q, k, v, the
    output and the per-row log-sum-exp and recomputes the probabilities, instead of autodiff
    saving every block's probabilities (under the layer scan, stacked buffers of
    n_layers x B x H x L x L that were written, zero-filled and copied every step: 40% of a
    tiny-preset step at L=1024). q, k and v are transposed to heads-major once, not per block
    (each block's einsum would copy its slices). Same values up to float rounding
    (tests/test_model.py).
    """
    return _attention_fwd(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, n_blocks)[0]


def _attention_fwd(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, n_blocks):
    G = k_BxLxGxK.shape[2]
    q_BxGxRxLxK = _heads_major(q_BxLxHxK, G)
    k_BxGxLxK, v_BxGxLxK = k_BxLxGxK.transpose(0, 2, 1, 3), v_BxLxGxK.transpose(0, 2, 1, 3)
    o_blocks, lse_blocks = [], []
    for start, end in _query_blocks(q_BxLxHxK.shape[1], n_blocks):
        s_BxGxRxTxS = _block_logits(q_BxGxRxLxK[:, :, :, start:end], k_BxGxLxK, start)
        max_BxGxRxTx1 = s_BxGxRxTxS.max(-1, keepdims=True)
        e_BxGxRxTxS = jnp.exp(s_BxGxRxTxS - max_BxGxRxTx1)
        sum_BxGxRxTx1 = e_BxGxRxTxS.sum(-1, keepdims=True)
        p_BxGxRxTxS = (e_BxGxRxTxS / sum_BxGxRxTx1).astype(v_BxLxGxK.dtype)
        o_blocks.append(jnp.einsum("bgrts,bgsk->bgrtk", p_BxGxRxTxS, v_BxGxLxK[:, :, :end]))
        lse_blocks.append((max_BxGxRxTx1 + jnp.log(sum_BxGxRxTx1))[..., 0])
    o_BxGxRxLxK = jnp.concatenate(o_blocks, axis=3)
    residuals = (q_BxGxRxLxK, k_BxGxLxK, v_BxGxLxK, o_BxGxRxLxK, lse_blocks)
    return _length_major(o_BxGxRxLxK), residuals


def _attention_bwd(n_blocks, residuals, do_BxLxHxK):
    q_BxGxRxLxK, k_BxGxLxK, v_BxGxLxK, o_BxGxRxLxK, lse_blocks = residuals
    K = q_BxGxRxLxK.shape[-1]
    do_BxGxRxLxK = _heads_major(do_BxLxHxK, k_BxGxLxK.shape[1])
    # sum_s p * dp = do . o per query row (the softmax backward's row term, without a pass over p).
    d_BxGxRxL = jnp.einsum(
        "bgrtk,bgrtk->bgrt", do_BxGxRxLxK.astype(jnp.float32), o_BxGxRxLxK.astype(jnp.float32)
    )
    dq_blocks = []
    dk_BxGxLxK = jnp.zeros(k_BxGxLxK.shape, jnp.float32)
    dv_BxGxLxK = jnp.zeros(v_BxGxLxK.shape, jnp.float32)
    f32 = dict(preferred_element_type=jnp.float32)
    for (start, end), lse_BxGxRxT in zip(_query_blocks(q_BxGxRxLxK.shape[3], n_blocks), lse_blocks):
        q_blk, do_blk = q_BxGxRxLxK[:, :, :, start:end], do_BxGxRxLxK[:, :, :, start:end]
        p_BxGxRxTxS = jnp.exp(_block_logits(q_blk, k_BxGxLxK, start) - lse_BxGxRxT[..., None])
        dv_BxGxLxK = dv_BxGxLxK.at[:, :, :end].add(
            jnp.einsum("bgrts,bgrtk->bgsk", p_BxGxRxTxS.astype(v_BxGxLxK.dtype), do_blk, **f32)
        )
        dp_BxGxRxTxS = jnp.einsum("bgrtk,bgsk->bgrts", do_blk, v_BxGxLxK[:, :, :end], **f32)
        ds_BxGxRxTxS = p_BxGxRxTxS * (dp_BxGxRxTxS - d_BxGxRxL[..., start:end, None])
        ds_BxGxRxTxS = (ds_BxGxRxTxS * jnp.float32(1 / math.sqrt(K))).astype(q_BxGxRxLxK.dtype)
        dq_blocks.append(jnp.einsum("bgrts,bgsk->bgrtk", ds_BxGxRxTxS, k_BxGxLxK[:, :, :end], **f32))
        dk_BxGxLxK = dk_BxGxLxK.at[:, :, :end].add(
            jnp.einsum("bgrts,bgrtk->bgsk", ds_BxGxRxTxS, q_blk, **f32)
        )
    dq_BxLxHxK = _length_major(jnp.concatenate(dq_blocks, axis=3))
    return (
        dq_BxLxHxK.astype(q_BxGxRxLxK.dtype),
        dk_BxGxLxK.transpose(0, 2, 1, 3).astype(k_BxGxLxK.dtype),
        dv_BxGxLxK.transpose(0, 2, 1, 3).astype(v_BxGxLxK.dtype),
    )


causal_attention.defvjp(_attention_fwd, _attention_bwd)


class Dense(nn.Module):
    """Rows x_NxI (I = in_shape, tokens already flattened to N) -> N x out_shape.

    Kept 2-D on purpose (CPU performance, measured on a train step): with a
    batch x length operand XLA transposes the cotangent before every weight-gradient
    matmul; and contracting the kernel in its stored shape (no reshape of the weight)
    means the scanned backward pass saves no per-layer copy of it.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    names: tuple[str, ...]  # logical axis names of the kernel (in_shape + out_shape)
    stddev: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x_NxI: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", _init(self.stddev, self.names), self.in_shape + self.out_shape, self.param_dtype
        )
        n_in = len(self.in_shape)
        contract = (tuple(range(1, 1 + n_in)), tuple(range(n_in)))
        return jax.lax.dot_general(x_NxI.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, cos_LxK2: jax.Array, sin_LxK2: jax.Array) -> jax.Array:
        c = self.config
        B, L, D = x_BxLxD.shape
        H, G, K = c.n_heads, c.n_kv_heads, c.head_dim
        dense = functools.partial(Dense, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        std, out_std = 0.02, 0.02 / math.sqrt(2 * c.n_layers)
        x_NxD = x_BxLxD.reshape(B * L, D)  # one flattened copy shared by q, k and v
        q_NxHxK = dense((D,), (H, K), ("embed", "heads", "head_dim"), std, name="q")(x_NxD)
        k_NxGxK = dense((D,), (G, K), ("embed", "kv_heads", "head_dim"), std, name="k")(x_NxD)
        v_NxGxK = dense((D,), (G, K), ("embed", "kv_heads", "head_dim"), std, name="v")(x_NxD)
        q_BxLxHxK = apply_rope(q_NxHxK.reshape(B, L, H, K), cos_LxK2, sin_LxK2)
        k_BxLxGxK = apply_rope(k_NxGxK.reshape(B, L, G, K), cos_LxK2, sin_LxK2)
        v_BxLxGxK = v_NxGxK.reshape(B, L, G, K)
        q_BxLxHxK = nn.with_logical_constraint(q_BxLxHxK, ("batch", "length", "heads", "head_dim"))
        o_BxLxHxK = causal_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK)
        o_BxLxHxK = nn.with_logical_constraint(o_BxLxHxK, ("batch", "length", "heads", "head_dim"))
        y_NxD = dense((H, K), (D,), ("heads", "head_dim", "embed"), out_std, name="out")(
            o_BxLxHxK.reshape(B * L, H, K)
        )
        return y_NxD.reshape(B, L, D)


class Mlp(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        c = self.config
        B, L, D = x_BxLxD.shape
        F = c.d_ff
        dense = functools.partial(Dense, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        std, out_std = 0.02, 0.02 / math.sqrt(2 * c.n_layers)
        x_NxD = x_BxLxD.reshape(B * L, D)
        gate_NxF = dense((D,), (F,), ("embed", "mlp"), std, name="gate")(x_NxD)
        up_NxF = dense((D,), (F,), ("embed", "mlp"), std, name="up")(x_NxD)
        h_BxLxF = nn.with_logical_constraint(
            (nn.silu(gate_NxF) * up_NxF).reshape(B, L, F), ("batch", "length", "mlp")
        )
        y_NxD = dense((F,), (D,), ("mlp", "embed"), out_std, name="down")(h_BxLxF.reshape(B * L, F))
        return y_NxD.reshape(B, L, D)


class Block(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, cos_LxK2: jax.Array, sin_LxK2: jax.Array):
        c = self.config
        norm = functools.partial(
            RMSNorm, eps=c.norm_eps, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype)
        )
        x_BxLxD = x_BxLxD + Attention(c, name="attn")(norm(name="attn_norm")(x_BxLxD), cos_LxK2, sin_LxK2)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
        x_BxLxD = x_BxLxD + Mlp(c, name="mlp")(norm(name="mlp_norm")(x_BxLxD))
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
        return x_BxLxD, None  # (carry, per-layer output) as nn.scan expects


class Decoder(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        embed = nn.Embed(
            c.vocab_size,
            c.d_model,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=_init(0.02, ("vocab", "embed")),
            name="embed",
        )
        x_BxLxD = nn.with_logical_constraint(embed(tokens_BxL), ("batch", "length", "embed"))
        cos_LxK2, sin_LxK2 = rope_tables(tokens_BxL.shape[1], c.head_dim, c.rope_theta)

        block = Block
        if c.remat != "none":
            # Only a rolled scan loop keeps XLA from CSE-ing the recomputation away.
            rolled = c.scan_layers and c.scan_unroll == 1
            block = nn.remat(Block, prevent_cse=not rolled, policy=_REMAT_POLICIES[c.remat])
        if c.scan_layers:
            layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=c.n_layers,
                unroll=min(c.scan_unroll, c.n_layers),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BxLxD, _ = layers(c, name="layers")(x_BxLxD, cos_LxK2, sin_LxK2)
        else:
            for i in range(c.n_layers):
                x_BxLxD, _ = block(c, name=f"layers_{i}")(x_BxLxD, cos_LxK2, sin_LxK2)

        x_BxLxD = RMSNorm(c.norm_eps, dtype, param_dtype, name="final_norm")(x_BxLxD)
        B, L, D = x_BxLxD.shape
        x_NxD = x_BxLxD.reshape(B * L, D)
        if c.tie_embeddings:  # x @ embedding.T, kept 2-D like Dense
            logits_NxV = jax.lax.dot_general(x_NxD, embed.embedding.astype(dtype), (((1,), (1,)), ((), ())))
        else:
            logits_NxV = Dense(
                (D,), (c.vocab_size,), ("embed", "vocab"), 0.02, dtype, param_dtype, name="lm_head"
            )(x_NxD)
        logits_BxLxV = logits_NxV.reshape(B, L, c.vocab_size)
        logits_BxLxV = nn.with_logical_constraint(logits_BxLxV, ("batch", "length", "vocab"))
        return logits_BxLxV.astype(jnp.float32)


def init_params(config: ModelConfig, rng: jax.Array) -> Any:
    """Boxed (nn.Partitioned) params of a `Decoder`; jit or eval_shape it as needed."""
    return Decoder(config).init(rng, jnp.zeros((1, 8), jnp.int32))["params"]


def param_count(config: ModelConfig) -> int:
    """Exact number of parameters, from shapes only (jax.eval_shape: nothing allocated)."""
    shapes = jax.eval_shape(lambda: nn.meta.unbox(init_params(config, jax.random.key(0))))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM-style accounting.

      6 * N_matmul + 6 * n_layers * seq_len * n_heads * head_dim

    N_matmul = n_layers * (d_model * head_dim * (2 * n_heads + 2 * n_kv_heads)
    + 3 * d_model * d_ff) + d_model * vocab_size: every weight used in a matmul, the LM
    head included (also when tied), the embedding lookup and norms excluded. The second
    term is causal attention: QK^T and AV cost 2 * 2 * seq_len * n_heads * head_dim
    per token forward over the full square, halved by the causal mask, times 3 for the
    backward pass (PaLM's 12 * L * H * Q * T without the mask).
    """
    c = config
    per_layer = c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.d_model * c.d_ff
    n_matmul = c.n_layers * per_layer + c.d_model * c.vocab_size
    return 6.0 * n_matmul + 6.0 * c.n_layers * seq_len * c.n_heads * c.head_dim
