"""Batches for training and evaluation, cut from the memory-mapped token files.

A silo's split is a grid of non-overlapping windows of seq_len + 1 tokens; window w
is tokens[w*(L+1) : (w+1)*(L+1)], inputs its first L tokens and targets its last L.
Training draws windows from a grain MapDataset: a seeded shuffle of all window ids
(a new permutation each epoch), repeated forever, batched; one gather per batch
slices the memmaps with numpy indexing (no Python loop over tokens).
"""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from fedjax_lm.data.corpus import Corpus
from fedjax_lm.data.errors import DataError


def _check_size(silo: str, split: str, num_tokens: int, seq_len: int, batch_size: int) -> None:
    needed = batch_size * (seq_len + 1)
    if num_tokens < needed:
        raise DataError(
            f"silo {silo} is too small for one batch: its {split} split has {num_tokens:,} "
            f"tokens, one batch of {batch_size} x (seq_len {seq_len} + 1) needs {needed:,}"
        )


def _to_batch(windows_BxL1: np.ndarray) -> dict[str, np.ndarray]:
    windows_BxL1 = windows_BxL1.astype(np.int32)
    return {"inputs": windows_BxL1[:, :-1], "targets": windows_BxL1[:, 1:]}


class _GatherWindows:
    """Window ids (a batch) -> {'inputs', 'targets'}: int32[B, L]. Picklable."""

    def __init__(self, arrays: Sequence[np.memmap], seq_len: int):
        self._arrays = list(arrays)
        self._window = seq_len + 1
        counts = [len(a) // self._window for a in arrays]
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._offsets = np.arange(self._window, dtype=np.int64)

    def __getstate__(self):
        # Pickled for worker processes: send the file names, not the tokens.
        state = self.__dict__.copy()
        state["_arrays"] = [(a.filename, a.dtype.str) for a in self._arrays]
        return state

    def __setstate__(self, state):
        state["_arrays"] = [np.memmap(f, dtype=np.dtype(d), mode="r") for f, d in state["_arrays"]]
        self.__dict__.update(state)

    @property
    def num_windows(self) -> int:
        return int(self._first[-1])

    def __call__(self, window_ids: np.ndarray) -> dict[str, np.ndarray]:
        window_ids = np.asarray(window_ids, dtype=np.int64)
        which = np.searchsorted(self._first, window_ids, side="right") - 1
        out = np.empty((len(window_ids), self._window), dtype=np.int64)
        for s in np.unique(which):  # a loop over silos, not tokens
            rows = np.flatnonzero(which == s)
            starts = (window_ids[rows] - self._first[s]) * self._window
            out[rows] = self._arrays[s][starts[:, None] + self._offsets]
        return _to_batch(out)


def train_iterator(
    corpus: Corpus, silos: Sequence[str], *, seq_len: int, batch_size: int, seed: int
) -> grain.DatasetIterator:
    """Endless shuffled batches from the pooled train windows of `silos`.

    Windows are drawn uniformly from the union of the silos' windows, so several
    silos mix in proportion to their tokens. The iterator's get_state() is a
    JSON-serialisable dict; set_state() on a fresh iterator built with the same
    arguments makes it yield exactly the batch after the one last returned.
    """
    silos = list(silos)
    if not silos:
        raise DataError("train_iterator needs at least one silo")
    corpus.check_silos(silos)
    arrays = [corpus.tokens(s, "train") for s in silos]
    for silo, arr in zip(silos, arrays):
        _check_size(silo, "train", len(arr), seq_len, batch_size)
    gather = _GatherWindows(arrays, seq_len)
    ds = (
        grain.MapDataset.range(gather.num_windows)
        .shuffle(seed=seed)
        .repeat()
        .batch(batch_size, drop_remainder=True)
        .map(gather)
    )
    # One reader thread and a short buffer: enough to overlap a device step.
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def eval_batches(
    corpus: Corpus,
    silo: str,
    *,
    split: str = "val",
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """The split's windows in order from its start, as whole batches (ragged tail dropped)."""
    arr = corpus.tokens(silo, split)
    _check_size(silo, split, len(arr), seq_len, batch_size)
    window = seq_len + 1
    num_batches = len(arr) // (window * batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    grid = np.asarray(arr[: num_batches * batch_size * window]).reshape(num_batches, batch_size, window)
    return [_to_batch(b) for b in grid]
