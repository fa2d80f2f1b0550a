"""Sampling text from a trained decoder: greedy, temperature and top-k, one compiled loop.

`generate_text` turns a prompt string into its continuation; `generate_ids` does the same
on token ids; both run `decode`, a pure jitted function whose `lax.while_loop` holds the
whole generation. Used by

  python -m fedjax_lm generate --config ... --workdir ... --prompt "..."

No KV cache: every step recomputes the full forward over a fixed [1, T] buffer, with
T = prompt + max_new_tokens rounded up to a multiple of BUCKET (capped at max_seq_len), so
one program is compiled per bucket (temperature, top_k, lengths and EOS are traced values).
That costs O(T^2) attention per step, O(n T^2) for n new tokens: fine for the small models
this is tested with, not meant for long outputs of big ones. Filler tokens after the
current position do not change its logits: attention is causal, RoPE uses absolute
positions, and norms and MLPs act per position (tests compare with unpadded forwards).

Prompts start with EOS, not BOS: the token files are documents back to back, each followed
by EOS (`fedjax_lm.data.build`), and BOS never occurs in them, so its embedding is
untrained while EOS is exactly what the model has seen before a document starts.
Generation stops at the first EOS; the positions after it hold EOS.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lm import model as model_lib
from fedjax_lm import sharding as sharding_lib

BUCKET = 64  # buffer lengths are multiples of this (or max_seq_len): few recompiles


def bucket_length(needed: int, max_seq_len: int, bucket: int = BUCKET) -> int:
    """The buffer length for `needed` tokens: the next multiple of `bucket`, at most max_seq_len."""
    return min(-(-needed // bucket) * bucket, max_seq_len)


def _pick(logits_V: jax.Array, temperature: jax.Array, top_k: jax.Array, key: jax.Array) -> jax.Array:
    """Argmax when temperature == 0, else a sample from softmax(logits / temperature) over
    the top_k largest logits (all of them when top_k == 0; ties with the k-th are kept)."""
    V = logits_V.shape[0]
    kth = jnp.sort(logits_V)[V - jnp.clip(top_k, 1, V)]
    logits_V = jnp.where((top_k > 0) & (logits_V < kth), -jnp.inf, logits_V)
    sampled = jax.random.categorical(key, logits_V / jnp.where(temperature > 0, temperature, 1.0))
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits_V)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model_config", "rules"))
def decode(
    params: Any,
    buffer_1xT: jax.Array,
    prompt_len: jax.Array,
    stop: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    rng: jax.Array,
    eos_id: jax.Array,
    *,
    model_config: model_lib.ModelConfig,
    rules: tuple[tuple[str, Any], ...] | None = None,
) -> jax.Array:
    """Fills buffer_1xT[0, prompt_len:stop] one token at a time; returns the buffer.

    Step i reads the logits at position i - 1 of a forward over the whole buffer and
    writes token i; the sampling key of step i is fold_in(rng, i). The loop ends at `stop`
    or after writing eos_id (eos_id < 0: never), leaving the rest of the buffer as given.
    """
    model = model_lib.Decoder(model_config)

    def body(carry):
        i, buf_1xT, _ = carry
        with nn.logical_axis_rules(rules or ()):
            logits_1xTxV = model.apply({"params": params}, buf_1xT)
        logits_V = jax.lax.dynamic_index_in_dim(logits_1xTxV[0], i - 1, keepdims=False)
        token = _pick(logits_V, temperature, top_k, jax.random.fold_in(rng, i))
        return i + 1, buf_1xT.at[0, i].set(token), (eos_id >= 0) & (token == eos_id)

    carry = (jnp.asarray(prompt_len, jnp.int32), buffer_1xT, jnp.asarray(False))
    return jax.lax.while_loop(lambda c: (c[0] < stop) & ~c[2], body, carry)[1]


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high} (the vocabulary size), got {value!r}")
    return int(value)


def generate_ids(
    model_config: model_lib.ModelConfig,
    params: Any,
    prompt_ids: Any,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    rng: jax.Array | None = None,
    eos_id: int | None = None,
    rules: Any = None,
    mesh: jax.sharding.Mesh | None = None,
) -> np.ndarray:
    """The max_new_tokens ids that follow prompt_ids (int32 numpy array).

    temperature 0 is greedy (argmax, rng unused; rng defaults to key(0)); top_k 0 keeps the whole vocabulary. With
    eos_id, generation stops after the first EOS and every later position holds eos_id.
    prompt + max_new_tokens must fit in max_seq_len (ValueError otherwise: no silent
    clamping). With rules / mesh the model runs under those logical-axis rules and that
    mesh, as `Silo` runs it (pass its `rules` and `mesh`; params may be sharded on it).
    """
    c = model_config
    prompt = np.asarray(prompt_ids)
    if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt_ids must be a non-empty 1-D sequence of ints, got shape {prompt.shape}")
    if prompt.min() < 0 or prompt.max() >= c.vocab_size:
        raise ValueError(f"prompt_ids must be in [0, {c.vocab_size}), got [{prompt.min()}, {prompt.max()}]")
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    top_k = _check_int("top_k", top_k, 0, c.vocab_size)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite, got {temperature!r}")
    if eos_id is not None:
        eos_id = _check_int("eos_id", eos_id, 0, c.vocab_size - 1)
    P, n = prompt.size, max_new_tokens
    if P + n > c.max_seq_len:
        raise ValueError(
            f"prompt ({P} tokens) + max_new_tokens ({n}) = {P + n} exceeds the model's max_seq_len "
            f"({c.max_seq_len}); shorten the prompt or lower max_new_tokens to at most {c.max_seq_len - P}"
        )
    buf = np.full((1, bucket_length(P + n, c.max_seq_len)), 0 if eos_id is None else eos_id, np.int32)
    buf[0, :P] = prompt
    args = (
        jnp.asarray(buf),
        np.int32(P),
        np.int32(P + n),
        np.float32(temperature),
        np.int32(top_k),
        jax.random.key(0) if rng is None else rng,
        np.int32(-1 if eos_id is None else eos_id),
    )
    rules = None if rules is None else sharding_lib.normalize_rules(rules)  # hashable: a static arg
    if mesh is None:
        out = decode(params, *args, model_config=c, rules=rules)
    else:
        with jax.set_mesh(mesh):
            out = decode(params, *args, model_config=c, rules=rules)
    return np.asarray(jax.device_get(out))[0, P : P + n]


def generate_text(
    model_config: model_lib.ModelConfig,
    params: Any,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
    rules: Any = None,
    mesh: jax.sharding.Mesh | None = None,
) -> str:
    """The continuation of `prompt` (the new text only, without the prompt and the EOS).

    The model sees [EOS] + tokenizer.encode(prompt): the start of a document, as in training.
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty str, got {prompt!r}")
    _check_int("seed", seed, 0)
    eos = tokenizer.eos_id
    new = generate_ids(
        model_config,
        params,
        [eos, *tokenizer.encode(prompt)],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        rng=jax.random.key(seed),
        eos_id=eos,
        rules=rules,
        mesh=mesh,
    )
    ends = np.flatnonzero(new == eos)
    return tokenizer.decode(new[: ends[0]] if ends.size else new)
