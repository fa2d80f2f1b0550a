"""Source parsers on small hand-made package trees, and (marked network) on the real packages."""

import json
import os
import pathlib
import re
import struct
import subprocess
import zlib

import pytest

from fedjax_lm import data
from fedjax_lm.data import debian
from fedjax_lm.data.errors import DataError
from fedjax_lm.data.sources import fortunes, pycode, sword

# ------------------------------------------------------------------ fortunes


def test_fortunes_entries_dedup_and_skip_indexes(tmp_path):
    base = tmp_path / "usr/share/games/fortunes"
    (base / "de").mkdir(parents=True)
    (base / "wisdom").write_text("First entry\n  -- someone\n%\nSecond\nentry\n%\n\n%\nThird\n")
    (base / "wisdom.dat").write_bytes(b"\x00\x00\x00\x02binary index")
    os.symlink("wisdom", base / "wisdom.u8")  # same file under a second name
    (base / "de" / "sprueche").write_text("Erster Spruch\n%\nZweiter Spruch\n")
    docs = list(fortunes.parse_fortunes(tmp_path))
    assert docs == ["Erster Spruch", "Zweiter Spruch", "First entry\n  -- someone", "Second\nentry", "Third"]


def test_fortunes_zh_strips_ansi_codes(tmp_path):
    base = tmp_path / "usr/share/games/fortunes"
    base.mkdir(parents=True)
    (base / "tang300").write_text(
        "\x1b[32m《静夜思》\x1b[m\n\x1b[33m作者：李白\x1b[m\n床前明月光\n%\n"
        "通过\x1b[35;1m“~/.bashrc”\x1b[;\x1b[34;1mm来定制\n"
    )
    docs = list(fortunes.parse_fortunes_ansi(tmp_path))
    assert docs == ["《静夜思》\n作者：李白\n床前明月光", "通过“~/.bashrc”来定制"]


# --------------------------------------------------------------------- SWORD


def _write_testament(module: pathlib.Path, name: str, books: list[list[str]]) -> None:
    """A zText testament: one zlib block per book, one .bzv record per verse piece."""
    bzs, bzz, bzv = b"", b"", b""
    blocks = [['<milestone type="x-importer" n="$Rev$"/>']] + books
    for b, pieces in enumerate(blocks):
        raw = "".join(pieces).encode("utf-8")
        packed = zlib.compress(raw)
        bzs += struct.pack("<III", len(bzz), len(packed), len(raw))
        bzz += packed
        offset = 0
        for piece in pieces:
            size = len(piece.encode("utf-8"))
            bzv += struct.pack("<IIH", b, offset, size)
            offset += size
    (module / f"{name}.bzs").write_bytes(bzs)
    (module / f"{name}.bzz").write_bytes(bzz)
    (module / f"{name}.bzv").write_bytes(bzv)


def _sword_tree(root: pathlib.Path) -> None:
    module = root / "usr/share/sword/modules/texts/ztext/engTEST"
    module.mkdir(parents=True)
    _write_testament(
        module,
        "ot",
        [
            [
                '<div osisID="Gen" sID="b1" type="book"/> <title type="main">Genesis</title>',
                '<chapter osisID="Gen.1" sID="Gen.1"/><w lemma="s:1">In</w> the <w>beginning</w>'
                '<note placement="foot"><reference>1:1</reference>a note</note>, God &amp; co. ',
                '<w>God</w><note n="a">x</note><w>created</w> the world. <chapter eID="Gen.1"/>',
                '<chapter osisID="Gen.2" sID="Gen.2"/>Thus the heavens. <div eID="b1" type="book"/>',
            ]
        ],
    )
    _write_testament(
        module,
        "nt",
        [
            [
                '<div osisID="John" sID="b2" type="book"/><title>John</title>',
                '<chapter osisID="John.3" sID="John.3"/>For God so loved the world.<note>n</note> ',
            ]
        ],
    )


def test_sword_ztext_chapters_verses_notes_entities(tmp_path):
    _sword_tree(tmp_path)
    docs = list(sword.parse_sword(tmp_path))
    assert docs == [
        "Genesis\nIn the beginning, God & co.\nGod created the world.",
        "Thus the heavens.",
        "John\nFor God so loved the world.",
    ]


def test_sword_corrupt_block_is_reported(tmp_path):
    _sword_tree(tmp_path)
    bzz = tmp_path / "usr/share/sword/modules/texts/ztext/engTEST/nt.bzz"
    bzz.write_bytes(b"\x00" * bzz.stat().st_size)
    with pytest.raises(DataError, match=r"nt\.bzz block 0"):
        list(sword.parse_sword(tmp_path))


def test_clean_osis():
    assert (
        sword.clean_osis('a<note>x</note>. b<note n="1"/> <w>c</w><note>y</note>, d &lt;e&gt;')
        == "a. b c, d <e>"
    )


# ------------------------------------------------------- stdlib and licences


def test_python_code_excludes_tests_and_site_packages(tmp_path):
    for rel in [
        "os.py",
        "json/decoder.py",
        "test/test_os.py",
        "unittest/test/t.py",
        "lib2to3/tests/t.py",
        "site-packages/pkg/m.py",
        "idlelib/idle_test/t.py",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    files = [p.relative_to(tmp_path).as_posix() for p in pycode.stdlib_files(tmp_path)]
    assert files == ["json/decoder.py", "os.py"]
    src = pycode.PythonCodeSource(root=tmp_path)
    assert list(src.documents(tmp_path)) == ["# json/decoder.py", "# os.py"]


DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: example

Files: debian/*
Copyright: 2020 Someone
License: GPL-2+

Files: *
Copyright: none
License: public-domain
 This work is in the public domain.

License: GPL-2+
 This program is free software ...
"""


def test_licences_from_copyright_files():
    assert debian.licences_from_text(DEP5) == ("public-domain", ["GPL-2+", "public-domain"])
    legacy = "Notes\n\nThis program falls under the BSD copyright:\n\nCopyright (c) 1991\n"
    assert debian.licences_from_text(legacy) == ("BSD", ["BSD"])
    assert debian.licences_from_text("nothing to see") == ("unknown", [])


# ---------------------------------------------------- Debian fetching, offline


def test_fetch_uses_the_cache_without_apt(tmp_path, monkeypatch):
    pkg_dir = tmp_path / "pkgs" / "python3.12-doc"
    pkg_dir.mkdir(parents=True)
    (pkg_dir / ".fedjax_lm.json").write_text(
        json.dumps({"name": "python3.12-doc", "version": "3.12.1-1", "deb": "x.deb"})
    )

    def no_apt(cmd, cwd=None):
        raise AssertionError(f"ran {cmd} despite the cache")

    monkeypatch.setattr(debian, "_run", no_apt)
    name = debian.resolve(r"python3\.[0-9]+-doc", tmp_path)
    assert name == "python3.12-doc"
    pkg = debian.fetch(name, tmp_path, log=lambda _: None)
    assert (pkg.name, pkg.version, pkg.root) == ("python3.12-doc", "3.12.1-1", pkg_dir)


def test_no_apt_lists_says_what_to_run(tmp_path, monkeypatch):
    empty = subprocess.CompletedProcess([], 0, stdout="", stderr="")
    monkeypatch.setattr(debian, "_run", lambda cmd, cwd=None: empty)
    monkeypatch.setattr(debian, "_is_root", lambda: False)
    with pytest.raises(DataError, match=r"run `sudo apt-get update` once"):
        debian.resolve(r"linux-doc-[0-9]+(\.[0-9]+)*", tmp_path)


# ------------------------------------------------- the real Debian packages


def _collect():
    lines = []
    return lines, lines.append


@pytest.mark.network
def test_real_fortunes_package(tmp_path):
    lines, log = _collect()
    src = data.make_source("quotes-en", log=log)
    prov = src.provenance(tmp_path)
    assert prov["package"] == "fortunes" and prov["version"]
    assert prov["licence"] == "BSD"
    docs = list(src.documents(tmp_path))
    assert len(docs) > 10_000
    assert any(d.startswith("A critic is a bundle of biases held loosely together") for d in docs)
    assert all(d.strip() and not re.search(r"^%$", d, re.M) for d in docs)
    assert sum(len(d.encode()) for d in docs) > 2_000_000
    assert sum("downloading" in line for line in lines) == 1
    # A second use finds the cache: nothing is downloaded.
    lines2, log2 = _collect()
    again = data.make_source("quotes-en", log=log2)
    assert again.provenance(tmp_path) == prov and list(again.documents(tmp_path)) == docs
    assert not lines2


@pytest.mark.network
def test_real_sword_web_package(tmp_path):
    src = data.make_source("bible-en", log=lambda _: None)
    prov = src.provenance(tmp_path)
    assert prov["package"] == "sword-text-web" and prov["licence"] == "public-domain"
    docs = list(src.documents(tmp_path))
    assert len(docs) > 1000  # one per chapter
    verses = [v for d in docs for v in d.split("\n")]
    john_3_16 = [v for v in verses if "For God so loved the world" in v]
    assert len(john_3_16) == 1 and "eternal life" in john_3_16[0]
    assert "In the beginning, God created the heavens and the earth." in verses
    assert not any("<" in v and ">" in v for v in verses)


@pytest.mark.network
def test_doc_packages_resolve_through_apt_cache(tmp_path):
    assert re.fullmatch(r"python3\.\d+-doc", debian.resolve(r"python3\.[0-9]+-doc", tmp_path))
    assert re.fullmatch(r"linux-doc-[\d.]+", debian.resolve(r"linux-doc-[0-9]+(\.[0-9]+)*", tmp_path))
