"""A prepared corpus on disk: its metadata, tokenizer and memory-mapped token files."""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np

from fedjax_lm.data.errors import DataError
from fedjax_lm.data.build import CORPUS_JSON, CorpusJsonFields
from fedjax_lm.data.tokenizer import Tokenizer

SPLITS = ("train", "val")


class Corpus(CorpusJsonFields):
    """Read-only view of corpus_dir as written by `prepare`."""

    def __init__(self, corpus_dir: pathlib.Path, info: dict):
        self.corpus_dir = corpus_dir
        self.info = info
        self._dtype = np.dtype(info["token_dtype"])
        self._maps: dict[tuple[str, str], np.memmap] = {}

    @classmethod
    def load(cls, corpus_dir: str | pathlib.Path) -> "Corpus":
        corpus_dir = pathlib.Path(corpus_dir).expanduser()
        path = corpus_dir / CORPUS_JSON
        if not path.exists():
            raise FileNotFoundError(
                f"no prepared corpus at {corpus_dir} ({CORPUS_JSON} is missing): "
                "run `python -m fedjax_lm prepare` first"
            )
        return cls(corpus_dir, json.loads(path.read_text(encoding="utf-8")))

    @property
    def eos_id(self) -> int:
        return int(self.info["eos_id"])

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.corpus_dir / self.info["tokenizer"])

    def check_silos(self, silos: list[str]) -> None:
        unknown = [s for s in silos if s not in self.info["silos"]]
        if unknown:
            raise DataError(f"unknown silo(s) {unknown}: this corpus has {self.silos}")

    def tokens(self, silo: str, split: str = "train") -> np.ndarray:
        """The token ids of one silo's split, memory-mapped (read-only)."""
        self.check_silos([silo])
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: valid are {SPLITS}")
        key = (silo, split)
        if key not in self._maps:
            path = self.corpus_dir / self.info["silos"][silo][split]
            if path.stat().st_size == 0:  # np.memmap cannot map an empty file
                return np.zeros(0, dtype=self._dtype)
            self._maps[key] = np.memmap(path, dtype=self._dtype, mode="r")
        return self._maps[key]

    def __repr__(self) -> str:
        return f"Corpus({str(self.corpus_dir)!r}, silos={self.silos}, vocab_size={self.vocab_size})"
