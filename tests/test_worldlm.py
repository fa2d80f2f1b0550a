"""WorldLM's parts as defined in fedjax_lm/worldlm.py: key layers, attention aggregation, residual embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lm import model as model_lib
from fedjax_lm import sharding as sharding_lib
from fedjax_lm import worldlm


def layers(seed, scale=1.0, like=None):
    k = jax.random.split(jax.random.key(seed), 2)
    base = like or {"lm_head/kernel": jnp.zeros((8, 16)), "final_norm/scale": jnp.zeros((8,))}
    return {
        name: x + scale * jax.random.normal(k[i], x.shape) for i, (name, x) in enumerate(sorted(base.items()))
    }


def test_attention_weights_sum_to_one_and_favour_the_closest_child():
    parent = layers(0)
    near = {n: x + 0.01 * jnp.ones_like(x) for n, x in parent.items()}
    far = {n: x + 1.0 * jnp.ones_like(x) for n, x in parent.items()}
    mid = {n: x + 0.3 * jnp.ones_like(x) for n, x in parent.items()}
    w = worldlm.attention_weights(parent, [far, near, mid], temperature=0.1)
    for a in w.values():
        assert a.shape == (3,)
        np.testing.assert_allclose(float(a.sum()), 1.0, rtol=1e-6)
        assert int(jnp.argmax(a)) == 1 and a[1] > a[2] > a[0]
    hot = worldlm.attention_weights(parent, [far, near], temperature=1e-4)["lm_head/kernel"]
    cold = worldlm.attention_weights(parent, [far, near], temperature=1e4)["lm_head/kernel"]
    np.testing.assert_allclose(np.asarray(hot), [0.0, 1.0], atol=1e-6)  # T -> 0: the closest alone
    np.testing.assert_allclose(np.asarray(cold), [0.5, 0.5], atol=1e-3)  # T -> inf: the plain mean
    with pytest.raises(ValueError, match="temperature must be > 0"):
        worldlm.attention_weights(parent, [near], temperature=0.0)


def test_attention_aggregate_is_the_weighted_mean_and_residuals_cancel_under_its_weights():
    parent = layers(0)
    kids = [layers(i, scale=0.1 * i, like=parent) for i in (1, 2, 3)]
    new, w = worldlm.attention_aggregate(parent, kids, temperature=0.5)
    for name in parent:
        want = sum(w[name][i] * kids[i][name] for i in range(3))
        np.testing.assert_allclose(np.asarray(new[name]), np.asarray(want), rtol=1e-5, atol=1e-6)
    res = worldlm.residuals(new, kids)
    for name in parent:
        assert all(r[name].shape == parent[name].shape for r in res)
        cancel = sum(w[name][i] * res[i][name] for i in range(3))
        np.testing.assert_allclose(np.asarray(cancel), 0.0, atol=1e-5)
    half, _ = worldlm.attention_aggregate(parent, kids, temperature=0.5, step=0.5)
    for name in parent:  # eta = 0.5: halfway from k_p to the weighted mean
        np.testing.assert_allclose(
            np.asarray(half[name]), np.asarray((parent[name] + new[name]) / 2), rtol=1e-5, atol=1e-6
        )


def test_residual_embeddings_have_the_key_shapes_and_share_only_the_siblings():
    parent = layers(0)
    kids = [layers(i, scale=0.2, like=parent) for i in (1, 2)]
    new, _ = worldlm.attention_aggregate(parent, kids, temperature=1.0)
    res = worldlm.residuals(new, kids)
    emb = worldlm.residual_embeddings(kids, res, temperature=1.0)
    for c, s in ((0, 1), (1, 0)):  # two children: each receives its sibling's residual
        for name in parent:
            assert emb[c][name].shape == parent[name].shape
            np.testing.assert_allclose(np.asarray(emb[c][name]), np.asarray(res[s][name]), rtol=1e-6)
    back = worldlm.children_key_layers(new, res, emb, gamma=0.0)  # gamma 0: each child its own layers
    for c in range(2):
        for name in parent:
            np.testing.assert_allclose(np.asarray(back[c][name]), np.asarray(kids[c][name]), atol=1e-6)
    alone = worldlm.residual_embeddings(kids[:1], res[:1], temperature=1.0)
    assert all(float(jnp.abs(x).max()) == 0 for x in alone[0].values())  # nothing to share


def test_key_mask_selects_leaves_by_path_and_names_a_pattern_that_matches_nothing():
    config = model_lib.ModelConfig(
        vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, scan_layers=False
    )
    params = sharding_lib.unbox(jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0))))
    mask = worldlm.key_mask(params, ["lm_head/.*", "layers_1/.*"])
    picked = [p for p, m in zip(worldlm.leaf_paths(params), jax.tree.leaves(mask)) if m]
    assert "lm_head/kernel" in picked and all(p.startswith(("lm_head/", "layers_1/")) for p in picked)
    assert not any(p.startswith("layers_0/") for p in picked)
    real = model_lib.init_params(config, jax.random.key(0))
    real = sharding_lib.unbox(real)
    keys = worldlm.key_layers(real, mask)
    assert set(keys) == set(picked)
    changed = worldlm.with_key_layers(real, {n: x + 1 for n, x in keys.items()})
    np.testing.assert_array_equal(
        np.asarray(changed["lm_head"]["kernel"]), np.asarray(real["lm_head"]["kernel"]) + 1
    )
    np.testing.assert_array_equal(
        np.asarray(changed["embed"]["embedding"]), np.asarray(real["embed"]["embedding"])
    )
    with pytest.raises(ValueError, match=r"pattern 'lm_haed/\.\*' matches no parameter"):
        worldlm.key_mask(params, ["lm_haed/.*"])
