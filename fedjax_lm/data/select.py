"""The corpus a run trains on: built if missing, checked against the model, its silos chosen."""

from __future__ import annotations

import os
import zlib
from typing import Any

from fedjax_lm.data.build import prepare
from fedjax_lm.data.corpus import Corpus


def ensure_corpus(data_cfg: Any) -> Corpus:
    """Loads the prepared corpus, preparing it first if it is not there yet (or is stale)."""
    if not os.path.exists(os.path.join(data_cfg.corpus_dir, "corpus.json")):
        print(
            f"[fedjax_lm] no corpus at {data_cfg.corpus_dir}: preparing it (cached for later runs)",
            flush=True,
        )
    prepare(data_cfg, repair=False)  # returns at once when built with the same settings
    return Corpus.load(data_cfg.corpus_dir)


def check_vocab(config: Any, corpus: Corpus) -> None:
    if config.model.vocab_size != corpus.vocab_size:
        raise ValueError(
            f"model.vocab_size={config.model.vocab_size} but the corpus at {config.data.corpus_dir} "
            f"has a tokenizer of {corpus.vocab_size} tokens; set both to the same value"
        )


def active_silos(config: Any, corpus: Corpus) -> list[str]:
    """The silos that take part: `config.train.silos`, or every silo of the corpus."""
    chosen = list(config.train.get("silos", None) or [])
    if not chosen:
        return list(corpus.silos)
    unknown = [s for s in chosen if s not in corpus.silos]
    if unknown:
        raise ValueError(
            f"train.silos names {unknown}, not in the corpus at {config.data.corpus_dir}; "
            f"its silos are {corpus.silos}"
        )
    return chosen


def silo_iterator(corpus: Corpus, name: str, config: Any):
    """A silo's training batches, seeded by (train.seed, the silo's name): the same in every process
    and whatever other silos its corpus holds (a silo on its own machine has only itself)."""
    from fedjax_lm.data.pipeline import train_iterator

    return train_iterator(
        corpus,
        [name],
        seq_len=int(config.train.seq_len),
        batch_size=int(config.train.batch_size),
        seed=zlib.crc32(f"{int(config.train.seed)}:{name}".encode()),
    )


def next_batches(iterator, h: int) -> dict:
    """H batches stacked to [H, B, L] for `local_train`."""
    import numpy as np

    bs = [next(iterator) for _ in range(h)]
    return {k: np.stack([b[k] for b in bs]) for k in bs[0]}
