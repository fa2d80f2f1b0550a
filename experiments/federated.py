"""Shared builder of the federated recipes (photon.py, diloco.py): variants common to both."""

from __future__ import annotations

import os

from experiments import common
from fedjax_lm import federation
from fedjax_lm import outer
from fedjax_lm.config import parse_variant

# Keys every federated config accepts after the colon: photon.py:size=tiny,silos=8,K=4,H=32
COMMON_KEYS = dict(
    size="tiny",
    silos=8,
    K=0,
    H=32,
    rounds=8,
    batch_size=8,
    seq_len=128,
    lr=3e-3,
    outer="fedavg",
    outer_lr=0.0,
    compression="int8",
    download="none",  # federation.download_compression: the global sent as an int8 / bf16 delta
    inner_state="keep",
    parallel=False,
    vocab=0,  # 0: the model preset's vocabulary
    max_bytes=2_000_000,
    partition="natural",
    eval_every=0,
    seed=0,
)


def build(arg: str | None, recipe: str, defaults: dict):
    v = parse_variant(arg, {**COMMON_KEYS, **defaults})
    steps = v["rounds"] * v["H"]
    c = common.base_config(size=v["size"], seq_len=v["seq_len"], batch_size=v["batch_size"], steps=steps)
    c.name = f"{recipe}-{v['size']}-s{v['silos']}-H{v['H']}"
    if v["vocab"]:
        c.data.vocab_size = c.model.vocab_size = v["vocab"]
    c.data.max_bytes_per_source = v["max_bytes"]
    sources = list(c.data.sources)
    if not 1 <= v["silos"] <= len(sources) and v["partition"] == "natural":
        raise ValueError(f"silos={v['silos']}: the natural partition has 1..{len(sources)} silos")
    if v["partition"] == "natural":
        # The corpus keeps all sources (one cache for every variant); the run uses the first N.
        c.train.silos = tuple(sources[: v["silos"]]) if v["silos"] < len(sources) else ()
    else:
        c.data.partition = v["partition"]
        c.data.num_silos = v["silos"]
    c.data.seed = v["seed"]
    c.optim.lr = v["lr"]
    c.optim.warmup_steps = min(c.optim.warmup_steps, max(1, v["H"] // 2))
    c.train.seed = v["seed"]
    c.federation = federation.default_federation_config()
    f = c.federation
    f.rounds, f.local_steps, f.silos_per_round = v["rounds"], v["H"], v["K"]
    f.compression, f.inner_state, f.parallel = v["compression"], v["inner_state"], v["parallel"]
    f.download_compression = v["download"]
    f.eval_every = v["eval_every"]
    # The compliance gate with the example Project card (an open model of this project); each silo's
    # Data card is generated from the corpus unless the folder holds one (fedjax_lm/compliance/gate.py).
    f.compliance.cards = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cards")
    f.outer = outer.default_outer_config(v["outer"])
    if v["outer_lr"]:
        f.outer.lr = v["outer_lr"]
    return c, v
