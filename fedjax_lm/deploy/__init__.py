"""The multi-process driver: an aggregator process and silo processes that share only a store.

    python -m fedjax_lm aggregate --config experiments/photon.py:size=tiny --store runs/store --workdir runs/agg
    python -m fedjax_lm silo      --config experiments/photon.py:size=tiny --store runs/store --silo quotes-en

Both roles build the same `federation.Federation` as the one-process simulation and differ
from it only in their loop and their I/O. Round protocol (DESIGN.md): the aggregator
publishes `global/r` with the round's sample of silos and its deadline; each sampled silo
restores it, runs `Federation.train_silo`, writes its compressed Δ and commits; the
aggregator closes the round when every sampled silo committed, or at the deadline once
`quorum` did, validates each update, streams the accepted ones leaf by leaf into the
token-weighted mean (the same kernel as the simulation), applies `Federation.step` and
publishes `global/r+1`.

Crash safety comes from ordering and determinism, not from live connections:
- a silo commits its update *before* saving its private state. After a crash it brings its
  private state up to date by replaying, from their global checkpoints and without
  uploading, every round it committed since its last saved state (same batches, same
  result), so it never trains a round from stale moments, error feedback or data position;
- the aggregator holds a lock, keeps nothing it cannot re-read, and re-closing a round
  after a crash reads the same committed updates and publishes the same `global/r+1`; its
  metrics rows stay one per round.
"""

from fedjax_lm.deploy.aggregator import Aggregator, Deadlines
from fedjax_lm.deploy.common import (
    SHARED_FIELDS,
    GlobalRejected,
    Trust,
    check_deployable,
    check_store_run,
    global_meta,
    load_trust,
    read_server,
    shared_config,
    silo_names,
)
from fedjax_lm.deploy.silo_worker import SiloWorker

__all__ = [
    "SHARED_FIELDS",
    "Aggregator",
    "Deadlines",
    "GlobalRejected",
    "SiloWorker",
    "Trust",
    "check_deployable",
    "check_store_run",
    "global_meta",
    "load_trust",
    "read_server",
    "shared_config",
    "silo_names",
]
