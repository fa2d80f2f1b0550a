"""Metrics, timing and communication accounting.

- `MetricWriter`: every scalar goes to `metrics/*.jsonl` (one JSON object per line) and to
  TensorBoard event files (tensorboardX; clu's writers would need TensorFlow).
- `PhaseTimer`: wall time per named phase (local train, upload, aggregate, eval).
- `dp_allreduce_bytes` / `CommLedger`: the bytes a federation really moves versus what
  data-parallel training of the same tokens would all-reduce.
- `StepProgress` / `format_duration`: progress lines with tokens/s and an ETA (a silo's local
  steps, a sweep's points).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np


def _to_py(v: Any) -> Any:
    if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "__array__"):
        a = np.asarray(v)
        return a.item() if a.ndim == 0 else a.tolist()
    return v


class MetricWriter:
    """Writes scalars to JSONL (and TensorBoard when available). Only process 0 writes."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
        self.dir = os.path.join(workdir, "metrics")
        self.enabled = enabled
        self._files: dict[str, Any] = {}
        self._tb = None
        if not enabled:
            return
        os.makedirs(self.dir, exist_ok=True)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=os.path.join(self.dir, "tb"))

    def write(self, stream: str, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _to_py(v) for k, v in scalars.items()}}
        f = self._files.get(stream)
        if f is None:
            f = self._files[stream] = open(os.path.join(self.dir, f"{stream}.jsonl"), "a")
        f.write(json.dumps(row) + "\n")
        f.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{stream}/{k}", v, int(step))

    def truncate(self, stream: str, *, keep_below: int) -> int:
        """Drops the rows of `stream` whose "round" is >= keep_below (left by a crash mid-round,
        before the round's checkpoint); rows stay one per round. Returns the rows dropped."""
        if not self.enabled:
            return 0
        path = os.path.join(self.dir, f"{stream}.jsonl")
        if not os.path.exists(path):
            return 0
        rows = read_jsonl(path)
        kept = [r for r in rows if r.get("round", -1) < keep_below]
        if len(kept) != len(rows):
            if stream in self._files:
                self._files.pop(stream).close()
            tmp = f"{path}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, path)
        return len(rows) - len(kept)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def rows_by_round(workdir: str, stream: str = "rounds") -> dict[int, dict[str, Any]]:
    """The rows of metrics/<stream>.jsonl keyed by round (the last row of a round wins)."""
    path = os.path.join(workdir, "metrics", f"{stream}.jsonl")
    return {r["round"]: r for r in read_jsonl(path)} if os.path.exists(path) else {}


class PhaseTimer:
    """Accumulates wall time per phase: `with timer.phase("train"): ...`."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out = dict(self.totals)
        self.totals.clear()
        return out


def dp_allreduce_bytes(grad_bytes: int, steps: int, workers: int) -> int:
    """Bytes that `workers` data-parallel workers move for `steps` steps (ring all-reduce).

    A ring all-reduce of an S-byte gradient makes every worker send 2 (n-1)/n S bytes and
    receive as many (reduce-scatter + all-gather). Counted like the federation's traffic:
    the total over all workers, both directions: 4 (n-1) S per step. One worker moves nothing.
    """
    if workers <= 1:
        return 0
    return int(4 * (workers - 1) * grad_bytes * steps)


class CommLedger:
    """Bytes down/up per silo and per round, and the data-parallel equivalent."""

    def __init__(self):
        self.rounds: list[dict[str, Any]] = []

    def record_round(
        self,
        round_idx: int,
        *,
        down: Mapping[str, int],
        up: Mapping[str, int],
        dp_equivalent: int,
    ) -> dict[str, Any]:
        row = {
            "round": round_idx,
            "bytes_down": int(sum(down.values())),
            "bytes_up": int(sum(up.values())),
            "bytes_per_silo_down": dict(down),
            "bytes_per_silo_up": dict(up),
            "dp_equivalent_bytes": int(dp_equivalent),
        }
        self.rounds.append(row)
        return row

    def totals(self) -> dict[str, Any]:
        down = sum(r["bytes_down"] for r in self.rounds)
        up = sum(r["bytes_up"] for r in self.rounds)
        dp = sum(r["dp_equivalent_bytes"] for r in self.rounds)
        moved = down + up
        return {
            "bytes_down": down,
            "bytes_up": up,
            "bytes_moved": moved,
            "dp_equivalent_bytes": dp,
            "traffic_ratio_vs_dp": (dp / moved) if moved else float("inf"),
        }


class StepProgress:
    """Progress of counted work: step (or round), loss, tokens/s and an ETA (stderr).

    A live bar on a terminal; in a log file a plain line at most every `log_every_s` (so short
    rounds print nothing and a round of hours says where it is). Only process 0 shows it.
    `unit` and `eta_label` name what is counted ("step" / "round ETA" inside a silo's round;
    "round" / "point ETA" for a sweep's point); `initial` is the count already done when it
    starts (a resumed run), so the rate only counts the work done here; `bar=False` always
    prints plain lines (a sweep's progress next to the silos' own bars).
    """

    def __init__(
        self,
        desc: str,
        *,
        total: int,
        tokens_per_step: int,
        enabled: bool | None = None,
        log_every_s: float = 30.0,
        unit: str = "step",
        eta_label: str = "round ETA",
        initial: int = 0,
        bar: bool | None = None,
    ):
        import sys

        if enabled is None:
            import jax

            enabled = jax.process_index() == 0
        self.desc, self.total, self.tokens_per_step = desc, total, tokens_per_step
        self.enabled, self.log_every_s = enabled, log_every_s
        self.unit, self.eta_label, self.initial = unit, eta_label, initial
        self.done, self.t0 = initial, time.perf_counter()
        self.last_line = self.t0
        self.bar = None
        if enabled and (sys.stderr.isatty() if bar is None else bar):
            import tqdm

            self.bar = tqdm.tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                file=sys.stderr,
                leave=False,
                dynamic_ncols=True,
            )

    def rate(self, done: int | None = None) -> float:
        """Tokens per second over the work done since this progress started."""
        done = self.done if done is None else done
        return (done - self.initial) * self.tokens_per_step / max(time.perf_counter() - self.t0, 1e-9)

    def eta(self, done: int | None = None) -> float | None:
        """Seconds until `total`, at the rate so far (None before any work was done)."""
        done = self.done if done is None else done
        if done <= self.initial:
            return None
        return (self.total - done) * (time.perf_counter() - self.t0) / (done - self.initial)

    def update(self, done: int, *, loss: float | None = None, note: str = "") -> None:
        import sys

        now = time.perf_counter()
        rate = self.rate(done)
        if self.bar is not None:
            self.bar.update(done - self.done)
            post = {} if loss is None else {"loss": f"{loss:.3f}"}
            self.bar.set_postfix(**post, tok_s=f"{rate:,.0f}", refresh=False)
        elif self.enabled and done < self.total and now - self.last_line >= self.log_every_s:
            eta = self.eta(done)
            print(
                f"{self.desc}: {self.unit} {done}/{self.total}"
                + ("" if loss is None else f" loss {loss:.3f}")
                + f", {rate:,.0f} tokens/s, {self.eta_label} "
                + ("n/a" if eta is None else format_duration(eta))
                + (f", {note}" if note else ""),
                file=sys.stderr,
                flush=True,
            )
            self.last_line = now
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def round_progress(name: str, r: int, total_steps: int, tokens_per_step: int):
    """`progress(steps_done, metrics)` for one silo's round: a `StepProgress` closed at the end."""
    bar = StepProgress(f"{name} r{r}", total=total_steps, tokens_per_step=tokens_per_step)

    def report(done: int, metrics: Mapping[str, Any]) -> None:
        bar.update(done, loss=float(np.mean(metrics["loss"])))
        if done >= total_steps:
            bar.close()

    return report


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def format_duration(seconds: float) -> str:
    """42s, 3m05s, 2h07m: a duration as a person reads it in a progress line."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
