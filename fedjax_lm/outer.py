"""Aggregation: pseudo-gradients, the running token-weighted mean, outer optimizers, moments.

This is the one module that turns the silos' updates into the next global params; the
one-process simulation, the store's streaming aggregation and every node of a federation
tree use it.

Conventions
-----------
* A silo's pseudo-gradient is `Δ_k = θ_global − θ_k` (f32). The outer optimizer treats
  the token-weighted mean `Δ = Σ w_k Δ_k / Σ w_k` as a gradient: `θ ← θ + tx.update(Δ)`.
  With FedAvg (SGD, lr 1) that is `θ ← θ − Δ`, i.e. the weighted mean of the silo params.
* The mean is a *running* mean folded one update at a time:
  `mean ← (1 − w_k / W_k) mean + (w_k / W_k) decode(payload_k)` with `W_k = W_{k-1} + w_k`, the
  factors computed host-side in f32 (`running_fractions`) and the fold done by one XLA kernel
  (`fold_into_mean`) that also decodes the compressed payload. Memory is one model, whatever
  the number of silos; one silo's Δ comes back bit-exactly (w/w == 1); deltas are never
  scaled by token counts. The store's streaming aggregation (`store.aggregate`) uses the
  same factors and kernel, so the simulation and the deployment agree bit for bit.
* `OuterAlgorithm` has fedjax's shape: `init(params) -> OuterState` and
  `step(state, mean) -> (state, diagnostics)`, the outer step on a mean computed by
  `mean_of_payloads` (in memory, `node.node_round`) or streamed from the store.

Photon's option to also average the silos' inner optimizer moments is
`aggregate_optimizer_moments`, which streams through the same running mean.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

PyTree = Any

OUTER_OPTIMIZERS = ("fedavg", "fedmom", "diloco", "nesterov", "fedadam", "fedyogi")

_FIELDS = {
    "name",
    "lr",
    "momentum",
    "b1",
    "b2",
    "eps",
    "schedule",
    "warmup_rounds",
    "total_rounds",
    "end_lr_ratio",
}
_SCHEDULES = ("constant", "cosine")


# --------------------------------------------------------------------------- deltas


def pseudo_gradient(global_params: PyTree, local_params: PyTree) -> PyTree:
    """Δ = global − local, in f32, leaf by leaf."""
    return jax.tree.map(
        lambda g, l: g.astype(jnp.float32) - l.astype(jnp.float32), global_params, local_params
    )


def delta_stats(delta: PyTree) -> dict[str, jax.Array]:
    """Jit-able diagnostics of an update: global L2 norm, max |x|, fraction of non-finite entries.

    Non-finite entries propagate into `norm` and `max_abs` on purpose (NaN there is a signal);
    `nonfinite_frac` says how much of the update is affected.
    """
    leaves = [x for x in jax.tree.leaves(delta) if x.size > 0]
    if not leaves:
        zero = jnp.zeros((), jnp.float32)
        return {"norm": zero, "max_abs": zero, "nonfinite_frac": zero}
    total = sum(x.size for x in leaves)
    max_abs = jnp.max(jnp.stack([jnp.max(jnp.abs(x)).astype(jnp.float32) for x in leaves]))
    # Per-leaf int32 counts (a leaf has < 2**31 entries), summed in f32 across leaves.
    bad = sum(jnp.sum(~jnp.isfinite(x)).astype(jnp.float32) for x in leaves)
    return {
        "norm": optax.tree.norm(delta).astype(jnp.float32),
        "max_abs": max_abs,
        "nonfinite_frac": bad / float(total),
    }


# ---------------------------------------------------------------- running mean


def next_fraction(total: np.float32, weight: float) -> tuple[np.float32, np.float32]:
    """One step of the running mean's factors: (new f32 total W_k, w_k / W_k), host-side."""
    w32 = np.float32(weight)
    total = np.float32(total + w32)
    return total, (np.float32(w32 / total) if total > 0 else np.float32(0.0))


def running_fractions(weights: Sequence[float]) -> list[np.float32]:
    """w_k / W_k for every k, with W_k the f32 running total.

    Both aggregation paths (in memory and streamed from the store) use these exact factors
    and `fold_into_mean`, so they produce bit-identical means.
    """
    total, out = np.float32(0.0), []
    for w in weights:
        total, frac = next_fraction(total, w)
        out.append(frac)
    return out


def decode_payload_leaf(payload_leaf: dict[str, jax.Array], shape: tuple[int, ...]) -> jax.Array:
    """The f32 values of one payload leaf ({"x"} f32/bf16, or int8 {"q", "scale"}), shaped `shape`.

    Traced inside every aggregation kernel (`fold_into_mean`, `robust.median_leaf`,
    `robust.trimmed_mean_leaf`), so all rules and both drivers decode an upload identically.
    Shapes are the caller's to check (`compression.decompress`, `store.aggregate`).
    """
    if set(payload_leaf) == {"x"}:
        return payload_leaf["x"].astype(jnp.float32)
    q, scale = payload_leaf["q"], payload_leaf["scale"]
    x = q.astype(jnp.float32) * scale.astype(jnp.float32)[:, None]
    return x.reshape(-1)[: math.prod(shape)].reshape(shape)


@functools.partial(jax.jit, donate_argnums=0)
def fold_into_mean(mean: jax.Array, payload_leaf: dict[str, jax.Array], frac: jax.Array) -> jax.Array:
    """(1 − frac) · mean + frac · decode(payload_leaf), decoding fused into the same kernel.

    `payload_leaf` is one leaf of a `compression` payload ({"x"} or {"q", "scale"}). Written as a
    convex combination, not `mean + frac · (x − mean)`, so finite inputs near the f32 limits never
    overflow (x − mean can); frac = 1 still returns x exactly.
    """
    x = decode_payload_leaf(payload_leaf, mean.shape)
    return (1.0 - frac) * mean + frac * x


def mean_of_payloads(template: PyTree, items: Iterable[tuple[PyTree, float]]) -> tuple[PyTree, float, int]:
    """Token-weighted mean of payloads streamed one at a time: (mean f32 tree, total weight, count).

    `template` gives shapes and shardings (the global params). Memory is one model whatever
    the number of items. Raises ValueError when the total weight is not positive.
    """
    mean = jax.tree.map(
        lambda p: jnp.zeros(p.shape, jnp.float32, device=getattr(p, "sharding", None)), template
    )
    total, n = np.float32(0.0), 0
    for payload, weight in items:
        total, frac = next_fraction(total, weight)
        mean = jax.tree.map(lambda m, pl: fold_into_mean(m, pl, frac), mean, payload)
        n += 1
    if not total > 0:
        raise ValueError(f"nothing to aggregate: {n} updates with total weight {float(total)}")
    return mean, float(total), n


def aggregate_optimizer_moments(states_and_weights: Iterable[tuple[PyTree, float]]) -> PyTree:
    """Token-weighted mean of inner optimizer states (Photon's "aggregate the moments" option).

    Streams `(opt_state, weight)` pairs through the same running mean as the pseudo-gradients.
    Floating leaves (AdamW `mu`, `nu`) are averaged and cast back to their dtype; every other
    leaf (integer step counts) is taken from the first state.
    """
    it = iter(states_and_weights)
    try:
        first, first_weight = next(it)
    except StopIteration:
        raise ValueError("aggregate_optimizer_moments needs at least one (state, weight)") from None

    def floats(tree):
        return jax.tree.map(lambda x: {"x": x} if jnp.issubdtype(x.dtype, jnp.floating) else None, tree)

    template = jax.tree.map(lambda x: x if jnp.issubdtype(x.dtype, jnp.floating) else None, first)
    pairs = ((floats(s), w) for s, w in itertools.chain([(first, first_weight)], it))
    mean, _, _ = mean_of_payloads(template, pairs)
    return jax.tree.map(
        lambda m, f: f if m is None else m.astype(f.dtype), mean, first, is_leaf=lambda x: x is None
    )


# ------------------------------------------------------------ outer optimizers


def default_outer_config(name: str = "diloco") -> ml_collections.ConfigDict:
    """Literature defaults for each outer optimizer.

    fedavg: SGD lr 1 (McMahan et al.; Photon's default). fedmom: heavy-ball SGD lr 1,
    momentum 0.9. diloco/nesterov: SGD Nesterov lr 0.7, momentum 0.9 (Douillard et al.).
    fedadam/fedyogi: lr 1e-2, b1 0.9, b2 0.99, eps (Reddi et al.'s τ) 1e-3.
    """
    _check_name(name)
    cfg = dict(
        name=name,
        lr=1.0,
        momentum=0.0,
        b1=0.9,
        b2=0.99,
        eps=1e-3,
        schedule="constant",  # "constant" | "cosine"
        warmup_rounds=0,  # linear warm-up from lr/warmup_rounds to lr (no lr-0 round)
        total_rounds=0,  # cosine: rounds until lr reaches lr * end_lr_ratio
        end_lr_ratio=0.0,
    )
    if name == "fedmom":
        cfg.update(lr=1.0, momentum=0.9)
    elif name in ("diloco", "nesterov"):
        cfg.update(lr=0.7, momentum=0.9)
    elif name in ("fedadam", "fedyogi"):
        cfg.update(lr=1e-2)
    return ml_collections.ConfigDict(cfg)


def _check_name(name: str) -> None:
    if name not in OUTER_OPTIMIZERS:
        raise ValueError(f"unknown outer optimizer {name!r}; valid names: {', '.join(OUTER_OPTIMIZERS)}")


def _resolved(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Config fields over the named defaults, validated."""
    cfg = dict(cfg)
    unknown = set(cfg) - _FIELDS
    if unknown:
        raise ValueError(f"outer config has unknown fields {sorted(unknown)}; valid: {sorted(_FIELDS)}")
    if "name" not in cfg:
        raise ValueError(f"outer config needs a name; valid names: {', '.join(OUTER_OPTIMIZERS)}")
    full = default_outer_config(cfg["name"]).to_dict()
    full.update(cfg)
    if not full["lr"] > 0:
        raise ValueError(f"outer lr must be positive, got {full['lr']}")
    if full["schedule"] not in _SCHEDULES:
        raise ValueError(f"outer schedule must be one of {_SCHEDULES}, got {full['schedule']!r}")
    if full["warmup_rounds"] < 0:
        raise ValueError(f"outer warmup_rounds must be >= 0, got {full['warmup_rounds']}")
    if full["schedule"] == "cosine" and not full["total_rounds"] > full["warmup_rounds"]:
        raise ValueError(
            "outer cosine schedule needs total_rounds > warmup_rounds, got "
            f"{full['total_rounds']} and {full['warmup_rounds']}"
        )
    if full["name"] == "fedavg" and full["momentum"]:
        raise ValueError("fedavg takes no momentum (got %r); use 'fedmom' or 'diloco'" % full["momentum"])
    return full


def outer_lr_schedule(cfg: Mapping[str, Any]) -> optax.ScalarOrSchedule:
    """Outer learning rate per round (the optimizer's update count).

    Warm-up is linear from lr/warmup_rounds (round 0) to lr (round warmup_rounds − 1), so
    no round is wasted at lr 0. 'cosine' then decays from lr to lr·end_lr_ratio at round
    total_rounds and stays there. A constant schedule without warm-up is a plain float.
    """
    full = _resolved(cfg)
    lr, warmup = float(full["lr"]), int(full["warmup_rounds"])
    if full["schedule"] == "constant" and warmup == 0:
        return lr
    end = lr * float(full["end_lr_ratio"])
    decay = int(full["total_rounds"]) - warmup

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        warm = lr * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
        if full["schedule"] == "constant":
            return warm
        t = jnp.clip((step - warmup) / decay, 0.0, 1.0)
        cos = end + (lr - end) * 0.5 * (1.0 + jnp.cos(math.pi * t))
        return jnp.where(step < warmup, warm, cos)

    return schedule


def make_outer_optimizer(cfg: Mapping[str, Any]) -> optax.GradientTransformation:
    """The outer optimizer named by `cfg.name`, applied to the mean pseudo-gradient as a gradient.

    * fedavg: `optax.sgd(lr)`.
    * fedmom: `optax.sgd(lr, momentum)` (heavy ball: t ← μt + Δ; θ ← θ − lr·t).
    * diloco / nesterov: `optax.sgd(lr, momentum, nesterov=True)`, as PyTorch's SGD Nesterov:
      t ← μt + Δ; θ ← θ − lr·(Δ + μt).
    * fedadam: `optax.adam(lr, b1, b2, eps)`; fedyogi: `optax.yogi(lr, b1, b2, eps)`. Reddi et
      al. (2021) Alg. 2 with τ = eps, but *with* optax's bias correction (m̂ = m/(1−b1^t),
      v̂ = v/(1−b2^t)); Yogi starts m and v at optax's 1e-6 (= τ² for the default τ = 1e-3,
      Reddi et al.'s v_{-1} ≥ τ²).
    Fields not used by the named optimizer are ignored, except a non-zero fedavg momentum
    (an error: it would silently be dropped).
    """
    full = _resolved(cfg)
    name = full["name"]
    lr = outer_lr_schedule(full)
    if name == "fedavg":
        return optax.sgd(lr)
    if name == "fedmom":
        return optax.sgd(lr, momentum=full["momentum"])
    if name in ("diloco", "nesterov"):
        return optax.sgd(lr, momentum=full["momentum"], nesterov=True)
    if name == "fedadam":
        return optax.adam(lr, b1=full["b1"], b2=full["b2"], eps=full["eps"])
    if name == "fedyogi":
        return optax.yogi(lr, b1=full["b1"], b2=full["b2"], eps=full["eps"])
    raise AssertionError(name)  # _resolved checked the name


class OuterState(NamedTuple):
    params: PyTree
    opt_state: optax.OptState
    round: jax.Array  # int32 scalar: number of outer steps applied


def outer_init(params: PyTree, tx: optax.GradientTransformation) -> OuterState:
    return OuterState(params=params, opt_state=tx.init(params), round=jnp.zeros((), jnp.int32))


def outer_apply(state: OuterState, mean_delta: PyTree, tx: optax.GradientTransformation) -> OuterState:
    """One outer step: θ ← θ + tx.update(Δ) (θ − lr·Δ for FedAvg). Params keep their dtype."""
    updates, opt_state = tx.update(mean_delta, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return OuterState(params=params, opt_state=opt_state, round=state.round + 1)


class OuterAlgorithm:
    """init(params) -> OuterState; step(state, mean) -> (state, diagnostics)."""

    def __init__(self, outer_cfg: Mapping[str, Any]):
        self.tx = make_outer_optimizer(outer_cfg)
        # Not donated: the caller keeps the old state to fall back on if the step is not finite.
        self._step = jax.jit(functools.partial(outer_apply, tx=self.tx))
        self._stats = jax.jit(delta_stats)
        self._init = jax.jit(functools.partial(outer_init, tx=self.tx))

    def init(self, params: PyTree) -> OuterState:
        return self._init(params)

    def step(self, state: OuterState, mean_delta: PyTree, **diag) -> tuple[OuterState, dict[str, Any]]:
        """The outer step on an aggregated mean pseudo-gradient, with its diagnostics."""
        stats = {k: float(v) for k, v in self._stats(mean_delta).items()}
        state = self._step(state, mean_delta)
        return state, {**diag, **{f"delta_{k}": v for k, v in stats.items()}}
