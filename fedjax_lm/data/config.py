"""The data config: fields, defaults, and the hash that decides whether to rebuild."""

from __future__ import annotations

import hashlib
import os
import json
from typing import Any, Mapping

import ml_collections

from fedjax_lm.data.errors import DataError
from fedjax_lm.data.sources import DEFAULT_SOURCES

# Bump when prepare's output for the same settings changes (parsers, file format).
FORMAT_VERSION = 1


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults for the `data` part of an experiment config."""
    cfg = ml_collections.ConfigDict()
    cfg.corpus_dir = "cache/corpus"
    cfg.sources = tuple(DEFAULT_SOURCES)  # a tuple: settable as --config.data.sources='("a=folder:/x",)'
    cfg.tokenizer = ""  # a SentencePiece .model to use instead of training one (shared by a federation)
    cfg.max_bytes_per_source = 2_000_000  # whole documents, seeded sample; 0 = all
    cfg.tokenizer_sample_bytes = 1_000_000  # per source
    cfg.vocab_size = 4096
    cfg.val_fraction = 0.05  # of each silo's bytes, by whole documents
    cfg.partition = "natural"  # natural | iid | dirichlet
    cfg.num_silos = 8  # iid and dirichlet
    cfg.dirichlet_alpha = 0.5  # dirichlet: smaller = more skewed silos
    cfg.seed = 0
    return cfg


_DEFAULTS = default_data_config().to_dict()


def field(cfg: Any, name: str) -> Any:
    """cfg.name for a ConfigDict or a plain mapping, else the default."""
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        value = cfg.get(name, None)
    else:
        value = getattr(cfg, name, None)
    return _DEFAULTS[name] if value is None else value


def settings(cfg: Any) -> dict:
    """The fields that determine the prepared corpus (corpus_dir does not)."""
    partition = str(field(cfg, "partition"))
    out = {
        "format": FORMAT_VERSION,
        "sources": [str(s) for s in field(cfg, "sources")],
        "max_bytes_per_source": int(field(cfg, "max_bytes_per_source")),
        "tokenizer_sample_bytes": int(field(cfg, "tokenizer_sample_bytes")),
        "tokenizer_sha256": tokenizer_sha256(str(field(cfg, "tokenizer"))),
        "vocab_size": int(field(cfg, "vocab_size")),
        "val_fraction": float(field(cfg, "val_fraction")),
        "partition": partition,
        "seed": int(field(cfg, "seed")),
    }
    if partition in ("iid", "dirichlet"):
        out["num_silos"] = int(field(cfg, "num_silos"))
    if partition == "dirichlet":
        out["dirichlet_alpha"] = float(field(cfg, "dirichlet_alpha"))
    return out


def tokenizer_sha256(path: str) -> str:
    """The sha256 of a given tokenizer file ("" when the tokenizer is trained): the corpus depends on
    the file's content, not on where it lies."""
    if not path:
        return ""
    try:
        with open(os.path.expanduser(path), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise DataError(
            f"data.tokenizer={path}: cannot read the tokenizer file ({e.strerror or e})"
        ) from None


def settings_hash(s: dict) -> str:
    return hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()
