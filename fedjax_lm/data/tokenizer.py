"""A SentencePiece BPE tokenizer (byte fallback) trained locally, and its wrapper.

Lossless: identity normalisation, whitespace kept as is, no dummy prefix, and
bytes for any character outside the vocabulary, so decode(encode(x)) == x.
"""

from __future__ import annotations

import io
import os
import pathlib
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from fedjax_lm.data.atomic import write_atomic
from fedjax_lm.data.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# SentencePiece silently skips training lines longer than max_sentence_length
# (4192 bytes by default): cut lines well below that.
MAX_LINE_BYTES = 4000
_NUM_BYTE_PIECES = 256
_MIN_COVERAGE = 0.98
# Trainer threads are fixed, not taken from the machine: the count is stored in the
# model file, which should be the same bytes wherever it is trained.
_TRAIN_THREADS = 2


def split_long_line(line: str, max_bytes: int = MAX_LINE_BYTES) -> list[str]:
    """Cuts a line into pieces of at most max_bytes UTF-8 bytes, at a space if one is near."""
    data = line.encode("utf-8")
    if len(data) <= max_bytes:
        return [line]
    pieces, start = [], 0
    while start < len(data):
        end = min(start + max_bytes, len(data))
        if end < len(data):
            while end > start and (data[end] & 0xC0) == 0x80:  # inside a UTF-8 sequence
                end -= 1
            space = data.rfind(b" ", start + max_bytes // 2, end)
            if space > start:
                end = space
        pieces.append(data[start:end].decode("utf-8"))
        start = end
    return pieces


def training_lines(documents: Iterable[str]) -> Iterator[str]:
    """Non-empty lines of the documents, long ones cut (trainer input is line based)."""
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip():
                yield from split_long_line(line)


def character_coverage(lines: Sequence[str], vocab_size: int) -> float:
    """SentencePiece's character_coverage, lowered so characters take <= 1/4 of the vocab.

    Kept within [0.98, 0.9995] (SentencePiece refuses less than 0.98).

    Every character inside the coverage becomes a piece; in a corpus with Chinese that
    would be thousands, leaving few merges for a small vocabulary. Characters left out
    are still encoded, as UTF-8 bytes.
    """
    budget = max(1, (vocab_size - _NUM_BYTE_PIECES - 4) // 4)
    codes = np.frombuffer("".join(lines).encode("utf-32-le"), dtype=np.uint32)
    if codes.size == 0:
        return 1.0
    counts = np.sort(np.unique(codes, return_counts=True)[1])[::-1]
    if counts.size <= budget:
        return 0.9995
    covered = float(np.cumsum(counts)[budget - 1]) / float(codes.size)
    return min(0.9995, max(_MIN_COVERAGE, covered))


def train_tokenizer(documents: Iterable[str], vocab_size: int, path: str | os.PathLike) -> None:
    """Trains a BPE model on the documents and writes it to `path` (atomically)."""
    lines = list(training_lines(documents))
    if not lines:
        raise DataError("no text to train the tokenizer on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=character_coverage(lines, vocab_size),
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            max_sentence_length=2 * MAX_LINE_BYTES,
            input_sentence_size=0,
            num_threads=_TRAIN_THREADS,
            minloglevel=2,
        )
    except RuntimeError as e:  # SentencePiece's reason is precise; add what to change
        raise DataError(
            f"tokenizer training failed for vocab_size={vocab_size} on {len(lines):,} lines: "
            f"{e} (change vocab_size or tokenizer_sample_bytes)"
        ) from e
    write_atomic(pathlib.Path(path), model.getvalue())


class Tokenizer:
    """A trained SentencePiece model: text <-> token ids."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._sp.decode(np.asarray(ids, dtype=np.int64).tolist())

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
