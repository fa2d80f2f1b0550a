"""What progress reporting inside a round costs: H local steps as one scan vs. in chunks.

    python benchmarks/round_chunks.py                       # tiny preset, H=32, batch 8x128
    python benchmarks/round_chunks.py --preset small --H 16 --batch 8 --seq 256

`Federation.train_silo` runs a silo's H steps as H/c calls of one compiled c-step scan (state
donated between calls) so a progress line can be shown between chunks. This times a whole
silo round (init + H steps + int8 pseudo-gradient) both ways, alternating, in one process,
and prints the median and the minimum of each and the overhead of the chunked form (compare
the minima: on a shared 2-core machine the medians move by several % between identical runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, ".")
from experiments import common  # noqa: E402
from fedjax_lm import federation  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--H", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--chunk", type=int, default=0, help="steps per chunk (0: about H/8, as in training)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    c = common.base_config(size=args.preset, seq_len=args.seq, batch_size=args.batch, steps=args.H)
    c.mesh.update(dict(data=1, fsdp=1, tensor=1))
    c.federation = federation.default_federation_config()
    c.federation.update(dict(rounds=1, local_steps=args.H, report_every=args.chunk))
    fed = federation.Federation(c, ["a"], mesh=None)
    s = fed.silo
    server = fed.init_server(0)
    private = fed.fresh_private(server.params)
    toks = np.random.default_rng(0).integers(0, c.model.vocab_size, size=(args.H, args.batch, args.seq + 1))
    batches = {"inputs": toks[..., :-1].astype(np.int32), "targets": toks[..., 1:].astype(np.int32)}
    one_scan = jax.jit(fed.client_round_fn())

    def whole():
        with jax.set_mesh(s.mesh):
            out = one_scan(
                server.params,
                private["opt_state"],
                private["error"],
                fed.step0(0),
                s.put_batch(batches, ndim=3),
            )
        return jax.block_until_ready(out)

    def chunked():
        return jax.block_until_ready(fed.train_silo(server.params, private, batches, 0, lambda *_: None))

    times = {"one scan of H": [], f"{args.H // fed.chunk} chunks of {fed.chunk}": []}
    for fn in (whole, chunked):  # compile
        fn()
    for _ in range(args.repeats):
        for name, fn in zip(times, (whole, chunked)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    tokens = args.H * args.batch * args.seq
    for name, ts in times.items():
        t = statistics.median(ts)
        print(
            f"{name:>22}: median {t:.3f} s, min {min(ts):.3f} s per silo round ({tokens / t:,.0f} tokens/s)"
        )
    (a, b) = (statistics.median(v) for v in times.values())
    (ma, mb) = (min(v) for v in times.values())
    print(
        f"chunked / one scan: median {b / a:.4f} ({100 * (b / a - 1):+.2f}%), min {mb / ma:.4f} ({100 * (mb / ma - 1):+.2f}%)"
    )


if __name__ == "__main__":
    main()
