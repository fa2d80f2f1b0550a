"""`Store`: the one object silos and aggregators hold — the only channel between them."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Container, Iterable, Mapping, Sequence
from typing import Any

from fedjax_lm import identity
from fedjax_lm.store import aggregate as aggregate_lib
from fedjax_lm.store import arrays as arrays_lib
from fedjax_lm.store import checkpoints as checkpoints_lib
from fedjax_lm.store import layout
from fedjax_lm.store import lock as lock_lib
from fedjax_lm.store import ts_checkpoints
from fedjax_lm.store import updates as updates_lib
from fedjax_lm.store import validate as validate_lib

PyTree = Any


class Store:
    """A store rooted at a local path, ``gs://``, ``s3://`` or ``memory://`` URL (see `layout`).

    Args:
      root: the root; passed to Orbax unchanged and turned into TensorStore kvstore specs.
      codec: chunk compression of update arrays ("zstd" level 1, or "none").
      chunk_bytes: target zarr chunk size of update arrays.
      read_budget_bytes: bytes of update data in flight at once when validating / aggregating.
      keep_silo_states: silo checkpoints kept per silo. keep_globals: None keeps every round.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        codec: str = "zstd",
        chunk_bytes: int = arrays_lib.DEFAULT_CHUNK_BYTES,
        read_budget_bytes: int = arrays_lib.DEFAULT_READ_BUDGET,
        keep_silo_states: int = 2,
        keep_globals: int | None = None,
    ):
        if codec not in arrays_lib.CODECS:
            raise ValueError(f"unknown codec {codec!r}; valid: {arrays_lib.CODECS}")
        self.layout = layout.Root.parse(root)
        self.context = self.layout.context()
        self.objects = layout.Objects(self.layout, self.context)
        self.codec = codec
        self.chunk_bytes = int(chunk_bytes)
        self.read_budget_bytes = int(read_budget_bytes)
        if self.layout.scheme == "s3":  # Orbax cannot write s3:// (see layout.Root.orbax_path)
            self._checkpoints = ts_checkpoints.TensorStoreCheckpoints(
                self.layout,
                self.objects,
                self.context,
                keep_silo_states=keep_silo_states,
                keep_globals=keep_globals,
            )
        else:
            self._checkpoints = checkpoints_lib.Checkpoints(
                self.layout, keep_silo_states=keep_silo_states, keep_globals=keep_globals
            )

    @property
    def root(self) -> str:
        return self.layout.url

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    # ------------------------------------------------------------------ run

    def write_run(self, obj: Mapping[str, Any]) -> None:
        self.objects.put_json(layout.RUN, dict(obj))

    def read_run(self) -> dict[str, Any]:
        run = self.objects.get_json(layout.RUN)
        if run is None:
            raise FileNotFoundError(f"{self.root} has no {layout.RUN}")
        return run

    MAX_TOKENIZER_BYTES = 64 << 20

    def put_tokenizer(self, data: bytes) -> str:
        """Shares the federation's tokenizer; returns its sha256 (recorded in run.json)."""
        self.objects.put(layout.TOKENIZER, bytes(data))
        return hashlib.sha256(data).hexdigest()

    def get_tokenizer(self, sha256: str) -> bytes:
        """The shared tokenizer, refused unless it has the sha256 the run recorded."""
        data = self.objects.get(layout.TOKENIZER)
        if data is None:
            raise FileNotFoundError(f"{self.root} has no {layout.TOKENIZER}")
        if len(data) > self.MAX_TOKENIZER_BYTES or hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(
                f"{self.root}/{layout.TOKENIZER} does not match the sha256 in run.json: the store was altered"
            )
        return data

    # ------------------------------------------------------------------ global state

    def publish_global(
        self,
        round: int,
        params: PyTree,
        opt_state: PyTree,
        meta: Mapping[str, Any],
        extra: Mapping[str, PyTree] | None = None,
    ) -> bool:
        """Atomically writes global/<round> (with the `extra` array items, `layout.GLOBAL_EXTRA_ITEMS`);
        returns False without writing if it exists."""
        return self._checkpoints.publish_global(round, params, opt_state, meta, extra)

    def global_rounds(self) -> list[int]:
        return self._checkpoints.global_rounds()

    def latest_global(self) -> int | None:
        return self._checkpoints.latest_global()

    def read_global(
        self, round: int, abstract_params: PyTree, abstract_opt_state: PyTree
    ) -> tuple[PyTree, PyTree, dict[str, Any]]:
        return self._checkpoints.read_global(round, abstract_params, abstract_opt_state)

    def read_global_params(self, round: int, abstract_params: PyTree) -> PyTree:
        """The params of global/<round> alone (eval, export, generate)."""
        return self._checkpoints.read_global_item(round, "params", abstract_params)

    def read_global_item(self, round: int, item: str, abstract: PyTree) -> PyTree:
        """One array item of global/<round> alone (FileNotFoundError if the round has none)."""
        return self._checkpoints.read_global_item(round, item, abstract)

    def read_global_meta(self, round: int) -> dict[str, Any]:
        return self._checkpoints.read_global_meta(round)

    def wait_for_global(self, round: int, timeout_s: float = 3600.0, poll_s: float = 2.0) -> dict[str, Any]:
        return self._checkpoints.wait_for_global(round, timeout_s, poll_s)

    # ------------------------------------------------------------------ updates

    def write_update(
        self,
        round: int,
        silo: str,
        payload: PyTree,
        manifest: Mapping[str, Any],
        *,
        signer: identity.Signer | None = None,
    ) -> dict[str, Any]:
        """Writes and commits a silo's payload (signed by `signer`); returns the manifest. No-op if
        already committed (by `signer`: an update someone else committed under its name is replaced)."""
        return updates_lib.write_update(
            self.objects,
            self.context,
            round,
            silo,
            payload,
            manifest,
            codec=self.codec,
            chunk_bytes=self.chunk_bytes,
            signer=signer,
        )

    def is_committed(self, round: int, silo: str, signer: identity.Signer | None = None) -> bool:
        """A committed update of `silo` for `round` exists (and, with `signer`, it is the signer's own)."""
        if not self.objects.exists(layout.marker_key(round, silo)):
            return False
        return updates_lib.foreign_commit(self.objects, round, silo, signer) is None

    def commit_problem(self, round: int, silo: str, allow: identity.AllowList | None) -> str | None:
        """Why the COMMITTED marker of `silo` cannot count as its commit for `round` (None: it can).

        Not the silo's commit: an unusable or (in a signed federation) not validly signed marker,
        a manifest that does not match the marker, or one that names another round or silo (a
        replay). A commit that is the silo's own but bad in content (an oversized manifest, bad
        fields or data) counts: it is the silo's last word for the round, and validation rejects it."""
        return updates_lib.commit_problem(self.objects, round, silo, allow)

    def read_marker_bytes(self, round: int, silo: str) -> bytes | None:
        return self.objects.get(layout.marker_key(round, silo))

    def committed_silos(self, round: int, candidates: Sequence[str] | None = None) -> list[str]:
        return updates_lib.committed_silos(self.objects, round, candidates)

    def read_manifest(self, round: int, silo: str) -> dict[str, Any]:
        return updates_lib.read_manifest(self.objects, round, silo)

    def read_update(self, round: int, silo: str, template_payload: PyTree) -> PyTree:
        """A committed payload as NumPy arrays shaped like `template_payload` (no validation)."""
        return updates_lib.read_update(self.objects, self.context, round, silo, template_payload)

    def validate_update(
        self,
        round: int,
        silo: str,
        template_payload_shapes: PyTree,
        *,
        expected_silos: Iterable[str],
        closed_rounds: Container[int] | None = None,
        current_round: int | None = None,
        max_norm: float | None = None,
        like_params: PyTree = None,
        allow: identity.AllowList | None = None,
        base_sha256: str | None = None,
    ) -> dict[str, Any]:
        """The manifest (plus "validation": norm, bytes read) or UpdateRejected; see `validate`."""
        return validate_lib.validate_update(
            self.objects,
            self.context,
            round,
            silo,
            template_payload_shapes,
            expected_silos=expected_silos,
            closed_rounds=closed_rounds,
            current_round=current_round,
            max_norm=max_norm,
            like_params=like_params,
            read_budget_bytes=self.read_budget_bytes,
            allow=allow,
            base_sha256=base_sha256,
        )

    def stream_weighted_mean(self, round: int, weights: Mapping[str, float], like_params: PyTree, **kwargs):
        return aggregate_lib.stream_weighted_mean(self, round, weights, like_params, **kwargs)

    # ------------------------------------------------------------------ lock

    def acquire_aggregator_lock(
        self, owner_info: Mapping[str, Any], *, lease_s: float = 60.0, host: str | None = None
    ) -> lock_lib.Lock:
        """Takes locks/aggregator.lock or raises LockHeld naming the holder (see `lock`)."""
        if self.layout.is_local:
            backend = lock_lib.LocalBackend(self.layout.local(lock_lib.LOCK_KEY))
        else:
            backend = lock_lib.KvBackend(
                self.objects.kvstore, lock_lib.LOCK_KEY, f"{self.root}/{lock_lib.LOCK_KEY}"
            )
        return lock_lib.acquire(backend, dict(owner_info), lease_s=lease_s, host=host)

    # ------------------------------------------------------------------ silo private state

    def save_silo_state(
        self, silo: str, round: int, arrays_pytree: PyTree, json_meta: Mapping[str, Any]
    ) -> bool:
        return self._checkpoints.save_silo_state(silo, round, arrays_pytree, json_meta)

    def latest_silo_state(self, silo: str) -> int | None:
        return self._checkpoints.latest_silo_state(silo)

    def restore_silo_state(self, silo: str, round: int, abstract: PyTree) -> tuple[PyTree, dict[str, Any]]:
        return self._checkpoints.restore_silo_state(silo, round, abstract)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        self._checkpoints.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
