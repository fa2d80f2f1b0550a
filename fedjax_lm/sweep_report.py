"""A sweep's table (CSV + Markdown) and plots (final perplexity vs the swept value; perplexity vs tokens),
from its points' summaries and metrics (`sweep.py` runs the points).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fedjax_lm import monitor

if TYPE_CHECKING:
    from fedjax_lm.sweep import Point, Result


def swept_keys(points: Sequence[Point]) -> list[str]:
    keys: list[str] = []
    for p in points:
        keys += [k for k in p.overrides if k != "name" and k not in keys]
    return keys


def _round_means(workdir: str) -> dict[str, float]:
    """Mean over rounds of the update geometry (federated runs)."""
    rows = monitor.rows_by_round(workdir, "rounds").values()
    out = {}
    for key in ("update_cos_mean", "update_norm_ratio"):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out


def table_rows(results: Sequence[Result], workdir: str) -> tuple[list[str], list[dict[str, Any]]]:
    keys = swept_keys([r.point for r in results])
    silos: list[str] = []
    for r in results:
        for s in (r.summary or {}).get("val", {}).get("per_silo", {}):
            if s not in silos:
                silos.append(s)
    head = ["point", "status", *keys, "kind", "tokens", "wall_s", "val_loss", "val_ppl"]
    head += [
        "bytes_up",
        "bytes_down",
        "bytes_moved",
        "dp_equivalent_bytes",
        "traffic_ratio_vs_dp",
        "update_cos_mean",
        "update_norm_ratio",
    ]
    head += [f"ppl/{s}" for s in silos] + ["error"]
    rows = []
    for r in results:
        row: dict[str, Any] = {
            "point": r.point.name,
            "status": r.status,
            "kind": r.point.kind,
            "error": r.error,
        }
        row.update({k: r.point.overrides.get(k, "") for k in keys})
        s = r.summary
        if s is not None:
            comm = s.get("communication") or {}
            row.update(
                tokens=s.get("tokens"),
                wall_s=s.get("wall_time_s"),
                val_loss=s["val"]["pooled"]["loss"],
                val_ppl=s["val"]["pooled"]["ppl"],
                bytes_up=comm.get("bytes_up", ""),
                bytes_down=comm.get("bytes_down", ""),
                bytes_moved=comm.get("bytes_moved", ""),
                dp_equivalent_bytes=comm.get("dp_equivalent_bytes", ""),
                traffic_ratio_vs_dp=comm.get("traffic_ratio_vs_dp", ""),
                **_round_means(os.path.join(workdir, r.point.name)),
                **{f"ppl/{k}": v["ppl"] for k, v in s["val"]["per_silo"].items()},
            )
        rows.append(row)
    return head, rows


def _md_cell(key: str, v: Any) -> str:
    if v is None or v == "":
        return ""
    if key in ("bytes_up", "bytes_down", "bytes_moved", "dp_equivalent_bytes"):
        return monitor.human_bytes(v)
    if key == "traffic_ratio_vs_dp":
        return f"{v:.1f}x"
    if key == "tokens":
        return f"{v:,.0f}"
    if key == "wall_s":
        return f"{v:.0f}"
    if key == "val_loss":
        return f"{v:.4f}"
    if key.startswith("update_"):
        return f"{v:.3f}"
    if key == "val_ppl" or key.startswith("ppl/"):
        return f"{v:.2f}"
    return str(v).replace("|", "\\|")


def write_outputs(results: Sequence[Result], workdir: str, *, command: str = "", wall_s: float = 0.0) -> None:
    """sweep.csv, sweep.md, sweep_final.png and sweep_curves.png of the points so far."""
    head, rows = table_rows(results, workdir)
    if not any(r["error"] for r in rows):
        head = [h for h in head if h != "error"]
    tmp = os.path.join(workdir, f"sweep.csv.tmp.{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=head, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, os.path.join(workdir, "sweep.csv"))
    lines = [
        f"Command: `{command}`" if command else "",
        f"Wall time of this invocation: {monitor.format_duration(wall_s)}; points: {len(results)}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(_md_cell(h, r.get(h)) for h in head) + " |" for r in rows]
    runs_md = os.path.join(workdir, "sweep.md")
    with open(runs_md + ".tmp", "w") as f:
        f.write("\n".join(lines).lstrip("\n") + "\n")
    os.replace(runs_md + ".tmp", runs_md)
    plot_final(results, os.path.join(workdir, "sweep_final.png"))
    plot_curves(results, workdir, os.path.join(workdir, "sweep_curves.png"))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_axes(points: Sequence[Point]) -> tuple[str | None, list[str]]:
    """(x key, keys that split the lines): x is the swept key with the most distinct values; a key
    whose value follows from x (rounds from H at a fixed budget) does not split the lines."""
    keys = swept_keys(points)
    values = {k: [p.overrides.get(k) for p in points] for k in keys}
    distinct = {k: len({repr(v) for v in vs if v is not None}) for k, vs in values.items()}
    candidates = [k for k in keys if distinct[k] >= 2 and k != "recipe"]
    if not candidates:
        return None, []
    x = max(candidates, key=lambda k: (distinct[k], -keys.index(k)))
    groups = []
    for k in keys:
        if k == x:
            continue
        by_x: dict[str, set[str]] = {}
        for p in points:
            if p.overrides.get(x) is not None:
                by_x.setdefault(repr(p.overrides[x]), set()).add(repr(p.overrides.get(k)))
        if any(len(v) > 1 for v in by_x.values()):
            groups.append(k)
    return x, groups


def plot_final(results: Sequence[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.summary is not None]
    fig, ax = plt.subplots(figsize=(6.8, 4.4), dpi=120)
    x, groups = plot_axes([r.point for r in ok])
    ppl = {r.point.name: r.summary["val"]["pooled"]["ppl"] for r in ok}
    if x is None:  # nothing varies along an axis: one bar per point
        ax.bar(range(len(ok)), [ppl[r.point.name] for r in ok])
        ax.set_xticks(range(len(ok)), [r.point.name for r in ok], rotation=30, ha="right", fontsize=7)
    else:
        on_axis = [r for r in ok if r.point.overrides.get(x) is not None]
        xs = [r.point.overrides[x] for r in on_axis]
        numeric = all(_is_number(v) for v in xs)
        order = list(dict.fromkeys(repr(v) for v in xs))  # categories in the order the sweep adds them
        labels = {repr(v): str(v) for v in xs}
        pos = (lambda v: v) if numeric else (lambda v: order.index(repr(v)))
        lines: dict[str, list[tuple[Any, float]]] = {}
        for r in on_axis:
            label = ", ".join(f"{k}={r.point.overrides[k]}" for k in groups if k in r.point.overrides)
            lines.setdefault(label, []).append((pos(r.point.overrides[x]), ppl[r.point.name]))
        for label, pts in lines.items():
            pts.sort()
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=label or None)
        for i, r in enumerate(r for r in ok if r.point.overrides.get(x) is None):
            ax.axhline(ppl[r.point.name], ls="--", color=f"C{(len(lines) + i) % 10}", label=r.point.name)
        if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log", base=2 if all(float(v).is_integer() for v in xs) else 10)
        if not numeric:
            ax.set_xticks(range(len(order)), [labels[o] for o in order])
        ax.set_xlabel(x)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax.set_ylabel("final validation perplexity (pooled)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def curve(point: Point, workdir: str) -> list[tuple[float, float]]:
    """(training tokens, pooled validation perplexity) of a run: its evaluations during and at the end."""
    evals = [r for r in _jsonl(os.path.join(workdir, "metrics", "eval.jsonl")) if "pooled_ppl" in r]
    cfg = point.config
    if point.kind == "centralized":
        per_step = int(cfg.train.batch_size) * int(cfg.train.seq_len)
        return sorted((e["step"] * per_step, e["pooled_ppl"]) for e in evals)
    cum, tokens_at, pts = 0.0, {}, []
    for r in sorted(monitor.rows_by_round(workdir, "rounds").values(), key=lambda r: r["round"]):
        cum += r["tokens"]
        tokens_at[r["round"] + 1] = cum
        if "val_ppl" in r:
            pts.append((cum, r["val_ppl"]))
    pts += [(tokens_at[e["step"]], e["pooled_ppl"]) for e in evals if e["step"] in tokens_at]
    return sorted(pts)


def _jsonl(path: str) -> list[dict[str, Any]]:
    return monitor.read_jsonl(path) if os.path.exists(path) else []


def plot_curves(results: Sequence[Result], workdir: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.4), dpi=120)
    for r in results:
        pts = curve(r.point, os.path.join(workdir, r.point.name))
        if pts:
            ax.plot(
                *zip(*pts),
                marker="o",
                ms=3,
                label=r.point.name + (" (failed)" if r.status == "failed" else ""),
            )
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity (pooled)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
