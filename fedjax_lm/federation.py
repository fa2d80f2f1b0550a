"""The federated round, defined once for every driver.

A `Federation` is built from a validated config and the names of its silos. It owns what
a round is — H, the number of rounds, which silos a round samples, the inner schedule
offset, the silo's private state (inner optimizer moments, error feedback) and how it is
initialised and restored, the outer algorithm, the update bound and the round's metrics
row — so the drivers around it differ only in their loop and their I/O:

* `simulation` runs every silo and the aggregator in one process (sequential, or the
  silo-parallel `vmap` of the same pure `client_round`);
* `deploy` runs the aggregator and each silo as separate processes over a store.

A silo's round is client_init (global params + its private state) → H local AdamW steps
(`Silo.local_train`, jitted with shardings and donation, in chunks so progress can be
reported between them) → client_final (Δ = θ_global − θ_local, compressed with error
feedback). `client_round` is the same three pieces as one pure function.

The aggregating side is a *node*: `node_round` turns "my state + my children's updates"
into "my new params, and (when I have a parent) my own update to it". A flat federation is
the depth-1 tree whose root has no parent; a federation of federations (WorldLM) nests it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from fedjax_lm import compression
from fedjax_lm import diagnostics
from fedjax_lm import download
from fedjax_lm.compliance import gate as compliance_gate
from fedjax_lm import dp_round
from fedjax_lm import model as model_lib
from fedjax_lm import monitor
from fedjax_lm import outer
from fedjax_lm import privacy
from fedjax_lm import robust
from fedjax_lm import secure
from fedjax_lm import sharding as sharding_lib
from fedjax_lm import silo as silo_lib
from fedjax_lm import tree as tree_lib
from fedjax_lm import worldlm
from fedjax_lm.client import ClientOutput, client_final, client_init, client_round
from fedjax_lm.node import node_round

INNER_STATE_MODES = ("keep", "reset")


def default_federation_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            rounds=8,
            local_steps=32,  # H: inner steps per round
            silos_per_round=0,  # K: 0 = every silo every round
            inner_state="keep",  # "keep" the silo's AdamW moments across rounds, or "reset" them
            aggregate_inner_moments=False,  # Photon's option: average inner moments across silos too
            compression="int8",  # upload encoding of Δ: "none" | "bf16" | "int8"
            download_compression="none",  # the global sent as a compressed delta (fedjax_lm/download.py)
            download_from_seed=True,  # ... and a silo builds round 0's global from train.seed, downloads nothing
            block_size=256,
            error_feedback=True,
            max_update_norm=0.0,  # reject a pseudo-gradient whose global L2 norm exceeds this (0: off)
            max_update_norm_ratio=10.0,  # ... or exceeds this x the median norm of the round (>= 3 silos; 0: off)
            # How the accepted updates become one: "mean" (token-weighted), or the unweighted
            # coordinate-wise "median" / "trimmed_mean" (fedjax_lm/robust.py says exactly how).
            aggregation="mean",
            # Clip every accepted update to this x the round's median norm before aggregating
            # (the server-side norm clipping of robust aggregation; 0: off).
            clip_norm_ratio=0.0,
            # Client-level differential privacy. Central mode: the aggregator clips every decoded
            # update to dp.clip_norm, sums them with weight 1 each, adds N(0, (noise_multiplier x
            # clip_norm)^2) per coordinate and divides by the expected number of silos per round.
            # Distributed mode (needs secagg): each silo clips and adds its share of that noise.
            dp=ml_collections.ConfigDict(dp_round.default_config()),
            # Secure aggregation (fedjax_lm/secure.py): the aggregator sees only the round's sum.
            secagg=ml_collections.ConfigDict(secure.default_config()),
            # The EU AI Act gate (fedjax_lm/compliance/gate.py): this process's cards folder and policy.
            compliance=ml_collections.ConfigDict(compliance_gate.default_config()),
            trim_fraction=robust.DEFAULT_TRIM_FRACTION,  # trimmed_mean: dropped at EACH end, in [0, 0.5)
            outer=outer.default_outer_config("fedavg"),
            # A tree of federations (WorldLM, HierFAVG) and partial localisation (FedPer): fedjax_lm/tree.py.
            tree=ml_collections.ConfigDict(tree_lib.default_config()),
            parallel=False,  # simulation: train the K silos of a round in one vmapped program
            sample_seed=0,
            eval_every=0,  # rounds; 0 = only at the end (an aggregator evaluates if it sees a corpus)
            checkpoint_every=1,  # rounds (simulation; a deployment publishes a global every round)
            report_every=0,  # local steps between progress reports; 0 = about 8 per round
            # Multi-process deployment (python -m fedjax_lm aggregate / silo) over a store.
            deploy=ml_collections.ConfigDict(
                dict(
                    store="",  # local path, gs://bucket/run or s3://bucket/run
                    deadline_s=600.0,  # a round closes at its deadline once `quorum` silos committed
                    adaptive_deadline=True,  # deadline = max(min_deadline_s, factor x slowest recent silo)
                    deadline_factor=2.0,
                    min_deadline_s=30.0,
                    quorum=1,
                    poll_s=0.5,
                    # Signed exchange (python -m fedjax_lm keygen): the federation's allow-list of public
                    # keys and this process's own private key; both empty = unsigned (a warning says so).
                    allow_list="",
                    key="",
                )
            ),
        )
    )


def check_config(fed: Mapping[str, Any]) -> None:
    """Every federation field, checked before anything is built; errors name the field."""
    defaults = default_federation_config()  # the one list of fields
    unknown = set(fed) - set(defaults)
    if unknown:
        raise ValueError(f"federation has unknown fields {sorted(unknown)}; valid: {sorted(defaults)}")
    for key in ("rounds", "local_steps", "block_size"):
        if int(fed[key]) < 1:
            raise ValueError(f"federation.{key} must be >= 1, got {fed[key]}")
    for key in ("silos_per_round", "eval_every", "checkpoint_every", "report_every"):
        if int(fed[key]) < 0:
            raise ValueError(f"federation.{key} must be >= 0, got {fed[key]}")
    for key in ("max_update_norm", "max_update_norm_ratio"):
        if not float(fed[key]) >= 0:
            raise ValueError(f"federation.{key} must be >= 0 (0: off), got {fed[key]}")
    if 0 < float(fed["max_update_norm_ratio"]) < 1:
        raise ValueError(
            f"federation.max_update_norm_ratio={fed['max_update_norm_ratio']} would reject the median update itself; use >= 1"
        )
    if fed["inner_state"] not in INNER_STATE_MODES:
        raise ValueError(
            f"federation.inner_state must be one of {INNER_STATE_MODES}, got {fed['inner_state']!r}"
        )
    if fed["download_compression"] not in compression.METHODS:
        raise ValueError(
            f"federation.download_compression must be one of {compression.METHODS}, got {fed['download_compression']!r}"
        )
    if fed["compression"] not in compression.METHODS:
        raise ValueError(
            f"federation.compression must be one of {compression.METHODS}, got {fed['compression']!r}"
        )
    robust.check_rule(fed["aggregation"], fed["trim_fraction"])
    if not float(fed["clip_norm_ratio"]) >= 0:
        raise ValueError(f"federation.clip_norm_ratio must be >= 0, got {fed['clip_norm_ratio']}")
    dp_round.check_config(fed)
    secure.check_config(fed)
    compliance_gate.check_config(fed["compliance"])
    tree_lib.check_config(fed["tree"])
    tree_lib.check_combinations(fed)
    if fed["aggregate_inner_moments"] and fed["inner_state"] != "keep":
        raise ValueError("federation.aggregate_inner_moments needs federation.inner_state='keep'")
    try:
        outer.make_outer_optimizer(fed["outer"])
    except ValueError as e:
        raise ValueError(f"federation.outer: {e}") from None
    d = fed["deploy"]
    unknown = set(d) - set(defaults.deploy)
    if unknown:
        raise ValueError(
            f"federation.deploy has unknown fields {sorted(unknown)}; valid: {sorted(defaults.deploy)}"
        )
    if int(d["quorum"]) < 1:
        raise ValueError(f"federation.deploy.quorum must be >= 1, got {d['quorum']}")
    for key in ("poll_s", "deadline_s", "min_deadline_s", "deadline_factor"):
        if not float(d[key]) > 0:
            raise ValueError(f"federation.deploy.{key} must be > 0, got {d[key]}")
    if d.get("key") and not d.get("allow_list"):
        raise ValueError(
            "federation.deploy.key is set but federation.deploy.allow_list is not: a signed federation "
            "needs the allow-list of every member's public key (python -m fedjax_lm keygen --help)"
        )


def check_silo_count(fed: Mapping[str, Any], num_silos: int) -> None:
    if num_silos < 1:
        raise ValueError("the federation has no silos: list some in train.silos or in data.sources")
    k = int(fed["silos_per_round"])
    if k > num_silos:
        raise ValueError(f"federation.silos_per_round={k} but the federation has {num_silos} silos")


@jax.jit
def _scale(tree, factor):
    return jax.tree.map(lambda x: x * factor, tree)


@jax.jit
def _scale_and_noise(tree, factor, key, std):
    noise = privacy.gaussian_noise(key, tree, std)
    return jax.tree.map(lambda x, z: x * factor + z, tree, noise)


def sample_silos(names: Sequence[str], k: int, seed: int, round_idx: int) -> list[str]:
    """K of N silos for a round, seeded by (seed, round): the same on every host and on resume."""
    names = sorted(names)
    if k <= 0 or k >= len(names):
        return names
    rng = np.random.default_rng([seed, round_idx])
    return sorted(rng.choice(names, size=k, replace=False).tolist())


MIN_AUTO_CHUNK = 32  # local steps: each compiled call costs ~1/3 of a step on CPU (see report_chunk)


def report_chunk(h: int, report_every: int = 0) -> int:
    """Local steps per compiled chunk, always a divisor of H (one program for the whole round).

    `report_every` > 0: the largest divisor of H not above it. 0 (auto): the smallest divisor of
    H that is at least max(H/8, 32). Every extra call costs a fixed ~25 ms on XLA:CPU (about a
    third of a tiny-model step: fresh temp buffers per execution), so chunks shorter than ~32
    steps would cost more than the 2% budget (benchmarks/round_chunks.py); a round short enough
    to be one chunk is over in seconds anyway.
    """
    if report_every > 0:
        return max(d for d in range(1, min(report_every, h) + 1) if h % d == 0)
    target = min(h, max(math.ceil(h / 8), MIN_AUTO_CHUNK))
    return min(d for d in range(target, h + 1) if h % d == 0)


# ---------------------------------------------------------------------------- federation


class Federation:
    """What a round is, for every driver: built from a validated config and the silo names."""

    def __init__(self, config: ml_collections.ConfigDict, names: Sequence[str], mesh: Mesh | None = None):
        fed = config.federation
        check_silo_count(fed, len(names))
        # The root's participants: the silos (flat), or the silos and federations the tree puts under it.
        self.tree = tree_lib.from_config(fed, names)
        self.config, self.fed, self.names = config, fed, sorted(self.tree.root.children)
        self.H, self.rounds = int(fed.local_steps), int(fed.rounds)
        self.leaf_rounds = self.tree.leaf_rounds()  # a silo's rounds per root round (1: flat)
        self.seq_len, self.batch_size = int(config.train.seq_len), int(config.train.batch_size)
        # The inner schedule runs over (a silo's round) * H + local step, whatever its participation.
        self.silo = silo_lib.from_config(
            config, total_steps=self.rounds * self.leaf_rounds * self.H, mesh=mesh
        )
        self.algo = outer.OuterAlgorithm(fed.outer)
        self.keep_opt = fed.inner_state == "keep"
        self.feedback = bool(fed.error_feedback)
        self.method, self.block_size = str(fed.compression), int(fed.block_size)
        self.max_norm = float(fed.max_update_norm) or None
        self.norm_ratio = float(fed.max_update_norm_ratio)
        self.aggregation, self.trim_fraction = str(fed.aggregation), float(fed.trim_fraction)
        self.clip_ratio = float(fed.clip_norm_ratio)
        self.dp = fed.dp
        k = int(fed.silos_per_round)
        self.expected_silos = k if 0 < k < len(self.names) else len(self.names)  # the DP denominator
        # DP in a tree is per silo, as in the flat federation: the federations whose children are silos
        # clip and noise their updates (this node if `dp_here`); a federation of federations aggregates
        # what is already private. Every node accounts a silo's rounds (rounds x leaf rounds), with no
        # amplification claimed for sampling above the silos' own federation (q = 1: an upper bound).
        self.node = tree_lib.ROOT  # a sub-federation's aggregator sets its name (noise keys)
        # With dp.unit="federation" the unit is each child of the root as a whole (a silo, or a
        # sub-federation's silos together): the root clips and noises its children's uploads, once per root
        # round, and nothing inside a sub-federation is private from its members (tree.node_config turns DP
        # off there): WorldLM's reading, where what stays in a federation never needs noise.
        self.dp_unit = str(fed.dp.unit)
        by_federation = self.dp_unit == "federation"
        self.dp_here = fed.dp.mode != "off" and (by_federation or tree_lib.aggregates_silos(self.tree))
        self.dp_rounds_per_round = 1 if by_federation else self.leaf_rounds  # what the accountant counts
        if fed.dp.mode != "off" and not by_federation:
            tree_lib.check_dp(self.tree)
        self.key_attention = bool(
            fed.tree.key_layers and fed.tree.key_owner == "federation" and fed.tree.attention
        )
        self.dp_round = dp_round.RoundDP(
            fed.dp,
            num_silos=len(self.names) if self.tree.flat else self.expected_silos,
            expected_silos=self.expected_silos,
            rounds=self.rounds * self.dp_rounds_per_round,
            # the key aggregate where this DP applies: at the federations of silos, or by federation at the
            # root when its children send key deltas (silos, or sub-federations' residuals)
            queries=2 if self.key_attention and (not by_federation or self._root_gets_keys()) else 1,
        )
        self.dp_on = self.dp_round.on  # DP somewhere in the tree (here, or at the federations below)
        self.central_noise = self.dp_round.central and self.dp_here
        self.noise_multiplier = self.dp_round.noise_multiplier
        # The most tokens a silo can see in a round: its claimed count is capped here (the server
        # decides weights; a claim of 1e37 tokens would otherwise be the whole mean).
        self.token_cap = float(self.H * self.batch_size * self.seq_len)
        # ... and a federation of the tree at most what its silos can give it in a round of its parent.
        self.token_caps = {
            n: self.token_cap * len(self.tree.silos_under(n)) * self.tree.leaf_rounds(n)
            for n in self.tree.nodes
        }
        self.chunk = report_chunk(self.H, int(fed.report_every))
        s = self.silo
        self._init = jax.jit(
            s._with_rules(functools.partial(client_init, tx=s.tx, reset_opt=not self.keep_opt)),
            out_shardings=s.state_shardings,
        )
        self._final = jax.jit(
            functools.partial(client_final, method=self.method, block_size=self.block_size),
            donate_argnums=(1,),  # the local params; the private error stays the caller's
        )
        self.abstract_params = sharding_lib.with_shardings(s.abstract_params, s.param_shardings)
        abstract_opt = jax.eval_shape(self.algo.tx.init, s.abstract_params)
        self.abstract_outer_opt = sharding_lib.with_shardings(
            abstract_opt,
            sharding_lib.optimizer_shardings(self.algo.tx, abstract_opt, s.param_shardings, s.mesh),
        )
        self.abstract_payload = jax.eval_shape(
            lambda p: compression.compress(p, None, self.method, self.block_size)[0], s.abstract_params
        )
        self.param_bytes = compression.raw_nbytes(s.abstract_params)
        # Photon's shared moments travel too: each accepted silo uploads its floating inner-optimizer
        # leaves (AdamW mu and nu) and downloads their mean, uncompressed.
        self.moment_bytes = 0
        if fed.aggregate_inner_moments:
            inner = jax.eval_shape(s.tx.init, s.abstract_params)
            self.moment_bytes = sum(
                x.size * x.dtype.itemsize
                for x in jax.tree.leaves(inner)
                if jnp.issubdtype(x.dtype, jnp.floating)
            )
        self.downloads = download.Downloads(
            str(fed.download_compression),
            self.block_size,
            s.abstract_params,
            s.param_shardings,
            from_seed=bool(fed.download_from_seed),
        )
        self.secure: secure.SecureSum | None = None
        self.upload_method = self.method
        if fed.secagg.enabled:  # uploads are masked ring words, one per parameter
            self.secure = secure.SecureSum(
                fed,
                expected_silos=self.expected_silos,
                noise_multiplier=self.noise_multiplier,
                num_params=model_lib.param_count(s.model_config),
            )
            self.upload_method = f"ring{self.secure.ring_bits}"
            ring = secure.ring_dtype(self.secure.ring_bits)
            self.abstract_payload = jax.tree.map(
                lambda x: {"x": jax.ShapeDtypeStruct(x.shape, ring)}, s.abstract_params
            )
        self.payload_bytes = compression.payload_nbytes(self.abstract_payload)  # every valid upload's size
        # Partial localisation (tree.key_layers): the key leaves, and what their part of an upload weighs.
        self.key_mask, self.key_payload_bytes, self.key_param_bytes = None, 0, 0
        if fed.tree.key_layers:
            self.key_mask = worldlm.key_mask(s.abstract_params, tuple(fed.tree.key_layers))
            self.key_payload_bytes = sum(
                jax.tree.leaves(
                    jax.tree.map(
                        lambda m, p: compression.payload_nbytes(p) if m else 0,
                        self.key_mask,
                        self.abstract_payload,
                    )
                )
            )
            mask = tuple(jax.tree.leaves(self.key_mask))
            self.key_param_bytes = sum(
                x.size * x.dtype.itemsize for x, m in zip(jax.tree.leaves(s.abstract_params), mask) if m
            )
            self._final_personal = jax.jit(
                functools.partial(_final_personal, mask=mask, method=self.method, block_size=self.block_size),
                donate_argnums=(1,),
            )
        like = self.abstract_params
        self._payload_stats = jax.jit(lambda p: outer.delta_stats(compression.decompress(p, like)))
        self._all_finite = jax.jit(
            lambda t: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(t)]))
        )

    # -- the round plan ----------------------------------------------------------------------
    def sample(self, r: int) -> list[str]:
        return sample_silos(self.names, int(self.fed.silos_per_round), int(self.fed.sample_seed), r)

    def step0(self, r: int) -> jax.Array:
        return jnp.asarray(r * self.H, jnp.int32)

    # -- state -------------------------------------------------------------------------------
    def init_server(self, seed: int) -> outer.OuterState:
        return self.algo.init(self.silo.init_state(jax.random.key(seed)).params)

    def abstract_private(self) -> dict[str, Any]:
        """What a silo saves between rounds (arrays only; the data position goes to JSON)."""
        out: dict[str, Any] = {}
        if self.keep_opt:
            out["opt_state"] = self.silo.abstract_state_with_shardings().opt_state
        if self.feedback:
            out["error"] = self.abstract_params
        return out

    def fresh_private(self, params) -> dict[str, Any]:
        """A silo's private state before its first round, placed as a restored one would be."""
        return {
            "opt_state": self.silo.fresh_opt_state(params) if self.keep_opt else None,
            "error": self.silo.zeros_like_params(params) if self.feedback else None,
        }

    def next_private(self, private: Mapping[str, Any], out: ClientOutput) -> dict[str, Any]:
        return {
            "opt_state": out.opt_state if self.keep_opt else None,
            "error": out.error if self.feedback else None,
        }

    # -- a silo's round ------------------------------------------------------------------------
    def train_silo(
        self,
        global_params,
        private: Mapping[str, Any],
        batches: Mapping[str, np.ndarray],
        r: int,
        progress: Callable[[int, dict[str, float]], None] | None = None,
        personal: bool = False,
    ) -> ClientOutput:
        """H local steps from the global params; `batches` are host arrays [H, B, L].

        `r` is the silo's round (the root's round in a flat federation; in a tree, the silo's own count).
        `personal` (FedPer, tree.key_owner='silo'): the key layers stay with the silo: its upload carries
        no key-layer delta and the output's `keys` are its trained key layers.

        The steps run in chunks of `self.chunk` (one compiled program, state donated from
        chunk to chunk); chunk i's metrics are read only after chunk i+1 was dispatched, and
        passed to `progress(steps_done, metrics)`.
        """
        s = self.silo
        with jax.set_mesh(s.mesh):  # inner_state=reset: opt_state is None, client_init makes it
            state = self._init(global_params, private.get("opt_state"), self.step0(r))
        pending, chunks = None, []
        on_mesh = s.put_batch(batches, ndim=3)
        for i in range(0, self.H, self.chunk):
            state, metrics = s.local_train_chunk(state, on_mesh, np.int32(i), self.chunk)
            chunks.append(metrics)
            if pending is not None and progress is not None:
                progress(*pending)
            pending = (i + self.chunk, metrics)
        host = [{k: np.asarray(v) for k, v in jax.device_get(m).items()} for m in chunks]
        if progress is not None:
            progress(self.H, host[-1])
        keys = None
        with jax.set_mesh(s.mesh):
            if personal:
                payload, error, keys = self._final_personal(global_params, state.params, private.get("error"))
            else:
                payload, error = self._final(global_params, state.params, private.get("error"))
        metrics = {k: np.concatenate([m[k] for m in host]) for k in host[0]}
        return ClientOutput(
            payload=payload, error=error, opt_state=state.opt_state, metrics=metrics, keys=keys
        )

    def final(self, anchor, params, error):
        """A participant's upload from `anchor` (what it started from) and `params` (donated)."""
        with jax.set_mesh(self.silo.mesh):
            return self._final(anchor, params, error)

    def client_round_fn(self):
        """`client_round` bound to this federation, a pure function of (global params, opt state,
        error, step0, [H, B, L] batches): the silo-parallel simulation vmaps it."""
        s = self.silo
        return s._with_rules(
            functools.partial(
                client_round,
                step_fn=s.step_fn,
                tx=s.tx,
                method=self.method,
                block_size=self.block_size,
                reset_opt=not self.keep_opt,
            )
        )

    def check_update(self, payload) -> tuple[str | None, float]:
        """(why an in-memory update is refused, or None; its norm): non-finite, over the bound."""
        stats = {k: float(v) for k, v in self._payload_stats(payload).items()}
        if stats["nonfinite_frac"] > 0 or not math.isfinite(stats["norm"]):
            return f"{stats['nonfinite_frac']:.2%} of the update is NaN/Inf", stats["norm"]
        if self.max_norm is not None and stats["norm"] > self.max_norm:
            return (
                f"update norm {stats['norm']:.4g} exceeds federation.max_update_norm={self.max_norm:g}",
                stats["norm"],
            )
        return None, stats["norm"]

    # -- the tree's key layers: what each edge carries --------------------------------------------------
    @property
    def personal(self) -> bool:
        """FedPer: each silo keeps its own key layers (tree.key_owner='silo')."""
        return self.key_mask is not None and self.fed.tree.key_owner == "silo"

    @property
    def residual(self) -> bool:
        """WorldLM's residual embeddings: a sub-federation's key-layer residual travels to its parent."""
        return (
            self.key_mask is not None
            and self.fed.tree.key_owner == "federation"
            and bool(self.fed.tree.residual)
        )

    @property
    def key_order(self) -> list[str]:
        """The key leaves' paths in tree order (a silo's own key layers are kept as a list in it)."""
        return [] if self.key_mask is None else worldlm.key_names(self.abstract_params, self.key_mask)

    def keys_list(self, params) -> list:
        layers = worldlm.key_layers(params, self.key_mask)
        return [layers[n] for n in self.key_order]

    def keeps_keys(self, name: str) -> bool:
        """Whether participant `name` keeps its key layers: its upload carries none (exact zeros, not
        counted) and it downloads none."""
        if self.key_mask is None:
            return False
        return self.personal if name not in self.tree.nodes else not self.residual

    def up_bytes(self, name: str) -> int:
        """What `name`'s upload to its parent weighs (key leaves it keeps are not counted)."""
        return self.payload_bytes - (self.key_payload_bytes if self.keeps_keys(name) else 0)

    def down_bytes(self, name: str, r: int = 0) -> int:
        """What `name` downloads from its parent in round r (without the key layers it keeps; with residual
        embeddings a sub-federation also reads, from round 1 on, the key layers of every sub-federation
        of its parent: priced for all of them, an upper bound when one was not accepted)."""
        out = self.param_bytes - (self.key_param_bytes if self.keeps_keys(name) else 0)
        if self.residual and name in self.tree.nodes and r > 0:
            out += self.key_param_bytes * sum(c in self.tree.nodes for c in self.names)
        return out

    def key_share(self, name: str) -> int:
        """Bytes of key layers in `name`'s upload to its parent (0: its key layers stay)."""
        return 0 if self.key_mask is None or self.keeps_keys(name) else self.key_payload_bytes

    def key_template(self, tree: Any) -> Any:
        """`tree` (params-shaped, or a payload: a dict per param) pruned to its key leaves, nested like the
        params: what reads only the key layers of an update from the store."""
        paths = jax.tree_util.tree_flatten_with_path(self.key_mask)[0]
        items = jax.tree.structure(self.key_mask).flatten_up_to(tree)
        out: dict[str, Any] = {}
        for (path, m), x in zip(paths, items):
            if m:
                node = out
                for k in path[:-1]:
                    node = node.setdefault(k.key, {})
                node[path[-1].key] = x
        return out

    def weight(self, claimed_tokens: float, name: str | None = None) -> float:
        """A participant's weight in the mean: its claimed tokens, at most what a round can give it
        (a federation of the tree: what all its silos can give it)."""
        return min(float(claimed_tokens), self.token_caps.get(name, self.token_cap))

    def outlier_norms(self, norms: Mapping[str, float]) -> dict[str, str]:
        """Updates whose norm exceeds max_update_norm_ratio x the round's median (3 or more silos):
        one scaled, sign-flipped or noisy update cannot dominate the mean."""
        if not self.norm_ratio or len(norms) < 3:
            return {}
        median = float(np.median(list(norms.values())))
        if not median > 0:  # most silos sent nothing: no scale to compare against
            return {}
        bound = self.norm_ratio * median
        return {
            s: f"update norm {n:.4g} exceeds {self.norm_ratio:g} x the round's median norm {median:.4g}"
            for s, n in norms.items()
            if n > bound
        }

    # -- privacy and server-side clipping ------------------------------------------------------
    def privacy_fields(
        self, rounds_done: int, clipped: int, clip_norm: float | None = None
    ) -> dict[str, Any]:
        """The round row's privacy fields (empty unless DP or server-side clipping is on)."""
        out = self.dp_round.fields(
            rounds_done * self.dp_rounds_per_round,
            clipped,
            self.dp_round.initial_clip if clip_norm is None else clip_norm,
        )
        if self.clip_ratio:
            out["clipped"] = int(clipped)
        return out

    def server_weights(
        self, claimed: Mapping[str, float], norms: Mapping[str, float], clip_norm: float | None = None
    ) -> tuple[dict[str, float], float, int]:
        """(the weights to aggregate the accepted updates with, the factor the weighted mean is then
        multiplied by, how many updates were clipped).

        Without clipping: the capped token weights and 1. With a clip bound B (the round's DP clip
        `clip_norm`, default dp.clip_norm, or
        clip_norm_ratio x the round's median norm) each update is scaled by s_k = min(1, B/‖Δ_k‖),
        folded in as weight w_k·s_k; the factor Σ w_k s_k / D then gives Σ w_k s_k Δ_k / D with
        D = Σ w_k, or, under DP, every w_k = 1 and D = the expected number of silos per round (a
        fixed denominator: one silo's presence must not change the scale)."""
        base = {s: 1.0 if self.dp_here else self.weight(t, s) for s, t in claimed.items()}
        bound = None
        if self.dp_here:
            bound = self.dp_round.initial_clip if clip_norm is None else float(clip_norm)
        elif self.clip_ratio and norms:
            bound = self.clip_ratio * float(np.median([norms[s] for s in claimed]))
        if bound is None or not bound > 0:
            return base, 1.0, 0
        scales = {s: min(1.0, bound / norms[s]) if norms[s] > 0 else 1.0 for s in claimed}
        weights = {s: base[s] * scales[s] for s in claimed}
        denominator = float(self.expected_silos) if self.dp_here else sum(base.values())
        return weights, sum(weights.values()) / denominator, sum(v < 1.0 for v in scales.values())

    def finish_aggregate(
        self, mean, factor: float, r: int, noise_secret: bytes | None = None, clip_norm: float | None = None
    ):
        """The aggregate the outer step sees: mean x factor (server-side clipping), plus, under central
        DP, N(0, (z_Δ C/D)²) per coordinate (`RoundDP.noise_std`; z_Δ = σ without adaptive clipping)
        drawn from a key only the aggregator can derive."""
        if self.central_noise:
            if noise_secret is None:
                raise ValueError("central DP needs the aggregator's noise secret")
            key = privacy.noise_key(noise_secret, r, self.noise_name)
            std = self.dp_round.noise_std(
                self.dp_round.initial_clip if clip_norm is None else float(clip_norm)
            )
            return _scale_and_noise(mean, jnp.float32(factor), key, jnp.float32(std))
        if factor != 1.0:
            return _scale(mean, jnp.float32(factor))
        return mean

    def _root_gets_keys(self) -> bool:
        residual = bool(self.fed.tree.residual)
        return any(self.tree.is_silo(c) or residual for c in self.tree.root.children)

    @property
    def noise_name(self) -> str:
        """Whose noise this node draws: the root aggregator's, or a sub-federation's (one secret can
        serve every federation of a simulated tree: their keys differ by name)."""
        return "aggregator" if self.node == tree_lib.ROOT else f"aggregator/{self.node}"

    def rounds_allowed(self) -> int:
        """federation.rounds, or fewer under dp.epsilon_budget (refused with a tree: silo rounds would
        have to end inside a root round)."""
        return self.dp_round.rounds_allowed() // self.dp_rounds_per_round

    def privacy_summary(self, rounds_done: int, clip_norm: float) -> dict[str, Any]:
        """The run's DP summary after `rounds_done` rounds of this node (silo rounds are accounted)."""
        return {
            **self.dp_round.summary(rounds_done * self.dp_rounds_per_round, clip_norm),
            "unit": self.dp_unit,
        }

    def aggregate_keys(
        self,
        sent,
        deltas: Sequence[Mapping[str, Any]],
        weights: Sequence[float],
        norms: Sequence[float],
        r: int,
        noise_secret: bytes | None = None,
        clip_norm: float | None = None,
    ):
        """This federation's key layers after round r from its senders' key deltas (WorldLM,
        `worldlm.aggregate_keys`): (k_p, the children's k_c, the weights a), or None when they are the
        outer step's. Under DP (fedjax_lm/worldlm.py's docstring): without attention the key leaves of the
        noised mean are the release (None); with it, the attention mean of the clipped key deltas
        (`worldlm.private_key_deltas`; `norms` are the senders' whole-update norms) plus
        N(0, (eta 2 z C)^2) per coordinate, from the key (secret, round, node, "keys")."""
        t = self.fed.tree
        kw = dict(attention=bool(t.attention), temperature=float(t.temperature), step=float(t.step))
        if not self.dp_here:
            return worldlm.aggregate_keys(sent, deltas, weights, **kw)
        if not t.attention:
            return None
        if noise_secret is None:
            raise ValueError("central DP needs the aggregator's noise secret")
        clip = self.dp_round.initial_clip if clip_norm is None else float(clip_norm)
        clipped = [
            worldlm.private_key_deltas(d, min(1.0, clip / n) if n > 0 else 1.0, clip)
            for d, n in zip(deltas, norms)
        ]
        new, kids, a = worldlm.aggregate_keys(sent, clipped, weights, **kw)
        std = float(t.step) * 2.0 * self.dp_round.key_noise_multiplier * clip
        noise = privacy.gaussian_noise(privacy.noise_key(noise_secret, r, self.noise_name, "keys"), new, std)
        return {n: (new[n].astype(jnp.float32) + noise[n]).astype(new[n].dtype) for n in new}, kids, a

    # -- the aggregating node ----------------------------------------------------------------
    def aggregate(self, server: outer.OuterState, updates: Iterable[tuple[Any, float]], finish=None):
        """In memory (simulation): (payload, weight) pairs aggregated by `federation.aggregation`
        (`robust.aggregate_payloads`), then `finish` (see `finish_aggregate`), then `step`."""
        result = node_round(
            self,
            server,
            updates,
            aggregation=self.aggregation,
            trim_fraction=self.trim_fraction,
            finish=finish,
        )
        return result.state, result.diagnostics

    def step(self, server: outer.OuterState, mean, **diag):
        """The outer step on an aggregate computed elsewhere (streamed from the store: the mean, or the
        robust rule's result, stepped on alike), never publishing
        non-finite params: if the mean or the stepped params are not finite, the round closes
        without an update (params and outer state unchanged, the round counted) and says why."""
        new, out = self.algo.step(server, mean, **diag)
        if math.isfinite(out.get("delta_norm", math.inf)) and bool(self._all_finite(new.params)):
            return new, out
        out["skipped"] = "the aggregate or the stepped params are not finite: round closed without an update"
        return outer.OuterState(server.params, server.opt_state, server.round + 1), out

    def shared_moments(self, pairs: Iterable[tuple[Any, float]]):
        """Photon's option: every silo continues from the token-weighted mean of the moments."""
        shared = outer.aggregate_optimizer_moments(pairs)
        return jax.device_put(shared, self.silo.opt_shardings)

    # -- accounting ------------------------------------------------------------------------------
    def projected_flop(self) -> float:
        """Training compute the configured run will spend: rounds x silos per round x H x B x L tokens
        x `model.flops_per_token` (the compliance analysis projects Art. 51 from it)."""
        tokens = self.rounds * self.expected_silos * self.H * self.batch_size * self.seq_len
        return float(tokens * model_lib.flops_per_token(self.silo.model_config, self.seq_len))

    def round_row(
        self,
        r: int,
        accepted: Mapping[str, Mapping[str, float]],
        ledger: monitor.CommLedger,
        diag: Mapping[str, Any],
        *,
        update_norms: Mapping[str, float] | None = None,
        down_bytes: Mapping[str, int] | None = None,
        up_bytes: Mapping[str, int] | None = None,
        workers: int | None = None,
        **extra,
    ) -> dict[str, Any]:
        """The round's metrics row; `accepted` maps silo -> {tokens (its weight), loss (or None)}.

        `down_bytes` (silo -> bytes it downloaded this round; default: the f32 model for each accepted
        silo) and `up_bytes` (default: the upload's size) go to the ledger; the data-parallel equivalent is
        `workers` (default: the accepted participants) all-reducing for the round's H x leaf_rounds steps; with the shared inner moments both ways when they are aggregated. `update_norms` (silo -> L2 norm of its decoded upload, accepted or not) become
        `update_norm/<silo>`; `extra` is merged as is (e.g. `update_diagnostics`' fields).
        """
        tokens = {s: float(a["tokens"]) for s, a in accepted.items()}
        down = dict(down_bytes) if down_bytes is not None else {s: self.param_bytes for s in accepted}
        comm = ledger.record_round(
            r,
            down={s: b + (self.moment_bytes if s in accepted else 0) for s, b in down.items()},
            up={
                s: (self.payload_bytes if up_bytes is None else up_bytes[s]) + self.moment_bytes
                for s in accepted
            },
            dp_equivalent=monitor.dp_allreduce_bytes(
                self.param_bytes, self.H * self.leaf_rounds, len(accepted) if workers is None else workers
            ),
        )
        fpt = model_lib.flops_per_token(
            self.silo.model_config, self.seq_len
        )  # formula: model.flops_per_token
        loss = None
        reported = {s: a["loss"] for s, a in accepted.items() if a.get("loss") is not None and tokens[s] > 0}
        if reported:
            loss = float(np.average(list(reported.values()), weights=[tokens[s] for s in reported]))
        return {
            "round": r,
            "silos": len(accepted),
            "accepted": sorted(accepted),
            "tokens": sum(tokens.values()),
            "train_loss": loss,
            "flops": sum(tokens.values()) * fpt,
            **{f"flops/{s}": n * fpt for s, n in sorted(tokens.items())},
            "bytes_up": comm["bytes_up"],
            "bytes_down": comm["bytes_down"],
            **{f"bytes_up/{s}": b for s, b in sorted(comm["bytes_per_silo_up"].items())},
            **{f"bytes_down/{s}": b for s, b in sorted(comm["bytes_per_silo_down"].items())},
            "dp_equivalent_bytes": comm["dp_equivalent_bytes"],
            **{k: v for k, v in diag.items() if k.startswith("delta_")},
            **{f"update_norm/{s}": float(n) for s, n in sorted((update_norms or {}).items())},
            **extra,
        }

    def update_diagnostics(self, updates: Mapping[str, tuple[Any, float]]) -> dict[str, float]:
        """`update_geometry` of the accepted {silo: (payload, weight)} (in memory: the simulation)."""
        if not updates:
            return {}
        names = list(updates)
        gram = diagnostics.payload_gram([updates[n][0] for n in names], self.abstract_params)
        return diagnostics.update_geometry(gram, names, [updates[n][1] for n in names])


def _final_personal(global_params, local_params, error, *, mask, method, block_size):
    """FedPer's upload: Δ from the global backbone with the silo's own trained key layers as the anchor's
    (so the key leaves' delta is exactly zero and never travels), and those key layers."""
    flat_g, treedef = jax.tree.flatten(global_params)
    flat_l = treedef.flatten_up_to(local_params)
    anchor = jax.tree.unflatten(treedef, [l if m else g for g, l, m in zip(flat_g, flat_l, mask)])
    keys = [jnp.copy(l) for l, m in zip(flat_l, mask) if m]
    payload, new_error = client_final(anchor, local_params, error, method=method, block_size=block_size)
    return payload, new_error, keys
