"""Store-path aggregation by rule: token-weighted mean vs coordinate-wise median vs trimmed mean.

    python benchmarks/robust_aggregate.py                       # ~25M params, K = 4, 8, 16 int8 silos
    python benchmarks/robust_aggregate.py --params 100e6 --silos 4,8

Writes max(K) int8 updates (random data shaped like a ~`--params`-param model, the leaves of
benchmarks/aggregate.py: one embedding-like leaf plus 1024x4096 leaves) to a temporary on-disk
store, then, for every K and rule, in a fresh process:

  1. records its resident memory with JAX imported and the store open (VmRSS: the baseline), then
     aggregates the K silos once (compiles the rule's kernels for this K; the result is freed);
  2. drops the K silos' chunk files from the page cache (sync + posix_fadvise DONTNEED) and resets
     the peak resident memory (`echo 5 > /proc/self/clear_refs`);
  3. aggregates again, timed: `store.aggregate.stream_aggregate(rule=...)`, which is what the
     aggregator runs (with the same bounded reads; without re-hashing, as benchmarks/aggregate.py),
     then reads the peak resident memory of that run (VmHWM).

Prints seconds, MB/s of payload read, the timed run's peak RSS and how far above the baseline it
went (rss_added_MB: everything aggregating holds at its peak, buffers glibc kept from the first run
included, which a long-running aggregator keeps too; NumPy, TensorStore and XLA buffers
included — resident pages counted by the kernel, not by a Python allocator; ru_maxrss is not used:
Linux carries the parent's peak into it across exec), next to the f32 model (the result every rule
holds) and K x the largest leaf's int8 payload (what a robust rule holds at once: every silo's copy
of one leaf). Deletes the store unless --keep.
Numbers vary +-30% between runs on shared machines: compare rules within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.aggregate import model_shapes, silo_files, write_store  # noqa: E402

RULES = ("mean", "median", "trimmed_mean")

_CHILD = r"""
import gc, json, sys, time
sys.path.insert(0, sys.argv[1])
from benchmarks.aggregate import drop_cache, silo_files
import jax, jax.numpy as jnp
from fedjax_lm.store import Store
from fedjax_lm.store import aggregate as store_aggregate
root, rule, n, shapes, budget, trim = (
    sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7]))
def status_kib(field):  # this address space's own counters (ru_maxrss keeps the parent's peak across exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith(field + ":")).split()[1])
silos = [f"int8{k}" for k in range(n)]
like = [jax.ShapeDtypeStruct(tuple(s), jnp.float32) for s in shapes]
store = Store(root, read_budget_bytes=budget)
weights = {s: 1000.0 + k for k, s in enumerate(silos)}
jnp.zeros(()).block_until_ready()  # the XLA runtime is up
rss0 = status_kib("VmRSS")  # the process before any aggregation: the baseline
def run():
    return store_aggregate.stream_aggregate(store, 0, weights, like, rule=rule, trim_fraction=trim, return_stats=True)
t = time.perf_counter()
out, _ = run()  # compiles this K's kernels
first_s = time.perf_counter() - t
del out
gc.collect()
drop_cache(silo_files(root, silos))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS: the peak below is the timed run's own
out, stats = run()
rss1 = status_kib("VmHWM")
print(json.dumps({"seconds": stats["seconds"], "first_s": first_s, "bytes": stats["bytes_read"],
                  "peak_read": stats["peak_read_bytes"], "rss_before_kib": rss0, "rss_peak_kib": rss1}))
"""


def run_child(root: str, rule: str, n: int, shapes, budget: int, trim: float, env) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, REPO, root, rule, str(n), json.dumps(shapes), str(budget), str(trim)],
        capture_output=True,
        text=True,
        env=env,
    )
    if res.returncode:
        raise RuntimeError(res.stderr[-4000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=25e6, help="model size in elements (default 25e6)")
    ap.add_argument("--silos", default="4,8,16", help="silo counts K, comma-separated (default 4,8,16)")
    ap.add_argument(
        "--rules", default=",".join(RULES), help=f"rules, comma-separated (default {','.join(RULES)})"
    )
    ap.add_argument("--trim-fraction", type=float, default=0.1, help="trimmed_mean's fraction (default 0.1)")
    ap.add_argument("--budget-mb", type=int, default=64, help="read budget (store default 64)")
    ap.add_argument("--dir", default=None, help="parent folder of the temporary store (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the store")
    args = ap.parse_args()

    ks = sorted({int(k) for k in args.silos.split(",")})
    rules = [r for r in args.rules.split(",") if r]
    shapes = model_shapes(args.params)
    n_params = sum(r * c for r, c in shapes)
    largest = max(r * c for r, c in shapes)
    root = tempfile.mkdtemp(prefix="fedjax_robust_bench_", dir=args.dir)
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    print(
        f"model: {len(shapes)} leaves, {n_params / 1e6:.1f}M params (largest leaf {largest / 1e6:.1f}M); store {root}"
    )
    t_all = time.perf_counter()
    rows = []
    try:
        wt = write_store(root, shapes, max(ks), "int8")
        size = sum(os.path.getsize(f) for f in silo_files(root, [f"int8{k}" for k in range(max(ks))]))
        print(f"wrote {max(ks)} int8 updates, {size / 1e9:.2f} GB on disk, in {wt:.1f} s")
        for k in ks:
            for rule in rules:
                r = run_child(root, rule, k, shapes, args.budget_mb << 20, args.trim_fraction, env)
                rows.append(
                    {
                        "rule": rule,
                        "K": k,
                        "MB_read": r["bytes"] / 1e6,
                        "seconds": r["seconds"],
                        "MB/s": r["bytes"] / r["seconds"] / 1e6,
                        "first_run_s": r["first_s"],
                        "rss_peak_MB": r["rss_peak_kib"] / 1024,
                        "rss_added_MB": (r["rss_peak_kib"] - r["rss_before_kib"]) / 1024,
                        "model_f32_MB": n_params * 4 / 2**20,
                        "K_x_leaf_MB": k * largest / 2**20,
                    }
                )
                print(
                    f"  K={k:>2} {rule:>12}: {r['seconds']:.2f} s, peak RSS {r['rss_peak_kib'] / 1024:.0f} MB",
                    flush=True,
                )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    head = list(rows[0]) if rows else []
    print()
    print(" | ".join(f"{h:>12}" for h in head))
    for r in rows:
        print(" | ".join(f"{r[h]:>12.2f}" if isinstance(r[h], float) else f"{r[h]:>12}" for h in head))
    print(
        "seconds / MB/s: the timed, cold-cache aggregation (MB of int8 payload read); first_run_s: the same "
        "aggregation compiling its kernels; rss_peak_MB: the timed run's peak RSS; rss_added_MB: that minus the process's RSS before aggregating; "
        "model_f32_MB: the f32 result; K_x_leaf_MB: K int8 copies of the largest leaf"
    )
    print(f"wall time {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
