"""What every source is: a silo name, its provenance, and a stream of documents."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Iterator, Protocol

from fedjax_lm.data import debian
from fedjax_lm.data.errors import DataError


class Source(Protocol):
    """A text source. `raw_dir` is the corpus' download cache (raw/)."""

    name: str

    def provenance(self, raw_dir: pathlib.Path) -> dict:
        """{'package', 'version', 'licence', 'licences'}; may fetch (once)."""

    def documents(self, raw_dir: pathlib.Path) -> Iterator[str]:
        """Documents in a fixed order; may fetch (once)."""


@dataclasses.dataclass(frozen=True)
class DebianSource:
    """Text from one Debian package. `package` is a name or a regex (`python3\\.[0-9]+-doc`)."""

    name: str
    package: str
    parse: Callable[[pathlib.Path], Iterator[str]]  # dpkg -x root -> documents
    log: Callable[[str], None] = print

    def _package(self, raw_dir: pathlib.Path) -> debian.Package:
        return debian.fetch(debian.resolve(self.package, raw_dir), raw_dir, log=self.log)

    def provenance(self, raw_dir: pathlib.Path) -> dict:
        pkg = self._package(raw_dir)
        licence, licences = debian.licences_of(pkg)
        return {"package": pkg.name, "version": pkg.version, "licence": licence, "licences": licences}

    def documents(self, raw_dir: pathlib.Path) -> Iterator[str]:
        yield from self.parse(self._package(raw_dir).root)


def read_text(path: pathlib.Path, errors: str = "strict") -> str:
    """Reads UTF-8 text, or raises DataError naming the file and the reason.

    errors="replace" is for packaged sources, where one stray byte should not fail
    a whole corpus; user files are strict, so bad input is reported, not hidden.
    """
    try:
        return path.read_bytes().decode("utf-8", errors=errors)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"cannot decode {path} as UTF-8: {e.reason} at byte {e.start}") from e
