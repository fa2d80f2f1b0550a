"""SWORD zText Bible modules: one document per chapter, one line per verse.

A testament (`ot`, `nt`) is three files:
  X.bzs  12-byte little-endian records (offset, compressed size, uncompressed size),
         one per block, into
  X.bzz  zlib streams of OSIS-marked text (a block is a book for these modules);
  X.bzv  10-byte records (block, offset, size) per verse into the uncompressed blocks.
Chapters are cut at OSIS `<chapter sID=...>` milestones; a book's title and
introduction go with its first chapter. Notes are dropped, tags stripped, entities
unescaped.
"""

from __future__ import annotations

import html
import pathlib
import re
import struct
import zlib
from typing import Iterator

from fedjax_lm.data.errors import DataError

_BOUNDARY = re.compile(
    r"<chapter\b[^>]*\bsID=\"[^\"]*\"[^>]*>"
    r"|<div\b(?=[^>]*\btype=\"book\")(?=[^>]*\bsID=)[^>]*>"
)
_NOTE = re.compile(r"<note\b[^>]*/>|<note\b.*?</note>", re.S)
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")
# A note often stands where a space was (`God</w><note>..</note><w>created`): it
# leaves a mark that becomes a space, except before closing punctuation.
_MARK = "\x00"
_MARK_BEFORE_PUNCT = re.compile(r"\s*\x00[\s\x00]*(?=[,.;:!?)\]}”’»]|$)")


def clean_osis(text: str) -> str:
    """OSIS markup -> plain text on one line."""
    text = _NOTE.sub(_MARK, text)
    text = html.unescape(_TAG.sub("", text))
    text = _MARK_BEFORE_PUNCT.sub("", text).replace(_MARK, " ")
    return _SPACE.sub(" ", text).strip()


def _records(path: pathlib.Path, fmt: str) -> list[tuple[int, ...]]:
    data = path.read_bytes()
    size = struct.calcsize(fmt)
    if len(data) % size:
        raise DataError(f"{path}: {len(data)} bytes is not a whole number of {size}-byte records")
    return list(struct.iter_unpack(fmt, data))


def read_blocks(module_dir: pathlib.Path, testament: str) -> list[bytes]:
    """The uncompressed blocks of one testament, in order."""
    index = _records(module_dir / f"{testament}.bzs", "<III")
    data = (module_dir / f"{testament}.bzz").read_bytes()
    blocks = []
    for i, (offset, csize, usize) in enumerate(index):
        if csize == 0:
            blocks.append(b"")
            continue
        try:
            block = zlib.decompress(data[offset : offset + csize])
        except zlib.error as e:
            raise DataError(f"{module_dir / testament}.bzz block {i}: {e}") from e
        if len(block) != usize:
            raise DataError(f"{module_dir / testament}.bzz block {i}: {len(block)} bytes, index says {usize}")
        blocks.append(block)
    return blocks


def _verse_pieces(module_dir: pathlib.Path, testament: str) -> Iterator[bytes]:
    """Raw verse texts in block order (whole blocks when there is no .bzv)."""
    blocks = read_blocks(module_dir, testament)
    cuts: list[set[int]] = [set() for _ in blocks]
    bzv = module_dir / f"{testament}.bzv"
    if bzv.exists():
        for block, start, size in _records(bzv, "<IIH"):
            if size and block < len(blocks):
                cuts[block].update((start, start + size))
    for block, block_cuts in zip(blocks, cuts):
        edges = sorted({0, len(block)} | {c for c in block_cuts if 0 < c < len(block)})
        for a, b in zip(edges[:-1], edges[1:]):
            yield block[a:b]


def read_module(module_dir: pathlib.Path) -> Iterator[str]:
    """Chapters of a zText module (OT then NT) as documents of verse lines."""
    lines: list[str] = []
    has_chapter = False
    for testament in ("ot", "nt"):
        if not (module_dir / f"{testament}.bzs").exists():
            continue
        for piece in _verse_pieces(module_dir, testament):
            text = piece.decode("utf-8", errors="replace")
            pos = 0
            for m in _BOUNDARY.finditer(text):
                if line := clean_osis(text[pos : m.start()]):
                    lines.append(line)
                pos = m.end()
                is_chapter = m.group(0).startswith("<chapter")
                if lines and (has_chapter or not is_chapter):
                    yield "\n".join(lines)
                    lines = []
                has_chapter = is_chapter
            if line := clean_osis(text[pos:]):
                lines.append(line)
    if lines:
        yield "\n".join(lines)


def parse_sword(root: pathlib.Path) -> Iterator[str]:
    modules = sorted((root / "usr/share/sword/modules/texts/ztext").glob("*/"))
    if not modules:
        raise DataError(f"no SWORD zText module under {root}/usr/share/sword/modules/texts/ztext")
    for module_dir in modules:
        yield from read_module(module_dir)
