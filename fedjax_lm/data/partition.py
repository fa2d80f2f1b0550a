"""Partitioners: which silo each document goes to. Pure: sizes + seed -> assignment.

Every function returns `assignment`, an int array with one silo index per document,
so each document lands in exactly one silo.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedjax_lm.data.errors import DataError

PARTITIONS = ("natural", "iid", "dirichlet")


def silo_names(num_silos: int) -> list[str]:
    return [f"silo-{i:02d}" for i in range(num_silos)]


def _cut_by_size(sizes: np.ndarray, order: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Walks documents in `order`, giving each silo a run of about targets[s] bytes.

    A document goes to the silo whose share of the cumulative size holds the
    document's midpoint, so whole documents approximate the byte targets.
    """
    assignment = np.empty(len(sizes), dtype=np.int64)
    sizes_in_order = sizes[order].astype(np.float64)
    midpoints = np.cumsum(sizes_in_order) - sizes_in_order / 2
    bounds = np.cumsum(targets, dtype=np.float64)
    bounds = bounds / bounds[-1] * sizes_in_order.sum()
    assignment[order] = np.minimum(np.searchsorted(bounds, midpoints, side="right"), len(targets) - 1)
    return assignment


def partition_natural(source_ids: Sequence[int]) -> np.ndarray:
    """One silo per source: the assignment is the source id."""
    return np.asarray(source_ids, dtype=np.int64).copy()


def partition_iid(sizes: Sequence[int], num_silos: int, seed: int) -> np.ndarray:
    """Pools all documents, shuffles them (seeded), cuts the run into num_silos equal-byte parts."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if num_silos < 1:
        raise DataError(f"num_silos must be >= 1, got {num_silos}")
    if len(sizes) < num_silos:
        raise DataError(f"{len(sizes)} documents cannot fill {num_silos} silos")
    order = np.random.default_rng(seed).permutation(len(sizes))
    return _cut_by_size(sizes, order, np.ones(num_silos))


def sinkhorn(weights: np.ndarray, row_sums: np.ndarray, col_sums: np.ndarray, iters: int = 500) -> np.ndarray:
    """Scales rows and columns of a positive matrix to the given sums, keeping its pattern."""
    m = weights.astype(np.float64)
    for _ in range(iters):
        m *= (row_sums / m.sum(axis=1))[:, None]
        m *= (col_sums / m.sum(axis=0))[None, :]
    return m


def dirichlet_mixes(num_silos: int, num_sources: int, alpha: float, seed: int) -> np.ndarray:
    """[num_silos, num_sources]: each silo's mix over sources ~ Dirichlet(alpha)."""
    if alpha <= 0:
        raise DataError(f"dirichlet_alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(num_sources, float(alpha)), size=num_silos)


def partition_dirichlet(
    source_ids: Sequence[int], sizes: Sequence[int], num_silos: int, alpha: float, seed: int
) -> np.ndarray:
    """num_silos silos whose mixes over sources are drawn from Dirichlet(alpha).

    Each silo j draws q_j ~ Dir(alpha). Sinkhorn scaling turns the q's into a
    bytes-per-(silo, source) plan with equal silo sizes and every source fully used,
    keeping the q's pattern (a silo that drew mostly source k gets mostly k). Each
    source's documents are then shuffled (seeded) and cut to that plan. Small alpha:
    silos dominated by one or two sources; large alpha: close to iid.
    """
    source_ids = np.asarray(source_ids, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    if num_silos < 1:
        raise DataError(f"num_silos must be >= 1, got {num_silos}")
    if len(sizes) < num_silos:
        raise DataError(f"{len(sizes)} documents cannot fill {num_silos} silos")
    num_sources = int(source_ids.max()) + 1
    mixes = dirichlet_mixes(num_silos, num_sources, alpha, seed)
    source_bytes = np.bincount(source_ids, weights=sizes, minlength=num_sources)
    present = source_bytes > 0
    plan = np.zeros_like(mixes)
    plan[:, present] = sinkhorn(
        np.maximum(mixes[:, present], 1e-12),
        np.full(num_silos, source_bytes.sum() / num_silos),
        source_bytes[present],
    )
    rng = np.random.default_rng([seed, 1])
    assignment = np.empty(len(sizes), dtype=np.int64)
    for k in np.flatnonzero(present):
        docs = np.flatnonzero(source_ids == k)
        order = docs[rng.permutation(len(docs))]
        local = _cut_by_size(sizes, order, np.maximum(plan[:, k], 0))
        assignment[order] = local[order]
    return assignment


def silo_mix(
    assignment: np.ndarray, source_ids: Sequence[int], sizes: Sequence[int], num_silos: int, num_sources: int
) -> np.ndarray:
    """[num_silos, num_sources] fraction of each silo's bytes from each source."""
    bytes_ = np.zeros((num_silos, num_sources))
    np.add.at(bytes_, (assignment, np.asarray(source_ids)), np.asarray(sizes, dtype=np.float64))
    return bytes_ / np.maximum(bytes_.sum(axis=1, keepdims=True), 1)
