"""The command line: AOT compile, per-verb help, and one clear line for every bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fedjax_lm import cli as cli_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, env=None):
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # __main__ sets the device count itself
    return subprocess.run(
        [sys.executable, "-m", "fedjax_lm", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**base, **(env or {})},
        timeout=300,
    )


def test_compile_reports_per_device_memory_for_a_mesh():
    r = cli("compile", "--config", "experiments/centralized.py:size=tiny,batch_size=8", "--mesh", "1,8,1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mesh: {'data': 1, 'fsdp': 8, 'tensor': 1} on 8 cpu devices" in r.stdout
    assert "per-device argument_size" in r.stdout and "per-device peak estimate" in r.stdout
    params = int(r.stdout.split("model: ")[1].split(" params")[0].replace(",", ""))
    assert 1_000_000 < params < 3_000_000  # the tiny preset


def test_usage_errors_name_the_problem():
    r = cli("fly", "--config", "experiments/centralized.py")
    assert r.returncode != 0 and "usage: python -m fedjax_lm <verb>" in r.stderr and "aggregate" in r.stderr
    r = cli("train", "--config", "experiments/centralized.py")
    assert r.returncode != 0 and "needs --workdir" in r.stderr
    r = cli("train", "--config", "experiments/centralized.py:sizes=tiny", "--workdir", "/tmp/x")
    assert r.returncode != 0 and "unknown config variant key 'sizes'" in r.stderr
    r = cli("compile", "--config", "experiments/centralized.py", "--mesh", "1,8")
    assert r.returncode != 0 and "--mesh must be data,fsdp,tensor" in r.stderr


@pytest.mark.parametrize("verb", sorted(cli_lib.VERBS))
def test_every_verb_has_help_with_its_flags_and_an_example(verb):
    r = cli(verb, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"python -m fedjax_lm {verb}: ")
    for flag in cli_lib.VERBS[verb].flags:
        assert f"--{flag}" in r.stdout
    assert f"example:\n  python -m fedjax_lm {verb} " in r.stdout


PHOTON = "experiments/photon.py:size=tiny,silos=3"


# (name, args after the verb, what the one line must say)
BAD_INPUTS = [
    ("H <= 0", ["--config.federation.local_steps=0"], "federation.local_steps must be >= 1, got 0"),
    ("rounds <= 0", ["--config.federation.rounds=-2"], "federation.rounds must be >= 1, got -2"),
    ("unknown outer", ["--config.federation.outer.name=adamw"], "unknown outer optimizer 'adamw'"),
    ("negative quorum", ["--config.federation.deploy.quorum=-1"], "federation.deploy.quorum must be >= 1"),
    ("negative poll", ["--config.federation.deploy.poll_s=-0.5"], "federation.deploy.poll_s must be > 0"),
    ("mesh too big", ["--config.mesh.data=3"], "needs 3 devices but 1 are available"),
    (
        "zero silos",
        ["--config", "experiments/photon.py:size=tiny,silos=0"],
        "silos=0: the natural partition has",
    ),
    ("batch vs mesh", ["--config.train.batch_size=0"], "train.batch_size must be >= 1, got 0"),
]


@pytest.mark.parametrize("name,args,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_config_values_give_one_line_and_touch_nothing(tmp_path, name, args, message):
    corpus = tmp_path / "corpus"
    work = tmp_path / "work"
    spec = args[1] if args[0] == "--config" else PHOTON
    args = args[2:] if args[0] == "--config" else args
    r = cli("train", "--config", spec, f"--config.data.corpus_dir={corpus}", "--workdir", str(work), *args)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("fedjax_lm train: error: ") and message in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
    assert not corpus.exists() and not work.exists()  # no download started, nothing written


def test_verbose_flag_shows_the_traceback(tmp_path):
    r = cli(
        "train",
        "--config",
        PHOTON,
        f"--config.data.corpus_dir={tmp_path / 'c'}",
        "--workdir",
        str(tmp_path / "w"),
        "--config.federation.local_steps=0",
        "-v",
        "1",
    )
    assert r.returncode != 0 and "Traceback" in r.stderr and "local_steps must be >= 1" in r.stderr


@pytest.mark.parametrize("damage", ["odd length", "id >= vocab"])
def test_corrupt_corpus_files_are_named_and_kept(small_corpus, tmp_path, damage):
    """`train` on a corpus whose token file is damaged: one line naming the file, nothing rebuilt."""
    import shutil

    from tests.test_simulation import fed_config

    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus.corpus_dir, corpus)
    path = corpus / "silos" / "prose" / "val.bin"
    raw = bytearray(path.read_bytes())
    if damage == "odd length":
        raw = raw[:-1]
    else:
        raw[2:4] = np.array([60000], np.uint16).tobytes()
    path.write_bytes(bytes(raw))
    before = {p: p.read_bytes() for p in corpus.rglob("*") if p.is_file()}
    c = fed_config(small_corpus)
    c.data.corpus_dir = str(corpus)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(c.to_json_best_effort())
    r = cli("train", "--config", f"experiments/from_json.py:{cfg}", "--workdir", str(tmp_path / "w"))
    assert r.returncode == 1, r.stderr[-2000:]
    last = [line for line in r.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("fedjax_lm train: error: ") and "prose/val.bin" in last, r.stderr[-2000:]
    assert ("not a whole number" in last) if damage == "odd length" else ("token id 60000" in last)
    assert "Traceback" not in r.stderr
    after = {p: p.read_bytes() for p in corpus.rglob("*") if p.is_file() and ".prepare.lock" not in p.name}
    assert after == {p: b for p, b in before.items() if ".prepare.lock" not in p.name}
