"""A silo process: trains the rounds it is sampled in and commits its updates to the store."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from fedjax_lm import config as config_lib
from fedjax_lm import energy
from fedjax_lm import federation as fed_lib
from fedjax_lm import model as model_lib
from fedjax_lm import monitor
from fedjax_lm import runs
from fedjax_lm import store as store_lib
from fedjax_lm.data import build as build_sources
from fedjax_lm.data import config as data_config
from fedjax_lm.data import select
from fedjax_lm.deploy.common import (
    check_deployable,
    check_store_run,
    check_tree,
    global_meta,
    load_trust,
    log,
)
from fedjax_lm import tree as tree_lib
from fedjax_lm import worldlm
from fedjax_lm.deploy import cards as card_lib
from fedjax_lm.deploy.downloads import SiloDownloads, base_sha256
from fedjax_lm.deploy.secure_protocol import SiloProtocol


class SiloWorker:
    def __init__(
        self, config: ml_collections.ConfigDict, store_root: str, name: str, workdir: str | None = None
    ):
        config_lib.validate(config)
        check_deployable(config)
        if str(config.federation.tree.spec).strip():  # a tree: this member's federation and its store
            parent = tree_lib.from_config(config.federation, tree_lib.silos_of(config)).parent.get(name)
            if parent is None:
                raise ValueError(f"{name!r} is not a silo or sub-federation of federation.tree.spec")
            store_root = tree_lib.store_for(store_root, config, parent)
            config = tree_lib.participant_config(config, name)
        if config.federation.secagg.enabled and not workdir:
            raise ValueError(
                f"silo {name!r}: secure aggregation keeps this silo's round keys and noise secret in a private "
                "folder of its own: give --workdir (never the store)"
            )
        if config.federation.secagg.enabled and jax.process_count() > 1:
            raise ValueError(
                f"silo {name!r}: secure aggregation masks the whole update on one host; a multi-host silo "
                f"({jax.process_count()} processes) cannot take part yet: set federation.secagg.enabled=False"
            )
        self.config, self.name, self.workdir = config, name, workdir
        self.poll = float(config.federation.deploy.poll_s)
        self.store = store_lib.Store(store_root)
        self.trust = load_trust(config, name)
        build_sources.check_sources(config.data.sources)  # before waiting for the federation
        self.fed: fed_lib.Federation | None = None  # built once the store's run.json is there
        self.meter = energy.Meter(config.federation.compliance.energy)
        self.energy_used: dict[str, Any] = {}
        self.iterator = None

    def _join(self) -> fed_lib.Federation:
        """Waits for the federation, checks membership and config, prepares this silo's own corpus
        with the federation's tokenizer (from the store) and opens its data."""
        run = self._run_as_member("silo")
        data_cfg = self._data_with_store_tokenizer(run["tokenizer_sha256"])
        corpus = select.ensure_corpus(data_cfg)
        select.check_vocab(self.config, corpus)
        corpus.check_silos([self.name])
        self.corpus_dir = data_cfg.corpus_dir
        self.iterator = select.silo_iterator(corpus, self.name, self.config)
        self.run_id = str(run.get("run_id") or run["fingerprint"])
        fed = fed_lib.Federation(self.config, run["silos"])
        self.downloads = (
            SiloDownloads(fed, self.store, self.trust, self.name, int(self.config.train.seed))
            if fed.downloads.on
            else None
        )
        return fed

    def _run_as_member(self, role: str) -> dict[str, Any]:
        """The store's run.json once the federation started, checked against this process's config and
        refusing a process that is not one of its members."""
        while self.store.latest_global() is None:
            time.sleep(self.poll)
        run = check_store_run(self.store, self.config, f"{role} {self.name}", self.trust)
        members = run.get("members", run.get("silos", []))
        if self.name not in members:
            raise ValueError(
                f"{role} {self.name!r} is not a member of this federation; its members are {members}"
            )
        return run

    def _publish_card(self) -> None:
        """Only metadata leaves the silo: its Data card, published at joining and whenever it changes."""
        card_lib.publish(
            self.store,
            self.trust,
            self.name,
            card_lib.own_card(self.config, self.name, self.corpus_dir),
            self.run_id,
        )

    def _data_with_store_tokenizer(self, sha256: str):
        """The data config to prepare with: the silo's sources, the federation's tokenizer."""
        data_cfg = self.config.data.copy_and_resolve_references()
        given = str(data_cfg.get("tokenizer", "") or "")
        if given:
            if data_config.tokenizer_sha256(given) != sha256:
                raise ValueError(
                    f"data.tokenizer={given} is not the federation's tokenizer (sha256 {sha256[:12]} in the store)"
                )
            return data_cfg
        local = os.path.join(data_cfg.corpus_dir, "tokenizer.model")
        if os.path.exists(local) and data_config.tokenizer_sha256(local) == sha256:
            return data_cfg  # a corpus prepared here with the same tokenizer: use it as it is
        os.makedirs(data_cfg.corpus_dir, exist_ok=True)
        path = os.path.join(data_cfg.corpus_dir, "store-tokenizer.model")
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(self.store.get_tokenizer(sha256))
        os.replace(tmp, path)
        log(self.name, f"using the federation's tokenizer from the store (sha256 {sha256[:12]})")
        data_cfg.tokenizer = path
        return data_cfg

    def _abstract_private(self) -> dict[str, Any]:
        """The private arrays saved after a round; with the compressed download, the copy of the global
        this silo trained from (the base its next deltas apply to)."""
        abstract = self.fed.abstract_private()
        if self.downloads is not None:
            abstract["broadcast"] = self.fed.abstract_params
        if self.fed.personal:  # FedPer: its own key layers
            abstract["keys"] = self.fed.keys_list(self.fed.abstract_params)
        return abstract

    def _load_private(self, r: int) -> tuple[dict[str, Any], int]:
        """(private arrays, last round trained); a fresh state (shaped like global/r) before the first."""
        last = self.store.latest_silo_state(self.name)
        if last is None:  # shaped and placed like the params: the seed's are free, global/r's a download
            like = (
                self.fed.silo.init_params(jax.random.key(int(self.config.train.seed)))
                if self.downloads is not None and self.fed.downloads.from_seed
                else self.store.read_global_params(r, self.fed.abstract_params)
            )
            private = {**self.fed.fresh_private(like), "broadcast": None}
            if self.fed.personal:  # the key layers of the global model every silo starts from (round 0)
                private["keys"] = self.fed.keys_list(
                    self.fed.silo.init_params(jax.random.key(int(self.config.train.seed)))
                )
            return private, -1
        arrays, meta = self.store.restore_silo_state(self.name, last, self._abstract_private())
        self.iterator.set_state(meta["data_iterator"])
        private = {k: arrays.get(k) for k in ("opt_state", "error", "broadcast", "keys")}
        return private, int(meta["round"])

    def _next_private(self, out, params) -> dict[str, Any]:
        private = self.fed.next_private({}, out)
        if self.downloads is not None:
            private["broadcast"] = params
        if self.fed.personal:
            private["keys"] = out.keys
        return private

    def _save_private(self, r: int, private: Mapping[str, Any]) -> None:
        arrays = {k: v for k, v in private.items() if v is not None}
        self.store.save_silo_state(
            self.name, r, arrays, {"round": r, "data_iterator": self.iterator.get_state()}
        )

    def _download(
        self, r: int, private: Mapping[str, Any], last: int
    ) -> tuple[Any, dict[str, Any], int | None]:
        """(the params round r trains from, global/r's meta, the round of the copy the compressed
        download started from), after checking them against the hashes the aggregator signed."""
        try:  # a silo needs the global params only, not the outer optimizer state
            meta = global_meta(self.store, r, self.trust)
            if self.downloads is not None:
                held = last if private.get("broadcast") is not None else None
                params, start = self.downloads.fetch(r, meta, held, private.get("broadcast"))
                return params, meta, start
            params = self.store.read_global_params(r, self.fed.abstract_params)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"silo {self.name}: global/{r} is no longer in the store, so the private state of round {r} "
                f"cannot be rebuilt; keep every global checkpoint (Store keep_globals=None)"
            ) from None
        check_tree(params, meta["params_sha256"], f"global/{r} params")
        return params, meta, None

    def _train(self, r: int, private, last: int, *, progress: bool):
        """Trains round r from global/r (or its broadcast copy), checked against the signed hashes."""
        params, meta, start = self._download(r, private, last)
        batches = select.next_batches(self.iterator, self.fed.H)
        t = time.perf_counter()
        report = (
            monitor.round_progress(self.name, r, self.fed.H, self.fed.batch_size * self.fed.seq_len)
            if progress
            else None
        )
        train_from = params
        if self.fed.personal:  # FedPer: the backbone it received with its own key layers
            train_from = worldlm.with_key_layers(params, dict(zip(self.fed.key_order, private["keys"])))
        with self.meter.measure() as self.energy_used:
            out = jax.block_until_ready(
                self.fed.train_silo(train_from, private, batches, r, report, personal=self.fed.personal)
            )
        return out, time.perf_counter() - t, params, start, base_sha256(meta)

    def catch_up(self, r: int) -> tuple[dict[str, Any], int]:
        """The private state as of the start of round r: replays committed rounds it has not saved."""
        private, last = self._load_private(r)
        for q in range(last + 1, r):
            if self.store.is_committed(q, self.name, self.trust.signer):
                log(
                    self.name,
                    f"round {q}: committed before a restart; replaying it to rebuild the private state",
                )
                out, _, params, _, _ = self._train(q, private, last, progress=False)
                private = self._next_private(out, params)
                self._save_private(q, private)
                last = q
        return private, last

    def upload(self, r: int, payload: Any, manifest: dict[str, Any]) -> None:
        """Commits round r's update. Each host writes its own shards; the signature covers the
        manifest (array hashes, round, silo, base global). experiments/attacks.py overrides it."""
        self.store.write_update(r, self.name, payload, manifest, signer=self.trust.signer)

    def _masked(self, r: int, payload, secure: SiloProtocol):
        """(the masked ring payload, manifest fields) of this silo's contribution; (None, {}) when the
        round went on without it. The contribution is clipped / noised as federation.dp says, with
        noise from this silo's own secret (in its workdir)."""
        sec = self.fed.secure
        secret = runs.noise_secret(self.workdir) if sec.share_std > 0 else None
        x, norm = sec.contribution(payload, r, self.name, secret)
        pause = float(os.environ.get("FEDJAX_SILO_PAUSE_BEFORE_MASK_S", "0"))  # fault-injection window
        if pause:
            log(self.name, f"round {r}: keys shared, update ready; pausing {pause}s before masking it")
            time.sleep(pause)
        masked = secure.mask(r, jax.device_get(x))
        if masked is None:
            return None, {}
        ring, saturated = masked
        extra = {"secagg_saturated": int(saturated)}
        if self.fed.dp_on:
            extra["clipped"] = int(norm > sec.clip_norm)
        return jax.tree.map(lambda w: {"x": w}, ring), extra

    def run(self, max_rounds: int | None = None) -> int:
        """Takes part until the last round; returns the number of updates it uploaded."""
        try:
            return self._take_part(max_rounds)
        finally:
            self.meter.close()

    def _take_part(self, max_rounds: int | None) -> int:
        self.fed = self._join()
        uploads = 0
        while True:
            self._publish_card()
            r = self.store.latest_global()
            if r >= self.fed.rounds:
                log(self.name, f"federation finished at round {r}")
                return uploads
            meta = global_meta(self.store, r, self.trust)  # the sample is the aggregator's, signed
            if meta.get("final"):
                log(self.name, f"federation finished at round {r} ({meta['final']})")
                return uploads
            private, last = self.catch_up(r)
            if self.name not in meta["sampled"] or last >= r:
                self.store.wait_for_global(r + 1, timeout_s=10 * 24 * 3600, poll_s=self.poll)
                continue
            committed = self.store.is_committed(r, self.name, self.trust.signer)
            secure = None
            if self.fed.secure is not None:  # keys and shares first: they do not depend on training
                secure = SiloProtocol(self.store, self.trust, self.name, self.workdir, self.poll)
                spec = self.fed.secure.spec(self.run_id, r, len(meta["sampled"]))
                joined = secure.load(spec) if committed else secure.begin(spec)
            out, secs, params, start, base = self._train(r, private, last, progress=not committed)
            del private
            loss = float(out.metrics["loss"].mean())
            tokens = float(out.metrics["tokens"].sum())
            if committed:
                log(
                    self.name, f"round {r}: already committed before a restart; rebuilding private state only"
                )
            elif not math.isfinite(loss):
                log(self.name, f"round {r}: local loss {loss}; not uploading")
            elif secure is not None and not joined:
                log(self.name, f"round {r}: not in the secure-aggregation round; not uploading")
            else:
                payload, extra = out.payload, {}
                if secure is not None:
                    payload, extra = self._masked(r, out.payload, secure)
                manifest = {
                    "round": r,
                    "silo": self.name,
                    "tokens": tokens,
                    "loss": loss,
                    "train_seconds": secs,
                    "method": self.fed.upload_method,
                    "finished_at": time.time(),
                    "flops": tokens * model_lib.flops_per_token(self.fed.silo.model_config, self.fed.seq_len),
                    "base_global_sha256": base,  # binds the update to the global it was trained from
                    **{
                        k: self.energy_used[k]
                        for k in ("energy_kwh", "co2_kg")
                        if self.energy_used.get(k) is not None
                    },
                    **({"download_from": start} if start is not None else {}),
                    **extra,
                }
                if payload is not None:
                    self.upload(r, payload, manifest)
                    uploads += 1
                log(self.name, f"round {r}: uploaded (loss {loss:.3f}, {tokens:.0f} tokens, {secs:.1f}s)")
            pause = float(os.environ.get("FEDJAX_SILO_PAUSE_AFTER_COMMIT_S", "0"))  # fault-injection window
            if pause:
                log(self.name, f"pausing after the commit of round {r} for {pause}s")
                time.sleep(pause)
            self._save_private(r, self._next_private(out, params))
            if secure is not None and joined:
                secure.respond(r)
            if max_rounds is not None and uploads >= max_rounds:
                return uploads
