"""The one-process driver: every silo and the aggregator of a `Federation` in one process.

    python -m fedjax_lm train --config experiments/photon.py:size=tiny,silos=8 --workdir runs/photon

Its loop: sample the round's silos, train each from the global params (one after another,
or all at once as one vmapped program with `federation.parallel`), check each update,
aggregate the accepted ones by `federation.aggregation` and apply the outer step
(`Federation.aggregate`), write the round's row, checkpoint. Everything a round *is* lives in
`federation`; the multi-process deployment (`deploy`) runs the same pieces over a store and
ends bit-identical, for every aggregation rule.

Each round's row (metrics/rounds.jsonl) also says how the silos' pseudo-gradients relate:
`update_norm/<silo>`, the pairwise cosines, the norm of the mean vs the mean of the norms
(`Federation.update_diagnostics`, from the K x K Gram matrix of the decoded uploads).

Memory: the round's K compressed payloads are held until the round is aggregated (they are
checked first). The token-weighted mean then folds them into one f32 model; the median and the
trimmed mean (`robust`) reduce all K of them leaf by leaf, so they stay held until the last leaf.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_lm import checkpoint as ckpt_lib
from fedjax_lm import config as config_lib
from fedjax_lm import dp_round
from fedjax_lm import energy
from fedjax_lm import evaluate as eval_lib
from fedjax_lm import federation as fed_lib
from fedjax_lm import model as model_lib
from fedjax_lm import monitor
from fedjax_lm import outer
from fedjax_lm.compliance import gate as compliance_gate
from fedjax_lm import runs
from fedjax_lm import secagg
from fedjax_lm import secure
from fedjax_lm import tree_round
from fedjax_lm.data import select
from fedjax_lm.node import node_round


@dataclasses.dataclass
class SiloPrivate:
    """What a silo keeps to itself between rounds (in deployment: its own Orbax checkpoint)."""

    arrays: dict[str, Any]  # {"opt_state": ..., "error": ...} (None when not kept)
    iterator: Any  # grain iterator with get_state / set_state


class Simulation:
    """N silos and one aggregator in one process, over one `Federation`."""

    def __init__(self, config: ml_collections.ConfigDict, corpus, mesh: Mesh | None = None, progress=True):
        self.fed = fed_lib.Federation(config, select.active_silos(config, corpus), mesh=mesh)
        self.config, self.corpus, self.progress = config, corpus, progress
        self._jit_par = None
        self.noise_secret: bytes | None = None  # DP: the noise adders' secret (runs.noise_secret)
        self.clip_norm = self.fed.dp_round.initial_clip  # DP: this round's C (adaptive clipping moves it)
        # Compressed download (fedjax_lm/download.py): the copy silos train from, and the round whose copy
        # each silo holds (what its next download costs).
        self.broadcast = None
        self.held: dict[str, int] = {}
        self.excluded: Mapping[str, Any] = {}  # silo -> why the compliance gate keeps it out
        self.meter = energy.Meter(config.federation.compliance.energy)
        self.lifecycle: dict[str, Any] = {}  # the last round's per-silo seconds and energy (round_row extra)
        # The tree of federations (fedjax_lm/tree.py): the sub-federations below the root, key layers.
        self.subtree = tree_round.Subtree(self.fed)
        self.tree = self.fed.tree

    def init(self, seed: int) -> tuple[outer.OuterState, dict[str, SiloPrivate]]:
        server = self.fed.init_server(seed)
        if self.fed.downloads.on:
            self.broadcast = server.params
        privates = {
            n: SiloPrivate(
                self.fed.fresh_private(server.params), select.silo_iterator(self.corpus, n, self.config)
            )
            for n in self.tree.silos
        }
        if self.subtree.personal:  # FedPer: each silo's own key layers, from the same init
            for p in privates.values():
                p.arrays["keys"] = self.subtree.keys_list(server.params)
        self.subtree.init(server.params)
        return server, privates

    def personalised(self, server_params, privates) -> dict[str, Any]:
        return self.subtree.personalised(server_params, privates)

    def _train_node(self, name: str, anchor, privates, r: int):
        """A federation below the root as one participant of its parent: from the params its parent sent
        (`anchor`), `tree.local_rounds` rounds of its own children, then its upload anchor − θ_node."""
        f, sub = self.fed, self.subtree
        node = sub.nodes[name]
        state = outer.OuterState(sub.node_start(name, anchor), node.state.opt_state, node.state.round)
        tokens, losses = 0.0, []
        for j in range(self.tree.local_rounds):
            rr = r * self.tree.local_rounds + j  # the round its silos count (their schedule's)
            children = [c for c in self.tree.nodes[name].children if c not in self.excluded]
            outs = self.run_clients(state.params, privates, children, rr)
            accepted, rejected, norms = self._check(children, outs, rr)
            weights = {c: a["tokens"] for c, a in accepted.items()}
            clipped = 0
            if accepted:
                sent = state.params
                # its aggregator's weights: tokens, or under DP (a federation of silos) clipped, fixed D
                node_fed = sub.fed_of(name)
                mean_weights, factor, clipped = node_fed.server_weights(weights, norms)
                result = node_round(
                    sub.algo,
                    state,
                    ((outs[c].payload, mean_weights[c]) for c in accepted),
                    finish=lambda mean, factor=factor, rr=rr: node_fed.finish_aggregate(
                        mean, factor, rr, self.noise_secret
                    ),
                )
                state = sub.key_step(
                    name, sent, result.state, outs, accepted, weights, norms, rr, self.noise_secret
                )
            self._advance(privates, outs, children)
            sub.record_inner(name, rr, accepted, rejected, clipped)
            tokens += sum(weights.values())
            losses += [(a["loss"], a["tokens"]) for a in accepted.values()]
        payload, error = f.final(
            sub.up_anchor(anchor, state.params), jax.tree.map(jnp.copy, state.params), node.error
        )
        sub.nodes[name] = tree_round.NodeState(state, error)
        loss = (
            float(np.average([x for x, _ in losses], weights=[w for _, w in losses])) if losses else math.nan
        )
        return fed_lib.ClientOutput(
            payload=payload,
            error=error,
            opt_state=None,
            metrics={"tokens": np.asarray([tokens]), "loss": np.asarray([loss])},
        )

    def _check(self, names, outs, r: int):
        """(accepted {name: tokens, loss}, rejected {name: why}, update norms) of a round's uploads."""
        f = self.fed
        accepted, rejected, norms = {}, {}, {}
        for n in names:
            o = outs[n]
            reason, norms[n] = f.check_update(o.payload)
            tokens = f.weight(np.asarray(o.metrics["tokens"]).sum(), n)
            if reason is None and not tokens > 0:
                reason = "no silo of this federation trained"
            if reason is not None:
                rejected[n] = reason
                continue
            accepted[n] = {"tokens": tokens, "loss": float(np.asarray(o.metrics["loss"]).mean())}
        rejected.update(f.outlier_norms({n: norms[n] for n in accepted}))
        for n, reason in rejected.items():
            accepted.pop(n, None)
            print(f"[fedjax_lm] round {r}: REJECTED {n}: {reason}", flush=True)
        return accepted, rejected, norms

    # -- one round -----------------------------------------------------------------------------
    def run_clients(self, params, privates: Mapping[str, SiloPrivate], sampled: Sequence[str], r: int):
        """The sampled silos' rounds from `params` (the global, or its broadcast copy)."""
        batches = {n: select.next_batches(privates[n].iterator, self.fed.H) for n in sampled if n in privates}
        if self.fed.fed.parallel:
            t0 = time.perf_counter()
            with self.meter.measure() as used:
                outs = jax.block_until_ready(self._run_parallel(params, privates, sampled, r, batches))
            # one program trains them all: its time and energy are shared by tokens (equal here)
            self.lifecycle = _lifecycle({n: (time.perf_counter() - t0, used) for n in sampled}, len(sampled))
            return outs
        outs, measured = {}, {}
        for n in sampled:
            t0 = time.perf_counter()
            if (
                n in self.subtree.nodes
            ):  # a federation of the tree: its own rounds (its silos are measured there)
                outs[n] = self._train_node(n, params, privates, r)
                measured[n] = (time.perf_counter() - t0, {})
                continue
            with self.meter.measure() as used:
                outs[n] = jax.block_until_ready(
                    self.fed.train_silo(
                        self.subtree.silo_start(n, params, privates),
                        privates[n].arrays,
                        batches[n],
                        r,
                        monitor.round_progress(n, r + 1, self.fed.H, self.fed.batch_size * self.fed.seq_len)
                        if self.progress
                        else None,
                        personal=self.subtree.personal,
                    )
                )
            measured[n] = (time.perf_counter() - t0, used)
        self.lifecycle = _lifecycle(measured, 1)
        return outs

    def _run_parallel(self, params, privates, sampled, r, batches) -> dict[str, fed_lib.ClientOutput]:
        """The K sampled silos as one vmapped `client_round` over a leading silo axis."""
        f, s = self.fed, self.fed.silo
        devices = jax.devices()
        n_dev = math.gcd(len(sampled), len(devices))
        silo_mesh = jax.make_mesh(
            (n_dev,), ("silo",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n_dev]
        )
        lead, rep = NamedSharding(silo_mesh, P("silo")), NamedSharding(silo_mesh, P())

        def stack(trees):
            if trees[0] is None:
                return None
            return jax.tree.map(
                lambda *xs: jax.device_put(np.stack([np.asarray(x) for x in xs]), lead), *trees
            )

        opt = stack([privates[n].arrays["opt_state"] for n in sampled])
        err = stack([privates[n].arrays["error"] for n in sampled])
        bat = {
            k: jax.device_put(np.stack([batches[n][k] for n in sampled]), lead) for k in batches[sampled[0]]
        }
        params = jax.device_put(jax.device_get(params), rep)
        if self._jit_par is None:
            client = f.client_round_fn()
            in_axes = (None, 0 if opt is not None else None, 0 if err is not None else None, None, 0)
            self._jit_par = jax.jit(jax.vmap(client, in_axes=in_axes), out_shardings=lead)
        out = jax.device_get(self._jit_par(params, opt, err, f.step0(r), bat))
        result = {}
        for i, name in enumerate(sampled):  # back to each silo's own layout, as the sequential path
            one = jax.tree.map(lambda x: x[i], out)
            result[name] = fed_lib.ClientOutput(
                payload=one.payload,
                error=None if one.error is None else jax.device_put(one.error, s.param_shardings),
                opt_state=None if one.opt_state is None else jax.device_put(one.opt_state, s.opt_shardings),
                metrics=one.metrics,
            )
        return result

    def round(self, server, privates, r: int, timer: monitor.PhaseTimer, ledger: monitor.CommLedger):
        f = self.fed
        sampled = [n for n in f.sample(r) if n not in self.excluded]  # the compliance gate's decision
        with timer.phase("local_train"):
            start = server.params if self.broadcast is None else self.broadcast
            outs = self.run_clients(start, privates, sampled, r)
            jax.block_until_ready(outs)
        if f.secure is not None:
            return self._secure_round(server, privates, outs, sampled, r, timer, ledger)
        accepted, rejected, norms = self._check(sampled, outs, r)
        clip = self.clip_norm
        weights, factor, clipped = f.server_weights(
            {n: a["tokens"] for n, a in accepted.items()}, {n: norms[n] for n in accepted}, clip
        )
        with timer.phase("aggregate"):
            if accepted:
                server, diag = f.aggregate(
                    server,
                    ((outs[n].payload, weights[n]) for n in accepted),
                    finish=lambda mean: f.finish_aggregate(mean, factor, r, self.noise_secret, clip),
                )
                server = self.subtree.key_step(
                    "root", start, server, outs, accepted, weights, norms, r, self.noise_secret, clip
                )
            else:
                server, diag = outer.OuterState(server.params, server.opt_state, server.round + 1), {}
            jax.block_until_ready(server)
        with timer.phase("diagnostics"):  # read-only on the payloads: the aggregate is already made
            geometry = f.update_diagnostics({n: (outs[n].payload, accepted[n]["tokens"]) for n in accepted})
        self._advance(privates, outs, sampled)
        self.clip_norm = f.dp_round.next_clip(clip, {n: norms[n] for n in accepted}, r, self.noise_secret)
        down = self._advance_download(server, accepted, sampled, r)
        if f.fed.aggregate_inner_moments and accepted:
            shared = f.shared_moments((outs[n].opt_state, accepted[n]["tokens"]) for n in accepted)
            for p in privates.values():
                p.arrays["opt_state"] = shared
        return server, f.round_row(
            r,
            accepted,
            ledger,
            diag,
            rejected=rejected,
            update_norms=norms,
            **geometry,
            **f.privacy_fields(r + 1, clipped, clip),
            **self.lifecycle,
            **self.subtree.row_fields(r, accepted, ledger),
            down_bytes=down,
            up_bytes={n: self.subtree.up_bytes(n) for n in accepted},
            workers=sum(len(self._trained_silos(n)) for n in accepted),
        )

    def _trained_silos(self, name: str) -> list[str]:
        return [s for s in self.tree.silos_under(name) if s not in self.excluded]

    def _advance_download(self, server, accepted, sampled, r: int) -> dict[str, int]:
        """What the accepted silos downloaded this round (as a deployment counts it); then the broadcast
        copy of the next round (compressed download) and the round whose copy each sampled silo holds."""
        f = self.fed
        down = f.downloads.costs(self.held, accepted, r)
        if self.subtree.keyed:  # the tree's participants do not download key layers they keep
            down = {n: self.subtree.down_bytes(n, r) for n in down}
        self.held.update({n: r for n in sampled})
        if self.broadcast is not None:
            _, self.broadcast = f.downloads.next_broadcast(self.broadcast, server.params)
        return down

    def _advance(self, privates, outs, sampled) -> None:
        for n in sampled:  # a silo's private state advances whether or not its update was accepted
            if n not in privates:  # a federation of the tree: its state moved in _train_node
                continue
            arrays = self.fed.next_private(privates[n].arrays, outs[n])
            if outs[n].keys is not None:  # FedPer: the silo's own key layers
                arrays["keys"] = outs[n].keys
            privates[n].arrays = arrays

    def _secure_round(self, server, privates, outs, sampled, r, timer, ledger):
        """The round under secure aggregation: each silo's contribution (`SecureSum.contribution`)
        goes through the whole protocol in memory (`secagg.simulate_round`: keys, Shamir shares, masks,
        unmasking) and the aggregating side uses only the decoded sum, as the deployment does. A silo
        whose update is not finite (no DP clipping to zero it) does not send it: a dropout."""
        f, sec = self.fed, self.fed.secure
        contributions, dropped, clipped = {}, [], 0
        for n in sampled:
            x, norm = sec.contribution(outs[n].payload, r, n, self.noise_secret)
            contributions[n] = jax.device_get(x)
            if not math.isfinite(norm) and not f.dp_on:
                dropped.append(n)
            clipped += int(f.dp_on and norm > sec.clip_norm)
        with timer.phase("aggregate"):
            k = len(sampled)
            result = secagg.simulate_round(
                contributions,
                threshold=sec.threshold(k),
                fixed_point=sec.fixed_point(k),
                dropped=dropped,
                run_id="simulation",
                round_idx=r,
            )
            total = jax.device_put(result.sum, f.silo.param_shardings)
            mean = f.finish_aggregate(total, sec.mean_factor(len(result.survivors)), r, self.noise_secret)
            server, diag = f.step(server, mean)
            jax.block_until_ready(server)
        self._advance(privates, outs, sampled)
        accepted = {
            n: {
                "tokens": f.weight(np.asarray(outs[n].metrics["tokens"]).sum(), n),
                "loss": float(np.asarray(outs[n].metrics["loss"]).mean()),
            }
            for n in result.survivors
        }
        down = self._advance_download(server, accepted, sampled, r)
        return server, f.round_row(
            r,
            accepted,
            ledger,
            diag,
            rejected={n: "update not finite: not sent (secure aggregation dropout)" for n in dropped},
            **secure.row_fields(result.survivors, result.dropped, sum(result.saturated.values())),
            **f.privacy_fields(r + 1, clipped),
            **self.lifecycle,
            down_bytes=down,
        )


def _lifecycle(measured: Mapping[str, tuple[float, Mapping[str, Any]]], share: int) -> dict[str, Any]:
    """`energy.round_fields` of the silos' measured (seconds, energy); with `share` > 1 every silo holds
    the same measurement of one program that trained them all, split evenly."""
    used = {
        n: {
            "energy_kwh": u["energy_kwh"] / share,
            "co2_kg": None if u["co2_kg"] is None else u["co2_kg"] / share,
        }
        for n, (_, u) in measured.items()
        if u
    }
    source = next((u["energy_source"] for _, u in measured.values() if u), "")
    return energy.round_fields({n: t / share for n, (t, _) in measured.items()}, used, source)


def _checkpoint_items(server, privates, broadcast=None, sim: Simulation | None = None) -> dict[str, Any]:
    items = {
        "params": server.params,
        "outer": {"opt_state": server.opt_state, "round": server.round},
        "silos": {n: p.arrays for n, p in privates.items()},
    }
    if broadcast is not None:
        items["broadcast"] = broadcast
    if sim is not None:  # the tree's federations below the root
        items.update(sim.subtree.checkpoint_items())
    return items


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_after_round: int | None = None,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """One-process federated pre-training; resumes from the last round checkpoint in workdir."""
    t_start = time.time()
    config_lib.validate(config)
    runs.open_workdir(workdir, config, "federated", allow_config_change=allow_config_change)
    corpus = select.ensure_corpus(config.data)
    select.check_vocab(config, corpus)
    sim = Simulation(config, corpus)
    f = sim.fed
    server, privates = sim.init(int(config.train.seed))
    ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=int(config.train.keep_checkpoints)
    )
    ledger = monitor.CommLedger()
    start = ckpt.latest_step() or 0
    if start:
        items, meta = ckpt.restore(
            start, jax.tree.map(_abstract, _checkpoint_items(server, privates, sim.broadcast, sim))
        )
        sim.broadcast = items.get("broadcast")
        sim.subtree.restore(items)
        sim.held = dict(meta.get("held", {}))
        server = outer.OuterState(items["params"], items["outer"]["opt_state"], items["outer"]["round"])
        for n, p in privates.items():
            p.arrays = items["silos"][n]
            p.iterator.set_state(meta["iterators"][n])
        ledger.rounds = meta["ledger"]
        sim.clip_norm = dp_round.clip_of(meta, sim.clip_norm)
        print(f"[fedjax_lm] resumed after round {start} in {workdir}", flush=True)
    writer = monitor.MetricWriter(workdir, enabled=jax.process_index() == 0)
    writer.truncate("rounds", keep_below=start)  # rows of rounds a crash left half-done
    sets = eval_lib.eval_sets(
        corpus,
        select.active_silos(config, corpus),  # the corpus's order, as in the centralized run
        seq_len=f.seq_len,
        batch_size=f.batch_size,
        max_batches=int(config.train.eval_batches),
    )
    timer = monitor.PhaseTimer()
    last = f.rounds_allowed()  # federation.rounds, or fewer under a DP budget
    if last < f.rounds:
        print(
            f"[fedjax_lm] the privacy budget ε={float(config.federation.dp.epsilon_budget):g} allows "
            f"{last} of {f.rounds} rounds: the run ends after round {last}",
            flush=True,
        )
    sim.noise_secret = runs.noise_secret(workdir) if f.dp_on else None
    end = last if stop_after_round is None else min(last, stop_after_round)
    eval_every, ckpt_every = int(config.federation.eval_every), int(config.federation.checkpoint_every)
    gate = compliance_gate.Gate(config.federation.compliance, workdir, f.tree.silos)
    flops_done = sum(row.get("flops", 0) for row in monitor.rows_by_round(workdir, "rounds").values())
    for r in range(start, end):
        t0 = time.perf_counter()
        if gate.on:  # before the round's first step: the first round, and whenever a card changed
            cards = compliance_gate.local_data_cards(gate.folder, f.tree.silos, config.data.corpus_dir)
            sim.excluded = gate.check(r, cards, measured_flop=flops_done, projected_flop=f.projected_flop())
        server, row = sim.round(server, privates, r, timer, ledger)
        flops_done += row["flops"]
        if gate.on:
            row["excluded"] = sorted(sim.excluded)
        if row["train_loss"] is not None and not math.isfinite(row["train_loss"]):
            raise runs.NonFiniteLossError(
                f"round {r}: silo train loss became {row['train_loss']}; the last round checkpoint is "
                f"intact; lower optim.lr or the outer lr"
            )
        row.update({f"time_{k}": v for k, v in timer.pop().items()})
        if eval_every and (r + 1) % eval_every == 0 and r + 1 != f.rounds:
            with timer.phase("eval"):
                row["val_ppl"] = eval_lib.evaluate(
                    f.silo, server.params, sets, sim.personalised(server.params, privates)
                )["pooled"]["ppl"]
            row["time_eval"] = timer.pop().get("eval", 0.0)
        row["time_round"] = time.perf_counter() - t0
        writer.write("rounds", r + 1, row)
        loss = "n/a" if row["train_loss"] is None else f"{row['train_loss']:.3f}"
        print(
            f"round {r + 1}/{f.rounds}: silos {row['silos']} train loss {loss}"
            + (f" val ppl {row['val_ppl']:.2f}" if "val_ppl" in row else "")
            + f" ({row['time_round']:.1f}s)",
            flush=True,
        )
        if (ckpt_every and (r + 1) % ckpt_every == 0) or r + 1 == end:
            meta = {
                "iterators": {n: p.iterator.get_state() for n, p in privates.items()},
                "ledger": ledger.rounds,
                "dp_clip_norm": sim.clip_norm,  # the next round's C (adaptive clipping)
                "held": sim.held,  # compressed download: the round whose copy each silo holds
                "round": r + 1,
            }
            ckpt.save(r + 1, _checkpoint_items(server, privates, sim.broadcast, sim), meta)
    ckpt.close()
    sim.meter.close()
    if end < last:
        writer.close()
        return {"stopped_at_round": end, "server": server}
    result = eval_lib.evaluate(f.silo, server.params, sets, sim.personalised(server.params, privates))
    writer.write("eval", last, eval_lib.scalars(result))
    writer.close()
    comm = ledger.totals()
    summary = {
        "config": config.name,
        "kind": "federated",
        "rounds": f.rounds,
        "local_steps": f.H,
        "silos": len(f.tree.silos),
        "silos_per_round": int(config.federation.silos_per_round) or len(f.names),
        "tree": {
            "spec": str(config.federation.tree.spec),
            "depth": f.tree.depth(),
            "key_layers": list(config.federation.tree.key_layers),
            "key_owner": sim.subtree.owner if sim.subtree.keyed else None,
        },
        "outer": config.federation.outer.name,
        "aggregation": config.federation.aggregation,
        "compression": config.federation.compression,
        "tokens": sum(r["tokens"] for r in monitor.rows_by_round(workdir, "rounds").values()),
        "wall_time_s": time.time() - t_start,
        "params": model_lib.param_count(f.silo.model_config),
        "val": result,
        "communication": comm,
    }
    rows = monitor.rows_by_round(workdir, "rounds")
    summary["flops"] = sum(float(row.get("flops", 0) or 0) for row in rows.values())
    summary["energy"] = energy.totals(rows)
    if sim.subtree.keyed:  # `val` is each silo with its own key layers; this is the global model's
        summary["val_global"] = eval_lib.evaluate(f.silo, server.params, sets)
    if f.dp_on:
        summary["privacy"] = f.privacy_summary(last, sim.clip_norm)
    runs.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    print(eval_lib.format_table(result))
    print(
        f"bytes moved: {monitor.human_bytes(comm['bytes_moved'])} "
        f"(data-parallel equivalent: {monitor.human_bytes(comm['dp_equivalent_bytes'])})"
    )
    print(f"traffic vs data-parallel: {comm['traffic_ratio_vs_dp']:.1f}x less")
    if gate.on:  # the provider's documents, from what this run measured (compliance/documents.py)
        from fedjax_lm.compliance import documents

        documents.write_reports(workdir)
        print(f"compliance: {workdir}/compliance/report.md; documents in {workdir}/reports/")
    summary["server"] = server
    return summary


def _abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
