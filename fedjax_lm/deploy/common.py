"""What the aggregator and silo processes of a deployment share: config checks, the store's run."""

from __future__ import annotations

import time
from typing import Any

import jax.numpy as jnp
import ml_collections

from fedjax_lm import data as data_lib
from fedjax_lm import federation as fed_lib
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


def shared_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    full = runs.config_dict(config)
    out: dict[str, Any] = {}
    for dotted in SHARED_FIELDS:
        node, parts = full, dotted.split(".")
        for p in parts:
            node = node.get(p) if isinstance(node, dict) else None
        out[dotted] = node
    if isinstance(out.get("federation"), dict):
        out["federation"] = {k: v for k, v in out["federation"].items() if k != "deploy"}
    return out


def check_store_run(store: store_lib.Store, config: ml_collections.ConfigDict, role: str) -> dict[str, Any]:
    """The store's run.json, refusing a process whose shared config differs from it."""
    run = store.read_run()
    mine = shared_config(config)
    if run.get("fingerprint") != runs.fingerprint(mine):
        diff = runs.config_diff(run.get("shared_config", {}), mine)
        raise runs.ConfigMismatch(
            f"{role}: the store {store.root} belongs to a federation with another config "
            f"({'; '.join(diff[:6]) or 'fingerprint differs'}); use the federation's config or another store"
        )
    return run


def silo_names(config: ml_collections.ConfigDict) -> list[str]:
    """The federation's silos: `config.train.silos`, else the silos of the prepared corpus."""
    listed = list(config.train.get("silos", None) or [])
    if listed:
        return listed
    try:
        return list(data_lib.Corpus.load(config.data.corpus_dir).silos)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the aggregator needs the silo names: list them in train.silos or prepare the corpus at "
            f"{config.data.corpus_dir} (python -m fedjax_lm prepare --config ...)"
        ) from None


def read_server(fed: fed_lib.Federation, store: store_lib.Store, r: int):
    params, opt_state, meta = store.read_global(r, fed.abstract_params, fed.abstract_outer_opt)
    return outer.OuterState(params=params, opt_state=opt_state, round=jnp.asarray(r, jnp.int32)), meta
