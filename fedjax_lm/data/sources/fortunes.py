"""fortune(6) databases: one document per entry (entries end at a line holding `%`)."""

from __future__ import annotations

import pathlib
import re
from typing import Iterator

from fedjax_lm.data.sources.base import read_text

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SEPARATOR = re.compile(r"^%[ \t]*$", re.M)


def fortune_files(root: pathlib.Path) -> list[pathlib.Path]:
    """Fortune text files under usr/share/games/fortunes*, each file once.

    Skips the `.dat` indexes; names that are symlinks to the same file (`x.u8 -> x`)
    count once, by resolved path.
    """
    seen, files = set(), []
    for base in sorted((root / "usr/share/games").glob("fortunes*")):
        for path in sorted(base.rglob("*")):
            if path.suffix == ".dat" or not path.is_file():
                continue
            real = path.resolve()
            if real not in seen:
                seen.add(real)
                files.append(path)
    return files


def strip_ansi_codes(text: str) -> str:
    """Removes colour codes, also badly nested ones like `ESC[;ESC[34;1mm`."""
    while (stripped := _ANSI.sub("", text)) != text:
        text = stripped
    return text.replace("\x1b", "")


def split_entries(text: str, strip_ansi: bool = False) -> list[str]:
    if strip_ansi:
        text = strip_ansi_codes(text)
    text = text.replace("\r\n", "\n")
    entries = (e.strip("\n") for e in _SEPARATOR.split(text))
    return [e.rstrip() for e in entries if e.strip()]


def parse_fortunes(root: pathlib.Path, strip_ansi: bool = False) -> Iterator[str]:
    for path in fortune_files(root):
        yield from split_entries(read_text(path, errors="replace"), strip_ansi=strip_ansi)


def parse_fortunes_ansi(root: pathlib.Path) -> Iterator[str]:
    """fortunes-zh colours its entries with ANSI codes (`ESC[33m`): drop them."""
    return parse_fortunes(root, strip_ansi=True)
