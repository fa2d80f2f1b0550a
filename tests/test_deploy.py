"""Cross-silo deployment with real OS processes sharing only an on-disk store."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fedjax_lm import compression
from fedjax_lm import config as config_lib
from fedjax_lm import deploy
from fedjax_lm import federation
from fedjax_lm import identity
from fedjax_lm import simulation
from fedjax_lm import store as store_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.multiprocess


MEMBERS = ("aggregator", "code", "lines", "prose")


def make_keys(tmp_path, members=MEMBERS):
    """One Ed25519 key per member in tmp_path/keys, and their allow-list (as `keygen` makes them)."""
    keys = tmp_path / "keys"
    for name in members:
        _, public = identity.generate(name, str(keys))
        identity.add_to_allow_list(str(keys / "federation.json"), name, public)
    return keys


def make_config(
    small_corpus,
    tmp_path,
    *,
    rounds=3,
    deadline_s=60.0,
    signed=False,
    download_compression="none",
    **deploy_overrides,
):
    if signed:
        deploy_overrides["allow_list"] = str(make_keys(tmp_path) / "federation.json")
    c = config_lib.load_config(
        os.path.join(ROOT, "experiments/photon.py") + f":size=tiny,vocab=512,H=3,rounds={rounds}"
    )
    c.data = small_corpus.copy_and_resolve_references()  # never mutate the shared fixture
    c.model.update(dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=512))
    c.train.update(dict(seq_len=32, batch_size=4, eval_batches=2))
    c.mesh.update(dict(data=1, fsdp=1, tensor=1))
    c.federation.download_compression = download_compression
    c.federation.compliance.cards = ""  # the gate has its own deployment test (tests/test_compliance.py)
    c.federation.deploy.update(
        dict(deadline_s=deadline_s, adaptive_deadline=False, poll_s=0.1, **deploy_overrides)
    )
    path = tmp_path / "config.json"
    path.write_text(c.to_json_best_effort())
    return c, f"experiments/from_json.py:{path}"


class Procs:
    """Starts fedjax_lm processes (one CPU device each), logs to files, kills them at the end."""

    def __init__(self, tmp_path, spec):
        self.tmp, self.spec, self.procs = tmp_path, spec, {}
        self.store = str(tmp_path / "store")
        self.env = dict(
            os.environ,
            XLA_FLAGS="--xla_force_host_platform_device_count=1",
            JAX_PLATFORMS="cpu",
            PYTHONPATH=ROOT,
        )

    def start(self, name, verb, *args, env=None, member=None):
        log = open(self.tmp / f"{name}.log", "a")
        cmd = [sys.executable, "-m", "fedjax_lm", verb, "--config", self.spec, "--store", self.store, *args]
        key = self.tmp / "keys" / f"{member}.key"
        if member and key.exists():  # a signed federation: each process holds its own key
            cmd.append(f"--config.federation.deploy.key={key}")
        self.procs[name] = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(env or {})}
        )
        return self.procs[name]

    def aggregator(self, name="aggregator", **kw):
        return self.start(name, "aggregate", "--workdir", str(self.tmp / "agg"), member="aggregator", **kw)

    def silo(self, silo, name=None, **kw):
        return self.start(name or silo, "silo", "--silo", silo, member=silo, **kw)

    def log(self, name):
        return (self.tmp / f"{name}.log").read_text()

    def wait(self, name, timeout=240):
        rc = self.procs[name].wait(timeout=timeout)
        assert rc == 0, f"{name} exited {rc}:\n{self.log(name)[-3000:]}"

    def kill(self, name):
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()

    def close(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def wait_until(pred, timeout=180, poll=0.1, what="condition"):
    t = time.time()
    while time.time() - t < timeout:
        if pred():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def federation_of(config):
    return federation.Federation(config, ["code", "lines", "prose"])


def final_params(config, store_root, r):
    fed = federation_of(config)
    params, _, meta = store_lib.Store(store_root).read_global(r, fed.abstract_params, fed.abstract_outer_opt)
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(params))], meta


def assert_equals_simulation(config, tmp_path, got):
    """The one-process simulation of the same config ends with the same params, bit for bit."""
    sim = simulation.train(config, str(tmp_path / "sim"))
    want = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(sim["server"].params))]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    return sim


def test_multiprocess_run_equals_one_process_simulation(small_corpus, tmp_path, procs):
    """A signed deployment (every update and global signed and verified) ends where the simulation does."""
    config, spec = make_config(small_corpus, tmp_path, signed=True)
    p = procs["p"] = Procs(tmp_path, spec)
    p.aggregator()
    for s in ("code", "prose", "lines"):
        p.silo(s)
    p.wait("aggregator")
    for s in ("code", "prose", "lines"):
        p.wait(s)
    got, meta = final_params(config, p.store, 3)
    assert meta["accepted"] == ["code", "lines", "prose"]
    allow = identity.AllowList.load(config.federation.deploy.allow_list)
    assert identity.verify_meta(allow, meta) is None and meta["signed_by"] == "aggregator"
    assert store_lib.Store(p.store).commit_problem(2, "code", allow) is None  # the silo's own signature
    assert "unsigned federation" not in p.log("aggregator") + p.log("code")
    sim = assert_equals_simulation(config, tmp_path, got)
    summary = json.loads((tmp_path / "agg" / "summary.json").read_text())
    assert summary["val"]["pooled"]["loss"] == pytest.approx(sim["val"]["pooled"]["loss"], abs=0)
    assert summary["communication"] == json.loads(json.dumps(sim["communication"]))
    # one metrics row per round, the same token counts as the simulation's
    agg_rows = [json.loads(line) for line in open(tmp_path / "agg" / "metrics" / "rounds.jsonl")]
    sim_rows = [json.loads(line) for line in open(tmp_path / "sim" / "metrics" / "rounds.jsonl")]
    assert [r["round"] for r in agg_rows] == [0, 1, 2]
    assert [r["tokens"] for r in agg_rows] == [r["tokens"] for r in sim_rows]
    assert [r["train_loss"] for r in agg_rows] == [r["train_loss"] for r in sim_rows]
    # the aggregator's workdir is a run like any other: eval reads the store's newest global
    r = subprocess.run(
        [sys.executable, "-m", "fedjax_lm", "eval", "--workdir", str(tmp_path / "agg")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=p.env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"model: global/3 of {p.store}" in r.stdout
    pooled = float(r.stdout.split("pooled")[1].split()[0])
    assert pooled == pytest.approx(sim["val"]["pooled"]["loss"], abs=1e-4)
    for verb in (
        ["generate", "--prompt", "def f", "--max_new_tokens", "5"],
        ["export", "--out", str(tmp_path / "hf")],
    ):
        r = subprocess.run(
            [sys.executable, "-m", "fedjax_lm", verb[0], "--workdir", str(tmp_path / "agg"), *verb[1:]],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=p.env,
        )
        assert r.returncode == 0 and "global/3" in r.stdout + r.stderr, r.stderr[-2000:]
    assert (tmp_path / "hf" / "tokenizer.model").exists()


def test_silo_killed_between_commit_and_state_save_replays_and_ends_bit_identical(
    small_corpus, tmp_path, procs
):
    """The window between a silo's COMMITTED marker and its private-state save, restarted late."""
    config, spec = make_config(small_corpus, tmp_path, rounds=3, signed=True)
    p = procs["p"] = Procs(tmp_path, spec)
    store = store_lib.Store(p.store)
    p.aggregator()
    p.silo("code")
    p.silo("prose")
    p.silo("lines", env={"FEDJAX_SILO_PAUSE_AFTER_COMMIT_S": "600"})
    wait_until(
        lambda: "pausing after the commit of round 0" in p.log("lines"), what="lines to commit round 0"
    )
    wait_until(lambda: (store.latest_global() or 0) >= 1, what="global/1")  # the next global is out
    p.kill("lines")
    assert store.is_committed(0, "lines") and store.latest_silo_state("lines") is None
    p.silo("lines", name="lines-restarted")
    p.wait("aggregator")
    p.wait("lines-restarted")
    log = p.log("lines-restarted")
    assert "round 0: committed before a restart; replaying it" in log
    got, meta = final_params(config, p.store, 3)
    assert meta["accepted"] == ["code", "lines", "prose"]
    assert_equals_simulation(config, tmp_path, got)


def test_store_of_another_federation_is_refused(small_corpus, tmp_path, procs):
    config, spec = make_config(small_corpus, tmp_path, rounds=1)
    p = procs["p"] = Procs(tmp_path, spec)
    p.aggregator()
    store = store_lib.Store(p.store)
    wait_until(lambda: store.latest_global() == 0, what="global/0")
    other = config.copy_and_resolve_references()
    other.federation.local_steps = 5
    with pytest.raises(ValueError, match=r"another config \(federation.local_steps: 3 -> 5"):
        deploy.check_store_run(store, other, "silo code")
    deploy.check_store_run(store, config, "silo code")  # the federation's own config is accepted


def test_killed_silo_round_closes_at_deadline_and_silo_rejoins(small_corpus, tmp_path, procs):
    config, spec = make_config(small_corpus, tmp_path, rounds=3, deadline_s=20.0)
    p = procs["p"] = Procs(tmp_path, spec)
    p.aggregator()
    p.silo("code")
    p.silo("prose")
    p.silo("lines")
    store = store_lib.Store(p.store)
    # kill `lines` while it trains round 0 (global/0 is out, its update is not committed yet)
    wait_until(lambda: store.latest_global() == 0, what="global/0")
    p.kill("lines")
    assert not store.is_committed(0, "lines")
    wait_until(
        lambda: (store.latest_global() or 0) >= 1, timeout=120, what="round 0 to close at its deadline"
    )
    meta1 = store.read_global_meta(1)
    assert meta1["accepted"] == ["code", "prose"]
    assert "deadline passed" in p.log("aggregator")
    p.silo("lines", name="lines-restarted")  # it rejoins and takes part in a later round
    p.wait("aggregator")
    p.wait("lines-restarted")
    rounds_accepted = [store.read_global_meta(r)["accepted"] for r in (1, 2, 3)]
    assert any("lines" in a for a in rounds_accepted[1:]), rounds_accepted
    assert "uploaded" in p.log("lines-restarted")


@pytest.mark.parametrize("download", ["none", "int8"])
def test_killed_aggregator_resumes_the_same_round_to_the_same_params(small_corpus, tmp_path, procs, download):
    """kill -9 between aggregation and publish; with the compressed download the resumed aggregator
    rebuilds the next broadcast copy and delta from global/0's copy: same params, same ledger."""
    config, spec = make_config(small_corpus, tmp_path, rounds=2, download_compression=download)
    p = procs["p"] = Procs(tmp_path, spec)
    # the aggregator pauses between aggregation and publishing global/1: kill -9 it there
    p.aggregator(env={"FEDJAX_PAUSE_BEFORE_PUBLISH_S": "30"})
    for s in ("code", "prose", "lines"):
        p.silo(s)
    wait_until(
        lambda: "pausing before publishing global/1" in p.log("aggregator"), what="aggregation of round 0"
    )
    p.kill("aggregator")
    store = store_lib.Store(p.store)
    assert store.latest_global() == 0 and len(store.committed_silos(0)) == 3
    p.aggregator(name="aggregator2")  # takes over the dead holder's lock, re-closes round 0
    p.wait("aggregator2")
    assert "resuming at round 0" in p.log("aggregator2")
    got, _ = final_params(config, p.store, 2)
    sim = assert_equals_simulation(config, tmp_path, got)
    summary = json.loads((tmp_path / "agg" / "summary.json").read_text())
    assert summary["communication"] == json.loads(json.dumps(sim["communication"]))
    # one metrics row per round although round 0 was closed twice
    assert [json.loads(line)["round"] for line in open(tmp_path / "agg" / "metrics" / "rounds.jsonl")] == [
        0,
        1,
    ]


def test_bad_updates_are_rejected_by_name_and_the_round_goes_on(small_corpus, tmp_path, procs):
    config, spec = make_config(small_corpus, tmp_path, rounds=1, deadline_s=120.0)
    p = procs["p"] = Procs(tmp_path, spec)
    fed = federation_of(config)
    store = store_lib.Store(p.store)
    p.aggregator()
    wait_until(lambda: store.latest_global() == 0, what="global/0")
    params, _, meta0 = store.read_global(0, fed.abstract_params, fed.abstract_outer_opt)
    delta = jax.tree.map(lambda x: np.full(x.shape, 0.01, np.float32), jax.device_get(params))
    good, _ = compression.compress(delta, None, config.federation.compression)
    good = jax.device_get(good)
    man = {
        "tokens": 384.0,
        "loss": 6.0,
        "method": "int8",
        "finished_at": time.time(),
        "base_global_sha256": meta0["params_sha256"],  # so that the NaN is what is rejected
    }
    nan_delta = jax.tree.map(lambda x: x.copy(), delta)
    jax.tree.leaves(nan_delta)[0][0] = np.nan
    store.write_update(0, "lines", jax.device_get(compression.compress(nan_delta, None, "int8")[0]), man)
    store.write_update(0, "intruder", good, man)
    p.silo("code")
    p.silo("prose")
    p.wait("aggregator")
    log = p.log("aggregator")
    assert "REJECTED" in log and "intruder" in log and "lines" in log
    meta = store.read_global_meta(1)
    assert meta["accepted"] == ["code", "prose"]
    assert set(meta["rejected"]) == {"lines", "intruder"}
    for silo, reason in meta["rejected"].items():
        assert silo in reason and "round 0" in reason
    assert "non-finite" in meta["rejected"]["lines"]
    assert "not a member" in meta["rejected"]["intruder"]


def test_second_aggregator_refuses_to_run(small_corpus, tmp_path, procs):
    config, spec = make_config(small_corpus, tmp_path, rounds=1)
    p = procs["p"] = Procs(tmp_path, spec)
    p.aggregator()
    store = store_lib.Store(p.store)
    wait_until(lambda: store.latest_global() == 0, what="global/0")
    p.aggregator(name="second")
    rc = p.procs["second"].wait(timeout=120)
    assert rc != 0
    assert "lock" in p.log("second").lower() and "pid" in p.log("second").lower()
    assert p.procs["aggregator"].poll() is None  # the first one still runs


def test_adaptive_deadline_follows_the_slowest_recent_silo():
    d = deploy.Deadlines(
        dict(adaptive_deadline=True, deadline_s=600.0, deadline_factor=2.0, min_deadline_s=30.0)
    )
    assert d.next() == 600.0  # no history yet: the fixed deadline
    d.observe([10.0, 40.0, 25.0])
    assert d.next() == 80.0  # 2 x the slowest silo
    d.observe([5.0])
    d.observe([6.0])
    assert d.next() == 30.0  # 2 x median(40, 5, 6) = 12, raised to the 30 s floor
    d.observe([100.0])
    assert d.next() == 30.0  # median(5, 6, 100) = 6: one slow round does not move it
    d.observe([100.0])
    assert d.next() == 200.0  # ... but two do: median(6, 100, 100) = 100
    fixed = deploy.Deadlines(
        dict(adaptive_deadline=False, deadline_s=123.0, deadline_factor=2.0, min_deadline_s=1.0)
    )
    fixed.observe([1000.0])
    assert fixed.next() == 123.0


def test_late_update_for_a_closed_round_is_ignored_and_logged(small_corpus, tmp_path, capsys):
    config, _ = make_config(small_corpus, tmp_path, rounds=2)
    agg = deploy.Aggregator(config, str(tmp_path / "store"), str(tmp_path / "agg"))
    server = agg.fed.init_server(0)
    agg.store.publish_global(
        0,
        server.params,
        server.opt_state,
        {"round": 0, "sampled": ["code"], "deadline": 0.0, "published_at": 0.0},
    )
    agg.store.publish_global(
        1,
        server.params,
        server.opt_state,
        {
            "round": 1,
            "sampled": ["code"],
            "deadline": 0.0,
            "published_at": 0.0,
            "accepted": ["code"],
            "rejected": {},
        },
    )
    delta = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), jax.device_get(server.params))
    payload = jax.device_get(compression.compress(delta, None, config.federation.compression)[0])
    agg.store.write_update(0, "prose", payload, {"tokens": 1.0, "loss": 1.0})  # after round 0 closed
    assert agg._log_late_updates(1) == ["prose"]
    assert "ignored late update of silo prose for closed round 0" in capsys.readouterr().out


def test_a_forged_commit_under_a_silos_name_is_replaced_by_the_real_silo(small_corpus, tmp_path, procs):
    """An outsider commits first under code's name; it does not count, code's process replaces it."""
    config, spec = make_config(small_corpus, tmp_path, rounds=1, signed=True)
    p = procs["p"] = Procs(tmp_path, spec)
    fed = federation_of(config)
    store = store_lib.Store(p.store)
    p.aggregator()
    wait_until(lambda: store.latest_global() == 0, what="global/0")
    params = store.read_global_params(0, fed.abstract_params)
    forged = jax.tree.map(lambda x: np.full(x.shape, 0.5, np.float32), jax.device_get(params))
    payload = jax.device_get(compression.compress(forged, None, config.federation.compression)[0])
    store.write_update(
        0,
        "code",
        payload,
        {"tokens": 384.0, "base_global_sha256": store.read_global_meta(0)["params_sha256"]},
    )
    for s in ("code", "lines", "prose"):
        p.silo(s)
    p.wait("aggregator")
    meta = store.read_global_meta(1)
    assert meta["accepted"] == ["code", "lines", "prose"] and not meta["rejected"]
    assert "the commit under silo code's name does not count: update signature: unsigned" in p.log(
        "aggregator"
    )
    allow = identity.AllowList.load(config.federation.deploy.allow_list)
    assert store.commit_problem(0, "code", allow) is None  # now code's own, signed
    got, _ = final_params(config, p.store, 1)
    assert_equals_simulation(config, tmp_path, got)  # as if the forgery had never been there
