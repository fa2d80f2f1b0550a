"""The aggregator decides: capped weights, outlier norms, manifest schema, re-hashing, finite params.

Each test publishes global/0 with a real aggregator and a real on-disk store, commits crafted updates
as another organisation could, and closes the round in-process.
"""

import glob
import os
import shutil

import jax
import numpy as np
import pytest

from fedjax_lm import compression
from fedjax_lm import deploy
from fedjax_lm import federation
from fedjax_lm import outer
from tests.test_deploy import make_config

SILOS = ("code", "lines", "prose")


@pytest.fixture
def round0(small_corpus, tmp_path):
    config, _ = make_config(small_corpus, tmp_path, rounds=1)
    config.federation.compression = "none"  # exact arithmetic for the expected means
    agg = deploy.Aggregator(config, str(tmp_path / "store"), str(tmp_path / "agg"))
    agg._start_or_resume()  # run.json, tokenizer, global/0
    server, meta = deploy.read_server(agg.fed, agg.store, 0)
    theta = jax.device_get(server.params)
    yield agg, server, meta, theta
    agg.store.close()


def _commit(agg, silo, theta, value, tokens=384.0, **manifest):
    delta = jax.tree.map(lambda x: np.full(x.shape, value, np.float32), theta)
    payload = jax.device_get(compression.compress(delta, None, "none")[0])
    agg.store.write_update(
        0, silo, payload, {"round": 0, "silo": silo, "tokens": tokens, "loss": 5.0, **manifest}
    )


def _close(agg, server, meta):
    return agg.close_round(0, server, meta)


def _assert_params(server, theta, mean_delta):
    for got, want in zip(jax.tree.leaves(jax.device_get(server.params)), jax.tree.leaves(theta)):
        np.testing.assert_allclose(got, want - mean_delta, rtol=1e-6, atol=1e-7)


def test_a_huge_token_claim_is_capped_to_what_a_round_can_hold(round0):
    agg, server, meta, theta = round0
    cap = agg.fed.token_cap
    assert cap == 3 * 4 * 32  # H x batch x seq_len of the config
    _commit(agg, "code", theta, 0.02, tokens=1e30)
    _commit(agg, "lines", theta, 0.01, tokens=cap)
    _commit(agg, "prose", theta, 0.0, tokens=cap)
    server, row = _close(agg, server, meta)
    assert row["accepted"] == list(SILOS) and row["tokens"] == 3 * cap
    _assert_params(server, theta, 0.01)  # an equal third each, not the claimant's whole mean


def test_a_scaled_update_is_rejected_against_the_median_norm(round0):
    agg, server, meta, theta = round0
    _commit(agg, "code", theta, 0.01)
    _commit(agg, "lines", theta, 0.02)
    _commit(agg, "prose", theta, -1.5)  # x100, sign flipped
    server, row = _close(agg, server, meta)
    assert row["accepted"] == ["code", "lines"]
    assert (
        "exceeds 10 x the round's median norm" in row["rejected"]["prose"]
        and "round 0" in row["rejected"]["prose"]
    )
    _assert_params(server, theta, 0.015)


def test_manifest_fields_are_typed_and_capped(round0):
    agg, server, meta, theta = round0
    _commit(agg, "code", theta, 0.01, loss=None)  # null: not reported, still aggregated
    _commit(agg, "lines", theta, 0.01, loss="low")
    _commit(agg, "prose", theta, 0.01, notes="x" * (5 << 20))
    server, row = _close(agg, server, meta)
    assert row["accepted"] == ["code"] and row["train_loss"] is None
    assert "manifest loss 'low' is not a number" in row["rejected"]["lines"]
    assert "more than the cap" in row["rejected"]["prose"]
    _assert_params(server, theta, 0.01)


def test_a_chunk_swapped_after_validation_drops_that_silo_and_the_round_is_recomputed(round0, monkeypatch):
    agg, server, meta, theta = round0
    _commit(agg, "code", theta, 0.01)
    _commit(agg, "lines", theta, 0.03)
    _commit(agg, "prose", theta, 0.05)
    validate = agg.store.validate_update

    def validate_then_swap(r, silo, *args, **kwargs):
        manifest = validate(r, silo, *args, **kwargs)
        if silo == "prose":  # after its validation, prose's chunks become lines' (valid zarr, other data)
            root = str(agg.store.layout.local("updates/0"))
            for src in glob.glob(os.path.join(root, "lines", "**", "c", "**"), recursive=True):
                if os.path.isfile(src):
                    shutil.copyfile(src, src.replace(os.sep + "lines" + os.sep, os.sep + "prose" + os.sep))
        return manifest

    monkeypatch.setattr(agg.store, "validate_update", validate_then_swap)
    server, row = _close(agg, server, meta)
    assert row["accepted"] == ["code", "lines"]
    assert "changed since validation (sha256 mismatch)" in row["rejected"]["prose"]
    _assert_params(server, theta, 0.02)


def test_non_finite_params_are_never_published(small_corpus, tmp_path):
    config, _ = make_config(small_corpus, tmp_path, rounds=1)
    config.federation.outer = outer.default_outer_config("diloco")  # Nesterov: 1.33 x the mean
    fed = federation.Federation(config, list(SILOS))
    server = fed.init_server(0)
    before = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(server.params))]
    huge = jax.tree.map(lambda x: np.full(x.shape, -3e38, np.float32), jax.device_get(server.params))
    new, diag = fed.step(server, huge)  # finite mean, but the step overflows to Inf
    assert "not finite" in diag["skipped"] and int(new.round) == 1
    for a, b in zip(jax.tree.leaves(jax.device_get(new.params)), before):
        np.testing.assert_array_equal(a, b)
    ok, diag = fed.step(new, jax.tree.map(lambda x: np.zeros_like(x), huge))
    assert "skipped" not in diag and int(ok.round) == 2


def test_the_fold_cannot_overflow_on_finite_updates():
    big = np.float32(3e38)
    mean = jax.numpy.full((4,), big)
    out = outer.fold_into_mean(mean, {"x": jax.numpy.full((4,), -big)}, np.float32(0.5))
    np.testing.assert_array_equal(np.asarray(out), np.zeros(4, np.float32))  # (x - mean) would be -Inf


def test_the_lock_is_heart_beaten_and_a_taken_over_aggregator_publishes_nothing(round0):
    import json
    import time

    from fedjax_lm.store import LockLost

    agg, server, _, _ = round0
    lock = agg.store.acquire_aggregator_lock({"role": "aggregator"}, lease_s=0.6)
    lock.start_heartbeat(0.1)
    path = agg.store.layout.local("locks/aggregator.lock")
    first = json.load(open(path))["refreshed"]
    time.sleep(0.5)
    assert json.load(open(path))["refreshed"] > first  # renewed while held, not only between rounds
    record = json.load(open(path))
    with open(path, "w") as f:  # another aggregator took the lock over (its own nonce)
        json.dump({**record, "nonce": "someone-else", "pid": 1}, f)
    time.sleep(0.4)
    with pytest.raises(LockLost, match="taken over"):
        agg._publish(1, server, {}, lock=lock)
    assert agg.store.latest_global() == 0  # nothing published by the aggregator that lost its lock
    lock.release()
    # create-exclusive: a global that exists already is never rewritten, and says so
    with pytest.raises(LockLost, match="global/0 was published by another process"):
        agg._publish(0, server, {})
