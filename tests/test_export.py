"""Tests of fedjax_lm.export: HF Llama layout checked against an independent numpy
Llama forward that reads nothing but the exported safetensors and config.json."""

import dataclasses
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fedjax_lm import export, model

TINY = model.ModelConfig(
    vocab_size=101,
    d_model=48,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=72,
    max_seq_len=64,
    rope_theta=500.0,
    norm_eps=1e-6,
)


def random_params(config: model.ModelConfig, seed: int = 0):
    """Plain params with O(1) activations and norm scales != 1, so that a transposed or
    misplaced tensor changes the logits by far more than the tolerance."""
    shapes = nn.meta.unbox(jax.eval_shape(model.init_params, config, jax.random.key(0)))
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for (path, leaf), key in zip(leaves, keys):
        noise = jax.random.normal(key, leaf.shape, jnp.float32)
        is_scale = path[-1].key == "scale"
        out.append(1.0 + 0.2 * noise if is_scale else noise / math.sqrt(config.d_model))
    return jax.tree.unflatten(treedef, out)


@jax.jit
def logits_of(config, params, tokens):
    return model.Decoder(config).apply({"params": params}, tokens)


def numpy_llama(path: str, tokens: np.ndarray) -> np.ndarray:
    """HF LlamaForCausalLM forward in float64 numpy, from HF names and conventions only:
    torch Linear weights (out, in), rotate_half RoPE, repeat_kv for GQA."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    w = {k: v.astype(np.float64) for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    H, G = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    K = cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    B, L = tokens.shape

    def rms_norm(x, weight):
        return weight * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps))

    def linear(x, weight):
        return x @ weight.T

    def rotate_half(x):
        x1, x2 = x[..., : K // 2], x[..., K // 2 :]
        return np.concatenate([-x2, x1], -1)

    inv_freq = 1.0 / (cfg["rope_theta"] ** (np.arange(0, K, 2) / K))
    freqs = np.outer(np.arange(L), inv_freq)
    emb = np.concatenate([freqs, freqs], -1)
    cos, sin = np.cos(emb)[None, None], np.sin(emb)[None, None]  # 1 x 1 x L x K

    x = w["model.embed_tokens.weight"][tokens]
    causal = np.triu(np.full((L, L), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"])
        q = linear(h, w[p + "self_attn.q_proj.weight"]).reshape(B, L, H, K).transpose(0, 2, 1, 3)
        k = linear(h, w[p + "self_attn.k_proj.weight"]).reshape(B, L, G, K).transpose(0, 2, 1, 3)
        v = linear(h, w[p + "self_attn.v_proj.weight"]).reshape(B, L, G, K).transpose(0, 2, 1, 3)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # repeat_kv: kv head g serves query heads g * H/G ... (g + 1) * H/G - 1.
        k = np.broadcast_to(k[:, :, None], (B, G, H // G, L, K)).reshape(B, H, L, K)
        v = np.broadcast_to(v[:, :, None], (B, G, H // G, L, K)).reshape(B, H, L, K)
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(K) + causal
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        o = (probs @ v).transpose(0, 2, 1, 3).reshape(B, L, H * K)
        x = x + linear(o, w[p + "self_attn.o_proj.weight"])
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        gate = linear(h, w[p + "mlp.gate_proj.weight"])
        x = x + linear(
            gate / (1 + np.exp(-gate)) * linear(h, w[p + "mlp.up_proj.weight"]), w[p + "mlp.down_proj.weight"]
        )
    x = rms_norm(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return linear(x, head)


@pytest.mark.parametrize("tie", [False, True])
def test_matches_numpy_hf_llama(tmp_path, tie):
    config = dataclasses.replace(TINY, tie_embeddings=tie)
    params = random_params(config)
    export.export_hf_llama(params, config, str(tmp_path))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 16), 0, config.vocab_size))
    want = numpy_llama(str(tmp_path), tokens)
    assert want.std() > 0.3  # O(1) logits: the tolerance below is meaningful
    np.testing.assert_allclose(logits_of(config, params, tokens), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_round_trip_gives_identical_logits(tmp_path, scan_layers):
    params = random_params(TINY)
    export.export_hf_llama(params, TINY, str(tmp_path))
    imported, config = export.import_hf_llama(str(tmp_path), scan_layers=scan_layers)
    assert config == dataclasses.replace(TINY, scan_layers=scan_layers)
    want_shapes = nn.meta.unbox(jax.eval_shape(model.init_params, config, jax.random.key(0)))
    assert jax.tree.map(np.shape, imported) == jax.tree.map(lambda x: x.shape, want_shapes)
    if not scan_layers:  # the same weights in the unscanned layout
        params = {
            **{k: v for k, v in params.items() if k != "layers"},
            **{f"layers_{i}": jax.tree.map(lambda a: a[i], params["layers"]) for i in range(TINY.n_layers)},
        }
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, TINY.vocab_size)
    np.testing.assert_array_equal(logits_of(config, imported, tokens), logits_of(config, params, tokens))


def test_exports_boxed_unscanned_params(tmp_path):
    config = dataclasses.replace(TINY, scan_layers=False)
    boxed = model.init_params(config, jax.random.key(3))
    export.export_hf_llama(boxed, config, str(tmp_path))
    imported, _ = export.import_hf_llama(str(tmp_path), scan_layers=False)
    jax.tree.map(np.testing.assert_array_equal, imported, nn.meta.unbox(boxed))


def test_config_json_and_tensor_layout(tmp_path):
    tokenizer = tmp_path / "spm.model"
    tokenizer.write_bytes(b"not really a sentencepiece model")
    out = tmp_path / "hf"
    export.export_hf_llama(random_params(TINY), TINY, str(out), tokenizer_path=str(tokenizer))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # readable by others
    assert cfg["hidden_size"] == 48 and cfg["intermediate_size"] == 72
    assert cfg["num_attention_heads"] == 4 and cfg["num_key_value_heads"] == 2
    assert cfg["num_hidden_layers"] == 2 and cfg["head_dim"] == 12
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 500.0
    assert cfg["vocab_size"] == 101 and cfg["max_position_embeddings"] == 64
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == "float32"
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.layers.1.self_attn.q_proj.weight"].shape == (48, 48)
    assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (24, 48)
    assert tensors["model.layers.0.self_attn.o_proj.weight"].shape == (48, 48)
    assert tensors["model.layers.0.mlp.gate_proj.weight"].shape == (72, 48)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (48, 72)
    assert tensors["lm_head.weight"].shape == (101, 48)
    assert len(tensors) == 3 + 9 * TINY.n_layers
    assert (out / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_bfloat16_export(tmp_path):
    params = random_params(TINY)
    export.export_hf_llama(params, TINY, str(tmp_path), dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_file(str(tmp_path / "model.safetensors"))["model.norm.weight"].dtype.name == "bfloat16"
    imported, _ = export.import_hf_llama(str(tmp_path))
    np.testing.assert_allclose(imported["final_norm"]["scale"], params["final_norm"]["scale"], rtol=1e-2)


def _rewrite(tmp_path, edit):
    path = str(tmp_path / "model.safetensors")
    tensors = dict(load_file(path))
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    export.export_hf_llama(random_params(TINY), TINY, str(tmp_path))
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        export.import_hf_llama(str(tmp_path))


def test_wrong_shape_is_named(tmp_path):
    export.export_hf_llama(random_params(TINY), TINY, str(tmp_path))

    def transpose(t):
        t["model.layers.0.mlp.down_proj.weight"] = np.ascontiguousarray(
            t["model.layers.0.mlp.down_proj.weight"].T
        )

    _rewrite(tmp_path, transpose)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*\(72, 48\)"):
        export.import_hf_llama(str(tmp_path))


def test_unexpected_tensor_is_named(tmp_path):
    export.export_hf_llama(random_params(TINY), TINY, str(tmp_path))
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(48, np.float32)}))
    with pytest.raises(ValueError, match=r"q_proj\.bias"):
        export.import_hf_llama(str(tmp_path))


@pytest.mark.parametrize(
    "field,value",
    [
        ("architectures", ["MistralForCausalLM"]),
        ("rope_scaling", {"type": "linear", "factor": 2.0}),
        ("attention_bias", True),
    ],
)
def test_unsupported_config_is_named(tmp_path, field, value):
    export.export_hf_llama(random_params(TINY), TINY, str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    if field == "architectures":
        cfg["model_type"] = "mistral"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=field):
        export.import_hf_llama(str(tmp_path))


def test_export_rejects_params_of_another_shape(tmp_path):
    params = random_params(TINY)
    with pytest.raises(ValueError, match=r"embed/embedding.*\(100, 48\)"):
        export.export_hf_llama(params, dataclasses.replace(TINY, vocab_size=100), str(tmp_path))
