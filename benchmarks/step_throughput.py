"""Train-step throughput and model FLOPs utilisation (MFU) against a measured matmul peak.

    python benchmarks/step_throughput.py                 # tiny and small presets, batch 8x256, f32
    python benchmarks/step_throughput.py --presets small --steps 20

The peak is measured in the same run (a jitted 4096^2 f32 `jnp.dot`), so the ratio is
comparable across machines even though absolute numbers vary +-30% between runs.
MFU = (train FLOPs per token x tokens/s) / peak, with FLOPs per token from
`model.flops_per_token` (6 N matmul params + attention).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
from experiments import presets  # noqa: E402
from fedjax_lm import model as model_lib  # noqa: E402
from fedjax_lm import optim  # noqa: E402
from fedjax_lm import sharding  # noqa: E402
from fedjax_lm.silo import Silo  # noqa: E402


def matmul_peak(n: int = 4096, reps: int = 10) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def step_throughput(preset: str, batch: int, seq: int, steps: int) -> dict:
    cfg = presets.model_preset(preset)
    cfg.max_seq_len = max(cfg.max_seq_len, seq)
    mcfg = model_lib.ModelConfig.from_dict(cfg)
    tx, sched = optim.make_optimizer(optim.default_optim_config(), 1000)
    silo = Silo(mcfg, tx, sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1)), schedule=sched)
    state = silo.init_state(jax.random.key(0))
    rng = np.random.default_rng(0)
    toks = rng.integers(0, mcfg.vocab_size, size=(batch, seq + 1), dtype=np.int32)
    b = silo.put_batch({"inputs": toks[:, :-1], "targets": toks[:, 1:]})
    t = time.perf_counter()
    state, m = silo.train_step(state, b)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = silo.train_step(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tok_s = batch * seq / step_s
    return dict(
        preset=preset,
        params=model_lib.param_count(mcfg),
        step_s=step_s,
        tok_s=tok_s,
        flops_per_token=model_lib.flops_per_token(mcfg, seq),
        compile_s=compile_s,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    peak = matmul_peak()
    print(
        f"devices: {jax.device_count()} x {jax.devices()[0].platform}; matmul peak (4096^2 f32): {peak / 1e9:.1f} GFLOP/s"
    )
    print(
        f"{'preset':<8} {'params':>12} {'step ms':>9} {'tokens/s':>10} {'GFLOP/s':>9} {'MFU vs peak':>12} {'compile s':>10}"
    )
    for name in args.presets.split(","):
        r = step_throughput(name, args.batch, args.seq, args.steps)
        achieved = r["tok_s"] * r["flops_per_token"]
        print(
            f"{name:<8} {r['params']:>12,} {r['step_s'] * 1e3:>9.1f} {r['tok_s']:>10,.0f} "
            f"{achieved / 1e9:>9.1f} {achieved / peak:>11.1%} {r['compile_s']:>10.1f}"
        )


if __name__ == "__main__":
    main()
