"""Hugging Face Llama interchange: `export_hf_llama` and `import_hf_llama`.

The `Decoder` in `fedjax_lm.model` is built so that its weights are HF
`LlamaForCausalLM` weights up to a reshape and a transpose (HF stores torch
`Linear` weights as (out, in)); RoPE uses HF's rotate_half convention, so q/k need no
permutation. The mapping, per layer i (our kernel -> HF tensor):

  embed/embedding [V, D]              model.embed_tokens.weight [V, D]
  attn/q/kernel [D, H, K]             model.layers.i.self_attn.q_proj.weight [H*K, D]
  attn/k|v/kernel [D, G, K]           model.layers.i.self_attn.{k,v}_proj.weight [G*K, D]
  attn/out/kernel [H, K, D]           model.layers.i.self_attn.o_proj.weight [D, H*K]
  mlp/gate|up/kernel [D, F]           model.layers.i.mlp.{gate,up}_proj.weight [F, D]
  mlp/down/kernel [F, D]              model.layers.i.mlp.down_proj.weight [D, F]
  attn_norm/scale, mlp_norm/scale     model.layers.i.{input,post_attention}_layernorm.weight
  final_norm/scale                    model.norm.weight
  lm_head/kernel [D, V]               lm_head.weight [V, D]   (absent when tied)
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import flax.linen as nn
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from fedjax_lm.model import ModelConfig

_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Tensors some HF checkpoints carry that hold no learned state.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _layer_map(c: ModelConfig) -> dict[tuple[str, ...], tuple[str, tuple[int, ...], bool]]:
    """Our per-layer param path -> (HF suffix, HF shape, is_linear). Linear = reshape to
    (in, out) then transpose; HF shapes are what torch would hold."""
    D, H, G, K, F = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff
    return {
        ("attn", "q", "kernel"): ("self_attn.q_proj.weight", (H * K, D), True),
        ("attn", "k", "kernel"): ("self_attn.k_proj.weight", (G * K, D), True),
        ("attn", "v", "kernel"): ("self_attn.v_proj.weight", (G * K, D), True),
        ("attn", "out", "kernel"): ("self_attn.o_proj.weight", (D, H * K), True),
        ("mlp", "gate", "kernel"): ("mlp.gate_proj.weight", (F, D), True),
        ("mlp", "up", "kernel"): ("mlp.up_proj.weight", (F, D), True),
        ("mlp", "down", "kernel"): ("mlp.down_proj.weight", (D, F), True),
        ("attn_norm", "scale"): ("input_layernorm.weight", (D,), False),
        ("mlp_norm", "scale"): ("post_attention_layernorm.weight", (D,), False),
    }


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if key not in tree:
            raise ValueError(f"params: missing {'/'.join(path)} (no key {key!r})")
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def hf_config(config: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The config.json of the equivalent HF LlamaForCausalLM."""
    c = config
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "num_hidden_layers": c.n_layers,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }


def _write_atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; an exported model is meant to be shared
    os.replace(tmp, path)


def export_hf_llama(
    params: Any,
    config: ModelConfig,
    out_dir: str,
    *,
    tokenizer_path: str | None = None,
    dtype: str | None = None,
) -> None:
    """Writes config.json + model.safetensors (HF Llama names, torch layout) to out_dir.

    params: boxed or plain `Decoder` params, scanned or not. dtype: storage dtype of
    the tensors ("float32", "bfloat16", "float16"; default config.param_dtype). A
    SentencePiece `.model` tokenizer is copied as tokenizer.model (what LlamaTokenizer
    loads), a `.json` one as tokenizer.json, anything else under its own name.
    """
    c = config
    dtype = dtype or c.param_dtype
    if dtype not in _NP_DTYPES:
        raise ValueError(f"export_hf_llama: dtype must be one of {sorted(_NP_DTYPES)}, got {dtype!r}")
    np_dtype = _NP_DTYPES[dtype]
    params = nn.meta.unbox(params)
    if "params" in params:  # a whole variables dict
        params = params["params"]

    def host(path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
        x = np.asarray(_get(params, path))
        if x.shape != shape:
            raise ValueError(f"params: {'/'.join(path)} has shape {x.shape}, expected {shape}")
        return x

    tensors: dict[str, np.ndarray] = {}

    def put(name: str, x: np.ndarray) -> None:
        tensors[name] = np.ascontiguousarray(x.astype(np_dtype))

    put("model.embed_tokens.weight", host(("embed", "embedding"), (c.vocab_size, c.d_model)))
    put("model.norm.weight", host(("final_norm", "scale"), (c.d_model,)))
    if c.tie_embeddings:
        if "lm_head" in params:
            raise ValueError("params: tie_embeddings=True but params hold an lm_head")
    else:
        put("lm_head.weight", host(("lm_head", "kernel"), (c.d_model, c.vocab_size)).T)

    for path, (suffix, hf_shape, is_linear) in _layer_map(c).items():
        our_shape = _our_shape(c, path)
        if "layers" in params:  # scanned: one stacked leaf per path, fetched once.
            per_layer = list(host(("layers",) + path, (c.n_layers,) + our_shape))
        else:
            per_layer = [host((f"layers_{i}",) + path, our_shape) for i in range(c.n_layers)]
        for i, x in enumerate(per_layer):
            if is_linear:
                x = x.reshape(hf_shape[1], hf_shape[0]).T
            put(f"model.layers.{i}.{suffix}", x)

    os.makedirs(out_dir, exist_ok=True)
    _write_atomic(os.path.join(out_dir, _WEIGHTS), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(hf_config(c, dtype), indent=2) + "\n"
    _write_atomic(os.path.join(out_dir, "config.json"), lambda p: pathlib.Path(p).write_text(text))
    if tokenizer_path is not None:
        name = os.path.basename(tokenizer_path)
        if name.endswith(".model"):
            name = "tokenizer.model"
        elif name.endswith(".json"):
            name = "tokenizer.json"
        _write_atomic(os.path.join(out_dir, name), lambda p: shutil.copyfile(tokenizer_path, p))


def _our_shape(c: ModelConfig, path: tuple[str, ...]) -> tuple[int, ...]:
    D, H, G, K, F = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff
    return {
        ("attn", "q", "kernel"): (D, H, K),
        ("attn", "k", "kernel"): (D, G, K),
        ("attn", "v", "kernel"): (D, G, K),
        ("attn", "out", "kernel"): (H, K, D),
        ("mlp", "gate", "kernel"): (D, F),
        ("mlp", "up", "kernel"): (D, F),
        ("mlp", "down", "kernel"): (F, D),
        ("attn_norm", "scale"): (D,),
        ("mlp_norm", "scale"): (D,),
    }[path]


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig of an HF Llama config.json dict; unsupported features -> ValueError."""
    archs = hf.get("architectures") or []
    if "LlamaForCausalLM" not in archs and hf.get("model_type") != "llama":
        raise ValueError(
            f"config.json: architectures {archs!r} / model_type "
            f"{hf.get('model_type')!r} is not LlamaForCausalLM"
        )
    for field, want in (
        ("hidden_act", "silu"),
        ("attention_bias", False),
        ("mlp_bias", False),
        ("rope_scaling", None),
        ("pretraining_tp", 1),
    ):
        if field in hf and hf[field] != want:
            raise ValueError(f"config.json: unsupported {field}={hf[field]!r} (supported: {want!r})")
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_hidden_layers",
        "vocab_size",
    ):
        if field not in hf:
            raise ValueError(f"config.json: missing field {field!r}")
    fields = dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        head_dim=hf.get("head_dim"),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


class _Reader:
    """Lazy tensor access over model.safetensors or a sharded index."""

    def __init__(self, path: str):
        index = os.path.join(path, _INDEX)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(path, _WEIGHTS)):
            files = [_WEIGHTS]
        else:
            raise ValueError(f"import_hf_llama: no {_WEIGHTS} or {_INDEX} in {path}")
        self._handles = {}
        self.file_of = {}
        for name in files:
            handle = safe_open(os.path.join(path, name), framework="np")
            self._handles[name] = handle
            for key in handle.keys():
                self.file_of[key] = name

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.file_of:
            raise ValueError(f"import_hf_llama: missing tensor {name!r}")
        handle = self._handles[self.file_of[name]]
        got = tuple(handle.get_slice(name).get_shape())
        if got != shape:
            raise ValueError(f"import_hf_llama: tensor {name!r} has shape {got}, expected {shape}")
        return handle.get_tensor(name)


def import_hf_llama(
    path: str, *, scan_layers: bool = True, param_dtype: str = "float32"
) -> tuple[dict, ModelConfig]:
    """Reads an HF Llama directory into plain (unboxed) `Decoder` params and a config."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"import_hf_llama: no config.json in {path}")
    with open(config_path) as f:
        c = config_from_hf(json.load(f), scan_layers=scan_layers, param_dtype=param_dtype)
    reader = _Reader(path)
    np_dtype = _NP_DTYPES[param_dtype]
    D, V = c.d_model, c.vocab_size
    used = set()

    def get(name, shape):
        used.add(name)
        return reader.get(name, shape).astype(np_dtype)

    params: dict[str, Any] = {
        "embed": {"embedding": get("model.embed_tokens.weight", (V, D))},
        "final_norm": {"scale": get("model.norm.weight", (D,))},
    }
    if c.tie_embeddings:
        used.add("lm_head.weight")  # some exports store the tied copy anyway
    else:
        params["lm_head"] = {"kernel": np.ascontiguousarray(get("lm_head.weight", (V, D)).T)}

    for path_, (suffix, hf_shape, is_linear) in _layer_map(c).items():
        layers = []
        for i in range(c.n_layers):
            x = get(f"model.layers.{i}.{suffix}", hf_shape)
            if is_linear:
                x = x.T
            layers.append(np.ascontiguousarray(x.reshape(_our_shape(c, path_))))
        if scan_layers:
            _set(params, ("layers",) + path_, np.stack(layers))
        else:
            for i, x in enumerate(layers):
                _set(params, (f"layers_{i}",) + path_, x)

    unexpected = sorted(k for k in reader.file_of if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ValueError(
            f"import_hf_llama: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    return params, c
