"""Cross-silo deployment: an aggregator process and silo processes that share only a store.

    python -m fedjax_lm aggregate --config experiments/photon.py:size=tiny --store runs/store --workdir runs/agg
    python -m fedjax_lm silo      --config experiments/photon.py:size=tiny --store runs/store --silo quotes-en

Round protocol (DESIGN.md): the aggregator publishes `global/r` with the round's sample of
silos and its deadline; each sampled silo restores it, trains H local steps with the same
`federation.client_round` as the one-process simulation, writes its compressed Δ and
commits; the aggregator closes the round when every sampled silo committed, or at the
deadline once `quorum` did, validates each update, streams the accepted ones leaf by leaf
into the token-weighted mean, applies the outer optimizer and publishes `global/r+1`.

Crash safety comes from ordering and determinism, not from live connections:
- a silo commits its update *before* saving its private state; after a crash between the
  two it recomputes round r from its previous state (same batches, same result) to rebuild
  the private state, and never uploads the round again (a committed update is final);
- the aggregator holds a lock, keeps nothing it cannot re-read, and re-closing a round
  after a crash reads the same committed updates and publishes the same `global/r+1`.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_lm import compression
from fedjax_lm import data as data_lib
from fedjax_lm import evaluate as eval_lib
from fedjax_lm import federation
from fedjax_lm import model as model_lib
from fedjax_lm import monitor
from fedjax_lm import outer
from fedjax_lm import sharding as sharding_lib
from fedjax_lm import store as store_lib
from fedjax_lm import train as train_lib


def _log(role: str, msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} {role}] {msg}", flush=True)


class Runtime:
    """What both roles build from the config: the silo runtime, the outer algorithm, templates."""

    def __init__(self, config: ml_collections.ConfigDict):
        fed = config.federation
        self.config, self.fed = config, fed
        self.H, self.rounds = int(fed.local_steps), int(fed.rounds)
        self.silo = train_lib.build_silo(config, total_steps=self.rounds * self.H)
        self.algo = federation.FederatedAlgorithm(fed.outer, fed.compression)
        self.client = jax.jit(self.silo._with_rules(federation.make_client_fn(self.silo, fed)))
        abstract = self.silo.abstract_params
        self.abstract_params = sharding_lib.with_shardings(abstract, self.silo.param_shardings)
        abstract_outer = jax.eval_shape(self.algo.tx.init, abstract)
        self.abstract_outer_opt = sharding_lib.with_shardings(
            abstract_outer,
            sharding_lib.optimizer_shardings(
                self.algo.tx, abstract_outer, self.silo.param_shardings, self.silo.mesh
            ),
        )
        self.abstract_payload = jax.eval_shape(
            lambda p: compression.compress(p, None, fed.compression, int(fed.block_size))[0], abstract
        )

    def initial_server(self) -> outer.OuterState:
        state = self.silo.init_state(jax.random.key(int(self.config.train.seed)))
        return self.algo.init(state.params)

    def read_server(self, store: store_lib.Store, r: int) -> tuple[outer.OuterState, dict[str, Any]]:
        params, opt_state, meta = store.read_global(r, self.abstract_params, self.abstract_outer_opt)
        return outer.OuterState(params=params, opt_state=opt_state, round=jnp.asarray(r, jnp.int32)), meta


def silo_names(config: ml_collections.ConfigDict) -> list[str]:
    """The federation's silos: `config.train.silos`, else the silos of the prepared corpus."""
    listed = list(config.train.get("silos", None) or [])
    return listed or list(data_lib.Corpus.load(config.data.corpus_dir).silos)


# ------------------------------------------------------------------------------ aggregator


class Deadlines:
    """Fixed, or adaptive: factor x the slowest silo of the recent rounds, at least min_deadline_s."""

    def __init__(self, dcfg: Mapping[str, Any]):
        self.cfg = dcfg
        self.recent: list[float] = []

    def observe(self, durations: Sequence[float]) -> None:
        if durations:
            self.recent = (self.recent + [max(durations)])[-3:]

    def next(self) -> float:
        if not self.cfg["adaptive_deadline"] or not self.recent:
            return float(self.cfg["deadline_s"])
        return max(
            float(self.cfg["min_deadline_s"]),
            float(self.cfg["deadline_factor"]) * statistics.median(self.recent),
        )


class Aggregator:
    def __init__(self, config: ml_collections.ConfigDict, store_root: str, workdir: str):
        self.config, self.workdir = config, workdir
        self.dcfg = config.federation.deploy
        self.store = store_lib.Store(store_root)
        self.rt = Runtime(config)
        self.names = silo_names(config)
        self.deadlines = Deadlines(self.dcfg)
        self.ledger = monitor.CommLedger()

    def _sample(self, r: int) -> list[str]:
        fed = self.config.federation
        return federation.sample_silos(self.names, int(fed.silos_per_round), int(fed.sample_seed), r)

    def _publish(self, r: int, server: outer.OuterState, extra: Mapping[str, Any]) -> None:
        meta = {
            "round": r,
            "sampled": self._sample(r),
            "published_at": time.time(),
            "deadline": time.time() + self.deadlines.next(),
            **extra,
        }
        if self.store.publish_global(r, server.params, server.opt_state, meta):
            _log(
                "aggregator",
                f"published global/{r}: silos {meta['sampled']}, deadline in "
                f"{meta['deadline'] - meta['published_at']:.0f}s",
            )

    def wait_for_round(self, r: int, meta: Mapping[str, Any]) -> list[str]:
        sampled = list(meta["sampled"])
        quorum = min(int(self.dcfg.quorum), len(sampled))
        warned = False
        while True:
            committed = self.store.committed_silos(r, sampled)
            if len(committed) == len(sampled):
                return committed
            now = time.time()
            if now >= meta["deadline"]:
                if len(committed) >= quorum:
                    late = sorted(set(sampled) - set(committed))
                    _log(
                        "aggregator",
                        f"round {r}: deadline passed; closing with {len(committed)}/{len(sampled)} "
                        f"silos, late: {late}",
                    )
                    return committed
                if not warned:
                    _log(
                        "aggregator",
                        f"round {r}: deadline passed with {len(committed)} < quorum {quorum}; waiting",
                    )
                    warned = True
            time.sleep(float(self.dcfg.poll_s))

    def _log_late_updates(self, r: int) -> list[str]:
        """Updates committed for round r-1 after it closed: ignored, and said so."""
        if r == 0:
            return []
        prev = self.store.read_global_meta(r)
        seen = set(prev.get("accepted", [])) | set(prev.get("rejected", {}))
        late = sorted(set(self.store.committed_silos(r - 1)) - seen)
        for silo in late:
            _log("aggregator", f"ignored late update of silo {silo} for closed round {r - 1}")
        return late

    def close_round(self, r: int, server: outer.OuterState, meta: Mapping[str, Any]):
        committed = self.wait_for_round(r, meta)
        late = self._log_late_updates(r)
        closed = set(range(r))
        manifests, rejected = {}, {}
        everything = self.store.committed_silos(r)  # includes silos that were not sampled
        for silo in sorted(set(everything) | set(committed)):
            try:
                manifests[silo] = self.store.validate_update(
                    r,
                    silo,
                    self.rt.abstract_payload,
                    expected_silos=meta["sampled"],
                    closed_rounds=closed,
                    current_round=r,
                    max_norm=float(self.dcfg.max_update_norm) or None,
                    like_params=self.rt.silo.abstract_params,
                )
            except store_lib.UpdateRejected as e:
                rejected[silo] = str(e)
                _log("aggregator", f"REJECTED {e}")
        weights = {s: float(m["tokens"]) for s, m in manifests.items()}
        if weights:
            mean = self.store.stream_weighted_mean(r, weights, server.params, manifests=manifests)
            mean = jax.device_put(mean, self.rt.silo.param_shardings)
            server, stats = self.rt.algo.step(server, mean)
        else:
            _log("aggregator", f"round {r}: no acceptable update; global params unchanged")
            server = outer.OuterState(server.params, server.opt_state, server.round + 1)
            stats = {}
        durations = [
            m["finished_at"] - meta["published_at"] for m in manifests.values() if "finished_at" in m
        ]
        self.deadlines.observe(durations)
        param_bytes = compression.raw_nbytes(self.rt.silo.abstract_params)
        comm = self.ledger.record_round(
            r,
            down={s: param_bytes for s in manifests},
            up={s: int(m["bytes"]) for s, m in manifests.items()},
            dp_equivalent=monitor.dp_allreduce_bytes(param_bytes, self.rt.H, len(manifests)),
        )
        row = {
            "round": r,
            "accepted": sorted(manifests),
            "rejected": rejected,
            "ignored_late": late,
            "tokens": sum(weights.values()),
            "train_loss": float(
                np.average([m["loss"] for m in manifests.values()], weights=list(weights.values()))
            )
            if weights
            else None,
            "bytes_up": comm["bytes_up"],
            "bytes_down": comm["bytes_down"],
            "dp_equivalent_bytes": comm["dp_equivalent_bytes"],
            **stats,
            "silo_seconds": {s: m.get("finished_at", 0) - meta["published_at"] for s, m in manifests.items()},
        }
        return server, row

    def run(self) -> dict[str, Any]:
        t0 = time.time()
        owner = {"role": "aggregator", "workdir": os.path.abspath(self.workdir)}
        with self.store.acquire_aggregator_lock(owner) as lock:
            os.makedirs(self.workdir, exist_ok=True)
            writer = monitor.MetricWriter(self.workdir)
            r = self.store.latest_global()
            if r is None:
                self.store.write_run(
                    {"config": json.loads(self.config.to_json_best_effort()), "silos": self.names}
                )
                self._publish(0, self.rt.initial_server(), {})
                r = 0
            else:
                _log("aggregator", f"resuming at round {r} of {self.rt.rounds}")
                for q in range(r):  # the ledger is rebuilt from what the store holds
                    m = self.store.read_global_meta(q + 1)
                    if "comm" in m:
                        self.ledger.rounds.append(m["comm"])
            while r < self.rt.rounds:
                server, meta = self.rt.read_server(self.store, r)
                t_round = time.perf_counter()
                server, row = self.close_round(r, server, meta)
                lock.refresh()
                row["time_aggregate"] = time.perf_counter() - t_round
                writer.write("rounds", r + 1, row)
                _log(
                    "aggregator",
                    f"round {r + 1}/{self.rt.rounds}: accepted {row['accepted']} "
                    f"rejected {sorted(row['rejected'])} loss {row['train_loss']}",
                )
                pause = float(os.environ.get("FEDJAX_PAUSE_BEFORE_PUBLISH_S", "0"))  # fault-injection window
                if pause:
                    _log("aggregator", f"pausing before publishing global/{r + 1} for {pause}s")
                    time.sleep(pause)
                self._publish(
                    r + 1,
                    server,
                    {
                        "closed": r,
                        "accepted": row["accepted"],
                        "rejected": row["rejected"],
                        "comm": self.ledger.rounds[-1],
                    },
                )
                r += 1
            server, _ = self.rt.read_server(self.store, self.rt.rounds)
            summary = {
                "config": self.config.name,
                "kind": "federated-deployment",
                "rounds": self.rt.rounds,
                "store": self.store.root,
                "wall_time_s": time.time() - t0,
                "params": model_lib.param_count(self.rt.silo.model_config),
                "communication": self.ledger.totals(),
            }
            try:
                corpus = data_lib.Corpus.load(self.config.data.corpus_dir)
                sets = eval_lib.eval_sets(
                    corpus,
                    train_lib.active_silos(self.config, corpus),
                    seq_len=int(self.config.train.seq_len),
                    batch_size=int(self.config.train.batch_size),
                    max_batches=int(self.config.train.eval_batches),
                )
                summary["val"] = eval_lib.evaluate(self.rt.silo, server.params, sets)
                print(eval_lib.format_table(summary["val"]))
            except FileNotFoundError:
                _log("aggregator", "no validation corpus here; skipping the final evaluation")
            comm = summary["communication"]
            print(f"traffic vs data-parallel: {comm['traffic_ratio_vs_dp']:.1f}x less")
            train_lib.write_json_atomic(os.path.join(self.workdir, "summary.json"), summary)
            writer.close()
        summary["server"] = server
        return summary


# ------------------------------------------------------------------------------ silo


class SiloWorker:
    def __init__(self, config: ml_collections.ConfigDict, store_root: str, name: str):
        self.config, self.name = config, name
        self.store = store_lib.Store(store_root)
        corpus = train_lib.ensure_corpus(config.data)
        train_lib.check_vocab(config, corpus)
        corpus.check_silos([name])
        self.corpus = corpus
        self.rt = Runtime(config)
        self.iterator = federation.silo_iterator(corpus, name, config)
        self.keep = config.federation.inner_state == "keep"
        self.feedback = bool(config.federation.error_feedback)

    def _private_arrays(self, out) -> dict[str, Any]:
        arrays = {}
        if self.keep:
            arrays["opt_state"] = out.opt_state
        if self.feedback:
            arrays["error"] = out.error
        return arrays

    def _abstract_private(self):
        sh = self.rt.silo
        abstract = {}
        if self.keep:
            abstract["opt_state"] = sh.abstract_state_with_shardings().opt_state
        if self.feedback:
            abstract["error"] = self.rt.abstract_params
        return abstract

    def _load_private(self, params0) -> tuple[dict[str, Any], int]:
        """(private arrays, last round trained); a fresh state before the first round."""
        last = self.store.latest_silo_state(self.name)
        if last is None:
            arrays = {
                "opt_state": self.rt.silo.fresh_opt_state(params0) if self.keep else None,
                "error": compression.init_error(params0) if self.feedback else None,
            }
            return arrays, -1
        arrays, meta = self.store.restore_silo_state(self.name, last, self._abstract_private())
        self.iterator.set_state(meta["data_iterator"])
        arrays = {"opt_state": arrays.get("opt_state"), "error": arrays.get("error")}
        return arrays, int(meta["round"])

    def train_round(self, r: int, private: dict[str, Any]):
        server, meta = self.rt.read_server(self.store, r)
        batches = self.rt.silo.put_batch(federation.next_batches(self.iterator, self.rt.H), ndim=3)
        t = time.perf_counter()
        with jax.set_mesh(self.rt.silo.mesh):
            out = self.rt.client(
                server.params,
                private["opt_state"],
                private["error"],
                jnp.asarray(r * self.rt.H, jnp.int32),
                batches,
            )
        loss = float(np.asarray(out.metrics["loss"]).mean())
        return out, loss, float(np.asarray(out.metrics["tokens"]).sum()), time.perf_counter() - t

    def run(self, max_rounds: int | None = None) -> int:
        """Takes part until the last round; returns the number of updates it uploaded."""
        uploads = 0
        params0 = None
        while True:
            r = self.store.latest_global()
            if r is None:
                time.sleep(float(self.config.federation.deploy.poll_s))
                continue
            if r >= self.rt.rounds:
                _log(self.name, f"federation finished at round {r}")
                return uploads
            meta = self.store.read_global_meta(r)
            if params0 is None:
                params0, _, _ = self.store.read_global(0, self.rt.abstract_params, self.rt.abstract_outer_opt)
            private, last = self._load_private(params0)
            if self.name not in meta["sampled"] or last >= r:
                self.store.wait_for_global(
                    r + 1, timeout_s=10 * 24 * 3600, poll_s=float(self.config.federation.deploy.poll_s)
                )
                continue
            committed = self.store.is_committed(r, self.name)
            out, loss, tokens, secs = self.train_round(r, private)
            if not committed:
                if np.isfinite(loss):
                    self.store.write_update(
                        r,
                        self.name,
                        out.payload,
                        {  # each host writes its own shards
                            "round": r,
                            "silo": self.name,
                            "tokens": tokens,
                            "loss": loss,
                            "train_seconds": secs,
                            "method": self.config.federation.compression,
                            "finished_at": time.time(),
                            "flops": tokens
                            * model_lib.flops_per_token(
                                self.rt.silo.model_config, int(self.config.train.seq_len)
                            ),
                        },
                    )
                    uploads += 1
                    _log(
                        self.name, f"round {r}: uploaded (loss {loss:.3f}, {tokens:.0f} tokens, {secs:.1f}s)"
                    )
                else:
                    _log(self.name, f"round {r}: local loss {loss}; not uploading")
            else:
                _log(
                    self.name, f"round {r}: already committed before a restart; rebuilding private state only"
                )
            self.store.save_silo_state(
                self.name,
                r,
                self._private_arrays(out),
                {"round": r, "data_iterator": self.iterator.get_state()},
            )
            if max_rounds is not None and uploads >= max_rounds:
                return uploads
