"""Centralized vs Photon-recipe vs DiLoCo-recipe federated training at an equal token budget.

    python experiments/compare.py --workdir runs/compare            # tiny model, ~15-20 min on 2 CPU cores

Every run sees the same number of training tokens from the 8 natural silos of the default
corpus: Photon with 8 silos x H local steps x its small batch per round; DiLoCo with 4x
the batch and H/4 steps; centralized with one batch the size of a round's 8 silo batches
(the data-parallel equivalent). Writes `results.md` (table) and `curves.png`
(validation perplexity vs tokens) to the workdir, plus each run's own folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fedjax_lm import config as config_lib  # noqa: E402
from fedjax_lm import simulation  # noqa: E402
from fedjax_lm import monitor  # noqa: E402
from fedjax_lm import train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def configs(size: str, rounds: int, H: int, batch: int, silos: int, evals: int):
    every = max(1, rounds // evals)
    photon = config_lib.load_config(
        f"{HERE}/photon.py:size={size},silos={silos},rounds={rounds},H={H},batch_size={batch},eval_every={every}"
    )
    diloco = config_lib.load_config(
        f"{HERE}/diloco.py:size={size},silos={silos},rounds={rounds},H={max(1, H // 4)},batch_size={batch * 4},"
        f"eval_every={every}"
    )
    steps = rounds * H
    central = config_lib.load_config(
        f"{HERE}/centralized.py:size={size},steps={steps},batch_size={batch * silos}"
    )
    central.data = photon.data  # the same silos and corpus
    central.train.eval_every = every * H
    return {"centralized": central, "photon": photon, "diloco": diloco}


def curve(kind: str, workdir: str, cfg) -> list[tuple[float, float]]:
    """(tokens, pooled validation perplexity) points of a finished run."""
    evals = monitor.read_jsonl(os.path.join(workdir, "metrics", "eval.jsonl"))
    if kind == "centralized":
        per_step = cfg.train.batch_size * cfg.train.seq_len
        pts = [(e["step"] * per_step, e["pooled_ppl"]) for e in evals]
    else:
        rounds = monitor.read_jsonl(os.path.join(workdir, "metrics", "rounds.jsonl"))
        cum, tokens_at = 0.0, {}
        for r in rounds:
            cum += r["tokens"]
            tokens_at[r["round"] + 1] = cum
        pts = [(tokens_at[r["round"] + 1], r["val_ppl"]) for r in rounds if "val_ppl" in r]
        pts += [(tokens_at[e["step"]], e["pooled_ppl"]) for e in evals]
    return sorted(pts)


def table(results: dict) -> str:
    silos = list(next(iter(results.values()))["val"]["per_silo"])
    head = ["run", "tokens", "wall s", "pooled ppl", *silos, "bytes moved", "vs data-parallel"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in results.items():
        comm = s.get("communication")
        moved = monitor.human_bytes(comm["bytes_moved"]) if comm else "(all-reduce every step)"
        ratio = f"{comm['traffic_ratio_vs_dp']:.0f}x less" if comm else "1x"
        row = [
            name,
            f"{s['tokens']:,.0f}",
            f"{s['wall_time_s']:.0f}",
            f"{s['val']['pooled']['ppl']:.2f}",
            *(f"{s['val']['per_silo'][k]['ppl']:.2f}" for k in silos),
            moved,
            ratio,
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, pts in curves.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity (pooled)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("equal token budget, 8 natural silos")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/compare")
    p.add_argument("--size", default="tiny")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--H", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="Photon's local batch (DiLoCo uses 4x)")
    p.add_argument("--silos", type=int, default=8)
    p.add_argument("--evals", type=int, default=4, help="validation points per run")
    p.add_argument("--only", default="centralized,photon,diloco")
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    results, curves = {}, {}
    for name, cfg in configs(args.size, args.rounds, args.H, args.batch, args.silos, args.evals).items():
        if name not in args.only.split(","):
            continue
        wd = os.path.join(args.workdir, name)
        print(f"=== {name} -> {wd}", flush=True)
        if os.path.exists(os.path.join(wd, "summary.json")):
            summary = json.load(open(os.path.join(wd, "summary.json")))
        elif cfg.get("federation") is not None:
            summary = simulation.train(cfg, wd)
            summary.pop("server", None)
        else:
            summary = train.train(cfg, wd)
        results[name] = summary
        curves[name] = curve("centralized" if name == "centralized" else "federated", wd, cfg)
    md = table(results)
    with open(os.path.join(args.workdir, "results.md"), "w") as f:
        f.write(
            f"Command: python experiments/compare.py --workdir {args.workdir} --size {args.size} "
            f"--rounds {args.rounds} --H {args.H} --batch {args.batch} --silos {args.silos}\n\n{md}\n"
        )
    plot(curves, os.path.join(args.workdir, "curves.png"))
    print(md)
    print(f"wrote {args.workdir}/results.md and {args.workdir}/curves.png")


if __name__ == "__main__":
    main()
