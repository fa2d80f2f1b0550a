"""Documentation packages: one document per reST source file."""

from __future__ import annotations

import gzip
import pathlib
from typing import Iterator

from fedjax_lm.data.errors import DataError
from fedjax_lm.data.sources.base import read_text


def _one_dir(root: pathlib.Path, pattern: str) -> pathlib.Path:
    hits = sorted(root.glob(pattern))
    if not hits:
        raise DataError(f"no {pattern} under {root}: not the package layout expected")
    return hits[-1]


def parse_python_docs(root: pathlib.Path) -> Iterator[str]:
    """python3.X-doc: the reST sources at usr/share/doc/python3.X/html/_sources/**/*.txt."""
    sources = _one_dir(root, "usr/share/doc/python3*/html/_sources")
    for path in sorted(sources.rglob("*.txt")):
        if text := read_text(path, errors="replace").strip():
            yield text


def parse_kernel_docs(root: pathlib.Path) -> Iterator[str]:
    """linux-doc-V: usr/share/doc/linux-doc-V/Documentation/**/*.{rst,txt}.gz."""
    docs = _one_dir(root, "usr/share/doc/linux-doc-*/Documentation")
    paths = sorted(p for p in docs.rglob("*.gz") if p.name.endswith((".rst.gz", ".txt.gz")) and p.is_file())
    for path in paths:
        try:
            text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        except (OSError, EOFError) as e:
            raise DataError(f"cannot read {path}: {e}") from e
        if text := text.strip():
            yield text
