"""One-process federated runs end to end on a real (small) prepared corpus."""

import json
import os

import jax
import numpy as np
import pytest

from fedjax_lm import config as config_lib
from fedjax_lm import monitor
from fedjax_lm import simulation
from fedjax_lm.data import Corpus
from fedjax_lm import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fed_config(small_corpus, variant="", **fed):
    c = config_lib.load_config(
        os.path.join(ROOT, "experiments/photon.py")
        + ":size=tiny,vocab=512,H=3,rounds=3"
        + ("," + variant if variant else "")
    )
    c.data = small_corpus.copy_and_resolve_references()  # never mutate the shared fixture
    c.model.update(dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=512))
    c.train.update(dict(seq_len=32, batch_size=4, eval_batches=2))
    c.mesh.update(dict(data=1, fsdp=1, tensor=1))
    c.federation.update(fed)
    return c


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_same_seed_same_global_params_bit_for_bit(small_corpus, tmp_path):
    a = simulation.train(fed_config(small_corpus, silos_per_round=2), str(tmp_path / "a"))
    b = simulation.train(fed_config(small_corpus, silos_per_round=2), str(tmp_path / "b"))
    for x, y in zip(leaves(a["server"].params), leaves(b["server"].params)):
        np.testing.assert_array_equal(x, y)
    c = simulation.train(fed_config(small_corpus, silos_per_round=2, sample_seed=5), str(tmp_path / "c"))
    assert any(
        not np.array_equal(x, y) for x, y in zip(leaves(a["server"].params), leaves(c["server"].params))
    )
    rounds = [json.loads(line) for line in open(tmp_path / "a" / "metrics" / "rounds.jsonl")]
    assert [r["silos"] for r in rounds] == [2, 2, 2]


def test_summary_reports_traffic_against_data_parallel(small_corpus, tmp_path):
    config = fed_config(
        small_corpus, download_compression="none"
    )  # tests/test_download.py: the compressed one
    out = simulation.train(config, str(tmp_path / "s"))
    s = json.load(open(tmp_path / "s" / "summary.json"))
    assert set(s["val"]["per_silo"]) == {"code", "prose", "lines"}
    comm = s["communication"]
    params = model_lib.param_count(model_lib.ModelConfig.from_dict(fed_config(small_corpus).model))
    k, h, rounds = 3, 3, 3
    # down: f32 model per silo per round; up: int8 payload (1 byte/param + one f32 scale per block, padded)
    assert comm["bytes_down"] == rounds * k * 4 * params
    assert params * rounds * k <= comm["bytes_up"] < 1.1 * params * rounds * k
    dp = rounds * 4 * (k - 1) * 4 * params * h  # ring all-reduce of f32 grads, both directions, all workers
    assert comm["dp_equivalent_bytes"] == dp
    assert comm["traffic_ratio_vs_dp"] == pytest.approx(dp / (comm["bytes_down"] + comm["bytes_up"]))
    assert s["tokens"] == rounds * k * h * 4 * 32
    assert np.isfinite(s["val"]["pooled"]["ppl"]) and s["val"]["pooled"]["ppl"] < 512
    assert out["server"].round == rounds


def test_resume_after_interruption_matches_uninterrupted_run(small_corpus, tmp_path):
    full = simulation.train(fed_config(small_corpus, silos_per_round=2), str(tmp_path / "full"))
    stopped = simulation.train(
        fed_config(small_corpus, silos_per_round=2), str(tmp_path / "part"), stop_after_round=2
    )
    assert stopped["stopped_at_round"] == 2
    resumed = simulation.train(fed_config(small_corpus, silos_per_round=2), str(tmp_path / "part"))
    for x, y in zip(leaves(full["server"]), leaves(resumed["server"])):
        np.testing.assert_array_equal(x, y)


def test_silo_parallel_run_equals_sequential_run(small_corpus, tmp_path):
    seq = simulation.train(fed_config(small_corpus, compression="bf16"), str(tmp_path / "seq"))
    par = simulation.train(fed_config(small_corpus, compression="bf16", parallel=True), str(tmp_path / "par"))
    for x, y in zip(leaves(seq["server"].params), leaves(par["server"].params)):
        np.testing.assert_allclose(x, y, rtol=2e-3, atol=2e-5)
    assert abs(seq["val"]["pooled"]["loss"] - par["val"]["pooled"]["loss"]) < 1e-3


@pytest.mark.parametrize("outer_name", ["diloco", "fedadam"])
def test_other_outer_optimizers_and_reset_inner_state_train(small_corpus, tmp_path, outer_name):
    c = fed_config(small_corpus, f"outer={outer_name}", inner_state="reset", compression="none")
    out = simulation.train(c, str(tmp_path / outer_name))
    assert np.isfinite(out["val"]["pooled"]["loss"])
    assert out["val"]["pooled"]["ppl"] < 512


def test_a_subset_of_the_corpus_silos_takes_part(small_corpus, tmp_path):
    c = fed_config(small_corpus, rounds=1)
    c.train.silos = ["prose", "lines"]
    out = simulation.train(c, str(tmp_path / "sub"))
    assert set(out["val"]["per_silo"]) == {"prose", "lines"}
    rows = [json.loads(line) for line in open(tmp_path / "sub" / "metrics" / "rounds.jsonl")]
    assert rows[0]["silos"] == 2
    c.train.silos = ["prose", "nope"]
    with pytest.raises(ValueError, match=r"train.silos names \['nope'\]"):
        simulation.train(c, str(tmp_path / "bad"))


def test_aggregated_inner_moments_are_shared_by_every_silo(small_corpus, tmp_path):
    c = fed_config(
        small_corpus, rounds=2, aggregate_inner_moments=True, compression="none", download_compression="none"
    )
    corpus = Corpus.load(small_corpus.corpus_dir)
    sim = simulation.Simulation(c, corpus)
    server, privates = sim.init(0)
    server, row = sim.round(server, privates, 0, monitor.PhaseTimer(), monitor.CommLedger())
    assert row["silos"] == 3
    mus = [jax.tree.leaves(jax.device_get(p.arrays["opt_state"])) for p in privates.values()]
    for other in mus[1:]:
        for a, b in zip(mus[0], other):
            np.testing.assert_array_equal(a, b)
    assert any(np.abs(np.asarray(x)).max() > 0 for x in mus[0] if np.asarray(x).dtype == np.float32)
    # The moments travel both ways and the ledger counts them: AdamW's mu and nu are two f32 models.
    moments = 2 * sim.fed.param_bytes
    assert sim.fed.moment_bytes == moments
    assert row["bytes_up"] == 3 * (sim.fed.payload_bytes + moments)
    assert row["bytes_down"] == 3 * (sim.fed.param_bytes + moments)
