"""Compressed download (federation.download_compression): the broadcast copy, its error feedback, the ledger."""

import json
import os

import jax
import numpy as np
import pytest

from fedjax_lm import checkpoint as ckpt_lib
from fedjax_lm import compression
from fedjax_lm import federation
from fedjax_lm import identity
from fedjax_lm import simulation
from fedjax_lm import store as store_lib
from fedjax_lm.deploy import downloads
from fedjax_lm.deploy.common import Trust, check_deployable
from tests.test_deploy import Procs, assert_equals_simulation, final_params, make_config, wait_until

SILOS = ["code", "lines", "prose"]


def download_config(small_corpus, tmp_path, method="int8", rounds=3):
    config, _ = make_config(small_corpus, tmp_path, rounds=rounds)
    config.federation.download_compression = method
    return config


def test_download_cost_is_the_deltas_since_the_held_copy_or_the_full_model(small_corpus, tmp_path):
    fed = federation.Federation(download_config(small_corpus, tmp_path), SILOS)
    d = fed.downloads
    assert d.full_bytes == fed.param_bytes
    # int8: one byte per parameter (padded to blocks of 256) plus one f32 scale per block
    assert d.delta_bytes == compression.payload_nbytes(
        jax.eval_shape(lambda p: compression.compress(p, None, "int8", 256)[0], fed.abstract_params)
    )
    assert 0.25 < d.delta_bytes / d.full_bytes < 0.3
    assert d.from_seed and d.cost(None, 0) == 0  # round 0's global is built from the seed
    assert d.cost(None, 2) == 2 * d.delta_bytes  # joining later: the seed's copy and the deltas since
    assert d.cost(4, 5) == d.delta_bytes and d.cost(3, 5) == 2 * d.delta_bytes
    assert d.cost(0, 9) == d.cost(None, 9) == d.full_bytes  # too far behind: the full copy is cheaper
    config = download_config(small_corpus, tmp_path)
    config.federation.download_from_seed = False  # e.g. a run that starts from other weights
    unseeded = federation.Federation(config, SILOS).downloads
    assert unseeded.cost(None, 0) == unseeded.cost(None, 2) == d.full_bytes
    off = federation.Federation(download_config(small_corpus, tmp_path, "none"), SILOS).downloads
    assert not off.on and off.cost(4, 5) == off.full_bytes


def test_silos_train_from_the_broadcast_copy_and_the_ledger_counts_deltas(small_corpus, tmp_path):
    config = download_config(small_corpus, tmp_path)
    summary = simulation.train(config, str(tmp_path / "int8"))
    fed = federation.Federation(config, SILOS)
    rows = [json.loads(line) for line in open(tmp_path / "int8" / "metrics" / "rounds.jsonl")]
    assert [r["bytes_down"] for r in rows] == [0] + [3 * fed.downloads.delta_bytes] * 2
    plain = simulation.train(download_config(small_corpus, tmp_path, "none"), str(tmp_path / "none"))
    assert summary["communication"]["bytes_down"] < 0.55 * plain["communication"]["bytes_down"]
    # the exact global and the silos' copy differ by one int8 step of the last delta, not more
    ckpt = ckpt_lib.Checkpointer(os.path.join(tmp_path, "int8", "checkpoints"))
    items, _ = ckpt.restore(3, {"params": fed.abstract_params, "broadcast": fed.abstract_params})
    ckpt.close()
    theta, copy = (
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(items[k])]) for k in ("params", "broadcast")
    )
    assert not np.array_equal(theta, copy)  # the copy is compressed, not the global itself
    last_rows = [r for r in rows if "delta_norm" in r]
    assert np.linalg.norm(theta - copy) < 0.02 * last_rows[-1]["delta_norm"]
    # training from the compressed copy costs little here: same order of validation loss
    assert abs(summary["val"]["pooled"]["loss"] - plain["val"]["pooled"]["loss"]) < 0.05


def test_a_resumed_run_keeps_the_copy_and_what_each_silo_holds(small_corpus, tmp_path):
    config = download_config(small_corpus, tmp_path)
    config.federation.silos_per_round = 2  # some silos skip rounds: their next download is 2 deltas
    whole = simulation.train(config, str(tmp_path / "whole"))
    simulation.train(config, str(tmp_path / "parts"), stop_after_round=1)
    parts = simulation.train(config, str(tmp_path / "parts"))
    for a, b in zip(jax.tree.leaves(whole["server"].params), jax.tree.leaves(parts["server"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert whole["communication"] == parts["communication"]


def test_compressed_download_with_secure_aggregation(small_corpus, tmp_path):
    """The silos train from the broadcast copy and mask their updates: the download is priced like any,
    and the model ends where the unmasked run with the same download does (to the ring's resolution,
    which can move an int8 level of the next delta: the loss, not the bits)."""
    config = download_config(small_corpus, tmp_path, "int8", rounds=2)
    check_deployable(config)  # the store carries the deltas: a deployment accepts it
    config.federation.secagg.update(dict(enabled=True, bound=0.05))
    config.federation.update(dict(compression="none", max_update_norm_ratio=0.0))
    secure = simulation.train(config, str(tmp_path / "secure"))
    rows = [json.loads(line) for line in open(tmp_path / "secure" / "metrics" / "rounds.jsonl")]
    fed = federation.Federation(config, SILOS)
    assert [r["bytes_down"] for r in rows] == [0, 3 * fed.downloads.delta_bytes]
    assert [r["secagg_survivors"] for r in rows] == [SILOS, SILOS]
    config.federation.secagg.enabled = False
    plain = simulation.train(config, str(tmp_path / "plain"))
    assert secure["val"]["pooled"]["loss"] == pytest.approx(plain["val"]["pooled"]["loss"], abs=0.01)


def publish_rounds(config, root, rounds):
    """global/0..rounds published as the aggregator does (random steps standing in for outer steps)."""
    fed = federation.Federation(config, SILOS)
    store = store_lib.Store(root)
    server = fed.init_server(0)
    params, copy = server.params, server.params
    meta, items = downloads.publish(fed, copy, None)
    trust = Trust(None, None)
    store.publish_global(
        0, params, server.opt_state, {**meta, "params_sha256": identity.tree_sha256(params)}, items
    )
    for r in range(1, rounds + 1):
        key = jax.random.key(r)
        params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(key, x.shape, x.dtype), params)
        payload, copy = fed.downloads.next_broadcast(copy, params)
        meta, items = downloads.publish(fed, copy, payload)
        full = {**meta, "params_sha256": identity.tree_sha256(params)}
        store.publish_global(r, params, server.opt_state, full, items)
    return fed, store, trust, copy


def test_a_silo_rebuilds_the_copy_from_deltas_and_falls_back_to_the_full_copy(small_corpus, tmp_path, capsys):
    config = download_config(small_corpus, tmp_path)
    fed, store, trust, want = publish_rounds(config, str(tmp_path / "store"), 3)
    silo = downloads.SiloDownloads(fed, store, trust, "code", seed=0)
    held = downloads.read_broadcast(fed, store, 1, store.read_global_meta(1))
    meta3 = store.read_global_meta(3)
    # two deltas (rounds 2 and 3) cost less than the full copy: they are applied and checked
    got, start = silo.fetch(3, meta3, 1, held)
    assert start == 1
    assert identity.tree_sha256(got) == identity.tree_sha256(want) == meta3["broadcast_sha256"]
    # a silo that joins builds round 0's global from the seed (checked against global/0's signed hash)
    # and applies the three deltas since: cheaper than the full copy
    got, start = silo.fetch(3, meta3, None, None)
    assert start == 0 and identity.tree_sha256(got) == meta3["broadcast_sha256"]
    unseeded = downloads.SiloDownloads(fed, store, trust, "code", seed=1)  # not the run's seed
    got, start = unseeded.fetch(3, meta3, None, None)
    assert start is None and identity.tree_sha256(got) == meta3["broadcast_sha256"]
    assert "round 0's global built from train.seed does not match" in capsys.readouterr().out
    # a delta altered in the store: its signed hash does not match, the silo reads the full copy
    path = tmp_path / "store" / "global" / "2" / "download"
    victim = max((f for f in path.rglob("*") if f.parent.name == "d"), key=lambda f: f.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    got, start = silo.fetch(3, meta3, 1, held)
    assert start is None and identity.tree_sha256(got) == meta3["broadcast_sha256"]
    assert "cannot rebuild the global copy from deltas" in capsys.readouterr().out
    # the ledger prices what the manifest says, and a claim that cannot be true as the full copy
    assert downloads.held_round({"download_from": 1}, 3) == 1
    assert downloads.held_round({"download_from": 0}, 0) == 0  # round 0 from the seed: nothing downloaded
    for claim in (4, 7, -1, 1.5, True, "1", None):
        assert downloads.held_round({"download_from": claim}, 3) is None


@pytest.mark.multiprocess
def test_deployment_with_compressed_download_equals_the_simulation(small_corpus, tmp_path, procs):
    """Silos train from the broadcast copy they rebuild from the store's deltas: the same params, ledger
    and per-round bytes as the simulation, bit for bit, through a silo killed after its commit."""
    config, spec = make_config(small_corpus, tmp_path, rounds=4, signed=True, download_compression="int8")
    config.federation.silos_per_round = 2  # silos skip rounds: some downloads are chains of deltas
    path = tmp_path / "config.json"
    path.write_text(config.to_json_best_effort())
    p = procs["p"] = Procs(tmp_path, spec)
    store = store_lib.Store(p.store)
    p.aggregator()
    wait_until(lambda: store.latest_global() is not None, what="global/0")
    first = store.read_global_meta(0)["sampled"][0]
    for s in SILOS:
        env = {"FEDJAX_SILO_PAUSE_AFTER_COMMIT_S": "600"} if s == first else None
        p.silo(s, env=env)
    wait_until(
        lambda: "pausing after the commit of round 0" in p.log(first), what=f"{first} to commit round 0"
    )
    wait_until(lambda: (store.latest_global() or 0) >= 1, what="global/1")
    p.kill(first)  # its private state (and its copy of the global) was never saved
    p.silo(first, name=f"{first}-restarted")
    p.wait("aggregator")
    for s in SILOS:
        p.wait(f"{first}-restarted" if s == first else s)
    got, meta = final_params(config, p.store, 4)
    sim = assert_equals_simulation(config, tmp_path, got)
    summary = json.loads((tmp_path / "agg" / "summary.json").read_text())
    assert summary["communication"] == json.loads(json.dumps(sim["communication"]))
    agg_rows = [json.loads(line) for line in open(tmp_path / "agg" / "metrics" / "rounds.jsonl")]
    sim_rows = [json.loads(line) for line in open(tmp_path / "sim" / "metrics" / "rounds.jsonl")]
    assert [r["bytes_down"] for r in agg_rows] == [r["bytes_down"] for r in sim_rows]
    fed = federation.Federation(config, SILOS)
    assert any(r["bytes_down"] < 2 * fed.param_bytes for r in agg_rows)  # deltas, not full copies
    chains = [  # a silo that skipped a round started from a copy two rounds old
        store.read_manifest(r, s).get("download_from")
        for r in range(1, 4)
        for s in store.read_global_meta(r + 1)["accepted"]
    ]
    assert any(q is not None for q in chains), chains
    logs = "".join(p.log(n) for n in [*SILOS, f"{first}-restarted"])
    assert "cannot rebuild the global copy" not in logs
    assert "replaying it to rebuild the private state" in p.log(f"{first}-restarted")
