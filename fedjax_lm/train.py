"""Centralized pre-training: the baseline every federated run is compared with.

    python -m fedjax_lm train --config experiments/centralized.py:size=tiny --workdir runs/central

One model trained on the pooled silos with the same model, inner optimizer, batches and
evaluation as a silo. The loop dispatches step t+1 before reading step t's metrics
(`StepLog`) and stops on a NaN loss; checkpoints hold `params` and `train` (step + AdamW).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from fedjax_lm import checkpoint as ckpt_lib
from fedjax_lm import config as config_lib
from fedjax_lm import data as data_lib
from fedjax_lm import evaluate as eval_lib
from fedjax_lm import model as model_lib
from fedjax_lm import monitor
from fedjax_lm import runs
from fedjax_lm import silo as silo_lib
from fedjax_lm.data import select
from fedjax_lm.silo import TrainState


@dataclasses.dataclass
class StepLog:
    """Fetches step t's metrics only after step t+1 was dispatched (never block on logging)."""

    writer: monitor.MetricWriter
    log_every: int
    pending: tuple[int, dict[str, jax.Array]] | None = None
    last: dict[str, float] = dataclasses.field(default_factory=dict)

    def push(self, step: int, metrics: dict[str, jax.Array]) -> dict[str, float] | None:
        prev, self.pending = self.pending, (step, metrics)
        return self._emit(prev) if prev else None

    def flush(self) -> dict[str, float] | None:
        prev, self.pending = self.pending, None
        return self._emit(prev) if prev else None

    def _emit(self, item) -> dict[str, float]:
        step, metrics = item
        host = {k: float(np.asarray(v).mean()) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(host["loss"]):
            raise runs.NonFiniteLossError(
                f"loss became {host['loss']} at step {step}: training stopped. The last checkpoint is "
                f"intact; lower optim.lr, raise optim.warmup_steps or check the data."
            )
        self.last = host
        if step % self.log_every == 0:
            self.writer.write("train", step, host)
        return host


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_after: int | None = None,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Centralized training on the pooled silos. `stop_after` ends the process early (tests of resume)."""
    t_start = time.time()
    config_lib.validate(config)
    runs.open_workdir(workdir, config, "centralized", allow_config_change=allow_config_change)
    corpus = select.ensure_corpus(config.data)
    select.check_vocab(config, corpus)
    steps = int(config.train.steps)
    silo = silo_lib.from_config(config, steps)
    seq_len, batch_size = int(config.train.seq_len), int(config.train.batch_size)
    silos = select.active_silos(config, corpus)
    it = data_lib.train_iterator(
        corpus, silos, seq_len=seq_len, batch_size=batch_size, seed=int(config.train.seed)
    )
    ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=int(config.train.keep_checkpoints)
    )
    start = ckpt.latest_step()
    if start is not None:
        abstract = silo.abstract_state_with_shardings()
        items, meta = ckpt.restore(
            start,
            {"params": abstract.params, "train": {"step": abstract.step, "opt_state": abstract.opt_state}},
        )
        state = TrainState(items["train"]["step"], items["params"], items["train"]["opt_state"])
        it.set_state(meta["data_iterator"])
        print(f"[fedjax_lm] resumed from step {start} in {workdir}", flush=True)
    else:
        start = 0
        state = silo.init_state(jax.random.key(int(config.train.seed)))
    writer = monitor.MetricWriter(workdir, enabled=jax.process_index() == 0)
    sets = eval_lib.eval_sets(
        corpus, silos, seq_len=seq_len, batch_size=batch_size, max_batches=int(config.train.eval_batches)
    )
    log = StepLog(writer, int(config.train.log_every))
    tokens_per_step = batch_size * seq_len
    end = steps if stop_after is None else min(steps, stop_after)
    bar = tqdm.tqdm(
        total=steps,
        initial=start,
        desc="train",
        unit="step",
        file=sys.stderr,
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
    t0, t_prev = time.perf_counter(), time.perf_counter()
    eval_every = int(config.train.eval_every)
    ckpt_every = int(config.train.checkpoint_every)
    try:
        for step in range(start + 1, end + 1):
            batch = silo.put_batch(next(it))
            state, metrics = silo.train_step(state, batch)
            host = log.push(step, metrics)
            bar.update(1)
            if host is not None:
                now = time.perf_counter()
                bar.set_postfix(
                    loss=f"{host['loss']:.3f}", tok_s=f"{tokens_per_step / max(now - t_prev, 1e-9):,.0f}"
                )
                t_prev = now
            if eval_every and step % eval_every == 0 and step != steps:
                log.flush()
                ev = eval_lib.evaluate(silo, state.params, sets)
                writer.write("eval", step, eval_lib.scalars(ev))
            if (ckpt_every and step % ckpt_every == 0) or step == end:
                log.flush()  # never checkpoint a state whose loss was not checked
                items = {"params": state.params, "train": {"step": state.step, "opt_state": state.opt_state}}
                ckpt.save(step, items, {"data_iterator": it.get_state(), "step": step})
        log.flush()
    finally:
        bar.close()
        ckpt.wait()
    train_time = time.perf_counter() - t0
    if end < steps:
        ckpt.close()
        writer.close()
        return {"stopped_at": end}
    result = eval_lib.evaluate(silo, state.params, sets)
    writer.write("eval", steps, eval_lib.scalars(result))
    summary = {
        "config": config.name,
        "kind": "centralized",
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "wall_time_s": time.time() - t_start,
        "train_time_s": train_time,
        "params": model_lib.param_count(silo.model_config),
        "final_train_loss": log.last.get("loss"),
        "val": result,
    }
    runs.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    writer.close()
    ckpt.close()
    print(eval_lib.format_table(result))
    return summary
