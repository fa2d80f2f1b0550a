"""User sources: a folder of text files, a JSONL file, a Hugging Face dataset."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Iterator

from fedjax_lm.data.errors import DataError
from fedjax_lm.data.sources.base import read_text

_USER = {"package": None, "version": None, "licence": "unknown (user-provided)", "licences": []}


@dataclasses.dataclass(frozen=True)
class FolderSource:
    """All *.txt and *.md files under `path`, recursively, one document per file."""

    name: str
    path: pathlib.Path

    def files(self) -> list[pathlib.Path]:
        if not self.path.is_dir():
            raise DataError(f"source folder:{self.path}: no such folder")
        files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in (".txt", ".md") and p.is_file())
        if not files:
            raise DataError(f"source folder:{self.path}: the folder holds no *.txt or *.md file")
        return files

    def check(self) -> None:
        self.files()

    def provenance(self, raw_dir: pathlib.Path) -> dict:
        del raw_dir
        return dict(_USER, path=str(self.path))

    def documents(self, raw_dir: pathlib.Path) -> Iterator[str]:
        del raw_dir
        empty = True
        for path in self.files():
            if text := read_text(path).strip():
                empty = False
                yield text
        if empty:
            raise DataError(f"source folder:{self.path}: every *.txt/*.md file in it is empty")


@dataclasses.dataclass(frozen=True)
class JsonlSource:
    """One document per line of a JSONL file: the string in `field`."""

    name: str
    path: pathlib.Path
    field: str = "text"

    def check(self) -> None:
        if not self.path.is_file():
            raise DataError(f"source jsonl:{self.path}: no such file")

    def provenance(self, raw_dir: pathlib.Path) -> dict:
        del raw_dir
        return dict(_USER, path=str(self.path), field=self.field)

    def documents(self, raw_dir: pathlib.Path) -> Iterator[str]:
        del raw_dir
        try:
            lines = self.path.read_bytes().splitlines()
        except OSError as e:
            raise DataError(f"cannot read {self.path}: {e.strerror or e}") from e
        count = 0
        for lineno, raw in enumerate(lines, start=1):
            where = f"{self.path}:{lineno}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from e
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e.msg}, column {e.colno})") from e
            if not isinstance(record, dict) or self.field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{where}: no field {self.field!r} (found: {keys})")
            text = record[self.field]
            if not isinstance(text, str):
                raise DataError(f"{where}: field {self.field!r} is a {type(text).__name__}, not a string")
            if text := text.strip():
                count += 1
                yield text
        if not count:
            raise DataError(f"source jsonl:{self.path}: no non-empty {self.field!r} in any line")


@dataclasses.dataclass(frozen=True)
class HuggingFaceSource:
    """A dataset from the Hugging Face hub, streamed with the `datasets` package."""

    name: str
    dataset: str
    split: str = "train"
    field: str = "text"

    def _load(self):
        spec = f"hf:{self.dataset}:{self.split}:{self.field}"
        try:
            import datasets  # pylint: disable=g-import-not-at-top
        except ImportError as e:
            raise DataError(
                f"source {spec} needs the `datasets` package, which is not installed "
                "(`pip install datasets`; the Hugging Face hub must also be reachable)"
            ) from e
        try:
            return datasets.load_dataset(self.dataset, split=self.split, streaming=True)
        except Exception as e:  # pylint: disable=broad-except
            raise DataError(
                f"source {spec}: could not load it from the Hugging Face hub "
                f"(is the hub reachable from here?): {type(e).__name__}: {e}"
            ) from e

    def provenance(self, raw_dir: pathlib.Path) -> dict:
        del raw_dir
        return dict(_USER, package=f"hf:{self.dataset}", version=self.split, field=self.field)

    def documents(self, raw_dir: pathlib.Path) -> Iterator[str]:
        del raw_dir
        for i, record in enumerate(self._load()):
            if self.field not in record:
                raise DataError(
                    f"hf:{self.dataset} record {i}: no field {self.field!r} (found: {sorted(record)})"
                )
            if isinstance(text := record[self.field], str) and (text := text.strip()):
                yield text
