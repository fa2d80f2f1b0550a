"""Where the compiled train step spends its time on CPU: XLA ops grouped by kind, from a jax.profiler trace.

    python benchmarks/profile_step.py --preset tiny --batch 4 --seq 1024
    python benchmarks/profile_step.py --preset small --top 25      # the 25 slowest ops as well

Runs `Silo.train_step` (the real step) a few times under `jax.profiler.trace` with a Perfetto
trace, then sums the XLA:CPU thunk events per op name and per kind (dot = matmuls, fusion = fused
elementwise / reductions (softmax, norms, the optimizer update), copy / transpose, while = the
layer scan's control). Also prints the minor page faults per step (getrusage), the cost of
first-touching fresh temporary buffers.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import presets  # noqa: E402
from fedjax_lm import model as model_lib  # noqa: E402
from fedjax_lm import optim  # noqa: E402
from fedjax_lm import sharding  # noqa: E402
from fedjax_lm.silo import Silo  # noqa: E402


def make(preset: str, batch: int, seq: int, overrides: dict):
    cfg = presets.model_preset(preset, **overrides)
    cfg.max_seq_len = max(cfg.max_seq_len, seq)
    mcfg = model_lib.ModelConfig.from_dict(cfg)
    tx, sched = optim.make_optimizer(optim.default_optim_config(), 1000)
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    silo = Silo(mcfg, tx, mesh, schedule=sched)
    state = silo.init_state(jax.random.key(0))
    toks = np.random.default_rng(0).integers(0, mcfg.vocab_size, size=(batch, seq + 1), dtype=np.int32)
    return silo, state, silo.put_batch({"inputs": toks[:, :-1], "targets": toks[:, 1:]})


def kind(name: str) -> str:
    n = name.lower()
    for k in (
        "dot",
        "convolution",
        "custom-call",
        "copy",
        "transpose",
        "while",
        "reduce",
        "scatter",
        "gather",
    ):
        if n.startswith(k) or re.match(rf"^[a-z_]*{k}", n):
            return k
    if "fusion" in n:
        return "fusion"
    return n.split(".")[0]


def where(op_name: str) -> str:
    """A coarse place in the step for an op's jax path: fwd/bwd x attention core, projections, mlp, ..."""
    phase = "bwd" if "transpose(" in op_name else "fwd"
    if "/attn/" in op_name:
        part = "attn proj" if re.search(r"/attn/(q|k|v|out)/", op_name) else "attn core+rope"
    elif "/mlp/" in op_name:
        part = "mlp"
    elif "norm" in op_name:
        part = "norms"
    elif "lm_head" in op_name or "cross_entropy" in op_name or "log_softmax" in op_name:
        part = "lm head + loss"
    elif "embed" in op_name:
        part = "embedding"
    elif "Decoder" in op_name:
        part = "decoder other"
    else:
        return "optimizer / other: " + op_name.split("/")[1] if "/" in op_name else "unattributed"
    return f"{phase} {part}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--set", default="", help="ModelConfig overrides, e.g. remat=minimal,scan_unroll=1")
    args = p.parse_args()
    overrides = {}
    for kv in filter(None, args.set.split(",")):
        k, v = kv.split("=")
        overrides[k] = int(v) if v.isdigit() else v
    silo, state, batch = make(args.preset, args.batch, args.seq, overrides)
    state, m = silo.train_step(state, batch)
    jax.block_until_ready(m)
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    for _ in range(args.steps):
        state, m = silo.train_step(state, batch)
        jax.block_until_ready(m)
    step_s = (time.perf_counter() - t) / args.steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / args.steps
    print(
        f"{args.preset} {args.batch}x{args.seq}: {step_s * 1e3:.0f} ms/step untraced, {faults:,.0f} minor page faults/step"
    )

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(args.steps):
                state, m = silo.train_step(state, batch)
                jax.block_until_ready(m)
        path = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)[0]
        events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_name: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            by_name[e["name"]] += e["dur"] / 1e3 / args.steps  # ms per step
    # Keep the op-level events (XLA thunks): names like fusion.12, dot.3, copy.7, while.1 ...
    ops = {n: v for n, v in by_name.items() if re.match(r"^[a-z_\-]+(\.\d+)*$", n) and "." in n}
    total = sum(v for n, v in ops.items() if not n.startswith("while"))
    by_kind: collections.Counter = collections.Counter()
    for n, v in ops.items():
        by_kind[kind(n)] += v
    print(f"op time per step (sum over threads, while loops are containers): {total:.0f} ms")
    for k, v in by_kind.most_common():
        print(f"  {k:<14} {v:>9.1f} ms {v / total if not k.startswith('while') else 0:>6.1%}")
    print(f"top {args.top} ops:")
    for n, v in sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {n:<40} {v:>9.1f} ms")
    # Group by where the op came from in the model (the jax op path in its metadata).
    with jax.set_mesh(silo.mesh):
        hlo = silo._jit_cache["train"].lower(state, batch).compile().as_text()
    origin = {}
    for line in hlo.splitlines():
        mo = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*op_name=\"([^\"]*)\"", line)
        if mo:
            origin[mo.group(1)] = mo.group(2)
    by_origin: collections.Counter = collections.Counter()
    for n, v in ops.items():
        if not n.startswith("while"):
            by_origin[where(origin.get(n, "?"))] += v
    print("by origin:")
    for k, v in by_origin.most_common():
        print(f"  {k:<34} {v:>9.1f} ms {v / total:>6.1%}")
    other = [(n, v) for n, v in by_name.most_common(10) if n not in ops]
    print("top non-op events:", ", ".join(f"{n} {v:.0f} ms" for n, v in other))


if __name__ == "__main__":
    main()
