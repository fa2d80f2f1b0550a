"""The fixed-point ring of secure aggregation: reals in [−B, B] encoded in Z/2^b so that masked sums cancel
exactly (`fedjax_lm.secagg` explains the choice of scale and what the rounding costs).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

PyTree = Any
RING_BITS = (32, 64)


@dataclasses.dataclass(frozen=True)
class FixedPoint:
    """Encoding of reals in [−bound, bound] into Z/2^ring_bits, scale 2^frac_bits (see module doc)."""

    bound: float
    max_summands: int
    ring_bits: int = 32
    frac_bits: int = dataclasses.field(init=False)

    def __post_init__(self):
        if self.ring_bits not in RING_BITS:
            raise ValueError(f"ring_bits must be one of {RING_BITS}, got {self.ring_bits}")
        if not (self.bound > 0 and math.isfinite(self.bound)):
            raise ValueError(f"the fixed-point bound must be positive and finite, got {self.bound}")
        if self.max_summands < 1:
            raise ValueError(f"max_summands must be >= 1, got {self.max_summands}")
        limit = 2 ** (self.ring_bits - 1) - 1
        f = math.floor(math.log2(limit / (self.max_summands * self.bound)))
        while self.max_summands * int(np.rint(self.bound * 2.0**f)) > limit:
            f -= 1
        while self.max_summands * int(np.rint(self.bound * 2.0 ** (f + 1))) <= limit:
            f += 1
        object.__setattr__(self, "frac_bits", f)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32 if self.ring_bits == 32 else np.uint64)

    @property
    def signed_dtype(self) -> np.dtype:
        return np.dtype(np.int32 if self.ring_bits == 32 else np.int64)

    @property
    def scale(self) -> float:
        return 2.0**self.frac_bits

    @property
    def resolution(self) -> float:
        """The value of one ring unit; encoding rounds to within half of it."""
        return 2.0**-self.frac_bits


def elementwise_bound(
    clip_norm: float, noise_std: float = 0.0, num_coords: int = 1, tail: float = 1e-9
) -> float:
    """B = C + z·std with P(|N(0, std²)| > z·std for any of `num_coords` entries) ≤ `tail`.

    A clipped update has every entry ≤ C; the Gaussian share of distributed DP is unbounded, so B
    covers it except with probability `tail` per silo and round (add it to δ).
    """
    if noise_std == 0:
        return float(clip_norm)
    z = -statistics.NormalDist().inv_cdf(tail / (2 * max(1, num_coords)))
    return float(clip_norm) + z * float(noise_std)


def encode(tree: PyTree, fp: FixedPoint) -> tuple[PyTree, int]:
    """(ring tree, number of saturated entries): round(clip(x, ±B) · 2^f) mod 2^b, leaf by leaf.

    Non-finite entries raise ValueError (validate the update before encoding it).
    """
    saturated = 0

    def leaf(x):
        nonlocal saturated
        a = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError("cannot encode a non-finite update for secure aggregation")
        over = np.abs(a) > fp.bound
        saturated += int(np.count_nonzero(over))
        q = np.rint(np.clip(a, -fp.bound, fp.bound) * fp.scale).astype(np.int64)
        return np.asarray(q.astype(fp.dtype))  # two's complement, mod 2^b

    out = jax.tree.map(leaf, tree)
    return out, saturated


def decode(ring_tree: PyTree, fp: FixedPoint, count: int) -> PyTree:
    """The f32 sum of `count` encodings summed in the ring (exact up to the final f32 rounding)."""
    if not 1 <= count <= fp.max_summands:
        raise ValueError(
            f"decoding a sum of {count} encodings, but the ring is sized for at most {fp.max_summands}"
        )

    def leaf(x):
        signed = np.asarray(x, dtype=fp.dtype).view(fp.signed_dtype)
        return np.asarray(signed.astype(np.float64) * fp.resolution, dtype=np.float32)

    return jax.tree.map(leaf, ring_tree)


def ring_add(acc: PyTree, tree: PyTree) -> PyTree:
    """acc + tree mod 2^b, leaf by leaf (the aggregator's running sum of masked updates)."""
    return jax.tree.map(lambda a, b: np.asarray(np.add(a, b, dtype=np.asarray(a).dtype)), acc, tree)


def ring_sum(trees: Iterable[PyTree]) -> PyTree:
    """Σ trees mod 2^b."""
    it = iter(trees)
    acc = jax.tree.map(lambda a: np.array(a, copy=True), next(it))
    for t in it:
        acc = ring_add(acc, t)
    return acc
