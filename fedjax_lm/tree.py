"""The tree of federations (WorldLM): its shape from config, and the settings of its inner nodes.

    federation.tree.spec = "west(quotes(quotes-en,quotes-de),scripture(bible-en,bible-es)),east(quotes-ru,poetry-zh)"

A spec lists the root's children, separated by commas; a child is a silo name or a federation
`NAME(children)`. The empty spec is the flat federation: the root's children are the silos
(`train.silos`, or every silo of the corpus), the depth-1 tree. Names are unique across silos and
federations; every silo appears once; a federation has at least one child.

An inner node (every federation but the root) runs `local_rounds` rounds of its own per round of its
parent, with its own outer optimizer (`tree.outer`), and reports to its parent as one participant: its
pseudo-gradient anchor − θ_node, compressed like a silo's upload, weighted by the tokens its silos
trained on. Every silo of the tree trains the same number of local steps per root round: the product
of `local_rounds` along its path must be the same for all silos (checked; the inner learning-rate
schedule runs over rounds x that product x H).

Partial localisation and WorldLM's parts (`fedjax_lm/worldlm.py` defines them):
* `key_layers`: parameter-path regexes; the matching leaves are the key layers;
* `key_owner`: "federation" (WorldLM) — each federation keeps key layers of its own; its silos train
  with them and send their key-layer deltas to it (and no further); "silo" (FedPer) — each silo keeps its
  own and sends none;
* `attention`: a federation aggregates its children's key layers by attention (`temperature`, `step`)
  instead of the token-weighted mean;
* `residual`: a federation sends its parent the residual of its key layers from the parent's
  (k_child − k_parent) instead of nothing; the parent returns to each child gamma x the
  sibling-weighted sum of its siblings' residuals (`gamma`), added to the child's own key layers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from fedjax_lm import outer

KEY_OWNERS = ("federation", "silo")
ROOT = "root"
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            spec="",  # "" = the flat federation (the depth-1 tree)
            local_rounds=1,  # an inner node's rounds per round of its parent
            outer=outer.default_outer_config("fedavg"),  # every inner node's outer optimizer
            key_layers=(),  # parameter-path regexes; () = no key layers (HierFAVG / FedAvg)
            key_owner="federation",  # "federation" (WorldLM) | "silo" (FedPer)
            attention=True,  # attention aggregation of key layers (False: the token-weighted mean)
            temperature=0.1,
            step=1.0,  # eta: how far a federation's key layers move toward the attention mean
            residual=True,  # residual layer embeddings between sibling federations
            gamma=0.5,
        )
    )


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    children: tuple[str, ...]  # child names: silos or nodes
    parent: str | None


@dataclasses.dataclass(frozen=True)
class Tree:
    nodes: dict[str, Node]  # every federation, the root included
    silos: tuple[str, ...]  # every leaf, sorted
    parent: dict[str, str]  # silo or node -> its federation
    local_rounds: int

    @property
    def root(self) -> Node:
        return self.nodes[ROOT]

    @property
    def flat(self) -> bool:
        return len(self.nodes) == 1

    def is_silo(self, name: str) -> bool:
        return name not in self.nodes

    def inner(self) -> list[str]:
        """The inner nodes (every federation but the root), parents before children."""
        order, todo = [], [ROOT]
        while todo:
            n = todo.pop(0)
            if n != ROOT:
                order.append(n)
            todo += [c for c in self.nodes[n].children if c in self.nodes]
        return order

    def silos_under(self, name: str) -> list[str]:
        if self.is_silo(name):
            return [name]
        return sorted(s for c in self.nodes[name].children for s in self.silos_under(c))

    def path(self, name: str) -> list[str]:
        """The federations from the root down to `name`'s parent."""
        out = []
        while name in self.parent:
            name = self.parent[name]
            out.append(name)
        return out[::-1]

    def leaf_rounds(self, name: str = ROOT) -> int:
        """Rounds a silo under `name` trains per round of `name`'s parent (1 for a silo)."""
        if self.is_silo(name):
            return 1
        below = {self.leaf_rounds(c) for c in self.nodes[name].children}
        own = 1 if name == ROOT else self.local_rounds
        return own * below.pop()  # equal for every child (checked in `parse`)

    def depth(self) -> int:
        return max(len(self.path(s)) for s in self.silos)


def _tokens(spec: str) -> list[str]:
    out, i = [], 0
    while i < len(spec):
        ch = spec[i]
        if ch.isspace():
            i += 1
        elif ch in "(),":
            out.append(ch)
            i += 1
        else:
            m = _NAME.match(spec, i)
            if not m:
                raise ValueError(f"federation.tree.spec: unexpected {ch!r} at position {i} of {spec!r}")
            out.append(m.group())
            i = m.end()
    return out


def _parse_children(tokens: list[str], i: int, spec: str) -> tuple[list[Any], int]:
    children: list[Any] = []
    while True:
        if i >= len(tokens) or not _NAME.fullmatch(tokens[i]):
            got = "the end" if i >= len(tokens) else repr(tokens[i])
            raise ValueError(
                f"federation.tree.spec: expected a silo or federation name, got {got} in {spec!r}"
            )
        name, i = tokens[i], i + 1
        if i < len(tokens) and tokens[i] == "(":
            sub, i = _parse_children(tokens, i + 1, spec)
            if i >= len(tokens) or tokens[i] != ")":
                raise ValueError(
                    f"federation.tree.spec: federation {name!r} is not closed with ')' in {spec!r}"
                )
            children.append((name, sub))
            i += 1
        else:
            children.append(name)
        if i < len(tokens) and tokens[i] == ",":
            i += 1
            continue
        return children, i


def parse(spec: str, silos: Sequence[str], local_rounds: int = 1) -> Tree:
    """The tree of a spec over the federation's silos; errors name what is wrong."""
    if int(local_rounds) < 1:
        raise ValueError(f"federation.tree.local_rounds must be >= 1, got {local_rounds}")
    nodes: dict[str, Node] = {}
    parent: dict[str, str] = {}
    leaves: list[str] = []

    seen = {ROOT}

    def add(name: str, children: list[Any], up: str | None) -> None:
        names = []
        for c in children:
            cname = c[0] if isinstance(c, tuple) else c
            if cname in seen:
                raise ValueError(f"federation.tree.spec: the name {cname!r} is used twice (or is reserved)")
            seen.add(cname)
            parent[cname] = name
            names.append(cname)
            if isinstance(c, tuple):
                add(cname, c[1], name)
            else:
                leaves.append(cname)
        nodes[name] = Node(name, tuple(names), up)

    if spec.strip():
        tokens = _tokens(spec)
        children, i = _parse_children(tokens, 0, spec)
        if i != len(tokens):
            raise ValueError(f"federation.tree.spec: unexpected {tokens[i]!r} in {spec!r}")
        add(ROOT, children, None)
    else:
        add(ROOT, list(sorted(silos)), None)
    unknown = sorted(set(leaves) - set(silos))
    if unknown:
        raise ValueError(
            f"federation.tree.spec names silos the federation does not have: {unknown}; its silos: {sorted(silos)}"
        )
    missing = sorted(set(silos) - set(leaves))
    if missing:
        raise ValueError(f"federation.tree.spec leaves out silos {missing}: every silo must be placed once")
    tree = Tree(nodes, tuple(sorted(leaves)), parent, int(local_rounds))
    for name, node in nodes.items():
        per_child = {c: tree.leaf_rounds(c) if c in nodes else 1 for c in node.children}
        if len(set(per_child.values())) > 1:
            raise ValueError(
                f"federation.tree: under {name!r} the silos train different numbers of rounds per round "
                f"({per_child}); put every silo at the same depth or use local_rounds=1"
            )
    return tree


def check_config(tree_cfg: Mapping[str, Any]) -> None:
    defaults = default_config()
    unknown = set(tree_cfg) - set(defaults)
    if unknown:
        raise ValueError(f"federation.tree has unknown fields {sorted(unknown)}; valid: {sorted(defaults)}")
    if int(tree_cfg["local_rounds"]) < 1:
        raise ValueError(f"federation.tree.local_rounds must be >= 1, got {tree_cfg['local_rounds']}")
    if tree_cfg["key_owner"] not in KEY_OWNERS:
        raise ValueError(
            f"federation.tree.key_owner must be one of {KEY_OWNERS}, got {tree_cfg['key_owner']!r}"
        )
    if not float(tree_cfg["temperature"]) > 0:
        raise ValueError(f"federation.tree.temperature must be > 0, got {tree_cfg['temperature']}")
    if not 0 < float(tree_cfg["step"]) <= 1:
        raise ValueError(f"federation.tree.step must be in (0, 1], got {tree_cfg['step']}")
    if not (math.isfinite(float(tree_cfg["gamma"])) and float(tree_cfg["gamma"]) >= 0):
        raise ValueError(f"federation.tree.gamma must be >= 0, got {tree_cfg['gamma']}")
    for p in tree_cfg["key_layers"]:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"federation.tree.key_layers: {p!r} is not a regular expression ({e})") from None
    try:
        outer.make_outer_optimizer(tree_cfg["outer"])
    except ValueError as e:
        raise ValueError(f"federation.tree.outer: {e}") from None
    if tree_cfg["spec"].strip():
        _parse_children(_tokens(tree_cfg["spec"]), 0, tree_cfg["spec"])  # syntax; silos are checked at build


def check_combinations(fed: Mapping[str, Any]) -> None:
    """What a tree, or key layers, cannot be combined with yet: refused, naming the fields."""

    def refuse(what: str, why: str, **options: bool) -> None:
        on = [k for k, v in options.items() if v]
        if on:
            raise ValueError(f"{what} does not support federation.{', '.join(on)} yet ({why}): turn it off")

    common = dict(
        parallel=fed["parallel"],
        download_compression=fed["download_compression"] != "none",
        aggregate_inner_moments=fed["aggregate_inner_moments"],
    )
    if str(fed["tree"]["spec"]).strip():
        refuse(
            "federation.tree.spec (a tree of federations)",
            "a sub-federation trains its children one by one from its own uncompressed params",
            **common,
            **{"secagg.enabled": fed["secagg"]["enabled"]},
        )
    if fed["tree"]["key_layers"]:
        refuse(
            "federation.tree.key_layers (partial localisation)",
            "key layers are aggregated outside the private, masked or compressed mean",
            **common,
            **{"secagg.enabled": fed["secagg"]["enabled"]},
        )
    if str(fed["tree"]["spec"]).strip() and fed["dp"]["mode"] != "off":
        dp = fed["dp"]
        refuse(
            "federation.dp with a tree of federations",
            "a tree's silo rounds are accounted at the federations that aggregate silos",
            **{"dp.adaptive_clip": dp["adaptive_clip"], "dp.epsilon_budget": float(dp["epsilon_budget"]) > 0},
        )


def check_dp(tree: Tree) -> None:
    """Under DP a federation aggregates silos (and clips and noises them) or federations (whose uploads are
    already private): never both, so that every silo's update is clipped and noised exactly once."""
    for name, node in tree.nodes.items():
        kinds = {tree.is_silo(c) for c in node.children}
        if len(kinds) > 1:
            silos = [c for c in node.children if tree.is_silo(c)]
            raise ValueError(
                f"federation.dp: federation {name!r} has both silos ({silos}) and federations as children; "
                "under DP put its silos in a federation of their own (e.g. "
                f"{'own(' + ','.join(silos) + ')'})"
            )


def aggregates_silos(tree: Tree, name: str = ROOT) -> bool:
    """Whether federation `name`'s children are silos (under DP: it clips and noises their updates)."""
    return all(tree.is_silo(c) for c in tree.nodes[name].children)


def from_config(fed: Mapping[str, Any], silos: Sequence[str]) -> Tree:
    t = fed["tree"]
    return parse(str(t["spec"]), silos, int(t["local_rounds"]))


# ------------------------------------------------------------------- the tree in a deployment (deploy/)


def subtree_spec(tree: Tree, name: str) -> str:
    """The spec of federation `name`'s own tree (its children and below), `parse`-able."""

    def one(child: str) -> str:
        if tree.is_silo(child):
            return child
        return f"{child}({','.join(one(c) for c in tree.nodes[child].children)})"

    return ",".join(one(c) for c in tree.nodes[name].children)


def depth_of(tree: Tree, name: str) -> int:
    """0 for the root, 1 for its sub-federations, ..."""
    return len(tree.path(name))


def node_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The config of sub-federation `name` as a federation of its own (its store, its aggregator, its
    children): its subtree, rounds x local_rounds^depth rounds of the tree's inner outer optimizer over
    every child, the same silo schedule (rounds x leaf rounds x H local steps for every silo)."""
    fed = config.federation
    tree = from_config(fed, silos_of(config))
    if name == ROOT:
        return config
    if name not in tree.nodes:
        raise ValueError(f"{name!r} is not a federation of the tree; its federations: {tree.inner()}")
    c = config.copy_and_resolve_references()
    c.name = f"{config.name}/{name}"
    c.train.silos = tuple(tree.silos_under(name))
    f = c.federation
    f.tree.spec = subtree_spec(tree, name)
    f.rounds = int(fed.rounds) * tree.local_rounds ** depth_of(tree, name)
    f.outer = fed.tree.outer.copy_and_resolve_references()
    f.silos_per_round = 0  # a sub-federation trains every child in each of its rounds
    if str(f.dp.unit) == "federation":  # the root protects each federation as a whole; nothing inside
        f.dp.mode = "off"
    f.eval_every = 0
    return c


def participant_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The config of the federation that silo or sub-federation `name` is a participant of."""
    tree = from_config(config.federation, silos_of(config))
    if name not in tree.parent:
        raise ValueError(
            f"{name!r} is not a silo or sub-federation of the tree {config.federation.tree.spec!r}"
        )
    return node_config(config, tree.parent[name])


def store_for(store_root: str, config: ml_collections.ConfigDict, federation: str) -> str:
    """The store of `federation` (its own run, globals and children's updates): the root's is the
    deployment's store; a sub-federation's is a prefix under it, nodes/<path>/<name>."""
    tree = from_config(config.federation, silos_of(config))
    if federation == ROOT:
        return store_root
    parts = [p for p in tree.path(federation) if p != ROOT] + [federation]
    return store_root.rstrip("/") + "/nodes/" + "/".join(parts)


def silos_of(config: ml_collections.ConfigDict) -> list[str]:
    """The tree's silos: those its spec names (the spec is checked against them where it is built)."""
    spec = str(config.federation.tree.spec)
    if not spec.strip():
        return list(config.train.get("silos", None) or [])
    out: list[str] = []

    def walk(children):
        for c in children:
            if isinstance(c, tuple):
                walk(c[1])
            else:
                out.append(c)

    walk(_parse_children(_tokens(spec), 0, spec)[0])
    return out
