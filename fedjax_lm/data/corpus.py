"""A prepared corpus on disk: its metadata, tokenizer and memory-mapped token files.

Loading checks the corpus without changing it (see integrity.py): corpus.json must be
valid and complete, and every listed token file present with the size it records;
`tokens` checks each file's ids against vocab_size the first time this process maps it.
"""

from __future__ import annotations

import functools
import pathlib
import time

import numpy as np

from fedjax_lm.data import integrity, swap
from fedjax_lm.data.build import CORPUS_JSON, CorpusJsonFields
from fedjax_lm.data.errors import DataError
from fedjax_lm.data.tokenizer import Tokenizer

SPLITS = integrity.SPLITS
# How long load waits for a swap under way (a few renames) before it reports what it found.
_SWAP_WAIT_S = 2.0


def _read(path: pathlib.Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); {integrity.REBUILD}") from e


def _not_prepared(corpus_dir: pathlib.Path) -> FileNotFoundError:
    left = swap.leftovers(corpus_dir)
    note = (
        f"; found {', '.join(p.name for p in left)}: a prepare is under way or was interrupted"
        if left
        else ""
    )
    return FileNotFoundError(
        f"no prepared corpus at {corpus_dir} ({CORPUS_JSON} is missing{note}): run `python -m fedjax_lm prepare` "
        "first, i.e. `python -m fedjax_lm prepare --config <config.py>` with the config whose "
        "data.corpus_dir is this folder"
    )


class Corpus(CorpusJsonFields):
    """Read-only view of corpus_dir as written by `prepare`."""

    def __init__(self, corpus_dir: pathlib.Path, info: dict):
        self.corpus_dir = corpus_dir
        self.info = info
        self._dtype = np.dtype(info["token_dtype"])
        self._maps: dict[tuple[str, str], np.ndarray] = {}

    @classmethod
    def load(cls, corpus_dir: str | pathlib.Path) -> "Corpus":
        """Reads and checks corpus_dir; raises FileNotFoundError if it holds no corpus, DataError if damaged.

        A reader that races prepare's swap (a few renames) waits for it, so it sees the
        old corpus or the new one, never a mix.
        """
        corpus_dir = pathlib.Path(corpus_dir).expanduser()
        path = corpus_dir / CORPUS_JSON
        deadline = time.monotonic() + _SWAP_WAIT_S
        while True:
            raw = _read(path)
            try:
                if raw is None:
                    raise _not_prepared(corpus_dir)
                info = integrity.parse_corpus_json(path, raw)
                integrity.check_files(corpus_dir, info)
                return cls(corpus_dir, info)
            except (DataError, FileNotFoundError):
                swapping = (corpus_dir / swap.ASIDE).exists() or _read(path) != raw
                if swapping and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise

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
        """The token ids of one silo's split, memory-mapped (read-only) and checked."""
        self.check_silos([silo])
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: valid are {SPLITS}")
        key = (silo, split)
        if key not in self._maps:
            self._maps[key] = integrity.open_tokens(self.corpus_dir, self.info, silo, split)
        return self._maps[key]

    def __repr__(self) -> str:
        return f"Corpus({str(self.corpus_dir)!r}, silos={self.silos}, vocab_size={self.vocab_size})"
