"""Secure aggregation: fixed-point ring, Shamir shares, key agreement, masking, dropouts, aborts.

The protocol draws its keys and seeds from os.urandom (as it must), so the statistical test on a
masked update uses a threshold of p < 1e-6 (a false alarm once in a million runs); the PRG itself
is also tested with fixed seeds.
"""

import itertools
import math
import statistics

import jax
import numpy as np
import pytest
from scipy import stats

from fedjax_lm import privacy, ring, secagg, shamir

SPEC = secagg.RoundSpec("run-1", 7, 3, ring.FixedPoint(bound=1.0, max_summands=8))


def _updates(names, seed=0):
    rng = np.random.default_rng(seed)
    return {
        n: {
            "w": rng.uniform(-1, 1, (33, 17)).astype(np.float32),
            "b": [rng.uniform(-1e-3, 1e-3, (5,)).astype(np.float32), np.float32(rng.uniform(-1, 1))],
        }
        for n in names
    }


def _plain_ring_sum(updates, names, fp):
    return ring.ring_sum(ring.encode(updates[n], fp)[0] for n in names)


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------ the sum


@pytest.mark.parametrize("k", [2, 3, 8])
def test_secure_sum_equals_the_plain_sum_exactly(k):
    names = [f"silo-{i}" for i in range(k)]
    fp = ring.FixedPoint(bound=1.0, max_summands=k)
    ups = _updates(names, seed=k)
    out = secagg.simulate_round(ups, threshold=k // 2 + 1, fixed_point=fp)
    assert out.survivors == tuple(names) and out.dropped == ()
    _assert_trees_equal(out.ring_sum, _plain_ring_sum(ups, names, fp))
    # Decoded: within K half-units of the fixed point (+ f32 rounding) of the f64 sum; mean likewise.
    for got, *xs in zip(jax.tree.leaves(out.sum), *(jax.tree.leaves(ups[n]) for n in names)):
        exact = np.sum([np.asarray(x, np.float64) for x in xs], axis=0)
        tol = k * fp.resolution / 2 + np.abs(exact) * 2.0**-24
        assert np.all(np.abs(np.asarray(got, np.float64) - exact) <= tol)
        mean_tol = fp.resolution / 2 + np.abs(exact / k) * 2.0**-24  # half a unit + the f32 rounding
        assert np.all(np.abs(np.asarray(got, np.float64) / k - exact / k) <= mean_tol)
    # The masked inputs themselves are not the encodings, but they sum to the same ring value.
    for n in names:
        assert not np.array_equal(out.masked[n]["w"], ring.encode(ups[n], fp)[0]["w"])


def test_masked_update_is_uniform_and_uncorrelated_with_the_plain_update():
    """A highly structured update (a ramp in [−1, 1]), masked: the top 4 bits of its 2^17 words are
    uniform (chi-square, 15 dof, p > 1e-6) and their signed values are uncorrelated with the plain
    values (|r| < 5/√n, p ≈ 6e-7 under independence)."""
    n = 1 << 17
    fp = ring.FixedPoint(bound=1.0, max_summands=3)
    ramp = np.linspace(-1, 1, n, dtype=np.float32)
    ups = {"a": {"x": ramp}, "b": {"x": np.zeros(n, np.float32)}, "c": {"x": -ramp}}
    out = secagg.simulate_round(ups, threshold=2, fixed_point=fp)
    plain = ring.encode(ups["a"], fp)[0]["x"]
    assert stats.chisquare(np.bincount(plain >> 28, minlength=16)).pvalue < 1e-100  # far from uniform
    masked = out.masked["a"]["x"]
    counts = np.bincount(masked >> 28, minlength=16)
    assert stats.chisquare(counts).pvalue > 1e-6
    r = np.corrcoef(masked.view(np.int32).astype(np.float64), ramp.astype(np.float64))[0, 1]
    assert abs(r) < 5 / math.sqrt(n)


def test_prg_is_deterministic_uniform_and_stream_separated():
    seed = bytes(range(32))
    a = secagg.prg(seed, 0, 1 << 16, np.uint32)
    np.testing.assert_array_equal(a, secagg.prg(seed, 0, 1 << 16, np.uint32))
    assert not np.array_equal(a, secagg.prg(seed, 1, 1 << 16, np.uint32))
    assert not np.array_equal(a, secagg.prg(bytes(32), 0, 1 << 16, np.uint32))
    # A prefix of a longer stream is the shorter stream; uint64 words are pairs of uint32 words.
    np.testing.assert_array_equal(secagg.prg(seed, 0, 10, np.uint32), a[:10])
    np.testing.assert_array_equal(secagg.prg(seed, 0, 5, np.uint64).view(np.uint32), a[:10])
    assert stats.chisquare(np.bincount(a >> 24, minlength=256)).pvalue > 1e-6  # fixed seed: deterministic


# ------------------------------------------------------------------------------ dropouts and aborts


@pytest.mark.parametrize("dropped,silent", [(["s1"], []), (["s0", "s3"], []), ([], ["s2"]), (["s4"], ["s1"])])
def test_survivors_sum_is_recovered_exactly_after_dropouts(dropped, silent):
    """`dropped` never send their masked input (their pairwise masks are removed with the shares of
    their mask keys); `silent` send it but do not answer the unmasking request."""
    names = [f"s{i}" for i in range(5)]
    fp = ring.FixedPoint(bound=1.0, max_summands=5)
    ups = _updates(names, seed=11)
    out = secagg.simulate_round(ups, threshold=3, fixed_point=fp, dropped=dropped, silent=silent)
    survivors = [n for n in names if n not in dropped]
    assert list(out.survivors) == survivors and list(out.dropped) == sorted(dropped)
    _assert_trees_equal(out.ring_sum, _plain_ring_sum(ups, survivors, fp))


def test_below_threshold_aborts_naming_the_round_and_counts():
    names = [f"s{i}" for i in range(5)]
    fp = ring.FixedPoint(bound=1.0, max_summands=5)
    ups = _updates(names)
    with pytest.raises(
        secagg.SecAggAbort,
        match=r"round 7: only 2 of the 3 masked inputs needed arrived \(missing: s0, s1, s2\)",
    ):
        secagg.simulate_round(ups, threshold=3, fixed_point=fp, dropped=["s0", "s1", "s2"], round_idx=7)
    with pytest.raises(
        secagg.SecAggAbort, match="round 7: only 2 of the 3 unmasking responses needed arrived"
    ):
        secagg.simulate_round(
            ups, threshold=3, fixed_point=fp, dropped=["s0"], silent=["s1", "s2"], round_idx=7
        )
    with pytest.raises(secagg.SecAggAbort, match="round 7: only 2 of the 3 silos needed advertised keys"):
        secagg.simulate_round(_updates(names[:2]), threshold=3, fixed_point=fp, round_idx=7)


def _setup(names, spec=SPEC):
    states, public = {}, {}
    for n in names:
        states[n], public[n] = secagg.advertise_keys(n, spec)
    outbox = {u: secagg.share_keys(states[u], public) for u in names}
    return states, public, outbox


def test_unmask_response_refuses_inconsistent_or_repeated_requests():
    names = ["a", "b", "c", "d"]
    states, public, outbox = _setup(names)
    for v in names:
        secagg.receive_shares(states[v], {u: outbox[u][v] for u in names})
    agg = secagg.public_bytes(secagg.new_aggregator_key())
    with pytest.raises(secagg.SecAggAbort, match="do not partition"):
        secagg.unmask_response(states["a"], ["a", "b", "c"], ["c", "d"], agg)  # c in both: b_c and s_c
    with pytest.raises(secagg.SecAggAbort, match="do not partition"):
        secagg.unmask_response(states["a"], ["a", "b", "c"], [], agg)  # d unaccounted for
    with pytest.raises(secagg.SecAggAbort, match="'d' is not a survivor"):
        secagg.unmask_response(states["d"], ["a", "b", "c"], ["d"], agg)
    secagg.unmask_response(states["a"], ["a", "b", "c"], ["d"], agg)
    secagg.unmask_response(states["a"], ["a", "b", "c"], ["d"], agg)  # the same request again: fine
    with pytest.raises(secagg.SecAggAbort, match="already answered"):
        secagg.unmask_response(states["a"], ["a", "b", "c", "d"], [], agg)  # would reveal b_d too


def test_tampered_shares_and_responses_are_detected():
    names = ["a", "b", "c", "d"]
    states, public, outbox = _setup(names)
    # A ciphertext meant for b, delivered to c (or altered), does not authenticate.
    with pytest.raises(secagg.SecAggAbort, match="from 'a' to 'c' fail authentication"):
        secagg.receive_shares(states["c"], {**{u: outbox[u]["c"] for u in names}, "a": outbox["a"]["b"]})
    bad = bytearray(outbox["b"]["d"])
    bad[-1] ^= 1
    with pytest.raises(secagg.SecAggAbort, match="from 'b' to 'd' fail authentication"):
        secagg.receive_shares(states["d"], {**{u: outbox[u]["d"] for u in names}, "b": bytes(bad)})
    # With more than t responses a corrupt share is caught by the consistency check.
    for v in names:
        secagg.receive_shares(states[v], {u: outbox[u][v] for u in names})
    ups = _updates(names)
    masked = {u: secagg.mask_update(states[u], ups[u])[0] for u in names}
    key = secagg.new_aggregator_key()
    responses = {
        v: secagg.open_response(
            key, SPEC, v, secagg.unmask_response(states[v], names, [], secagg.public_bytes(key)), public
        )
        for v in names
    }
    x, y = responses["c"]["b"]["a"]
    responses["c"]["b"]["a"] = [x, format(int(y, 16) ^ 1, "x")]
    with pytest.raises(secagg.SecAggAbort, match="self-mask of 'a': the shares are inconsistent"):
        secagg.unmask(ring.ring_sum(masked.values()), SPEC, public, names, [], responses)
    # A response sealed for another round does not open.
    blob = secagg.unmask_response(states["a"], names, [], secagg.public_bytes(key))
    other = secagg.RoundSpec(SPEC.run_id, SPEC.round + 1, SPEC.threshold, SPEC.fixed_point)
    with pytest.raises(secagg.SecAggAbort, match="fails authentication"):
        secagg.open_response(key, other, "a", blob, public)


# ------------------------------------------------------------------------------ Shamir and seeds


def test_shamir_any_t_subset_reconstructs_and_t_minus_1_do_not():
    rng = np.random.default_rng(3)
    n, t = 7, 4
    for _ in range(3):
        secret = rng.bytes(32)
        shares = shamir.split(secret, n, t)
        assert [s.x for s in shares] == list(range(1, n + 1))
        for k in range(t, n + 1):
            for subset in itertools.combinations(shares, k):
                assert shamir.reconstruct(list(subset)) == secret
        for subset in itertools.combinations(shares, t - 1):
            assert shamir.reconstruct_int(list(subset)) != int.from_bytes(secret, "big")
    shares = shamir.split(bytes(32), 3, 2)
    assert shamir.Share.from_json(shares[0].to_json()) == shares[0]
    with pytest.raises(ValueError, match="repeated x"):
        shamir.reconstruct_int([shares[0], shares[0]])
    with pytest.raises(ValueError, match="1 <= t <= n"):
        shamir.split(bytes(32), 3, 4)


def test_pair_seeds_agree_on_both_sides_and_differ_across_rounds_runs_and_pairs():
    names = ["a", "b", "c"]
    states = {n: secagg.advertise_keys(n, SPEC) for n in names}
    st = {n: s for n, (s, _) in states.items()}
    pub = {n: p for n, (_, p) in states.items()}

    def seed(me, peer, spec=SPEC):
        return secagg.pair_seed(st[me].mask_key, pub[peer].mask, spec, me, peer)

    assert seed("a", "b") == seed("b", "a") and len(seed("a", "b")) == 32
    assert seed("a", "c") == seed("c", "a")
    later = secagg.RoundSpec(SPEC.run_id, SPEC.round + 1, SPEC.threshold, SPEC.fixed_point)
    other_run = secagg.RoundSpec("run-2", SPEC.round, SPEC.threshold, SPEC.fixed_point)
    seeds = [seed("a", "b"), seed("a", "c"), seed("b", "c"), seed("a", "b", later), seed("a", "b", other_run)]
    assert len(set(seeds)) == 5
    # Keys survive their JSON form.
    assert secagg.PublicKeys.from_json(pub["a"].to_json()) == pub["a"]


# ------------------------------------------------------------------------------ fixed point


@pytest.mark.parametrize("ring_bits", [32, 64])
@pytest.mark.parametrize("bound,k", [(1.0, 2), (0.37, 16), (1e4, 5), (1e-6, 100)])
def test_fixed_point_scale_is_the_finest_that_cannot_wrap(ring_bits, bound, k):
    fp = ring.FixedPoint(bound=bound, max_summands=k, ring_bits=ring_bits)
    limit = 2 ** (ring_bits - 1) - 1
    top = int(np.rint(bound * fp.scale))
    assert k * top <= limit < k * int(np.rint(bound * 2.0 ** (fp.frac_bits + 1)))
    # k encodings at +B (and at −B) sum without wrapping.
    for sign in (1.0, -1.0):
        enc, sat = ring.encode({"x": np.full(4, sign * bound)}, fp)
        assert sat == 0 and enc["x"].dtype == fp.dtype
        total = ring.ring_sum([enc] * k)
        assert ring.decode(total, fp, k)["x"][0] == np.float32(sign * k * top * fp.resolution)


def test_encode_saturates_counts_and_refuses_non_finite():
    fp = ring.FixedPoint(bound=1.0, max_summands=4)
    enc, sat = ring.encode({"x": np.array([0.5, 3.0, -7.0], np.float32)}, fp)
    assert sat == 2
    np.testing.assert_array_equal(ring.decode(enc, fp, 1)["x"], [0.5, 1.0, -1.0])
    with pytest.raises(ValueError, match="non-finite"):
        ring.encode({"x": np.array([np.nan])}, fp)
    with pytest.raises(ValueError, match="at most 4"):
        ring.decode(enc, fp, 5)
    assert ring.elementwise_bound(1.0) == 1.0
    z = -statistics.NormalDist().inv_cdf(1e-9 / (2 * 2_000_000))
    assert 8.0 < z < 8.3
    assert ring.elementwise_bound(1.0, 0.1, 2_000_000, tail=1e-9) == pytest.approx(1.0 + 0.1 * z)


def test_distributed_dp_through_secure_aggregation():
    """Silos clip, add their noise share and mask; the securely aggregated sum is the plain sum of
    the noised updates within the fixed-point resolution, and no entry saturates."""
    names = [f"s{i}" for i in range(4)]
    C, sigma, t = 1.0, 1.0, 3
    share_std = privacy.distributed_noise_std(sigma, C, t)
    d = 10_000
    fp = ring.FixedPoint(bound=ring.elementwise_bound(C, share_std, d), max_summands=len(names))
    rng = np.random.default_rng(5)
    released = {}
    for n in names:
        delta = {"w": rng.normal(size=(d,)).astype(np.float32)}
        payload, _, _ = privacy.privatize_update(
            delta, None, C, privacy.noise_key(bytes(32), 0, n), share_std, method="none"
        )
        released[n] = {"w": np.asarray(payload["w"]["x"])}
    out = secagg.simulate_round(released, threshold=t, fixed_point=fp, dropped=["s2"])
    assert all(v == 0 for v in out.saturated.values())
    exact = np.sum([released[n]["w"].astype(np.float64) for n in out.survivors], axis=0)
    assert np.max(np.abs(out.sum["w"] - exact)) <= 3 * fp.resolution / 2 + np.max(np.abs(exact)) * 2.0**-24


def test_check_combination_and_threshold():
    secagg.check_combination("mean", "none", "distributed")
    secagg.check_combination("mean", "none", None)
    with pytest.raises(ValueError, match="federation.aggregation='median' needs every silo's update"):
        secagg.check_combination("median", "none")
    with pytest.raises(ValueError, match="federation.compression='int8' cannot be summed"):
        secagg.check_combination("mean", "int8")
    secagg.check_threshold(5, 8)
    for t, n in [(4, 8), (1, 1), (9, 8)]:
        with pytest.raises(ValueError, match="must satisfy"):
            secagg.check_threshold(t, n)
