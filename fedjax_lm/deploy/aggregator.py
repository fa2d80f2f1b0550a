"""The aggregator process: publishes global/r, closes each round at its deadline, steps the outer optimizer."""

from __future__ import annotations

import os
import secrets
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from fedjax_lm import config as config_lib
from fedjax_lm import data as data_lib
from fedjax_lm import dp_round
from fedjax_lm import energy
from fedjax_lm import evaluate as eval_lib
from fedjax_lm import federation as fed_lib
from fedjax_lm import identity
from fedjax_lm import model as model_lib
from fedjax_lm import monitor
from fedjax_lm import outer
from fedjax_lm import runs
from fedjax_lm import secagg
from fedjax_lm import secure
from fedjax_lm import store as store_lib
from fedjax_lm.data import select
from fedjax_lm.deploy.common import (
    GlobalRejected,
    check_deployable,
    check_store_run,
    global_meta,
    load_trust,
    log,
    read_server,
    shared_config,
    silo_names,
)
from fedjax_lm.compliance import gate as gate_lib
from fedjax_lm.deploy import cards as card_lib
from fedjax_lm.deploy import downloads
from fedjax_lm.deploy import tree_keys
from fedjax_lm.deploy.secure_protocol import AggregatorProtocol

MAX_STRANGERS_LOGGED = 16  # updates under names that are not members: reported by name up to this many


def _reported_lifecycle(manifests: Mapping[str, Any]) -> dict[str, Any]:
    """`energy.round_fields` of the validated silos' self-reported training seconds and energy; the energy
    source as the silos named it (printable, at most 80 characters)."""
    seconds = {s: m["train_seconds"] for s, m in manifests.items() if "train_seconds" in m}
    used = {s: m for s, m in manifests.items() if "energy_kwh" in m}
    sources = sorted(
        {
            "".join(ch for ch in str(m.get("energy_source", "unstated"))[:80] if ch.isprintable())
            for m in used.values()
        }
    )
    return energy.round_fields(seconds, used, "reported by the silos: " + "; ".join(sources))


class Deadlines:
    """Fixed, or adaptive: factor x the slowest silo of the recent rounds, at least min_deadline_s."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = cfg
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
    def __init__(
        self,
        config: ml_collections.ConfigDict,
        store_root: str,
        workdir: str,
        *,
        allow_config_change=False,
        node: str = "root",
    ):
        self.node = node  # its name in a tree of federations (the attention weights it logs)
        config_lib.validate(config)
        check_deployable(config)
        self.config, self.workdir, self.allow = config, workdir, allow_config_change
        self.deploy = config.federation.deploy
        self.store = store_lib.Store(store_root)
        names = silo_names(config)
        if identity.AGGREGATOR in names:
            raise ValueError(f"no silo may be named {identity.AGGREGATOR!r}: the allow-list reserves it")
        self.trust = load_trust(config, identity.AGGREGATOR)
        self.fed = fed_lib.Federation(config, names)  # its members: silos, or a tree's sub-federations
        self.fed.node = node  # whose DP noise it draws
        self.children_keys: dict[str, list] = {}  # residual embeddings: the last closed round's k_c
        if self.trust.signed:
            self.trust.allow.require(self.fed.names)
        self._checked_commits: dict[
            tuple[int, str], tuple[bytes | None, str | None]
        ] = {}  # marker -> problem
        self.deadlines = Deadlines(self.deploy)
        self._samples: dict[int, list[str]] = {}  # round -> its signed sample (prices download claims)
        self.gate = gate_lib.Gate(
            config.federation.compliance, workdir, self.fed.names, log=lambda m: log("aggregator", m)
        )
        self.lock = None  # held while run() runs
        self.ledger = monitor.CommLedger()

    def residual_items(
        self, extra: Mapping[str, Any], items: Mapping[str, Any] | None
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(meta, items) of the next global with the last closed round's `children_keys` (residual
        embeddings: its sub-federations' key layers, from which each computes its own e_c), signed by hash."""
        if not self.children_keys:
            return dict(extra), items
        keys = {c: list(k) for c, k in self.children_keys.items()}
        meta = {
            **extra,
            "children_keys_of": sorted(keys),
            "children_keys_sha256": identity.tree_sha256(keys),
        }
        return meta, {**(items or {}), "children_keys": keys}

    def publish(
        self, r: int, server: outer.OuterState, extra: Mapping[str, Any], lock=None, items=None
    ) -> None:
        """Publishes global/r (with the checkpoint `items` besides params and opt_state) create-exclusive,
        if this aggregator still holds the lock."""
        if lock is not None:
            lock.check()  # the heartbeat found the lock taken over: stop before writing anything
        now = time.time()
        meta = {
            "round": r,
            "sampled": [s for s in self.fed.sample(r) if s not in self.gate.excluded],
            "published_at": now,
            "deadline": now + self.deadlines.next(),
            # What silos train from and updates are bound to; signed with the rest of the meta.
            "params_sha256": identity.tree_sha256(server.params),
            "opt_state_sha256": identity.tree_sha256(server.opt_state),
        }
        full = {**meta, **extra}
        if self.trust.signer is not None:
            full = identity.sign_meta(self.trust.signer, full)
        if not self.store.publish_global(r, server.params, server.opt_state, full, items):
            try:
                global_meta(self.store, r, self.trust)
            except GlobalRejected as e:
                raise GlobalRejected(f"cannot publish global/{r}: {e}") from None
            raise store_lib.LockLost(
                f"global/{r} was published by another process while this aggregator held the lock: stopping"
            )
        log(
            "aggregator",
            f"published global/{r}: silos {meta['sampled']}, deadline in {meta['deadline'] - now:.0f}s",
        )

    def wait_for_round(
        self, r: int, meta: Mapping[str, Any], expected: list[str] | None = None, quorum: int | None = None
    ) -> list[str]:
        """Until every expected (default: sampled) silo committed, or the deadline once `quorum` did;
        shows who is in."""
        sampled = list(meta["sampled"] if expected is None else expected)
        quorum = min(int(self.deploy.quorum) if quorum is None else quorum, len(sampled))
        shown, last_shown, warned = None, 0.0, False
        while True:
            committed = self._counted_commits(r, sampled)
            now = time.time()
            if committed != shown or now - last_shown > 30:
                left = meta["deadline"] - now
                log(
                    "aggregator",
                    f"round {r}: committed {len(committed)}/{len(sampled)} {committed}; "
                    + (f"deadline in {left:.0f}s" if left > 0 else f"deadline passed {-left:.0f}s ago"),
                )
                shown, last_shown = committed, now
            if len(committed) == len(sampled):
                return committed
            if now >= meta["deadline"]:
                if len(committed) >= quorum:
                    late = sorted(set(sampled) - set(committed))
                    log(
                        "aggregator",
                        f"round {r}: deadline passed; closing with {len(committed)}/{len(sampled)} silos, late: {late}",
                    )
                    return committed
                if not warned:
                    log(
                        "aggregator",
                        f"round {r}: deadline passed with {len(committed)} < quorum {quorum}; waiting",
                    )
                    warned = True
            time.sleep(float(self.deploy.poll_s))

    def _counted_commits(self, r: int, sampled: list[str]) -> list[str]:
        """Sampled silos whose commit counts toward closing the round: in a signed federation a
        marker must carry the silo's own signature, so a forger cannot close a round early in
        a silo's name (the silo replaces the forgery with its real update)."""
        counted = []
        for silo in self.store.committed_silos(r, sampled):
            marker = self.store.read_marker_bytes(r, silo)
            seen = self._checked_commits.get((r, silo))
            if seen is None or seen[0] != marker:  # the manifest is read once per marker seen
                problem = self.store.commit_problem(r, silo, self.trust.allow)
                self._checked_commits[(r, silo)] = (marker, problem)
                if problem:
                    log(
                        "aggregator",
                        f"round {r}: the commit under silo {silo}'s name does not count: {problem}",
                    )
            else:
                problem = seen[1]
            if problem is None:
                counted.append(silo)
        return counted

    def _members_committed(self, r: int) -> tuple[list[str], list[str]]:
        """(members of the federation with a marker for round r, other names with one)."""
        names = self.store.committed_silos(r)
        members = set(self.fed.names)
        return [n for n in names if n in members], [n for n in names if n not in members]

    def _log_late_updates(self, r: int) -> list[str]:
        """Updates committed for round r-1 after it closed: ignored, and said so."""
        if r == 0:
            return []
        prev = self.store.read_global_meta(r)
        seen = set(prev.get("accepted", [])) | set(prev.get("rejected", {}))
        late = sorted(set(self._members_committed(r - 1)[0]) - seen)
        for silo in late:
            log("aggregator", f"ignored late update of silo {silo} for closed round {r - 1}")
        return late

    def check_compliance(self, r: int, cards: Mapping[str, Any] | None = None) -> dict[str, list[str]]:
        """The gate on the members' published Data cards (re-analysed when one joined or changed); a
        member that has not published one yet has not joined and is not held against it here."""
        if not self.gate.on:
            return {}
        if cards is None:
            cards = card_lib.read_all(self.store, self.trust, self.fed.names, self.run_id)
        flops = sum(float(row.get("flops", 0) or 0) for row in monitor.rows_by_round(self.workdir).values())
        return self.gate.check(
            r, cards, measured_flop=flops, projected_flop=self.fed.projected_flop(), absent_ok=self.fed.names
        )

    def _gate_rejections(self, r: int, silos) -> dict[str, str]:
        """Why silos' updates do not count because of the compliance gate: excluded, or (require_data_card)
        no Data card published. The cards are read once, for the analysis and this decision alike."""
        if not self.gate.on:
            return {}
        cards = card_lib.read_all(self.store, self.trust, self.fed.names, self.run_id)
        excluded = self.check_compliance(r, cards)
        out = {}
        for silo in silos:
            if silo in excluded:
                out[silo] = "excluded by the compliance gate: " + "; ".join(excluded[silo])
            elif self.gate.require and silo not in cards:
                out[silo] = "no Data card published (federation.compliance.require_data_card)"
        return {s: str(store_lib.UpdateRejected(s, r, why)) for s, why in out.items()}

    def close_round(self, r: int, server: outer.OuterState, meta: Mapping[str, Any]):
        if self.fed.secure is not None:
            return self._close_secure_round(r, server, meta)
        committed = self.wait_for_round(r, meta)
        late = self._log_late_updates(r)
        manifests, rejected = {}, {}
        members, strangers = self._members_committed(r)
        # Names that are not members are never read: their number is whatever a writer wants, so
        # the first few are reported by name and the rest counted.
        for silo in strangers[:MAX_STRANGERS_LOGGED]:
            rejected[silo] = str(store_lib.UpdateRejected(silo, r, "not a member of the federation"))
            log("aggregator", f"REJECTED {rejected[silo]}")
        if len(strangers) > MAX_STRANGERS_LOGGED:
            rest = len(strangers) - MAX_STRANGERS_LOGGED
            rejected["(more non-members)"] = (
                f"{rest} more updates for round {r} under names that are not members"
            )
            log("aggregator", f"REJECTED {rejected['(more non-members)']}")
        gated = self._gate_rejections(r, sorted(set(members) | set(committed)))
        for silo, reason in gated.items():
            rejected[silo] = reason
            log("aggregator", f"REJECTED {reason}")
        for silo in sorted((set(members) | set(committed)) - set(gated)):  # unsampled members too
            try:
                manifests[silo] = self.store.validate_update(
                    r,
                    silo,
                    self.fed.abstract_payload,
                    expected_silos=meta["sampled"],
                    closed_rounds=set(range(r)),
                    current_round=r,
                    max_norm=self.fed.max_norm,
                    like_params=self.fed.silo.abstract_params,
                    allow=self.trust.allow,
                    base_sha256=downloads.base_sha256(meta),
                )
            except store_lib.UpdateRejected as e:
                rejected[silo] = str(e)
                log("aggregator", f"REJECTED {e}")
        validated = dict(manifests)  # every silo that trained and uploaded: its lifecycle figures count
        pause = float(os.environ.get("FEDJAX_PAUSE_AFTER_VALIDATION_S", "0"))  # fault-injection window
        if pause:
            log(
                "aggregator", f"round {r}: validated {sorted(manifests)}; pausing {pause}s before aggregating"
            )
            time.sleep(pause)
        for silo, reason in tree_keys.leaks(self.store, self.fed, r, manifests).items():
            manifests.pop(silo)
            rejected[silo] = str(store_lib.UpdateRejected(silo, r, reason))
            log("aggregator", f"REJECTED {rejected[silo]}")
        outliers = self.fed.outlier_norms({s: m["validation"]["norm"] for s, m in manifests.items()})
        for silo, reason in outliers.items():
            manifests.pop(silo)
            rejected[silo] = str(store_lib.UpdateRejected(silo, r, reason))
            log("aggregator", f"REJECTED {rejected[silo]}")
        clip = dp_round.clip_of(
            meta, self.fed.dp_round.initial_clip
        )  # adaptive clipping: published with global/r
        sent = server.params
        server, diag, clipped = self._aggregate(r, server, manifests, rejected, clip)
        server, attention, self.children_keys = tree_keys.step(
            self.store, self.fed, self.node, r, sent, server, manifests, self._noise_secret(), clip
        )
        accepted, seconds = self._accepted(manifests, list(manifests), meta)
        row = self.fed.round_row(
            r,
            accepted,
            self.ledger,
            diag,
            rejected=rejected,
            ignored_late=late,
            silo_seconds=seconds,
            update_norms={s: m["validation"]["norm"] for s, m in manifests.items()},  # as validated
            down_bytes=self._down_bytes(manifests, accepted, r),
            up_bytes={s: self.fed.up_bytes(s) for s in accepted},
            **attention,
            **(
                {f"key_bytes_up/{s}": self.fed.key_share(s) for s in accepted}
                if self.fed.key_mask is not None
                else {}
            ),
            **({"excluded": sorted(self.gate.excluded)} if self.gate.on else {}),
            **_reported_lifecycle(validated),
            **self.fed.privacy_fields(r + 1, clipped, clip),
        )
        if self.fed.dp_round.adaptive is not None:
            norms = {s: m["validation"]["norm"] for s, m in manifests.items()}
            row["dp_next_clip_norm"] = self.fed.dp_round.next_clip(clip, norms, r, self._noise_secret())
        return server, row

    def _aggregate(self, r: int, server: outer.OuterState, manifests: dict, rejected: dict, clip: float):
        """The outer step on the streamed aggregate of the accepted updates (weights decided here;
        `federation.aggregation`: the token-weighted mean, or the median / trimmed mean of
        `fedjax_lm.robust`). Data is re-hashed while it is read: an update changed since validation,
        or one that cannot be read, is dropped and the aggregate recomputed without it."""
        while manifests:
            weights, factor, clipped = self.fed.server_weights(
                {s: m["tokens"] for s, m in manifests.items()},
                {s: m["validation"]["norm"] for s, m in manifests.items()},
                clip,
            )
            try:
                mean = store_lib.aggregate.stream_aggregate(
                    self.store,
                    r,
                    weights,
                    server.params,
                    rule=self.fed.aggregation,
                    trim_fraction=self.fed.trim_fraction,
                    manifests=manifests,
                    verify_sha256=True,
                )
            except store_lib.UpdateRejected as e:
                rejected[e.silo] = str(e)
                manifests.pop(e.silo)
                log("aggregator", f"REJECTED {e}; recomputing the round without it")
                continue
            except ValueError as e:  # every weight 0: nothing to aggregate
                log("aggregator", f"round {r}: {e}")
                break
            mean = jax.device_put(mean, self.fed.silo.param_shardings)
            mean = self.fed.finish_aggregate(mean, factor, r, self._noise_secret(), clip)
            server, diag = self.fed.step(server, mean)
            if "skipped" in diag:
                log("aggregator", f"round {r}: {diag['skipped']}")
            return server, diag, clipped
        log("aggregator", f"round {r}: no acceptable update; global params unchanged")
        return outer.OuterState(server.params, server.opt_state, server.round + 1), {}, 0

    def _close_secure_round(self, r: int, server: outer.OuterState, meta: Mapping[str, Any]):
        """Secure aggregation (`deploy.secure_protocol`): U1, U2, the masked inputs until the deadline,
        U3, the unmasking; the outer step sees only the decoded sum of the survivors. Fewer than t
        survivors (or responses) abort the round: params unchanged, nothing of the round is computed."""
        f, sec = self.fed, self.fed.secure
        t0 = time.perf_counter()
        sampled = list(meta["sampled"])
        spec = sec.spec(self.run_id, r, len(sampled))
        key = secure.aggregator_key(runs.noise_secret(self.workdir), self.run_id, r)
        proto = AggregatorProtocol(self.store, self.trust, spec, key, sec.phase_s, float(self.deploy.poll_s))
        gated = self._gate_rejections(r, sampled)  # kept out of U1: their inputs never count
        for silo, reason in gated.items():
            log("aggregator", f"REJECTED {reason}")
        members = proto.members([s for s in sampled if s not in gated])
        senders = proto.senders(sorted(members))
        committed = self.wait_for_round(r, meta, expected=senders, quorum=0)  # the deadline decides
        late = self._log_late_updates(r)
        manifests, rejected = {}, {}
        for silo in committed:
            try:
                manifests[silo] = self.store.validate_update(
                    r,
                    silo,
                    f.abstract_payload,
                    expected_silos=senders,
                    current_round=r,
                    allow=self.trust.allow,
                    base_sha256=downloads.base_sha256(meta),
                )
            except store_lib.UpdateRejected as e:
                rejected[silo] = str(e)
                log("aggregator", f"REJECTED {e}")
        survivors, dropped, aborted = proto.survivors(senders, sorted(manifests))
        pause = float(os.environ.get("FEDJAX_PAUSE_AFTER_VALIDATION_S", "0"))  # fault-injection window
        if pause:
            log("aggregator", f"round {r}: U3 published ({survivors}); pausing {pause}s before unmasking")
            time.sleep(pause)
        diag: dict[str, Any] = {}
        new = outer.OuterState(server.params, server.opt_state, server.round + 1)
        if not aborted:
            try:
                masked = store_lib.aggregate.stream_ring_sum(
                    self.store, r, survivors, f.abstract_params, spec.fixed_point.dtype, manifests=manifests
                )
                ring = proto.unmask(masked, members, survivors, dropped)
                total = jax.device_put(
                    secagg.decode(ring, spec.fixed_point, len(survivors)), f.silo.param_shardings
                )
                mean = f.finish_aggregate(total, sec.mean_factor(len(survivors)), r, self._noise_secret())
                new, diag = f.step(server, mean)
            except (secagg.SecAggAbort, store_lib.UpdateRejected) as e:
                aborted = (
                    f"{e} (after U3: the survivors are fixed, so the round is aborted)"
                    if isinstance(e, store_lib.UpdateRejected)
                    else str(e)
                )
        if aborted:
            log("aggregator", f"round {r}: secure aggregation ABORTED: {aborted}; global params unchanged")
            survivors = []
        accepted, seconds = self._accepted(manifests, survivors, meta)
        row = f.round_row(
            r,
            accepted,
            self.ledger,
            diag,
            rejected={**gated, **rejected},
            ignored_late=late,
            silo_seconds=seconds,
            **({"excluded": sorted(self.gate.excluded)} if self.gate.on else {}),
            **_reported_lifecycle(manifests),
            **secure.row_fields(
                survivors, dropped, sum(int(m.get("secagg_saturated", 0)) for m in manifests.values())
            ),
            **({"secagg_aborted": aborted} if aborted else {}),
            down_bytes=self._down_bytes(manifests, accepted, r),
            secagg_bytes=proto.message_bytes(sampled),
            secagg_seconds=time.perf_counter() - t0,
            **f.privacy_fields(r + 1, sum(int(manifests[s].get("clipped", 0)) for s in survivors)),
        )
        return new, row

    def _accepted(self, manifests: Mapping[str, Any], names: list[str], meta: Mapping[str, Any]):
        """({silo: tokens (the server's weight), loss} of `names`, every validated silo's seconds since the
        round was published); the silos' durations feed the adaptive deadline."""
        seconds = {s: m.get("finished_at", 0) - meta["published_at"] for s, m in manifests.items()}
        self.deadlines.observe(
            [m["finished_at"] - meta["published_at"] for m in manifests.values() if "finished_at" in m]
        )
        accepted = {
            s: {"tokens": self.fed.weight(manifests[s]["tokens"], s), "loss": manifests[s].get("loss")}
            for s in names
        }
        return accepted, seconds

    def _down_bytes(self, manifests: Mapping[str, Any], accepted, r: int) -> dict[str, int] | None:
        """What each accepted silo downloaded (compressed download: priced from the copy it says it held)."""
        d = self.fed.downloads
        if not d.on:  # the full model, without the key layers a participant keeps
            return {s: self.fed.down_bytes(s, r) for s in accepted} if self.fed.key_mask is not None else None
        prices = {}
        for s in accepted:  # a silo that read the full copy says nothing: priced as the full copy
            q = downloads.held_round(manifests[s], r)
            if q is not None and not (q == 0 and d.from_seed) and not self._was_sampled(s, q):
                q = None  # a copy of a round it was not sampled in: a claim that cannot be true
            prices[s] = d.full_bytes if q is None else d.cost(q, r)
        return prices

    def _was_sampled(self, silo: str, q: int) -> bool:
        if q not in self._samples:
            self._samples[q] = list(self.store.read_global_meta(q).get("sampled", []))
        return silo in self._samples[q]

    def _noise_secret(self) -> bytes | None:
        """Central DP: the aggregator's own noise secret, in its workdir (never in the store)."""
        return runs.noise_secret(self.workdir) if self.fed.dp_here else None

    def start_or_resume(self) -> int:
        run = {
            "shared_config": shared_config(self.config),
            "fingerprint": runs.fingerprint(shared_config(self.config)),
        }
        r = self.store.latest_global()
        if r is None:
            run["tokenizer_sha256"] = self.store.put_tokenizer(self.tokenizer_bytes())
            run["run_id"] = secrets.token_hex(16)  # binds secure aggregation's key derivations to this run
            self.run_id = run["run_id"]
            run["allow_list"] = self.trust.allow.to_json() if self.trust.signed else None
            self.store.write_run(
                {
                    **run,
                    "config": runs.config_dict(self.config),
                    "silos": list(self.fed.tree.silos),
                    "members": self.fed.names,
                }
            )
            server = self.fed.init_server(int(self.config.train.seed))
            meta, items = (
                downloads.publish(self.fed, server.params, None) if self.fed.downloads.on else ({}, None)
            )
            self.publish(0, server, meta, lock=self.lock, items=items)
            return 0
        stored = check_store_run(self.store, self.config, "aggregator", self.trust)
        self.run_id = str(stored.get("run_id") or stored["fingerprint"])
        log("aggregator", f"resuming at round {r} of {self.fed.rounds}")
        for q in range(r):  # the ledger is rebuilt from what the store holds
            m = self.store.read_global_meta(q + 1)
            if "comm" in m:
                self.ledger.rounds.append(m["comm"])
        return r

    def run(self) -> dict[str, Any]:
        t0 = time.time()
        runs.open_workdir(
            self.workdir,
            self.config,
            "federated-deployment",
            allow_config_change=self.allow,
            store=self.store.root,
        )
        owner = {"role": "aggregator", "workdir": os.path.abspath(self.workdir)}
        # The lease follows the deadline (a tenth of it, 30 s to 5 min) and a heartbeat thread renews
        # it every third of the lease while this process lives, however long a round waits.
        lease = min(300.0, max(30.0, float(self.deploy.deadline_s) / 10))
        with self.store.acquire_aggregator_lock(owner, lease_s=lease) as lock:
            lock.start_heartbeat()
            self.lock = lock
            r = self.start_or_resume()
            writer = monitor.MetricWriter(self.workdir)
            writer.truncate("rounds", keep_below=r)  # a crash between the row and the publish
            last = self.fed.rounds_allowed()  # federation.rounds, or fewer under a DP budget
            if last < self.fed.rounds:
                log("aggregator", f"the privacy budget allows {last} of {self.fed.rounds} rounds")
            while r < last:
                server, meta = read_server(self.fed, self.store, r, self.trust)
                if self.fed.downloads.on:
                    copy = downloads.read_broadcast(self.fed, self.store, r, meta)
                t_round = time.perf_counter()
                server, row = self.close_round(r, server, meta)
                lock.check()
                row["time_aggregate"] = time.perf_counter() - t_round
                every = int(self.config.federation.eval_every)
                if (
                    every
                    and (r + 1) % every == 0
                    and r + 1 != self.fed.rounds
                    and self._eval_sets() is not None
                ):
                    row["val_ppl"] = eval_lib.evaluate(self.fed.silo, server.params, self._eval_sets())[
                        "pooled"
                    ]["ppl"]
                writer.write("rounds", r + 1, row)
                log(
                    "aggregator",
                    f"round {r + 1}/{self.fed.rounds}: accepted {row['accepted']} "
                    f"rejected {sorted(row['rejected'])} loss {row['train_loss']}",
                )
                pause = float(os.environ.get("FEDJAX_PAUSE_BEFORE_PUBLISH_S", "0"))  # fault-injection window
                if pause:
                    log("aggregator", f"pausing before publishing global/{r + 1} for {pause}s")
                    time.sleep(pause)
                extra = {"closed": r, "accepted": row["accepted"], "rejected": row["rejected"]}
                if "dp_next_clip_norm" in row:
                    extra["dp_clip_norm"] = row["dp_next_clip_norm"]  # signed with the rest of the meta
                if r + 1 == last < self.fed.rounds:
                    extra["final"] = "privacy budget"  # silos stop at a final global
                items = None
                if self.fed.downloads.on:  # θ̂_{r+1} and the delta silos apply to θ̂_r to get it
                    payload, copy = self.fed.downloads.next_broadcast(copy, server.params)
                    published, items = downloads.publish(self.fed, copy, payload)
                    extra.update(published)
                published, items = self.residual_items(extra, items)
                self.publish(
                    r + 1, server, {**published, "comm": self.ledger.rounds[-1]}, lock=lock, items=items
                )
                r += 1
            summary = self._summary(
                read_server(self.fed, self.store, last, self.trust)[0], time.time() - t0, last
            )
            writer.close()
        return summary

    def tokenizer_bytes(self) -> bytes:
        """The tokenizer the federation shares: data.tokenizer, else the one of a corpus prepared here."""
        path = str(self.config.data.get("tokenizer", "") or "") or os.path.join(
            self.config.data.corpus_dir, "tokenizer.model"
        )
        try:
            with open(os.path.expanduser(path), "rb") as f:
                return f.read()
        except OSError:
            raise FileNotFoundError(
                f"the aggregator shares the federation's tokenizer through the store and found none at {path}: "
                "give one with --config.data.tokenizer=PATH (e.g. the tokenizer.model that `prepare` wrote on "
                "one silo's machine)"
            ) from None

    def _eval_sets(self):
        """Validation batches when the aggregator can see a corpus (`federation.eval_every`, the summary)."""
        if not hasattr(self, "_sets"):
            self._sets = None
            try:
                corpus = data_lib.Corpus.load(self.config.data.corpus_dir)
            except FileNotFoundError:
                log("aggregator", "no validation corpus here: no evaluation (eval_every, final perplexity)")
            else:
                self._sets = eval_lib.eval_sets(
                    corpus,
                    select.active_silos(self.config, corpus),
                    seq_len=self.fed.seq_len,
                    batch_size=self.fed.batch_size,
                    max_batches=int(self.config.train.eval_batches),
                )
        return self._sets

    def _summary(self, server: outer.OuterState, wall: float, last: int) -> dict[str, Any]:
        summary = {
            "config": self.config.name,
            "kind": "federated-deployment",
            "rounds": self.fed.rounds,
            "store": self.store.root,
            "wall_time_s": wall,
            "params": model_lib.param_count(self.fed.silo.model_config),
            "communication": self.ledger.totals(),
        }
        rows = monitor.rows_by_round(self.workdir)
        summary["flops"] = sum(float(row.get("flops", 0) or 0) for row in rows.values())
        summary["energy"] = energy.totals(rows)
        if self.fed.dp_on:
            clip = dp_round.clip_of(self.store.read_global_meta(last), self.fed.dp_round.initial_clip)
            summary["privacy"] = self.fed.privacy_summary(last, clip)
        if self._eval_sets() is not None:
            summary["val"] = eval_lib.evaluate(self.fed.silo, server.params, self._eval_sets())
            print(eval_lib.format_table(summary["val"]))
        print(f"traffic vs data-parallel: {summary['communication']['traffic_ratio_vs_dp']:.1f}x less")
        runs.write_json_atomic(os.path.join(self.workdir, "summary.json"), summary)
        if self.gate.on:  # the provider's documents, from what the federation measured
            from fedjax_lm.compliance import documents

            documents.write_reports(
                self.workdir,
                data_cards=card_lib.read_all(self.store, self.trust, self.fed.names, self.run_id),
            )
        summary["server"] = server
        return summary
