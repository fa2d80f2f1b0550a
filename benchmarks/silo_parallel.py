"""Time per federated round: 8 silos one after another vs. one vmapped silo-parallel program.

    python benchmarks/silo_parallel.py                 # tiny preset, 8 silos, H=16, batch 8x128
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/silo_parallel.py

Both paths run the same `federation.client_round` (H AdamW steps + int8 pseudo-gradient);
the parallel one maps it over a leading silo axis sharded over the devices. On a 2-core
CPU the gain is bounded by the cores; on a TPU slice each silo gets its own chips.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
from experiments import presets  # noqa: E402
from fedjax_lm import compression, federation, optim, sharding  # noqa: E402
from fedjax_lm import model as model_lib  # noqa: E402
from fedjax_lm.silo import Silo  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--silos", type=int, default=8)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    mcfg = model_lib.ModelConfig.from_dict(presets.model_preset(args.preset))
    tx, sched = optim.make_optimizer(optim.default_optim_config(), 1000)
    silo = Silo(
        mcfg,
        tx,
        sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1]),
        schedule=sched,
    )
    state = silo.init_state(jax.random.key(0))
    client = functools.partial(
        federation.client_round, step_fn=silo.step_fn, tx=tx, method="int8", block_size=256, reset_opt=False
    )
    k, h = args.silos, args.H
    rng = np.random.default_rng(0)
    toks = rng.integers(0, mcfg.vocab_size, size=(k, h, args.batch, args.seq + 1), dtype=np.int32)
    batches = {"inputs": toks[..., :-1], "targets": toks[..., 1:]}
    opts = [silo.fresh_opt_state(state.params) for _ in range(k)]
    errs = [compression.init_error(state.params) for _ in range(k)]

    seq_fn = jax.jit(client)

    def sequential():
        outs = [
            seq_fn(state.params, opts[i], errs[i], jnp.int32(0), {kk: v[i] for kk, v in batches.items()})
            for i in range(k)
        ]
        jax.block_until_ready(outs)

    n_dev = np.gcd(k, jax.device_count())
    mesh = jax.make_mesh(
        (n_dev,), ("silo",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n_dev]
    )
    lead = jax.sharding.NamedSharding(mesh, jax.P("silo"))
    stack = lambda trees: jax.tree.map(lambda *xs: jax.device_put(jnp.stack(xs), lead), *trees)
    s_opt, s_err, s_bat = stack(opts), stack(errs), jax.device_put(batches, lead)
    rep_params = jax.device_put(state.params, jax.sharding.NamedSharding(mesh, jax.P()))
    par_fn = jax.jit(jax.vmap(client, in_axes=(None, 0, 0, None, 0)))

    def parallel():
        jax.block_until_ready(par_fn(rep_params, s_opt, s_err, jnp.int32(0), s_bat))

    results = {}
    for name, fn in (("sequential", sequential), ("silo-parallel", parallel)):
        t = time.perf_counter()
        fn()
        first = time.perf_counter() - t
        times = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        results[name] = (first, statistics.median(times))
    tokens = k * h * args.batch * args.seq
    print(
        f"{k} silos x H={h} x batch {args.batch}x{args.seq} ({tokens:,} tokens/round), preset {args.preset}, "
        f"{jax.device_count()} devices"
    )
    print(f"{'path':<14} {'first round s':>14} {'round s':>9} {'tokens/s':>10}")
    for name, (first, med) in results.items():
        print(f"{name:<14} {first:>14.2f} {med:>9.2f} {tokens / med:>10,.0f}")
    print(
        f"speed-up silo-parallel / sequential: {results['sequential'][1] / results['silo-parallel'][1]:.2f}x"
    )


if __name__ == "__main__":
    main()
