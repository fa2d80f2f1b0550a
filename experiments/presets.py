"""Named model shapes: `model_preset("small", n_layers=4)` -> ml_collections.ConfigDict.

Feed the result to `fedjax_lm.model.ModelConfig.from_dict`. Parameter counts (untied):
tiny 1.84M, small 23.5M, 125m 162M, 350m 411M, 1.3b 1.44B, 3b 2.80B, 7b 6.74B.

tiny/small use the default corpus tokenizer (vocab 4096). The 125m…3b family follows
Photon's sizes (vocab 50304, sequence 2048) with a SwiGLU MLP of d_ff ≈ 8/3·d_model
rounded up to a multiple of 256 (the parameter budget of a 4·d_model GELU MLP); 7b is
Llama-2-7B exactly (6,738,415,616 parameters), so its weights can be imported.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from fedjax_lm.model import ModelConfig


def _shape(vocab, d, layers, heads, d_ff, seq, kv_heads=None, **more):
    return dict(
        vocab_size=vocab,
        d_model=d,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv_heads or heads,
        d_ff=d_ff,
        max_seq_len=seq,
        **more,
    )


# What a pod needs: bf16 compute over f32 params (the optimizer state stays f32) and a remat policy, so
# the train step fits a chip's HBM (benchmarks/pod_presets.py; --config.model.dtype=float32 for CPU runs).
_POD = dict(dtype="bfloat16", param_dtype="float32")

MODEL_PRESETS: dict[str, dict] = {
    "tiny": _shape(4096, 128, 4, 4, 384, 256, kv_heads=2),
    # Unrolled scan: same params, ~5% faster train step on CPU (see ModelConfig).
    "small": _shape(4096, 512, 6, 8, 1408, 1024, scan_unroll=6),
    "125m": _shape(50304, 768, 12, 12, 2048, 2048, remat="minimal", **_POD),
    "350m": _shape(50304, 1024, 24, 16, 2816, 2048, remat="minimal", **_POD),
    "1.3b": _shape(50304, 2048, 24, 16, 5632, 2048, remat="full", **_POD),
    "3b": _shape(50304, 2560, 32, 20, 6912, 2048, remat="full", **_POD),
    "7b": _shape(32000, 4096, 32, 32, 11008, 4096, remat="full", **_POD),
}

# TPU slices the large presets are laid out for: name -> (chips, HBM per chip in GiB).
TPU_SLICES: dict[str, tuple[int, int]] = {
    "v5e-16": (16, 16),
    "v5e-64": (64, 16),
    "v5e-256": (256, 16),
    "v5p-64": (64, 95),
}
# The pod layout: fsdp over every chip (params and optimizer state sharded N ways, the batch split
# N ways) and this many sequences of max_seq_len per chip, so the global batch grows with the slice.
POD_SEQS_PER_CHIP: dict[str, int] = {"125m": 4, "350m": 4, "1.3b": 2, "3b": 1, "7b": 1}


def pod_layout(name: str, chips: int) -> dict:
    """Mesh, global batch and sequence length of a large preset on `chips` chips (see POD_SEQS_PER_CHIP)."""
    if name not in POD_SEQS_PER_CHIP:
        raise ValueError(f"no pod layout for preset {name!r}; valid: {sorted(POD_SEQS_PER_CHIP)}")
    return dict(
        mesh=dict(data=1, fsdp=chips, tensor=1),
        batch_size=POD_SEQS_PER_CHIP[name] * chips,
        seq_len=MODEL_PRESETS[name]["max_seq_len"],
    )


def model_preset(name: str, **overrides) -> ml_collections.ConfigDict:
    """Every ModelConfig field: its default, the preset's value, then the overrides (validated: unknown
    keys fail). Every field is there, so `--config.model.FIELD=...` works whatever the preset."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid: {sorted(MODEL_PRESETS)}")
    fields = {**MODEL_PRESETS[name], **overrides}
    ModelConfig.from_dict(fields)  # raises ValueError naming a bad key or value
    out = ml_collections.ConfigDict()
    for f in dataclasses.fields(ModelConfig):
        if f.name in fields:
            out[f.name] = fields[f.name]
        elif f.default is None:  # derived when unset (head_dim): typed, so the command line can set it
            out[f.name] = ml_collections.config_dict.placeholder(int)
        else:
            out[f.name] = f.default
    return out
