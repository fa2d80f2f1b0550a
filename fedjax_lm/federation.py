"""The federated round, DiLoCo / Photon style, and the one-process simulation.

The algorithm has fedjax's shape:

    algo = FederatedAlgorithm(...)
    server = algo.init(params)                               # OuterState (+ shared inner moments)
    server, diagnostics = algo.apply(server, silo_results)   # one outer step

A silo's work in one round is one pure, jitted function, `client_round`:
client_init (global params + its inner optimizer state), client_step (H local AdamW
steps with `lax.scan`), client_final (pseudo-gradient Δ = θ_global − θ_local, compressed
with error feedback). The silo-parallel simulation `jax.vmap`s the very same function
over a leading silo axis sharded over the devices, so both paths compute the same thing.

The aggregator keeps a running token-weighted mean of the decompressed Δ_k (one model
in memory, whatever the number of silos) and applies the outer optimizer to it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_lm import checkpoint as ckpt_lib
from fedjax_lm import compression
from fedjax_lm import data as data_lib
from fedjax_lm import evaluate as eval_lib
from fedjax_lm import model as model_lib
from fedjax_lm import monitor
from fedjax_lm import outer
from fedjax_lm import train as train_lib
from fedjax_lm.silo import Silo, TrainState, local_train

INNER_STATE_MODES = ("keep", "reset")
_FIELDS = {
    "rounds",
    "local_steps",
    "silos_per_round",
    "inner_state",
    "aggregate_inner_moments",
    "compression",
    "block_size",
    "error_feedback",
    "outer",
    "parallel",
    "sample_seed",
    "eval_every",
    "checkpoint_every",
    "deploy",
}


def default_federation_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            rounds=8,
            local_steps=32,  # H: inner steps per round
            silos_per_round=0,  # K: 0 = every silo every round
            inner_state="keep",  # "keep" the silo's AdamW moments across rounds, or "reset" them
            aggregate_inner_moments=False,  # Photon's option: average inner moments across silos too
            compression="int8",  # upload encoding of Δ: "none" | "bf16" | "int8"
            block_size=256,
            error_feedback=True,
            outer=outer.default_outer_config("fedavg"),
            parallel=False,  # train the K silos of a round in one vmapped program
            sample_seed=0,
            eval_every=0,  # rounds; 0 = only at the end
            checkpoint_every=1,  # rounds
            # Multi-process deployment (python -m fedjax_lm aggregate / silo) over a store.
            deploy=ml_collections.ConfigDict(
                dict(
                    store="",  # local path, gs://bucket/run or s3://bucket/run
                    deadline_s=600.0,  # a round closes at its deadline once `quorum` silos committed
                    adaptive_deadline=True,  # deadline = max(min_deadline_s, factor x slowest recent silo)
                    deadline_factor=2.0,
                    min_deadline_s=30.0,
                    quorum=1,
                    max_update_norm=0.0,  # reject a pseudo-gradient whose global norm exceeds this (0: off)
                    poll_s=0.5,
                )
            ),
        )
    )


def check_federation_config(fed: Mapping[str, Any], num_silos: int) -> None:
    unknown = set(fed) - _FIELDS
    if unknown:
        raise ValueError(f"federation config has unknown fields {sorted(unknown)}; valid: {sorted(_FIELDS)}")
    for key in ("rounds", "local_steps"):
        if int(fed[key]) < 1:
            raise ValueError(f"federation.{key} must be >= 1, got {fed[key]}")
    k = int(fed["silos_per_round"])
    if k < 0 or k > num_silos:
        raise ValueError(f"federation.silos_per_round={k} but the corpus has {num_silos} silos")
    if fed["inner_state"] not in INNER_STATE_MODES:
        raise ValueError(
            f"federation.inner_state must be one of {INNER_STATE_MODES}, got {fed['inner_state']!r}"
        )
    if fed["compression"] not in compression.METHODS:
        raise ValueError(
            f"federation.compression must be one of {compression.METHODS}, got {fed['compression']!r}"
        )
    if fed["aggregate_inner_moments"] and fed["inner_state"] != "keep":
        raise ValueError("federation.aggregate_inner_moments needs inner_state='keep'")


def sample_silos(names: Sequence[str], k: int, seed: int, round_idx: int) -> list[str]:
    """K of N silos for a round, seeded by (seed, round): the same on every host and on resume."""
    names = sorted(names)
    if k <= 0 or k >= len(names):
        return names
    rng = np.random.default_rng([seed, round_idx])
    return sorted(rng.choice(names, size=k, replace=False).tolist())


# ---------------------------------------------------------------------------- client


@struct.dataclass
class ClientOutput:
    payload: Any  # compressed Δ (what is uploaded)
    error: Any  # error-feedback residual kept by the silo
    opt_state: Any  # the silo's inner optimizer state after the round
    metrics: dict[str, jax.Array]  # per local step: loss, grad_norm, tokens, lr


def client_round(
    global_params: Any,
    opt_state: Any,
    error: Any,
    step0: jax.Array,
    batches: Mapping[str, jax.Array],
    *,
    step_fn,
    tx: optax.GradientTransformation,
    method: str,
    block_size: int,
    reset_opt: bool,
) -> ClientOutput:
    """client_init -> H client steps -> client_final, as one pure function (jit or vmap it)."""
    if reset_opt:
        opt_state = tx.init(global_params)
    state = TrainState(step=step0, params=global_params, opt_state=opt_state)
    state, metrics = local_train(state, batches, step_fn=step_fn)
    delta = outer.pseudo_gradient(global_params, state.params)
    payload, new_error = compression.compress(delta, error, method, block_size)
    return ClientOutput(payload=payload, error=new_error, opt_state=state.opt_state, metrics=metrics)


def make_client_fn(silo: Silo, fed: Mapping[str, Any]):
    """`client_round` bound to a silo runtime and the federation config (jit or vmap it)."""
    return functools.partial(
        client_round,
        step_fn=silo.step_fn,
        tx=silo.tx,
        method=fed["compression"],
        block_size=int(fed["block_size"]),
        reset_opt=fed["inner_state"] == "reset",
    )


def silo_iterator(corpus: "data_lib.Corpus", name: str, config: ml_collections.ConfigDict):
    """A silo's training batches; the seed depends on the silo's index, the same in every process."""
    return data_lib.train_iterator(
        corpus,
        [name],
        seq_len=int(config.train.seq_len),
        batch_size=int(config.train.batch_size),
        seed=int(config.train.seed) * 1000 + corpus.silos.index(name),
    )


def next_batches(iterator, h: int) -> dict[str, np.ndarray]:
    """H batches stacked to [H, B, L] for `local_train`."""
    bs = [next(iterator) for _ in range(h)]
    return {k: np.stack([b[k] for b in bs]) for k in bs[0]}


@dataclasses.dataclass
class SiloPrivate:
    """What a silo keeps to itself between rounds (in deployment: its own Orbax checkpoint)."""

    opt_state: Any
    error: Any
    iterator: Any  # grain iterator with get_state / set_state


# ---------------------------------------------------------------------------- server


class FederatedAlgorithm:
    """init(params) -> server state; apply(server state, silo results) -> (server state, diagnostics)."""

    def __init__(self, outer_cfg: Mapping[str, Any], method: str):
        self.tx = outer.make_outer_optimizer(outer_cfg)
        self.method = method
        self._step = jax.jit(functools.partial(outer.outer_apply, tx=self.tx), donate_argnums=(0,))
        self._stats = jax.jit(outer.delta_stats)

    def init(self, params: Any) -> outer.OuterState:
        return jax.jit(functools.partial(outer.outer_init, tx=self.tx))(params)

    def apply(
        self, server: outer.OuterState, results: Iterable[tuple[Any, float]]
    ) -> tuple[outer.OuterState, dict[str, Any]]:
        """`results` yields (payload, tokens) one silo at a time: memory stays one model.

        The running token-weighted mean is folded leaf by leaf with `compression.fold_into_mean`
        and host-side f32 factors, exactly as the store's streaming aggregation does, so the
        one-process simulation and the multi-process deployment agree bit for bit.
        """
        mean = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32, device=p.sharding), server.params)
        total, n = np.float32(0.0), 0
        for payload, tokens in results:
            total, frac = compression.next_fraction(total, tokens)
            mean = jax.tree.map(lambda m, pl: compression.fold_into_mean(m, pl, frac), mean, payload)
            n += 1
        if not total > 0:
            raise ValueError(f"the round has no update to aggregate ({n} silos, total weight {total})")
        return self.step(server, mean, tokens=float(total), silos=n)

    def step(
        self, server: outer.OuterState, mean_delta: Any, **diag
    ) -> tuple[outer.OuterState, dict[str, Any]]:
        """The outer optimizer step on an aggregated mean pseudo-gradient."""
        stats = {k: float(v) for k, v in self._stats(mean_delta).items()}
        server = self._step(server, mean_delta)
        return server, {**diag, **{f"delta_{k}": v for k, v in stats.items()}}


# ---------------------------------------------------------------------------- simulation


class Simulation:
    """N silos and one aggregator in one process: the same pure functions as deployment."""

    def __init__(
        self, config: ml_collections.ConfigDict, corpus: "data_lib.Corpus", mesh: Mesh | None = None
    ):
        fed = config.federation
        self.names = train_lib.active_silos(config, corpus)
        check_federation_config(fed, len(self.names))
        self.config, self.fed, self.corpus = config, fed, corpus
        self.H = int(fed.local_steps)
        self.rounds = int(fed.rounds)
        # The inner schedule runs over round * H + local step, whatever a silo's participation.
        self.silo = train_lib.build_silo(config, total_steps=self.rounds * self.H, mesh=mesh)
        self.algo = FederatedAlgorithm(fed.outer, fed.compression)
        self.seq_len, self.batch_size = int(config.train.seq_len), int(config.train.batch_size)
        self._client = make_client_fn(self.silo, fed)
        self._jit_seq = None
        self._jit_par = None

    # -- state ---------------------------------------------------------------------------
    def init(self, seed: int) -> tuple[outer.OuterState, dict[str, SiloPrivate]]:
        state = self.silo.init_state(jax.random.key(seed))
        server = self.algo.init(state.params)
        privates = {}
        for name in self.names:
            it = silo_iterator(self.corpus, name, self.config)
            privates[name] = SiloPrivate(
                opt_state=self._fresh_opt(server.params) if self.fed.inner_state == "keep" else None,
                error=self._zeros(server.params) if self.fed.error_feedback else None,
                iterator=it,
            )
        return server, privates

    def _fresh_opt(self, params):
        return jax.jit(self.silo.tx.init, out_shardings=self.silo.opt_shardings)(params)

    def _zeros(self, params):
        return jax.jit(compression.init_error, out_shardings=self.silo.param_shardings)(params)

    # -- one round -------------------------------------------------------------------------
    def run_clients(
        self,
        server: outer.OuterState,
        privates: Mapping[str, SiloPrivate],
        sampled: Sequence[str],
        round_idx: int,
    ) -> dict[str, ClientOutput]:
        step0 = jnp.asarray(round_idx * self.H, jnp.int32)
        batches = {name: next_batches(privates[name].iterator, self.H) for name in sampled}
        if self.fed.parallel:
            return self._run_parallel(server, privates, sampled, step0, batches)
        outs = {}
        for name in sampled:
            p = privates[name]
            outs[name] = self._run_one(
                server.params, p.opt_state, p.error, step0, self.silo.put_batch(batches[name], ndim=3)
            )
        return outs

    def _run_one(self, params, opt_state, error, step0, batches) -> ClientOutput:
        if self._jit_seq is None:
            self._jit_seq = jax.jit(self.silo._with_rules(self._client))
        with jax.set_mesh(self.silo.mesh):
            return self._jit_seq(params, opt_state, error, step0, batches)

    def _run_parallel(self, server, privates, sampled, step0, batches) -> dict[str, ClientOutput]:
        """The K sampled silos as one vmapped program over a leading silo axis."""
        k = len(sampled)
        devices = jax.devices()
        n_dev = math.gcd(k, len(devices))
        silo_mesh = jax.make_mesh(
            (n_dev,), ("silo",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n_dev]
        )
        lead = NamedSharding(silo_mesh, P("silo"))
        rep = NamedSharding(silo_mesh, P())

        def stack(trees):
            if trees[0] is None:
                return None
            return jax.tree.map(
                lambda *xs: jax.device_put(np.stack([np.asarray(x) for x in xs]), lead), *trees
            )

        opt = stack([privates[n].opt_state for n in sampled])
        err = stack([privates[n].error for n in sampled])
        bat = {
            key: jax.device_put(np.stack([batches[n][key] for n in sampled]), lead)
            for key in batches[sampled[0]]
        }
        params = jax.device_put(jax.device_get(server.params), rep)
        if self._jit_par is None:
            in_axes = (None, 0 if opt is not None else None, 0 if err is not None else None, None, 0)
            self._jit_par = jax.jit(jax.vmap(self._client, in_axes=in_axes), out_shardings=lead)
        out = self._jit_par(params, opt, err, step0, bat)
        # Back to each silo's own layout (its mesh), as the sequential path leaves it.
        host = jax.device_get(out)
        result = {}
        for i, name in enumerate(sampled):
            one = jax.tree.map(lambda x: x[i], host)
            result[name] = ClientOutput(
                payload=one.payload,
                error=None if one.error is None else jax.device_put(one.error, self.silo.param_shardings),
                opt_state=None
                if one.opt_state is None
                else jax.device_put(one.opt_state, self.silo.opt_shardings),
                metrics=one.metrics,
            )
        return result

    def round(self, server, privates, round_idx: int, timer: monitor.PhaseTimer):
        sampled = sample_silos(
            self.names, int(self.fed.silos_per_round), int(self.fed.sample_seed), round_idx
        )
        with timer.phase("local_train"):
            outs = self.run_clients(server, privates, sampled, round_idx)
            jax.block_until_ready(outs)
        tokens = {n: float(np.asarray(o.metrics["tokens"]).sum()) for n, o in outs.items()}
        up = {n: compression.payload_nbytes(o.payload) for n, o in outs.items()}
        param_bytes = compression.raw_nbytes(server.params)
        with timer.phase("aggregate"):
            server, diag = self.algo.apply(server, ((outs[n].payload, tokens[n]) for n in sampled))
            if self.fed.aggregate_inner_moments:
                shared = outer.aggregate_optimizer_moments((outs[n].opt_state, tokens[n]) for n in sampled)
            jax.block_until_ready(server)
        for n in sampled:
            p, o = privates[n], outs[n]
            if self.fed.inner_state == "keep":
                p.opt_state = o.opt_state
            if self.fed.error_feedback:
                p.error = o.error
        if self.fed.aggregate_inner_moments:
            shared = jax.device_put(shared, self.silo.opt_shardings)
            for p in privates.values():
                p.opt_state = shared
        losses = {n: float(np.asarray(o.metrics["loss"]).mean()) for n, o in outs.items()}
        info = {
            "sampled": sampled,
            "train_loss": losses,
            "tokens": tokens,
            "bytes_up": up,
            "bytes_down": {n: param_bytes for n in sampled},
            "dp_equivalent_bytes": monitor.dp_allreduce_bytes(param_bytes, self.H, len(sampled)),
            "aggregate": diag,
        }
        return server, info


def _iterator_states(privates: Mapping[str, SiloPrivate]) -> dict[str, Any]:
    return {n: p.iterator.get_state() for n, p in privates.items()}


def _private_arrays(privates: Mapping[str, SiloPrivate]) -> dict[str, Any]:
    return {n: {"opt_state": p.opt_state, "error": p.error} for n, p in privates.items()}


def train(
    config: ml_collections.ConfigDict, workdir: str, *, stop_after_round: int | None = None
) -> dict[str, Any]:
    """One-process federated pre-training; resumes from the last round checkpoint in workdir."""
    t_start = time.time()
    corpus = train_lib.ensure_corpus(config.data)
    train_lib.check_vocab(config, corpus)
    sim = Simulation(config, corpus)
    train_lib.write_run_json(workdir, config, "federated")
    server, privates = sim.init(int(config.train.seed))
    ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=int(config.train.keep_checkpoints)
    )
    ledger = monitor.CommLedger()
    start = ckpt.latest_step()
    if start is not None:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            {"server": server, "silos": _private_arrays(privates)},
        )
        restored, meta = ckpt.restore(start, abstract)
        server = restored["server"]
        for n, p in privates.items():
            p.opt_state = restored["silos"][n]["opt_state"]
            p.error = restored["silos"][n]["error"]
            p.iterator.set_state(meta["iterators"][n])
        ledger.rounds = meta["ledger"]
        print(f"[fedjax_lm] resumed after round {start} in {workdir}", flush=True)
    else:
        start = 0
    writer = monitor.MetricWriter(workdir, enabled=jax.process_index() == 0)
    sets = eval_lib.eval_sets(
        corpus,
        sim.names,
        seq_len=sim.seq_len,
        batch_size=sim.batch_size,
        max_batches=int(config.train.eval_batches),
    )
    timer = monitor.PhaseTimer()
    end = sim.rounds if stop_after_round is None else min(sim.rounds, stop_after_round)
    eval_every = int(config.federation.eval_every)
    for r in range(start, end):
        t0 = time.perf_counter()
        server, info = sim.round(server, privates, r, timer)
        mean_loss = float(
            np.average(list(info["train_loss"].values()), weights=list(info["tokens"].values()))
        )
        if not math.isfinite(mean_loss):
            raise train_lib.NonFiniteLossError(
                f"round {r}: silo train loss became {mean_loss} ({info['train_loss']}); the last round "
                f"checkpoint is intact; lower optim.lr or the outer lr"
            )
        comm = ledger.record_round(
            r, down=info["bytes_down"], up=info["bytes_up"], dp_equivalent=info["dp_equivalent_bytes"]
        )
        row = {
            "round": r,
            "train_loss": mean_loss,
            "tokens": sum(info["tokens"].values()),
            "silos": len(info["sampled"]),
            "bytes_up": comm["bytes_up"],
            "bytes_down": comm["bytes_down"],
            "dp_equivalent_bytes": comm["dp_equivalent_bytes"],
            **{k: v for k, v in info["aggregate"].items() if k.startswith("delta_")},
            **{f"time_{k}": v for k, v in timer.pop().items()},
        }
        if eval_every and (r + 1) % eval_every == 0 and r + 1 != sim.rounds:
            with timer.phase("eval"):
                ev = eval_lib.evaluate(sim.silo, server.params, sets)
            row["val_ppl"] = ev["pooled"]["ppl"]
            row["time_eval"] = timer.pop().get("eval", 0.0)
        row["time_round"] = time.perf_counter() - t0
        writer.write("rounds", r + 1, row)
        print(
            f"round {r + 1}/{sim.rounds}: silos {len(info['sampled'])} train loss {mean_loss:.3f}"
            + (f" val ppl {row['val_ppl']:.2f}" if "val_ppl" in row else "")
            + f" ({row['time_round']:.1f}s)",
            flush=True,
        )
        ckpt_every = int(config.federation.checkpoint_every)
        if (ckpt_every and (r + 1) % ckpt_every == 0) or r + 1 == end:
            ckpt.save(
                r + 1,
                {"server": server, "silos": _private_arrays(privates)},
                {"iterators": _iterator_states(privates), "ledger": ledger.rounds, "round": r + 1},
            )
    ckpt.wait()
    if end < sim.rounds:
        ckpt.close()
        writer.close()
        return {"stopped_at_round": end, "server": server}
    result = eval_lib.evaluate(sim.silo, server.params, sets)
    writer.write(
        "eval",
        sim.rounds,
        {
            "pooled_ppl": result["pooled"]["ppl"],
            **{f"ppl/{k}": v["ppl"] for k, v in result["per_silo"].items()},
        },
    )
    comm = ledger.totals()
    summary = {
        "config": config.name,
        "kind": "federated",
        "rounds": sim.rounds,
        "local_steps": sim.H,
        "silos": len(sim.names),
        "silos_per_round": int(config.federation.silos_per_round) or len(sim.names),
        "outer": config.federation.outer.name,
        "compression": config.federation.compression,
        "tokens": _total_tokens(workdir),
        "wall_time_s": time.time() - t_start,
        "params": model_lib.param_count(sim.silo.model_config),
        "val": result,
        "communication": comm,
    }
    train_lib.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    writer.close()
    ckpt.close()
    print(eval_lib.format_table(result))
    print(
        f"bytes moved: {monitor.human_bytes(comm['bytes_moved'])} "
        f"(data-parallel equivalent: {monitor.human_bytes(comm['dp_equivalent_bytes'])})"
    )
    print(f"traffic vs data-parallel: {comm['traffic_ratio_vs_dp']:.1f}x less")
    summary["server"] = server
    return summary


def _total_tokens(workdir: str) -> float:
    rows = monitor.read_jsonl(os.path.join(workdir, "metrics", "rounds.jsonl"))
    # one row per round; a resumed run may have re-run a round: keep the last of each
    last = {r["round"]: r["tokens"] for r in rows}
    return float(sum(last.values()))
