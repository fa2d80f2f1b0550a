"""Secure aggregation in the round (federation.secagg): config, the simulation, the deployment."""

import base64
import json
import os

import jax
import numpy as np
import pytest

from fedjax_lm import config as config_lib
from fedjax_lm import federation
from fedjax_lm import simulation
from fedjax_lm import store as store_lib
from tests.test_deploy import Procs, final_params, make_config, wait_until

SILOS = ["code", "lines", "prose"]


def secure_config(small_corpus, tmp_path, *, rounds=2, dp=None, **secagg_cfg):
    config, spec = make_config(small_corpus, tmp_path, rounds=rounds)
    f = config.federation
    f.compression, f.max_update_norm_ratio = "none", 0.0
    f.secagg.update({"enabled": True, "bound": 0.05, **secagg_cfg})
    if dp:
        f.dp.update(dp)
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    return config, spec


def rows(workdir):
    return [json.loads(line) for line in open(workdir / "metrics" / "rounds.jsonl")]


def test_secagg_config_errors_name_the_field(small_corpus, tmp_path):
    base, _ = secure_config(small_corpus, tmp_path)
    cases = (
        (dict(compression="int8"), "compression='int8' cannot be summed"),
        (dict(aggregation="median"), "aggregation='median' needs every silo's update"),
        (dict(max_update_norm_ratio=10.0), "max_update_norm_ratio=10.0 checks each update's norm"),
        (dict(clip_norm_ratio=2.0), "clip_norm_ratio=2.0 checks each update's norm"),
        (dict(aggregate_inner_moments=True), "aggregate_inner_moments"),
        ({"secagg.bound": 0.0}, "secagg.bound: give the L-infinity bound"),
        (
            {"dp.mode": "central", "dp.clip_norm": 1.0, "dp.noise_multiplier": 1.0, "dp.adaptive_clip": True},
            "adaptive_clip needs each update's norm at the aggregator",
        ),
        ({"secagg.threshold": 1}, "secagg.threshold must be 0"),
        ({"secagg.ring_bits": 16}, "secagg.ring_bits must be one of"),
        (
            {
                "secagg.enabled": False,
                "dp.mode": "distributed",
                "dp.clip_norm": 1.0,
                "dp.noise_multiplier": 1.0,
            },
            "dp.mode='distributed' needs secure aggregation",
        ),
    )
    for change, message in cases:
        config = base.copy_and_resolve_references()
        for k, v in change.items():
            node = config.federation
            *path, leaf = k.split(".")
            for p in path:
                node = node[p]
            node[leaf] = v
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            config_lib.validate(config)
    config = base.copy_and_resolve_references()
    config.federation.secagg.threshold = 4  # more than the 3 silos of a round
    with pytest.raises(ValueError, match="threshold t=4 for 3 silos"):
        federation.Federation(config, SILOS)


def test_secure_simulation_equals_the_plain_mean_to_the_ring_resolution(small_corpus, tmp_path):
    """Masked sums cancel exactly: the securely aggregated round equals the plain round (uncompressed,
    equal token weights) up to the fixed-point rounding, and the rows say who was summed."""
    config, _ = secure_config(small_corpus, tmp_path)
    secure = simulation.train(config, str(tmp_path / "secure"))
    plain_cfg = config.copy_and_resolve_references()
    plain_cfg.federation.secagg.enabled = False
    plain = simulation.train(plain_cfg, str(tmp_path / "plain"))
    fed = federation.Federation(config, SILOS)
    resolution = fed.secure.fixed_point(3).resolution
    for a, b in zip(jax.tree.leaves(secure["server"].params), jax.tree.leaves(plain["server"].params)):
        # two rounds, each off by at most half a ring unit per summand, plus f32 rounding of the mean
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2 * resolution + 1e-6, rtol=0)
    changed = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(secure["server"].params), jax.tree.leaves(plain["server"].params))
    ]
    assert any(changed)  # the secure path really is another computation (fixed point), not the plain one
    got = rows(tmp_path / "secure")
    assert [r["secagg_survivors"] for r in got] == [SILOS, SILOS]
    assert all(r["secagg_dropped"] == [] and r["secagg_saturated"] == 0 for r in got)
    assert "update_norm/code" not in got[0]  # the aggregator never sees one silo's update
    assert got[0]["bytes_up"] == 3 * fed.payload_bytes == 3 * fed.param_bytes  # 4-byte ring words


def test_a_bound_below_the_updates_saturates_and_is_counted(small_corpus, tmp_path):
    config, _ = secure_config(small_corpus, tmp_path, rounds=1)
    config.federation.secagg.bound = 1e-6
    simulation.train(config, str(tmp_path / "sat"))
    assert rows(tmp_path / "sat")[0]["secagg_saturated"] > 0


def test_distributed_noise_is_added_by_the_silos_and_accounted(small_corpus, tmp_path):
    """dp.mode='distributed': each silo clips and adds N(0, σ²C²/t); the sum carries ≥ σC."""
    dp = dict(mode="distributed", clip_norm=1.0, noise_multiplier=0.5)
    config, _ = secure_config(small_corpus, tmp_path, rounds=1, dp=dp, bound=0.0)
    fed = federation.Federation(config, SILOS)
    t = fed.secure.threshold(3)
    assert t == 2 and fed.secure.share_std == pytest.approx(0.5 / np.sqrt(2))
    zero = jax.tree.map(lambda x: {"x": np.zeros(x.shape, np.float32)}, fed.abstract_params)
    x, norm = fed.secure.contribution(zero, 0, "code", b"s" * 32)
    flat = np.concatenate([np.asarray(v).reshape(-1) for v in jax.tree.leaves(x)])
    assert norm == 0.0
    assert abs(flat.std() / fed.secure.share_std - 1) < 6 / np.sqrt(2 * flat.size)
    other, _ = fed.secure.contribution(zero, 0, "lines", b"s" * 32)
    assert not np.array_equal(jax.tree.leaves(x)[0], jax.tree.leaves(other)[0])  # each silo its own noise
    # the ring bound covers the noise share (P(saturation) <= 1e-9 per silo and round)
    assert fed.secure.bound > 1.0 + 5 * fed.secure.share_std
    summary = simulation.train(config, str(tmp_path / "dist"))
    row = rows(tmp_path / "dist")[0]
    assert row["dp_noise_multiplier"] == 0.5 and row["secagg_saturated"] == 0
    assert summary["privacy"]["mode"] == "distributed" and np.isfinite(summary["privacy"]["epsilon"])


def _deploy_config(small_corpus, tmp_path, *, rounds, download="none", **secagg_cfg):
    config, spec = make_config(
        small_corpus, tmp_path, rounds=rounds, signed=True, download_compression=download
    )
    f = config.federation
    f.compression, f.max_update_norm_ratio = "none", 0.0
    f.secagg.update({"enabled": True, "bound": 0.05, "phase_s": 20.0, **secagg_cfg})
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    return config, spec


def _silo(p, silo, label=None, **kw):
    """Silo process `label` (default: the silo's name) with its own private workdir."""
    return p.start(
        label or silo, "silo", "--silo", silo, "--workdir", str(p.tmp / f"w-{silo}"), member=silo, **kw
    )


def _store_objects(store_root):
    out = {}
    for dirpath, _, files in os.walk(store_root):
        for f in files:
            full = os.path.join(dirpath, f)
            out[os.path.relpath(full, store_root)] = open(full, "rb").read()
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("download", ["none", "int8"])
def test_a_secure_deployment_equals_the_secure_simulation_and_hides_updates(
    small_corpus, tmp_path, procs, download
):
    """Three signed silo processes run the whole protocol through the store; the aggregator's sum is the
    simulation's bit for bit (the ring sum is exact), and what the store holds of one silo's round is
    masked: its upload is not its update, and nothing in the store is its update in the clear. With the
    compressed download the silos train from the broadcast copy: the same, ledger included."""
    config, spec = _deploy_config(small_corpus, tmp_path, rounds=2, download=download)
    p = procs["p"] = Procs(tmp_path, spec)
    p.aggregator()
    for s in SILOS:
        _silo(p, s)
    p.wait("aggregator")
    for s in SILOS:
        p.wait(s)
    got, meta = final_params(config, p.store, 2)
    assert meta["accepted"] == SILOS
    agg_rows = rows(tmp_path / "agg")
    assert [r["secagg_survivors"] for r in agg_rows] == [SILOS, SILOS]
    assert all(r["secagg_bytes"] > 0 and r["secagg_dropped"] == [] for r in agg_rows)
    for kind in ("keys", "shares", "unmask"):
        assert sorted(os.listdir(os.path.join(p.store, "secagg", "1", kind))) == [f"{s}.json" for s in SILOS]
    # the silos' private protocol state stays in their own workdirs, unreadable to others
    assert os.stat(tmp_path / "w-code" / "secagg" / "1.json").st_mode & 0o077 == 0
    state = json.loads((tmp_path / "w-code" / "secagg" / "1.json").read_text())
    everything = b"".join(_store_objects(p.store).values())
    for secret in (state["enc_key"], state["mask_key"], state["self_seed"]):
        assert secret.encode() not in everything and base64.b64decode(secret) not in everything
    # a masked upload looks nothing like an encoded update: uniform words over the whole ring, where
    # every encoded entry lies within ±B·2^f
    fed = federation.Federation(config, SILOS)
    masked = store_lib.Store(p.store).read_update(1, "code", fed.abstract_payload)
    words = np.concatenate(
        [np.asarray(x["x"]).reshape(-1) for x in jax.tree.leaves(masked, is_leaf=lambda d: "x" in d)]
    )
    small = fed.secure.bound * fed.secure.fixed_point(3).scale
    signed = words.view(np.int32).astype(np.float64)
    inside = (2 * np.floor(small) + 1) / 2**32  # the share of the ring an encoding can fill: uniform words
    assert abs(np.mean(np.abs(signed) <= small) - inside) < 0.02  # fall in it this often; an encoding: 100%
    assert abs(words.astype(np.float64).mean() / 2**31 - 1) < 0.01  # uniform on [0, 2^32)
    sim_cfg = config.copy_and_resolve_references()
    sim = simulation.train(sim_cfg, str(tmp_path / "sim"))
    want = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(sim["server"].params))]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert [r["bytes_down"] for r in agg_rows] == [r["bytes_down"] for r in rows(tmp_path / "sim")]
    if download != "none":
        assert agg_rows[0]["bytes_down"] == 0 and 0 < agg_rows[1]["bytes_down"] < 3 * fed.param_bytes


def _kill_when(p, name, text):
    wait_until(lambda: text in p.log(name), what=f"{name}: {text!r}")
    p.kill(name)


def _run_with_prose_killed_before_masking(small_corpus, tmp_path, procs, **secagg_cfg):
    """One round, deadline 20 s: code and lines run through; prose shares its keys and is SIGKILLed
    before it sends its masked input. Returns (config, Procs) once the others have exited."""
    config, spec = _deploy_config(small_corpus, tmp_path, rounds=1, **secagg_cfg)
    config.federation.deploy.deadline_s = 20.0
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    p = procs["p"] = Procs(tmp_path, spec)
    p.aggregator()
    for s in ("code", "lines"):
        _silo(p, s)
    _silo(p, "prose", env={"FEDJAX_SILO_PAUSE_BEFORE_MASK_S": "600"})
    _kill_when(p, "prose", "pausing")
    p.wait("aggregator")
    for s in ("code", "lines"):
        p.wait(s)
    return config, p


@pytest.mark.multiprocess
def test_a_silo_killed_after_sharing_keys_is_unmasked_out_of_the_sum(small_corpus, tmp_path, procs):
    """prose shares its keys, then is killed (SIGKILL) before sending its masked input; at the deadline
    the two survivors (t = 2 of 3) reveal the shares of prose's mask key and the aggregator removes its
    pairwise masks: the round's update is the mean of the survivors' alone."""
    config, p = _run_with_prose_killed_before_masking(small_corpus, tmp_path, procs)
    got, meta = final_params(config, p.store, 1)
    row = rows(tmp_path / "agg")[0]
    assert row["secagg_survivors"] == ["code", "lines"] and row["secagg_dropped"] == ["prose"]
    assert meta["accepted"] == ["code", "lines"] and "secagg_aborted" not in row
    # the survivors' mean, from a secure simulation of the two of them (its ring is sized for 2, so the
    # encodings round differently: equal within a ring unit; stray masks would be off by ~B)
    two = config.copy_and_resolve_references()
    two.train.silos = ("code", "lines")
    sim = simulation.train(two, str(tmp_path / "sim"))
    want = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(sim["server"].params))]
    unit = federation.Federation(config, SILOS).secure.fixed_point(3).resolution
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=2 * unit + 1e-7, rtol=0)


@pytest.mark.multiprocess
def test_below_the_threshold_the_round_aborts_and_nothing_is_summed(small_corpus, tmp_path, procs):
    config, p = _run_with_prose_killed_before_masking(small_corpus, tmp_path, procs, threshold=3)
    got, meta = final_params(config, p.store, 1)
    before, _ = final_params(config, p.store, 0)
    for a, b in zip(got, before):
        np.testing.assert_array_equal(a, b)  # no update: params unchanged
    row = rows(tmp_path / "agg")[0]
    assert "only 2 of the 3 masked inputs needed arrived (missing: prose)" in row["secagg_aborted"]
    assert meta["accepted"] == [] and row["secagg_survivors"] == []
    assert "secure aggregation ABORTED" in p.log("aggregator")
    assert not os.path.exists(os.path.join(p.store, "secagg", "0", "unmask"))  # nobody was asked to unmask


@pytest.mark.multiprocess
def test_a_silo_killed_after_its_masked_input_restarts_and_answers(small_corpus, tmp_path, procs):
    """Killed between the commit of its masked input and its unmasking response, a silo restarts from the
    state in its workdir, answers with the same keys, and the run ends as the uninterrupted simulation."""
    config, spec = _deploy_config(small_corpus, tmp_path, rounds=2, threshold=3)
    p = procs["p"] = Procs(tmp_path, spec)
    p.aggregator()
    for s in ("code", "lines"):
        _silo(p, s)
    _silo(p, "prose", env={"FEDJAX_SILO_PAUSE_AFTER_COMMIT_S": "600"})
    _kill_when(p, "prose", "pausing after the commit of round 0")
    _silo(p, "prose", "prose-2")
    p.wait("aggregator")
    for s in ("code", "lines", "prose-2"):
        p.wait(s)
    assert "answered the unmasking request" in p.log("prose-2")
    got, _ = final_params(config, p.store, 2)
    assert [r["secagg_survivors"] for r in rows(tmp_path / "agg")] == [SILOS, SILOS]
    sim = simulation.train(config.copy_and_resolve_references(), str(tmp_path / "sim"))
    want = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(sim["server"].params))]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


@pytest.mark.multiprocess
def test_an_aggregator_killed_after_publishing_the_survivors_resumes_to_the_same_model(
    small_corpus, tmp_path, procs
):
    """SIGKILL between U3 and the unmasking: the restarted aggregator reuses the published lists, re-derives
    its round key, opens the responses sealed to it before the crash, and ends where the simulation does."""
    config, spec = _deploy_config(small_corpus, tmp_path, rounds=2)
    p = procs["p"] = Procs(tmp_path, spec)
    p.aggregator(env={"FEDJAX_PAUSE_AFTER_VALIDATION_S": "600"})
    for s in SILOS:
        _silo(p, s)
    _kill_when(p, "aggregator", "U3 published")
    wait_until(lambda: len(os.listdir(os.path.join(p.store, "secagg", "0", "unmask"))) == 3, what="responses")
    p.aggregator("aggregator-2")
    p.wait("aggregator-2")
    for s in SILOS:
        p.wait(s)
    assert "resuming at round 0" in p.log("aggregator-2")
    got, _ = final_params(config, p.store, 2)
    sim = simulation.train(config.copy_and_resolve_references(), str(tmp_path / "sim"))
    want = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(sim["server"].params))]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
