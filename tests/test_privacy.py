"""Silo-level DP primitives: clipping, noise, the fixed-denominator mean, adaptive clipping, accounting.

Statistical tests use fixed seeds and state their tolerance next to the assertion.
"""

import math
import statistics

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fedjax_lm import accounting, compression, privacy

SECRET = bytes(range(32))


def _norm64(tree) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(tree)))


def _random_tree(rng, scale):
    return {
        "w": jnp.asarray((rng.normal(size=(300, 129)) * scale).astype(np.float32)),
        "b": [jnp.asarray((rng.normal(size=(7,)) * scale).astype(np.float32)), jnp.float32(scale)],
        "empty": jnp.zeros((0, 3), jnp.float32),
    }


# ------------------------------------------------------------------------------ clipping


@pytest.mark.parametrize("jit", [False, True])
def test_clip_bound_holds_for_every_update(jit):
    """‖clip(Δ, C)‖ ≤ C (1 + 1e-6) in f64 for norms from 0 to beyond the f32 range; shorter updates
    come back unchanged, longer ones keep their direction."""
    clip = jax.jit(privacy.clip_update) if jit else privacy.clip_update
    rng = np.random.default_rng(0)
    C = 0.75
    for scale in [0.0, 1e-30, 1e-6, 1e-3, 0.01, 1.0, 1e3, 1e20, 1e36]:
        tree = _random_tree(rng, scale)
        clipped, norm = clip(tree, C)
        true = _norm64(tree)
        assert _norm64(clipped) <= C * (1 + 1e-6), scale
        if math.isfinite(true) and true < 1e38:
            assert float(norm) == pytest.approx(true, rel=1e-5), scale
        if true <= C * 0.999:
            for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(tree)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            assert _norm64(clipped) == pytest.approx(C, rel=1e-6), scale
            for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(tree)):
                np.testing.assert_allclose(
                    np.asarray(a, np.float64), np.asarray(b, np.float64) * C / true, rtol=1e-5
                )
    # Near the f32 limit the norm overflows f32, the clip still scales correctly.
    huge = {"a": jnp.full((1000,), 3.4e38, jnp.float32), "b": jnp.full((3,), -3e38, jnp.float32)}
    clipped, norm = clip(huge, 2.0)
    assert float(norm) == math.inf
    assert _norm64(clipped) == pytest.approx(2.0, rel=1e-6)
    assert float(clipped["b"][0]) < 0 < float(clipped["a"][0])
    # A non-finite update is released as zeros (norm +inf tells the caller).
    for bad in (jnp.nan, jnp.inf):
        clipped, norm = clip({"a": jnp.array([1.0, bad]), "b": jnp.ones((3,))}, C)
        assert float(norm) == math.inf
        assert _norm64(clipped) == 0.0


def test_clip_with_traced_clip_norm():
    f = jax.jit(lambda t, c: privacy.clip_update(t, c)[0])
    tree = {"a": jnp.arange(10.0)}
    for c in (0.5, 3.0, 100.0):
        assert _norm64(f(tree, jnp.float32(c))) == pytest.approx(min(c, _norm64(tree)), rel=1e-6)


# ------------------------------------------------------------------------------ noise


def test_noise_key_is_deterministic_secret_dependent_and_separated():
    def data(k):
        return np.asarray(jax.random.key_data(k)).tolist()

    k = privacy.noise_key(SECRET, 3, "quotes-en")
    assert data(k) == data(privacy.noise_key(SECRET, 3, "quotes-en"))  # resume: same key
    others = [
        privacy.noise_key(SECRET, 4, "quotes-en"),
        privacy.noise_key(SECRET, 3, "quotes-de"),
        privacy.noise_key(SECRET, 3, "quotes-en", purpose="indicator"),
        privacy.noise_key(bytes(32), 3, "quotes-en"),
    ]
    assert len({str(data(x)) for x in [k, *others]}) == 5
    with pytest.raises(ValueError, match="at least 16 random bytes"):
        privacy.noise_key(b"short", 0, "x")


def test_central_noise_has_the_configured_std():
    """1,000,000 coordinates in two leaves: the sample std is within 0.5% of σC (its standard error
    is 1/√(2n) = 0.07%, so 0.5% is 7 standard errors); the mean within 5 standard errors of 0; the
    two leaves' noises are uncorrelated (|r| < 5/√n)."""
    sigma, C = 1.7, 0.3
    std = privacy.central_noise_std(sigma, C)
    assert std == pytest.approx(0.51)
    tree = {"a": jnp.zeros((600, 1000)), "b": jnp.zeros((400_000,))}
    noised = jax.jit(privacy.add_noise)(tree, privacy.noise_key(SECRET, 0, "aggregator"), std)
    x = np.concatenate([np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(noised)])
    assert x.size == 1_000_000
    assert abs(x.std() / std - 1) < 0.005
    assert abs(x.mean()) < 5 * std / math.sqrt(x.size)
    a, b = np.asarray(noised["a"]).ravel()[:400_000], np.asarray(noised["b"])
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(400_000)


def test_distributed_noise_sums_to_the_central_std_and_dropouts_reduce_it():
    """K = 8 silos, each with its own key, add N(0, σ²C²/t) with t = 8: the sum's std is σC within
    0.5% (500,000 coordinates: standard error 0.1%). With 6 of 8 contributing the sum carries
    σ·√(6/8), as `effective_noise_multiplier` says; the accountant is given σ·min(1, √(m/t))."""
    sigma, C, t = 2.0, 0.5, 8
    share_std = privacy.distributed_noise_std(sigma, C, t)
    assert share_std == pytest.approx(sigma * C / math.sqrt(8))
    zeros = {"x": jnp.zeros((500_000,))}
    shares = [
        np.asarray(
            privacy.add_noise(zeros, privacy.noise_key(SECRET, 5, f"silo{k}"), share_std)["x"], np.float64
        )
        for k in range(8)
    ]
    full = np.sum(shares, axis=0)
    assert abs(full.std() / (sigma * C) - 1) < 0.005
    six = np.sum(shares[:6], axis=0)
    expected = privacy.effective_noise_multiplier(sigma, t, 6) * C
    assert expected == pytest.approx(sigma * C * math.sqrt(6 / 8))
    assert abs(six.std() / expected - 1) < 0.005
    assert privacy.accounted_noise_multiplier(sigma, t, 6) == pytest.approx(sigma * math.sqrt(0.75))
    assert privacy.accounted_noise_multiplier(sigma, 6, 8) == sigma  # extra contributors: no credit


# ------------------------------------------------------------------------------ silo upload, combinations


def test_privatize_update_central_int8_error_feedback_order():
    """Central mode: the residual enters before clipping, the release is clipped, and the new residual
    is the compression error only — not the clipping excess (Δ is 100x over C here)."""
    rng = np.random.default_rng(1)
    C = 1.0
    delta = {"w": jnp.asarray(rng.normal(size=(64, 256)).astype(np.float32))}
    assert _norm64(delta) > 100 * C
    error = compression.init_error(delta)
    f = jax.jit(privacy.privatize_update, static_argnames=("method", "block_size"))
    for _ in range(3):
        payload, error, norm = f(delta, error, C, method="int8")
        decoded = compression.decompress(payload, delta)
        assert _norm64(decoded) <= C * 1.01  # int8 rounding only
        reclipped, _ = privacy.clip_update(decoded, C)  # what the aggregator does
        assert _norm64(reclipped) <= C * (1 + 1e-6)
        assert _norm64(error) < 0.02 * C  # quantisation error of a C-bounded vector
        assert float(norm) > 100 * C


def test_privatize_update_distributed_adds_the_share_and_has_no_residual():
    delta = {"w": jnp.full((200_000,), 1e-3, jnp.float32)}
    key = privacy.noise_key(SECRET, 0, "silo0")
    std = privacy.distributed_noise_std(1.0, 0.1, 4)
    payload, error, norm = privacy.privatize_update(delta, None, 0.1, key, std, method="none")
    clipped, _ = privacy.clip_update(delta, 0.1)
    noise = np.asarray(payload["w"]["x"], np.float64) - np.asarray(clipped["w"], np.float64)
    assert abs(noise.std() / std - 1) < 0.01  # 200,000 draws: standard error 0.16%
    assert _norm64(error) == 0.0
    with pytest.raises(ValueError, match="distributed noise with compression 'int8'"):
        privacy.privatize_update(delta, None, 0.1, key, std, method="int8")
    with pytest.raises(ValueError, match="needs a key"):
        privacy.privatize_update(delta, None, 0.1, None, std)


def test_check_combination_refuses_what_breaks_the_guarantee():
    privacy.check_combination(None, "int8")
    privacy.check_combination("central", "int8")
    privacy.check_combination("distributed", "none")
    with pytest.raises(ValueError, match="privacy.mode='distributed' with federation.compression='int8'"):
        privacy.check_combination("distributed", "int8")
    with pytest.raises(ValueError, match="unknown compression method 'fp8'"):
        privacy.check_combination("central", "fp8")
    with pytest.raises(ValueError, match="privacy.mode must be one of"):
        privacy.check_combination("local", "none")


def test_fixed_denominator_and_dp_mean():
    assert privacy.fixed_denominator([1.0] * 8, 0.5) == 4.0  # K = 4 of N = 8, equal weights
    w = privacy.capped_weights({"a": 10.0, "b": 50.0, "c": 200.0}, cap=100.0)
    assert w == {"a": 0.1, "b": 0.5, "c": 1.0}
    assert privacy.fixed_denominator(w, 1.0) == pytest.approx(1.6)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        privacy.fixed_denominator([1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="every silo has weight 0"):
        privacy.fixed_denominator([0.0, 0.0], 1.0)
    s = {"x": jnp.array([4.0, -8.0])}
    np.testing.assert_array_equal(np.asarray(privacy.dp_mean(s, 4.0)["x"]), [1.0, -2.0])
    assert privacy.sum_sensitivity(0.5, 1.0) == 0.5
    assert privacy.central_noise_std(2.0, 0.5, max_weight=0.5) == 0.5


# ------------------------------------------------------------------------------ adaptive clipping


def test_update_noise_multiplier_makes_the_round_one_gaussian_of_sigma():
    """z_Δ = (σ⁻² − (2σ_b)⁻²)^(-1/2); composing Gaussian(z_Δ) with the indicator's Gaussian(2σ_b)
    gives exactly the RDP of Gaussian(σ) (Andrew et al. 2021, Thm. 1)."""
    sigma, sb = 1.7, 2.0
    z = privacy.update_noise_multiplier(sigma, sb)
    assert z == pytest.approx((sigma**-2 - (2 * sb) ** -2) ** -0.5)
    assert z > sigma
    both = (
        rdp.RdpAccountant()
        .compose(dp_accounting.GaussianDpEvent(z))
        .compose(dp_accounting.GaussianDpEvent(2 * sb))
    )
    one = rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(sigma))
    assert both.get_epsilon(1e-5) == pytest.approx(one.get_epsilon(1e-5), rel=1e-9)
    assert privacy.update_noise_multiplier(0.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="indicator noise std > 0.85"):
        privacy.update_noise_multiplier(sigma, 0.4)  # m/20 with 8 silos: too little


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_adaptive_clipping_moves_to_the_target_quantile(gamma):
    """Norms ~ lognormal(median 3, s = 0.5), 50 silos a round, σ_b = m/20, η = 0.2, C₀ = 0.1: after
    300 rounds the mean clip over the last 100 is within 5% of the true γ-quantile (seed 0)."""
    rng = np.random.default_rng(0)
    m = 50
    state = privacy.adaptive_clip_init(0.1, m, target_quantile=gamma, learning_rate=0.2)
    assert state.indicator_noise_std == 2.5
    update = jax.jit(privacy.adaptive_clip_update)
    clips = []
    for r in range(300):
        norms = jnp.asarray(rng.lognormal(math.log(3.0), 0.5, m).astype(np.float32))
        report = jnp.sum(privacy.centered_indicator(norms, state.clip_norm))
        noised = privacy.add_noise(report, privacy.noise_key(SECRET, r, "aggregator", "indicator"), 2.5)
        state = update(state, noised)
        clips.append(float(state.clip_norm))
    true_q = 3.0 * math.exp(0.5 * statistics.NormalDist().inv_cdf(gamma))
    assert np.mean(clips[-100:]) == pytest.approx(true_q, rel=0.05)
    # One step moves C by at most a factor exp(η).
    ratios = np.array(clips[1:]) / np.array(clips[:-1])
    assert np.all(ratios <= math.exp(0.2) * (1 + 1e-6)) and np.all(ratios >= math.exp(-0.2) * (1 - 1e-6))


def test_centered_indicator():
    out = privacy.centered_indicator(jnp.array([0.5, 1.0, 1.5, jnp.inf]), 1.0)
    np.testing.assert_array_equal(np.asarray(out), [0.5, 0.5, -0.5, -0.5])


# ------------------------------------------------------------------------------ accounting


def _direct_epsilon(
    accountant, sigma, q, rounds, delta, relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
):
    gauss = dp_accounting.GaussianDpEvent(sigma)
    event = gauss if q == 1 else dp_accounting.PoissonSampledDpEvent(q, gauss)
    if accountant == "pld":
        acct = pld.PLDAccountant(relation, value_discretization_interval=1e-3)
    else:
        acct = rdp.RdpAccountant(neighboring_relation=relation)
    return acct.compose(event, rounds).get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize(
    "sigma,q,rounds,delta", [(1.7, 1.0, 8, 1e-5), (5.6, 1.0, 8, 1e-6), (1.9, 0.5, 32, 1e-5)]
)
def test_accountant_equals_dp_accounting_directly(accountant, sigma, q, rounds, delta):
    acct = accounting.PrivacyAccountant(sigma, q, delta, accountant)
    assert acct.epsilon() == 0.0
    before = acct.epsilon_after(rounds)
    acct.step(rounds)
    direct = _direct_epsilon(accountant, sigma, q, rounds, delta)
    assert acct.epsilon() == pytest.approx(direct, rel=1e-12)
    assert before == acct.epsilon()
    # Zero-out (the silo still takes part, its update zeroed) gives the same numbers.
    zero_out = dp_accounting.NeighboringRelation.REPLACE_SPECIAL
    assert _direct_epsilon(accountant, sigma, q, rounds, delta, zero_out) == pytest.approx(direct, rel=1e-9)


def test_accountant_anchor_values_and_sigma_zero():
    assert accounting.PrivacyAccountant(1.7, 1.0, 1e-5).epsilon_after(8) == pytest.approx(8.0, abs=0.05)
    assert accounting.PrivacyAccountant(0.0, 1.0, 1e-5).epsilon_after(1) == math.inf


def test_epsilon_grows_monotonically_with_rounds():
    for name in ("rdp", "pld"):
        acct = accounting.PrivacyAccountant(2.0, 1.0, 1e-5, name)
        eps = []
        for _ in range(12):
            acct.step()
            eps.append(acct.epsilon())
        assert all(b > a for a, b in zip(eps, eps[1:])), (name, eps)


def test_steps_compose_like_one_event_and_state_round_trips():
    a = accounting.PrivacyAccountant(2.0, 1.0, 1e-5, "rdp")
    for _ in range(5):
        a.step()
    b = accounting.PrivacyAccountant(2.0, 1.0, 1e-5, "rdp").step(5)
    assert a.rounds == b.rounds == 5 and a.epsilon() == b.epsilon()
    # A round with dropouts in distributed mode is accounted at a lower multiplier.
    a.step(noise_multiplier=privacy.accounted_noise_multiplier(2.0, 8, 6)).step(2)
    assert a.rounds == 8
    assert a.epsilon() > b.epsilon_after(3)
    direct = (
        rdp.RdpAccountant()
        .compose(dp_accounting.GaussianDpEvent(2.0), 5)
        .compose(dp_accounting.GaussianDpEvent(2.0 * math.sqrt(0.75)), 1)
        .compose(dp_accounting.GaussianDpEvent(2.0), 2)
        .get_epsilon(1e-5)
    )
    assert a.epsilon() == pytest.approx(direct, rel=1e-12)
    c = accounting.PrivacyAccountant.from_state_dict(a.state_dict())
    assert c.epsilon() == a.epsilon() and c.rounds == 8


def test_budget_check_says_would_exceed_exactly_when_epsilon_after_exceeds():
    acct = accounting.PrivacyAccountant(3.0, 1.0, 1e-5, "rdp")
    budget = 4.0
    ran = 0
    while not acct.would_exceed(budget):
        acct.step()
        ran += 1
        assert ran < 100
    assert acct.epsilon() <= budget < acct.epsilon_after(1)
    assert ran == acct.rounds > 0
    for b in (acct.epsilon_after(1) - 1e-9, acct.epsilon_after(1), acct.epsilon_after(1) + 1e-9):
        assert acct.would_exceed(b) == (acct.epsilon_after(1) > b)


@pytest.mark.parametrize(
    "accountant,target,rounds,q,anchor",
    [("pld", 8.0, 8, 1.0, 1.7), ("pld", 2.0, 8, 1.0, 5.6), ("rdp", 8.0, 32, 1.0, None)],
)
def test_noise_multiplier_for_round_trips(accountant, target, rounds, q, anchor):
    """ε(σ*) ≤ target and within 1% of it (σ* is found to 0.1%); σ* matches ANCHORS.md where given."""
    sigma = accounting.noise_multiplier_for(target, 1e-5, rounds, q, accountant)
    eps = accounting.PrivacyAccountant(sigma, q, 1e-5, accountant).epsilon_after(rounds)
    assert target * 0.99 <= eps <= target
    assert accounting.PrivacyAccountant(sigma * 0.99, q, 1e-5, accountant).epsilon_after(rounds) > target
    if anchor is not None:
        assert sigma == pytest.approx(anchor, rel=0.02)
    assert accounting.noise_multiplier_for(math.inf, 1e-5, rounds) == 0.0


def test_sampling_without_replacement_is_rdp_replace_one_with_half_sigma():
    acct = accounting.PrivacyAccountant(
        2.0, 0.5, 1e-5, "rdp", sampling="without_replacement", population=8
    ).step(4)
    direct = (
        rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        .compose(dp_accounting.SampledWithoutReplacementDpEvent(8, 4, dp_accounting.GaussianDpEvent(1.0)), 4)
        .get_epsilon(1e-5)
    )
    assert acct.epsilon() == pytest.approx(direct, rel=1e-12)
    with pytest.raises(ValueError, match="RDP only"):
        accounting.PrivacyAccountant(2.0, 0.5, 1e-5, "pld", sampling="without_replacement", population=8)
    with pytest.raises(ValueError, match="not a whole number"):
        accounting.PrivacyAccountant(2.0, 0.3, 1e-5, "rdp", sampling="without_replacement", population=8)
