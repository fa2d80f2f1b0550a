"""The aggregating node: "my state + my children's updates" -> "my new params + my update upward".

A flat federation is a tree of depth one: the aggregator is its root node and its children
are silos. A federation of federations (WorldLM) nests nodes: an inner node aggregates its
children like a root, then reports its own pseudo-gradient (anchor − θ_node) to its parent as a
silo would. `node_round` is that step for any node; both drivers' roots go through it
(`Federation.aggregate` in memory) or through the same `step` (`deploy.aggregator`, streamed).

The children's updates are aggregated by the node's rule (`robust.aggregate_payloads`): the
token-weighted running mean holds one model whatever the number of children; the median and the
trimmed mean hold the children's K payloads until every leaf is reduced (K × the compressed model;
each leaf is then decoded, sorted across the K children and reduced in one fused pass).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from fedjax_lm import compression
from fedjax_lm import outer
from fedjax_lm import robust
from fedjax_lm.client import client_final


@dataclasses.dataclass
class NodeResult:
    state: outer.OuterState  # the node's state after the outer step
    weight: float  # the total weight of the children it aggregated (its own weight upward)
    to_parent: Any  # compressed Δ_node = anchor − θ_node, or None at the root
    error: Any  # the node's error-feedback residual toward its parent (or None)
    diagnostics: dict[str, Any]


def node_round(
    algo,
    state: outer.OuterState,
    children: Iterable[tuple[Any, float]],
    *,
    anchor: Any = None,
    error: Any = None,
    method: str = "none",
    block_size: int = compression.DEFAULT_BLOCK_SIZE,
    aggregation: str = "mean",
    trim_fraction: float = robust.DEFAULT_TRIM_FRACTION,
    finish: Callable[[Any], Any] | None = None,
) -> NodeResult:
    """One node's round: aggregate its children's (payload, weight), step, report upward.

    `algo` is anything with `step(state, mean, **diag) -> (state, diagnostics)`: an
    `outer.OuterAlgorithm`, or a `Federation` (whose step never publishes non-finite params).
    `anchor` is the params this node received from its parent at the start of the parent's
    round; with it, the node's update to its parent is its own pseudo-gradient
    `anchor − θ_node` (compressed like a silo's, with the node's error feedback) and its
    weight the total weight of its children. The root has no anchor and returns None.
    `aggregation` ("mean", "median", "trimmed_mean") and `trim_fraction` are the node's rule
    (`robust`); the outer step is applied to its result whatever the rule. `finish`, if given,
    turns the aggregate into what the outer step sees (`Federation.finish_aggregate`: the
    rescaling of server-side clipping, and central DP noise).
    """
    mean, total, n = robust.aggregate_payloads(state.params, children, aggregation, trim_fraction)
    if finish is not None:
        mean = finish(mean)
    state, diag = algo.step(state, mean, tokens=total, silos=n)
    to_parent = new_error = None
    if anchor is not None:
        to_parent, new_error = client_final(anchor, state.params, error, method=method, block_size=block_size)
    return NodeResult(state, total, to_parent, new_error, diag)
