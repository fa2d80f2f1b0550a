"""Sweeps through the CLI verb (run, resume, a failing point, --print-only, a bad field) and the
per-round update diagnostics of the one-process simulation."""

import csv
import json
import math
import os
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedjax_lm import compression
from fedjax_lm import config as config_lib
from fedjax_lm import monitor
from fedjax_lm import runs
from fedjax_lm import simulation
from fedjax_lm import sweep as sweep_lib
from fedjax_lm import sweep_report
from fedjax_lm.data import Corpus
from tests.test_simulation import fed_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEPS = """
import json

from fedjax_lm import config as config_lib


def get_config(arg=None):
    with open({json_path!r}) as f:
        return config_lib.from_json_dict(json.load(f))


def sweep_two(add, base):
    for h in (1, 2):
        add(**{{"federation.local_steps": h}})


def sweep_broken(add, base):
    add(name="bad", **{{"train.silos": ("nope",)}})  # valid config, fails when the corpus is read
    add(**{{"federation.local_steps": 1}})


def sweep_twin(add, base):
    add(**{{"federation.local_steps": 1}})
    add(recipe="centralized")


def sweep_typo(add, base):
    add(**{{"federation.local_steps": 1}})
    add(**{{"federation.locl_steps": 2}})
"""


@pytest.fixture(scope="module")
def spec(small_corpus, tmp_path_factory):
    """A config file of the tiny test federation (3 silos, 2 rounds) with its sweeps."""
    root = tmp_path_factory.mktemp("sweep_cfg")
    c = fed_config(small_corpus, rounds=2, local_steps=2)
    (root / "cfg.json").write_text(c.to_json_best_effort())
    (root / "cfg.py").write_text(SWEEPS.format(json_path=str(root / "cfg.json")))
    return str(root / "cfg.py")


def cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, like a user
    return subprocess.run(
        [sys.executable, "-m", "fedjax_lm", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_two_point_sweep_runs_then_resumes_by_skipping(spec, tmp_path):
    work = tmp_path / "sweep"
    r = cli("sweep", "--config", spec, "--sweep", "two", "--workdir", str(work))
    assert r.returncode == 0, r.stderr[-3000:]
    # a point is named by its overrides, each field by the shortest suffix unique in the sweep
    assert "[sweep] point 1/2 local_steps=1: federated run in" in r.stdout
    assert "[sweep] point 2/2 local_steps=2: done in" in r.stdout
    rows = read_csv(work / "sweep.csv")
    assert [row["federation.local_steps"] for row in rows] == ["1", "2"]
    assert [row["status"] for row in rows] == ["ok", "ok"]
    for row in rows:
        assert math.isfinite(float(row["val_ppl"])) and float(row["val_ppl"]) > 1
        assert float(row["traffic_ratio_vs_dp"]) > 0 and -1 <= float(row["update_cos_mean"]) <= 1
        assert {"ppl/code", "ppl/prose", "ppl/lines"} <= set(row)
        assert int(row["bytes_up"]) + int(row["bytes_down"]) == int(row["bytes_moved"]) > 0  # both directions
    # 2 rounds x 3 silos x H x batch 4 x seq 32
    assert [int(float(row["tokens"])) for row in rows] == [2 * 3 * h * 4 * 32 for h in (1, 2)]
    md = (work / "sweep.md").read_text()
    assert md.count("| local_steps=") == 2 and "--sweep two" in md
    for png in ("sweep_final.png", "sweep_curves.png"):
        assert (work / png).stat().st_size > 1000
    # the curves have evaluations during the run (eval_every set for the sweep), not only the last
    points = sweep_lib.build(spec, "two", config_lib.load_config(spec))
    assert all(len(sweep_report.curve(p, str(work / p.name))) >= 2 for p in points)

    summaries = {p: (work / p / "summary.json").stat().st_mtime_ns for p in (row["point"] for row in rows)}
    again = cli("sweep", "--config", spec, "--sweep", "two", "--workdir", str(work))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipped") == 2 and "round 1/2" not in again.stdout
    assert {p: (work / p / "summary.json").stat().st_mtime_ns for p in summaries} == summaries
    assert [row["status"] for row in read_csv(work / "sweep.csv")] == ["skipped", "skipped"]


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(spec, tmp_path):
    work = tmp_path / "sweep"
    r = cli("sweep", "--config", spec, "--sweep", "broken", "--workdir", str(work))
    assert r.returncode == 1, r.stderr[-3000:]
    last = [line for line in r.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("fedjax_lm sweep: error: 1 of 2 points failed (bad)"), r.stderr[-2000:]
    assert "[sweep] point 2/2 local_steps=1: done in" in r.stdout
    bad, good = read_csv(work / "sweep.csv")
    assert bad["status"] == "failed" and "train.silos names ['nope']" in bad["error"]
    assert good["status"] == "ok" and math.isfinite(float(good["val_ppl"]))
    assert "Traceback" in (work / "bad" / "sweep_error.txt").read_text()
    assert "| bad | failed |" in (work / "sweep.md").read_text()


def test_print_only_prints_one_runnable_command_per_point(spec, tmp_path):
    work = tmp_path / "sweep"
    r = cli("sweep", "--config", spec, "--sweep", "twin", "--workdir", str(work), "--print-only")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and not work.exists()  # nothing ran, nothing written
    fed_cmd, twin_cmd = (shlex.split(line) for line in lines)
    assert fed_cmd[:6] == ["python", "-m", "fedjax_lm", "train", "--config", spec]
    assert "--config.federation.local_steps=1" in fed_cmd and fed_cmd[-2:] == [
        "--workdir",
        str(work / "local_steps=1"),
    ]
    # the centralized twin: experiments/centralized.py plus every field that differs from it
    assert twin_cmd[5] == os.path.join(ROOT, "experiments", "centralized.py")
    assert (
        "--config.train.batch_size=12" in twin_cmd and "--config.train.steps=4" in twin_cmd
    )  # 3 silos x 4; 2 x 2
    ran = subprocess.run(
        [sys.executable, *twin_cmd[1:]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    # the command made exactly the point's config: the sweep counts the point as finished
    twin = sweep_lib.build(spec, "twin", config_lib.load_config(spec))[1]
    assert twin.name == "centralized" and twin.kind == "centralized"
    assert sweep_lib.finished(twin, str(work / "centralized"))


def test_a_sweep_naming_a_missing_field_is_refused_before_any_point_runs(spec, tmp_path):
    work = tmp_path / "sweep"
    with pytest.raises(ValueError, match=r"point 2 .*config has no field 'federation.locl_steps'"):
        sweep_lib.main(spec, "typo", str(work), config_lib.load_config(spec))
    assert not work.exists()
    with pytest.raises(ValueError, match="defines no sweep 'nope'.*its sweeps: broken, twin, two, typo"):
        sweep_lib.build(spec, "nope", config_lib.load_config(spec))


def test_point_names_and_plot_axes():
    overrides = [{"H": 1, "rounds": 8}, {"H": 4, "rounds": 2}, {"H": 1, "rounds": 8, "compression": "none"}]
    assert sweep_lib.point_names(overrides) == [
        "H=1,rounds=8",
        "H=4,rounds=2",
        "H=1,rounds=8,compression=none",
    ]
    assert sweep_lib.point_names(
        [{"federation.outer.lr": 0.7, "optim.lr": 0.1}, {"recipe": "centralized"}]
    ) == [
        "outer.lr=0.7,optim.lr=0.1",
        "centralized",
    ]
    points = [sweep_lib.Point(i, "", o, None, "", {}) for i, o in enumerate(overrides)]
    # x is H; rounds follows from H (a fixed budget) so it does not split the lines; compression does
    assert sweep_report.plot_axes(points) == ("H", ["compression"])


def test_rounds_carry_update_norms_and_cosines(small_corpus):
    c = fed_config(small_corpus, rounds=1)
    sim = simulation.Simulation(c, Corpus.load(small_corpus.corpus_dir), progress=False)
    server, privates = sim.init(0)
    f = sim.fed
    outs = sim.run_clients(server.params, privates, f.names, 0)  # the round's payloads, to probe the helper
    _, row = sim.round(*sim.init(0), 0, monitor.PhaseTimer(), monitor.CommLedger())
    for silo in ("code", "prose", "lines"):
        assert row[f"update_norm/{silo}"] > 0
        assert -1 <= row[f"update_cos_to_mean/{silo}"] <= 1
    assert -1 <= row["update_cos_min"] <= row["update_cos_mean"] <= row["update_cos_max"] <= 1
    assert 0 < row["update_norm_of_mean"] <= row["update_mean_of_norms"]
    assert row["update_norm_ratio"] == pytest.approx(row["update_norm_of_mean"] / row["update_mean_of_norms"])
    # the Gram's weighted mean is the mean the round aggregated (its norm: delta_norm)
    assert row["update_norm_of_mean"] == pytest.approx(row["delta_norm"], rel=1e-5)
    # the Gram's diagonal is the norm check_update measures on the same payload
    gram = f.update_diagnostics({"code": (outs["code"].payload, 1.0)})
    assert gram["update_norm_of_mean"] == pytest.approx(f.check_update(outs["code"].payload)[1], rel=1e-5)
    # three identical updates: cosine 1, the norm of the mean is the mean of the norms
    same = outs["code"].payload
    d = f.update_diagnostics({"a": (same, 1.0), "b": (same, 2.0), "c": (same, 5.0)})
    assert d["update_cos_min"] == pytest.approx(1.0, abs=1e-5) and d["update_cos_max"] == pytest.approx(
        1.0, abs=1e-5
    )
    assert d["update_norm_of_mean"] <= d["update_mean_of_norms"] * (1 + 1e-6)
    assert d["update_norm_ratio"] == pytest.approx(1.0, abs=1e-5)
    # an update and its opposite (equal weights) cancel: cosine -1, the mean has norm ~0
    delta = compression.decompress(same, f.abstract_params)
    flipped = compression.compress(jax.tree.map(lambda x: -x, delta), None, f.method, f.block_size)[0]
    d = f.update_diagnostics({"a": (same, 1.0), "b": (flipped, 1.0)})
    assert d["update_cos_mean"] == pytest.approx(-1.0, abs=1e-5)
    assert d["update_norm_of_mean"] < 1e-3 * d["update_mean_of_norms"]
    assert np.isfinite(d["update_norm_ratio"])


def test_a_point_finished_by_an_older_version_is_still_finished(spec, tmp_path):
    """Fields added to the config since a point ran take their defaults: the point is not re-run."""
    point = next(
        p for p in sweep_lib.build(spec, "twin", config_lib.load_config(spec)) if p.kind == "federated"
    )
    work = tmp_path / point.name
    os.makedirs(work)
    (work / "summary.json").write_text("{}")
    cfg = runs.config_dict(point.config)
    del cfg["federation"]["secagg"], cfg["federation"]["download_from_seed"]
    (work / "run.json").write_text(json.dumps({"kind": "federated", "config": cfg, "fingerprint": "old"}))
    assert sweep_lib.finished(point, str(work))
    cfg["federation"]["local_steps"] += 1
    (work / "run.json").write_text(json.dumps({"kind": "federated", "config": cfg, "fingerprint": "old"}))
    assert not sweep_lib.finished(point, str(work))
