"""Shared building blocks of the experiment configs: small, layered sections.

A run's config = model preset + data + inner optimizer + mesh + train loop (+ federation).
Each config file composes these and exposes `get_config(arg)`.
"""

from __future__ import annotations

import ml_collections

from experiments import presets
from fedjax_lm import data as data_lib
from fedjax_lm import optim
from fedjax_lm import sharding


def base_config(
    *, size: str = "tiny", seq_len: int = 128, batch_size: int = 16, steps: int = 300
) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.data = data_lib.default_data_config()
    c.model = presets.model_preset(size)
    # The tokenizer trained by `prepare` sets the vocabulary: tiny/small use 4096, the large
    # presets their own (50304, or 32000 for 7b); `vocab=` in a variant overrides both.
    c.data.vocab_size = c.model.vocab_size
    c.model.max_seq_len = max(c.model.max_seq_len, seq_len)
    c.optim = optim.default_optim_config()
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # List-valued fields are tuples: `--config.train.silos='("a", "b")'` (or a list literal, or the flag
    # repeated) overrides them from the command line.
    c.sharding = ml_collections.ConfigDict(dict(rules=tuple(tuple(r) for r in sharding.DEFAULT_RULES)))
    c.train = ml_collections.ConfigDict(
        dict(
            seq_len=seq_len,
            batch_size=batch_size,  # sequences per optimizer step (per silo when federated)
            steps=steps,
            log_every=10,
            eval_every=100,  # 0: only at the end
            eval_batches=8,  # per silo
            checkpoint_every=100,
            keep_checkpoints=2,
            seed=0,
            silos=(),  # which of the corpus's silos take part (train and eval); empty = all
        )
    )
    return c
