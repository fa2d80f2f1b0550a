"""The running interpreter's standard library as a code silo (no download)."""

from __future__ import annotations

import dataclasses
import pathlib
import platform
import sysconfig
from typing import Iterator

from fedjax_lm.data import debian
from fedjax_lm.data.sources.base import read_text

# Test suites and installed third-party packages are not the standard library.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def stdlib_dir() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        p
        for p in root.rglob("*.py")
        if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]) and p.is_file()
    )


@dataclasses.dataclass(frozen=True)
class PythonCodeSource:
    """`Lib/**/*.py` of this Python, one document per file."""

    name: str = "python-code"
    root: pathlib.Path | None = None  # default: sysconfig's stdlib path

    def _root(self) -> pathlib.Path:
        return self.root or stdlib_dir()

    def provenance(self, raw_dir: pathlib.Path) -> dict:
        del raw_dir
        licence_file = self._root() / "LICENSE.txt"
        text = licence_file.read_text(errors="replace") if licence_file.exists() else ""
        licence, licences = debian.licences_from_text(text)
        if licence == "unknown":
            licence, licences = "PSF-2.0 (Python licence)", ["PSF-2.0 (Python licence)"]
        return {
            "package": f"{platform.python_implementation().lower()}-stdlib",
            "version": platform.python_version(),
            "licence": licence,
            "licences": licences,
            "path": str(self._root()),
        }

    def documents(self, raw_dir: pathlib.Path) -> Iterator[str]:
        del raw_dir
        for path in stdlib_files(self._root()):
            if text := read_text(path, errors="replace").strip():
                yield text
