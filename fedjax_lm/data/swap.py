"""Swapping a freshly built corpus in for the old one, and finishing a swap a crash interrupted.

prepare builds into STAGING (corpus_dir/.prepare-new), next to raw/ and the lock, so
renames stay within one filesystem and the download cache is shared. When the staged
build is complete (its corpus.json is written last), `commit` renames, in this order:

  1. corpus.json       -> ASIDE/       the old corpus stops looking complete
  2. tokenizer.model   -> ASIDE/,  STAGING/tokenizer.model -> corpus_dir/
  3. silos/            -> ASIDE/,  STAGING/silos/          -> corpus_dir/
  4. STAGING/corpus.json -> corpus_dir/corpus.json          the commit point
  5. delete ASIDE and STAGING

A reader therefore finds either the old corpus.json with the old files, no corpus.json
(for the few renames in between), or the new corpus.json with the new files.

Whatever a crash leaves, `recover` (run under the prepare lock) decides from
STAGING/corpus.json alone: present means the staged build was complete and has not been
committed, so the swap is finished (each step is skipped once done, so `commit` resumes
anywhere); absent means the build never completed, or the commit point was passed, so
STAGING is discarded. Only if both corpus.json files are gone but ASIDE still holds one
(STAGING lost by hand) is the old corpus moved back. ASIDE is deleted last.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Callable

CORPUS_JSON = "corpus.json"
TOKENIZER_FILE = "tokenizer.model"
SILOS_DIR = "silos"
ARTEFACTS = (TOKENIZER_FILE, SILOS_DIR)  # what a build makes besides corpus.json
STAGING = ".prepare-new"
ASIDE = ".prepare-old"


def staging_dir(corpus_dir: pathlib.Path) -> pathlib.Path:
    return corpus_dir / STAGING


def leftovers(corpus_dir: pathlib.Path) -> list[pathlib.Path]:
    """Staging/aside folders present (a build under way, or left by a crash)."""
    return [p for p in (corpus_dir / STAGING, corpus_dir / ASIDE) if os.path.lexists(p)]


def swap_pending(corpus_dir: pathlib.Path) -> bool:
    """True if a complete staged build waits to be (or is being) committed."""
    return (corpus_dir / STAGING / CORPUS_JSON).exists()


def _exists(path: pathlib.Path) -> bool:
    return os.path.lexists(path)


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def fsync_dir(path: pathlib.Path) -> None:
    """Makes the renames and creations in folder `path` durable (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: pathlib.Path) -> None:
    """fsync of every folder under root (files are fsynced as they are written)."""
    for dirpath, _, _ in os.walk(root):
        fsync_dir(pathlib.Path(dirpath))


def plan(corpus_dir: pathlib.Path) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """The renames (src, dst) `commit` makes from the present state, in order; [] if none.

    Steps already done by an interrupted commit are left out, so it resumes anywhere.
    """
    staged, aside = corpus_dir / STAGING, corpus_dir / ASIDE
    if not (staged / CORPUS_JSON).exists():
        return []
    # STAGING/corpus.json moves last, so while it is there the top corpus.json is the old one.
    steps = [(corpus_dir / CORPUS_JSON, aside / CORPUS_JSON)] if _exists(corpus_dir / CORPUS_JSON) else []
    for name in ARTEFACTS:
        if _exists(staged / name):  # not moved in yet: what is at the top is old
            if _exists(corpus_dir / name):
                steps.append((corpus_dir / name, aside / name))
            steps.append((staged / name, corpus_dir / name))
    steps.append((staged / CORPUS_JSON, corpus_dir / CORPUS_JSON))  # the commit point
    return steps


def commit(corpus_dir: pathlib.Path) -> bool:
    """Swaps the complete build in STAGING in for corpus_dir's corpus. Resumable; needs the lock.

    Returns False (and does nothing) if STAGING holds no complete build.
    """
    steps = plan(corpus_dir)
    if not steps:
        return False
    aside = corpus_dir / ASIDE
    aside.mkdir(exist_ok=True)
    for src, dst in steps:
        if dst == corpus_dir / CORPUS_JSON:  # everything else durable before the commit point
            fsync_dir(corpus_dir)
            fsync_dir(aside)
        if dst.parent == aside:
            _remove(dst)  # only if a damaged earlier attempt left one: it is older still
        os.rename(src, dst)
    fsync_dir(corpus_dir)
    _remove(aside)
    _remove(corpus_dir / STAGING)
    return True


def _roll_back(corpus_dir: pathlib.Path) -> None:
    """Puts the old corpus kept in ASIDE back (its corpus.json last)."""
    aside = corpus_dir / ASIDE
    for name in ARTEFACTS:
        if os.path.lexists(aside / name):
            _remove(corpus_dir / name)  # a new artefact without its corpus.json: unusable
            os.rename(aside / name, corpus_dir / name)
    fsync_dir(corpus_dir)
    os.rename(aside / CORPUS_JSON, corpus_dir / CORPUS_JSON)
    fsync_dir(corpus_dir)


def recover(corpus_dir: pathlib.Path, log: Callable[[str], None]) -> None:
    """Brings corpus_dir back to one consistent corpus (or none) after an interrupted prepare.

    Must run under the prepare lock. Never touches raw/.
    """
    if swap_pending(corpus_dir):
        commit(corpus_dir)
        log(f"corpus at {corpus_dir}: finished swapping in a complete build that was interrupted")
        return
    aside = corpus_dir / ASIDE
    if not (corpus_dir / CORPUS_JSON).exists() and (aside / CORPUS_JSON).exists():
        _roll_back(corpus_dir)
        log(f"corpus at {corpus_dir}: restored the previous corpus from an interrupted swap")
    found = leftovers(corpus_dir)
    for path in found:
        _remove(path)
    if found:
        log(
            f"corpus at {corpus_dir}: removed what an interrupted prepare left ({', '.join(p.name for p in found)})"
        )
