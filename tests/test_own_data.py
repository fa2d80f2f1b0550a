"""Bring your own text: sources from the command line, their errors, and silos on private folders."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import _write_small_sources
from tests.test_deploy import Procs, make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "experiments/photon.py:size=tiny,vocab=512,H=2,rounds=1,batch_size=4,seq_len=32"


def cli(*args, cwd=ROOT, env=None):
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, "-m", "fedjax_lm", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**base, "PYTHONPATH": ROOT, **(env or {})},
        timeout=300,
    )


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    code, prose, lines = _write_small_sources(str(root))
    return {"code": code.split(":", 1)[1], "prose": prose.split(":", 1)[1], "lines": lines.split(":", 1)[1]}


def test_sources_from_the_command_line_build_the_named_silos(texts, tmp_path):
    corpus = tmp_path / "corpus"
    r = cli(
        "prepare",
        "--config",
        TINY,
        f"--config.data.corpus_dir={corpus}",
        "--source",
        f"mine=folder:{texts['code']}",
        "--source",
        f"records=jsonl:{texts['lines']}:text",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "silos: mine records"
    info = json.loads((corpus / "corpus.json").read_text())
    assert list(info["sources"]) == ["mine", "records"]
    assert info["sources"]["records"]["path"] == texts["lines"]
    # the list form of the README's override parses too (config_flags takes a list literal for a tuple field)
    r = cli(
        "prepare",
        "--config",
        TINY,
        f"--config.data.corpus_dir={corpus}",
        f'--config.data.sources=["mine=folder:{texts["code"]}", "records=jsonl:{texts["lines"]}:text"]',
    )
    assert r.returncode == 0 and "is up to date" in r.stdout, r.stderr[-2000:]


def _bad_sources(root):
    empty = root / "empty"
    empty.mkdir()
    (empty / "notes.csv").write_text("not a document")
    latin = root / "latin"
    latin.mkdir()
    (latin / "a.txt").write_text("fine")
    (latin / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    return {
        "malformed spec": ("clinic=folders:/x", "unknown source 'folders:/x'"),
        "missing folder": (
            f"clinic=folder:{root / 'nope'}",
            f"source folder:{root / 'nope'}: no such folder",
        ),
        "empty folder": (
            f"clinic=folder:{empty}",
            f"source folder:{empty}: the folder holds no *.txt or *.md file",
        ),
        "non-UTF-8 file": (f"clinic=folder:{latin}", f"cannot decode {latin / 'b.txt'} as UTF-8"),
        "missing jsonl": (
            f"lab=jsonl:{root / 'gone.jsonl'}:body",
            f"source jsonl:{root / 'gone.jsonl'}: no such file",
        ),
    }


@pytest.mark.parametrize(
    "case", ["malformed spec", "missing folder", "empty folder", "non-UTF-8 file", "missing jsonl"]
)
def test_a_bad_source_is_one_line_naming_it(tmp_path, case):
    spec, message = _bad_sources(tmp_path)[case]
    corpus = tmp_path / "corpus"
    r = cli("prepare", "--config", TINY, f"--config.data.corpus_dir={corpus}", "--source", spec)
    assert r.returncode == 1, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("fedjax_lm prepare: error: ") and message in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    if case != "non-UTF-8 file":  # found before anything is read: no corpus folder made
        assert not corpus.exists()
    else:
        assert not (corpus / "corpus.json").exists()


def test_two_silos_on_private_folders_share_only_the_tokenizer(small_corpus, texts, tmp_path, procs):
    """Silo alpha sees only its folder, silo beta only its own; the aggregator sees neither. The
    tokenizer, trained once on alpha's machine, reaches beta through the store."""
    config, spec = make_config(small_corpus, tmp_path, rounds=2)
    marker = {"alpha": "ALPHA-ONLY-7c1f", "beta": "BETA-ONLY-93ad"}
    folders = {}
    for silo, src in (("alpha", texts["code"]), ("beta", texts["prose"])):
        folder = tmp_path / f"{silo}-machine" / "data"
        folder.mkdir(parents=True)
        for name in sorted(os.listdir(src)):
            text = open(os.path.join(src, name), encoding="utf-8").read()
            (folder / name).write_text(f"{marker[silo]} {text}", encoding="utf-8")
        folders[silo] = folder
    corpus = {s: tmp_path / f"{s}-machine" / "corpus" for s in folders}
    # the run's starter (alpha's organisation) prepares its own corpus: that trains the tokenizer
    r = cli(
        "prepare",
        "--config",
        spec,
        f"--config.data.corpus_dir={corpus['alpha']}",
        "--source",
        f"alpha=folder:{folders['alpha']}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    tokenizer = corpus["alpha"] / "tokenizer.model"
    p = procs["p"] = Procs(tmp_path, spec)
    p.start(
        "aggregator",
        "aggregate",
        "--workdir",
        str(tmp_path / "agg"),
        '--config.train.silos=("alpha", "beta")',
        f"--config.data.tokenizer={tokenizer}",
        f"--config.data.corpus_dir={tmp_path / 'aggregator-has-no-corpus'}",
    )
    for silo in folders:
        p.start(
            silo,
            "silo",
            "--source",
            f"{silo}=folder:{folders[silo]}",
            f"--config.data.corpus_dir={corpus[silo]}",
        )
    p.wait("aggregator")
    for silo in folders:
        p.wait(silo)
    from fedjax_lm import store as store_lib

    store = store_lib.Store(p.store)
    assert store.read_global_meta(2)["accepted"] == ["alpha", "beta"]
    sha = hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    assert store.read_run()["tokenizer_sha256"] == sha
    assert "using the federation's tokenizer from the store" in p.log("beta")
    for silo in folders:  # each corpus holds its own folder only, tokenised with the shared tokenizer
        info = json.loads((corpus[silo] / "corpus.json").read_text())
        assert {k: v["path"] for k, v in info["sources"].items()} == {silo: str(folders[silo])}
        assert hashlib.sha256((corpus[silo] / "tokenizer.model").read_bytes()).hexdigest() == sha
    assert not (tmp_path / "aggregator-has-no-corpus" / "corpus.json").exists()
    # no text of either silo reached the store or the aggregator's folder
    for folder in (tmp_path / "store", tmp_path / "agg"):
        for dirpath, _, files in os.walk(folder):
            for f in files:
                data = open(os.path.join(dirpath, f), "rb").read()
                assert all(m.encode() not in data for m in marker.values()), os.path.join(dirpath, f)
    assert "no validation corpus here" in p.log("aggregator")
