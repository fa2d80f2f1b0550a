"""What secure aggregation adds to a round: CPU seconds per party and bytes through the store.

    python benchmarks/secagg_overhead.py                         # the main job's tiny model, K = 4, 8, 16
    python benchmarks/secagg_overhead.py --silos 4,8 --dropped 1 --config experiments/photon.py:size=small

For each K, one round of K silos over a real on-disk store, signed (Ed25519) as a deployment is, with
random updates shaped like the config's model (N(0, 1e-3) entries, ring bound 0.05), twice:

  plain  — every silo commits its uncompressed f32 update (`write_update`); the aggregator validates
           each (`validate_update`) and streams the token-weighted mean (`stream_aggregate`);
  secure — the protocol of `deploy/secure_protocol.py` with the production classes: keys, U1, shares,
           U2, masked ring update (`write_update`), U3, unmasking responses; the aggregator validates,
           streams the ring sum (`stream_ring_sum`), unmasks and decodes. `--dropped D` silos share
           their keys and then vanish, so the survivors' responses must also remove their masks.

The parties' steps run one after another in this process, in protocol order, each timed alone
(wall clock; nothing else runs meanwhile): seconds are what each party computes and reads/writes
per round, not the waiting between phases. In a deployment every silo has its own machine, so the
round's added latency is about the slowest silo's added seconds plus the aggregator's, plus three
extra store round trips (U1, U2, U3 polls). Bytes: the secure-aggregation messages in the store
(keys, lists, shares, responses); the upload itself is 4 bytes per parameter in both modes.
Each round runs twice on a fresh store (the first compiles the aggregation kernels) and the
second is reported. Prints one JSON line per (K, mode) and a Markdown table.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fedjax_lm import compression, identity, secagg, secure  # noqa: E402
from fedjax_lm import config as config_lib  # noqa: E402
from fedjax_lm import silo as silo_lib  # noqa: E402
from fedjax_lm import store as store_lib  # noqa: E402
from fedjax_lm.deploy.common import Trust  # noqa: E402
from fedjax_lm.deploy.secure_protocol import AggregatorProtocol, channel, path  # noqa: E402

BOUND = 0.05


def identities(root: str, names: list[str]) -> dict[str, Trust]:
    allow_path = os.path.join(root, "federation.json")
    paths = {}
    for n in [*names, identity.AGGREGATOR]:
        paths[n], public = identity.generate(n, os.path.join(root, "keys"))
        identity.add_to_allow_list(allow_path, n, public)
    allow = identity.AllowList.load(allow_path)
    return {n: Trust(allow, identity.Signer.load(p, n)) for n, p in paths.items()}


class Clock:
    """Wall seconds by phase (the parties run one after another: nothing else runs meanwhile)."""

    def __init__(self):
        self.phases: dict[str, float] = {}

    def run(self, phase: str, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t
        return out

    @property
    def total(self) -> float:
        return sum(self.phases.values())


def manifest(r: int, name: str, method: str) -> dict:
    return {"round": r, "silo": name, "tokens": 1.0, "method": method}


def validate_all(agg: Clock, store, template, silos, expected, allow) -> dict:
    """The aggregator's validation of each committed update, timed as one phase."""
    return {
        n: agg.run(
            "validate",
            store.validate_update,
            0,
            n,
            template,
            expected_silos=expected,
            current_round=0,
            allow=allow,
        )
        for n in silos
    }


def plain_round(root, names, updates, trusts, like):
    store = store_lib.Store(root)
    clocks = {n: Clock() for n in names}
    for n in names:
        payload = compression.compress(updates[n], None, "none", 256)[0]
        clocks[n].run(
            "upload", store.write_update, 0, n, payload, manifest(0, n, "none"), signer=trusts[n].signer
        )
    agg = Clock()
    template = jax.eval_shape(lambda p: compression.compress(p, None, "none", 256)[0], like)
    allow = trusts[identity.AGGREGATOR].allow
    manifests = validate_all(agg, store, template, names, names, allow)
    weights = {n: 1.0 for n in names}
    mean = agg.run(
        "aggregate",
        store_lib.aggregate.stream_aggregate,
        store,
        0,
        weights,
        like,
        manifests=manifests,
        verify_sha256=True,
    )
    jax.block_until_ready(mean)
    return clocks, agg, 0


def secure_round(root, names, updates, trusts, like, dropped):
    """The protocol's steps in order, each party's step timed alone, through the real store (signed
    messages via `Channel`, the lists via `AggregatorProtocol`, the primitives of `secagg`)."""
    store = store_lib.Store(root)
    k = len(names)
    spec = secagg.RoundSpec("bench", 0, secure.threshold_for(0, k), secagg.FixedPoint(BOUND, k))
    clocks = {n: Clock() for n in names}
    agg = Clock()
    channels = {n: channel(store, trusts[n], n) for n in names}
    key = secure.aggregator_key(b"b" * 32, "bench", 0)
    proto = AggregatorProtocol(store, trusts[identity.AGGREGATOR], spec, key, phase_s=600.0, poll_s=0.0)
    states = {}

    def advertise(n):
        states[n], public = secagg.advertise_keys(n, spec)
        channels[n].put(path(0, "keys", n), {"round": 0, "keys": public.to_json()})

    for n in names:
        clocks[n].run("keys", advertise, n)
    members = agg.run("lists", proto.members, names)

    def share(n):
        u1 = channels[n].get(path(0, "U1"), secagg.AGGREGATOR)
        keys = {m: secagg.PublicKeys.from_json(v) for m, v in u1["members"].items()}
        box = secagg.share_keys(states[n], keys)
        channels[n].put(
            path(0, "shares", n),
            {"round": 0, "to": {m: base64.b64encode(c).decode() for m, c in box.items()}},
        )

    for n in names:
        clocks[n].run("shares", share, n)
    senders = agg.run("lists", proto.senders, sorted(members))
    alive = [n for n in senders if n not in dropped]

    def mask_and_upload(n):
        got = {s: channels[n].get(path(0, "shares", s), s) for s in senders}
        secagg.receive_shares(states[n], {s: base64.b64decode(m["to"][n]) for s, m in got.items()})
        ring, _ = secagg.mask_update(states[n], updates[n])
        return jax.tree.map(lambda w: {"x": w}, ring)

    for n in alive:
        payload = clocks[n].run("mask", mask_and_upload, n)
        clocks[n].run(
            "upload", store.write_update, 0, n, payload, manifest(0, n, "ring32"), signer=trusts[n].signer
        )
    template = jax.tree.map(lambda x: {"x": jax.ShapeDtypeStruct(x.shape, np.uint32)}, like)
    allow = trusts[identity.AGGREGATOR].allow
    manifests = validate_all(agg, store, template, alive, senders, allow)
    survivors, gone, aborted = agg.run("lists", proto.survivors, senders, sorted(manifests))
    assert not aborted, aborted

    def respond(n):
        u3 = channels[n].get(path(0, "U3"), secagg.AGGREGATOR)
        agg_public = base64.b64decode(u3["aggregator_key"])
        blob = secagg.unmask_response(states[n], u3["survivors"], u3["dropped"], agg_public)
        channels[n].put(path(0, "unmask", n), {"round": 0, "response": base64.b64encode(blob).decode()})

    for n in survivors:
        clocks[n].run("respond", respond, n)
    masked = agg.run(
        "ring sum",
        store_lib.aggregate.stream_ring_sum,
        store,
        0,
        survivors,
        like,
        np.uint32,
        manifests=manifests,
    )
    ring = agg.run("unmask", proto.unmask, masked, members, survivors, gone)
    total = agg.run("unmask", secagg.decode, ring, spec.fixed_point, len(survivors))
    for a, *xs in zip(jax.tree.leaves(total), *(jax.tree.leaves(updates[n]) for n in survivors)):
        want = np.sum([np.asarray(x, np.float64) for x in xs], axis=0)
        # exact up to the encoding (half a unit per summand) and the f32 rounding of the decoded sum
        err = np.abs(np.asarray(a, np.float64) - want) - np.abs(want) * 2.0**-24
        assert float(np.max(err)) <= len(survivors) * spec.fixed_point.resolution / 2, float(np.max(err))
    return clocks, agg, proto.message_bytes(names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="experiments/photon.py:size=tiny")
    ap.add_argument("--silos", default="4,8,16")
    ap.add_argument("--dropped", type=int, default=0, help="silos that vanish after sharing keys")
    args = ap.parse_args()
    config = config_lib.load_config(os.path.join(REPO, args.config))
    like = silo_lib.from_config(config, total_steps=1).abstract_params
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(like))
    rng = np.random.default_rng(0)
    results = []
    for k in [int(x) for x in args.silos.split(",")]:
        names = [f"silo{i:02d}" for i in range(k)]
        dropped = set(names[-args.dropped :]) if args.dropped else set()
        updates = {
            n: jax.tree.map(lambda x: (rng.standard_normal(x.shape) * 1e-3).astype(np.float32), like)
            for n in names
        }
        for mode in ("plain", "secure"):
            for _ in range(2):  # the first round compiles the aggregation kernels: the second is timed
                root = tempfile.mkdtemp(prefix=f"secagg-bench-{mode}-{k}-")
                try:
                    trusts = identities(root, names)
                    store_root = os.path.join(root, "store")
                    run = plain_round if mode == "plain" else secure_round
                    extra = () if mode == "plain" else (dropped,)
                    clocks, agg, msg = run(store_root, names, updates, trusts, like, *extra)
                finally:
                    shutil.rmtree(root, ignore_errors=True)
            silo_secs = [c.total for n, c in clocks.items() if n not in dropped]
            row = {
                "silos": k,
                "dropped": len(dropped),
                "mode": mode,
                "params": params,
                "silo_s_mean": float(np.mean(silo_secs)),
                "silo_s_max": float(np.max(silo_secs)),
                "silo_phases_s": {
                    p: float(np.mean([c.phases.get(p, 0.0) for n, c in clocks.items() if n not in dropped]))
                    for p in sorted({p for c in clocks.values() for p in c.phases})
                },
                "aggregator_s": agg.total,
                "aggregator_phases_s": agg.phases,
                "upload_bytes_per_silo": params * 4,
                "message_bytes": msg,
                "message_bytes_per_silo": msg / k,
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(
        "| K | dropped | silo s plain | silo s secure (x) | aggregator s plain | aggregator s secure (x) | protocol bytes per silo | vs its upload |"
    )
    print("|---|---|---|---|---|---|---|---|")
    by = {(r["silos"], r["mode"]): r for r in results}
    for k in sorted({r["silos"] for r in results}):
        p, s = by[(k, "plain")], by[(k, "secure")]
        print(
            f"| {k} | {s['dropped']} | {p['silo_s_mean']:.3f} | {s['silo_s_mean']:.3f} ({s['silo_s_mean'] / p['silo_s_mean']:.1f}x) "
            f"| {p['aggregator_s']:.3f} | {s['aggregator_s']:.3f} ({s['aggregator_s'] / p['aggregator_s']:.1f}x) "
            f"| {s['message_bytes_per_silo'] / 1024:.1f} KiB | {s['message_bytes_per_silo'] / s['upload_bytes_per_silo']:.2%} |"
        )


if __name__ == "__main__":
    main()
