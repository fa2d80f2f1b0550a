"""A federation below the root of a tree, as its own process: the aggregator of its store, one participant
of its parent's.

    python -m fedjax_lm federation --config C --name west --store ROOT_STORE --workdir runs/west

Every process of a tree is given the same config and the root's store; the tree (`federation.tree.spec`)
places each: the root aggregator serves ROOT_STORE, sub-federation `west` serves ROOT_STORE/nodes/west
and takes part in the root's rounds, its sub-federation `text` serves ROOT_STORE/nodes/west/text, and a
silo joins the store of its own federation (`tree.store_for`). Each store is an ordinary federation's
(run.json, globals, signed updates, its own lock and compliance gate over its own members).

A sub-federation's round, for each round r of its parent that samples it (the simulation's
`Simulation._train_node`, over stores):
1. read the parent's global/r (hash-checked against the signed meta): its anchor;
2. publish its own global/(r·L) from the anchor and its outer-optimizer state, then close its own rounds
   r·L … (r+1)·L − 1 as an aggregator does (every child, the tree's outer optimizer), publishing the
   global of each next one but the last;
3. save the closed state of its last round in its workdir (atomic), then upload anchor − θ_node to the
   parent (compressed with its error feedback, which is saved in the parent's store like a silo's), with
   the tokens its children trained as its weight.

A kill at any point resumes to the same result: a closed state in the workdir is reused (the upload is
recomputed from it, bit for bit), an own round already published is not re-run, and the parent's
commit marker tells whether the upload was made. When the parent finishes, the sub-federation publishes
its last closed state as its own final global, so that its children stop too.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_lm import checkpoint as ckpt_lib
from fedjax_lm import monitor
from fedjax_lm import outer
from fedjax_lm import tree as tree_lib
from fedjax_lm import worldlm
from fedjax_lm.client import ClientOutput
from fedjax_lm.deploy.aggregator import Aggregator
from fedjax_lm.deploy.common import check_tree, log, read_server
from fedjax_lm.deploy.downloads import base_sha256
from fedjax_lm.deploy.silo_worker import SiloWorker
from fedjax_lm import federation as fed_lib


class SubFederation(SiloWorker):
    """Sub-federation `name` of the tree: a `SiloWorker` toward its parent whose training is its own rounds."""

    def __init__(self, config: ml_collections.ConfigDict, store_root: str, name: str, workdir: str):
        tree = tree_lib.from_config(config.federation, tree_lib.silos_of(config))
        if name not in tree.nodes or name == tree_lib.ROOT:
            raise ValueError(
                f"{name!r} is not a sub-federation of federation.tree.spec; its sub-federations: {tree.inner()}"
            )
        if not workdir:
            raise ValueError(
                f"federation {name!r} keeps its closed rounds in a folder of its own: give --workdir"
            )
        self.L = tree.local_rounds
        own_root = tree_lib.store_for(store_root, config, name)
        super().__init__(config, store_root, name, workdir)  # its parent's federation and store
        self.agg = Aggregator(
            tree_lib.node_config(config, name), own_root, os.path.join(workdir, "aggregator"), node=name
        )
        self.closed = ckpt_lib.Checkpointer(os.path.join(workdir, "closed"), keep=3)

    # -- joining the parent (no data of its own) ---------------------------------------------------------
    def _join(self) -> fed_lib.Federation:
        if self.fed is not None:  # joined in run(), before its own store was opened
            return self.fed
        run = self._run_as_member("federation")
        self.run_id = str(run.get("run_id") or run["fingerprint"])
        self.downloads = None  # refused with a tree (federation.check_config)
        sha = run["tokenizer_sha256"]
        self.agg.tokenizer_bytes = lambda: self.store.get_tokenizer(sha)  # its children use the tree's
        return fed_lib.Federation(self.config, run["silos"])

    def _publish_card(self) -> None:  # a federation holds no data: its silos publish their own cards
        return None

    # -- the private state toward the parent: the error feedback of its uploads --------------------------
    def _abstract_private(self) -> dict[str, Any]:
        return {"error": self.fed.abstract_params} if self.fed.feedback else {}

    def _load_private(self, r: int) -> tuple[dict[str, Any], int]:
        last = self.store.latest_silo_state(self.name)
        if last is None:
            like = self.fed.silo.init_params(jax.random.key(int(self.config.train.seed)))
            return {"error": self.fed.silo.zeros_like_params(like) if self.fed.feedback else None}, -1
        arrays, meta = self.store.restore_silo_state(self.name, last, self._abstract_private())
        return {"error": arrays.get("error")}, int(meta["round"])

    def _next_private(self, out, params) -> dict[str, Any]:
        return {"error": out.error if self.fed.feedback else None}

    def _save_private(self, r: int, private) -> None:
        arrays = {k: v for k, v in private.items() if v is not None}
        self.store.save_silo_state(self.name, r, arrays, {"round": r})

    # -- its round -------------------------------------------------------------------------------------
    def _embedding(self, r: int, anchor, meta) -> dict[str, Any] | None:
        """Its residual embedding e_c for parent round r (WorldLM), from the sub-federations' key layers
        its parent published with global/r (checked against the signed hash); None when there are none."""
        f = self.fed
        if not f.residual or self.name not in meta.get("children_keys_of", []):
            return None
        names = list(meta["children_keys_of"])
        keys = f.key_template(f.abstract_params)
        like = [
            jax.ShapeDtypeStruct(x.shape, x.dtype)
            for x in (dict(zip(worldlm.leaf_paths(keys), jax.tree.leaves(keys)))[n] for n in f.key_order)
        ]
        item = self.store.read_global_item(r, "children_keys", {n: like for n in names})
        check_tree(item, meta["children_keys_sha256"], f"global/{r} sub-federations' key layers")
        kids = {n: dict(zip(f.key_order, item[n])) for n in names}
        parent = worldlm.key_layers(anchor, f.key_mask)
        return worldlm.embeddings_of(parent, kids, float(f.fed.tree.temperature))[self.name]

    def _train(self, r: int, private, last: int, *, progress: bool):
        anchor, meta, _ = self._download(r, private, last)
        t = time.perf_counter()
        state, tokens, loss = self._closed_state(r)
        if state is None:
            state, tokens, loss = self._own_rounds(r, anchor, self._embedding(r, anchor, meta))
        up_anchor = anchor  # without residuals its key layers never leave: their delta is exactly zero
        if self.fed.keeps_keys(self.name):
            up_anchor = worldlm.with_key_layers(anchor, worldlm.key_layers(state.params, self.fed.key_mask))
        payload, error = self.fed.final(up_anchor, jax.tree.map(jnp.copy, state.params), private.get("error"))
        out = ClientOutput(
            payload=payload,
            error=error,
            opt_state=None,
            metrics={"tokens": np.asarray([tokens]), "loss": np.asarray([loss])},
        )
        return out, time.perf_counter() - t, anchor, None, base_sha256(meta)

    def _abstract_closed(self) -> dict[str, Any]:
        f = self.agg.fed
        return {"params": f.abstract_params, "opt_state": f.abstract_outer_opt}

    def _closed_state(self, r: int) -> tuple[outer.OuterState | None, float, float]:
        """The state its own rounds of parent round r closed with, if saved (a restart after closing)."""
        if r + 1 not in self.closed.manager.all_steps():
            return None, 0.0, float("nan")
        items, meta = self.closed.restore(r + 1, self._abstract_closed())
        state = outer.OuterState(items["params"], items["opt_state"], jnp.asarray(meta["round"], jnp.int32))
        return state, float(meta["tokens"]), float(meta["loss"])

    def _last_closed(self, r: int) -> dict[str, Any] | None:
        """The params and outer-optimizer state its previous participation closed with (None before)."""
        steps = [s for s in self.closed.manager.all_steps() if s <= r]
        if not steps:
            return None
        return self.closed.restore(max(steps), self._abstract_closed())[0]

    def _own_rounds(self, r: int, anchor, embedding=None) -> tuple[outer.OuterState, float, float]:
        agg, first, end = self.agg, r * self.L, (r + 1) * self.L
        latest = agg.store.latest_global()
        if latest is None or latest < first:  # the start of its part of parent round r
            last = self._last_closed(r)
            params, opt_state = anchor, agg.fed.algo.init(anchor).opt_state
            if last is not None:
                opt_state = last["opt_state"]
                if agg.fed.key_mask is not None and not agg.fed.personal:  # its own key layers stay its own
                    own = worldlm.key_layers(last["params"], agg.fed.key_mask)
                    if embedding is not None:  # + gamma e_c (the simulation's Subtree.node_start)
                        g = float(self.fed.fed.tree.gamma)
                        own = {k: own[k] + g * embedding[k] for k in self.fed.key_order}
                    params = worldlm.with_key_layers(anchor, own)
            start = outer.OuterState(params, opt_state, jnp.asarray(first, jnp.int32))
            agg.publish(first, start, {"parent_round": r}, lock=agg.lock)
            latest = first
        writer = monitor.MetricWriter(agg.workdir)
        writer.truncate("rounds", keep_below=latest)  # rows of a round a crash left unpublished
        for j in range(latest, end):
            server, meta = read_server(agg.fed, agg.store, j, agg.trust)
            server, row = agg.close_round(j, server, meta)
            writer.write("rounds", j + 1, row)
            log(self.name, f"own round {j + 1} (of parent round {r}): accepted {row['accepted']}")
            if j + 1 < end:
                extra = {"closed": j, "accepted": row["accepted"], "rejected": row["rejected"]}
                extra, items = agg.residual_items(extra, None)
                agg.publish(
                    j + 1, server, {**extra, "comm": agg.ledger.rounds[-1]}, lock=agg.lock, items=items
                )
        writer.close()
        rows = monitor.rows_by_round(agg.workdir)
        mine = [rows[j] for j in range(first, end) if j in rows]
        tokens = float(sum(row["tokens"] for row in mine))
        losses = [(row["train_loss"], row["tokens"]) for row in mine if row.get("train_loss") is not None]
        loss = (
            float(np.average([x for x, _ in losses], weights=[w for _, w in losses]))
            if losses
            else float("nan")
        )
        # saved before the upload: a restart recomputes the same upload from it
        self.closed.save(
            r + 1,
            {"params": server.params, "opt_state": server.opt_state},
            {"round": end, "parent_round": r, "tokens": tokens, "loss": loss},
        )
        self.closed.wait()
        log(self.name, f"saved closed state of parent round {r} ({tokens:.0f} tokens)")
        pause = float(os.environ.get("FEDJAX_SUBFED_PAUSE_BEFORE_UPLOAD_S", "0"))  # fault-injection window
        if pause:
            log(self.name, f"pausing {pause}s between the close of parent round {r} and its upload")
            time.sleep(pause)
        return server, tokens, loss

    def _finish(self) -> None:
        """Its own final global (the last closed state), so that its children stop."""
        agg = self.agg
        steps = self.closed.manager.all_steps()
        final = int(agg.fed.rounds)
        if not steps or (agg.store.latest_global() or 0) >= final:
            return
        items, _ = self.closed.restore(max(steps), self._abstract_closed())
        server = outer.OuterState(items["params"], items["opt_state"], jnp.asarray(final, jnp.int32))
        agg.publish(final, server, {"final": "the parent federation finished"}, lock=agg.lock)

    def run(self, max_rounds: int | None = None) -> int:
        agg = self.agg
        owner = {"role": f"federation {self.name}", "workdir": os.path.abspath(self.workdir)}
        lease = min(300.0, max(30.0, float(agg.deploy.deadline_s) / 10))
        with agg.store.acquire_aggregator_lock(owner, lease_s=lease) as lock:
            lock.start_heartbeat()
            agg.lock = lock
            self.fed = self._join()  # the parent's run first: its tokenizer goes into this one's run.json
            agg.start_or_resume()
            uploads = super().run(max_rounds)
            self._finish()
        return uploads
