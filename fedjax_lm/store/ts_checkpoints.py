"""Checkpoints of the global state and of silos' private state as TensorStore zarr arrays, for store
roots Orbax cannot write: s3:// (orbax-checkpoint 0.12.8 writes local paths and gs:// only; see
`layout.Root.orbax_path` for what it does with an s3:// path).

Same interface and guarantees as `checkpoints.Checkpoints`:

    global/<round>/<leaf keypath>/   one zarr3 array per leaf of params / opt_state
    global/<round>/meta.json
    global/<round>.COMMITTED         written last: a round without it does not exist
    silos/<silo>/<round>/...         the same for a silo's private state (+ .COMMITTED)

Each process of a multi-host writer writes the shards it owns (`arrays.write_regions`), process 0
writes the meta and the marker after a barrier; a reader restores each leaf straight into the
sharding of its abstract target (`jax.make_array_from_callback`: each device's slice is read, no
gather). A crashed write leaves a folder without a marker: invisible, deleted by the next attempt.
No checksums here: what a checkpoint holds is checked against the hashes in its signed meta
(`identity.tree_sha256`) by the deployment.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from fedjax_lm.store import arrays as arrays_lib
from fedjax_lm.store import layout

PyTree = Any
META = "meta.json"


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class TensorStoreCheckpoints:
    def __init__(
        self,
        root: layout.Root,
        objects: layout.Objects,
        context: ts.Context,
        *,
        keep_silo_states: int = 2,
        keep_globals: int | None = None,
        chunk_bytes: int = arrays_lib.DEFAULT_CHUNK_BYTES,
    ):
        self.root, self.objects, self.context = root, objects, context
        self.keep_silo_states, self.keep_globals = keep_silo_states, keep_globals
        self.chunk_bytes = chunk_bytes

    # ------------------------------------------------------------------ generic

    def _steps(self, folder: str) -> list[int]:
        names = self.objects.children(folder)
        return sorted(
            int(n[: -len(layout.MARKER_SUFFIX)])
            for n in names
            if n.endswith(layout.MARKER_SUFFIX) and n[: -len(layout.MARKER_SUFFIX)].isdigit()
        )

    def _spec(self, prefix: str, key: str) -> dict[str, Any]:
        return {"driver": "zarr3", "kvstore": self.root.kvstore_spec(prefix + layout.array_path(key) + "/")}

    def _save(self, folder: str, step: int, items: Mapping[str, PyTree], meta: Mapping[str, Any]) -> bool:
        prefix = f"{folder}{step}/"
        marker = f"{folder}{step}{layout.MARKER_SUFFIX}"
        if self.objects.exists(marker):
            return False
        if jax.process_index() == 0:
            self.objects.delete_prefix(prefix)  # a crashed attempt's partial folder
        _barrier(f"fedjax_lm.ts_checkpoints:{prefix}:cleared")
        writes = []
        for item, tree in items.items():
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                key = f"{item}/{arrays_lib.keypath_str(path)}"
                shape, dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype)
                unit, regions = arrays_lib.write_regions(leaf)
                chunks = arrays_lib.chunk_shape(shape, unit, dtype.itemsize, self.chunk_bytes)
                spec = arrays_lib.zarr_spec(
                    self.root.kvstore_spec(prefix + layout.array_path(key) + "/"),
                    shape,
                    dtype,
                    chunks,
                    "zstd",
                )
                store = ts.open(spec, create=True, open=True, context=self.context).result()
                for origin, data in regions:
                    host = np.asarray(data)
                    writes.append(store[arrays_lib.region_slices(origin, host.shape)].write(host))
        for w in writes:
            w.result()
        _barrier(f"fedjax_lm.ts_checkpoints:{prefix}:written")
        if jax.process_index() == 0:
            self.objects.put(prefix + META, json.dumps(dict(meta), sort_keys=True).encode())
            self.objects.put(marker, json.dumps({"written_at": time.time()}).encode())
        _barrier(f"fedjax_lm.ts_checkpoints:{prefix}:committed")
        return True

    def _restore(self, folder: str, step: int, item: str, abstract: PyTree) -> PyTree:
        prefix = f"{folder}{step}/"
        flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
        leaves = []
        for path, like in flat:
            key = f"{item}/{arrays_lib.keypath_str(path)}"
            store = ts.open(self._spec(prefix, key), open=True, read=True, context=self.context).result()
            if list(store.domain.shape) != list(like.shape) or store.dtype.numpy_dtype != np.dtype(
                like.dtype
            ):
                raise ValueError(
                    f"{self.root.url}/{prefix}: {key} is {store.dtype.numpy_dtype}{list(store.domain.shape)}, "
                    f"expected {np.dtype(like.dtype)}{list(like.shape)}"
                )
            sharding = getattr(like, "sharding", None)
            if sharding is None:
                leaves.append(np.asarray(store.read().result()))
            else:
                leaves.append(
                    jax.make_array_from_callback(
                        tuple(like.shape), sharding, lambda idx, s=store: np.asarray(s[idx].read().result())
                    )
                )
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def _meta(self, folder: str, step: int) -> dict[str, Any]:
        data = self.objects.get(f"{folder}{step}/{META}")
        if data is None:
            raise FileNotFoundError(f"{self.root.url}/{folder}{step} has no {META}")
        return json.loads(data)

    def _require(self, folder: str, step: int, what: str) -> None:
        if not self.objects.exists(f"{folder}{step}{layout.MARKER_SUFFIX}"):
            raise FileNotFoundError(f"{what} is not published in {self.root.url}")

    def _prune(self, folder: str, keep: int | None) -> None:
        if keep is None or jax.process_index() != 0:
            return
        for old in self._steps(folder)[:-keep]:
            self.objects.kvstore.write(f"{folder}{old}{layout.MARKER_SUFFIX}", None).result()
            self.objects.delete_prefix(f"{folder}{old}/")

    # ------------------------------------------------------------------ global

    def global_rounds(self) -> list[int]:
        return self._steps(f"{layout.GLOBAL}/")

    def latest_global(self) -> int | None:
        rounds = self.global_rounds()
        return rounds[-1] if rounds else None

    def publish_global(
        self,
        round: int,
        params: PyTree,
        opt_state: PyTree,
        meta: Mapping[str, Any],
        extra: Mapping[str, PyTree] | None = None,
    ) -> bool:
        meta = layout.global_meta(round, meta)
        items = {"params": params, "opt_state": opt_state, **layout.global_extra_items(extra)}
        done = self._save(f"{layout.GLOBAL}/", round, items, meta)
        if done:
            self._prune(f"{layout.GLOBAL}/", self.keep_globals)
        return done

    def read_global(
        self, round: int, abstract_params: PyTree, abstract_opt_state: PyTree
    ) -> tuple[PyTree, PyTree, dict[str, Any]]:
        self._require(f"{layout.GLOBAL}/", round, f"global/{round}")
        folder = f"{layout.GLOBAL}/"
        return (
            self._restore(folder, round, "params", abstract_params),
            self._restore(folder, round, "opt_state", abstract_opt_state),
            self._meta(folder, round),
        )

    def read_global_item(self, round: int, item: str, abstract: PyTree) -> PyTree:
        self._require(f"{layout.GLOBAL}/", round, f"global/{round}")
        try:
            return self._restore(f"{layout.GLOBAL}/", round, item, abstract)
        except ValueError as e:
            if "NOT_FOUND" not in str(e):
                raise
            raise FileNotFoundError(f"global/{round} in {self.root.url} has no {item!r}") from None

    def read_global_meta(self, round: int) -> dict[str, Any]:
        self._require(f"{layout.GLOBAL}/", round, f"global/{round}")
        return self._meta(f"{layout.GLOBAL}/", round)

    def wait_for_global(self, round: int, timeout_s: float = 3600.0, poll_s: float = 2.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while not self.objects.exists(f"{layout.GLOBAL}/{round}{layout.MARKER_SUFFIX}"):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"global/{round} not published in {self.root.url} after {timeout_s} s")
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        return self.read_global_meta(round)

    # ------------------------------------------------------------------ silos

    def _silo_folder(self, silo: str) -> str:
        return f"{layout.SILOS}/{layout.check_silo_name(silo)}/"

    def save_silo_state(self, silo: str, round: int, arrays: PyTree, json_meta: Mapping[str, Any]) -> bool:
        folder = self._silo_folder(silo)
        done = self._save(folder, layout.check_round(round), {"state": arrays}, json_meta)
        if done:
            self._prune(folder, self.keep_silo_states)
        return done

    def latest_silo_state(self, silo: str) -> int | None:
        steps = self._steps(self._silo_folder(silo))
        return steps[-1] if steps else None

    def restore_silo_state(self, silo: str, round: int, abstract: PyTree) -> tuple[PyTree, dict[str, Any]]:
        folder = self._silo_folder(silo)
        self._require(folder, round, f"silo {silo!r} state for round {round}")
        return self._restore(folder, round, "state", abstract), self._meta(folder, round)

    def close(self) -> None:
        pass
