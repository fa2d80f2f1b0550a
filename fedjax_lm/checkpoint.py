"""Orbax checkpoints of a run: named array items together with JSON side data.

One checkpoint = `args.Composite(<item>=StandardSave(...), ..., meta=JsonSave(...))`, so the
model, optimizers and the position of the data pipeline are saved and restored together: a
resumed run sees the next batch, never a repeat. Every run kind saves its model params as
the item `params`, so `eval`, `export` and `generate` restore that item alone, whatever
else the run keeps (a centralized run: `train` = step + AdamW state; a federation: `outer`
and the silos' private states). Restores always pass abstract targets carrying shardings,
so a checkpoint restores onto any mesh.
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

    def save(self, step: int, items: dict[str, Any], meta: dict[str, Any], *, force: bool = True) -> None:
        if "meta" in items:
            raise ValueError("'meta' is the JSON item of a checkpoint; name the array item otherwise")
        args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
        self.manager.save(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, abstract_items: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The named items (only those asked for) and the JSON meta of checkpoint `step`."""
        args = {k: ocp.args.StandardRestore(v) for k, v in abstract_items.items()}
        out = self.manager.restore(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore()))
        return {k: out[k] for k in abstract_items}, dict(out["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
