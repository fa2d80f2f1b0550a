"""Robust aggregation rules: the coordinate-wise median and trimmed mean of the silos' updates.

`federation.aggregation` chooses how a node turns its K accepted children's decoded
pseudo-gradients Δ_1..Δ_K into the one Δ the outer optimizer steps on:

* ``"mean"`` (default) — the token-weighted running mean, `outer.fold_into_mean`.
* ``"median"`` — per coordinate, the median of the K values: the middle value for odd K, the
  mean of the two middle values for even K (computed as ``0.5·a + 0.5·b``: exactly np.median's
  ``(a + b) / 2`` for finite values, and it cannot overflow).
* ``"trimmed_mean"`` — per coordinate, sort the K values, drop the t smallest and the t largest
  and average the K − 2t others, with t = `trim_count(K, federation.trim_fraction)`:
  ``t = ⌊trim_fraction · K⌋``, raised to 1 when trim_fraction > 0 and K ≥ 3, so every positive
  fraction drops at least one value at each end whenever at least one value is left
  (K = 1 or 2: nothing is dropped). trim_fraction is in [0, 0.5); 0 is the unweighted mean.
  The kept values are averaged in ascending order with the same convex running mean as
  `outer.fold_into_mean` (factors 1/j in f32): finite inputs never overflow, and with two kept
  values it is the median's ``0.5·a + 0.5·b``.

Weights: the median and the trimmed mean ignore token weights — each accepted silo counts once
(a token-weighted median would let one silo that claims many tokens decide alone). The weights
still decide *which* silos are aggregated: a weight-0 silo is left out, as the mean leaves it
out, and the node reports the total weight of its children upward whatever the rule.

Leaf by leaf: `median_leaf` and `trimmed_mean_leaf` take the K silos' payload leaves of one param
(as uploaded: ``{"x"}`` f32/bf16 or int8 ``{"q", "scale"}``), decode each with
`outer.decode_payload_leaf` (the decoder of the mean's kernel), sort the K values of every
coordinate with a sorting network of elementwise min/max (Batcher's odd-even merge sort,
`sorting_network`; XLA fuses it into one pass over the leaf — ~200x faster on CPU than
`jnp.sort` along the silo axis, which XLA:CPU runs as one tiny sort per coordinate) and reduce.
Memory: the K payload copies of one leaf and the f32 result, never K models (XLA:CPU fuses the
decoding, the network and the reduction into one loop without temporaries; a backend that did not
would add at most K decoded f32 copies of the leaf).

Both drivers call these kernels with the silos in the same order, so they agree bit for bit:
in memory `aggregate_payloads` (`node.node_round`; the simulation keeps the round's K payloads
until it has aggregated them, which it does anyway to check them) and streamed from the store,
`store.aggregate.stream_robust_aggregate` (every accepted silo's copy of one leaf read at once).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lm import outer

PyTree = Any

RULES = ("mean", "median", "trimmed_mean")
DEFAULT_TRIM_FRACTION = 0.1


def check_rule(aggregation: Any, trim_fraction: Any) -> None:
    """`federation.aggregation` and `federation.trim_fraction`; errors name the field."""
    if aggregation not in RULES:
        raise ValueError(f"federation.aggregation must be one of {RULES}, got {aggregation!r}")
    ok = isinstance(trim_fraction, (int, float, np.number)) and not isinstance(trim_fraction, bool)
    if not ok or not 0 <= float(trim_fraction) < 0.5:
        raise ValueError(
            "federation.trim_fraction (the fraction of silos dropped at each end per coordinate) "
            f"must be a number in [0, 0.5), got {trim_fraction!r}"
        )


def trim_count(k: int, trim_fraction: float) -> int:
    """t, the values dropped at *each* end of every coordinate's K sorted values.

    ⌊trim_fraction · K⌋ (plus 1e-9 before the floor, so 0.29 · 100 = 28.999999999999996 drops
    29), at least 1 when trim_fraction > 0 and K ≥ 3, and at most (K − 1) // 2 so that at least
    one value is kept.
    """
    t = math.floor(trim_fraction * k + 1e-9)
    if trim_fraction > 0:
        t = max(t, 1)
    return max(0, min(t, (k - 1) // 2))


@functools.cache
def sorting_network(k: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchange pairs (i, j), i < j, that sort any k values: Batcher's odd-even merge sort
    for arbitrary k (Knuth, TAOCP vol. 3, 5.2.2, Algorithm M), about k·log²(k)/4 pairs."""
    pairs = []
    t = max(1, (k - 1).bit_length())
    p = 1 << (t - 1)
    while p > 0:
        q, r, d = 1 << (t - 1), 0, p
        while d > 0:
            pairs.extend((i, i + d) for i in range(k - d) if i & p == r)
            d, q, r = q - p, q >> 1, p
        p >>= 1
    return tuple(pairs)


def _sorted_values(payload_leaves: Sequence[dict[str, jax.Array]], shape: tuple[int, ...]) -> list[jax.Array]:
    """The K decoded leaves, rearranged so that out[i] holds every coordinate's i-th smallest value."""
    xs = [outer.decode_payload_leaf(p, shape) for p in payload_leaves]
    for i, j in sorting_network(len(xs)):
        xs[i], xs[j] = jnp.minimum(xs[i], xs[j]), jnp.maximum(xs[i], xs[j])
    return xs


def _running_mean(values: Sequence[jax.Array]) -> jax.Array:
    """The convex running mean of `outer.fold_into_mean` with equal weights (factor 1/j, f32)."""
    mean = values[0]
    for j, x in enumerate(values[1:], start=2):
        frac = np.float32(1.0) / np.float32(j)
        mean = (1.0 - frac) * mean + frac * x
    return mean


@functools.partial(jax.jit, static_argnames="shape")
def median_leaf(payload_leaves: Sequence[dict[str, jax.Array]], shape: tuple[int, ...]) -> jax.Array:
    """Coordinate-wise median (f32, `shape`) of K payload leaves; even K: 0.5·a + 0.5·b of the
    two middle values. XLA drops the compare-exchanges the middle values do not depend on."""
    ys = _sorted_values(payload_leaves, shape)
    k = len(ys)
    if k % 2:
        return ys[k // 2]
    return _running_mean(ys[k // 2 - 1 : k // 2 + 1])


@functools.partial(jax.jit, static_argnames=("shape", "trim"))
def trimmed_mean_leaf(
    payload_leaves: Sequence[dict[str, jax.Array]], shape: tuple[int, ...], trim: int
) -> jax.Array:
    """Coordinate-wise mean (f32, `shape`) of the K payload leaves' values without the `trim`
    smallest and `trim` largest (2·trim < K), averaged in ascending order."""
    ys = _sorted_values(payload_leaves, shape)
    if not 0 <= 2 * trim < len(ys):
        raise ValueError(f"cannot drop {trim} of {len(ys)} values at each end")
    return _running_mean(ys[trim : len(ys) - trim])


def reduce_leaf(
    rule: str, payload_leaves: Sequence[dict[str, jax.Array]], shape: tuple[int, ...], trim_fraction: float
) -> jax.Array:
    """One param leaf aggregated by a robust `rule` from its K payload leaves (in silo order)."""
    shape = tuple(int(n) for n in shape)
    if rule == "median":
        return median_leaf(list(payload_leaves), shape)
    if rule == "trimmed_mean":
        trim = trim_count(len(payload_leaves), trim_fraction)
        return trimmed_mean_leaf(list(payload_leaves), shape, trim)
    raise ValueError(f"reduce_leaf takes a robust rule ('median' or 'trimmed_mean'), got {rule!r}")


def robust_of_payloads(
    template: PyTree, items: Iterable[tuple[PyTree, float]], rule: str, trim_fraction: float
) -> tuple[PyTree, float, int]:
    """`rule` applied leaf by leaf to the payloads of weight > 0: (f32 tree, total weight, count).

    Holds every item's payload (the round's K uploads) until the last leaf is reduced. Results are
    placed with the template's shardings. Raises ValueError when the total weight is not positive.
    """
    total, n, kept = np.float32(0.0), 0, []
    for payload, weight in items:
        total, _ = outer.next_fraction(total, weight)  # the mean's f32 total, reported upward
        n += 1
        if weight > 0:
            kept.append(payload)
    if not total > 0:
        raise ValueError(f"nothing to aggregate: {n} updates with total weight {float(total)}")
    like, treedef = jax.tree_util.tree_flatten(template)
    by_silo = [treedef.flatten_up_to(p) for p in kept]
    out = []
    for i, x in enumerate(like):
        y = reduce_leaf(rule, [leaves[i] for leaves in by_silo], tuple(x.shape), trim_fraction)
        sharding = getattr(x, "sharding", None)
        out.append(y if sharding is None else jax.device_put(y, sharding))
    return jax.tree_util.tree_unflatten(treedef, out), float(total), n


def aggregate_payloads(
    template: PyTree,
    items: Iterable[tuple[PyTree, float]],
    rule: str = "mean",
    trim_fraction: float = DEFAULT_TRIM_FRACTION,
) -> tuple[PyTree, float, int]:
    """The in-memory aggregation of (payload, weight) pairs by `rule`: (f32 tree, total weight, count).

    "mean" is `outer.mean_of_payloads` (one model in memory, streamed); the robust rules are
    `robust_of_payloads` (the K payloads held until the end).
    """
    if rule == "mean":
        return outer.mean_of_payloads(template, items)
    if rule not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}; valid: {', '.join(RULES)}")
    return robust_of_payloads(template, items, rule, trim_fraction)
