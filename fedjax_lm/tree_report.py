"""The attention weights a tree's federations gave their children, round by round (a plot and a table).

    python -m fedjax_lm.tree_report runs/worldlm-family/method=worldlm      # writes attention.png there

Reads the run's metrics/rounds.jsonl (`attention/<federation>/<child>` fields, fedjax_lm/simulation.py
writes them: each child's weight averaged over the key layers, at the federation's last round of the
root round). One panel per federation that has two or more children.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

from fedjax_lm import monitor


def attention_series(workdir: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{federation: {child: [(root round, weight)]}} of a run."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for r, row in sorted(monitor.rows_by_round(workdir, "rounds").items()):
        for key, value in row.items():
            if key.startswith("attention/"):
                _, node, child = key.split("/", 2)
                out[node][child].append((int(r), float(value)))
    return {n: dict(c) for n, c in out.items()}


def table(workdir: str) -> str:
    """Markdown: each federation's children and their weight at the first and the last round."""
    lines = ["| federation | child | first round | last round |", "|---|---|---|---|"]
    for node, children in sorted(attention_series(workdir).items()):
        for child, pts in sorted(children.items()):
            lines.append(f"| {node} | {child} | {pts[0][1]:.3f} | {pts[-1][1]:.3f} |")
    return "\n".join(lines)


def plot(workdir: str, path: str) -> str | None:
    """The attention weights per federation vs the root round; None if the run logged none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {n: c for n, c in attention_series(workdir).items() if len(c) > 1}
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.4), squeeze=False)
    for ax, (node, children) in zip(axes[0], sorted(series.items())):
        for child, pts in sorted(children.items()):
            ax.plot([r for r, _ in pts], [w for _, w in pts], marker="o", ms=3, label=child)
        ax.set_title(f"federation {node}")
        ax.set_xlabel("root round")
        ax.set_ylabel("attention weight (mean over key layers)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdir")
    p.add_argument("--out", default="", help="PNG path (default WORKDIR/attention.png)")
    a = p.parse_args(argv)
    path = plot(a.workdir, a.out or os.path.join(a.workdir, "attention.png"))
    print(table(a.workdir))
    print(f"plot: {path}" if path else "no federation with two or more children logged attention weights")


if __name__ == "__main__":
    main()
