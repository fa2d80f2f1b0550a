"""Orbax checkpoints of a training state together with JSON side data (data-iterator state).

One checkpoint = `args.Composite(state=StandardSave(...), meta=JsonSave(...))`, so the
model, optimizer and the position of the data pipeline are saved and restored together:
a resumed run sees the next batch, never a repeat. Restores always pass an abstract
target carrying shardings, so a checkpoint restores onto any mesh.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = False):
        # Paths are handed to Orbax as given: a local folder, gs://bucket/... or s3://...
        if "://" not in directory:
            directory = os.path.abspath(directory)
        self.directory = directory
        self.manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = True) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
