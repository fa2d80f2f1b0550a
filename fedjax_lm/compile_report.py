"""Ahead-of-time compile of the train step for a mesh: memory per device and FLOPs, no run.

python -m fedjax_lm compile --config experiments/centralized.py:size=1.3b --mesh 1,8,1
"""

from __future__ import annotations

import jax
import ml_collections

from fedjax_lm import model as model_lib
from fedjax_lm import monitor
from fedjax_lm import silo as silo_lib

_MEMORY_FIELDS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "temp_size_in_bytes",
    "alias_size_in_bytes",
    "generated_code_size_in_bytes",
)


def report(config: ml_collections.ConfigDict, batch_size: int | None = None) -> str:
    silo = silo_lib.from_config(config, total_steps=int(config.train.get("steps", 1)))
    batch = batch_size or int(config.train.batch_size)
    seq = int(config.train.seq_len)
    _, compiled = silo.compile_train_step(batch, seq)
    n = model_lib.param_count(silo.model_config)
    lines = [
        f"model: {n:,} params, {model_lib.flops_per_token(silo.model_config, seq):.3e} train FLOPs/token",
        f"mesh: {dict(silo.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices; "
        f"batch {batch}x{seq}",
    ]
    mem = compiled.memory_analysis()
    if mem is not None:
        for f in _MEMORY_FIELDS:
            v = getattr(mem, f, None)
            if v is not None:
                lines.append(f"per-device {f.replace('_in_bytes', '')}: {monitor.human_bytes(v)}")
        total = (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )
        lines.append(f"per-device peak estimate: {monitor.human_bytes(total)}")
    cost = compiled.cost_analysis()
    if cost:
        c = cost[0] if isinstance(cost, list) else cost
        if "flops" in c:
            rolled = (
                silo.model_config.scan_layers and silo.model_config.scan_unroll < silo.model_config.n_layers
            )
            lines.append(
                f"XLA cost analysis: {c['flops']:.3e} FLOPs per step per device"
                + (" (a rolled layer scan is counted once, not per layer)" if rolled else "")
            )
    return "\n".join(lines)
