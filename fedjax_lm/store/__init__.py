"""The store: the only channel between silos and aggregators (DESIGN.md "Store layout").

    store = Store("gs://bucket/run")                       # or a local path, s3://, memory://
    store.publish_global(r, params, opt_state, {"silos": [...], "deadline": t})
    store.write_update(r, silo, payload, {"tokens": n, "loss": l, "flops": f})   # silo
    for silo in store.committed_silos(r):                  # aggregator
        manifests[silo] = store.validate_update(r, silo, abstract_payload,
                                                expected_silos=sample, current_round=r)
    mean = stream_weighted_mean(store, r, {s: m["tokens"] for s, m in manifests.items()},
                                like_params, manifests=manifests)

Modules: `layout` (paths, backends, atomic small objects), `arrays` (zarr layout, regions,
checksums, bounded reads), `updates` (write/commit/list), `validate`, `aggregate`
(streaming mean), `checkpoints` (Orbax: global and silo state), `lock`.
"""

from fedjax_lm.store.aggregate import stream_weighted_mean
from fedjax_lm.store.api import Store
from fedjax_lm.store.lock import Lock, LockHeld, LockLost
from fedjax_lm.store.validate import UpdateRejected

__all__ = ["Lock", "LockHeld", "LockLost", "Store", "UpdateRejected", "stream_weighted_mean"]
