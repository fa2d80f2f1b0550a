"""Compressed download (federation.download_compression): the broadcast copy, its error feedback, the ledger."""

import json
import os

import jax
import numpy as np
import pytest

from fedjax_lm import checkpoint as ckpt_lib
from fedjax_lm import compression
from fedjax_lm import federation
from fedjax_lm import simulation
from fedjax_lm.deploy.common import check_deployable
from tests.test_deploy import make_config

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
    assert d.cost(None, 0) == d.full_bytes  # joining: the full copy
    assert d.cost(4, 5) == d.delta_bytes and d.cost(3, 5) == 2 * d.delta_bytes
    assert d.cost(0, 9) == d.full_bytes  # too far behind: the full copy is cheaper than 9 deltas
    off = federation.Federation(download_config(small_corpus, tmp_path, "none"), SILOS).downloads
    assert not off.on and off.cost(4, 5) == off.full_bytes


def test_silos_train_from_the_broadcast_copy_and_the_ledger_counts_deltas(small_corpus, tmp_path):
    config = download_config(small_corpus, tmp_path)
    summary = simulation.train(config, str(tmp_path / "int8"))
    fed = federation.Federation(config, SILOS)
    rows = [json.loads(line) for line in open(tmp_path / "int8" / "metrics" / "rounds.jsonl")]
    assert [r["bytes_down"] for r in rows] == [3 * fed.param_bytes] + [3 * fed.downloads.delta_bytes] * 2
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


def test_a_deployment_refuses_compressed_download(small_corpus, tmp_path):
    with pytest.raises(
        ValueError, match="download_compression is supported by the one-process simulation only"
    ):
        check_deployable(download_config(small_corpus, tmp_path))
    config = download_config(small_corpus, tmp_path, "bf16")
    config.federation.secagg.update(dict(enabled=True, bound=0.1))
    config.federation.update(dict(compression="none", max_update_norm_ratio=0.0))
    with pytest.raises(ValueError, match="download_compression with secure aggregation"):
        federation.check_config(config.federation)
