"""Key layers over the store (`federation.tree.key_layers`): what an aggregator of a tree does with them.

The simulation's `tree_round.Subtree.key_step` over validated updates in the store: a federation reads the
key leaves of each accepted update (re-hashed while read, like the mean), turns them into its key layers
(`worldlm.aggregate_keys`), and refuses an upload from a member that must keep its key layers (a
sub-federation without residuals, a FedPer silo) unless those leaves are exact zeros.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lm import federation as fed_lib
from fedjax_lm import outer
from fedjax_lm import store as store_lib
from fedjax_lm import worldlm


def deltas(
    store: Any, fed: fed_lib.Federation, r: int, silo: str, manifest: Mapping[str, Any]
) -> dict[str, Any]:
    """The decoded key leaves of a validated update, by path (read through the mean's checked path)."""
    like = fed.key_template(fed.silo.abstract_params)
    one = store_lib.aggregate.stream_aggregate(
        store, r, {silo: 1.0}, like, manifests={silo: manifest}, verify_sha256=True
    )
    return dict(zip(worldlm.leaf_paths(one), jax.tree.leaves(one)))


def leaks(store: Any, fed: fed_lib.Federation, r: int, manifests: Mapping[str, Any]) -> dict[str, str]:
    """Members whose upload carries anything in the key layers they must keep (`Federation.keeps_keys`)."""
    out = {}
    for s in sorted(manifests):
        if fed.keeps_keys(s):
            leaked = [n for n, x in deltas(store, fed, r, s, manifests[s]).items() if bool(jnp.any(x != 0))]
            if leaked:
                out[s] = f"carries key layers it must keep ({', '.join(leaked)}): they never leave it"
    return out


def step(
    store: Any,
    fed: fed_lib.Federation,
    node: str,
    r: int,
    sent_params: Any,
    server: outer.OuterState,
    manifests: Mapping[str, Any],
    noise_secret: bytes | None = None,
    clip_norm: float | None = None,
) -> tuple[outer.OuterState, dict[str, float], dict[str, list]]:
    """(the state with federation `node`'s key layers after round r, its attention weights by child, and
    with residual embeddings its sub-federations' key layers k_c in key order, published with the next
    global): k_c = k_sent − Δ_c^K for each accepted member that sends key layers
    (`Federation.aggregate_keys`, private under DP)."""
    if fed.key_mask is None or fed.personal or not manifests:
        return server, {}, {}
    senders = [s for s in sorted(manifests) if s not in fed.tree.nodes or fed.residual]
    if not senders:
        return server, {}, {}
    result = fed.aggregate_keys(
        worldlm.key_layers(sent_params, fed.key_mask),
        [deltas(store, fed, r, s, manifests[s]) for s in senders],
        [fed.weight(manifests[s]["tokens"], s) for s in senders],
        [float(manifests[s]["validation"]["norm"]) for s in senders],
        r,
        noise_secret,
        clip_norm,
    )
    if result is None:  # under DP without attention: the noised mean's key leaves are the release
        return server, {}, {}
    new, kids, a = result
    weights = {f"attention/{node}/{c}": w for c, w in worldlm.mean_weights(a, senders).items()}
    params = worldlm.with_key_layers(server.params, new)
    children = {}
    if fed.residual:
        children = {c: [k[n] for n in fed.key_order] for c, k in zip(senders, kids) if c in fed.tree.nodes}
    return outer.OuterState(params, server.opt_state, server.round), weights, children
