"""Pure document selection: per-source caps, tokenizer samples, validation splits.

All take document sizes (bytes) and a seed and return indices or masks.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np


def rng_for(seed: int, name: str, purpose: str) -> np.random.Generator:
    """A generator that depends on the seed, a silo/source name and a purpose only."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode()), zlib.crc32(purpose.encode())])


def cap_by_bytes(sizes: Sequence[int], max_bytes: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (ascending) of whole documents, a random sample of total <= max_bytes.

    Documents are visited in random order; each is kept if it still fits. 0 = keep all.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if max_bytes <= 0 or sizes.sum() <= max_bytes:
        return np.arange(len(sizes))
    order = rng.permutation(len(sizes))
    keep, total = [], 0
    for i in order:
        if total + sizes[i] <= max_bytes:
            keep.append(i)
            total += sizes[i]
            if total == max_bytes:
                break
    return np.sort(np.asarray(keep, dtype=np.int64))


def sample_by_bytes(sizes: Sequence[int], budget: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (ascending) of a random run of documents totalling about `budget` bytes."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if budget <= 0 or sizes.sum() <= budget:
        return np.arange(len(sizes))
    order = rng.permutation(len(sizes))
    n = int(np.searchsorted(np.cumsum(sizes[order]), budget)) + 1
    return np.sort(order[:n])


def val_mask(sizes: Sequence[int], val_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Which documents of a silo are validation: about val_fraction of its bytes.

    Documents are visited in random order and taken while the split is below its
    share, skipping any that would take it past twice the share. At least one
    document is validation (the smallest, if none fits) and at least one is
    training, when there are two or more.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    mask = np.zeros(len(sizes), dtype=bool)
    if len(sizes) < 2:
        return mask
    target = val_fraction * sizes.sum()
    taken = 0
    for i in rng.permutation(len(sizes)):
        if taken >= target:
            break
        if taken + sizes[i] <= 2 * target:
            mask[i] = True
            taken += sizes[i]
    if not mask.any():
        mask[np.argmin(sizes)] = True
    if mask.all():
        mask[np.flatnonzero(mask)[-1]] = False
    return mask
