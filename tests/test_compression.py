"""Update compression: error bounds, error feedback, real byte counts, edge shapes, jit, sharding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_lm import compression as comp

_compress = jax.jit(comp.compress, static_argnames=("method", "block_size"))
_decompress = jax.jit(comp.decompress)


def _tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(scale * rng.standard_normal((8, 256)), jnp.float32),  # 8 whole blocks
        "odd": jnp.asarray(scale * rng.standard_normal((3, 300)), jnp.float32),  # 900 = 3*256 + 132
        "small": jnp.asarray(scale * rng.standard_normal((5,)), jnp.float32),  # one block of 5
        "scalar": jnp.asarray(scale * rng.standard_normal(), jnp.float32),
    }


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def test_none_is_exact():
    d = _tree(0)
    payload, err = _compress(d, None, method="none")
    for leaf in jax.tree.leaves(payload):
        assert leaf.dtype == jnp.float32
    jax.tree.map(np.testing.assert_array_equal, _decompress(payload, d), d)
    jax.tree.map(lambda e: np.testing.assert_array_equal(e, np.zeros_like(e)), err)


def test_bf16_relative_error_and_residual():
    d = _tree(1)
    payload, err = _compress(d, None, method="bf16")
    for leaf in jax.tree.leaves(payload):
        assert leaf.dtype == jnp.bfloat16
    out = _np(_decompress(payload, d))
    for x, y, e in zip(jax.tree.leaves(_np(d)), jax.tree.leaves(out), jax.tree.leaves(_np(err))):
        assert np.all(np.abs(x - y) <= 2.0**-8 * np.abs(x))
        assert np.any(x != y)  # really rounded
        np.testing.assert_array_equal(e, x - y)  # the residual is what was lost


def test_int8_error_within_half_scale_per_block():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 300)).astype(np.float32)
    x[0, 3] = 500.0  # an outlier only coarsens its own block
    d = {"x": jnp.asarray(x)}
    payload, err = _compress(d, None, method="int8", block_size=256)
    q, scale = np.asarray(payload["x"]["q"]), np.asarray(payload["x"]["scale"])
    n_blocks = math.ceil(x.size / 256)
    assert q.dtype == np.int8 and q.shape == (n_blocks, 256) and scale.shape == (n_blocks,)
    assert np.abs(q).max() <= 127
    blocks = np.pad(x.reshape(-1), (0, n_blocks * 256 - x.size)).reshape(n_blocks, 256)
    np.testing.assert_allclose(scale, np.abs(blocks).max(axis=1) / 127, rtol=1e-7)
    out = np.asarray(_decompress(payload, d)["x"])
    out_blocks = np.pad(out.reshape(-1), (0, n_blocks * 256 - x.size)).reshape(n_blocks, 256)
    # scale/2 per element, up to f32 rounding of x/scale and q*scale (~2**-22 relative).
    assert np.all(np.abs(blocks - out_blocks) <= 0.5 * scale[:, None] * (1 + 2.0**-20))
    assert scale[0] > 100 * scale[1:].max()  # block 0 holds the outlier, the others are unaffected
    # The residual is what the receiver misses, up to one ulp of the largest |x|: under jit,
    # XLA:CPU contracts y - q * scale into an FMA, skipping the product's rounding.
    np.testing.assert_allclose(np.asarray(err["x"]), x - out, rtol=0, atol=np.spacing(np.float32(500.0)))


def test_edge_shapes_zero_leaves_scalars_and_empty():
    d = {
        "zeros": jnp.zeros((3, 300), jnp.float32),
        "scalar": jnp.float32(-0.75),
        "prime": jnp.arange(257, dtype=jnp.float32) - 128.0,
        "empty": jnp.zeros((0, 4), jnp.float32),
        "mixed": jnp.concatenate([jnp.zeros(256), jnp.ones(10)]),  # a zero block next to a live one
    }
    for method in comp.METHODS:
        payload, err = _compress(d, None, method=method)
        out = _decompress(payload, d)
        for x, y, e in zip(jax.tree.leaves(d), jax.tree.leaves(out), jax.tree.leaves(err)):
            assert y.shape == x.shape and y.dtype == jnp.float32
            assert np.all(np.isfinite(y)) and np.all(np.isfinite(e))
        np.testing.assert_array_equal(out["zeros"], 0.0)
        np.testing.assert_array_equal(out["mixed"][:256], 0.0)
        # -0.75, 1.0 and integers up to 128 are exact in bf16 and on the int8 grid of these blocks.
        assert float(out["scalar"]) == -0.75
        np.testing.assert_array_equal(out["mixed"][256:], 1.0)
    payload, _ = _compress(d, None, method="int8")
    np.testing.assert_array_equal(payload["zeros"]["scale"], 0.0)
    np.testing.assert_array_equal(payload["zeros"]["q"], 0)  # zero blocks encode as q = 0, not NaN casts
    assert payload["scalar"]["q"].shape == (1, 1)
    assert payload["prime"]["q"].shape == (2, 256)
    assert payload["empty"]["q"].shape == (0, 1)


@pytest.mark.parametrize("method", ["bf16", "int8"])
def test_error_feedback_telescopes(method):
    rounds = 20
    deltas = [_tree(100 + t, scale=0.01) for t in range(rounds)]
    err = comp.init_error(deltas[0])
    sent = jax.tree.map(lambda x: np.zeros(x.shape, np.float64), deltas[0])
    for d in deltas:
        payload, err = _compress(d, err, method=method)
        sent = jax.tree.map(lambda s, y: s + np.asarray(y, np.float64), sent, _decompress(payload, d))
    true = jax.tree.map(lambda *xs: sum(np.asarray(x, np.float64) for x in xs), *deltas)
    # Σ decoded = Σ Δ − e_T.
    expected = jax.tree.map(lambda t, e: t - np.asarray(e, np.float64), true, err)
    jax.tree.map(lambda s, e: np.testing.assert_allclose(s, e, rtol=0, atol=1e-6), sent, expected)


@pytest.mark.parametrize("method", ["bf16", "int8"])
def test_error_feedback_keeps_drift_bounded(method):
    """The same Δ every round; part of it is below the grid and lost each time without feedback."""
    if method == "bf16":
        delta = {"x": jnp.full((512,), 1.0 + 2.0**-10, jnp.float32)}  # rounds to 1.0 in bf16
        bound = 2.0**-8 * 2.0  # |e| <= one bf16 half-ulp of a value <= 2
    else:
        delta = {"x": jnp.asarray(np.r_[1.0, np.full(255, 1e-3)], jnp.float32)}  # 1e-3 < scale/2
        bound = 1.0 / 127  # |e| <= scale/2 of a block whose max is <= 2
    rounds = 64
    drifts = {}
    for feedback in (True, False):
        err = comp.init_error(delta)
        sent = np.zeros(delta["x"].shape, np.float64)
        for _ in range(rounds):
            payload, new_err = _compress(delta, err if feedback else None, method=method)
            if feedback:
                err = new_err
            sent += np.asarray(_decompress(payload, delta)["x"], np.float64)
        drifts[feedback] = np.abs(rounds * np.asarray(delta["x"], np.float64) - sent).max()
    assert drifts[True] <= bound
    lost_per_round = 2.0**-10 if method == "bf16" else 1e-3
    assert drifts[False] >= 0.99 * rounds * lost_per_round  # grows linearly with the rounds
    assert drifts[False] > 10 * drifts[True]


def test_payload_nbytes_are_the_real_array_bytes():
    d = _tree(3)
    sizes = {"w": 8 * 256, "odd": 900, "small": 5, "scalar": 1}
    raw = 4 * sum(sizes.values())
    assert comp.raw_nbytes(d) == raw
    none, _ = _compress(d, None, method="none")
    bf16, _ = _compress(d, None, method="bf16")
    int8, _ = _compress(d, None, method="int8", block_size=256)
    assert comp.payload_nbytes(none) == raw
    assert comp.payload_nbytes(bf16) == raw // 2
    # int8: per leaf n_blocks * block int8 bytes (padding included) + 4 bytes per block scale.
    expected = (8 * 256 + 4 * 8) + (4 * 256 + 4 * 4) + (5 + 4) + (1 + 4)
    assert comp.payload_nbytes(int8) == expected
    assert comp.payload_nbytes(int8) == sum(x.nbytes for x in jax.tree.leaves(int8))
    # A block-aligned leaf is 4 * 256 / (256 + 4) ~ 3.94x smaller than f32.
    w_only, _ = _compress({"w": d["w"]}, None, method="int8")
    assert comp.raw_nbytes({"w": d["w"]}) / comp.payload_nbytes(w_only) == pytest.approx(4 * 256 / 260)
    # Byte counts from shapes alone, without running the compression.
    abstract = jax.eval_shape(lambda x: comp.compress(x, None, "int8")[0], d)
    assert comp.payload_nbytes(abstract) == expected
    # Other block sizes: 900 elements in blocks of 64 -> 15 blocks.
    odd64, _ = _compress({"odd": d["odd"]}, None, method="int8", block_size=64)
    assert comp.payload_nbytes(odd64) == 15 * 64 + 15 * 4


def test_jit_matches_eager():
    d, e = _tree(4), _tree(5, scale=1e-3)
    for method in comp.METHODS:
        p_eager, e_eager = comp.compress(d, e, method)
        p_jit, e_jit = _compress(d, e, method=method)
        jax.tree.map(np.testing.assert_array_equal, p_jit, p_eager)
        # Residuals may differ by an ulp (XLA fuses q * scale and the subtraction).
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), e_jit, e_eager)
        jax.tree.map(np.testing.assert_array_equal, _decompress(p_jit, d), comp.decompress(p_eager, d))


def test_decompress_checks_payload_against_template():
    d = {"x": jnp.ones((3, 300))}
    payload, _ = comp.compress(d, None, "int8")
    with pytest.raises(ValueError, match="does not fit"):
        comp.decompress(payload, {"x": jnp.ones((3, 400))})
    with pytest.raises(ValueError, match="shape"):
        comp.decompress(comp.compress(d, None, "bf16")[0], {"x": jnp.ones((300, 3))})
    with pytest.raises(ValueError, match="none, bf16, int8"):
        comp.compress(d, None, "fp8")
    # A template of ShapeDtypeStructs is enough.
    out = comp.decompress(payload, jax.eval_shape(lambda: d))
    np.testing.assert_allclose(out["x"], 1.0)


def test_sharded_leaves_keep_their_sharding():
    mesh = jax.make_mesh((8,), ("fsdp",))  # Explicit axes (jax 0.10 default)
    rng = np.random.default_rng(6)
    host = {
        "w": rng.standard_normal((64, 96)).astype(np.float32),  # 768 per shard = 3 whole blocks
        "v": rng.standard_normal((8 * 37,)).astype(np.float32),  # shards split blocks: gathered
    }
    d = {k: jax.device_put(v, NamedSharding(mesh, P("fsdp"))) for k, v in host.items()}
    ref_payload, ref_err = comp.compress(jax.tree.map(jnp.asarray, host), None, "int8")
    payload, err = _compress(d, None, method="int8")
    out = _decompress(payload, d)
    assert payload["w"]["q"].sharding.spec[0] == "fsdp"
    for tree in (err, out):
        for k in host:
            assert tree[k].sharding.is_equivalent_to(d[k].sharding, d[k].ndim), (k, tree[k].sharding)
    jax.tree.map(np.testing.assert_array_equal, payload, ref_payload)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), err, ref_err)


def test_non_finite_values_stay_visible_in_int8_payloads():
    """A NaN/Inf in a block must make its scale non-finite (validators reject it), never vanish."""
    x = np.full((512, 32), 0.01, np.float32)
    x[0, 0] = np.nan
    x[300, 5] = np.inf
    payload, _ = comp.compress({"w": x}, None, "int8")
    scale = np.asarray(payload["w"]["scale"])
    assert np.isnan(scale[0]) and np.isnan(scale[300 * 32 // 256])
    assert np.isfinite(np.delete(scale, [0, 300 * 32 // 256])).all()
