"""prepare swaps a rebuilt corpus in only when complete; Corpus.load/tokens detect damaged files.

Real files throughout: small corpora built from the running Python's stdlib (no download).
"""

import json
import os
import pathlib
import re
import shutil
import sysconfig

import numpy as np

import pytest

from fedjax_lm import data
from fedjax_lm.data import corpus as corpus_lib, swap, tokenizer as tokenizer_lib
from fedjax_lm.data.errors import DataError

LEFTOVERS = (swap.STAGING, swap.ASIDE)
VOCAB_A, VOCAB_B = 384, 448  # corpus "a" (the default here) and corpus "b" (also val_fraction 0.1)


def _write_sources(root: pathlib.Path) -> list[str]:
    """Two folder sources and a JSONL source made from stdlib modules."""
    lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = {"code": ["textwrap.py", "shlex.py", "glob.py"], "prose": ["this.py", "difflib.py"]}
    specs = []
    for name, names in files.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i, f in enumerate(names):
            text = (lib / f).read_text(encoding="utf-8")
            (folder / f"{i}.txt").write_text(text if name == "code" else " ".join(text.split()), "utf-8")
        specs.append(f"folder:{folder}")
    body = (lib / "json" / "decoder.py").read_text(encoding="utf-8")
    with (root / "lines.jsonl").open("w", encoding="utf-8") as f:
        for k in range(120):
            f.write(json.dumps({"text": f"record {k}: " + body[k * 31 % 4000 :][:300]}) + "\n")
    specs.append(f"jsonl:{root / 'lines.jsonl'}")
    return specs


def _config(corpus_dir, sources, **overrides):
    cfg = data.default_data_config()
    cfg.corpus_dir = str(corpus_dir)
    cfg.sources = list(sources)
    cfg.vocab_size = VOCAB_A
    cfg.max_bytes_per_source = 0
    cfg.tokenizer_sample_bytes = 100_000
    cfg.val_fraction = 0.2
    cfg.update(overrides)
    return cfg


_quiet = lambda _: None  # a log that prints nothing


def _snapshot(corpus_dir: pathlib.Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under corpus_dir, but the lock file."""
    out = {}
    for p in sorted(corpus_dir.rglob("*")):
        rel = str(p.relative_to(corpus_dir))
        if rel != ".prepare.lock":
            out[rel] = None if p.is_dir() else p.read_bytes()
    return out


def _no_leftovers(corpus_dir: pathlib.Path) -> None:
    assert not [n for n in os.listdir(corpus_dir) if n in LEFTOVERS or n.startswith(".prepare-")]


def _read_all(corpus_dir) -> data.Corpus:
    """Loads the corpus and maps (and so checks) every token file."""
    corpus = data.Corpus.load(corpus_dir)
    for silo in corpus.silos:
        for split in ("train", "val"):
            corpus.tokens(silo, split)
    return corpus


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return _write_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, sources):
    """Two complete corpora from different settings: (config, snapshot) for 'a' and 'b'."""
    out = {}
    for name, overrides in {"a": {}, "b": {"vocab_size": VOCAB_B, "val_fraction": 0.1}}.items():
        cfg = _config(tmp_path_factory.mktemp(f"corpus_{name}"), sources, **overrides)
        assert data.prepare(cfg, log=_quiet).rebuilt
        out[name] = (cfg, _snapshot(pathlib.Path(cfg.corpus_dir)))
    return out


@pytest.fixture
def corpus_a(tmp_path, built):
    """A private copy of corpus 'a' (paths in corpus.json are relative) and its config."""
    cfg, snap = built["a"]
    dest = tmp_path / "corpus"
    shutil.copytree(cfg.corpus_dir, dest)
    cfg = _config(dest, cfg.sources)
    assert _snapshot(dest) == snap
    return cfg, dest


# ---------------------------------------------------- failed and successful rebuilds


def _bad_folder(root: pathlib.Path) -> str:
    folder = root / "bad_folder"
    folder.mkdir()
    (folder / "a.txt").write_text("fine text\n" * 50, encoding="utf-8")
    (folder / "b.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))  # not UTF-8
    (folder / "c.txt").write_text("never read\n", encoding="utf-8")
    return f"folder:{folder}"


def _bad_jsonl(root: pathlib.Path) -> str:
    path = root / "bad.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": \n{"text": "four"}\n', encoding="utf-8")
    return f"jsonl:{path}"


FAILURES = {  # name -> (the changed settings, the DataError's message)
    "non-UTF-8 file": (
        lambda root, srcs: dict(sources=srcs + [_bad_folder(root)]),
        r"cannot decode .*bad_folder/b\.txt as UTF-8",
    ),
    "malformed JSONL line": (
        lambda root, srcs: dict(sources=srcs[:1] + [_bad_jsonl(root)] + srcs[1:]),
        r"bad\.jsonl:3: not JSON",
    ),
    "unreadable file": (
        lambda root, srcs: dict(sources=srcs + [f"jsonl:{root / 'gone.jsonl'}"]),
        r"source jsonl:.*gone\.jsonl: no such file",
    ),
    "tokenizer failure": (
        lambda root, srcs: dict(vocab_size=60_000),
        r"training failed for vocab_size=60000",
    ),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_failed_rebuild_leaves_previous_corpus_byte_identical(tmp_path, corpus_a, failure):
    cfg, corpus_dir = corpus_a
    before = _snapshot(corpus_dir)
    make, pattern = FAILURES[failure]
    changed = {"sources": list(cfg.sources), **make(tmp_path, list(cfg.sources))}
    changed = _config(corpus_dir, changed.pop("sources"), **changed)
    with pytest.raises(DataError, match=pattern) as e:
        data.prepare(changed, log=_quiet)
    assert "\n" not in str(e.value)
    assert _snapshot(corpus_dir) == before
    _no_leftovers(corpus_dir)
    _read_all(corpus_dir)  # still loads, every file checked
    assert not data.prepare(cfg, log=_quiet).rebuilt  # and is still up to date for its settings


def test_interrupt_late_in_a_rebuild_leaves_previous_corpus(corpus_a, monkeypatch):
    """A KeyboardInterrupt after the new tokenizer is trained (while encoding the silos)."""
    cfg, corpus_dir = corpus_a
    before = _snapshot(corpus_dir)

    def interrupted(self, texts):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer_lib.Tokenizer, "encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(_config(corpus_dir, cfg.sources, vocab_size=400), log=_quiet)
    assert _snapshot(corpus_dir) == before
    _no_leftovers(corpus_dir)


def test_successful_rebuild_replaces_the_corpus(corpus_a, built):
    cfg, corpus_dir = corpus_a
    old = json.loads((corpus_dir / "corpus.json").read_text())
    b_cfg, b_snap = built["b"]
    info = data.prepare(_config(corpus_dir, cfg.sources, vocab_size=VOCAB_B, val_fraction=0.1), log=_quiet)
    assert info.rebuilt
    on_disk = json.loads((corpus_dir / "corpus.json").read_text())
    assert on_disk == info.info
    assert on_disk["settings"]["vocab_size"] == VOCAB_B and on_disk["settings"]["val_fraction"] == 0.1
    assert on_disk["vocab_size"] == VOCAB_B and on_disk["settings_hash"] != old["settings_hash"]
    _no_leftovers(corpus_dir)
    corpus = _read_all(corpus_dir)
    assert corpus.vocab_size == VOCAB_B
    for silo in corpus.silos:
        assert len(corpus.tokens(silo, "val")) == on_disk["silos"][silo]["val_tokens"]
    # The same settings build the same files, whether swapped in or built in place.
    snap = _snapshot(corpus_dir)
    for rel, content in b_snap.items():
        if rel != "corpus.json":
            assert snap[rel] == content, rel
    assert set(snap) == set(b_snap)
    assert not data.prepare(
        _config(corpus_dir, cfg.sources, vocab_size=VOCAB_B, val_fraction=0.1), log=_quiet
    ).rebuilt


def test_rebuild_keeps_the_raw_download_cache(corpus_a):
    cfg, corpus_dir = corpus_a
    (corpus_dir / "raw" / "pkgs").mkdir(parents=True)
    (corpus_dir / "raw" / "pkgs" / "marker").write_bytes(b"downloaded once")
    assert data.prepare(_config(corpus_dir, cfg.sources, val_fraction=0.3), log=_quiet).rebuilt
    assert (corpus_dir / "raw" / "pkgs" / "marker").read_bytes() == b"downloaded once"
    _no_leftovers(corpus_dir)


# ------------------------------------------------------- crashes in the swap itself


def _stage(corpus_dir: pathlib.Path, built_b) -> None:
    """What a complete staged build of 'b' looks like just before commit."""
    b_cfg, _ = built_b
    staged = corpus_dir / swap.STAGING
    staged.mkdir()
    for name in ("corpus.json", *swap.ARTEFACTS):
        src = pathlib.Path(b_cfg.corpus_dir) / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, staged / name)


def _crash_after(corpus_dir: pathlib.Path, renames: int) -> int:
    """Leaves what a crash after `renames` of commit's renames leaves; returns how many there are."""
    steps = swap.plan(corpus_dir)
    (corpus_dir / swap.ASIDE).mkdir()
    for src, dst in steps[:renames]:
        os.rename(src, dst)
    return len(steps)


N_RENAMES = 6  # corpus.json aside; tokenizer aside, in; silos aside, in; corpus.json in


@pytest.mark.parametrize("renames", range(N_RENAMES + 1))
def test_crash_between_renames_recovers_to_a_complete_corpus(corpus_a, built, renames, monkeypatch):
    cfg, corpus_dir = corpus_a
    a_snap, (b_cfg, b_snap) = _snapshot(corpus_dir), built["b"]
    _stage(corpus_dir, built["b"])
    assert _crash_after(corpus_dir, renames) == N_RENAMES

    # Before recovery a reader sees the old corpus whole, the new one whole, or no corpus.
    monkeypatch.setattr(corpus_lib, "_SWAP_WAIT_S", 0.2)
    try:
        corpus = _read_all(corpus_dir)
        assert corpus.info == json.loads((b_snap if renames else a_snap)["corpus.json"])
    except FileNotFoundError as e:
        assert 0 < renames < N_RENAMES
        assert ".prepare-old" in str(e) and "python -m fedjax_lm prepare --config" in str(e)

    # The next prepare (with the staged build's settings) finishes the swap: nothing to rebuild.
    lines = []
    info = data.prepare(
        _config(corpus_dir, b_cfg.sources, vocab_size=VOCAB_B, val_fraction=0.1), log=lines.append
    )
    assert not info.rebuilt, lines
    assert _snapshot(corpus_dir) == b_snap
    _no_leftovers(corpus_dir)
    _read_all(corpus_dir)


def test_crash_between_renames_then_prepare_with_the_old_settings(corpus_a, built):
    cfg, corpus_dir = corpus_a
    a_snap = _snapshot(corpus_dir)
    _stage(corpus_dir, built["b"])
    _crash_after(corpus_dir, 3)
    # Recovery completes the swap to 'b'; 'a's settings then rebuild 'a' (the same bytes but the dates).
    assert data.prepare(cfg, log=_quiet).rebuilt
    snap = _snapshot(corpus_dir)
    assert set(snap) == set(a_snap)
    assert all(snap[k] == v for k, v in a_snap.items() if k != "corpus.json")
    _no_leftovers(corpus_dir)


def test_crash_during_a_build_leaves_staging_that_prepare_removes(corpus_a):
    cfg, corpus_dir = corpus_a
    before = _snapshot(corpus_dir)
    staged = corpus_dir / swap.STAGING
    (staged / "silos" / "code").mkdir(parents=True)
    (staged / "tokenizer.model").write_bytes(b"half a model")
    (staged / "silos" / "code" / ".train.bin.x1y2").write_bytes(b"\x01\x00" * 10)
    assert data.Corpus.load(corpus_dir).info == json.loads(before["corpus.json"])  # old corpus still whole
    assert not data.prepare(cfg, log=_quiet).rebuilt
    assert _snapshot(corpus_dir) == before
    _no_leftovers(corpus_dir)


def test_lost_staging_rolls_the_old_corpus_back(corpus_a):
    """Both corpus.json files gone but the old one aside (staging deleted by hand): put it back."""
    cfg, corpus_dir = corpus_a
    before = _snapshot(corpus_dir)
    aside = corpus_dir / swap.ASIDE
    aside.mkdir()
    for name in ("corpus.json", "tokenizer.model"):
        os.rename(corpus_dir / name, aside / name)
    (corpus_dir / "tokenizer.model").write_bytes(b"a new model without its corpus")
    assert not data.prepare(cfg, log=_quiet).rebuilt
    assert _snapshot(corpus_dir) == before
    _no_leftovers(corpus_dir)


def test_interrupt_during_the_swap_finishes_it(corpus_a, built, monkeypatch):
    """Ctrl-C between two renames of commit: prepare finishes the swap, then re-raises."""
    cfg, corpus_dir = corpus_a
    b_cfg, b_snap = built["b"]
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(swap.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(_config(corpus_dir, cfg.sources, vocab_size=VOCAB_B, val_fraction=0.1), log=_quiet)
    monkeypatch.undo()
    _no_leftovers(corpus_dir)
    snap = _snapshot(corpus_dir)
    assert set(snap) == set(b_snap)
    assert all(snap[k] == v for k, v in b_snap.items() if k != "corpus.json")
    assert not data.prepare(_config(corpus_dir, b_cfg.sources, vocab_size=VOCAB_B, val_fraction=0.1)).rebuilt


# ----------------------------------------------------------- damaged corpus files


def _silo(corpus_dir: pathlib.Path) -> str:
    return sorted(json.loads((corpus_dir / "corpus.json").read_text())["silos"])[0]


def _odd_length(d: pathlib.Path) -> str:
    path = d / "silos" / _silo(d) / "train.bin"
    with path.open("ab") as f:
        f.write(b"\x07")
    return rf"{re.escape(str(path))}: [\d,]+ bytes is not a whole number of 2-byte uint16 tokens"


def _short_by_a_token(d: pathlib.Path) -> str:
    path = d / "silos" / _silo(d) / "val.bin"
    path.write_bytes(path.read_bytes()[:-2])
    return rf"{re.escape(str(path))}: holds [\d,]+ tokens, corpus\.json records [\d,]+"


def _id_too_large(d: pathlib.Path) -> str:
    path = d / "silos" / _silo(d) / "val.bin"
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[5] = VOCAB_A + 7
    tokens.tofile(path)
    return (
        rf"{re.escape(str(path))}: token id {VOCAB_A + 7} at token 5 \(byte 10\) is >= vocab_size {VOCAB_A}"
    )


def _missing_val(d: pathlib.Path) -> str:
    path = d / "silos" / _silo(d) / "val.bin"
    path.unlink()
    return rf"{re.escape(str(path))}: missing: the val tokens of silo '{_silo(d)}' listed in corpus\.json"


def _broken_json(d: pathlib.Path) -> str:
    path = d / "corpus.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return rf"{re.escape(str(path))}: not valid JSON \(.*: line \d+ column \d+\)"


def _no_vocab_size(d: pathlib.Path) -> str:
    path = d / "corpus.json"
    info = json.loads(path.read_text())
    del info["vocab_size"], info["token_dtype"]
    path.write_text(json.dumps(info))
    return rf"{re.escape(str(path))}: missing required field\(s\) \['vocab_size', 'token_dtype'\]"


def _silo_without_files(d: pathlib.Path) -> str:
    path = d / "corpus.json"
    info = json.loads(path.read_text())
    info["silos"][_silo(d)].pop("train")
    path.write_text(json.dumps(info))
    return rf"{re.escape(str(path))}: silos\['{_silo(d)}'\]\['train'\] is None, expected a path"


DAMAGE = {
    "odd-length bin": _odd_length,
    "bin shorter than recorded": _short_by_a_token,
    "token id >= vocab": _id_too_large,
    "missing val.bin": _missing_val,
    "corpus.json not JSON": _broken_json,
    "corpus.json without required fields": _no_vocab_size,
    "silo without token files": _silo_without_files,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_corpus_gives_one_line_data_error_and_changes_nothing(corpus_a, damage):
    _, corpus_dir = corpus_a
    pattern = DAMAGE[damage](corpus_dir)
    before = _snapshot(corpus_dir)
    with pytest.raises(DataError, match=pattern) as e:
        _read_all(corpus_dir)
    message = str(e.value)
    assert "\n" not in message and "python -m fedjax_lm prepare --config" in message
    assert _snapshot(corpus_dir) == before


def test_ids_are_checked_when_a_silo_is_first_mapped(corpus_a):
    _, corpus_dir = corpus_a
    silo = _silo(corpus_dir)
    _id_too_large(corpus_dir)
    corpus = data.Corpus.load(corpus_dir)  # cheap: sizes only
    other = [s for s in corpus.silos if s != silo][0]
    assert len(corpus.tokens(other, "val")) > 0
    with pytest.raises(DataError, match=f"val.bin: token id {VOCAB_A + 7}"):
        corpus.tokens(silo, "val")


def test_prepare_rebuilds_a_damaged_corpus(corpus_a, built):
    cfg, corpus_dir = corpus_a
    _, a_snap = built["a"]
    _id_too_large(corpus_dir)
    lines = []
    assert data.prepare(cfg, log=lines.append).rebuilt
    assert any("is damaged" in line and f"val.bin: token id {VOCAB_A + 7}" in line for line in lines), lines
    snap = _snapshot(corpus_dir)
    assert all(snap[k] == v for k, v in a_snap.items() if k != "corpus.json")
    _read_all(corpus_dir)


def test_missing_corpus_says_how_to_build_it(tmp_path):
    for where in (tmp_path / "never-made", tmp_path):
        with pytest.raises(
            FileNotFoundError, match=r"python -m fedjax_lm prepare --config <config\.py>"
        ) as e:
            data.Corpus.load(where)
        assert str(where) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "never-made").exists()
