"""Centralized pre-training (the baseline) and the pieces every trainer shares.

    python -m fedjax_lm train --config experiments/centralized.py:size=tiny --workdir runs/central

The loop is split into named pieces: `setup` (corpus, mesh, silo runtime), `restore_or_init`,
`run_steps` (dispatch step t+1 before reading step t's metrics; stop on NaN),
`final_eval` and `write_summary`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from fedjax_lm import __version__
from fedjax_lm import checkpoint as ckpt_lib
from fedjax_lm import data as data_lib
from fedjax_lm import evaluate as eval_lib
from fedjax_lm import model as model_lib
from fedjax_lm import monitor
from fedjax_lm import optim
from fedjax_lm import sharding as sharding_lib
from fedjax_lm.silo import Silo


class NonFiniteLossError(FloatingPointError):
    pass


def ensure_corpus(data_cfg: ml_collections.ConfigDict) -> "data_lib.Corpus":
    """Loads the prepared corpus, preparing it first if it is not there yet."""
    path = os.path.join(data_cfg.corpus_dir, "corpus.json")
    if not os.path.exists(path):
        print(
            f"[fedjax_lm] no corpus at {data_cfg.corpus_dir}: preparing it (cached for later runs)",
            flush=True,
        )
    data_lib.prepare(data_cfg)  # idempotent: returns at once when built with the same settings
    return data_lib.Corpus.load(data_cfg.corpus_dir)


def check_vocab(config: ml_collections.ConfigDict, corpus: "data_lib.Corpus") -> None:
    if config.model.vocab_size != corpus.vocab_size:
        raise ValueError(
            f"model.vocab_size={config.model.vocab_size} but the corpus at {config.data.corpus_dir} "
            f"has a tokenizer of {corpus.vocab_size} tokens; set both to the same value"
        )


def active_silos(config: ml_collections.ConfigDict, corpus: "data_lib.Corpus") -> list[str]:
    """The silos that take part: `config.train.silos`, or every silo of the corpus."""
    chosen = list(config.train.get("silos", None) or [])
    if not chosen:
        return list(corpus.silos)
    unknown = [s for s in chosen if s not in corpus.silos]
    if unknown:
        raise ValueError(
            f"train.silos names {unknown}, not in the corpus at {config.data.corpus_dir}; "
            f"its silos are {corpus.silos}"
        )
    return chosen


def build_silo(config: ml_collections.ConfigDict, total_steps: int, mesh=None) -> Silo:
    model_cfg = model_lib.ModelConfig.from_dict(config.model)
    tx, schedule = optim.make_optimizer(config.optim, total_steps)
    mesh = sharding_lib.make_mesh(config.mesh) if mesh is None else mesh
    accum = int(config.optim.grad_accum)
    if config.train.batch_size % accum:
        raise ValueError(
            f"train.batch_size={config.train.batch_size} is not divisible by optim.grad_accum={accum}"
        )
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if (config.train.batch_size // accum) % batch_shards:
        raise ValueError(
            f"train.batch_size={config.train.batch_size} (per micro-batch {config.train.batch_size // accum}) "
            f"does not split over the mesh's data x fsdp = {batch_shards} devices; change mesh or batch size"
        )
    return Silo(
        model_cfg,
        tx,
        mesh,
        rules=sharding_lib.normalize_rules(config.sharding.rules),
        schedule=schedule,
        grad_accum=accum,
    )


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def write_run_json(workdir: str, config: ml_collections.ConfigDict, kind: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(
        os.path.join(workdir, "run.json"),
        {
            "kind": kind,
            "fedjax_lm_version": __version__,
            "jax_version": jax.__version__,
            "config": json.loads(config.to_json_best_effort()),
        },
    )


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
            raise NonFiniteLossError(
                f"loss became {host['loss']} at step {step}: training stopped. The last checkpoint is "
                f"intact; lower optim.lr, raise optim.warmup_steps or check the data."
            )
        self.last = host
        if step % self.log_every == 0:
            self.writer.write("train", step, host)
        return host


def train(
    config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None
) -> dict[str, Any]:
    """Centralized training on the pooled silos. `stop_after` ends the process early (tests of resume)."""
    t_start = time.time()
    corpus = ensure_corpus(config.data)
    check_vocab(config, corpus)
    steps = int(config.train.steps)
    silo = build_silo(config, steps)
    write_run_json(workdir, config, "centralized")
    seq_len, batch_size = int(config.train.seq_len), int(config.train.batch_size)
    silos = active_silos(config, corpus)
    it = data_lib.train_iterator(
        corpus, silos, seq_len=seq_len, batch_size=batch_size, seed=int(config.train.seed)
    )
    ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=int(config.train.keep_checkpoints)
    )
    start = ckpt.latest_step()
    if start is not None:
        state, meta = ckpt.restore(start, silo.abstract_state_with_shardings())
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
                writer.write(
                    "eval",
                    step,
                    {
                        "pooled_ppl": ev["pooled"]["ppl"],
                        **{f"ppl/{k}": v["ppl"] for k, v in ev["per_silo"].items()},
                    },
                )
            if (ckpt_every and step % ckpt_every == 0) or step == end:
                log.flush()  # never checkpoint a state whose loss was not checked
                ckpt.save(step, state, {"data_iterator": it.get_state(), "step": step})
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
    writer.write(
        "eval",
        steps,
        {
            "pooled_ppl": result["pooled"]["ppl"],
            **{f"ppl/{k}": v["ppl"] for k, v in result["per_silo"].items()},
        },
    )
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
    write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    writer.close()
    ckpt.close()
    print(eval_lib.format_table(result))
    return summary
