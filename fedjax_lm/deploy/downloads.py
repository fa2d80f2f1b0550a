"""The compressed download through the store (`federation.download_compression`; fedjax_lm/download.py
says what is sent and why).

The aggregator publishes with global/<r> two extra items and signs their hashes with the meta:

    broadcast   θ̂_r, the copy silos train from (f32, shaped like the params)   meta broadcast_sha256
    download    the payload that took θ̂_{r-1} to θ̂_r (absent at round 0)       meta download_sha256

A silo keeps θ̂_q of the last round q it trained in its private state (one that holds none builds θ̂_0
from train.seed, `federation.download_from_seed`, checked against global/0's signed hash). Sampled for
round r, it reads
the `download` items of rounds q+1..r (each checked against its round's signed hash), applies them
with `Downloads.apply` and checks the result against global/<r>'s signed broadcast_sha256; it reads
`broadcast` whole instead when it holds no copy, when the deltas would cost as much, or when any check
fails (logged). Its manifest says which copy it started from (`download_from`), and the aggregator
prices the download from that with `Downloads.cost`, as the simulation does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_lm import federation as fed_lib
from fedjax_lm import identity
from fedjax_lm import store as store_lib
from fedjax_lm.deploy.common import GlobalRejected, Trust, check_tree, global_meta, log

PyTree = Any


def publish(fed: fed_lib.Federation, broadcast: PyTree, payload: PyTree | None):
    """(meta fields, checkpoint items) that publish θ̂_r (and the delta that made it) with global/<r>."""
    meta = {"broadcast_sha256": identity.tree_sha256(broadcast)}
    items = {"broadcast": broadcast}
    if payload is not None:
        meta["download_sha256"] = identity.tree_sha256(payload)
        items["download"] = payload
    return meta, items


def read_broadcast(
    fed: fed_lib.Federation, store: store_lib.Store, r: int, meta: Mapping[str, Any]
) -> PyTree:
    """θ̂_r as global/<r> holds it, checked against the signed hash."""
    if not isinstance(meta.get("broadcast_sha256"), str):
        raise GlobalRejected(
            f"global/{r} carries no broadcast_sha256: it was not published with federation.download_compression"
        )
    broadcast = store.read_global_item(r, "broadcast", fed.abstract_params)
    check_tree(broadcast, meta["broadcast_sha256"], f"global/{r} broadcast copy")
    return broadcast


def base_sha256(meta: Mapping[str, Any]) -> str:
    """The hash of what silos train from in the round of `meta`: θ̂_r when it is published, else θ_r."""
    return str(meta.get("broadcast_sha256") or meta["params_sha256"])


def held_round(manifest: Mapping[str, Any], r: int) -> int | None:
    """The round whose copy a silo says it started round r from (0 also for the copy built from the
    seed; None: it read the full copy). Only the traffic ledger uses it; a value that cannot be true is
    priced as the full copy."""
    q = manifest.get("download_from")
    if isinstance(q, bool) or not isinstance(q, (int, float)) or q != int(q) or not 0 <= q <= r:
        return None
    return int(q)


class SiloDownloads:
    """A silo's side: θ̂_r from the copy it holds, with the fewest bytes the store allows."""

    def __init__(self, fed: fed_lib.Federation, store: store_lib.Store, trust: Trust, name: str, seed: int):
        self.fed, self.store, self.trust, self.name, self.seed = fed, store, trust, name, int(seed)
        replicated = NamedSharding(fed.silo.mesh, P())
        self.abstract_payload = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
            fed.downloads.abstract_payload,
        )

    def fetch(
        self, r: int, meta: Mapping[str, Any], held: int | None, copy: PyTree | None
    ) -> tuple[PyTree, int | None]:
        """(θ̂_r, the round of the copy it was built from, or None when read whole)."""
        d = self.fed.downloads
        held = held if copy is not None else None
        steps = d.plan(held, r)
        if steps is not None:
            try:
                if copy is None:  # round 0's global is the initialisation from train.seed: build it here
                    copy = self.fed.silo.init_params(jax.random.key(self.seed))
                    meta_0 = meta if r == 0 else global_meta(self.store, 0, self.trust)
                    check_tree(copy, meta_0.get("broadcast_sha256"), "round 0's global built from train.seed")
                for q in steps:
                    meta_q = meta if q == r else global_meta(self.store, q, self.trust)
                    payload = self.store.read_global_item(q, "download", self.abstract_payload)
                    check_tree(payload, meta_q.get("download_sha256"), f"global/{q} download delta")
                    copy = self.fed.downloads.apply(copy, payload)
                check_tree(
                    copy, meta.get("broadcast_sha256"), f"global/{r} broadcast copy rebuilt from deltas"
                )
                return copy, d.start(held)
            except (
                FileNotFoundError,
                GlobalRejected,
                ValueError,
                OSError,
            ) as e:  # missing, altered, unreadable
                log(
                    self.name,
                    f"round {r}: cannot rebuild the global copy from deltas ({e}); reading it whole",
                )
        return read_broadcast(self.fed, self.store, r, meta), None
