"""Ahead-of-time compile of the train step for a mesh: memory per device and FLOPs, no run.

python -m fedjax_lm compile --config experiments/centralized.py:size=1.3b --mesh 1,8,1
"""

from __future__ import annotations

import dataclasses
import time

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


@dataclasses.dataclass
class CompileStats:
    params: int
    mesh: dict[str, int]
    batch: int
    seq_len: int
    compile_s: float  # lower + compile
    memory: dict[str, int]  # XLA memory analysis per device (empty if the backend gives none)
    model_flops_per_step: float  # the whole step, all devices: flops_per_token x batch x seq_len
    xla_flops_per_device: float | None  # XLA cost analysis (a rolled layer scan counted once)
    rolled_scan: bool

    @property
    def peak_bytes(self) -> int | None:
        """Arguments + outputs + temporaries - what the outputs alias (donated state): per device."""
        m = self.memory
        if not m:
            return None
        return (
            m["argument_size_in_bytes"]
            + m["output_size_in_bytes"]
            + m["temp_size_in_bytes"]
            - m["alias_size_in_bytes"]
        )


def compile_stats(config: ml_collections.ConfigDict, batch_size: int | None = None) -> CompileStats:
    silo = silo_lib.from_config(config, total_steps=int(config.train.get("steps", 1)))
    batch = batch_size or int(config.train.batch_size)
    seq = int(config.train.seq_len)
    t = time.perf_counter()
    _, compiled = silo.compile_train_step(batch, seq)
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    memory = {}
    if mem is not None:
        memory = {f: int(getattr(mem, f)) for f in _MEMORY_FIELDS if getattr(mem, f, None) is not None}
    xla_flops = None
    cost = compiled.cost_analysis()
    if cost:
        c = cost[0] if isinstance(cost, list) else cost
        xla_flops = c.get("flops")
    mc = silo.model_config
    return CompileStats(
        params=model_lib.param_count(mc),
        mesh=dict(silo.mesh.shape),
        batch=batch,
        seq_len=seq,
        compile_s=compile_s,
        memory=memory,
        model_flops_per_step=model_lib.flops_per_token(mc, seq) * batch * seq,
        xla_flops_per_device=xla_flops,
        rolled_scan=mc.scan_layers and mc.scan_unroll < mc.n_layers,
    )


def report(config: ml_collections.ConfigDict, batch_size: int | None = None) -> str:
    s = compile_stats(config, batch_size)
    lines = [
        f"model: {s.params:,} params, {s.model_flops_per_step / (s.batch * s.seq_len):.3e} train FLOPs/token",
        f"mesh: {s.mesh} on {jax.device_count()} {jax.devices()[0].platform} devices; batch {s.batch}x{s.seq_len}",
        f"lower + compile: {s.compile_s:.1f} s",
    ]
    for f, v in s.memory.items():
        lines.append(f"per-device {f.replace('_in_bytes', '')}: {monitor.human_bytes(v)}")
    if s.peak_bytes is not None:
        lines.append(f"per-device peak estimate: {monitor.human_bytes(s.peak_bytes)}")
    lines.append(f"model FLOPs per step (all devices): {s.model_flops_per_step:.3e}")
    if s.xla_flops_per_device is not None:
        lines.append(
            f"XLA cost analysis: {s.xla_flops_per_device:.3e} FLOPs per step per device"
            + (" (a rolled layer scan is counted once, not per layer)" if s.rolled_scan else "")
        )
    return "\n".join(lines)
