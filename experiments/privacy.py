"""Privacy vs utility of client-level DP on the main job (tiny model, 8 natural silos), central vs distributed.

    python experiments/privacy.py --workdir runs/privacy        # ~16 min per mode on 2 CPU cores

One one-process federation per (mode, target ε) (the README's main job: photon.py:size=tiny,silos=8,
H=32, 8 rounds, every silo in every round, so q = 1 and no amplification by sampling), with the σ that
dp-accounting (RDP) gives for ε at δ = 1e-5 after the run's rounds:

* central — the main job as it is (int8 uploads); the aggregator clips each silo's update to --clip,
  adds N(0, σ²C²) and divides by the 8 silos. ε = inf is the main job without DP.
* distributed — secure aggregation on (federation.secagg: uncompressed ring uploads, no per-update
  norm bound); each silo clips its own update to --clip and adds N(0, σ²C²/t), t = 5 of 8 (a majority),
  so the sum carries 8/5 σ²C² when all 8 survive. ε = inf is secure aggregation without DP (ring bound
  --clip per entry).

A finished run is not repeated (its workdir is reused: train resumes, re-evaluates and reports the
wall time it first took). Writes WORKDIR/privacy.md (the table) and WORKDIR/privacy.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _median(values: list[float]) -> float:
    values = sorted(values)
    return float(values[len(values) // 2]) if values else math.nan


def table(rows: list[dict]) -> str:
    head = (
        "| mode | target ε | ε spent (δ) | σ | C | q | noise std per coordinate | clipped updates | median ‖Δ‖ "
        "| pooled ppl | wall s |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = r["ppl"]
        ppl_text = f"{ppl:.1f}" if ppl < 1e6 else (f"{ppl:.2g}" if math.isfinite(ppl) else "inf (diverged)")
        lines.append(
            f"| {r['mode']} | {r['target_epsilon']} | {r['epsilon']:.3g} ({r['delta'] or '-'}) | {r['noise_multiplier']:.4g} | "
            f"{r['clip_norm'] or '-'} | {r['q']:g} | {r['noise_std']:.3g} | {r['clipped']}/{r['updates']} | "
            f"{r['median_update_norm']:.3g} | {ppl_text} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/privacy")
    p.add_argument("--variant", default="size=tiny,silos=8")
    p.add_argument("--epsilons", default="inf,1000,100,8,2")
    p.add_argument("--modes", default="central,distributed")
    p.add_argument("--clip", type=float, default=2.0, help="C, the clip norm of a silo's update")
    p.add_argument("--delta", type=float, default=1e-5)
    args = p.parse_args()

    from fedjax_lm import config as config_lib
    from fedjax_lm import simulation

    t0 = time.time()
    rows = []
    for mode, eps_text in [(m, e) for m in args.modes.split(",") for e in args.epsilons.split(",")]:
        eps = float(eps_text)
        config = config_lib.load_config(f"{ROOT}/experiments/photon.py:{args.variant}")
        if math.isfinite(eps):
            config.federation.dp.update(
                dict(mode=mode, clip_norm=args.clip, target_epsilon=eps, delta=args.delta)
            )
        if mode == "distributed":  # secure aggregation: lossless ring uploads, no per-update norm checks
            f = config.federation
            f.compression, f.max_update_norm_ratio = "none", 0.0
            f.secagg.update(dict(enabled=True, bound=0.0 if math.isfinite(eps) else args.clip))
        workdir = os.path.join(args.workdir, ("" if mode == "central" else f"{mode}-") + f"eps-{eps_text}")
        print(f"=== {mode} epsilon {eps_text} -> {workdir}", flush=True)
        t = time.time()
        before = os.path.join(workdir, "summary.json")
        first_wall = json.load(open(before))["wall_time_s"] if os.path.exists(before) else None
        summary = simulation.train(config, workdir)
        rounds = [json.loads(line) for line in open(os.path.join(workdir, "metrics", "rounds.jsonl"))]
        priv = summary.get("privacy", {})
        rows.append(
            {
                "mode": mode,
                "target_epsilon": eps_text,
                "epsilon": priv.get("epsilon", math.inf),
                "noise_multiplier": priv.get("noise_multiplier", 0.0),
                "clip_norm": priv.get("clip_norm"),
                "delta": priv.get("delta"),
                "q": priv.get("sampling_probability", 1.0),
                # on the mean: σC/8 (central); distributed: 8 shares of σC/√t each, over 8
                "noise_std": priv.get("noise_multiplier", 0.0)
                * (priv.get("clip_norm") or 0.0)
                / 8
                * (math.sqrt(8 / (8 // 2 + 1)) if mode == "distributed" else 1.0),
                "clipped": sum(r.get("clipped", 0) for r in rounds),
                "updates": sum(r["silos"] for r in rounds),
                "median_update_norm": _median(  # not seen by a secure aggregator (distributed: nan)
                    [v for r in rounds for k, v in r.items() if k.startswith("update_norm/")]
                ),
                "ppl": summary["val"]["pooled"]["ppl"],
                "wall_s": first_wall if first_wall is not None else time.time() - t,
            }
        )
    md = table(rows)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "privacy.md"), "w") as f:
        f.write(
            f"Command: python experiments/privacy.py --workdir {args.workdir} --variant {args.variant} "
            f"--clip {args.clip} --modes {args.modes} (wall time {(time.time() - t0) / 60:.0f} min)\n\n{md}\n"
        )
    json.dump(rows, open(os.path.join(args.workdir, "privacy.json"), "w"), indent=1)
    print(md)


if __name__ == "__main__":
    main()
