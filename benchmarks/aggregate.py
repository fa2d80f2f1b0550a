"""Aggregation throughput and memory: stream_weighted_mean vs raw sequential reads.

    python benchmarks/aggregate.py                    # ~100M params, 16 int8 silos: ~1-2 min, ~1.7 GB disk
    python benchmarks/aggregate.py --params 20e6 --silos 8 --f32   # smaller, plus an f32 run

Writes `--silos` int8 updates (random data, the shape of a ~`--params`-param model: one
8192x4096 embedding-like leaf plus 1024x4096 leaves) to a temporary store, then measures:

  (a) raw sequential read throughput of the same chunk files with plain Python reads, after
      dropping them from the page cache (posix_fadvise DONTNEED after a sync);
  (b) `stream_weighted_mean` throughput over 4 and all silos, cold cache, in a fresh process
      each (jit compiled on a one-silo warm-up first), and `validate_update` over the same silos;
  (c) the peak RSS of those processes (ru_maxrss) and how much of it the aggregation added
      (rss_added_MB), next to the f32 mean of the model plus the read budget (mean+budg_MB).
      On top come TensorStore's transient chunk buffers of the reads in flight, and freed
      buffers glibc keeps in per-thread arenas (bounded by the thread count, not the silo
      count; --mmap-threshold 4194304 removes most of it).

Prints a table with the ratios to the raw read; deletes the store unless --keep.
Numbers vary +-30% between runs on shared machines: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLS = 4096
BLOCK = 256


def model_shapes(params: float) -> list[tuple[int, int]]:
    """One embedding-like leaf (up to 8192 rows) plus 1024-row leaves, ~`params` elements."""
    emb_rows = min(8192, max(BLOCK, int(params) // COLS // 3))
    rest = max(1, round((params - emb_rows * COLS) / (1024 * COLS)))
    return [(emb_rows, COLS)] + [(1024, COLS)] * rest


def silo_files(root: str, silos: list[str], round: int = 0) -> list[str]:
    out = []
    for s in silos:
        for d, _, fs in os.walk(os.path.join(root, "updates", str(round), s)):
            out += [os.path.join(d, f) for f in fs]
    return sorted(out)


def drop_cache(files: list[str]) -> None:
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(files: list[str]) -> tuple[int, float]:
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    total = 0
    t = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total, time.perf_counter() - t


def write_store(root: str, shapes, silos: int, method: str, seed: int = 0) -> float:
    import numpy as np

    from fedjax_lm.store import Store

    store = Store(root)
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    for k in range(silos):
        payload = []
        for rows, cols in shapes:
            if method == "int8":
                n_blocks = rows * cols // BLOCK
                q = np.frombuffer(rng.bytes(n_blocks * BLOCK), np.int8).reshape(n_blocks, BLOCK)
                payload.append({"q": q, "scale": rng.random(n_blocks, dtype=np.float32) * 1e-3})
            else:
                payload.append({"x": rng.standard_normal((rows, cols), dtype=np.float32)})
        store.write_update(0, f"{method}{k}", payload, {"tokens": 1000 + k})
        del payload
    return time.perf_counter() - t


_CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
from benchmarks.aggregate import drop_cache, silo_files
import jax, jax.numpy as jnp
from fedjax_lm.store import Store, stream_weighted_mean
root, method, n, shapes, budget = sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5]), int(sys.argv[6])
silos = [f"{method}{k}" for k in range(n)]
like = [jax.ShapeDtypeStruct(tuple(s), jnp.float32) for s in shapes]
store = Store(root, read_budget_bytes=budget)
stream_weighted_mean(store, 0, {silos[0]: 1.0}, like)  # compile
files = silo_files(root, silos)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
drop_cache(files)
weights = {s: 1000.0 + k for k, s in enumerate(silos)}
mean, stats = stream_weighted_mean(store, 0, weights, like, return_stats=True)
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
del mean
tmpl = [({"q": jax.ShapeDtypeStruct((s[0] * s[1] // 256, 256), jnp.int8),
          "scale": jax.ShapeDtypeStruct((s[0] * s[1] // 256,), jnp.float32)} if method == "int8"
         else {"x": jax.ShapeDtypeStruct(tuple(s), jnp.float32)}) for s in shapes]
drop_cache(files)
t = time.perf_counter()
for s in silos:
    store.validate_update(0, s, tmpl, expected_silos=silos, current_round=0)
validate_s = time.perf_counter() - t
print(json.dumps({"seconds": stats["seconds"], "bytes": stats["bytes_read"], "peak_read": stats["peak_read_bytes"],
                  "rss_before_kib": rss0, "rss_peak_kib": rss1, "validate_s": validate_s}))
"""


def run_child(root: str, method: str, n: int, shapes, budget: int, env) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, REPO, root, method, str(n), json.dumps(shapes), str(budget)],
        capture_output=True,
        text=True,
        env=env,
    )
    if res.returncode:
        raise RuntimeError(res.stderr[-4000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=100e6, help="model size in elements (default 100e6)")
    ap.add_argument("--silos", type=int, default=16, help="int8 silos written (default 16)")
    ap.add_argument("--few", type=int, default=4, help="the small silo count compared (default 4)")
    ap.add_argument("--f32", action="store_true", help="also write and aggregate f32 ('none') updates")
    ap.add_argument("--f32-silos", type=int, default=4, help="f32 silos (default 4: 400 MB each at 100M)")
    ap.add_argument("--dir", default=None, help="parent folder of the temporary store (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the store")
    ap.add_argument(
        "--budget-mb", type=int, default=64, help="read budget of the aggregation (store default 64)"
    )
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        help="MALLOC_MMAP_THRESHOLD_ for the measured processes (glibc; default: its dynamic threshold)",
    )
    args = ap.parse_args()

    shapes = model_shapes(args.params)
    n_params = sum(r * c for r, c in shapes)
    root = tempfile.mkdtemp(prefix="fedjax_agg_bench_", dir=args.dir)
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    sys.path.insert(0, REPO)
    print(f"model: {len(shapes)} leaves, {n_params / 1e6:.1f}M params; store {root}")
    rows = []
    raw: dict[str, tuple[float, float]] = {}
    try:
        plans = [("int8", args.silos)] + ([("none", args.f32_silos)] if args.f32 else [])
        for method, n_silos in plans:
            wt = write_store(root, shapes, n_silos, method)
            all_files = silo_files(root, [f"{method}{k}" for k in range(n_silos)])
            size = sum(os.path.getsize(f) for f in all_files)
            print(
                f"wrote {n_silos} {method} updates, {size / 1e9:.2f} GB on disk, "
                f"in {wt:.1f} s ({size / wt / 1e6:.0f} MB/s)"
            )
            drop_cache(all_files)
            nbytes, cold = raw_read(all_files)
            _, warm = raw_read(all_files)
            raw_cold, raw_warm = nbytes / cold / 1e6, nbytes / warm / 1e6
            raw[method] = (raw_cold, raw_warm)
            print(
                f"raw sequential read of those files: cold {raw_cold:.0f} MB/s, page-cached {raw_warm:.0f} MB/s"
            )
            for n in sorted({min(args.few, n_silos), n_silos}):
                r = run_child(root, method, n, shapes, args.budget_mb << 20, env)
                mbps = r["bytes"] / r["seconds"] / 1e6
                rows.append(
                    {
                        "method": method,
                        "silos": n,
                        "GB": r["bytes"] / 1e9,
                        "stream_s": r["seconds"],
                        "stream_MBps": mbps,
                        "vs_raw_cold": mbps / raw_cold,
                        "vs_raw_cached": mbps / raw_warm,
                        "validate_MBps": r["bytes"] / r["validate_s"] / 1e6,
                        "rss_peak_MB": r["rss_peak_kib"] / 1024,
                        "rss_added_MB": (r["rss_peak_kib"] - r["rss_before_kib"]) / 1024,
                        "mean+budg_MB": n_params * 4 / 2**20 + args.budget_mb,
                    }
                )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    head = [
        "method",
        "silos",
        "GB",
        "stream_s",
        "stream_MBps",
        "vs_raw_cold",
        "vs_raw_cached",
        "validate_MBps",
        "rss_peak_MB",
        "rss_added_MB",
        "mean+budg_MB",
    ]
    print()
    print(" | ".join(f"{h:>13}" for h in head))
    for r in rows:
        print(" | ".join(f"{r[h]:>13.2f}" if isinstance(r[h], float) else f"{r[h]:>13}" for h in head))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        if len(mine) == 2:
            a, b = mine
            dt = b["stream_s"] - a["stream_s"]
            marginal = (b["GB"] - a["GB"]) * 1e3 / dt if dt > 0 else float("nan")  # nan: too noisy to tell
            print(
                f"{method}: {b['silos']} vs {a['silos']} silos: data x{b['GB'] / a['GB']:.1f}, "
                f"time x{b['stream_s'] / a['stream_s']:.2f}, peak RSS x{b['rss_peak_MB'] / a['rss_peak_MB']:.2f} "
                f"(+{b['rss_peak_MB'] - a['rss_peak_MB']:.0f} MB); marginal stream throughput "
                f"{marginal:.0f} MB/s = {marginal / raw[method][0]:.2f} x raw cold read"
            )
    print(
        "rss_added_MB: peak RSS during stream_weighted_mean minus before it; "
        "mean+budg_MB: f32 mean of the model + read budget"
    )
    print(f"(this process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
