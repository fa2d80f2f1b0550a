"""fedjax_lm.data end to end on small local corpora: prepare, tokenizer, pipelines, errors.

Debian-backed parsers and the real packages are in test_data_sources.py.
"""

import collections
import hashlib
import json
import pathlib
import sys
import sysconfig

import numpy as np

import pytest

from fedjax_lm import data
from fedjax_lm.data import partition, sampling, tokenizer as tokenizer_lib
from fedjax_lm.data.errors import DataError

SEQ_LEN, BATCH = 32, 4

RUSSIAN = "Привет, мир! Съешь же ещё этих мягких французских булок, да выпей чаю.\n"
CHINESE = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n"
GERMAN = "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.\n"


def _stdlib_text(*names: str) -> str:
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((stdlib / n).read_text(encoding="utf-8") for n in names)


def _make_folder(root: pathlib.Path) -> pathlib.Path:
    """A folder source: several languages, a nested .md, a very long line, ignored files."""
    folder = root / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "ru.txt").write_text(RUSSIAN * 40, encoding="utf-8")
    (folder / "sub" / "zh.md").write_text(CHINESE * 40, encoding="utf-8")
    (folder / "de.txt").write_text(GERMAN * 40, encoding="utf-8")
    (folder / "long.txt").write_text(" ".join(f"word{i}" for i in range(3000)), encoding="utf-8")
    (folder / "ignored.py").write_text("print('not a document')\n")
    (folder / "sub" / "ignored.bin").write_bytes(b"\xff\xfe")
    return folder


def _make_jsonl(root: pathlib.Path) -> pathlib.Path:
    """A JSONL source holding paragraphs of a stdlib module's text, one per line."""
    paras = [p for p in _stdlib_text("textwrap.py", "argparse.py").split("\n\n") if p.strip()]
    path = root / "records.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i, p in enumerate(paras):
            f.write(json.dumps({"id": i, "text": p}) + "\n")
        f.write("\n")  # blank lines are skipped
    return path


def _config(corpus_dir, sources, **overrides):
    cfg = data.default_data_config()
    cfg.corpus_dir = str(corpus_dir)
    cfg.sources = [str(s) for s in sources]
    cfg.max_bytes_per_source = 300_000
    cfg.tokenizer_sample_bytes = 150_000
    cfg.vocab_size = 512
    cfg.seed = 0
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return {"folder": _make_folder(root), "jsonl": _make_jsonl(root)}


@pytest.fixture(scope="module")
def built(tmp_path_factory, inputs):
    """One natural corpus: the stdlib capped to 300 KB, a folder and a JSONL file."""
    corpus_dir = tmp_path_factory.mktemp("corpus")
    cfg = _config(corpus_dir, ["python-code", f"folder:{inputs['folder']}", f"jsonl:{inputs['jsonl']}"])
    lines = []
    info = data.prepare(cfg, log=lines.append)
    return cfg, info, lines


@pytest.fixture(scope="module")
def corpus(built):
    return data.Corpus.load(built[0].corpus_dir)


# ------------------------------------------------------------------ prepare


def test_prepare_layout_and_metadata(built, inputs):
    cfg, info, lines = built
    root = pathlib.Path(cfg.corpus_dir)
    assert info.rebuilt
    assert info.silos == ["python-code", "notes", "records"]
    assert (root / "tokenizer.model").is_file()
    on_disk = json.loads((root / "corpus.json").read_text())
    assert on_disk == info.info
    assert on_disk["vocab_size"] == 512 and on_disk["token_dtype"] == "uint16"
    assert on_disk["partition"]["name"] == "natural" and on_disk["seed"] == 0
    for silo in info.silos:
        assert (root / "silos" / silo / "train.bin").is_file()
        assert any(line.startswith(f"silo {silo}:") for line in lines), lines

    code = on_disk["sources"]["python-code"]
    assert code["package"].endswith("-stdlib") and code["version"]
    assert code["licence"].startswith("PSF")
    assert 250_000 < code["bytes"] <= 300_000  # capped, whole documents
    assert code["total_bytes"] > code["bytes"]

    # The folder is not capped: its sha256 is that of its files in path order.
    files = sorted(p for p in inputs["folder"].rglob("*") if p.suffix in (".txt", ".md"))
    texts = [p.read_text(encoding="utf-8").strip() for p in files]
    expected = hashlib.sha256(b"".join(t.encode() + b"\0" for t in texts)).hexdigest()
    notes = on_disk["sources"]["notes"]
    assert notes["sha256"] == expected
    assert notes["documents"] == 4 and notes["bytes"] == sum(len(t.encode()) for t in texts)
    assert notes["licence"] == "unknown (user-provided)"
    for silo, s in on_disk["silos"].items():
        assert s["mix"] == {silo: 1.0}


def test_token_files_match_metadata(built, corpus):
    info = built[1].info
    for silo in corpus.silos:
        meta = info["silos"][silo]
        for split in ("train", "val"):
            tokens = corpus.tokens(silo, split)
            assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
            assert len(tokens) == meta[f"{split}_tokens"]
            path = pathlib.Path(built[0].corpus_dir) / meta[split]
            assert path.stat().st_size == 2 * meta[f"{split}_tokens"]
            # One EOS after each document, and the file ends with one.
            assert np.count_nonzero(tokens == corpus.eos_id) == meta[f"{split}_documents"]
            assert tokens[-1] == corpus.eos_id
            assert int(tokens.max()) < corpus.vocab_size
        assert meta["val_tokens"] > 0 and meta["val_documents"] >= 1
        assert meta["train_documents"] + meta["val_documents"] == info["sources"][silo]["documents"]


def test_token_files_decode_to_the_documents(inputs, corpus):
    tokens = np.concatenate([corpus.tokens("notes", "train"), corpus.tokens("notes", "val")])
    eos = np.flatnonzero(tokens == corpus.eos_id)
    starts = np.concatenate([[0], eos[:-1] + 1])
    decoded = {corpus.tokenizer.decode(tokens[a:b]) for a, b in zip(starts, eos)}
    files = [p for p in inputs["folder"].rglob("*") if p.suffix in (".txt", ".md")]
    assert decoded == {p.read_text(encoding="utf-8").strip() for p in files}


def test_prepare_is_idempotent(built):
    cfg, _, _ = built
    root = pathlib.Path(cfg.corpus_dir)
    files = [root / "corpus.json", root / "tokenizer.model", *sorted((root / "silos").rglob("*.bin"))]
    before = {p: p.stat().st_mtime_ns for p in files}
    again = data.prepare(cfg, log=lambda _: None)
    assert not again.rebuilt
    assert again.info == built[1].info
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_prepare_rebuilds_when_settings_change(tmp_path, inputs):
    cfg = _config(tmp_path, [f"folder:{inputs['folder']}", f"jsonl:{inputs['jsonl']}"], vocab_size=400)
    first = data.prepare(cfg, log=lambda _: None)
    cfg.val_fraction = 0.2
    second = data.prepare(cfg, log=lambda _: None)
    assert first.rebuilt and second.rebuilt
    assert second.info["settings"]["val_fraction"] == 0.2
    assert second.info["settings_hash"] != first.info["settings_hash"]
    assert not data.prepare(cfg, log=lambda _: None).rebuilt


def test_failed_rebuild_keeps_the_previous_corpus(tmp_path, inputs, monkeypatch):
    good = _config(tmp_path, [f"folder:{inputs['folder']}", f"jsonl:{inputs['jsonl']}"], vocab_size=400)
    data.prepare(good, log=lambda _: None)
    before = (tmp_path / "corpus.json").read_bytes()

    # A rebuild that dies half-way (after the sources, in tokenizer training) neither damages
    # the previous corpus nor writes a new corpus.json.
    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr("fedjax_lm.data.build.train_tokenizer", boom)
    with pytest.raises(RuntimeError, match="killed mid-way"):
        data.prepare(_config(tmp_path, good.sources, vocab_size=401), log=lambda _: None)
    assert (tmp_path / "corpus.json").read_bytes() == before
    assert data.Corpus.load(tmp_path).vocab_size == 400


def test_bad_record_midway_leaves_no_corpus_json(tmp_path, inputs):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": \n')
    cfg = _config(tmp_path / "c", [f"folder:{inputs['folder']}", f"jsonl:{bad}"])
    with pytest.raises(DataError, match=f"{bad}:3: not JSON"):
        data.prepare(cfg, log=lambda _: None)
    assert not (tmp_path / "c" / "corpus.json").exists()


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_prepare_with_synthetic_partitions(tmp_path, inputs, kind):
    cfg = _config(
        tmp_path,
        [f"folder:{inputs['folder']}", f"jsonl:{inputs['jsonl']}"],
        vocab_size=400,
        partition=kind,
        num_silos=3,
        dirichlet_alpha=0.3,
    )
    info = data.prepare(cfg, log=lambda _: None).info
    assert list(info["silos"]) == ["silo-00", "silo-01", "silo-02"]
    total_docs = sum(s["documents"] for s in info["sources"].values())
    assert sum(s["train_documents"] + s["val_documents"] for s in info["silos"].values()) == total_docs
    for s in info["silos"].values():
        assert s["val_tokens"] > 0 and s["train_tokens"] > 0
        assert abs(sum(s["mix"].values()) - 1) < 1e-4


# ---------------------------------------------------------------- tokenizer

ROUND_TRIP = [
    "",
    "plain ascii",
    "  leading spaces,   runs of spaces\tand\ttabs  ",
    "\n\nblank lines\n\n\nand a trailing newline\n",
    RUSSIAN + CHINESE + GERMAN,
    "emoji 🦀🐍 and rare 龘 characters, math ∮ E⋅da = Q",
    "control \x01\x7f chars and \r\n line ends",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "Ω" * 5000 + " " + "x" * 9000,  # long lines
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trip(corpus, text):
    tok = corpus.tokenizer
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, dtype=np.uint16)) == text


def test_tokenizer_special_ids(corpus):
    tok = corpus.tokenizer
    assert tok.vocab_size == 512 == corpus.vocab_size
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    assert tok.eos_id == corpus.info["eos_id"]
    assert tok.eos_id not in tok.encode("hello world\n")


def test_split_long_line_keeps_text_and_utf8():
    line = ("漢字" * 3000) + " tail " + ("ab " * 2000)
    pieces = tokenizer_lib.split_long_line(line, max_bytes=1000)
    assert "".join(pieces) == line
    assert all(len(p.encode()) <= 1000 for p in pieces)
    assert tokenizer_lib.split_long_line("short") == ["short"]


def test_long_lines_reach_the_trainer(tmp_path):
    # The only text holding "zyxwvutsrq" is one 30 KB line: SentencePiece would drop it
    # whole (> 4192 bytes) unless we cut it, and the word would stay in pieces.
    filler = _stdlib_text("textwrap.py").split("\n")
    docs = filler + [" ".join(["zyxwvutsrq"] * 3000)]
    path = tmp_path / "t.model"
    tokenizer_lib.train_tokenizer(docs, 400, path)
    tok = data.Tokenizer(path)
    assert len(tok.encode(" zyxwvutsrq")) <= 2


def test_tokenizer_training_is_deterministic(tmp_path):
    docs = _stdlib_text("textwrap.py").split("\n\n") + [RUSSIAN, CHINESE]
    tokenizer_lib.train_tokenizer(docs, 400, tmp_path / "a.model")
    tokenizer_lib.train_tokenizer(docs, 400, tmp_path / "b.model")
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()


# ------------------------------------------------------------- partitioners


def _docs(num_sources=4, per_source=300, seed=0):
    rng = np.random.default_rng(seed)
    source_ids = np.repeat(np.arange(num_sources), per_source)
    sizes = rng.integers(50, 2000, size=len(source_ids))
    return source_ids, sizes


def test_partition_natural_is_the_source():
    source_ids, _ = _docs()
    np.testing.assert_array_equal(partition.partition_natural(source_ids), source_ids)


def test_partition_iid_balanced_and_complete():
    source_ids, sizes = _docs()
    a = partition.partition_iid(sizes, 5, seed=0)
    assert a.shape == sizes.shape and set(a) == set(range(5))  # every doc once, no empty silo
    silo_bytes = np.bincount(a, weights=sizes)
    assert silo_bytes.max() / silo_bytes.min() < 1.05
    mix = partition.silo_mix(a, source_ids, sizes, 5, 4)
    assert np.abs(mix - 0.25).max() < 0.08  # each silo looks like the pool
    np.testing.assert_array_equal(a, partition.partition_iid(sizes, 5, seed=0))
    assert not np.array_equal(a, partition.partition_iid(sizes, 5, seed=1))


def _skew(alpha, seed):
    source_ids, sizes = _docs(num_sources=5, per_source=400, seed=seed)
    a = partition.partition_dirichlet(source_ids, sizes, 6, alpha, seed)
    mix = partition.silo_mix(a, source_ids, sizes, 6, 5)
    return float(mix.max(axis=1).mean())  # mean share of a silo's main source


def test_partition_dirichlet_complete_and_deterministic():
    source_ids, sizes = _docs()
    a = partition.partition_dirichlet(source_ids, sizes, 6, 0.5, seed=3)
    assert a.shape == sizes.shape and a.min() >= 0 and a.max() < 6
    assert np.array_equal(a, partition.partition_dirichlet(source_ids, sizes, 6, 0.5, seed=3))
    assert not np.array_equal(a, partition.partition_dirichlet(source_ids, sizes, 6, 0.5, seed=4))
    silo_bytes = np.bincount(a, weights=sizes, minlength=6)
    assert silo_bytes.min() > 0.5 * silo_bytes.mean()  # sizes stay comparable


def test_partition_dirichlet_skew_grows_as_alpha_shrinks():
    skews = [np.mean([_skew(alpha, seed) for seed in range(3)]) for alpha in (100.0, 1.0, 0.05)]
    assert skews[0] < 0.3  # close to iid: 1/5 each
    assert skews[0] < skews[1] < skews[2]
    assert skews[2] > 0.7  # mostly one source per silo


def test_sampling_cap_and_val_split():
    sizes = np.array([100, 5000, 300, 40, 800, 900, 60, 2500])
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    keep = sampling.cap_by_bytes(sizes, 2000, rng())
    assert sizes[keep].sum() <= 2000 and len(set(keep)) == len(keep)
    np.testing.assert_array_equal(keep, sampling.cap_by_bytes(sizes, 2000, rng()))
    np.testing.assert_array_equal(sampling.cap_by_bytes(sizes, 0, rng()), np.arange(8))
    val = sampling.val_mask(sizes, 0.1, rng())
    assert val.any() and not val.all()
    assert sizes[val].sum() <= 2 * 0.1 * sizes.sum()
    assert sampling.val_mask(sizes[:2], 0.0, rng()).sum() == 1  # still some val


# ---------------------------------------------------------------- pipelines


def _windows(corpus, silo):
    tokens = np.asarray(corpus.tokens(silo, "train"))
    n = len(tokens) // (SEQ_LEN + 1)
    return tokens[: n * (SEQ_LEN + 1)].reshape(n, SEQ_LEN + 1).astype(np.int32)


def test_train_iterator_batches(corpus):
    it = data.train_iterator(corpus, ["notes"], seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
    batch = next(it)
    assert set(batch) == {"inputs", "targets"}
    for v in batch.values():
        assert v.shape == (BATCH, SEQ_LEN) and v.dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    # Every row is one window of the non-overlapping grid.
    grid = {w.tobytes() for w in _windows(corpus, "notes")}
    rows = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    assert all(r.tobytes() in grid for r in rows)


def test_train_iterator_epoch_visits_each_window_once(corpus):
    windows = _windows(corpus, "python-code")
    grid = collections.Counter(w.tobytes() for w in windows)  # (text can repeat)
    it = data.train_iterator(corpus, ["python-code"], seq_len=SEQ_LEN, batch_size=BATCH, seed=5)
    seen = collections.Counter()
    for _ in range(len(windows) // BATCH):
        b = next(it)
        for r in np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1):
            seen[r.tobytes()] += 1
    assert sum(seen.values()) == len(windows) // BATCH * BATCH
    assert all(seen[w] <= grid[w] for w in seen)  # no window twice within an epoch


def test_train_iterator_resume_yields_the_next_batch(corpus):
    kwargs = dict(seq_len=SEQ_LEN, batch_size=BATCH, seed=7)
    it = data.train_iterator(corpus, corpus.silos, **kwargs)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON round trip
    expected = [next(it) for _ in range(3)]
    restored = data.train_iterator(corpus, corpus.silos, **kwargs)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        np.testing.assert_array_equal(got["inputs"], want["inputs"])
        np.testing.assert_array_equal(got["targets"], want["targets"])
    # A fresh iterator starts elsewhere: the restored one did not just replay.
    fresh = next(data.train_iterator(corpus, corpus.silos, **kwargs))
    assert not np.array_equal(fresh["inputs"], expected[0]["inputs"])


def test_train_iterator_seeded(corpus):
    make = lambda seed: data.train_iterator(  # noqa: E731
        corpus, ["python-code"], seq_len=SEQ_LEN, batch_size=BATCH, seed=seed
    )
    a, b, c = next(make(1)), next(make(1)), next(make(2))
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], c["inputs"])


def test_pooled_iterator_draws_from_every_silo(corpus):
    owner = {}
    for silo in corpus.silos:
        for w in _windows(corpus, silo):
            owner[w.tobytes()] = silo
    it = data.train_iterator(corpus, corpus.silos, seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
    counts = {s: 0 for s in corpus.silos}
    for _ in range(300):
        b = next(it)
        for r in np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1):
            counts[owner[r.tobytes()]] += 1
    assert all(counts.values()), counts
    # Uniform over the union of windows: shares follow the silos' sizes.
    sizes = {s: len(_windows(corpus, s)) for s in corpus.silos}
    share = counts["python-code"] / sum(counts.values())
    assert abs(share - sizes["python-code"] / sum(sizes.values())) < 0.05


def test_eval_batches_deterministic_from_the_start(corpus):
    a = data.eval_batches(corpus, "python-code", seq_len=SEQ_LEN, batch_size=BATCH, max_batches=3)
    b = data.eval_batches(corpus, "python-code", seq_len=SEQ_LEN, batch_size=BATCH, max_batches=3)
    assert len(a) == 3
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    val = np.asarray(corpus.tokens("python-code", "val"))
    np.testing.assert_array_equal(a[0]["inputs"][0], val[:SEQ_LEN])
    np.testing.assert_array_equal(a[0]["targets"][0], val[1 : SEQ_LEN + 1])
    np.testing.assert_array_equal(a[0]["inputs"][1], val[SEQ_LEN + 1 : 2 * SEQ_LEN + 1])
    everything = data.eval_batches(corpus, "python-code", split="train", seq_len=SEQ_LEN, batch_size=BATCH)
    assert len(everything) == len(corpus.tokens("python-code", "train")) // (BATCH * (SEQ_LEN + 1))


# ------------------------------------------------------------------- errors


def test_error_unknown_source_lists_valid_ones():
    with pytest.raises(DataError, match="unknown source 'quotes-fr'") as e:
        data.make_source("quotes-fr")
    for name in data.BUILTIN_SOURCES:
        assert name in str(e.value)
    assert "folder:/path" in str(e.value)


def test_error_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "data.csv").write_text("a,b\n")
    src = data.make_source(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match=f"folder:{tmp_path / 'empty'}.*no \\*.txt or \\*.md"):
        list(src.documents(tmp_path))
    with pytest.raises(DataError, match="no such folder"):
        list(data.make_source(f"folder:{tmp_path / 'missing'}").documents(tmp_path))


def test_error_undecodable_file(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "ok.txt").write_text("fine\n")
    (tmp_path / "f" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(DataError, match=r"cannot decode .*latin1\.txt as UTF-8: invalid "):
        list(data.make_source(f"folder:{tmp_path / 'f'}").documents(tmp_path))


def test_error_unreadable_file(tmp_path):
    with pytest.raises(DataError, match=r"cannot read .*missing\.jsonl: No such file"):
        list(data.make_source(f"jsonl:{tmp_path / 'missing.jsonl'}").documents(tmp_path))


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "one"}\n\n{"text": "two"}\n')
    with pytest.raises(DataError, match=f"{path}:3: no field 'body'"):
        list(data.make_source(f"jsonl:{path}:body").documents(tmp_path))
    with pytest.raises(DataError, match=f"{path}:1: no field 'text'"):
        list(data.make_source(f"jsonl:{path}").documents(tmp_path))
    path.write_text('{"text": "one"}\nnot json\n')
    with pytest.raises(DataError, match=f"{path}:2: not JSON"):
        list(data.make_source(f"jsonl:{path}").documents(tmp_path))
    path.write_text('{"body": "one"}\n{"body": "two"}\n')
    assert list(data.make_source(f"jsonl:{path}:body").documents(tmp_path)) == ["one", "two"]


def test_hf_source_without_datasets_says_so(tmp_path, monkeypatch):
    # A None entry makes `import datasets` fail as on a machine without the package (the pinned env).
    monkeypatch.setitem(sys.modules, "datasets", None)
    src = data.make_source("hf:wikitext:train:text")
    with pytest.raises(DataError, match="needs the `datasets` package"):
        list(src.documents(tmp_path))


def test_error_silo_too_small_for_a_batch(corpus):
    tokens = len(corpus.tokens("notes", "train"))
    with pytest.raises(
        DataError,
        match=rf"silo notes is too small.*{tokens:,} tokens.*needs "
        rf"{1000 * (SEQ_LEN + 1):,}",
    ):
        data.train_iterator(corpus, ["python-code", "notes"], seq_len=SEQ_LEN, batch_size=1000, seed=0)
    with pytest.raises(DataError, match="silo notes is too small"):
        data.eval_batches(corpus, "notes", seq_len=SEQ_LEN, batch_size=1000)


def test_error_unknown_silo_and_missing_corpus(corpus, tmp_path):
    with pytest.raises(DataError, match=r"unknown silo\(s\) \['nope'\].*python-code"):
        data.train_iterator(corpus, ["nope"], seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
    with pytest.raises(FileNotFoundError, match="run `python -m fedjax_lm prepare` first"):
        data.Corpus.load(tmp_path / "nothing")


def test_error_bad_settings(tmp_path, inputs):
    folder = f"folder:{inputs['folder']}"
    with pytest.raises(DataError, match="unknown partition 'random'.*natural, iid, dirichlet"):
        data.prepare(_config(tmp_path, [folder], partition="random"), log=lambda _: None)
    with pytest.raises(DataError, match=r"same silo \['notes'\]"):
        data.prepare(_config(tmp_path, [folder, folder]), log=lambda _: None)
    named = data.make_source(f"mine={folder}")
    assert named.name == "mine"
    assert not (tmp_path / "corpus.json").exists()
