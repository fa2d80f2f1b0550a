"""Outer step: pseudo-gradients, token-weighted mean, outer optimizers against numpy references."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_lm import outer


def _toy(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "emb": (scale * rng.standard_normal((7, 5))).astype(np.float32),
        "blocks": [
            {"w": (scale * rng.standard_normal((5, 3))).astype(np.float32)},
            {"w": (scale * rng.standard_normal((3,))).astype(np.float32)},
        ],
        "s": np.float32(scale * rng.standard_normal()),
    }


def _jnp(tree):
    return jax.tree.map(jnp.asarray, tree)


def _assert_tree_close(actual, expected, **kw):
    jax.tree.map(
        lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), **kw), actual, expected
    )


def _mean(deltas_and_weights, like=None):
    """The production running mean over uncompressed payloads."""
    items = [(jax.tree.map(lambda x: {"x": jnp.asarray(x)}, d), w) for d, w in deltas_and_weights]
    like = _jnp(like if like is not None else deltas_and_weights[0][0])
    return outer.mean_of_payloads(like, items)


_apply = jax.jit(outer.outer_apply, static_argnames="tx")


def test_pseudo_gradient_is_global_minus_local_in_f32():
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _toy(0))
    l = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _toy(1))
    d = jax.jit(outer.pseudo_gradient)(g, l)
    for dx, gx, lx in zip(jax.tree.leaves(d), jax.tree.leaves(g), jax.tree.leaves(l)):
        assert dx.dtype == jnp.float32
        np.testing.assert_array_equal(dx, np.asarray(gx, np.float32) - np.asarray(lx, np.float32))


def test_fedavg_lr1_one_silo_reproduces_local_params_exactly():
    global_params = _jnp(_toy(0))
    noise = _toy(1, scale=0.01)
    local = jax.tree.map(lambda g, n: g - n, global_params, _jnp(noise))
    tx = outer.make_outer_optimizer(outer.default_outer_config("fedavg"))
    state = outer.outer_init(global_params, tx)
    mean, total, n = _mean([(outer.pseudo_gradient(global_params, local), 123_457)])
    assert (total, n) == (123_457.0, 1)
    new = _apply(state, mean, tx)
    # Bit-exact: the running mean returns a lone silo's Δ unchanged (a sum-then-divide by
    # 123457 tokens would not), and θ − (θ − θ_k) is exact for nearby θ, θ_k.
    jax.tree.map(lambda a, e: np.testing.assert_array_equal(np.asarray(a), np.asarray(e)), new.params, local)
    assert int(new.round) == 1 and new.round.dtype == jnp.int32


def test_token_weighted_mean_weights_order_and_running_sum():
    deltas = [_jnp(_toy(s)) for s in (10, 11, 12)]
    weights = [1, 3, 5]
    two, total, n = _mean([(deltas[0], 1), (deltas[1], 3)])
    expected_two = jax.tree.map(lambda a, b: (1 * a + 3 * b) / 4, *deltas[:2])
    _assert_tree_close(two, expected_two, rtol=1e-6, atol=1e-6)
    assert (total, n) == (4.0, 2)
    # The accumulator holds one model, not one per silo.
    assert jax.tree.structure(two) == jax.tree.structure(deltas[0])

    # Equal to the plain running sum Σ w Δ / Σ w (float64), in any order.
    expected = jax.tree.map(
        lambda *xs: sum(w * np.float64(x) for w, x in zip(weights, xs)) / sum(weights), *deltas
    )
    results = []
    for order in itertools.permutations(range(3)):
        results.append(_mean([(deltas[i], weights[i]) for i in order])[0])
        _assert_tree_close(results[-1], expected, rtol=1e-6, atol=1e-6)
    for r in results[1:]:
        _assert_tree_close(r, results[0], rtol=1e-6, atol=1e-6)


def test_running_fractions_are_the_factors_of_the_fold():
    fr = outer.running_fractions([1.0, 3.0, 0.0, 4.0])
    assert [float(f) for f in fr] == [1.0, 0.75, 0.0, 0.5]
    assert all(f.dtype == np.float32 for f in fr)


def test_zero_weight_adds_nothing_and_empty_mean_is_refused():
    d = _jnp(_toy(3))
    with pytest.raises(ValueError, match="nothing to aggregate"):
        _mean([(d, 0)])  # a silo that saw no tokens
    with pytest.raises(ValueError, match="nothing to aggregate"):
        outer.mean_of_payloads(d, [])
    nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), d)
    mean, total, n = _mean([(d, 2), (_jnp(_toy(4)), 0)])
    _assert_tree_close(mean, d, rtol=0, atol=0)
    assert (total, n) == (2.0, 2)
    del nan


# ------------------------------------------------------ numpy reference optimizers


def _ref_sgd(deltas, lr, momentum, nesterov, params):
    """PyTorch SGD (dampening 0): b ← μb + g; step = g + μb (Nesterov) or b; θ ← θ − lr·step."""
    theta = np.float64(params)
    buf = np.zeros_like(theta)
    for g in deltas:
        buf = momentum * buf + g
        step = g + momentum * buf if nesterov else buf
        theta = theta - lr * step
    return theta


def _ref_adaptive(deltas, lr, b1, b2, eps, params, yogi):
    """Reddi et al. (2021) Alg. 2 (FedAdam / FedYogi), with optax's bias correction.

    m ← b1 m + (1−b1) Δ;  Adam: v ← b2 v + (1−b2) Δ²;  Yogi: v ← v − (1−b2) Δ² sign(v − Δ²);
    θ ← θ − lr · (m / (1−b1^t)) / (sqrt(v / (1−b2^t)) + τ).  Yogi starts m, v at 1e-6 (optax).
    """
    theta = np.float64(params)
    init = 1e-6 if yogi else 0.0
    m = np.full_like(theta, init)
    v = np.full_like(theta, init)
    for t, g in enumerate(deltas, start=1):
        m = b1 * m + (1 - b1) * g
        if yogi:
            v = v - (1 - b2) * g * g * np.sign(v - g * g)
        else:
            v = b2 * v + (1 - b2) * g * g
        theta = theta - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return theta


@pytest.mark.parametrize("name", ["diloco", "nesterov", "fedmom", "fedadam", "fedyogi"])
def test_outer_optimizers_match_numpy_reference(name):
    cfg = outer.default_outer_config(name)
    if name in ("fedadam", "fedyogi"):
        cfg.lr = 0.05
    params = _toy(0)
    # Small, sign-changing pseudo-gradients (~1e-2 with some ~1e-4 entries, where τ = 1e-3 matters).
    deltas = [_toy(100 + r, scale=0.01 if r % 2 else 0.0003) for r in range(4)]
    tx = outer.make_outer_optimizer(cfg)
    state = outer.outer_init(_jnp(params), tx)
    for d in deltas:
        state = _apply(state, _jnp(d), tx)
    assert int(state.round) == len(deltas)

    def ref(p, *ds):
        if name in ("fedadam", "fedyogi"):
            return _ref_adaptive(ds, cfg.lr, cfg.b1, cfg.b2, cfg.eps, p, yogi=name == "fedyogi")
        return _ref_sgd(ds, cfg.lr, cfg.momentum, name != "fedmom", p)

    expected = jax.tree.map(ref, params, *deltas)
    _assert_tree_close(state.params, expected, rtol=2e-6, atol=2e-6)
    # The reference is sensitive: the step moved the params well beyond the tolerance.
    moved = max(
        float(np.max(np.abs(e - np.float64(p))))
        for e, p in zip(jax.tree.leaves(expected), jax.tree.leaves(params))
    )
    assert moved > 1e-3


def test_nesterov_and_heavy_ball_differ():
    params = _jnp(_toy(0))
    d = _jnp(_toy(1, scale=0.1))
    out = {}
    for name in ("diloco", "fedmom"):
        cfg = outer.default_outer_config(name)
        cfg.lr = 0.5
        tx = outer.make_outer_optimizer(cfg)
        state = outer.outer_init(params, tx)
        for _ in range(2):
            state = _apply(state, d, tx)
        out[name] = state.params
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(out["diloco"]), jax.tree.leaves(out["fedmom"]))
    )
    assert diff > 1e-2


def _lrs(cfg, rounds):
    """Per-round outer lr observed through FedAvg with Δ = 1."""
    tx = outer.make_outer_optimizer(cfg)
    state = outer.outer_init({"x": jnp.zeros((), jnp.float32)}, tx)
    lrs = []
    for _ in range(rounds):
        before = float(state.params["x"])
        state = _apply(state, {"x": jnp.ones((), jnp.float32)}, tx)
        lrs.append(before - float(state.params["x"]))
    return np.array(lrs)


def test_cosine_schedule_with_warmup():
    cfg = outer.default_outer_config("fedavg")
    cfg.update(lr=2.0, schedule="cosine", warmup_rounds=2, total_rounds=10, end_lr_ratio=0.1)
    got = _lrs(cfg, 12)
    expected = [1.0, 2.0]  # warm-up: lr/2, lr (no round at lr 0)
    for r in range(2, 12):
        t = min((r - 2) / 8, 1.0)
        expected.append(0.2 + (2.0 - 0.2) * 0.5 * (1 + math.cos(math.pi * t)))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got[6] == pytest.approx(1.1, rel=1e-5)  # half way: (2 + 0.2) / 2


def test_constant_schedule_with_and_without_warmup():
    cfg = outer.default_outer_config("fedavg")
    cfg.lr = 0.5
    np.testing.assert_allclose(_lrs(cfg, 3), [0.5, 0.5, 0.5], rtol=1e-6)
    cfg.warmup_rounds = 4
    np.testing.assert_allclose(_lrs(cfg, 6), [0.125, 0.25, 0.375, 0.5, 0.5, 0.5], rtol=1e-6)


def test_config_errors():
    with pytest.raises(ValueError, match="fedavg.*fedmom.*diloco.*nesterov.*fedadam.*fedyogi"):
        outer.make_outer_optimizer({"name": "fedprox", "lr": 1.0})
    with pytest.raises(ValueError, match="valid names"):
        outer.default_outer_config("adam")
    with pytest.raises(ValueError, match="unknown fields.*momentm"):
        outer.make_outer_optimizer({"name": "diloco", "momentm": 0.9})
    with pytest.raises(ValueError, match="momentum"):
        outer.make_outer_optimizer({"name": "fedavg", "momentum": 0.9})
    with pytest.raises(ValueError, match="total_rounds"):
        outer.make_outer_optimizer({"name": "fedavg", "schedule": "cosine", "warmup_rounds": 5})
    with pytest.raises(ValueError, match="schedule"):
        outer.make_outer_optimizer({"name": "fedavg", "schedule": "linear"})


def test_default_configs_follow_the_literature():
    fedavg, diloco, fedmom = (outer.default_outer_config(n) for n in ("fedavg", "diloco", "fedmom"))
    assert (fedavg.lr, fedavg.momentum) == (1.0, 0.0)
    assert (diloco.lr, diloco.momentum) == (0.7, 0.9)
    assert (fedmom.lr, fedmom.momentum) == (1.0, 0.9)
    for n in ("fedadam", "fedyogi"):
        c = outer.default_outer_config(n)
        assert (c.lr, c.b1, c.b2, c.eps) == (1e-2, 0.9, 0.99, 1e-3)
    # A plain dict with only a name takes the named defaults.
    tx = outer.make_outer_optimizer({"name": "diloco"})
    state = _apply(outer.outer_init({"x": jnp.zeros(())}, tx), {"x": jnp.ones(())}, tx)
    assert float(state.params["x"]) == pytest.approx(-0.7 * 1.9)  # g + μ(μ·0 + g)


def test_aggregate_optimizer_moments():
    params = _jnp(_toy(0))
    tx = optax.adamw(1e-3)
    update = jax.jit(tx.update)
    states = []
    for seed, steps in ((1, 1), (2, 3)):
        s = tx.init(params)
        for k in range(steps):
            g = _jnp(_toy(seed * 10 + k))
            _, s = update(g, s, params)
        states.append(s)
    weights = [1.0, 3.0]
    agg = outer.aggregate_optimizer_moments(iter(zip(states, weights)))  # an iterator is enough
    adam = [s[0] for s in states]
    mix = lambda a, b: (a + 3 * b) / 4
    _assert_tree_close(agg[0].mu, jax.tree.map(mix, adam[0].mu, adam[1].mu), rtol=1e-6, atol=1e-9)
    _assert_tree_close(agg[0].nu, jax.tree.map(mix, adam[0].nu, adam[1].nu), rtol=1e-6, atol=1e-12)
    assert agg[0].count.dtype == jnp.int32 and int(agg[0].count) == 1  # integer count from the first
    assert jax.tree.structure(agg) == jax.tree.structure(states[0])
    with pytest.raises(ValueError):
        outer.aggregate_optimizer_moments([])


def test_delta_stats_values_and_nonfinite():
    d = {"a": jnp.array([3.0, -4.0]), "b": jnp.array([[0.0, 12.0]]), "e": jnp.zeros((0,))}
    stats = jax.jit(outer.delta_stats)(d)
    assert float(stats["norm"]) == pytest.approx(13.0)
    assert float(stats["max_abs"]) == 12.0
    assert float(stats["nonfinite_frac"]) == 0.0
    bad = {"a": jnp.array([3.0, jnp.nan]), "b": jnp.array([[jnp.inf, 1.0]]), "e": jnp.zeros((0,))}
    stats = jax.jit(outer.delta_stats)(bad)
    assert float(stats["nonfinite_frac"]) == pytest.approx(0.5)
    assert not np.isfinite(float(stats["norm"]))


def test_shardings_are_kept():
    mesh = jax.make_mesh((8,), ("fsdp",))  # Explicit axes (jax 0.10 default)
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp")))
    g = {"w": shard(jnp.arange(16 * 4, dtype=jnp.float32).reshape(16, 4)), "v": shard(jnp.ones((8,)))}
    l = jax.tree.map(lambda x: x * 0.5, g)
    d = jax.jit(outer.pseudo_gradient)(g, l)
    mean, _, _ = _mean([(d, 7)], like=g)
    tx = outer.make_outer_optimizer(outer.default_outer_config("diloco"))
    state = jax.jit(outer.outer_init, static_argnames="tx")(g, tx)
    state = _apply(state, mean, tx)
    for tree in (d, mean, state.params):
        for out, ref in zip(jax.tree.leaves(tree), jax.tree.leaves(g)):
            assert out.sharding.is_equivalent_to(ref.sharding, ref.ndim), (out.sharding, ref.sharding)
