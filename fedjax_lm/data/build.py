"""prepare: sources -> documents -> tokenizer -> partition -> per-silo token files.

Layout under data_cfg.corpus_dir:
  raw/                       cached Debian downloads (kept across rebuilds)
  tokenizer.model            SentencePiece BPE, byte fallback
  silos/<silo>/train.bin     flat uint16 (uint32 if vocab > 65535) token ids,
  silos/<silo>/val.bin       EOS after every document; read with np.memmap
  corpus.json                written last, by atomic rename: its presence means complete
  .prepare.lock              one builder at a time

A rebuild happens in .prepare-new/ beside them and is swapped in only once complete
(swap.py), so a failed or interrupted rebuild leaves the previous corpus as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import json
import os
import pathlib
import shutil
import time
from typing import Any, Callable

import numpy as np

from fedjax_lm.data import config as config_lib
from fedjax_lm.data import partition as partition_lib
from fedjax_lm.data import integrity, sampling, swap
from fedjax_lm.data.atomic import write_atomic
from fedjax_lm.data.errors import DataError
from fedjax_lm.data.sources import make_source
from fedjax_lm.data.tokenizer import Tokenizer, train_tokenizer

CORPUS_JSON = swap.CORPUS_JSON
TOKENIZER_FILE = swap.TOKENIZER_FILE
_ENCODE_CHUNK = 512  # documents per SentencePiece batch
_print = functools.partial(print, flush=True)


class CorpusJsonFields:
    """Read-only views of a parsed corpus.json held in `self.info` (shared by CorpusInfo and Corpus)."""

    info: dict

    @property
    def silos(self) -> list[str]:
        return list(self.info["silos"])

    @property
    def vocab_size(self) -> int:
        return int(self.info["vocab_size"])


@dataclasses.dataclass(frozen=True)
class CorpusInfo(CorpusJsonFields):
    """What prepare built (or found): the parsed corpus.json."""

    corpus_dir: pathlib.Path
    info: dict
    rebuilt: bool


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def _sha256_documents(docs: list[str]) -> str:
    """sha256 of the documents in order, each as UTF-8 followed by one NUL byte."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _check_settings(s: dict) -> None:
    if s["partition"] not in partition_lib.PARTITIONS:
        raise DataError(
            f"unknown partition {s['partition']!r}: valid are {', '.join(partition_lib.PARTITIONS)}"
        )
    if not s["sources"]:
        raise DataError("data_cfg.sources is empty: name at least one source")
    if not 0.0 <= s["val_fraction"] < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {s['val_fraction']}")
    if s["vocab_size"] < 300:
        raise DataError(
            f"vocab_size {s['vocab_size']} is too small: byte fallback alone takes 256 ids (use >= 300)"
        )


def check_sources(specs, log=_print) -> list:
    """Every source spec parsed, and user files and folders checked, before anything is read or
    downloaded: a malformed spec, a missing or empty folder, a missing file fails here, named."""
    sources = [make_source(str(spec), log=log) for spec in specs]
    names = [src.name for src in sources]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise DataError(
            f"two sources would make the same silo {dupes}: prefix one with NAME= (e.g. mine=folder:/data)"
        )
    for src in sources:
        if hasattr(src, "check"):
            src.check()
    return sources


def _load_sources(s: dict, raw_dir: pathlib.Path, log) -> tuple[list, list[list[str]]]:
    """(metadata per source, kept documents per source)."""
    sources = check_sources(s["sources"], log)
    metas, kept_docs = [], []
    for src in sources:
        t0 = time.time()
        meta = {"name": src.name, **src.provenance(raw_dir)}
        docs = list(src.documents(raw_dir))
        if not docs:
            raise DataError(f"source {src.name} produced no documents")
        sizes = np.array([len(d.encode("utf-8")) for d in docs], dtype=np.int64)
        keep = sampling.cap_by_bytes(
            sizes, s["max_bytes_per_source"], sampling.rng_for(s["seed"], src.name, "cap")
        )
        kept = [docs[i] for i in keep]
        meta.update(
            bytes=int(sizes[keep].sum()),
            documents=len(kept),
            sha256=_sha256_documents(kept),
            total_bytes=int(sizes.sum()),
            total_documents=len(docs),
        )
        origin = (
            f"{meta['package']} {meta['version']}" if meta.get("package") else meta.get("path", "user data")
        )
        log(
            f"source {src.name}: {origin} ({meta['licence']}): {meta['documents']:,} of "
            f"{len(docs):,} documents, {meta['bytes']:,} bytes [{time.time() - t0:.1f}s]"
        )
        metas.append(meta)
        kept_docs.append(kept)
    return metas, kept_docs


def _partition(
    s: dict, names: list[str], source_ids: np.ndarray, sizes: np.ndarray
) -> tuple[list[str], np.ndarray]:
    if s["partition"] == "natural":
        return names, partition_lib.partition_natural(source_ids)
    silos = partition_lib.silo_names(s["num_silos"])
    if s["partition"] == "iid":
        return silos, partition_lib.partition_iid(sizes, s["num_silos"], s["seed"])
    return silos, partition_lib.partition_dirichlet(
        source_ids, sizes, s["num_silos"], s["dirichlet_alpha"], s["seed"]
    )


def _encode(tok: Tokenizer, docs: list[str], dtype: np.dtype) -> list[np.ndarray]:
    out = []
    for i in range(0, len(docs), _ENCODE_CHUNK):
        out.extend(np.asarray(ids, dtype=dtype) for ids in tok.encode_batch(docs[i : i + _ENCODE_CHUNK]))
    return out


def _join(pieces: list[np.ndarray], eos: int, dtype: np.dtype) -> np.ndarray:
    """Documents back to back, EOS after each."""
    eos_arr = np.array([eos], dtype=dtype)
    return np.concatenate([x for p in pieces for x in (p, eos_arr)] or [np.zeros(0, dtype)])


def _up_to_date(corpus_dir: pathlib.Path, key: str) -> tuple[dict | None, str | None]:
    """(corpus.json, None) if the corpus is complete, undamaged and built from `key`; else (None, why)."""
    info_path = corpus_dir / CORPUS_JSON
    try:
        info = integrity.parse_corpus_json(info_path, info_path.read_bytes())
        if info.get("settings_hash") != key:
            return None, "was built from other settings"
        integrity.check_files(corpus_dir, info)
        for silo in info["silos"]:
            for split in integrity.SPLITS:
                integrity.open_tokens(corpus_dir, info, silo, split)  # ids < vocab; once per process
    except FileNotFoundError:
        return None, None
    except (OSError, DataError) as e:
        return None, f"is damaged ({str(e).removesuffix('; ' + integrity.REBUILD)})"
    return info, None


@contextlib.contextmanager
def _lock(corpus_dir: pathlib.Path, blocking: bool = True):
    """One builder per corpus_dir at a time (several silo processes may start at once).

    Yields whether the lock is held (always True when blocking).
    """
    corpus_dir.mkdir(parents=True, exist_ok=True)
    with open(corpus_dir / ".prepare.lock", "w", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(data_cfg: Any, *, log: Callable[[str], None] = _print, repair: bool = True) -> CorpusInfo:
    """Builds the corpus described by data_cfg, or returns at once if it is built.

    "Built" means corpus.json exists and records the hash of the same settings
    (config.settings: sources, caps, vocab, split, partition, seed, format version).
    User folders and files are not re-read to detect edits: change a setting, or
    delete corpus.json, to rebuild. A damaged corpus (corpus.json unreadable, a token
    file missing, of the wrong size or holding ids >= vocab_size) is rebuilt, or with
    `repair=False` (what `train` and the silos use) reported as a DataError naming the file,
    nothing deleted and nothing downloaded.

    The build happens in a staging folder and is swapped in when complete: if it fails
    (or is interrupted), the previous corpus is left byte for byte as it was and the
    error propagates. What a crash leaves is finished or undone by the next prepare.
    """
    s = config_lib.settings(data_cfg)
    key = config_lib.settings_hash(s)
    corpus_dir = pathlib.Path(config_lib.field(data_cfg, "corpus_dir")).expanduser()
    if swap.leftovers(corpus_dir):
        with _lock(corpus_dir, blocking=False) as held:
            if held:  # no prepare is running: what is there was left by a crash
                swap.recover(corpus_dir, log)
    if not swap.swap_pending(corpus_dir):
        info, why = _up_to_date(corpus_dir, key)
        if why and why.startswith("is damaged") and not repair:
            raise DataError(f"the corpus at {corpus_dir} {why}; {integrity.REBUILD}")
        if info is not None:
            log(f"corpus at {corpus_dir} is up to date ({len(info['silos'])} silos)")
            return CorpusInfo(corpus_dir, info, rebuilt=False)
    _check_settings(s)
    check_sources(s["sources"], log=lambda _: None)  # a bad spec or path fails before any folder is made
    with _lock(corpus_dir):
        swap.recover(corpus_dir, log)
        info, why = _up_to_date(corpus_dir, key)
        if info is not None:  # built while we waited
            return CorpusInfo(corpus_dir, info, rebuilt=False)
        if why:
            log(f"corpus at {corpus_dir} {why}: rebuilding")
        try:
            given = os.path.expanduser(str(config_lib.field(data_cfg, "tokenizer")))
            info = _build(s, key, corpus_dir, swap.staging_dir(corpus_dir), log, given=given)
            swap.commit(corpus_dir)
        except BaseException:
            # The old corpus is untouched unless the swap had begun; then finish it (the
            # new build is complete). Either way no staging folder stays behind.
            try:
                swap.recover(corpus_dir, log if swap.swap_pending(corpus_dir) else lambda _: None)
            except Exception:  # pylint: disable=broad-except
                pass  # the next prepare recovers; the first error is the one to report
            raise
        log(f"corpus ready at {corpus_dir}: {len(info['silos'])} silos [{info['prepare_seconds']:.1f}s]")
        return CorpusInfo(corpus_dir, info, rebuilt=True)


def _build(s: dict, key: str, corpus_dir: pathlib.Path, staged: pathlib.Path, log, given: str = "") -> dict:
    """Builds the corpus into `staged` (corpus.json last); downloads go to corpus_dir/raw."""
    t_start = time.time()
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)

    metas, kept_docs = _load_sources(s, corpus_dir / "raw", log)
    names = [m["name"] for m in metas]

    sample = []
    for name, docs in zip(names, [] if given else kept_docs):
        sizes = [len(d.encode("utf-8")) for d in docs]
        idx = sampling.sample_by_bytes(
            sizes, s["tokenizer_sample_bytes"], sampling.rng_for(s["seed"], name, "tokenizer")
        )
        sample.extend(docs[i] for i in idx)
    t0 = time.time()
    tok_path = staged / TOKENIZER_FILE
    if given:
        shutil.copyfile(given, tok_path)
        tok = Tokenizer(tok_path)
        if tok.vocab_size != s["vocab_size"]:
            raise DataError(
                f"data.tokenizer={given} has {tok.vocab_size} pieces but data.vocab_size={s['vocab_size']}; "
                "set data.vocab_size and model.vocab_size to the tokenizer's"
            )
        log(f"tokenizer: {given} ({tok.vocab_size} pieces, sha256 {s['tokenizer_sha256'][:12]}), not trained")
    else:
        train_tokenizer(sample, s["vocab_size"], tok_path)
        tok = Tokenizer(tok_path)
        log(
            f"tokenizer: BPE, {tok.vocab_size} pieces, trained on "
            f"{sum(len(d.encode('utf-8')) for d in sample):,} bytes [{time.time() - t0:.1f}s]"
        )
    del sample

    docs = [d for ds in kept_docs for d in ds]
    source_ids = np.concatenate([np.full(len(ds), i) for i, ds in enumerate(kept_docs)])
    sizes = np.array([len(d.encode("utf-8")) for d in docs], dtype=np.int64)
    del kept_docs
    silos, assignment = _partition(s, names, source_ids, sizes)

    dtype = token_dtype(tok.vocab_size)
    silo_info = {}
    for j, silo in enumerate(silos):
        idx = np.flatnonzero(assignment == j)  # source order, then document order
        if len(idx) == 0:
            raise DataError(
                f"silo {silo} received no documents: use fewer silos "
                f"(num_silos={s.get('num_silos')}) or a larger dirichlet_alpha"
            )
        tokens = _encode(tok, [docs[i] for i in idx], dtype)
        is_val = sampling.val_mask(sizes[idx], s["val_fraction"], sampling.rng_for(s["seed"], silo, "val"))
        if len(idx) == 1:  # one document: split its tokens instead
            only = tokens[0]
            cut = min(max(1, int(round(len(only) * (1 - s["val_fraction"])))), len(only) - 1)
            train_parts, val_parts = [only[:cut]], [only[cut:]]
        else:
            train_parts = [t for t, v in zip(tokens, is_val) if not v]
            val_parts = [t for t, v in zip(tokens, is_val) if v]
        splits = {"train": _join(train_parts, tok.eos_id, dtype), "val": _join(val_parts, tok.eos_id, dtype)}
        for split, arr in splits.items():
            write_atomic(staged / swap.SILOS_DIR / silo / f"{split}.bin", arr.tobytes())
        silo_bytes = int(sizes[idx].sum())
        mix = np.bincount(source_ids[idx], weights=sizes[idx], minlength=len(names)) / silo_bytes
        silo_info[silo] = {
            "train_tokens": int(splits["train"].size),
            "val_tokens": int(splits["val"].size),
            "train_documents": len(train_parts),
            "val_documents": len(val_parts),
            "bytes": silo_bytes,
            "bytes_per_token": round(silo_bytes / max(1, sum(t.size for t in tokens)), 4),
            "mix": {n: round(float(f), 6) for n, f in zip(names, mix) if f > 0},
            "train": f"silos/{silo}/train.bin",
            "val": f"silos/{silo}/val.bin",
        }
        log(
            f"silo {silo}: {len(idx):,} documents, {silo_bytes:,} bytes -> "
            f"train {splits['train'].size:,} / val {splits['val'].size:,} tokens "
            f"({silo_info[silo]['bytes_per_token']:.2f} bytes/token)"
        )

    info = {
        "format": config_lib.FORMAT_VERSION,
        "settings_hash": key,
        "settings": s,
        "vocab_size": tok.vocab_size,
        "tokenizer": TOKENIZER_FILE,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
        "token_dtype": dtype.name,
        "partition": {
            "name": s["partition"],
            "num_silos": len(silos),
            "dirichlet_alpha": s.get("dirichlet_alpha"),
        },
        "seed": s["seed"],
        "sources": {m.pop("name"): m for m in metas},
        "silos": silo_info,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "prepare_seconds": round(time.time() - t_start, 2),
    }
    swap.fsync_tree(staged)  # every artefact durable before corpus.json says the build is complete
    write_atomic(staged / CORPUS_JSON, json.dumps(info, indent=2, ensure_ascii=False).encode("utf-8"))
    swap.fsync_dir(staged)
    return info
