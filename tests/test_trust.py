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
from fedjax_lm import identity
from fedjax_lm import outer
from fedjax_lm import store as store_lib
from tests.test_deploy import make_config

SILOS = ("code", "lines", "prose")


@pytest.fixture
def round0(small_corpus, tmp_path):
    config, _ = make_config(small_corpus, tmp_path, rounds=1)
    config.federation.compression = "none"  # exact arithmetic for the expected means
    agg = deploy.Aggregator(config, str(tmp_path / "store"), str(tmp_path / "agg"))
    agg.start_or_resume()  # run.json, tokenizer, global/0
    server, meta = deploy.read_server(agg.fed, agg.store, 0, agg.trust)
    theta = jax.device_get(server.params)
    yield agg, server, meta, theta
    agg.store.close()


def _commit(agg, silo, theta, value, tokens=384.0, **manifest):
    delta = jax.tree.map(lambda x: np.full(x.shape, value, np.float32), theta)
    payload = jax.device_get(compression.compress(delta, None, "none")[0])
    manifest.setdefault("base_global_sha256", agg.store.read_global_meta(0)["params_sha256"])
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
        agg.publish(1, server, {}, lock=lock)
    assert agg.store.latest_global() == 0  # nothing published by the aggregator that lost its lock
    lock.release()
    # create-exclusive: a global that exists already is never rewritten, and says so
    with pytest.raises(LockLost, match="global/0 was published by another process"):
        agg.publish(0, server, {})


# ----------------------------------------------------------------------------- signed federation


@pytest.fixture
def signed0(small_corpus, tmp_path):
    """A signed federation at round 0: the aggregator and every silo hold keys in tmp_path/keys."""
    config, _ = make_config(small_corpus, tmp_path, rounds=1, signed=True)
    config.federation.compression = "none"
    config.federation.deploy.key = str(tmp_path / "keys" / "aggregator.key")
    agg = deploy.Aggregator(config, str(tmp_path / "store"), str(tmp_path / "agg"))
    agg.start_or_resume()
    server, meta = deploy.read_server(agg.fed, agg.store, 0, agg.trust)
    signers = {s: identity.Signer.load(str(tmp_path / "keys" / f"{s}.key"), s) for s in SILOS}
    yield agg, server, meta, jax.device_get(server.params), signers
    agg.store.close()


def _signed_commit(agg, silo, theta, value, signer, r=0, **manifest):
    delta = jax.tree.map(lambda x: np.full(x.shape, value, np.float32), theta)
    payload = jax.device_get(compression.compress(delta, None, "none")[0])
    manifest.setdefault("base_global_sha256", agg.store.read_global_meta(r)["params_sha256"])
    agg.store.write_update(r, silo, payload, {"tokens": 384.0, "loss": 5.0, **manifest}, signer=signer)


def test_a_forged_or_unsigned_update_is_not_counted_and_is_rejected(signed0, tmp_path):
    agg, server, meta, theta, signers = signed0
    mallory = identity.Signer(
        "code", identity.Signer.load(identity.generate("mallory", str(tmp_path / "mk"))[0], "mallory")._key
    )  # a key the federation does not list, used under code's name
    _signed_commit(agg, "code", theta, 0.5, mallory)
    _commit(agg, "lines", theta, 0.5)  # no signature at all
    _signed_commit(agg, "prose", theta, 0.01, signers["prose"])
    assert agg._counted_commits(0, list(SILOS)) == ["prose"]  # the forgeries cannot close the round
    server, row = _close(agg, server, {**meta, "deadline": 0})  # closes at once with what counts
    assert row["accepted"] == ["prose"]
    assert "bad signature (not made with the key of 'code')" in row["rejected"]["code"]
    assert "update signature: unsigned" in row["rejected"]["lines"]
    _assert_params(server, theta, 0.01)


def test_the_real_silo_replaces_a_forged_commit_under_its_name(signed0, tmp_path):
    agg, _, _, theta, signers = signed0
    _commit(agg, "code", theta, 0.5)  # unsigned forgery, first
    assert not agg.store.is_committed(0, "code", signers["code"])
    _signed_commit(agg, "code", theta, 0.01, signers["code"])  # the silo's own upload replaces it
    assert agg.store.is_committed(0, "code", signers["code"])
    assert agg.store.commit_problem(0, "code", agg.trust.allow) is None
    got = agg.store.read_update(0, "code", agg.fed.abstract_payload)
    assert float(jax.tree.leaves(got)[0].reshape(-1)[0]) == pytest.approx(0.01)


def test_a_replayed_update_is_rejected_and_its_silo_uploads_anew(signed0):
    agg, _, meta, theta, signers = signed0
    _signed_commit(agg, "code", theta, 0.01, signers["code"])
    src = agg.store.layout.local("updates/0")
    dst = agg.store.layout.local("updates/1")
    shutil.copytree(os.path.join(src, "code"), os.path.join(dst, "code"))
    shutil.copyfile(os.path.join(src, "code.COMMITTED"), os.path.join(dst, "code.COMMITTED"))
    with pytest.raises(store_lib.UpdateRejected, match="manifest names round 0"):
        agg.store.validate_update(
            1, "code", agg.fed.abstract_payload, expected_silos=SILOS, current_round=1, allow=agg.trust.allow
        )
    assert "manifest names round 0" in agg.store.commit_problem(1, "code", agg.trust.allow)  # not counted
    # the silo itself does not take the replay for its round-1 commit
    assert not agg.store.is_committed(1, "code", signers["code"])


def test_an_update_trained_from_a_stale_global_is_rejected(signed0):
    agg, server, meta, theta, signers = signed0
    _signed_commit(agg, "code", theta, 0.01, signers["code"], base_global_sha256="0" * 64)
    _signed_commit(agg, "lines", theta, 0.01, signers["lines"])
    _signed_commit(agg, "prose", theta, 0.01, signers["prose"])
    server, row = _close(agg, server, meta)
    assert row["accepted"] == ["lines", "prose"]
    assert "trained from other global params" in row["rejected"]["code"]


def test_a_global_that_is_not_the_aggregators_is_refused(signed0):
    agg, server, meta, theta, _ = signed0
    trust = agg.trust
    # someone rewrites global/0 with other params under the aggregator's valid signed meta
    path = agg.store.layout.local("global/0")
    shutil.rmtree(path)
    agg.store.close()
    other = jax.tree.map(lambda x: x + 1.0, server.params)
    agg.store.publish_global(0, other, server.opt_state, meta)
    with pytest.raises(deploy.GlobalRejected, match="does not match the sha256 in its signed meta"):
        deploy.read_server(agg.fed, agg.store, 0, trust)
    # ... or publishes the next global itself: silos refuse it and the aggregator will not publish over it
    forged = {**meta, "round": 1, "signed_by": "aggregator", "signature": "AAAA"}
    agg.store.publish_global(1, other, server.opt_state, forged)
    with pytest.raises(deploy.GlobalRejected, match="not the aggregator's"):
        deploy.global_meta(agg.store, 1, trust)
    with pytest.raises(deploy.GlobalRejected, match="cannot publish global/1"):
        agg.publish(1, server, {})


def test_a_process_with_another_allow_list_or_key_is_refused(signed0, tmp_path):
    agg, _, _, _, _ = signed0
    config = agg.config.copy_and_resolve_references()
    config.federation.deploy.key = str(tmp_path / "keys" / "code.key")  # the aggregator's role, code's key
    with pytest.raises(identity.IdentityError, match="is not the key the allow-list"):
        deploy.load_trust(config, "aggregator")
    config.federation.deploy.key = ""
    with pytest.raises(identity.IdentityError, match="needs its private key"):
        deploy.load_trust(config, "code")
    unsigned = agg.config.copy_and_resolve_references()
    unsigned.federation.deploy.update(allow_list="", key="")
    with pytest.raises(ValueError, match="signs its exchange and this process has no allow-list"):
        deploy.check_store_run(agg.store, unsigned, "silo code", deploy.load_trust(unsigned, "code"))
    keys2 = tmp_path / "other-keys"
    for name in ("aggregator", *SILOS):
        _, pub = identity.generate(name, str(keys2))
        identity.add_to_allow_list(str(keys2 / "federation.json"), name, pub)
    other = agg.config.copy_and_resolve_references()
    other.federation.deploy.update(allow_list=str(keys2 / "federation.json"), key=str(keys2 / "code.key"))
    with pytest.raises(
        ValueError, match="allow-list differs .*members whose keys differ: aggregator, code, lines, prose"
    ):
        deploy.check_store_run(agg.store, other, "silo code", deploy.load_trust(other, "code"))


def test_markers_and_non_members_are_capped(signed0):
    agg, server, meta, theta, signers = signed0
    _signed_commit(agg, "code", theta, 0.01, signers["code"])
    with open(agg.store.layout.local("updates/0/code.COMMITTED"), "a") as f:
        f.write(" " * 5000)
    for k in range(20):
        _commit(agg, f"stranger{k:02d}", theta, 0.01)
    _signed_commit(agg, "lines", theta, 0.01, signers["lines"])
    server, row = _close(agg, server, {**meta, "deadline": 0})
    assert row["accepted"] == ["lines"]
    assert "COMMITTED marker is 5," in row["rejected"]["code"]
    named = [s for s in row["rejected"] if s.startswith("stranger")]
    assert len(named) == 16 and "4 more updates" in row["rejected"]["(more non-members)"]


def test_malformed_zarr_metadata_is_rejected(round0):
    """A silo re-encodes its (hash-valid) data with a codec the store does not write, or cuts it
    into tiny chunks: refused before its chunks are decoded."""
    import json as json_lib

    agg, server, meta, theta = round0
    _commit(agg, "code", theta, 0.01)
    _commit(agg, "lines", theta, 0.01)
    _commit(agg, "prose", theta, 0.01)
    for silo, change in (("code", "codec"), ("lines", "chunks")):
        zarr_json = sorted(
            glob.glob(agg.store.layout.local(f"updates/0/{silo}/**/zarr.json"), recursive=True)
        )[0]
        m = json_lib.load(open(zarr_json))
        if change == "codec":
            m["codecs"] = [m["codecs"][0], {"name": "gzip", "configuration": {"level": 9}}]
        else:
            m["chunk_grid"]["configuration"]["chunk_shape"] = [1] * len(m["shape"])
        json_lib.dump(m, open(zarr_json, "w"))
    server, row = _close(agg, server, meta)
    assert row["accepted"] == ["prose"]
    assert "zarr codecs ['bytes', 'gzip'] are not the store's" in row["rejected"]["code"]
    assert "zarr chunk shape [1" in row["rejected"]["lines"]


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean"])
@pytest.mark.parametrize("attack", ["signflip", "noise"])
def test_a_sign_flipped_or_noise_update_is_contained_by_the_robust_rules(
    small_corpus, tmp_path, rule, attack
):
    """One of three silos sends -1 x an honest update, or noise of 5x its norm: both pass the norm
    checks; the median and the trimmed mean keep every coordinate between the honest ones, the
    mean does not."""
    config, _ = make_config(small_corpus, tmp_path, rounds=1)
    config.federation.compression = "none"
    config.federation.aggregation = rule
    agg = deploy.Aggregator(config, str(tmp_path / "store"), str(tmp_path / "agg"))
    agg.start_or_resume()
    server, meta = deploy.read_server(agg.fed, agg.store, 0, agg.trust)
    theta = jax.device_get(server.params)
    _commit(agg, "code", theta, 0.01)
    _commit(agg, "lines", theta, 0.02)
    if attack == "signflip":
        _commit(agg, "prose", theta, -0.02)
    else:
        rng = np.random.default_rng(0)
        noise = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.075, theta)
        payload = jax.device_get(compression.compress(noise, None, "none")[0])
        base = agg.store.read_global_meta(0)["params_sha256"]
        agg.store.write_update(0, "prose", payload, {"tokens": 384.0, "base_global_sha256": base})
    server, row = _close(agg, server, meta)
    agg.store.close()
    assert row["accepted"] == list(SILOS)  # nothing to reject: the norms are within 10x the median
    steps = [w - g for w, g in zip(jax.tree.leaves(theta), jax.tree.leaves(jax.device_get(server.params)))]
    inside = all(bool(np.all((s >= 0.01 - 1e-7) & (s <= 0.02 + 1e-7))) for s in steps)
    assert inside == (rule != "mean"), f"{rule}: the aggregate left the honest range: {inside}"
