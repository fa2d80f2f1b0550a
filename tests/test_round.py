"""The one round: a node on its own (a federation of federations), chunked local training, progress."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lm import compression
from fedjax_lm import federation
from fedjax_lm import node
from fedjax_lm import outer
from tests.test_simulation import fed_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(8, 4)) * scale, jnp.float32),
        "b": jnp.asarray(rng.normal(size=(4,))),
    }


def _payload(delta):
    return compression.compress(delta, None, "none")[0]


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_a_tree_of_fedavg_nodes_equals_the_flat_federation():
    """Hierarchical FedAvg with token weights is flat FedAvg over the leaves (HierFAVG, one round)."""
    algo = outer.OuterAlgorithm(outer.default_outer_config("fedavg"))
    theta = _tree(0)
    silos = {f"s{i}": (_tree(10 + i, 0.1), 100.0 * (i + 1)) for i in range(5)}  # Δ_k, tokens_k
    res = node.node_round(algo, algo.init(theta), ((_payload(d), w) for d, w in silos.values()))
    flat, diag = res.state, res.diagnostics
    assert diag["silos"] == 5 and diag["tokens"] == 1500.0

    groups = [["s0", "s1"], ["s2", "s3", "s4"]]
    uploads = []
    for group in groups:  # each sub-federation starts from the root's params (its anchor)
        start = algo.init(theta)
        res = node.node_round(
            algo, start, ((_payload(silos[s][0]), silos[s][1]) for s in group), anchor=theta
        )
        assert res.weight == sum(silos[s][1] for s in group)
        # the node's update upward is its own pseudo-gradient, anchor - θ_node, which for a FedAvg
        # node is the token-weighted mean of its children's Δ
        want = jax.tree.map(
            lambda *ds: sum(w * d for w, d in zip([silos[s][1] for s in group], ds)) / res.weight,
            *[silos[s][0] for s in group],
        )
        for a, b in zip(_leaves(compression.decompress(res.to_parent, theta)), _leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        uploads.append((res.to_parent, res.weight))
    root = node.node_round(algo, algo.init(theta), uploads)
    assert root.to_parent is None and root.weight == 1500.0
    for a, b in zip(_leaves(root.state.params), _leaves(flat.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_node_compresses_its_upload_with_error_feedback():
    algo = outer.OuterAlgorithm(outer.default_outer_config("diloco"))
    theta = _tree(1)
    kids = [(_payload(_tree(20, 0.01)), 10.0), (_payload(_tree(21, 0.01)), 30.0)]
    res = node.node_round(algo, algo.init(theta), kids, anchor=theta, method="int8", block_size=4)
    exact = outer.pseudo_gradient(theta, res.state.params)
    decoded = compression.decompress(res.to_parent, theta)
    # int8 payload + the kept residual reconstruct the node's exact pseudo-gradient
    for d, e, x in zip(_leaves(decoded), _leaves(res.error), _leaves(exact)):
        np.testing.assert_allclose(d + e, x, rtol=1e-6, atol=1e-7)
        assert np.abs(e).max() > 0  # int8 really lost something that feedback keeps
    assert set(res.to_parent["w"]) == {"q", "scale"}


@pytest.mark.parametrize(
    "h,every,want",
    [(32, 0, 32), (3, 0, 3), (500, 0, 100), (128, 0, 32), (1024, 0, 128), (12, 5, 4), (7, 2, 1), (8, 100, 8)],
)
def test_report_chunk_divides_h(h, every, want):
    assert federation.report_chunk(h, every) == want


def test_chunked_local_training_equals_one_scan_and_reports_progress(small_corpus):
    fed = federation.Federation(
        fed_config(small_corpus, "H=6,rounds=2", report_every=2, compression="int8"), ["a", "b"]
    )
    assert fed.chunk == 2
    server = fed.init_server(0)
    private = fed.fresh_private(server.params)
    toks = np.random.default_rng(0).integers(0, 512, size=(6, 4, 33), dtype=np.int32)
    batches = {"inputs": toks[..., :-1], "targets": toks[..., 1:]}
    seen = []
    out = fed.train_silo(
        server.params, private, batches, 1, lambda done, m: seen.append((done, m["loss"].copy()))
    )
    assert [d for d, _ in seen] == [2, 4, 6]
    np.testing.assert_array_equal(np.concatenate([m for _, m in seen]), out.metrics["loss"])
    assert out.metrics["loss"].shape == (6,) and out.metrics["tokens"].sum() == 6 * 4 * 32
    # the same round as one pure function (one scan of H steps)
    s = fed.silo
    one = jax.jit(fed.client_round_fn())
    with jax.set_mesh(s.mesh):
        ref = one(
            server.params, private["opt_state"], private["error"], fed.step0(1), s.put_batch(batches, ndim=3)
        )
    np.testing.assert_allclose(np.asarray(ref.metrics["loss"]), out.metrics["loss"], rtol=1e-6)
    for a, b in zip(_leaves(ref.opt_state), _leaves(out.opt_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # round 1's steps are steps 6..11 of the inner schedule, not 0..5
    want_lr = [float(s.schedule(i)) for i in range(6, 12)]
    np.testing.assert_allclose(out.metrics["lr"], want_lr, rtol=1e-6)
    assert want_lr != [float(s.schedule(i)) for i in range(6)]


def test_fresh_private_state_is_placed_like_a_restored_one(small_corpus):
    """Round 0 (fresh moments) and round 1 (restored) must feed the client the same input types,
    or every silo compiles its client twice: same sharding, committed, same dtype, no weak type."""
    fed = federation.Federation(fed_config(small_corpus), ["a", "b"])
    fresh = fed.fresh_private(fed.init_server(0).params)
    abstract = fed.abstract_private()
    assert set(abstract) == {"opt_state", "error"}
    for key in abstract:
        got, want = jax.tree.leaves(fresh[key]), jax.tree.leaves(abstract[key])
        assert len(got) == len(want)
        for x, a in zip(got, want):
            assert x.sharding == a.sharding and x.committed, (key, x.sharding, a.sharding)
            assert x.dtype == a.dtype and not x.weak_type
