"""WorldLM's parts (Iacob et al., 2024) as pure functions: key layers, attention aggregation, residual embeddings.

WorldLM publishes no code and no formulas; these are the definitions this project uses, the simplest
ones consistent with the paper's description (docs: README "Federations of federations").

Notation: a federation p (an inner node of the tree) with children c = 1..K (silos or sub-federations).
The params θ split by the key-layer mask into the backbone B(θ) and the key layers k = K(θ) (a dict
path -> array; one entry, k^l, per selected leaf).

Key layers (partial localisation), `key_mask`: the leaves whose path ("lm_head/kernel",
"layers_3/attn/q/kernel", ...) fully matches one of `federation.worldlm.key_layers`' regular
expressions. With `model.scan_layers` the blocks are one stacked leaf per weight, so "the last
blocks" need scan_layers=False; norms, the LM head and the embedding are single leaves either way.

Attention aggregation, `attention_weights` / `attention_aggregate` (the attentive aggregation of Ji et
al., 2019, per key leaf l):

    d_c^l  = ||k_p^l - k_c^l||_2 / (||k_p^l||_2 + 1e-12)          normalised distance          scalar
    a_c^l  = softmax_c(-d_c^l / T)                                 sum_c a_c^l = 1              [K]
    k_p^l <- k_p^l + eta * sum_c a_c^l (k_c^l - k_p^l)             eta = 1: sum_c a_c^l k_c^l    shape of k^l

The closest child weighs most; T -> infinity gives the plain mean, T -> 0 the closest child alone.

Residual layer embeddings, `residuals` / `residual_embeddings`: what a federation shares between its
children is not their key layers but each child's residual from the parent's (updated) key layers:

    r_c^l  = k_c^l - k_p^l                                          shape of k^l, one per child
    sum_c a_c^l r_c^l = 0  when eta = 1                             they cancel under the parent's weights
    e_c^l  = sum_{s != c} b_cs^l r_s^l,  b_cs^l = softmax_{s != c}(-||k_c^l - k_s^l||_2 / (||k_c^l||_2 T))
    k_c^l <- k_p^l + r_c^l + gamma * e_c^l                          the child's next key layers

Each child gets its own layers back (k_p + r_c = k_c) plus gamma times what its closest siblings
learned beyond the federation's mean. With one child e_c = 0 (nothing to share); with two, e_c is the
sibling's residual.

What travels: upward, a child's backbone pseudo-gradient (like any update) and its key layers to its
own federation only, never further up; downward, the backbone and, per child, k_p + r_c + gamma e_c.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lm.store import arrays as arrays_lib

Layers = dict[str, jax.Array]  # key layers: leaf path -> array


def leaf_paths(tree: Any) -> list[str]:
    return [arrays_lib.keypath_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def key_mask(tree: Any, patterns: Sequence[str]) -> Any:
    """A tree of bools shaped like `tree`: True at the key layers. A pattern that matches no leaf is an
    error naming it and the leaves there are (a typo would otherwise share every layer)."""
    compiled = [(p, re.compile(p)) for p in patterns]
    paths = leaf_paths(tree)
    for text, rx in compiled:
        if not any(rx.fullmatch(path) for path in paths):
            raise ValueError(
                f"key layer pattern {text!r} matches no parameter; the parameters are: {', '.join(paths)}"
            )
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return jax.tree_util.tree_unflatten(
        treedef, [any(rx.fullmatch(arrays_lib.keypath_str(p)) for _, rx in compiled) for p, _ in flat]
    )


def key_layers(tree: Any, mask: Any) -> Layers:
    """The key layers of `tree` under `mask`, by path."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    keep = jax.tree.leaves(mask)
    return {arrays_lib.keypath_str(p): x for (p, x), k in zip(flat, keep) if k}


def with_key_layers(tree: Any, layers: Mapping[str, jax.Array]) -> Any:
    """`tree` with the leaves named in `layers` replaced (shapes and dtypes must match)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for p, x in flat:
        name = arrays_lib.keypath_str(p)
        if name in layers:
            y = layers[name]
            if y.shape != x.shape or y.dtype != x.dtype:
                raise ValueError(
                    f"key layer {name}: {y.dtype}{list(y.shape)} replaces {x.dtype}{list(x.shape)}"
                )
            out.append(y)
        else:
            out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)


def _norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))


def attention_weights(parent: Layers, children: Sequence[Layers], temperature: float) -> dict[str, jax.Array]:
    """a^l [K] per key leaf: softmax over the children of -d(k_p, k_c) / T."""
    if not children:
        raise ValueError("attention_weights needs at least one child")
    if not temperature > 0:
        raise ValueError(f"the attention temperature must be > 0, got {temperature}")
    out = {}
    for name, kp in parent.items():
        scale = _norm(kp) + 1e-12
        d = jnp.stack([_norm(kp - c[name]) / scale for c in children])
        out[name] = jax.nn.softmax(-d / temperature)
    return out


def attention_aggregate(
    parent: Layers, children: Sequence[Layers], temperature: float, step: float = 1.0
) -> tuple[Layers, dict[str, jax.Array]]:
    """(k_p after k_p + eta sum_c a_c (k_c - k_p), the weights a)."""
    weights = attention_weights(parent, children, temperature)
    new = {}
    for name, kp in parent.items():
        a = weights[name]
        pull = sum(
            a[i] * (c[name].astype(jnp.float32) - kp.astype(jnp.float32)) for i, c in enumerate(children)
        )
        new[name] = (kp.astype(jnp.float32) + step * pull).astype(kp.dtype)
    return new, weights


def residuals(parent: Layers, children: Sequence[Layers]) -> list[Layers]:
    """r_c = k_c - k_p for every child (k_p: the parent's key layers after its aggregation)."""
    return [{name: c[name] - kp for name, kp in parent.items()} for c in children]


def residual_embeddings(
    children: Sequence[Layers], res: Sequence[Layers], temperature: float
) -> list[Layers]:
    """e_c = sum_{s != c} b_cs r_s, b_cs the softmax over the siblings of -||k_c - k_s|| / (||k_c|| T)."""
    k = len(children)
    out: list[Layers] = []
    for c in range(k):
        e = {}
        for name, kc in children[c].items():
            siblings = [s for s in range(k) if s != c]
            if not siblings:
                e[name] = jnp.zeros_like(kc)
                continue
            scale = _norm(kc) + 1e-12
            d = jnp.stack([_norm(kc - children[s][name]) / scale for s in siblings])
            b = jax.nn.softmax(-d / temperature)
            e[name] = sum(b[i] * res[s][name] for i, s in enumerate(siblings))
        out.append(e)
    return out


def children_key_layers(
    parent: Layers, res: Sequence[Layers], emb: Sequence[Layers], gamma: float
) -> list[Layers]:
    """What each child receives: k_p + r_c + gamma e_c."""
    return [{name: kp + r[name] + gamma * e[name] for name, kp in parent.items()} for r, e in zip(res, emb)]
