"""Robust aggregation (fedjax_lm/robust.py): kernels vs NumPy, robustness, store path = in-memory path."""

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lm import compression
from fedjax_lm import deploy
from fedjax_lm import federation
from fedjax_lm import robust
from fedjax_lm import simulation
from fedjax_lm.store import Store
from fedjax_lm.store import aggregate as store_aggregate
from tests.test_deploy import make_config
from tests.test_simulation import fed_config
from tests.test_store import chunk_files, expect_rejection, make_params, payload_for, validate

ROBUST = ("median", "trimmed_mean")


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _values_with_ties(k, seed, shape=(37, 11)):
    """K f32 leaves: normal values, and a band of rows drawn from 5 values (many exact ties)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(k, *shape)).astype(np.float32)
    x[:, :6] = rng.integers(-2, 3, size=(k, 6, *shape[1:])) * np.float32(0.5)
    x[:, 6] = np.float32(0.75)  # every silo equal
    return x


def _numpy_trimmed_mean(x_KxN, trim):
    k = x_KxN.shape[0]
    return np.sort(x_KxN.astype(np.float64), axis=0)[trim : k - trim].mean(axis=0)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8, 9, 16])
def test_kernels_match_numpy_for_odd_and_even_k_with_ties(k):
    x = _values_with_ties(k, seed=k)
    payloads = [{"x": jnp.asarray(v)} for v in x]
    median = np.asarray(robust.median_leaf(payloads, x.shape[1:]))
    assert median.dtype == np.float32
    # np.median of f32: the middle value, or (a + b) / 2 of the two middle ones, bit for bit
    np.testing.assert_array_equal(median, np.median(x, axis=0))
    for trim in range((k - 1) // 2 + 1):
        got = np.asarray(robust.trimmed_mean_leaf(payloads, x.shape[1:], trim))
        kept = k - 2 * trim
        # the running mean rounds once per kept value: at most one f32 ulp of max|x| each
        atol = kept * 2.0**-23 * float(np.abs(x).max())
        np.testing.assert_allclose(got, _numpy_trimmed_mean(x, trim), rtol=0, atol=atol)
        if kept <= 2:  # one value is exact; two are the median's mean of the middle pair
            np.testing.assert_array_equal(got, median)
    assert np.all(median[6] == np.float32(0.75))


@pytest.mark.parametrize("method", ["int8", "bf16"])
def test_kernels_decode_compressed_payloads_like_the_mean_path(method):
    """The kernel's decoding is the payload's decompress (int8 blocks with padding, bf16)."""
    x = _values_with_ties(5, seed=7, shape=(300, 5))  # 1500 = 5 x 256 + 220: a padded last block
    payloads = [compression.compress(jnp.asarray(v), None, method)[0] for v in x]
    decoded = np.stack([np.asarray(compression.decompress(p, jnp.asarray(x[0]))) for p in payloads])
    np.testing.assert_array_equal(
        np.asarray(robust.median_leaf(payloads, (300, 5))), np.median(decoded, axis=0)
    )
    np.testing.assert_allclose(
        np.asarray(robust.trimmed_mean_leaf(payloads, (300, 5), 1)),
        _numpy_trimmed_mean(decoded, 1),
        rtol=0,
        atol=3 * 2.0**-23 * float(np.abs(decoded).max()),
    )


def test_trim_count_drops_at_least_one_per_side_when_one_is_left():
    t = {k: robust.trim_count(k, 0.1) for k in (1, 2, 3, 4, 9, 10, 19, 20, 31)}
    assert t == {1: 0, 2: 0, 3: 1, 4: 1, 9: 1, 10: 1, 19: 1, 20: 2, 31: 3}
    assert robust.trim_count(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floating point
    assert robust.trim_count(10, 0.0) == 0 and robust.trim_count(5, 0.49) == 2
    for k in range(1, 40):  # a value is always left
        assert k - 2 * robust.trim_count(k, 0.49) >= 1


def test_sorting_network_sorts_every_input():
    for k in range(1, 13):  # 0-1 principle: sorting every 0/1 vector sorts everything
        bits = ((np.arange(2**k)[:, None] >> np.arange(k)) & 1).astype(np.int8)
        for i, j in robust.sorting_network(k):
            bits[:, i], bits[:, j] = np.minimum(bits[:, i], bits[:, j]), np.maximum(bits[:, i], bits[:, j])
        assert (np.diff(bits, axis=1) >= 0).all(), k


def test_one_huge_update_drags_the_mean_but_not_median_or_trimmed_mean():
    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=(64, 32)).astype(np.float32), "b": rng.normal(size=(32,)).astype(np.float32)}
    honest = [
        jax.tree.map(lambda x: x + 0.01 * rng.normal(size=x.shape).astype(np.float32), base) for _ in range(4)
    ]
    attacker = jax.tree.map(lambda x: 1000.0 * x, honest[0])
    deltas = honest[:2] + [attacker] + honest[2:]
    # the attacker also claims far more tokens: the robust rules count every silo once anyway
    items = [(compression.compress(d, None, "none")[0], 1e6 if d is attacker else 100.0) for d in deltas]
    like = jax.tree.map(jnp.asarray, base)
    target = jax.tree.map(lambda *xs: np.median(np.stack(xs), axis=0), *honest)

    def distance(tree):
        return float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(_leaves(tree), _leaves(target)))))

    scale = float(np.sqrt(sum(np.sum(x**2) for x in _leaves(target))))
    mean, total, n = robust.aggregate_payloads(like, items, "mean")
    assert (total, n) == (1e6 + 400.0, 5)
    assert distance(mean) > 100 * scale  # dragged almost all the way to the attacker
    for rule in ROBUST:
        agg, total, n = robust.aggregate_payloads(like, items, rule, trim_fraction=0.2)
        assert (total, n) == (1e6 + 400.0, 5)
        assert distance(agg) < 0.01 * scale, rule  # within the honest silos' spread (noise 1%)


def test_weight_zero_silos_are_left_out_and_an_empty_round_is_refused():
    like = jnp.zeros((4,), jnp.float32)
    vals = [np.float32(v) for v in (1.0, 2.0, 100.0)]
    items = [({"x": jnp.full((4,), v)}, w) for v, w in zip(vals, (5.0, 5.0, 0.0))]
    got, total, n = robust.aggregate_payloads(like, items, "median")
    np.testing.assert_array_equal(np.asarray(got), np.full(4, 1.5, np.float32))  # not 2.0: 100 left out
    assert (total, n) == (10.0, 3)
    with pytest.raises(ValueError, match="nothing to aggregate"):
        robust.aggregate_payloads(like, [({"x": like}, 0.0)], "trimmed_mean")


@pytest.mark.parametrize("rule", ROBUST)
@pytest.mark.parametrize("methods", [("int8",) * 5, ("none",) * 5, ("none", "int8", "none", "int8", "int8")])
def test_store_path_equals_in_memory_path_bit_for_bit(tmp_path, rule, methods):
    store = Store(tmp_path, read_budget_bytes=4096)  # tiny budget: every leaf read on its own
    like = make_params(0)
    tokens = [100, 250, 0, 50, 400]  # s2 has weight 0: neither path aggregates it
    payloads, manifests = [], {}
    for k, (method, w) in enumerate(zip(methods, tokens)):
        payloads.append(payload_for(make_params(10 + k), method))
        store.write_update(2, f"s{k}", payloads[-1], {"tokens": w})
        manifests[f"s{k}"] = validate(store, f"s{k}", 2, like, method)
    weights = {f"s{k}": float(w) for k, w in enumerate(tokens)}
    expected, total, n = robust.aggregate_payloads(like, zip(payloads, tokens), rule, 0.25)
    assert (total, n) == (800.0, 5)
    got, stats = store_aggregate.stream_robust_aggregate(
        store, 2, weights, like, rule=rule, trim_fraction=0.25, return_stats=True
    )
    got2 = store_aggregate.stream_aggregate(
        store, 2, weights, like, rule=rule, trim_fraction=0.25, manifests=manifests, verify_sha256=True
    )
    assert stats["silos"] == 4 and stats["reads"] == len(jax.tree.leaves(like))  # one read item per leaf
    assert stats["bytes_read"] == sum(manifests[s]["bytes"] for s in weights if weights[s] > 0)
    mean = store_aggregate.stream_aggregate(store, 2, weights, like, rule="mean")
    decoded = [compression.decompress(p, like) for p, w in zip(payloads, tokens) if w > 0]
    for i, (e, g, g2, m) in enumerate(zip(_leaves(expected), _leaves(got), _leaves(got2), _leaves(mean))):
        assert g.dtype == np.float32 and g.shape == e.shape
        np.testing.assert_array_equal(g, e)  # one kernel, the same silos in the same order
        np.testing.assert_array_equal(g2, e)
        values = np.stack([_leaves(d)[i] for d in decoded])
        if rule == "median":  # and it is the rule: 4 silos, the mean of the two middle values
            np.testing.assert_array_equal(g, np.median(values, axis=0))
        else:  # 0.25 x 4 silos: one dropped at each end
            np.testing.assert_allclose(
                g, _numpy_trimmed_mean(values, 1), rtol=0, atol=2 * 2.0**-23 * np.abs(values).max()
            )
        if g.size > 1:
            assert not np.array_equal(g, m)  # not the token-weighted mean


def test_a_chunk_swapped_after_validation_is_caught_by_the_median_read(tmp_path):
    store = Store(tmp_path, codec="none")
    like = make_params(0)
    manifests = {}
    for k in range(3):
        store.write_update(1, f"s{k}", payload_for(make_params(20 + k), "none"), {"tokens": 3})
        manifests[f"s{k}"] = validate(store, f"s{k}", 1, like, "none")
    weights = {f"s{k}": 3.0 for k in range(3)}
    store_aggregate.stream_robust_aggregate(
        store, 1, weights, like, rule="median", manifests=manifests, verify_sha256=True
    )
    # s1's chunks replaced by s2's after validation: valid zarr, other data
    for src, dst in zip(
        chunk_files(store, 1, "s2", "blocks/1/w/x"), chunk_files(store, 1, "s1", "blocks/1/w/x")
    ):
        shutil.copyfile(src, dst)
    expect_rejection(
        lambda: store_aggregate.stream_robust_aggregate(
            store, 1, weights, like, rule="median", manifests=manifests, verify_sha256=True
        ),
        "s1",
        1,
        "'blocks/1/w/x'",
        "changed since validation",
    )
    victim = max(chunk_files(store, 1, "s0", "embed/x"), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(5)
    expect_rejection(
        lambda: store_aggregate.stream_robust_aggregate(store, 1, weights, like, rule="trimmed_mean"),
        "s0",
        1,
        "'embed'",
        "cannot be read",
    )


def test_the_aggregator_drops_a_swapped_update_and_steps_on_the_median(small_corpus, tmp_path):
    """The deployment's round under aggregation=median: validation, the robust read re-hashing
    (a silo changed after validation is dropped, the round recomputed), then the outer step."""
    config, _ = make_config(small_corpus, tmp_path, rounds=1)
    config.federation.update(dict(compression="none", aggregation="median"))
    agg = deploy.Aggregator(config, str(tmp_path / "store"), str(tmp_path / "agg"))
    try:
        agg.start_or_resume()
        server, meta = deploy.read_server(agg.fed, agg.store, 0, agg.trust)
        theta = jax.device_get(server.params)
        cap, base = agg.fed.token_cap, meta["params_sha256"]  # an update is bound to its global
        for silo, value, tokens in (("code", 0.01, cap), ("lines", 0.03, cap / 4), ("prose", 0.05, cap)):
            delta = jax.tree.map(lambda x: np.full(x.shape, value, np.float32), theta)
            payload = jax.device_get(compression.compress(delta, None, "none")[0])
            manifest = {"round": 0, "silo": silo, "tokens": tokens, "loss": 5.0, "base_global_sha256": base}
            agg.store.write_update(0, silo, payload, manifest)
        validate_update = agg.store.validate_update

        def validate_then_swap(r, silo, *args, **kwargs):
            manifest = validate_update(r, silo, *args, **kwargs)
            if silo == "prose":
                root = str(agg.store.layout.local("updates/0"))
                for src in glob.glob(os.path.join(root, "lines", "**", "c", "**"), recursive=True):
                    if os.path.isfile(src):
                        shutil.copyfile(
                            src, src.replace(os.sep + "lines" + os.sep, os.sep + "prose" + os.sep)
                        )
            return manifest

        agg.store.validate_update = validate_then_swap
        server, row = agg.close_round(0, server, meta)
    finally:
        agg.store.close()
    assert row["accepted"] == ["code", "lines"]
    assert "changed since validation" in row["rejected"]["prose"]
    # median of {0.01, 0.03} = 0.02 (the token-weighted mean would be 0.014); FedAvg: θ − Δ
    median = np.float32(0.5) * np.float32(0.01) + np.float32(0.5) * np.float32(0.03)
    for got, want in zip(_leaves(server.params), _leaves(theta)):
        np.testing.assert_array_equal(got, want - median)


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("aggregation", "mode", "federation.aggregation must be one of"),
        ("aggregation", "Median", "federation.aggregation must be one of"),
        ("trim_fraction", 0.5, "federation.trim_fraction"),
        ("trim_fraction", -0.1, "federation.trim_fraction"),
        ("trim_fraction", "0.1", "federation.trim_fraction"),
    ],
)
def test_config_errors_name_the_field(field, value, words):
    fed = federation.default_federation_config().to_dict()
    assert (fed["aggregation"], fed["trim_fraction"]) == ("mean", 0.1)
    federation.check_config(fed)
    fed[field] = value
    with pytest.raises(ValueError, match=words):
        federation.check_config(fed)


def test_train_with_the_median_finishes_with_finite_loss(small_corpus, tmp_path, monkeypatch):
    calls = []
    reduce_leaf = robust.reduce_leaf

    def spy(rule, payload_leaves, *args):
        calls.append((rule, len(payload_leaves)))
        return reduce_leaf(rule, payload_leaves, *args)

    monkeypatch.setattr(robust, "reduce_leaf", spy)
    config = fed_config(small_corpus, rounds=2, aggregation="median")
    out = simulation.train(config, str(tmp_path / "median"))
    assert out["aggregation"] == "median" and int(out["server"].round) == 2
    assert np.isfinite(out["val"]["pooled"]["loss"])
    for x in _leaves(out["server"].params):
        assert np.all(np.isfinite(x))
    n_leaves = len(jax.tree.leaves(out["server"].params))
    assert calls == [("median", 3)] * (2 * n_leaves)  # every leaf of both rounds, 3 silos each
