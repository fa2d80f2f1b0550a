"""The outer (server) step: pseudo-gradients, token-weighted aggregation, outer optimizers.

Every function here is pure and jit-able on arbitrary pytrees of arrays; leaves are
mapped one by one with `jax.tree.map` (no flattening into one vector), so a sharded
param tree stays sharded.

Conventions
-----------
* A silo's pseudo-gradient is `Δ_k = θ_global − θ_k` (f32). The outer optimizer treats
  the token-weighted mean `Δ = Σ w_k Δ_k / Σ w_k` as a gradient: `θ ← θ + tx.update(Δ)`.
  With FedAvg (SGD, lr 1) that is `θ ← θ − Δ`, i.e. the weighted mean of the silo params.
* `WeightedMean` is a *running* mean: adding silo k updates
  `mean ← mean + (w_k / W_k) (Δ_k − mean)` with `W_k = W_{k-1} + w_k`. Memory is one
  model, whatever the number of silos. Compared with keeping `Σ w_k Δ_k` and dividing at
  the end, it (a) returns one silo's Δ bit-exactly (w/w == 1, whereas `(w·Δ)/w` differs
  from Δ in a few % of elements), and (b) never scales deltas by token counts.
* Empty aggregation (total weight 0): `weighted_mean_result` stays jit-able and returns
  zeros (never NaN); the error is raised by the host-side helper `ensure_nonempty(acc)`,
  which the orchestration calls before applying the outer step.

The fedjax shape used by `federation` maps onto these functions as::

    tx = make_outer_optimizer(cfg.outer)

    def init(params):                                   # -> server_state
      return outer_init(params, tx)

    def apply(server_state, silo_results):               # -> (server_state, diagnostics)
      acc = weighted_mean_init(server_state.params)
      for r in silo_results:                             # streamed: one Δ_k in memory
        acc = add(acc, r.delta, r.num_tokens)            # add = jax.jit(weighted_mean_add)
      ensure_nonempty(acc)                               # host check, raises ValueError
      mean_delta = weighted_mean_result(acc)
      server_state = step(server_state, mean_delta)      # jax.jit(outer_apply, static tx)
      return server_state, {"tokens": acc.weight, **delta_stats(mean_delta)}

`tx` is a NamedTuple of functions, hence hashable: jit `outer_apply` with
`static_argnames="tx"` (or close over it) and donate `state`.

Photon's option to also average the silos' inner optimizer moments is
`aggregate_optimizer_moments`, which streams the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
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


# ---------------------------------------------------------------- weighted mean


class WeightedMean(NamedTuple):
    """Running token-weighted mean of pseudo-gradients (see module docstring)."""

    mean: PyTree  # f32, same structure/shapes as one Δ
    weight: jax.Array  # f32 scalar: total weight (tokens) added so far


def weighted_mean_init(template: PyTree) -> WeightedMean:
    """An empty accumulator shaped (and, called eagerly, sharded) like `template`.

    `template` may hold arrays or `jax.ShapeDtypeStruct`s with shardings. Under `jit`, pass
    `out_shardings` (or use an explicit mesh) to place the zeros.
    """
    zeros = jax.tree.map(lambda x: jnp.zeros_like(x, dtype=jnp.float32), template)
    return WeightedMean(mean=zeros, weight=jnp.zeros((), jnp.float32))


def weighted_mean_add(acc: WeightedMean, delta: PyTree, weight: jax.typing.ArrayLike) -> WeightedMean:
    """Adds `delta` with `weight` (e.g. tokens seen).

    `weight` must be >= 0 (not checkable under jit). Weight 0 adds nothing: the delta's values
    are not used, so even a NaN-filled delta of a silo that saw no tokens leaves the mean intact.
    """
    w = jnp.asarray(weight, jnp.float32)
    total = acc.weight + w
    # w / total, with 0 when nothing has been added yet (avoids 0/0).
    frac = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)
    mean = jax.tree.map(
        lambda m, d: jnp.where(frac > 0, m + frac * (d.astype(jnp.float32) - m), m), acc.mean, delta
    )
    return WeightedMean(mean=mean, weight=total)


def weighted_mean_result(acc: WeightedMean) -> PyTree:
    """The weighted mean. Jit-able; zeros (not NaN) if nothing was added — see `ensure_nonempty`."""
    return acc.mean


def ensure_nonempty(acc: WeightedMean) -> None:
    """Host-side check (not jit-able): raises if the accumulator holds no weight."""
    weight = float(acc.weight)
    if not weight > 0:
        raise ValueError(
            f"weighted mean is empty (total weight {weight}): no silo contributed tokens this round"
        )


def aggregate_optimizer_moments(states_and_weights: Iterable[tuple[PyTree, jax.typing.ArrayLike]]) -> PyTree:
    """Token-weighted mean of inner optimizer states (Photon's "aggregate the moments" option).

    Takes an iterable of `(opt_state, weight)` and streams it (one state in memory besides the
    accumulator). Floating leaves (e.g. AdamW `mu`, `nu`) are averaged and cast back to their
    dtype; every other leaf (integer step counts) is taken from the first state.
    """
    it = iter(states_and_weights)
    try:
        first, first_weight = next(it)
    except StopIteration:
        raise ValueError("aggregate_optimizer_moments needs at least one (state, weight)") from None

    def floats(tree):
        return jax.tree.map(lambda x: x if jnp.issubdtype(x.dtype, jnp.floating) else None, tree)

    add = jax.jit(weighted_mean_add)
    acc = add(weighted_mean_init(floats(first)), floats(first), first_weight)
    for state, weight in it:
        acc = add(acc, floats(state), weight)
    ensure_nonempty(acc)
    mean = weighted_mean_result(acc)
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
