"""A three-level tree of federations deployed as real processes (root aggregator, sub-federations, silos)
over one store tree: it ends where the one-process simulation ends, bit for bit, also after a
sub-federation is killed between its own rounds' close and its upload."""

import json

import jax
import numpy as np
import pytest

from fedjax_lm import config as config_lib
from fedjax_lm import simulation
from fedjax_lm import store as store_lib
from fedjax_lm import tree as tree_lib
from tests.test_deploy import Procs, assert_equals_simulation, make_config

pytestmark = pytest.mark.multiprocess

SPEC = "west(text(code,prose)),east(jl(lines))"
SILOS = ("code", "prose", "lines")


def tree_config(small_corpus, tmp_path, rounds=2, local_rounds=2):
    config, _ = make_config(small_corpus, tmp_path, rounds=rounds, deadline_s=120.0)
    config.federation.tree.spec = SPEC
    config.federation.tree.local_rounds = local_rounds
    path = tmp_path / "config.json"
    path.write_text(config.to_json_best_effort())
    return config, f"experiments/from_json.py:{path}"


def start_tree(p, env=None):
    p.aggregator()
    for node in ("west", "east", "text", "jl"):
        p.start(node, "federation", "--name", node, "--workdir", str(p.tmp / node), env=(env or {}).get(node))
    for s in SILOS:
        p.silo(s)


def wait_all(p):
    for name in ("aggregator", "west", "east", "text", "jl", *SILOS):
        p.wait(name, timeout=600)


def root_params(config, store_root, r):
    from fedjax_lm import federation

    fed = federation.Federation(config, list(SILOS))
    params, _, meta = store_lib.Store(store_root).read_global(r, fed.abstract_params, fed.abstract_outer_opt)
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(params))], meta


def test_node_config_and_stores_place_every_member():
    c = config_lib.load_config("experiments/photon.py:size=tiny,rounds=2")
    c.federation.tree.spec = SPEC
    c.federation.tree.local_rounds = 2
    west = tree_lib.node_config(c, "west")
    assert west.federation.tree.spec == "text(code,prose)" and west.federation.rounds == 4
    assert tuple(west.train.silos) == ("code", "prose")
    text = tree_lib.participant_config(c, "code")
    assert text.federation.tree.spec == "code,prose" and text.federation.rounds == 8
    assert tree_lib.store_for("gs://b/run", c, "text") == "gs://b/run/nodes/west/text"
    assert tree_lib.store_for("gs://b/run", c, "root") == "gs://b/run"
    with pytest.raises(ValueError, match="not a federation of the tree"):
        tree_lib.node_config(c, "code")


def test_three_level_tree_deployment_equals_the_simulation(small_corpus, tmp_path, procs):
    config, spec = tree_config(small_corpus, tmp_path, rounds=1)
    p = procs["p"] = Procs(tmp_path, spec)
    start_tree(p)
    wait_all(p)
    got, meta = root_params(config, p.store, 1)
    assert meta["accepted"] == ["east", "west"]
    text = store_lib.Store(tree_lib.store_for(p.store, config, "text"))
    assert text.latest_global() == 4  # 1 root round x 2 x 2 own rounds, then its final global
    assert text.read_global_meta(4)["final"] == "the parent federation finished"
    run = json.loads((tmp_path / "store" / "nodes" / "west" / "text" / "run.json").read_text())
    assert run["members"] == ["code", "prose"]
    sim = assert_equals_simulation(config, tmp_path, got)
    assert sim["tokens"] == 1 * 3 * 4 * 3 * 4 * 32  # rounds x silos x silo rounds per root round x H x B x L
    rows = [json.loads(line) for line in open(tmp_path / "agg" / "metrics" / "rounds.jsonl")]
    assert sum(r["tokens"] for r in rows) == sim["tokens"]  # each federation's weight: its silos' tokens


def test_subfederation_killed_between_its_close_and_its_upload_resumes_bit_identical(
    small_corpus, tmp_path, procs
):
    config, spec = tree_config(small_corpus, tmp_path, rounds=2, local_rounds=1)
    p = procs["p"] = Procs(tmp_path, spec)
    start_tree(p, env={"west": {"FEDJAX_SUBFED_PAUSE_BEFORE_UPLOAD_S": "60"}})
    store = store_lib.Store(p.store)
    closed = tmp_path / "west" / "closed"
    from tests.test_deploy import wait_until

    wait_until(
        lambda: "pausing" in p.log("west"), timeout=300, what="west to close its round of parent round 0"
    )
    assert closed.exists()
    assert not store.is_committed(0, "west")
    p.kill("west")
    p.start("west", "federation", "--name", "west", "--workdir", str(tmp_path / "west"))
    wait_all(p)
    got, _ = root_params(config, p.store, 2)
    # the restarted process uploaded from the saved closed state: it did not close that round again
    assert p.log("west").count("own round 1 (of parent round 0)") == 1
    assert_equals_simulation(config, tmp_path, got)


KEYS = ("lm_head/.*", "final_norm/.*")
TWO = "t(code,prose),j(lines)"  # two sub-federations under the root


def two_federations_config(small_corpus, tmp_path, **tree):
    """A keyed two-level tree (federations t and j), 2 root rounds, written where the processes read it."""
    config, spec = tree_config(small_corpus, tmp_path, rounds=2, local_rounds=1)
    config.federation.tree.spec = TWO
    config.federation.tree.update(dict(key_layers=KEYS, **tree))
    return config, spec


def run_two_federations(p, config):
    """Writes `config`, starts the root aggregator, t, j and the silos, and waits for them all."""
    (p.tmp / "config.json").write_text(config.to_json_best_effort())
    p.aggregator()
    for node in ("t", "j"):
        p.start(node, "federation", "--name", node, "--workdir", str(p.tmp / node))
    for s in SILOS:
        p.silo(s)
    for name in ("aggregator", "t", "j", *SILOS):
        p.wait(name, timeout=600)


def test_key_layers_never_leave_their_federation_in_the_store(small_corpus, tmp_path, procs):
    """WorldLM without residuals, deployed: the sub-federations' uploads in the root's store carry exact
    zeros in the key layers (the root would reject anything else), their silos' uploads carry theirs,
    and the run ends where the simulation does, bit for bit (the federations' own key layers included)."""
    config, spec = two_federations_config(small_corpus, tmp_path, residual=False)
    p = procs["p"] = Procs(tmp_path, spec)
    run_two_federations(p, config)
    from fedjax_lm import federation

    fed = federation.Federation(config, list(SILOS))
    root = store_lib.Store(p.store)
    t_store = store_lib.Store(tree_lib.store_for(p.store, config, "t"))
    keys_of = fed.key_template(fed.abstract_payload)
    for r in range(2):
        for node in ("t", "j"):
            up = root.read_update(r, node, keys_of)
            assert all(not np.any(x["q"]) for x in jax.tree.leaves(up, is_leaf=lambda x: "q" in x))
        code = t_store.read_update(r, "code", keys_of)
        assert any(np.any(x["q"]) for x in jax.tree.leaves(code, is_leaf=lambda x: "q" in x))
    rows = [json.loads(line) for line in open(tmp_path / "agg" / "metrics" / "rounds.jsonl")]
    assert (
        rows[0]["key_bytes_up/t"] == 0 and rows[0]["bytes_up/t"] == fed.payload_bytes - fed.key_payload_bytes
    )
    got, _ = root_params(config, p.store, 2)
    sim = assert_equals_simulation(config, tmp_path, got)
    assert sim["val"] != sim["val_global"]  # the federations' key layers are their own


def test_fedper_deployment_keeps_each_silos_head_and_equals_the_simulation(small_corpus, tmp_path, procs):
    config, spec = make_config(small_corpus, tmp_path, rounds=2, deadline_s=120.0)
    config.federation.tree.update(dict(key_layers=("lm_head/.*",), key_owner="silo"))
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    p = procs["p"] = Procs(tmp_path, spec)
    p.aggregator()
    for s in SILOS:
        p.silo(s)
    for name in ("aggregator", *SILOS):
        p.wait(name, timeout=600)
    from fedjax_lm import federation

    fed = federation.Federation(config, list(SILOS))
    store = store_lib.Store(p.store)
    head = fed.key_template(fed.abstract_payload)
    assert all(
        not np.any(x["q"])
        for s in SILOS
        for x in jax.tree.leaves(store.read_update(1, s, head), is_leaf=lambda x: "q" in x)
    )
    got, _ = root_params(config, p.store, 2)
    assert_equals_simulation(config, tmp_path, got)


def test_worldlm_under_dp_deployment_equals_the_simulation(small_corpus, tmp_path, procs):
    """Client-level DP in a keyed tree, deployed: each sub-federation clips its silos' updates and adds
    the noise of the mean and of its attention key aggregate (its own secret, here the simulation's),
    the root adds none; the run ends where the simulation does, bit for bit, and both account the same ε.
    C is above every norm, as in tests/test_dp_round.py: the drivers compute an update's norm in different
    float orders (f32 in memory, f64 over the store's chunks), so a clipping scale could differ in its last
    bit; clipping itself is tested in tests/test_tree.py."""
    config, spec = two_federations_config(small_corpus, tmp_path, residual=False)
    config.federation.dp.update(dict(mode="central", clip_norm=1e3, noise_multiplier=1e-6))
    for d in ("t/aggregator", "j/aggregator", "sim"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "dp_noise_secret").write_bytes(b"k" * 32)
    p = procs["p"] = Procs(tmp_path, spec)
    run_two_federations(p, config)
    assert not (tmp_path / "agg" / "dp_noise_secret").exists()  # the root adds no noise
    t_rows = [json.loads(line) for line in open(tmp_path / "t" / "aggregator" / "metrics" / "rounds.jsonl")]
    assert [r["clipped"] for r in t_rows] == [0, 0] and all("dp_epsilon" in r for r in t_rows)
    assert all(0 < r["attention/t/code"] < 1 for r in t_rows)
    got, _ = root_params(config, p.store, 2)
    sim = assert_equals_simulation(config, tmp_path, got)
    summary = json.loads((tmp_path / "agg" / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == sim["privacy"]["epsilon"] and summary["privacy"]["rounds"] == 2
    sim_rows = [json.loads(line) for line in open(tmp_path / "sim" / "metrics" / "rounds.jsonl")]
    assert [r["clipped/t"] for r in sim_rows] == [0, 0]
    plain = config.copy_and_resolve_references()
    plain.federation.dp.mode = "off"
    noiseless = simulation.train(plain, str(tmp_path / "plain"))
    assert any(  # the noise is there (std ~1e-3 on the mean, ~3e-3 on the key layers)
        not np.array_equal(a, np.asarray(b)) for a, b in zip(got, jax.tree.leaves(noiseless["server"].params))
    )


def test_residual_embeddings_deployed_equal_the_simulation(small_corpus, tmp_path, procs):
    """WorldLM with residual embeddings, deployed: the root publishes its sub-federations' key layers with
    each next global (hash-signed), each sub-federation computes its own e_c from them and starts its round
    from its key layers + gamma e_c; the run ends where the simulation does, bit for bit (and gamma
    matters: the same run with gamma = 0 ends elsewhere). Deeper trees are refused in a deployment."""
    from fedjax_lm.deploy import common

    config, spec = two_federations_config(small_corpus, tmp_path, residual=True, gamma=0.5)
    deep = config.copy_and_resolve_references()
    deep.federation.tree.spec = SPEC
    with pytest.raises(ValueError, match=r"\['west', 'east'\] have sub-federations of their own"):
        common.check_deployable(deep)
    p = procs["p"] = Procs(tmp_path, spec)
    run_two_federations(p, config)
    meta = store_lib.Store(p.store).read_global_meta(1)
    assert meta["children_keys_of"] == ["j", "t"] and len(meta["children_keys_sha256"]) == 64
    got, _ = root_params(config, p.store, 2)
    assert_equals_simulation(config, tmp_path, got)
    rows = [json.loads(line) for line in open(tmp_path / "agg" / "metrics" / "rounds.jsonl")]
    sim_rows = [json.loads(line) for line in open(tmp_path / "sim" / "metrics" / "rounds.jsonl")]
    from fedjax_lm import federation

    key_bytes = federation.Federation(config, list(SILOS)).key_param_bytes
    assert [r["bytes_down/t"] for r in rows] == [r["bytes_down/t"] for r in sim_rows]
    assert rows[1]["bytes_down/t"] - rows[0]["bytes_down/t"] == 2 * key_bytes  # both federations' k_c
    flat = config.copy_and_resolve_references()
    flat.federation.tree.gamma = 0.0
    other = simulation.train(flat, str(tmp_path / "gamma0"))
    assert any(
        not np.array_equal(a, np.asarray(b)) for a, b in zip(got, jax.tree.leaves(other["server"].params))
    )
