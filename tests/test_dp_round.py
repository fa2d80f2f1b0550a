"""Central client-level DP in the round: server-side clipping, noise, accounting, the budget, both drivers."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lm import federation
from fedjax_lm import accounting
from fedjax_lm import simulation
from tests.test_deploy import Procs, assert_equals_simulation, final_params, make_config, wait_until  # noqa: F401

SILOS = ["code", "lines", "prose"]


def dp_config(small_corpus, tmp_path, **dp):
    config, spec = make_config(small_corpus, tmp_path, rounds=3)
    config.federation.dp.update({**dict(mode="central", clip_norm=1.0, noise_multiplier=1.0), **dp})
    return config


def test_server_weights_clip_each_update_and_use_the_fixed_denominator(small_corpus, tmp_path):
    fed = federation.Federation(dp_config(small_corpus, tmp_path, clip_norm=2.0), SILOS)
    weights, factor, clipped = fed.server_weights({"code": 300.0, "lines": 10.0}, {"code": 8.0, "lines": 1.0})
    assert weights == {"code": 0.25, "lines": 1.0}  # weight 1 each (not tokens), scaled to norm <= C
    assert factor == pytest.approx(1.25 / 3) and clipped == 1  # D = 3 silos expected per round
    # without DP, clip_norm_ratio clips to ratio x the round's median norm, token weights kept
    config, _ = make_config(small_corpus, tmp_path, rounds=3)
    config.federation.clip_norm_ratio = 2.0
    fed = federation.Federation(config, SILOS)
    weights, factor, clipped = fed.server_weights(
        {"code": 100.0, "lines": 100.0, "prose": 100.0}, {"code": 1.0, "lines": 2.0, "prose": 40.0}
    )
    assert weights["prose"] == pytest.approx(10.0) and weights["code"] == 100.0 and clipped == 1
    assert factor == pytest.approx(210.0 / 300.0)


def test_central_noise_has_the_configured_std_and_is_repeatable(small_corpus, tmp_path):
    fed = federation.Federation(dp_config(small_corpus, tmp_path, noise_multiplier=2.0, clip_norm=0.5), SILOS)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), fed.abstract_params)
    out = fed.finish_aggregate(zeros, 1.0, 4, b"s" * 32)
    x = np.concatenate([np.asarray(v).reshape(-1) for v in jax.tree.leaves(out)])
    want = 2.0 * 0.5 / 3  # σ C / D
    # std of n normal samples: relative standard error 1/sqrt(2n); allow 6 of them
    assert abs(x.std() / want - 1) < 6 / np.sqrt(2 * x.size), (x.std(), want, x.size)
    again = fed.finish_aggregate(zeros, 1.0, 4, b"s" * 32)
    other = fed.finish_aggregate(zeros, 1.0, 5, b"s" * 32)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(again)))
    assert not np.array_equal(jax.tree.leaves(out)[0], jax.tree.leaves(other)[0])  # fresh noise per round


def test_the_budget_ends_the_run_at_the_last_round_it_allows(small_corpus, tmp_path):
    config = dp_config(small_corpus, tmp_path, noise_multiplier=2.0)
    eps = [accounting.PrivacyAccountant(2.0, 1.0, 1e-5, "rdp").epsilon_after(n) for n in (1, 2, 3)]
    config.federation.dp.epsilon_budget = (eps[1] + eps[2]) / 2  # allows 2 of 3 rounds
    summary = simulation.train(config, str(tmp_path / "sim"))
    rows = [json.loads(line) for line in open(tmp_path / "sim" / "metrics" / "rounds.jsonl")]
    assert [r["round"] for r in rows] == [0, 1]
    assert [r["dp_epsilon"] for r in rows] == pytest.approx(eps[:2], rel=1e-9)
    p = summary["privacy"]
    assert p["stopped_by_budget"] and p["rounds"] == 2 and p["epsilon"] <= config.federation.dp.epsilon_budget
    assert np.isfinite(summary["val"]["pooled"]["ppl"])
    assert os.stat(tmp_path / "sim" / "dp_noise_secret").st_mode & 0o077 == 0  # the aggregator's alone


def test_dp_config_errors_name_the_field(small_corpus, tmp_path):
    from fedjax_lm import config as config_lib

    for change, message in (
        (dict(clip_norm=0.0), "dp.clip_norm must be > 0"),
        (dict(noise_multiplier=0.0), "noise_multiplier > 0 or target_epsilon > 0"),
        (dict(mode="distributed"), "needs secure aggregation"),
        (dict(adaptive_clip=True, target_quantile=1.5), "target_quantile must be in"),
        (dict(mode="local"), "dp.mode must be"),
    ):
        config = dp_config(small_corpus, tmp_path, **change)
        with pytest.raises(ValueError, match=message):
            config_lib.validate(config)
    config = dp_config(small_corpus, tmp_path)
    config.federation.aggregation = "median"
    with pytest.raises(ValueError, match="needs federation.aggregation='mean'"):
        config_lib.validate(config)


def test_adaptive_clip_moves_toward_the_target_quantile_and_keeps_the_accounted_sigma(small_corpus, tmp_path):
    from fedjax_lm import dp_round

    config = dp_config(
        small_corpus, tmp_path, noise_multiplier=0.5, adaptive_clip=True, indicator_noise_std=1.0
    )
    rdp = federation.Federation(config, SILOS).dp_round
    # the update is noised with z = (σ^-2 - (2σ_b)^-2)^-1/2 so that update + indicator is one Gaussian(σ)
    assert rdp.update_noise_multiplier == pytest.approx((0.5**-2 - 2.0**-2) ** -0.5)
    assert rdp.noise_multiplier == 0.5 and rdp.noise_std(2.0) == pytest.approx(
        rdp.update_noise_multiplier * 2 / 3
    )
    quiet = dp_config(
        small_corpus, tmp_path, noise_multiplier=1e-4, adaptive_clip=True, indicator_noise_std=1e-3
    )
    rdp = federation.Federation(quiet, SILOS).dp_round
    grow = rdp.next_clip(1.0, {"code": 5.0, "lines": 6.0, "prose": 7.0}, 0, b"s" * 32)  # all clipped: b = 0
    shrink = rdp.next_clip(1.0, {"code": 0.1, "lines": 0.2, "prose": 0.3}, 0, b"s" * 32)  # none: b = 1
    assert grow == pytest.approx(np.exp(0.2 * 0.5), rel=1e-3) and shrink == pytest.approx(
        np.exp(-0.2 * 0.5), rel=1e-3
    )
    assert dp_round.clip_of({"dp_clip_norm": 0.7}, 1.0) == 0.7 and dp_round.clip_of({}, 1.0) == 1.0
    with pytest.raises(ValueError, match="indicator_noise_std: adaptive clipping with noise multiplier 2.0"):
        federation.Federation(
            dp_config(small_corpus, tmp_path, noise_multiplier=2.0, adaptive_clip=True), SILOS
        )
    # a simulation carries C from round to round (and through a resume) as the rows say
    summary = simulation.train(quiet, str(tmp_path / "adaptive"))
    rows = [json.loads(line) for line in open(tmp_path / "adaptive" / "metrics" / "rounds.jsonl")]
    for row, nxt in zip(rows, rows[1:] + [None]):
        norms = [v for k, v in row.items() if k.startswith("update_norm/")]
        frac = np.mean([n <= row["dp_clip_norm"] for n in norms])
        want = row["dp_clip_norm"] * np.exp(-0.2 * (frac - 0.5))
        got = nxt["dp_clip_norm"] if nxt else summary["privacy"]["final_clip_norm"]
        assert got == pytest.approx(want, rel=1e-3)
    assert len({r["dp_clip_norm"] for r in rows}) == 3  # it moved every round


@pytest.mark.multiprocess
def test_a_dp_deployment_equals_the_simulation_and_stops_at_the_budget(small_corpus, tmp_path):
    """Central DP with the same noise secret: the deployment adds the same noise as the simulation
    (clip bound above every norm, so both drivers scale by exactly 1) and both stop where the
    budget says; the silos stop at the final global."""
    config, spec = make_config(small_corpus, tmp_path, rounds=3, signed=True)
    # std 3e-5; adaptive clipping moves C round by round (the aggregator publishes it with each global)
    config.federation.dp.update(
        dict(mode="central", clip_norm=1e3, noise_multiplier=1e-7, adaptive_clip=True)
    )
    eps = [accounting.PrivacyAccountant(1e-7, 1.0, 1e-5, "rdp").epsilon_after(n) for n in (2, 3)]
    config.federation.dp.epsilon_budget = (eps[0] + eps[1]) / 2
    path = tmp_path / "config.json"
    path.write_text(config.to_json_best_effort())
    os.makedirs(tmp_path / "agg")
    (tmp_path / "agg" / "dp_noise_secret").write_bytes(b"k" * 32)
    os.makedirs(tmp_path / "sim")
    (tmp_path / "sim" / "dp_noise_secret").write_bytes(b"k" * 32)
    p = Procs(tmp_path, spec)
    try:
        p.aggregator()
        for s in SILOS:
            p.silo(s)
        p.wait("aggregator")
        for s in SILOS:
            p.wait(s)
            assert "federation finished at round 2 (privacy budget)" in p.log(s)
    finally:
        p.close()
    got, meta = final_params(config, p.store, 2)
    assert meta["final"] == "privacy budget"
    summary = json.loads((tmp_path / "agg" / "summary.json").read_text())
    assert summary["privacy"]["rounds"] == 2 and summary["privacy"]["stopped_by_budget"]
    sim = assert_equals_simulation(config, tmp_path, got)
    assert sim["privacy"]["epsilon"] == summary["privacy"]["epsilon"]
    clips = [
        [json.loads(line)["dp_clip_norm"] for line in open(tmp_path / d / "metrics" / "rounds.jsonl")]
        for d in ("agg", "sim")
    ]
    assert clips[0] == clips[1] and clips[0][0] == 1e3 and clips[0][1] != 1e3
    assert summary["privacy"]["final_clip_norm"] == sim["privacy"]["final_clip_norm"]
