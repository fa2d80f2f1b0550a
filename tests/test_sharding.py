"""Sharded train step: every mesh gives the single-device result, and params are really sharded."""

import jax
import numpy as np
import pytest

from fedjax_lm import model as model_lib
from fedjax_lm import optim
from fedjax_lm import sharding
from fedjax_lm.silo import Silo

CFG = model_lib.ModelConfig(
    vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=8, d_ff=128, max_seq_len=32
)


def _silo(shape, accum=1):
    opt_cfg = optim.default_optim_config()
    opt_cfg.warmup_steps = 0
    opt_cfg.schedule = "constant"
    # Adam's first step is g / (|g| + eps): with eps=1e-8, gradients of ~1e-8 turn the last-bit
    # differences of a different reduction order (data-parallel sums) into ~1% update changes.
    # A larger eps keeps the update Lipschitz in g, so the comparison tests sharding, not Adam.
    opt_cfg.eps = 1e-4
    tx, sched = optim.make_optimizer(opt_cfg, 10)
    mesh = sharding.make_mesh(
        dict(zip(sharding.MESH_AXES, shape)), devices=jax.devices()[: int(np.prod(shape))]
    )
    return Silo(CFG, tx, mesh, schedule=sched, grad_accum=accum)


def _batch(b=8, l=16, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, CFG.vocab_size, size=(b, l + 1), dtype=np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:]}


def _one_step(shape, accum=1):
    silo = _silo(shape, accum)
    state = silo.init_state(jax.random.key(0))
    state, m = silo.train_step(state, silo.put_batch(_batch()))
    return silo, state, jax.device_get(m)


@pytest.fixture(scope="module")
def reference():
    _, state, m = _one_step((1, 1, 1))
    return jax.device_get(state.params), m


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8), (1, 8, 1)])
def test_mesh_matches_single_device(shape, reference):
    ref_params, ref_m = reference
    silo, state, m = _one_step(shape)
    np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], ref_m["grad_norm"], rtol=1e-4)
    got = jax.device_get(state.params)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 2, 4), (1, 1, 8)])
def test_params_are_sharded_as_rules_say(shape):
    silo = _silo(shape)
    state = silo.init_state(jax.random.key(0))
    mesh = silo.mesh
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    logical = jax.tree.leaves(silo.param_logical, is_leaf=lambda x: isinstance(x, tuple))
    assert len(flat) == len(logical)
    rules = dict(sharding.DEFAULT_RULES)
    checked = 0
    for (path, arr), names in zip(flat, logical):
        spec = arr.sharding.spec
        for dim, name in enumerate(names):
            want = rules.get(name)
            want = (want,) if isinstance(want, str) else (want or ())
            want = tuple(a for a in want if mesh.shape[a] > 1)
            got = spec[dim] if dim < len(spec) else None
            got = (got,) if isinstance(got, str) else (got or ())
            if want and arr.shape[dim] % int(np.prod([mesh.shape[a] for a in want])) == 0:
                assert got == want, f"{jax.tree_util.keystr(path)} dim {dim} ({name}): {got} != {want}"
                # each device really holds only its slice
                shard = arr.addressable_shards[0].data
                assert shard.shape[dim] == arr.shape[dim] // int(np.prod([mesh.shape[a] for a in want]))
                checked += 1
    assert checked > 0, "no parameter dimension was sharded on this mesh"
    # optimizer moments follow their params
    mu = jax.tree.leaves(state.opt_state)
    sharded_moments = [
        x for x in mu if hasattr(x, "sharding") and x.ndim >= 2 and any(s for s in x.sharding.spec)
    ]
    assert sharded_moments, "optimizer state was left replicated"


def test_indivisible_dims_fall_back_to_replication():
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=8))
    spec = sharding.logical_to_mesh_spec(
        ("embed", "heads", "head_dim"), (64, 4, 16), mesh, sharding.DEFAULT_RULES
    )
    assert spec == jax.P(None, None, None)  # 4 heads cannot split 8 ways
    spec = sharding.logical_to_mesh_spec(
        ("embed", "heads", "head_dim"), (64, 8, 16), mesh, sharding.DEFAULT_RULES
    )
    assert spec == jax.P(None, "tensor", None)


def test_grad_accumulation_matches_full_batch():
    _, s1, m1 = _one_step((1, 1, 1), accum=1)
    _, s4, m4 = _one_step((1, 1, 1), accum=4)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(s1.params)), jax.tree.leaves(jax.device_get(s4.params))):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_local_train_equals_repeated_steps():
    silo = _silo((2, 1, 1))
    batches = [_batch(seed=i) for i in range(3)]
    s_loop = silo.init_state(jax.random.key(1))
    for b in batches:
        s_loop, _ = silo.train_step(s_loop, silo.put_batch(b))
    s_scan = silo.init_state(jax.random.key(1))
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    s_scan, m = silo.local_train(s_scan, silo.put_batch(stacked, ndim=3))
    assert m["loss"].shape == (3,)
    assert int(s_scan.step) == 3
    for a, b in zip(
        jax.tree.leaves(jax.device_get(s_loop.params)), jax.tree.leaves(jax.device_get(s_scan.params))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_mesh_config_errors():
    assert sharding.mesh_shape(dict(data=2, fsdp=1, tensor=1), 8) == (2, 1, 1)  # a silo may use fewer
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.mesh_shape(dict(data=16, fsdp=1, tensor=1), 8)
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.mesh_shape(dict(dat=8), 8)
    assert sharding.mesh_shape(dict(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="unknown mesh axis"):
        sharding.normalize_rules([("embed", "model")])


def test_aot_compile_reports_memory():
    silo = _silo((1, 8, 1))
    _, compiled = silo.compile_train_step(batch_size=8, seq_len=16)
    mem = compiled.memory_analysis()
    # fsdp=8: each device holds 1/8 of the big matrices (plus replicated norms)
    full = model_lib.param_count(CFG) * 4 * 3  # params + 2 Adam moments, f32
    assert 0 < mem.argument_size_in_bytes < full / 2
