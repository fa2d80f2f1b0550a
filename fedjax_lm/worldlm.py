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

In the tree's round (fedjax_lm/simulation.py; `federation.tree`, fedjax_lm/tree.py):

* a silo trains the backbone it received with its federation's key layers k_p and uploads Δ = θ_sent − θ
  whole: its key-layer delta goes to its own federation, which is where key layers are aggregated;
* a federation aggregates its children's backbone deltas by the token-weighted mean and its outer step,
  and its key layers by `aggregate_keys` (k_c = k_sent − Δ_c^K, then the attention mean above), in the
  same round;
* a federation's upload to its parent is its backbone pseudo-gradient. Of its key layers: with
  `residual=False`, nothing (the delta of those leaves is exactly zero and the ledger does not count
  them: the key layers never leave the federation); with `residual=True`, the residual -r = k_ref − k_p
  from the reference k_ref its parent sent (the parent's own key layers). The parent could rebuild k_p
  from it and k_ref: residual sharing trades that away for the siblings' information;
* the parent then sends each sub-federation, with the backbone, e_c (the embedding above), and the
  child's next key layers are its own plus gamma e_c (= k_p + r_c + gamma e_c);
* with `key_owner="silo"` (FedPer) a silo keeps its own key layers and uploads none of them.

A silo is evaluated with the root's backbone and its federation's key layers (FedPer: its own).

Under client-level DP (`federation.dp`, central mode; fedjax_lm/privacy.py has the mechanism) the unit is
the silo, in a tree as in a flat federation. The federations whose children are silos clip and noise their
silos' updates; a federation of federations aggregates what is already private (post-processing), by
tokens. A federation's key layers are released to its members, so they are a query too:

* without attention, the key layers are the key leaves of the federation's noised fixed-denominator mean
  (after its outer step), nothing more: no extra query;
* with attention (`private_key_deltas`): a silo's key deltas are those of its clipped update,
  x_c = s_c Δ_c^K with s_c = min(1, C / ||Δ_c||), each leaf then clipped to C_l = C sqrt(n_l / n)
  (n_l its size, n the key layers' size; sum_l C_l^2 = C^2). The attention mean of leaf l,
  M^l = sum_c a_c^l x_c^l, is a convex combination, so it lies in the ball of radius C_l whatever the
  weights; one silo's data changes it by at most 2 C_l, and M by at most 2C. The federation publishes
  k_p - eta (M + N(0, (2 z C)^2 I)). With the mean's query (sensitivity C, noise z C on the sum) the round
  is one Gaussian mechanism of multiplier (1/z^2 + 1/z^2)^(-1/2): both are drawn with z = sigma sqrt(2)
  (`dp_round.RoundDP(queries=2)`), so the accountant counts sigma as in a flat federation.
  The weights a are data-dependent and enter only through M (inside the bound); the aggregator logs them
  (it is trusted with the updates in central mode, as with their norms).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lm import outer
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


def private_key_deltas(deltas: Layers, scale: float, clip_norm: float) -> Layers:
    """A silo's key deltas as the DP key query uses them: x^l = clip(s Δ^l, C_l), s = its update's clip
    factor min(1, C / ||Δ||), C_l = C sqrt(n_l / n) (the module docstring shows why M stays in C's ball)."""
    total = sum(int(x.size) for x in deltas.values())
    out = {}
    for name, d in deltas.items():
        x = d.astype(jnp.float32) * jnp.float32(scale)
        bound = float(clip_norm) * (int(d.size) / total) ** 0.5
        n = _norm(x)
        out[name] = (x * jnp.minimum(1.0, bound / jnp.maximum(n, 1e-30))).astype(d.dtype)
    return out


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


def embeddings_of(parent: Layers, children: Mapping[str, Layers], temperature: float) -> dict[str, Layers]:
    """{sub-federation: e_c} from the parent's key layers after its step and its sub-federations' k_c (in
    sorted name order): what the simulation computes at the parent and what a deployed sub-federation
    computes from the `children_keys` its parent publishes with the next global (the same arithmetic)."""
    names = sorted(children)
    kids = [children[n] for n in names]
    return dict(zip(names, residual_embeddings(kids, residuals(parent, kids), temperature)))


def children_key_layers(
    parent: Layers, res: Sequence[Layers], emb: Sequence[Layers], gamma: float
) -> list[Layers]:
    """What each child receives: k_p + r_c + gamma e_c."""
    return [{name: kp + r[name] + gamma * e[name] for name, kp in parent.items()} for r, e in zip(res, emb)]


# ---------------------------------------------------------------------- in the tree's round (simulation.py)


def key_names(tree: Any, mask: Any) -> list[str]:
    """The key leaves' paths, in tree order (the order of a list of key layers, e.g. in a checkpoint)."""
    return [name for name, m in zip(leaf_paths(tree), jax.tree.leaves(mask)) if m]


def key_deltas(payload: Any, mask: Any, like: Any) -> Layers:
    """The key leaves of a decoded upload Δ = k_sent − k_child, by path (only those leaves are decoded)."""
    treedef = jax.tree.structure(like)
    names = leaf_paths(like)
    out = {}
    for name, m, p, x in zip(
        names, treedef.flatten_up_to(mask), treedef.flatten_up_to(payload), jax.tree.leaves(like)
    ):
        if m:
            out[name] = outer.decode_payload_leaf(p, x.shape).astype(x.dtype)
    return out


def aggregate_keys(
    sent: Layers,
    deltas: Sequence[Layers],
    weights: Sequence[float],
    *,
    attention: bool,
    temperature: float,
    step: float,
) -> tuple[Layers, list[Layers], dict[str, jax.Array]]:
    """A federation's key layers after its round, from the key deltas its children sent.

    Each child's key layers are k_c = k_sent − Δ_c. With `attention`, k_p = `attention_aggregate`
    (a^l softmax over -d/T); without, the token-weighted mean (a_c = w_c / sum w). Returns (k_p, the
    children's k_c, a per key leaf [K])."""
    children = [{n: sent[n] - d[n] for n in sent} for d in deltas]
    if attention:
        new, a = attention_aggregate(sent, children, temperature, step)
        return new, children, a
    w = jnp.asarray(weights, jnp.float32) / float(sum(weights))
    new = {
        n: (kp + step * sum(w[i] * (c[n] - kp) for i, c in enumerate(children))).astype(kp.dtype)
        for n, kp in sent.items()
    }
    return new, children, {n: w for n in sent}


def mean_weights(a: Mapping[str, jax.Array], names: Sequence[str]) -> dict[str, float]:
    """Each child's attention weight averaged over the key leaves (what the round row logs)."""
    stacked = jnp.mean(jnp.stack([a[n] for n in a]), axis=0)
    return {c: float(stacked[i]) for i, c in enumerate(names)}
