"""Orbax checkpoints in the store: the global state per round and each silo's private state.

``global/<round>/`` holds ``params`` and ``opt_state`` (StandardSave) and ``meta`` (JsonSave:
round, sampled silos, deadline, ...). Orbax writes a step to a temporary folder and renames it
(local) or writes ``commit_success.txt`` last (buckets), and lists only finished steps, so a
reader never sees a half-written round. ``silos/<silo>/<round>/`` holds ``state`` (inner
optimizer state, error feedback: StandardSave) and ``meta`` (data-iterator state: JsonSave).

Restores always take abstract targets carrying shardings (`jax.ShapeDtypeStruct(...,
sharding=...)`), so a checkpoint restores onto any mesh.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp

from fedjax_lm.store import layout

log = logging.getLogger(__name__)

PyTree = Any


def _manager(path: str, items: tuple[str, ...], keep: int | None) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        path,
        item_names=items,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
    )


class Checkpoints:
    def __init__(self, root: layout.Root, *, keep_silo_states: int = 2, keep_globals: int | None = None):
        self.root = root
        self.keep_silo_states = keep_silo_states
        self.keep_globals = keep_globals
        self._global: ocp.CheckpointManager | None = None
        self._silos: dict[str, ocp.CheckpointManager] = {}

    # ------------------------------------------------------------------ global

    @property
    def global_manager(self) -> ocp.CheckpointManager:
        if self._global is None:
            path = self.root.orbax_path(layout.GLOBAL)
            self._global = _manager(
                path, ("params", "opt_state", "meta", *layout.GLOBAL_EXTRA_ITEMS), self.keep_globals
            )
        return self._global

    def global_rounds(self) -> list[int]:
        m = self.global_manager
        m.reload()  # another process may have published since
        return sorted(m.all_steps())

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
        """Writes global/<round> atomically; False (and nothing written) if it already exists."""
        meta = layout.global_meta(round, meta)
        extra = layout.global_extra_items(extra)
        if round in self.global_rounds():
            log.info("global/%d already published; not rewriting it", round)
            return False
        m = self.global_manager
        m.save(
            round,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
                **{name: ocp.args.StandardSave(tree) for name, tree in extra.items()},
            ),
            force=True,
        )
        m.wait_until_finished()
        return True

    def _require_global(self, round: int) -> ocp.CheckpointManager:
        m = self.global_manager
        if round not in m.all_steps() and round not in self.global_rounds():
            raise FileNotFoundError(f"global/{round} is not published in {self.root.url}")
        return m

    def read_global(
        self, round: int, abstract_params: PyTree, abstract_opt_state: PyTree
    ) -> tuple[PyTree, PyTree, dict[str, Any]]:
        out = self._require_global(round).restore(
            round,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(abstract_opt_state),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["params"], out["opt_state"], dict(out["meta"])

    def read_global_item(self, round: int, item: str, abstract: PyTree) -> PyTree:
        m = self._require_global(round)
        try:
            out = m.restore(round, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))
        except KeyError:
            raise FileNotFoundError(f"global/{round} in {self.root.url} has no {item!r}") from None
        return out[item]

    def read_global_meta(self, round: int) -> dict[str, Any]:
        out = self._require_global(round).restore(round, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def wait_for_global(self, round: int, timeout_s: float = 3600.0, poll_s: float = 2.0) -> dict[str, Any]:
        """Blocks until global/<round> is published; returns its meta. TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while round not in self.global_rounds():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"global/{round} not published in {self.root.url} after {timeout_s} s")
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        return self.read_global_meta(round)

    # ------------------------------------------------------------------ silos

    def silo_manager(self, silo: str) -> ocp.CheckpointManager:
        if silo not in self._silos:
            path = self.root.orbax_path(f"{layout.SILOS}/{layout.check_silo_name(silo)}")
            self._silos[silo] = _manager(path, ("state", "meta"), self.keep_silo_states)
        return self._silos[silo]

    def save_silo_state(self, silo: str, round: int, arrays: PyTree, json_meta: Mapping[str, Any]) -> bool:
        """Saves silos/<silo>/<round>; False if that round is already saved (a re-run after a crash)."""
        m = self.silo_manager(silo)
        m.reload()
        if round in m.all_steps():
            log.info("silo %s state for round %d already saved", silo, round)
            return False
        m.save(
            layout.check_round(round),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(dict(json_meta))
            ),
            force=True,
        )
        m.wait_until_finished()
        return True

    def latest_silo_state(self, silo: str) -> int | None:
        m = self.silo_manager(silo)
        m.reload()
        return m.latest_step()

    def restore_silo_state(self, silo: str, round: int, abstract: PyTree) -> tuple[PyTree, dict[str, Any]]:
        m = self.silo_manager(silo)
        if round not in m.all_steps():
            m.reload()
            if round not in m.all_steps():
                raise FileNotFoundError(
                    f"silo {silo!r} has no saved state for round {round} in {self.root.url}"
                )
        out = m.restore(
            round,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return out["state"], dict(out["meta"])

    def close(self) -> None:
        for m in [self._global, *self._silos.values()]:
            if m is not None:
                m.close()
        self._global = None
        self._silos = {}
