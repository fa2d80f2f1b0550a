"""How a round's accepted pseudo-gradients relate: their Gram matrix, cosines and norm ratio.

Read-only on the payloads (the aggregate is made before): the simulation logs these in every
round's metrics row (`Federation.update_diagnostics`), so sweeps can explain what they show.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lm import outer


@functools.partial(jax.jit, static_argnums=1)
def _gram_leaf(payload_leaves: tuple[Any, ...], shape: tuple[int, ...]) -> jax.Array:
    x_KxN = jnp.stack([outer.decode_payload_leaf(p, shape).reshape(-1) for p in payload_leaves])
    return jnp.einsum("kn,jn->kj", x_KxN, x_KxN, precision=jax.lax.Precision.HIGHEST)


def payload_gram(payloads: Sequence[Any], like: Any) -> np.ndarray:
    """G[i, j] = <Δ_i, Δ_j> of K uploads, decoded as the aggregation decodes them (f64, [K, K]).

    One jitted kernel per param leaf (its K decoded copies as [K, n], times their transpose);
    the leaves' Grams are summed in f64 on the host. Memory: K decoded f32 copies of one leaf.
    The payloads are only read: the aggregation's inputs and results are untouched.
    """
    grams = jax.tree.map(lambda leaf, *pls: _gram_leaf(pls, tuple(leaf.shape)), like, *payloads)
    return np.sum([np.asarray(g, np.float64) for g in jax.device_get(jax.tree.leaves(grams))], axis=0)


def update_geometry(gram: np.ndarray, names: Sequence[str], weights: Sequence[float]) -> dict[str, float]:
    """How the round's accepted pseudo-gradients relate, from their Gram matrix and weights w_k.

    - `update_cos_to_mean/<silo>`: cosine between the silo's Δ_k and the weighted mean Δ;
    - `update_cos_mean` / `_min` / `_max`: the cosine similarity over the pairs of silos (>= 2 silos);
    - `update_norm_of_mean` ‖Σ w_k Δ_k‖ / Σ w_k (the mean the "mean" rule aggregates) and
      `update_mean_of_norms` Σ w_k ‖Δ_k‖ / Σ w_k; `update_norm_ratio` is the first over the second:
      1 when the silos agree, about 1/√K for K orthogonal updates of equal norm, 0 when they cancel.
    """
    g = np.asarray(gram, np.float64)
    w = np.asarray(weights, np.float64)
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    total = w.sum()
    if not total > 0:
        return {}
    norm_of_mean = float(np.sqrt(max(w @ g @ w, 0.0)) / total)
    mean_of_norms = float(w @ norms / total)
    out: dict[str, float] = {
        "update_norm_of_mean": norm_of_mean,
        "update_mean_of_norms": mean_of_norms,
        "update_norm_ratio": norm_of_mean / mean_of_norms if mean_of_norms > 0 else float("nan"),
    }
    with np.errstate(divide="ignore", invalid="ignore"):
        to_mean = (g @ w / total) / (norms * norm_of_mean)
        cos = g / np.outer(norms, norms)
    for name, c in zip(names, to_mean):
        out[f"update_cos_to_mean/{name}"] = float(c)
    if len(names) >= 2:
        pairs = cos[np.triu_indices(len(names), k=1)]
        out.update(
            update_cos_mean=float(np.mean(pairs)),
            update_cos_min=float(np.min(pairs)),
            update_cos_max=float(np.max(pairs)),
        )
    return out
