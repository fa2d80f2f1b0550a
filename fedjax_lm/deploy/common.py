"""What the aggregator and silo processes of a deployment share: config checks, the store's run."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections

from fedjax_lm import data as data_lib
from fedjax_lm import federation as fed_lib
from fedjax_lm import config as config_lib
from fedjax_lm import identity
from fedjax_lm import outer
from fedjax_lm import runs
from fedjax_lm import store as store_lib

# Config fields every process of a deployment must agree on (a silo's mesh and paths are its own).
SHARED_FIELDS = ("model", "optim", "federation", "train.seq_len", "train.batch_size", "train.seed")


def log(role: str, msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} {role}] {msg}", flush=True)


def check_deployable(config: ml_collections.ConfigDict) -> None:
    """Options of the one-process simulation that a deployment cannot honour are refused."""
    fed = config.federation
    if fed.parallel:
        raise ValueError(
            "federation.parallel trains many silos in one vmapped program; in a deployment every silo "
            "is its own process: set federation.parallel=False"
        )
    if fed.aggregate_inner_moments:
        raise ValueError(
            "federation.aggregate_inner_moments is supported by the one-process simulation only: a "
            "deployment would have to upload every silo's AdamW moments (2x the model); set it to False"
        )
    if fed.tree.key_layers and fed.tree.key_owner == "federation" and fed.tree.residual:
        from fedjax_lm import tree as tree_lib

        tree = tree_lib.from_config(fed, tree_lib.silos_of(config))
        deep = [n for n in tree.inner() if not tree_lib.aggregates_silos(tree, n)]
        if deep:
            raise ValueError(
                "federation.tree.residual (WorldLM's residual embeddings) is deployed between the root and "
                f"its sub-federations only: {deep} have sub-federations of their own, whose embeddings at "
                "the start of each parent round run in the one-process simulation only for now; set "
                "federation.tree.residual=False or use a two-level tree"
            )


def shared_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    full = runs.config_dict(config)
    out: dict[str, Any] = {}
    for dotted in SHARED_FIELDS:
        node, parts = full, dotted.split(".")
        for p in parts:
            node = node.get(p) if isinstance(node, dict) else None
        out[dotted] = node
    if isinstance(out.get("federation"), dict):
        # each process's own: where its store, keys and cards are
        out["federation"] = {k: v for k, v in out["federation"].items() if k not in ("deploy", "compliance")}
    return out


class GlobalRejected(ValueError):
    """A global checkpoint that is not the aggregator's (bad signature, or data that does not match it)."""


@dataclasses.dataclass(frozen=True)
class Trust:
    """This process's view of the federation's identities: its allow-list and its own key (both
    None in an unsigned federation)."""

    allow: identity.AllowList | None = None
    signer: identity.Signer | None = None

    @property
    def signed(self) -> bool:
        return self.allow is not None


def load_trust(config: ml_collections.ConfigDict, name: str) -> Trust:
    """The allow-list and private key named by federation.deploy (read from this machine's disk)."""
    d = config.federation.deploy
    if not d.get("allow_list"):
        log(
            name,
            "WARNING: unsigned federation: anyone who can write to the store can commit updates under any "
            "silo's name or publish a global model; set federation.deploy.allow_list and .key "
            "(python -m fedjax_lm keygen --help)",
        )
        return Trust()
    allow = identity.AllowList.load(d.allow_list)
    if not d.get("key"):
        raise identity.IdentityError(
            f"federation.deploy.key: {name!r} takes part in a signed federation and needs its private key "
            f"(python -m fedjax_lm keygen --name {name} --out DIR)"
        )
    signer = identity.Signer.load(d.key, name)
    allow.check_signer(signer)
    allow.require([identity.AGGREGATOR])
    return Trust(allow, signer)


def check_store_run(
    store: store_lib.Store, config: ml_collections.ConfigDict, role: str, trust: Trust | None = None
) -> dict[str, Any]:
    """The store's run.json, refusing a process whose shared config or allow-list differs from it."""
    run = store.read_run()
    mine = shared_config(config)
    if run.get("fingerprint") != runs.fingerprint(mine):
        # a store written before fields were added: only a real difference refuses this process
        diff = runs.config_diff(config_lib.with_new_defaults(run.get("shared_config", {})), mine)
    if run.get("fingerprint") != runs.fingerprint(mine) and diff:
        raise runs.ConfigMismatch(
            f"{role}: the store {store.root} belongs to a federation with another config "
            f"({'; '.join(diff[:6]) or 'fingerprint differs'}); use the federation's config or another store"
        )
    theirs = run.get("allow_list")
    ours = trust.allow.to_json() if trust is not None and trust.allow is not None else None
    if theirs != ours:
        if ours is None:
            why = "the federation signs its exchange and this process has no allow-list (federation.deploy.allow_list)"
        elif theirs is None:
            why = "the federation in the store is unsigned and this process has an allow-list"
        else:
            why = f"its allow-list differs from {trust.allow.path} ({_key_diff(theirs, ours)})"
        raise runs.ConfigMismatch(f"{role}: the store {store.root}: {why}")
    return run


def _key_diff(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> str:
    a, b = dict(theirs.get("keys") or {}), dict(ours.get("keys") or {})
    names = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
    return "members whose keys differ: " + ", ".join(names[:8]) if names else "format differs"


def global_meta(store: store_lib.Store, r: int, trust: Trust) -> dict[str, Any]:
    """global/<r>'s meta, refused unless the aggregator signed it (in a signed federation)."""
    meta = store.read_global_meta(r)
    if trust.signed:
        problem = identity.verify_meta(trust.allow, meta)
        if problem:
            raise GlobalRejected(
                f"global/{r} in {store.root} is not the aggregator's ({problem}): someone else wrote it; "
                "refusing to use it (remove it after inspection)"
            )
    if not isinstance(meta.get("params_sha256"), str):
        raise GlobalRejected(
            f"global/{r} in {store.root} carries no params_sha256 (not written by this version)"
        )
    return meta


def check_tree(tree: Any, expected: Any, what: str) -> str:
    """The tree's sha256, refused unless it is `expected` (the signed hash of the checkpoint)."""
    digest = identity.tree_sha256(tree)
    if digest != expected:
        raise GlobalRejected(
            f"{what} does not match the sha256 in its signed meta ({digest[:12]} vs {str(expected)[:12]}): "
            "the checkpoint's arrays were altered after it was published; refusing to use it"
        )
    return digest


def silo_names(config: ml_collections.ConfigDict) -> list[str]:
    """The federation's silos: those its tree names, else `config.train.silos`, else the prepared corpus's."""
    from fedjax_lm import tree as tree_lib

    listed = tree_lib.silos_of(config) or list(config.train.get("silos", None) or [])
    if listed:
        return listed
    try:
        return list(data_lib.Corpus.load(config.data.corpus_dir).silos)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the aggregator needs the silo names: list them in train.silos or prepare the corpus at "
            f"{config.data.corpus_dir} (python -m fedjax_lm prepare --config ...)"
        ) from None


def read_server(fed: fed_lib.Federation, store: store_lib.Store, r: int, trust: Trust):
    """The aggregator's state as of global/<r>, verified against the signed meta."""
    checked = global_meta(store, r, trust)
    params, opt_state, meta = store.read_global(r, fed.abstract_params, fed.abstract_outer_opt)
    if meta != checked:
        raise GlobalRejected(f"global/{r}'s meta changed while it was read: the store is being altered")
    check_tree(params, meta["params_sha256"], f"global/{r} params")
    check_tree(opt_state, meta.get("opt_state_sha256"), f"global/{r} outer optimizer state")
    return outer.OuterState(params=params, opt_state=opt_state, round=jnp.asarray(r, jnp.int32)), meta
