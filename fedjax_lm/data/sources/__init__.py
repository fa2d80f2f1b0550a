"""Text sources by name: the default Debian silos, the stdlib, and user data.

`make_source(spec)` understands
  quotes-en quotes-de quotes-ru poetry-zh bible-en bible-es python-docs kernel-docs
  python-code
  folder:/path                     every *.txt / *.md below, one document per file
  jsonl:/path/file.jsonl[:field]   one document per line (field defaults to "text")
  hf:dataset[:split[:field]]       a Hugging Face dataset (needs `datasets` + the hub)
Any of them may be prefixed with `NAME=` to choose the silo name.
"""

from __future__ import annotations

import pathlib
import re
from typing import Callable

from fedjax_lm.data.errors import DataError
from fedjax_lm.data.sources import docs, fortunes, sword
from fedjax_lm.data.sources.base import DebianSource, Source
from fedjax_lm.data.sources.pycode import PythonCodeSource
from fedjax_lm.data.sources.user import FolderSource, HuggingFaceSource, JsonlSource

# silo name -> (Debian package name or regex, parser of the unpacked package).
# Regexes are POSIX extended (apt-cache search takes them as they are): no \d.
DEBIAN_SOURCES: dict[str, tuple[str, Callable]] = {
    "quotes-en": ("fortunes", fortunes.parse_fortunes),
    "quotes-de": ("fortunes-de", fortunes.parse_fortunes),
    "quotes-ru": ("fortunes-ru", fortunes.parse_fortunes),
    "poetry-zh": ("fortunes-zh", fortunes.parse_fortunes_ansi),
    "bible-en": ("sword-text-web", sword.parse_sword),
    "bible-es": ("sword-text-sparv", sword.parse_sword),
    "python-docs": (r"python3\.[0-9]+-doc", docs.parse_python_docs),
    "kernel-docs": (r"linux-doc-[0-9]+(\.[0-9]+)*", docs.parse_kernel_docs),
}
DEFAULT_SOURCES: tuple[str, ...] = tuple(DEBIAN_SOURCES)
BUILTIN_SOURCES: tuple[str, ...] = DEFAULT_SOURCES + ("python-code",)
USAGE = "folder:/path, jsonl:/path/file.jsonl[:field], hf:dataset[:split[:field]] (optionally prefixed NAME=)"


def _silo_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return name or "silo"


def _split_jsonl(rest: str) -> tuple[pathlib.Path, str]:
    """`/p/f.jsonl` or `/p/f.jsonl:field` (a path may itself hold colons)."""
    head, sep, tail = rest.rpartition(":")
    if sep and head and "/" not in tail and not pathlib.Path(rest).exists():
        return pathlib.Path(head), tail
    return pathlib.Path(rest), "text"


def make_source(spec: str, log: Callable[[str], None] = print) -> Source:
    """The Source for one entry of data_cfg.sources."""
    name = None
    if m := re.match(r"([A-Za-z0-9._-]+)=(.+)$", spec):
        name, spec = m.group(1), m.group(2)
    if spec in DEBIAN_SOURCES:
        package, parse = DEBIAN_SOURCES[spec]
        return DebianSource(name or spec, package, parse, log)
    if spec == "python-code":
        return PythonCodeSource(name or spec)
    kind, _, rest = spec.partition(":")
    if kind == "folder" and rest:
        path = pathlib.Path(rest).expanduser()
        return FolderSource(name or _silo_name(path.resolve().name), path)
    if kind == "jsonl" and rest:
        path, field = _split_jsonl(rest)
        return JsonlSource(name or _silo_name(path.expanduser().stem), path.expanduser(), field)
    if kind == "hf" and rest:
        dataset, split, field = (rest.split(":") + ["train", "text"])[:3]
        return HuggingFaceSource(name or _silo_name(dataset), dataset, split or "train", field or "text")
    raise DataError(f"unknown source {spec!r}: valid names are {', '.join(BUILTIN_SOURCES)}; or {USAGE}")


__all__ = [
    "BUILTIN_SOURCES",
    "DEFAULT_SOURCES",
    "DebianSource",
    "FolderSource",
    "HuggingFaceSource",
    "JsonlSource",
    "PythonCodeSource",
    "Source",
    "make_source",
]
