"""Centralized baseline: one model trained on the pooled default corpus (no federation).

    python -m fedjax_lm train --config experiments/centralized.py:size=tiny,steps=300 --workdir runs/central

Takes about 3-4 minutes for the tiny model on 2 CPU cores (after `prepare`).

Sweep (fedjax_lm/sweep.py): `lr_batch`, the learning rate x batch grid at the --config's tokens, so
that federated runs are compared with a tuned baseline:

    python -m fedjax_lm sweep --config experiments/centralized.py:size=tiny,steps=256,batch_size=64 --sweep lr_batch --workdir runs/sweep-central

(A federated sweep's `recipe="centralized"` points are built from the federated config itself:
`fedjax_lm.sweep.centralized_twin`.)
"""

from experiments import common
from fedjax_lm.config import parse_variant

DEFAULTS = dict(size="tiny", steps=300, seq_len=128, batch_size=16, lr=3e-3, vocab=0, max_bytes=2_000_000)


def get_config(arg: str | None = None):
    v = parse_variant(arg, DEFAULTS)
    c = common.base_config(size=v["size"], seq_len=v["seq_len"], batch_size=v["batch_size"], steps=v["steps"])
    c.name = f"centralized-{v['size']}"
    if v["vocab"]:  # 0: the preset's vocabulary
        c.data.vocab_size = c.model.vocab_size = v["vocab"]
    c.data.max_bytes_per_source = v["max_bytes"]
    c.optim.lr = v["lr"]
    return c


def sweep_lr_batch(add, base):
    """Learning rate x batch size at the base's tokens (steps x batch): steps scale as 1/batch."""
    sequences = int(base.train.steps) * int(base.train.batch_size)
    batch = int(base.train.batch_size)
    for lr in (1e-3, 3e-3, 1e-2):
        for b in (batch // 2, batch, batch * 2):
            if b >= 1:
                add(lr=lr, batch_size=b, steps=max(1, sequences // b))
