"""The tree's sub-federations in the one-process driver: their state, key layers and residual embeddings.

`simulation.Simulation` trains a sub-federation as one participant of its parent (`_train_node`: its own
rounds of its children through `node_round`); what the tree adds to that round lives here:

* `Subtree.nodes`: every federation below the root — its params (its own key layers included), its outer
  optimizer state and the error feedback of its uploads;
* the key layers each participant trains and is evaluated with (`keys_of`, `personalised`): its
  federation's (WorldLM), its own (FedPer, `key_owner="silo"`), none;
* a federation's key-layer step after its round (`key_step`, fedjax_lm/worldlm.py defines it) and the
  residual embeddings it gives its sub-federations for their next round;
* what each upload weighs (`up_bytes`: key leaves that never travel are not counted), the round row's tree
  fields (attention weights, the traffic inside the sub-federations, which uploads carried key layers);
* the checkpoint items that make a resumed tree continue bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lm import federation as fed_lib
from fedjax_lm import monitor
from fedjax_lm import outer
from fedjax_lm import tree as tree_lib
from fedjax_lm import worldlm


@dataclasses.dataclass
class NodeState:
    """What a federation below the root keeps between its parent's rounds."""

    state: outer.OuterState  # its params (its own key layers included) and outer-optimizer state
    error: Any  # the error feedback of its uploads to its parent


class Subtree:
    """The federations below the root of a `Federation`'s tree, and its key-layer settings."""

    def __init__(self, fed: fed_lib.Federation):
        self.fed, self.tree, self.cfg = fed, fed.tree, fed.fed.tree
        self.algo = outer.OuterAlgorithm(self.cfg.outer)
        self.nodes: dict[str, NodeState] = {}
        self.embeddings: dict[str, list] = {}  # sub-federation -> e_c for its next round (key order)
        self.keyed = fed.key_mask is not None
        self.owner = str(self.cfg.key_owner)
        self.personal, self.residual = fed.personal, fed.residual
        self.key_order = fed.key_order
        self.log: dict[str, Any] = {}  # this root round's attention weights and inner traffic
        # Each sub-federation's own `Federation` (its node config, as its aggregator process has in a
        # deployment): its weights, clipping, DP noise and key-layer step.
        self.feds: dict[str, fed_lib.Federation] = {}
        if not self.tree.flat:
            for name in self.tree.inner():
                node = fed_lib.Federation(
                    tree_lib.node_config(fed.config, name), self.tree.silos_under(name), mesh=fed.silo.mesh
                )
                node.node = name
                self.feds[name] = node

    def fed_of(self, name: str) -> fed_lib.Federation:
        """The `Federation` of node `name` (the root's, or a sub-federation's)."""
        return self.feds.get(name, self.fed)

    def init(self, params) -> None:
        for name in self.tree.inner():
            own = jax.tree.map(jnp.copy, params)
            self.nodes[name] = NodeState(self.algo.init(own), self.fed.silo.zeros_like_params(own))
            if self.residual:
                self.embeddings[name] = [jnp.zeros_like(x) for x in self.keys_list(own)]

    # -- key layers ----------------------------------------------------------------------------------
    def keys_list(self, params) -> list:
        return self.fed.keys_list(params)

    def keys_of(self, name: str, params, privates: Mapping[str, Any]) -> dict[str, Any]:
        """The key layers `name` (a silo or a federation) trains or is evaluated with."""
        if self.personal and name in privates:
            return dict(zip(self.key_order, privates[name].arrays["keys"]))
        if name in self.nodes:
            return worldlm.key_layers(self.nodes[name].state.params, self.fed.key_mask)
        return worldlm.key_layers(params, self.fed.key_mask)

    def silo_start(self, name: str, params, privates):
        """What silo `name` trains from: FedPer puts its own key layers into the backbone it received."""
        if not self.personal:
            return params
        return worldlm.with_key_layers(params, self.keys_of(name, params, privates))

    def personalised(self, server_params, privates) -> dict[str, Any]:
        """Each silo's model: the global backbone with its federation's key layers (WorldLM), or its own
        (FedPer); the global model itself without key layers."""
        if not self.keyed:
            return {s: server_params for s in self.tree.silos}
        out = {}
        for s in self.tree.silos:
            owner = s if self.personal else self.tree.parent[s]
            out[s] = worldlm.with_key_layers(server_params, self.keys_of(owner, server_params, privates))
        return out

    def node_start(self, name: str, anchor):
        """A sub-federation's params for its round: the backbone its parent sent, its own key layers
        (+ gamma x its residual embedding)."""
        if not self.keyed or self.owner != "federation":
            return anchor
        own = worldlm.key_layers(self.nodes[name].state.params, self.fed.key_mask)
        if self.residual:
            g = float(self.cfg.gamma)
            own = {k: own[k] + g * e for k, e in zip(self.key_order, self.embeddings[name])}
        return worldlm.with_key_layers(anchor, own)

    def up_anchor(self, anchor, params):
        """What a sub-federation's upload is measured from: the anchor; without residuals its key leaves are
        its own, so the delta of those leaves is exactly zero (they never leave the federation)."""
        if self.keyed and not self.residual:
            return worldlm.with_key_layers(anchor, worldlm.key_layers(params, self.fed.key_mask))
        return anchor

    def key_step(
        self,
        name: str,
        sent_params,
        state: outer.OuterState,
        outs,
        accepted,
        weights,
        norms,
        r: int,
        noise_secret: bytes | None = None,
        clip_norm: float | None = None,
    ):
        """A federation's key layers after its round (WorldLM): the attention (or token-weighted) mean of
        what its children sent (`Federation.aggregate_keys`, private under DP), and, for its
        sub-federations, the residual embeddings of their next round."""
        f = self.fed
        if not self.keyed or self.owner != "federation":
            return state
        # a sub-federation sends key deltas only as residuals; silos always send theirs to their federation
        senders = [c for c in accepted if c not in self.nodes or self.residual]
        if self.residual:  # a sub-federation that sent nothing this round gets no embedding next round
            for c in self.tree.nodes[name].children:
                if c in self.nodes:
                    self.embeddings[c] = [jnp.zeros_like(x) for x in self.embeddings[c]]
        if not senders:
            return state
        sent = worldlm.key_layers(sent_params, f.key_mask)
        deltas = [worldlm.key_deltas(outs[c].payload, f.key_mask, f.abstract_params) for c in senders]
        result = self.fed_of(name).aggregate_keys(
            sent,
            deltas,
            [weights[c] for c in senders],
            [norms[c] for c in senders],
            r,
            noise_secret,
            clip_norm,
        )
        if result is None:  # under DP without attention: the noised mean's key leaves are the release
            return state
        new, kids, a = result
        for c, w in worldlm.mean_weights(a, senders).items():
            self.log[f"attention/{name}/{c}"] = w
        feds = {c: kids[i] for i, c in enumerate(senders) if c in self.nodes}
        if self.residual and feds:
            for c, e in worldlm.embeddings_of(new, feds, float(self.cfg.temperature)).items():
                self.embeddings[c] = [e[n] for n in self.key_order]
        return outer.OuterState(worldlm.with_key_layers(state.params, new), state.opt_state, state.round)

    # -- traffic -------------------------------------------------------------------------------------
    def up_bytes(self, name: str) -> int:
        return self.fed.up_bytes(name)

    def down_bytes(self, name: str, r: int = 0, parent: str = tree_lib.ROOT) -> int:
        return self.fed_of(parent).down_bytes(name, r)

    def key_share(self, name: str) -> int:
        return self.fed.key_share(name)

    def record_inner(self, name: str, r: int, accepted, rejected, clipped: int = 0) -> None:
        """One round of sub-federation `name`: its downloads and uploads (and, under DP, how many of its
        silos' updates it clipped), for the root round's row."""
        self.log.setdefault("inner", []).append(
            {
                "down": {f"{name}/{c}": self.down_bytes(c, r, name) for c in accepted},
                "up": {f"{name}/{c}": self.up_bytes(c) for c in accepted},
                "rejected": {f"{name}/{c}": why for c, why in rejected.items()},
            }
        )
        if self.fed_of(name).dp_here:
            self.log[f"clipped/{name}"] = self.log.get(f"clipped/{name}", 0) + int(clipped)

    def row_fields(self, r: int, accepted, ledger: monitor.CommLedger) -> dict[str, Any]:
        """The round row's tree fields: attention weights, the traffic inside the sub-federations (also in
        the ledger), and how many bytes of key layers each upload carried to its parent."""
        log, self.log = self.log, {}
        out = {k: v for k, v in log.items() if k.startswith(("attention/", "clipped/"))}
        if self.keyed:
            out.update({f"key_bytes_up/{n}": self.key_share(n) for n in accepted})
        inner = log.get("inner", [])
        if not inner:
            return out
        down: dict[str, int] = {}
        up: dict[str, int] = {}
        for row in inner:
            for k, b in row["down"].items():
                down[k] = down.get(k, 0) + b
            for k, b in row["up"].items():
                up[k] = up.get(k, 0) + b
        ledger.record_round(r, down=down, up=up, dp_equivalent=0)
        out["inner_bytes_down"], out["inner_bytes_up"] = sum(down.values()), sum(up.values())
        if self.keyed:
            out.update({f"key_bytes_up/{k}": self.key_share(k.rsplit("/", 1)[1]) for k in up})
        rejected = {k: v for row in inner for k, v in row["rejected"].items()}
        if rejected:
            out["inner_rejected"] = rejected
        return out

    # -- checkpoint ----------------------------------------------------------------------------------
    def checkpoint_items(self) -> dict[str, Any]:
        if not self.nodes:
            return {}
        items: dict[str, Any] = {
            "tree": {
                n: {
                    "params": v.state.params,
                    "opt_state": v.state.opt_state,
                    "round": v.state.round,
                    "error": v.error,
                }
                for n, v in self.nodes.items()
            }
        }
        if self.embeddings:
            items["embeddings"] = dict(self.embeddings)
        return items

    def restore(self, items: Mapping[str, Any]) -> None:
        for n, v in items.get("tree", {}).items():
            self.nodes[n] = NodeState(outer.OuterState(v["params"], v["opt_state"], v["round"]), v["error"])
        self.embeddings.update({n: list(e) for n, e in items.get("embeddings", {}).items()})
