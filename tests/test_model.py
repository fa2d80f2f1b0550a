"""Tests of fedjax_lm.model: shapes, causality, a hand-written reference forward,
scan/unscanned equivalence, logical axis names, parameter and FLOP counts."""

import os
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import presets
from fedjax_lm import model

TINY = model.ModelConfig(
    vocab_size=97, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=80, max_seq_len=64
)


def random_params(config: model.ModelConfig, seed: int = 0):
    """Plain params giving O(1) activations (the 0.02 init gives logits ~0, where a wrong
    model could still pass a tolerance test)."""
    c = config
    fan_in = {"out": c.n_heads * c.head_dim, "down": c.d_ff}
    shapes = nn.meta.unbox(jax.eval_shape(model.init_params, c, jax.random.key(0)))
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for (path, leaf), key in zip(leaves, keys):
        layer, name = path[-2].key, path[-1].key
        noise = jax.random.normal(key, leaf.shape, jnp.float32)
        if name == "scale":
            out.append(1.0 + 0.2 * noise)
        elif name == "embedding":
            out.append(noise)
        else:
            out.append(noise / math.sqrt(fan_in.get(layer, c.d_model)))
    return jax.tree.unflatten(treedef, out)


@jax.jit  # ModelConfig is a static pytree: it passes through jit as an argument.
def apply(config, params, tokens):
    return model.Decoder(config).apply({"params": params}, tokens)


init_params = jax.jit(model.init_params)


def tokens_for(config, batch=2, length=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, config.vocab_size)


@jax.jit
def reference_forward(config, params, tokens):
    """Llama forward written out with jnp: rotate_half RoPE on full-width cos/sin tables,
    GQA by repeating kv heads, an explicit causal mask and softmax."""
    c = config
    H, G, K = c.n_heads, c.n_kv_heads, c.head_dim
    B, L = tokens.shape

    def rms(x, w):
        return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + c.norm_eps) * w

    def rotate_half(x):
        return jnp.concatenate([-x[..., K // 2 :], x[..., : K // 2]], -1)

    inv_freq = 1.0 / c.rope_theta ** (np.arange(0, K, 2) / K)
    freqs = np.arange(L)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], -1)  # L x K
    cos, sin = jnp.asarray(np.cos(emb))[:, None, :], jnp.asarray(np.sin(emb))[:, None, :]
    mask = np.tril(np.ones((L, L), bool))

    x = params["embed"]["embedding"][tokens]
    for i in range(c.n_layers):
        p = jax.tree.map(lambda a: a[i], params["layers"])
        h = rms(x, p["attn_norm"]["scale"])
        q = jnp.einsum("bld,dhk->blhk", h, p["attn"]["q"]["kernel"])
        k = jnp.einsum("bld,dgk->blgk", h, p["attn"]["k"]["kernel"])
        v = jnp.einsum("bld,dgk->blgk", h, p["attn"]["v"]["kernel"])
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = jnp.repeat(k, H // G, axis=2), jnp.repeat(v, H // G, axis=2)
        s = jnp.einsum("blhk,bmhk->bhlm", q, k) / math.sqrt(K)
        s = jnp.where(mask, s, -jnp.inf)
        a = jnp.exp(s - s.max(-1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        o = jnp.einsum("bhlm,bmhk->blhk", a, v)
        x = x + jnp.einsum("blhk,hkd->bld", o, p["attn"]["out"]["kernel"])
        h = rms(x, p["mlp_norm"]["scale"])
        g = h @ p["mlp"]["gate"]["kernel"]
        x = x + (g * jax.nn.sigmoid(g) * (h @ p["mlp"]["up"]["kernel"])) @ p["mlp"]["down"]["kernel"]
    x = rms(x, params["final_norm"]["scale"])
    if c.tie_embeddings:
        return x @ params["embed"]["embedding"].T
    return x @ params["lm_head"]["kernel"]


def unstack(params, n_layers):
    """Scanned params -> the unscanned layout (layers_0, layers_1, ...)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda a: a[i], params["layers"])
    return out


def test_output_shape_and_dtype():
    params = init_params(TINY, jax.random.key(0))
    logits = apply(TINY, params, tokens_for(TINY, 3, 10))  # boxed params apply directly
    assert logits.shape == (3, 10, TINY.vocab_size)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


def test_param_tree_names_are_readable():
    params = nn.meta.unbox(init_params(TINY, jax.random.key(0)))
    c = TINY
    assert params["embed"]["embedding"].shape == (c.vocab_size, c.d_model)
    assert params["layers"]["attn"]["q"]["kernel"].shape == (2, c.d_model, c.n_heads, c.head_dim)
    assert params["layers"]["attn"]["k"]["kernel"].shape == (2, c.d_model, c.n_kv_heads, c.head_dim)
    assert params["layers"]["attn"]["out"]["kernel"].shape == (2, c.n_heads, c.head_dim, c.d_model)
    assert params["layers"]["mlp"]["down"]["kernel"].shape == (2, c.d_ff, c.d_model)
    assert params["layers"]["attn_norm"]["scale"].shape == (2, c.d_model)
    assert params["final_norm"]["scale"].shape == (c.d_model,)
    assert params["lm_head"]["kernel"].shape == (c.d_model, c.vocab_size)


@pytest.mark.parametrize("tie", [False, True])
def test_matches_reference_forward(tie):
    config = dataclasses.replace(TINY, tie_embeddings=tie)
    params = random_params(config)
    tokens = tokens_for(config, 2, 64)  # 64 = 4 query blocks of 16 in causal_attention
    got = apply(config, params, tokens)
    want = reference_forward(config, params, tokens)
    assert float(jnp.std(want)) > 0.3  # activations are O(1): the tolerance is meaningful
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_causal():
    params = random_params(TINY)
    tokens = tokens_for(TINY, 2, 12)
    t = 7
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % TINY.vocab_size)
    a, b = apply(TINY, params, tokens), apply(TINY, params, changed)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert np.all(np.abs(a[:, t:] - b[:, t:]).max(-1) > 1e-3)


@pytest.mark.parametrize("length", [64, 24])  # 4 query blocks of 16; one block
def test_blocked_attention_equals_one_causal_call(length):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, length, 4, 8))
    k, v = (jax.random.normal(key, (2, length, 2, 8)) for key in (kk, kv))

    def one_call(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    cotangent = jax.random.normal(jax.random.key(1), q.shape)

    @jax.jit
    def value_and_vjp(q, k, v):
        return (
            model.causal_attention(q, k, v),
            one_call(q, k, v),
            jax.vjp(model.causal_attention, q, k, v)[1](cotangent),
            jax.vjp(one_call, q, k, v)[1](cotangent),
        )

    out, want_out, got, want = value_and_vjp(q, k, v)
    np.testing.assert_allclose(out, want_out, atol=1e-6, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), got, want)


def test_rope_scores_depend_on_relative_position_only():
    K = 16
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, K))
    cos, sin = model.rope_tables(40, K, 10000.0)

    def score(m, n):  # <rope(q at position m), rope(k at position n)>
        qm = model.apply_rope(q, cos[m : m + 1], sin[m : m + 1])
        kn = model.apply_rope(k, cos[n : n + 1], sin[n : n + 1])
        return float(jnp.sum(qm * kn))

    assert score(5, 2) == pytest.approx(score(30, 27), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_scan_and_unscanned_agree():
    scanned = random_params(TINY)
    unscanned_config = dataclasses.replace(TINY, scan_layers=False)
    restacked = unstack(scanned, TINY.n_layers)
    init_unscanned = nn.meta.unbox(init_params(unscanned_config, jax.random.key(0)))
    assert jax.tree.structure(init_unscanned) == jax.tree.structure(restacked)
    assert jax.tree.map(jnp.shape, init_unscanned) == jax.tree.map(jnp.shape, restacked)
    tokens = tokens_for(TINY)
    want = apply(TINY, scanned, tokens)
    np.testing.assert_allclose(apply(unscanned_config, restacked, tokens), want, atol=1e-6, rtol=1e-6)
    unrolled = dataclasses.replace(TINY, scan_unroll=TINY.n_layers)  # same params, no loop
    assert jax.tree.map(jnp.shape, nn.meta.unbox(init_params(unrolled, jax.random.key(0)))) == jax.tree.map(
        jnp.shape, scanned
    )
    np.testing.assert_allclose(apply(unrolled, scanned, tokens), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("remat,unroll", [("minimal", 1), ("full", 1), ("full", 2)])
def test_remat_gives_same_gradients(remat, unroll):
    params = random_params(TINY)
    tokens = tokens_for(TINY, 2, 32)

    @jax.jit
    def grads(config):
        return jax.grad(lambda p: jnp.mean(apply(config, p, tokens) ** 2))(params)

    want = grads(TINY)
    got = grads(dataclasses.replace(TINY, remat=remat, scan_unroll=unroll))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), got, want)


def test_tied_embeddings_have_no_lm_head():
    tied = dataclasses.replace(TINY, tie_embeddings=True)
    params = nn.meta.unbox(init_params(tied, jax.random.key(0)))
    assert "lm_head" not in params
    assert model.param_count(TINY) - model.param_count(tied) == TINY.vocab_size * TINY.d_model


@pytest.mark.parametrize("scan", [True, False])
def test_every_param_has_logical_axis_names(scan):
    config = dataclasses.replace(TINY, scan_layers=scan)
    boxed = init_params(config, jax.random.key(0))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim, leaf.names
    names = nn.get_partition_spec(boxed)
    layer = names["layers"] if scan else names["layers_0"]
    lead = ("layers",) if scan else ()
    assert tuple(names["embed"]["embedding"]) == ("vocab", "embed")
    assert tuple(layer["attn"]["q"]["kernel"]) == lead + ("embed", "heads", "head_dim")
    assert tuple(layer["attn"]["k"]["kernel"]) == lead + ("embed", "kv_heads", "head_dim")
    assert tuple(layer["attn"]["v"]["kernel"]) == lead + ("embed", "kv_heads", "head_dim")
    assert tuple(layer["attn"]["out"]["kernel"]) == lead + ("heads", "head_dim", "embed")
    assert tuple(layer["mlp"]["gate"]["kernel"]) == lead + ("embed", "mlp")
    assert tuple(layer["mlp"]["up"]["kernel"]) == lead + ("embed", "mlp")
    assert tuple(layer["mlp"]["down"]["kernel"]) == lead + ("mlp", "embed")
    assert tuple(layer["attn_norm"]["scale"]) == lead + ("norm",)
    assert tuple(names["final_norm"]["scale"]) == ("norm",)
    assert tuple(names["lm_head"]["kernel"]) == ("embed", "vocab")


def test_logical_constraints_shard_activations():
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (
        ("batch", "data"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("length", None),
        ("embed", None),
        ("head_dim", None),
        ("layers", None),
        ("norm", None),
    )
    config = dataclasses.replace(TINY, n_heads=4, n_kv_heads=4, d_ff=96, vocab_size=96)
    params = random_params(config)
    tokens = tokens_for(config, batch=4)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fn = jax.jit(lambda p, t: apply(config, p, t))
        hlo = fn.lower(params, tokens).as_text()
        logits = fn(params, tokens)
    assert hlo.count("sharding_constraint") + hlo.count("Sharding") >= 4
    np.testing.assert_allclose(logits, apply(config, params, tokens), atol=1e-5, rtol=1e-5)


def test_param_count_matches_leaves_and_formula():
    c = TINY
    leaves = jax.tree.leaves(nn.meta.unbox(init_params(c, jax.random.key(0))))
    per_layer = (
        c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.d_model * c.d_ff + 2 * c.d_model
    )
    formula = c.n_layers * per_layer + 2 * c.vocab_size * c.d_model + c.d_model
    assert model.param_count(c) == sum(x.size for x in leaves) == formula


def test_7b_param_count_without_allocating():
    before = sum(x.nbytes for x in jax.live_arrays())
    config = model.ModelConfig.from_dict(presets.model_preset("7b"))
    assert model.param_count(config) == 6_738_415_616  # Llama-2-7B
    assert sum(x.nbytes for x in jax.live_arrays()) - before < 1 << 20


def test_flops_per_token_formula():
    c = TINY
    D, H, G, K, F, V = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size
    matmul = c.n_layers * (2 * D * H * K + 2 * D * G * K + 3 * D * F) + D * V
    assert model.flops_per_token(c, 64) == 6 * matmul + 6 * c.n_layers * 64 * H * K
    # Matmul params = all params but the embedding table and the norm scales.
    assert matmul == model.param_count(c) - V * D - (2 * c.n_layers + 1) * D


def test_bfloat16_compute_keeps_float32_params():
    config = dataclasses.replace(TINY, dtype="bfloat16")
    boxed = init_params(config, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(boxed))} == {jnp.dtype("float32")}
    params = random_params(config)
    tokens = tokens_for(config)
    jaxpr = str(jax.make_jaxpr(lambda p: apply(config, p, tokens))(params))
    assert "bf16[" in jaxpr and "preferred_element_type=bfloat16" in jaxpr  # bf16 matmuls
    logits = apply(config, params, tokens)
    assert logits.dtype == jnp.float32
    want = apply(TINY, params, tokens)
    assert float(jnp.max(jnp.abs(logits - want))) < 0.1 * float(jnp.max(jnp.abs(want)))
    grads = jax.jit(jax.grad(lambda p: jnp.mean(apply(config, p, tokens) ** 2)))(params)
    assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_from_dict():
    fields = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=80)
    config = model.ModelConfig.from_dict(ml_collections.ConfigDict(fields))
    assert config == model.ModelConfig(**fields) and config.head_dim == 12
    assert model.ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="n_layer"):
        model.ModelConfig.from_dict({**fields, "n_layer": 3})
    with pytest.raises(ValueError, match="d_ff"):
        model.ModelConfig.from_dict({k: v for k, v in fields.items() if k != "d_ff"})
    with pytest.raises(ValueError, match="n_kv_heads"):
        model.ModelConfig.from_dict({**fields, "n_kv_heads": 3})
    with pytest.raises(ValueError, match="d_model"):
        model.ModelConfig.from_dict({**fields, "d_model": 50})
    with pytest.raises(ValueError, match="vocab_size"):
        model.ModelConfig.from_dict({**fields, "vocab_size": 0})
    with pytest.raises(ValueError, match="remat"):
        model.ModelConfig.from_dict({**fields, "remat": "some"})
    with pytest.raises(ValueError, match="dtype"):
        model.ModelConfig.from_dict({**fields, "dtype": "float64"})


def test_presets():
    for name in presets.MODEL_PRESETS:
        config = model.ModelConfig.from_dict(presets.model_preset(name))
        assert config.n_heads % config.n_kv_heads == 0
    count = lambda name: model.param_count(model.ModelConfig.from_dict(presets.model_preset(name)))
    assert 1e6 <= count("tiny") <= 2e6 and 15e6 <= count("small") <= 30e6
    small = presets.model_preset("small", n_layers=2)
    assert isinstance(small, ml_collections.ConfigDict) and small.n_layers == 2
    with pytest.raises(ValueError, match="tiny"):
        presets.model_preset("huge")
    with pytest.raises(ValueError, match="n_layer"):
        presets.model_preset("tiny", n_layer=2)


def test_every_model_field_can_be_set_from_the_command_line_whatever_the_preset():
    """A preset lists every ModelConfig field (defaults included), so a `--config.model.FIELD` override
    never meets a missing field (it was an AttributeError traceback); head_dim stays derived unless set."""
    import dataclasses
    import subprocess
    import sys

    names = {f.name for f in dataclasses.fields(model.ModelConfig)}
    for name in presets.MODEL_PRESETS:
        assert set(presets.model_preset(name).keys()) == names
    assert model.ModelConfig.from_dict(presets.model_preset("7b")).head_dim == 128  # derived
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(
        [sys.executable, "-m", "fedjax_lm", "compile", "--config", "experiments/centralized.py:size=tiny",
         "--config.model.remat=full", "--config.model.head_dim=64", "--config.model.dtype=bfloat16"],
        capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert r.returncode == 0 and "per-device peak estimate" in r.stdout, r.stderr[-2000:]


def test_remat_policies_order_the_compiled_steps_memory():
    """A scaled-down preset compiled with each remat policy: XLA's memory analysis orders them
    full < minimal < none (the temporaries the backward pass keeps)."""
    from experiments import common
    from fedjax_lm import silo as silo_lib

    temps = {}
    for remat in ("none", "minimal", "full"):
        c = common.base_config(size="small", seq_len=256, batch_size=8, steps=10)
        c.model.update(
            dict(n_layers=2, d_model=256, n_heads=4, n_kv_heads=4, d_ff=512, remat=remat, scan_unroll=1)
        )
        c.mesh.update(dict(data=1, fsdp=1, tensor=1))
        s = silo_lib.from_config(c, total_steps=10)
        _, compiled = s.compile_train_step(8, 256)
        temps[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert temps["full"] < temps["minimal"] < temps["none"], temps


def test_large_presets_default_to_a_pod_layout():
    """bf16 compute over f32 params with remat (benchmarks/pod_presets.py compiles them on pod-shaped meshes)."""
    for name, per_chip in presets.POD_SEQS_PER_CHIP.items():
        c = presets.model_preset(name)
        assert (c.dtype, c.param_dtype) == ("bfloat16", "float32") and c.remat != "none", name
        for chips, _ in presets.TPU_SLICES.values():
            layout = presets.pod_layout(name, chips)
            assert layout["mesh"] == dict(data=1, fsdp=chips, tensor=1)
            assert layout["batch_size"] == per_chip * chips and layout["seq_len"] == c.max_seq_len
    assert (presets.model_preset("tiny").dtype, presets.model_preset("small").dtype) == ("float32", "float32")
