"""Cheap checks that a prepared corpus is what its corpus.json says. They only read.

  parse_corpus_json  valid JSON with the fields prepare writes, of the right types
  check_files        every listed token file exists, is whole tokens, and has the
                     token count corpus.json records (os.stat only)
  open_tokens        the above for one file, then np.memmap it and check every id is
                     < vocab_size (one numpy pass, done once per file per process)

Every failure is a DataError of one line naming the file, what was found, what was
expected, and the command that rebuilds the corpus.
"""

from __future__ import annotations

import json
import os
import pathlib
import threading

import numpy as np

from fedjax_lm.data.errors import DataError
from fedjax_lm.data.swap import CORPUS_JSON

SPLITS = ("train", "val")
TOKEN_DTYPES = ("uint16", "uint32")
# field -> (check, what is expected)
_REQUIRED = {
    "vocab_size": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "token_dtype": (lambda v: v in TOKEN_DTYPES, f"one of {list(TOKEN_DTYPES)}"),
    "eos_id": (lambda v: _is_int(v) and v >= 0, "a token id"),
    "tokenizer": (lambda v: isinstance(v, str) and bool(v), "a file name"),
    "silos": (lambda v: isinstance(v, dict) and bool(v), "a non-empty mapping silo -> token files"),
}
REBUILD = "run `python -m fedjax_lm prepare --config <config.py>` to rebuild it"

_checked: set[tuple] = set()  # files whose ids were all found < vocab_size, by identity
_checked_lock = threading.Lock()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _relative_inside(p) -> bool:
    if not isinstance(p, str) or not p:
        return False
    parts = pathlib.PurePosixPath(p).parts
    return not pathlib.PurePosixPath(p).is_absolute() and ".." not in parts


def parse_corpus_json(path: pathlib.Path, raw: bytes) -> dict:
    """corpus.json's content, checked: raises DataError naming the file and what is wrong."""
    try:
        info = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); {REBUILD}") from e
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); {REBUILD}"
        ) from e
    if not isinstance(info, dict):
        raise DataError(f"{path}: holds a JSON {type(info).__name__}, expected an object; {REBUILD}")
    if missing := [k for k in _REQUIRED if k not in info]:
        raise DataError(
            f"{path}: missing required field(s) {missing} (prepare writes {list(_REQUIRED)}); {REBUILD}"
        )
    for key, (ok, expected) in _REQUIRED.items():
        if not ok(info[key]):
            raise DataError(f"{path}: field {key!r} is {info[key]!r}, expected {expected}; {REBUILD}")
    if info["token_dtype"] == "uint16" and info["vocab_size"] > 65536:
        raise DataError(
            f"{path}: token_dtype uint16 cannot hold vocab_size {info['vocab_size']}, expected uint32; {REBUILD}"
        )
    for silo, entry in info["silos"].items():
        for split in SPLITS:
            where = f"silos[{silo!r}][{split!r}]"
            if not isinstance(entry, dict) or not _relative_inside(entry.get(split)):
                got = entry.get(split) if isinstance(entry, dict) else entry
                raise DataError(
                    f"{path}: {where} is {got!r}, expected a path inside the corpus folder; {REBUILD}"
                )
            count = entry.get(f"{split}_tokens")
            if count is not None and not (_is_int(count) and count >= 0):
                raise DataError(
                    f"{path}: silos[{silo!r}][{split + '_tokens'!r}] is {count!r}, "
                    f"expected a token count; {REBUILD}"
                )
    return info


def _check_size(path: pathlib.Path, size: int, dtype: np.dtype, expected_tokens: int | None) -> None:
    if size % dtype.itemsize:
        raise DataError(
            f"{path}: {size:,} bytes is not a whole number of {dtype.itemsize}-byte {dtype.name} tokens "
            f"(the file is truncated or damaged); {REBUILD}"
        )
    if expected_tokens is not None and size // dtype.itemsize != expected_tokens:
        raise DataError(
            f"{path}: holds {size // dtype.itemsize:,} tokens, {CORPUS_JSON} records {expected_tokens:,} "
            f"(the file is truncated, damaged or from another build); {REBUILD}"
        )


def _stat(path: pathlib.Path, silo: str, split: str) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(
            f"{path}: missing: the {split} tokens of silo {silo!r} listed in {CORPUS_JSON}; {REBUILD}"
        ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); {REBUILD}") from e
    if not path.is_file():
        raise DataError(f"{path}: not a file, expected the {split} tokens of silo {silo!r}; {REBUILD}")
    return st


def _expected(info: dict, silo: str, split: str) -> int | None:
    return info["silos"][silo].get(f"{split}_tokens")


def check_files(corpus_dir: pathlib.Path, info: dict) -> None:
    """Every silo's train/val file exists with the size corpus.json implies (stat only)."""
    dtype = np.dtype(info["token_dtype"])
    tok = corpus_dir / info["tokenizer"]
    if not tok.is_file():
        raise DataError(f"{tok}: missing: the tokenizer named in {CORPUS_JSON}; {REBUILD}")
    for silo, entry in info["silos"].items():
        for split in SPLITS:
            path = corpus_dir / entry[split]
            _check_size(path, _stat(path, silo, split).st_size, dtype, _expected(info, silo, split))


def _check_ids(path: pathlib.Path, tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.size == 0 or int(tokens.max()) < vocab_size:
        return
    bad = int(np.argmax(tokens >= vocab_size))
    raise DataError(
        f"{path}: token id {int(tokens[bad])} at token {bad:,} (byte {bad * tokens.dtype.itemsize:,}) "
        f"is >= vocab_size {vocab_size} of {CORPUS_JSON}: expected ids in [0, {vocab_size}); {REBUILD}"
    )


def open_tokens(corpus_dir: pathlib.Path, info: dict, silo: str, split: str) -> np.ndarray:
    """One split's token ids, memory-mapped read-only, after all the checks above."""
    path = corpus_dir / info["silos"][silo][split]
    dtype = np.dtype(info["token_dtype"])
    st = _stat(path, silo, split)
    _check_size(path, st.st_size, dtype, _expected(info, silo, split))
    if st.st_size == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    tokens = np.memmap(path, dtype=dtype, mode="r")
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, dtype.str, int(info["vocab_size"]))
    if key not in _checked:
        _check_ids(path, tokens, int(info["vocab_size"]))
        with _checked_lock:
            _checked.add(key)
    return tokens
