"""Debian packages as text sources: resolve, download once, unpack, read the licence.

Layout under the cache folder `raw/`:
  raw/debs/PKG_VERSION_all.deb      what `apt-get download` fetched
  raw/pkgs/PKG/                     `dpkg -x` of it, made visible by one rename
  raw/pkgs/PKG/.fedjax_lm.json      name, version, deb file: written before the rename

A second call finds raw/pkgs/PKG and touches neither apt nor the network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

from fedjax_lm.data.errors import DataError

_MARKER = ".fedjax_lm.json"
_apt_updated = False  # `apt-get update` runs at most once per process.


@dataclasses.dataclass(frozen=True)
class Package:
    """An unpacked Debian package."""

    name: str
    version: str
    root: pathlib.Path  # the `dpkg -x` tree: root / "usr/share/..."

    @property
    def copyright_file(self) -> pathlib.Path:
        return self.root / "usr/share/doc" / self.name / "copyright"


def _run(cmd: list[str], cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text))


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _apt_update_once(why: str) -> bool:
    """Runs `apt-get update` once if we are root; returns whether it ran now."""
    global _apt_updated
    if _apt_updated or not _is_root():
        return False
    _apt_updated = True
    res = _run(["apt-get", "update"])
    if res.returncode != 0:
        raise DataError(f"`apt-get update` failed ({why}): {res.stderr.strip()[-500:]}")
    return True


def _no_apt_message(what: str) -> str:
    prefix = "" if _is_root() else "sudo "
    return (
        f"apt knows no package {what}: run `{prefix}apt-get update` once "
        "(Debian's package lists are needed), then prepare again"
    )


def resolve(pattern: str, raw_dir: pathlib.Path) -> str:
    """Returns the package name for an exact name or a regex like `python3\\.[0-9]+-doc`.

    A package already unpacked in the cache wins (so a warm cache needs no apt);
    otherwise the highest-versioned name apt-cache offers.
    """
    regex = re.compile(pattern)
    cached = [
        p.name for p in (raw_dir / "pkgs").glob("*") if regex.fullmatch(p.name) and (p / _MARKER).exists()
    ]
    if cached:
        return max(cached, key=_version_key)
    if re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", pattern):
        return pattern  # an exact name: apt-get download resolves (and complains) itself
    for attempt in range(2):
        res = _run(["apt-cache", "search", "--names-only", f"^{pattern}$"])
        names = [line.split(" ", 1)[0] for line in res.stdout.splitlines()]
        names = [n for n in names if regex.fullmatch(n)]
        if names:
            return max(names, key=_version_key)
        if attempt == 0 and not _apt_update_once(f"looking for {pattern}"):
            break
    raise DataError(_no_apt_message(f"matching `{pattern}`"))


def fetch(name: str, raw_dir: pathlib.Path, log=print) -> Package:
    """Downloads (once) and unpacks (once) Debian package `name` under raw_dir."""
    dest = raw_dir / "pkgs" / name
    marker = dest / _MARKER
    if marker.exists():
        meta = json.loads(marker.read_text())
        return Package(meta["name"], meta["version"], dest)

    debs = raw_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    deb = _download(name, debs, log)
    res = _run(["dpkg-deb", "-f", str(deb), "Package", "Version"])
    if res.returncode != 0:
        raise DataError(f"cannot read {deb}: {res.stderr.strip()}")
    fields = dict(line.split(": ", 1) for line in res.stdout.splitlines() if ": " in line)
    version = fields.get("Version", "unknown")

    (raw_dir / "pkgs").mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.", dir=raw_dir / "pkgs"))
    try:
        res = _run(["dpkg", "-x", str(deb), str(tmp)])
        if res.returncode != 0:
            raise DataError(f"`dpkg -x {deb}` failed: {res.stderr.strip()}")
        (tmp / _MARKER).write_text(json.dumps({"name": name, "version": version, "deb": deb.name}))
        if dest.exists():  # a stale half-made folder without marker
            shutil.rmtree(dest)
        os.rename(tmp, dest)
        deb.unlink()  # the unpacked tree is the cache
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Package(name, version, dest)


def _download(name: str, debs: pathlib.Path, log) -> pathlib.Path:
    """`apt-get download name` into debs/, reusing a .deb that is already there."""

    def found() -> pathlib.Path | None:
        hits = sorted(debs.glob(f"{name}_*.deb"), key=lambda p: p.stat().st_mtime)
        return hits[-1] if hits else None

    if (deb := found()) is not None:
        return deb
    for attempt in range(2):
        log(f"  downloading Debian package {name} ...")
        # The sandbox user `_apt` may not write here; downloading as ourselves is fine.
        res = _run(["apt-get", "download", "-o", "APT::Sandbox::User=root", name], cwd=debs)
        if res.returncode == 0 and (deb := found()) is not None:
            return deb
        unknown = "Unable to locate package" in res.stderr or "no installation candidate" in res.stderr
        if attempt == 0 and unknown and _apt_update_once(f"downloading {name}"):
            continue
        if unknown:
            raise DataError(_no_apt_message(f"`{name}`"))
        raise DataError(f"`apt-get download {name}` failed in {debs}: {res.stderr.strip()[-800:]}")
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- licences

# Recognisable licence statements, for copyright files that are not machine-readable.
_LICENCE_PATTERNS = (
    ("PSF-2.0 (Python licence)", r"Python Software Foundation|\bPSF\b|Python licen[cs]e"),
    ("BSD", r"\bBSD\b"),
    ("GPL", r"GNU General Public Licen[cs]e"),
    ("LGPL", r"GNU Lesser General Public Licen[cs]e|GNU Library General Public"),
    ("MIT", r"\bMIT Licen[cs]e\b|Permission is hereby granted, free of charge"),
    ("Apache-2.0", r"Apache Licen[cs]e"),
    ("public-domain", r"public domain"),
)


def licences_from_text(text: str) -> tuple[str, list[str]]:
    """(main licence, all licences) of a copyright or LICENSE text.

    Machine-readable Debian copyright files (DEP-5): the `License:` short names of
    the `Files:` paragraphs; the main one is that of `Files: *` (else the first).
    Other texts: the licence statement that appears first (alone: the other names
    such texts mention are often history or bundled software, not the licence).
    """
    if re.match(r"Format:\s*\S", text):
        main, names = None, []
        for para in re.split(r"\n\s*\n", text):
            files = re.search(r"^Files:\s*(.*)$", para, re.M)
            lic = re.search(r"^License:[ \t]*(\S.*)$", para, re.M)
            if files is None or lic is None:
                continue
            name = lic.group(1).strip()
            if name not in names:
                names.append(name)
            if main is None and files.group(1).split()[:1] == ["*"]:
                main = name
        if names:
            return main or names[0], names
    hits = []
    for name, pattern in _LICENCE_PATTERNS:
        m = re.search(pattern, text, re.I if name == "public-domain" else 0)
        if m:
            hits.append((m.start(), name))
    if not hits:
        return "unknown", []
    main = min(hits)[1]
    return main, [main]


def licences_of(pkg: Package) -> tuple[str, list[str]]:
    try:
        text = pkg.copyright_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown", []
    return licences_from_text(text)
